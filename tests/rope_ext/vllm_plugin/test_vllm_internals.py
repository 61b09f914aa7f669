"""Every vLLM internal longrope-serve uses is listed with its versions, present, and named when missing: at start
(rope_ext/vllm_plugin/vllm_internals.py, server/vllm_internals.py) and in vLLM's sources of every supported
release, read without importing them (rope_ext/porting_surface.py, `longrope check-vllm`)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rope_ext.porting_surface import SourceTree
from tests.helpers import REPO

LONGROPE = [sys.executable, "-m", "longrope"]


@pytest.mark.unit
def test_every_vllm_internal_is_listed_and_present():
    """This vLLM has every entry of its version, and every runner method a mixin extends, every model-state
    method the V2 state extends and every EngineClient method our engine client overrides is listed."""
    from vllm.engine.protocol import EngineClient
    from vllm.v1.worker.gpu.model_states.interface import ModelState
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from rope_ext.vllm_plugin.cpu_generators import SeededCpuGeneratorsMixin
    from rope_ext.vllm_plugin.runners import PerRequestSetsRunner, PerRequestSetsState
    from rope_ext.vllm_plugin.vllm_internals import (
        PLUGIN_LISTS,
        V1_RUNNER_INTERNALS,
        V2_RUNNER_INTERNALS,
        check_internals,
    )
    from server.engine_client import LadderEngineClient
    from server.vllm_internals import SERVER_INTERNALS

    for internals in (*PLUGIN_LISTS.values(), SERVER_INTERNALS):
        check_internals(internals)
    overridden = {name for name in vars(LadderEngineClient) if hasattr(EngineClient, name)
                  and not name.startswith("__") and callable(vars(LadderEngineClient)[name])}
    assert overridden and overridden <= {i.name.removeprefix("EngineClient.") for i in SERVER_INTERNALS}, overridden
    for mixin, base, internals in ((PerRequestSetsRunner, GPUModelRunner, V1_RUNNER_INTERNALS),
                                   (SeededCpuGeneratorsMixin, GPUModelRunner, V1_RUNNER_INTERNALS),
                                   (PerRequestSetsState, ModelState, V2_RUNNER_INTERNALS)):
        listed = {i.name.removeprefix(f"{base.__name__}.") for i in internals if i.name.startswith(base.__name__)}
        extended = {name for name in vars(mixin) if callable(vars(mixin)[name]) and hasattr(base, name)}
        assert extended and extended <= listed, (mixin.__name__, extended - listed)


@pytest.mark.unit
def test_a_missing_vllm_internal_is_named_at_start():
    from rope_ext.vllm_plugin.vllm_internals import Internal, MissingInternal, check_internals, check_runner_state

    moved = Internal("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs_v2", "extends it")
    with pytest.raises(MissingInternal, match=r"vLLM 0\.32\.0 has no "
                       r"vllm\.v1\.worker\.gpu_model_runner\.GPUModelRunner\._prepare_inputs_v2"):
        check_internals((moved,))
    renamed = Internal("vllm.config", "set_current_vllm_config", "enters it", ("vllm_config", "runner"))
    with pytest.raises(MissingInternal, match=r"set_current_vllm_config has no parameter runner"):
        check_internals((renamed,))
    with pytest.raises(MissingInternal, match="has no input_batch.req_ids"):
        check_runner_state(object(), ("input_batch.req_ids",))
    check_internals((Internal("vllm.config", "VllmConfig.compile_factors", "wraps it", versions=("0.34.0",)),))


@pytest.mark.unit
def test_the_source_check_passes_on_the_installed_vllm():
    result = subprocess.run([*LONGROPE, "check-vllm"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^vLLM 0\.32\.0 at ", result.stdout, re.M)
    assert re.search(r"^  V2 model runner: ok \((\d+) names\)", result.stdout, re.M)


@pytest.mark.unit
def test_the_source_check_names_a_removed_name(tmp_path):
    """A copy of the installed vLLM's sources with the V2 model state's prepare_inputs renamed: the check
    fails, naming that entry and the version, and nothing else."""
    installed = SourceTree.installed().path
    shutil.copytree(installed / "vllm", tmp_path / "vllm", ignore=lambda folder, names: [
        n for n in names if not n.endswith(".py") and not Path(folder, n).is_dir()])
    interface = tmp_path / "vllm" / "v1" / "worker" / "gpu" / "model_states" / "interface.py"
    text = interface.read_text()
    assert "    def prepare_inputs(\n" in text
    interface.write_text(text.replace("    def prepare_inputs(\n", "    def prepare_model_inputs(\n"))
    result = subprocess.run([*LONGROPE, "check-vllm", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    missing = [line.strip() for line in result.stdout.splitlines() if line.startswith("    ")]
    assert missing == ["vLLM 0.32.0 has no vllm.v1.worker.gpu.model_states.interface.ModelState.prepare_inputs "
                       "(longrope extends it: the model is called with shifted positions)"]


@pytest.mark.slow
@pytest.mark.parametrize("release", ["0.33.0", "0.34.0"])
def test_the_source_check_passes_on_every_supported_release(release):
    """vLLM's released wheels (CUDA builds: only their Python sources are read), downloaded with pip into the
    user cache once."""
    result = subprocess.run([*LONGROPE, "check-vllm", "--release", release], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"vLLM {release} at " in result.stdout and "missing" not in result.stdout
    if release == "0.34.0":  # the V1 runner is gone: its list has no name for this release
        assert "  V1 model runner: ok (0 names)" in result.stdout


@pytest.mark.unit
def test_source_tree_reads_its_version(tmp_path):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "_version.py").write_text("__version__ = version = '0.33.0+cu130'\n")
    assert SourceTree(Path(tmp_path)).version() == "0.33.0"
