"""OpenAI-compatible HTTP front end over vLLM's async engine (see issue: server)."""
