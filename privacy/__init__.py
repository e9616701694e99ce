"""Differential privacy, the per-silo ledger and budgets, HE and key wrapping, signed documents and audit reports."""
