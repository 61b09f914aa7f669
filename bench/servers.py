"""Start and stop an OpenAI-compatible server process for a benchmark, on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from server.probe import free_port, wait_until_ok

REPO = Path(__file__).resolve().parents[1]


class ServerProcess:
    """`argv` runs a server on 127.0.0.1:{port}; usable as a context manager that waits for /health."""

    def __init__(self, argv: list[str], env: dict[str, str | None], log: Path, port: int):
        self.argv, self.env, self.log, self.port = argv, env, log, port
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        env = {k: v for k, v in {**os.environ, **self.env}.items() if v is not None}  # None: unset it
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        if not wait_until_ok(f"{self.base}/health", self.proc, timeout=600):
            self.__exit__()
            raise SystemExit(f"server did not start; see {self.log}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def longrope_serve(args: list[str], log: Path, env: dict[str, str] | None = None) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "rope_ext.cli", "serve", "--port", str(port), *args]
    return ServerProcess(argv, {"LONGROPE_FACTORS": None, **(env or {})}, log, port)


def vllm_serve(model: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> ServerProcess:
    """Stock `vllm serve` (our plugin switched off)."""
    port = free_port()
    argv = [sys.executable, "-m", "rope_ext.vllm_cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
            *args]
    return ServerProcess(argv, {"LONGROPE_PLUGIN": "0", **(env or {})}, log, port)
