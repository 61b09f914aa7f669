"""The CPU image, built and run: scripts/check-image.sh builds it with podman and checks that it
serves with its default command (health, a factual answer, streaming, metrics, uid, HEALTHCHECK,
SIGTERM). It fails, never skips, when the image does not build or serve."""

import subprocess

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.image


def test_cpu_image_builds_and_serves(tmp_path):
    log = tmp_path / "check-image.log"
    with log.open("w") as out:
        result = subprocess.run(["bash", "scripts/check-image.sh"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=2400)
    text = log.read_text(errors="replace")
    assert result.returncode == 0, text[-8000:]
    assert "PASS" in text.splitlines()[-1]
