"""``python -m fedsilo`` runs the ``fedsilo`` command line."""

from fedsilo.cli.main import main

if __name__ == "__main__":
    main()
