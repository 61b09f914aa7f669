"""The models the project builds or prepares: the default SmolLM2 (from its GGUF package) and the tiny
random-weight models that tests, the selftest and the load benchmark build in seconds."""
