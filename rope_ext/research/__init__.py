"""The research tools: a transformers model rotated with a factor set, its two measures (perplexity,
passkey), the LongRoPE search and ``longrope eval``. Nothing here runs in the server."""
