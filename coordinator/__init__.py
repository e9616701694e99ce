"""The coordinator service: rounds, upload admission, aggregation, sealed relays, the ledger mirror and admin; torch-free and key-free."""
