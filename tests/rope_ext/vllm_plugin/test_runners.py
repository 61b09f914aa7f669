"""The worker side: each token's position shifted by its request's set start, in vLLM's V1 runner (an offsets
buffer around the model call) and its V2 runner (the model state's inputs) (rope_ext/vllm_plugin/runners.py)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rope_ext.protocol import SET_INDEX_KEY
from rope_ext.vllm_plugin.model_ladder import LadderMismatch


@pytest.mark.unit
def test_a_device_offset_buffer_is_zeroed_past_the_steps_tokens_every_step():
    """Sleep mode level 2 hands the device buffer back uninitialised: padding slots must still read set 0.
    (A second CPU tensor stands for the device buffer; the runner treats any buffer but its own as one.)"""
    from rope_ext.vllm_plugin.runners import PerRequestSetsRunner

    runner = PerRequestSetsRunner()
    runner._rope_rows = 100
    runner._rope_offsets_cpu = torch.zeros(16, dtype=torch.int64)
    runner._rope_offsets_np = runner._rope_offsets_cpu.numpy()
    runner._rope_offsets = torch.full((16,), 987654, dtype=torch.int64)  # what a woken-up buffer may hold
    runner._rope_set_of = {"a": 2, "b": 1}
    runner.input_batch = SimpleNamespace(req_ids=["a", "b"])
    runner._fill_rope_offsets(np.array([3, 2]))
    assert runner._rope_offsets.tolist() == [200] * 3 + [100] * 2 + [0] * 11


class _StockState:
    """Stands for the model state V2 resolves (the mixin's base): what PerRequestSetsState calls on it."""

    def __init__(self, vllm_config, model, encoder_cache, device):
        self.max_num_reqs, self.max_num_tokens = 4, 16

    def add_request(self, req_index, new_req_data):
        pass

    def apply_staged_writes(self):
        pass

    def prepare_inputs(self, input_batch, req_states):
        return {}

    def prepare_dummy_inputs(self, num_reqs, num_tokens):
        return {}


@pytest.mark.unit
def test_v2_state_shifts_each_token_by_its_requests_set(monkeypatch):
    """Two requests in slots 2 and 0 (sets 2 and 1, 100 rows per set), 3 + 2 tokens and 3 padding slots: each
    token moves by its own request's set start, padding keeps set 0, V2's own positions are left alone, and
    dummy runs (CUDA-graph capture) read the very buffer the real steps write."""
    import vllm.v1.worker.cpu_worker  # noqa: F401 - as in a CPU worker: V2's host buffers become plain CPU tensors

    from rope_ext.vllm_plugin import runners

    monkeypatch.setattr(runners, "install_ladder", lambda model, vllm_config, runner: 100)
    state = type("State", (runners.PerRequestSetsState, _StockState), {})(None, None, None, torch.device("cpu"))
    for slot, index in ((2, 2), (0, 1)):
        params = SimpleNamespace(extra_args={SET_INDEX_KEY: index})
        state.add_request(slot, SimpleNamespace(req_id=f"r{slot}", sampling_params=params))
    state.apply_staged_writes()
    positions = torch.tensor([10, 11, 12, 7, 8, 0, 0, 0])
    batch = SimpleNamespace(num_tokens=5, num_reqs=2, idx_mapping=torch.tensor([2, 0]),
                            query_start_loc=torch.tensor([0, 3, 5], dtype=torch.int32), positions=positions)
    shifted = state.prepare_inputs(batch, None)["positions"]
    assert shifted.tolist() == [210, 211, 212, 107, 108, 0, 0, 0]
    assert positions.tolist() == [10, 11, 12, 7, 8, 0, 0, 0]
    assert state.prepare_dummy_inputs(2, 8)["positions"].data_ptr() == shifted.data_ptr()
    with pytest.raises(LadderMismatch, match="reached the model runner without a factor set"):
        state.add_request(1, SimpleNamespace(req_id="bare", sampling_params=SimpleNamespace(extra_args=None)))


@pytest.mark.unit
def test_v2_gets_the_default_state_with_sets_or_a_refusal(tiny_model, monkeypatch):
    """An engine with a ladder gets vLLM's default model state with the sets mixed in; a model that needs
    another state (its own, encoder-decoder, hybrid…) is refused, naming it; without a ladder nothing changes."""
    import json

    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    from rope_ext.vllm_plugin.runners import PerRequestSetsState, state_class_with_sets

    monkeypatch.delenv("LONGROPE_FACTORS", raising=False)
    config = json.loads((tiny_model[0] / "config.json").read_text())  # its own longrope config: a ladder

    def engine(hf_config):
        return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config, model="m"), additional_config={})

    class HybridState(DefaultModelState):
        pass

    resolved = state_class_with_sets(lambda vllm_config, model: DefaultModelState)(engine(config), None)
    assert issubclass(resolved, PerRequestSetsState) and issubclass(resolved, DefaultModelState)
    other = state_class_with_sets(lambda vllm_config, model: HybridState)
    with pytest.raises(LadderMismatch, match="uses the model state HybridState for m"):
        other(engine(config), None)
    plain = {k: v for k, v in config.items() if k != "rope_parameters"}
    assert other(engine(plain), None) is HybridState
