"""``longrope selftest`` and the tests' shared pieces: the workload, the engine runner, the reference."""
