"""Two things compiled Triton does that Triton's interpreter refuses, met by vLLM's V2 kernels on this CPU.

- A load or store mask that is not of numpy's ``bool`` dtype ("mask has unsupported dtype"): vLLM's
  ngram drafter builds one from ``&`` of comparisons (``_ngram_finalize_kernel``); on a GPU any non-zero
  mask element means "on". The mask is cast to ``bool``.
- ``max`` / ``min`` with indices over a row that is all NaN (numpy's ``nanargmax`` raises): vLLM's
  warm-up samples from logits of uninitialised memory (attention is skipped while it profiles), so a row
  can be NaN; on a GPU the kernel returns some index. NaN is treated as the identity of the reduction
  (-inf for max, +inf for min), which changes nothing for a row that has a number.

Nothing else in the interpreter is touched; the patches apply when ``triton.runtime.interpreter`` is
imported, in every process that has this package on its path.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

INTERPRETER = "triton.runtime.interpreter"


def _fix(interpreter: ModuleType) -> None:
    import numpy as np

    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store

    def as_bool(mask):
        return interpreter.TensorHandle(mask.data.astype(bool), mask.dtype)

    def create_masked_load(self, ptrs, mask, other, *args):
        return load(self, ptrs, as_bool(mask), other, *args)

    def create_masked_store(self, ptrs, value, mask, *args):
        return store(self, ptrs, value, as_bool(mask), *args)

    builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store

    reduce_ops = interpreter.ReduceOps
    min_max = reduce_ops.min_max

    def min_max_over_nan(self, input, val_reduce_op, idx_reduce_op=None):
        tensor = input[0] if isinstance(input, tuple) else input
        data = tensor.handle.data
        if data.dtype.kind == "f" and np.isnan(data).any():
            identity = -np.inf if val_reduce_op is np.nanmax else np.inf
            handle = interpreter.TensorHandle(np.where(np.isnan(data), identity, data).astype(data.dtype),
                                              tensor.handle.dtype)
            tensor = type(tensor)(handle, tensor.type)
        return min_max(self, tensor, val_reduce_op, idx_reduce_op)

    reduce_ops.min_max = min_max_over_nan


class _FixOnImport(importlib.abc.MetaPathFinder):
    """Finds Triton's interpreter module as Python would, and fixes it once it has been executed."""

    def find_spec(self, name, path, target=None):
        if name != INTERPRETER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _fix(module)

        spec.loader.exec_module = exec_module
        return spec


def fix_when_imported() -> None:
    if INTERPRETER in sys.modules:
        _fix(sys.modules[INTERPRETER])
    elif not any(isinstance(finder, _FixOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _FixOnImport())
