"""SmolLM2 on the real engine: a short chat answer does not change when a >8192-token request runs beside it.

Two-step ladder from the baseline command: plain RoPE up to 8192, YaRN up to 16384. Float32
and eager, so the engine matches transformers (compiled bfloat16 flips this close call).
"""

import pytest
from transformers import AutoTokenizer

from longrope.cli import main
from rope_ext.factors import load_ladder
from rope_ext.research.corpus import BOOKS_DIR, book_text
from rope_ext.selftest.reference import ReferenceModel, assert_greedy_matches
from tests.helpers import run_engine

pytestmark = pytest.mark.engine

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER_TOKENS = 16


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    short = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"]
    long = tokenizer(book_text(BOOKS_DIR / "moby-dick.txt"))["input_ids"][:8400]
    return tokenizer, list(short), long


@pytest.fixture(scope="module")
def factors(smollm2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2") / "yarn-16k.json"
    assert main(["factors", "baseline", "--method", "yarn", "--model", str(smollm2_dir), "--window", "16384",
                 "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def plain_answer(smollm2_dir, prompts, factors):
    """The plain model's greedy answer (transformers, float32, its own RoPE)."""
    reference = ReferenceModel(smollm2_dir, load_ladder(factors), 16384)
    return reference.run(prompts[1], ANSWER_TOKENS, None, eos_token_id=prompts[0].eos_token_id)


@pytest.fixture(scope="module")
def engine_answers(smollm2_dir, prompts, factors, vllm_runner, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm2")
    _, short, long = prompts
    requests = [
        {"prompt_token_ids": short, "max_tokens": ANSWER_TOKENS, "prompt_logprobs": False},
        {"prompt_token_ids": short, "max_tokens": ANSWER_TOKENS, "prompt_logprobs": False},
        {"prompt_token_ids": long, "max_tokens": 4, "prompt_logprobs": False},  # 8404 > 8192: the long set
    ]
    engine = {"dtype": "float32", "enforce_eager": True, "max_model_len": 16384, "enable_prefix_caching": False,
              "max_num_batched_tokens": 2048, "seed": 0}
    spec = {"model": str(smollm2_dir), "engine": engine, "requests": requests, "waves": [[0], [1, 2]]}
    return run_engine(spec, {"LONGROPE_FACTORS": str(factors), "VLLM_CPU_KVCACHE_SPACE": "2"}, tmp, "smollm2",
                      vllm_runner)


def test_short_answer_is_the_plain_models(engine_answers, plain_answer, prompts):
    tokenizer = prompts[0]
    alone, beside_long, long = engine_answers["results"]
    assert "Paris" in tokenizer.decode(plain_answer.tokens)
    for where, answer in (("alone", alone), ("beside a long request", beside_long)):
        assert_greedy_matches(plain_answer, answer["tokens"], answer["token_logprobs"], where)
    assert len(long["tokens"]) == 4
