"""Generation: sampling, the plain KV-cached loop (and later the batched engine)."""
