"""`longrope serve`: vLLM's OpenAI-compatible app over our engine client, which picks a factor set per
request and promotes one that outgrows it; our middleware, metrics, headers and errors around it."""
