"""Readiness probe: wait until a local HTTP endpoint answers 200; and a free loopback port.

Tests, benchmarks and operators all start a server (ours, `vllm serve`, Prometheus) on a free
port and must wait for it without waiting on a process that already died; this is the one
place for both. ``python -m server.probe URL`` exits 0 when URL answers 200, for scripts and
health checks.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


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


if __name__ == "__main__":
    sys.exit(0 if answers_ok(sys.argv[1], timeout=4.0) else 1)
