"""Long public-domain text for perplexity, passkey and long-prompt tests and benchmarks.

The books are Project Gutenberg texts kept whole (licence header included) in the repository's
``data/books``; $LONGROPE_BOOKS_DIR names another folder.
"""

from __future__ import annotations

from pathlib import Path

from rope_ext import environment

BOOKS_DIR = environment.books_dir(Path(__file__).resolve().parents[2] / "data" / "books")


def book_text(path: str | Path) -> str:
    """A Project Gutenberg book without its licence header and footer."""
    text = Path(path).read_text(encoding="utf-8-sig")
    start = text.find("*** START OF")
    if start != -1:
        text = text[text.index("\n", start) + 1 :]
    end = text.find("*** END OF")
    if end != -1:
        text = text[:end]
    return text.strip()
