"""HTTP server for lookup, influence and forget requests."""
