"""fedsilo: cross-silo federated learning for medical imaging (the root package; its parts live in the repository's top-level folders)."""

__version__ = "0.1.0"
