"""``fedsilo dashboard``: a local web page over the coordinator's Admin API (data, page, HTTP server)."""
