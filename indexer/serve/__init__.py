"""`serve`: the HTTP API and page over one engine (the DB's encoder + SearchIndex behind a micro-batcher)."""
