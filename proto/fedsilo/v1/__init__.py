"""Generated gRPC code for the fedsilo.v1 wire contract."""
