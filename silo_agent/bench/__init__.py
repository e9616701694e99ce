"""``fedsilo bench``: every method on the same data, measured the same way."""
