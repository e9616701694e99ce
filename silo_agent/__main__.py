"""``python -m fedsilo.silo_agent`` runs the ``fedsilo`` command line."""

from fedsilo.silo_agent.cli import main

if __name__ == "__main__":
    main()
