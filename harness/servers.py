"""Servers the tests and benchmarks start on loopback: `longrope serve`, stock `vllm serve`, anything else.

Each gets a free port, is waited for until healthy (never waiting on a process that already died) and is
stopped with its whole process group, so vLLM's engine processes go with it: SIGTERM first (the server
drains), SIGKILL after the grace period. The one place for it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers HTTP 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until_ok(url: str, proc: subprocess.Popen | None = None, timeout: float = 300.0,
                  interval: float = 1.0) -> bool:
    """Poll ``url`` until it answers 200 (True); False once ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not answers_ok(url):
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


PORT = "{port}"  # the argument (or environment value) that becomes the chosen port


class ServerDidNotStart(RuntimeError):
    pass


class ServerProcess:
    """``argv`` (its PORT argument or environment value replaced by a free port) serves on 127.0.0.1;
    a context manager, or start()/stop()."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str | None] | None = None,
                 cwd: Path | None = None, start_timeout: float = 600, stop_timeout: float = 60):
        self.port = free_port()
        self.argv = [str(self.port) if arg == PORT else arg for arg in argv]
        self.env = {k: str(self.port) if v == PORT else v for k, v in (env or {}).items()}
        self.log, self.cwd = log, cwd
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def v1(self) -> str:
        return f"{self.base}/v1"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def start(self) -> ServerProcess:
        """Start it and wait until /health answers 200; ServerDidNotStart (with the log's end) otherwise."""
        env = {k: v for k, v in {**os.environ, **self.env}.items() if v is not None}  # None: unset it
        with self.log.open("w") as handle:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if not wait_until_ok(f"{self.base}/health", self.proc, timeout=self.start_timeout):
            self.stop()
            raise ServerDidNotStart(f"{self.argv[:4]} did not become healthy; {self.log}:\n{self.log_text()[-6000:]}")
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def longrope_serve(args: list[str], log: Path, env: dict[str, str | None] | None = None, **kwargs) -> ServerProcess:
    """`longrope serve` with ``args``; LONGROPE_FACTORS from the caller's environment is not inherited."""
    argv = [sys.executable, "-m", "longrope", "serve", "--port", PORT, *args]
    return ServerProcess(argv, log, {"LONGROPE_FACTORS": None, **(env or {})}, **kwargs)


def vllm_serve(model: str, args: list[str], log: Path, env: dict[str, str | None] | None = None,
               **kwargs) -> ServerProcess:
    """Stock `vllm serve` (the plugin switched off)."""
    argv = [sys.executable, "-m", "rope_ext.vllm_cli", "serve", model, "--host", "127.0.0.1", "--port", PORT, *args]
    return ServerProcess(argv, log, {"LONGROPE_PLUGIN": "0", **(env or {})}, **kwargs)
