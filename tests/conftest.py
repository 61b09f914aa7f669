"""Session-wide fixtures: the prepared real model and a tiny random-weight Llama with a three-step ladder."""

from pathlib import Path

import pytest

from rope_ext.factors import Ladder
from rope_ext.models.smollm2 import prepare_model
from rope_ext.models.tiny import TINY_MAX_LEN, build_tiny_model


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a transformers directory (prepared once; scripts/setup.sh already did)."""
    return prepare_model()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_dir) -> tuple[Path, Path, Ladder]:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), smollm2_dir)


@pytest.fixture(scope="session")
def tiny_reference(tiny_model):
    from rope_ext.selftest.reference import ReferenceModel

    model_dir, _, ladder = tiny_model
    return ReferenceModel(model_dir, ladder, TINY_MAX_LEN)
