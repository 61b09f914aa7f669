"""Append-only JSONL files that long runs resume from: the search's evaluation cache and the
quality benchmark's measurements.

A run on this CPU takes hours and may be killed mid-write, so reading skips a blank line or a
last line cut short (that one record is measured again) instead of refusing the whole file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Every whole record in ``path`` (none when it does not exist yet)."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Write one record at once, so a kill right after loses nothing measured before it.

    After a line cut short, the record starts a line of its own (else it would be lost with it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab+") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(row, sort_keys=True) + "\n").encode())
