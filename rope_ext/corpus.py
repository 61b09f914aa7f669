"""Long public-domain text for perplexity, passkey and long-prompt tests: the books in ../shared/data/books."""

from __future__ import annotations

import os
from pathlib import Path

# The project's checkout has shared/ beside it (developers and CI alike); $LONGROPE_BOOKS_DIR overrides.
BOOKS_DIR = Path(os.environ.get("LONGROPE_BOOKS_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "books")


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
