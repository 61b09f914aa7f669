"""RoPE factor sets for LongRoPE: file format, frequency math, baselines, selection and the vLLM plugin."""
