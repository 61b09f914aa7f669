"""Every vLLM internal longrope-serve uses is listed, present, and named when missing
(rope_ext/vllm_plugin/vllm_internals.py, server/vllm_internals.py)."""

import pytest


@pytest.mark.unit
def test_every_vllm_internal_the_plugin_uses_is_listed_and_present():
    """One list of vLLM's private names (vllm_internals.py): this vLLM has them all, and every
    runner method a mixin extends and every EngineClient method our engine client overrides is on it."""
    from vllm.engine.protocol import EngineClient
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from rope_ext.vllm_plugin.cpu_generators import SeededCpuGeneratorsMixin
    from rope_ext.vllm_plugin.runner import PerRequestSetsMixin
    from rope_ext.vllm_plugin.vllm_internals import CLI_INTERNALS, INTERNALS, check_internals
    from server.engine_client import LadderEngineClient
    from server.vllm_internals import SERVER_INTERNALS

    check_internals()
    check_internals(CLI_INTERNALS)
    check_internals(SERVER_INTERNALS)
    overridden = {name for name in vars(LadderEngineClient) if hasattr(EngineClient, name)
                  and not name.startswith("__") and callable(vars(LadderEngineClient)[name])}
    assert overridden and overridden <= {i.name.removeprefix("EngineClient.") for i in SERVER_INTERNALS}, overridden
    listed = {i.name.removeprefix("GPUModelRunner.") for i in INTERNALS if i.name.startswith("GPUModelRunner.")}
    for mixin in (PerRequestSetsMixin, SeededCpuGeneratorsMixin):
        extended = {name for name in vars(mixin) if callable(vars(mixin)[name]) and hasattr(GPUModelRunner, name)}
        assert extended and extended <= listed, extended - listed


@pytest.mark.unit
def test_a_missing_vllm_internal_is_named():
    from rope_ext.vllm_plugin.vllm_internals import Internal, MissingInternal, check_internals, check_runner_state

    moved = Internal("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs_v2", "extends it")
    with pytest.raises(MissingInternal,
                       match=r"no vllm\.v1\.worker\.gpu_model_runner\.GPUModelRunner\._prepare_inputs_v2"):
        check_internals((moved,))
    with pytest.raises(MissingInternal, match="has no input_batch.req_ids"):
        check_runner_state(object(), ("input_batch.req_ids",))
