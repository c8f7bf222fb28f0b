"""Processing: the server, its worker threads, retries, middleware and background duties."""
