"""Quality: perplexity and passkey of the shipped ladder against plain RoPE, PI, NTK and YaRN.

All on a book the factor search did not see (the search scored moby-dick), one process, the
same scoring forward for every method. The run also times that scoring forward against a
plain transformers forward (full logits, then cross-entropy) on the same 16k tokens, and
checks the two give the same perplexity: the search's speed claim, measured.

    .venv/bin/python -m bench.quality.run      # writes bench/quality/{ppl,passkey}.{json,png}, results.json

Budget on the 2-core development machine: about 40 minutes (a 16k forward is ~140 s).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import date
from pathlib import Path

import torch

from rope_ext.corpus import BOOKS_DIR
from rope_ext.evaluation import load_model, passkey_report, perplexity_report, write_report
from rope_ext.hf_model import RotatedModel
from rope_ext.model_files import DEFAULT_LADDER
from rope_ext.perplexity import documents

HERE = Path(__file__).resolve().parent
METHODS = ["plain", "pi", "ntk", "yarn", "ladder"]


def scoring_speed(model: RotatedModel, tokenizer, length: int, data: Path, fast_seconds: float,
                  fast_ppl: float) -> dict:
    """Plain transformers forward on the same tokens the report scored with the plain set."""
    ids = documents(tokenizer, data, length)[0].ids
    model.use(None)
    start = time.perf_counter()
    nll = model.token_nll_plain_forward(ids)
    seconds = time.perf_counter() - start
    plain_ppl = math.exp(float(nll.mean()))
    return {
        "length": length,
        "plain_forward_tokens_per_s": length / seconds,
        "scoring_forward_tokens_per_s": length / fast_seconds,
        "speed_ratio_scoring_over_plain": seconds / fast_seconds,
        "plain_forward_ppl": plain_ppl,
        "scoring_forward_ppl": fast_ppl,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--book", default="pride-and-prejudice.txt")
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--passkey-lengths", default="4096,8192,16384")
    parser.add_argument("--passkey-methods", default="plain,yarn,ladder")
    parser.add_argument("--depths", default="0.25,0.75")
    args = parser.parse_args()
    data = BOOKS_DIR / args.book
    lengths = [int(v) for v in args.lengths.split(",")]
    passkey_lengths = [int(v) for v in args.passkey_lengths.split(",")]
    started = time.time()
    model, tokenizer = load_model(None, max(lengths + passkey_lengths))

    ppl = perplexity_report(model, tokenizer, DEFAULT_LADDER, data, lengths, 1, wanted=METHODS)
    write_report(ppl, HERE / "ppl.json", kind="ppl")
    longest = max(lengths)
    plain_row = next(r for r in ppl["results"] if r["length"] == longest and r["method"] == "plain")
    speed = scoring_speed(model, tokenizer, longest, data, plain_row["seconds"], plain_row["ppl"])
    print(json.dumps(speed, indent=2), flush=True)

    passkey = passkey_report(model, tokenizer, DEFAULT_LADDER, passkey_lengths,
                             [float(v) for v in args.depths.split(",")], 1, 0, wanted=args.passkey_methods.split(","))
    write_report(passkey, HERE / "passkey.json", kind="passkey")

    results = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "book": args.book,
        "minutes": (time.time() - started) / 60,
        "scoring_speed": speed,
        "reports": ["ppl.json", "passkey.json"],
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {HERE / 'results.json'}")


if __name__ == "__main__":
    main()
