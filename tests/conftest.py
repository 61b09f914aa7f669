"""Session-wide fixtures: the prepared real model."""

from pathlib import Path

import pytest

from rope_ext.model_files import prepare_model


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a transformers directory (prepared once; scripts/setup.sh already did)."""
    return prepare_model()
