"""Perplexity of long documents under a factor set: the search's fitness and `longrope eval ppl`.

A document is the first ``length`` tokens of a book (Project Gutenberg header and footer
removed), or several consecutive such chunks. Perplexity is exp of the mean negative
log-likelihood over the scored tokens; tokens whose position is at or past W0 are also
reported on their own, because that is where the methods differ. Against them stands the
floor: plain RoPE that only ever sees the last W0 tokens (:func:`sliding_perplexity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rope_ext.factors import FactorSet
from rope_ext.research.corpus import book_text
from rope_ext.research.hf_model import RotatedModel


@dataclass(frozen=True)
class Sample:
    """Token ids and which predicted tokens count (mask over ids[1:]; None = all)."""

    ids: torch.Tensor
    scored: torch.Tensor | None = None


def book_files(data: str | Path) -> list[Path]:
    """A .txt file, or every .txt in a directory, sorted so runs are repeatable."""
    data = Path(data)
    files = sorted(data.glob("*.txt")) if data.is_dir() else [data]
    if not files:
        raise ValueError(f"{data}: no .txt books found")
    return files


def documents(tokenizer, data: str | Path, length: int, per_book: int = 1) -> list[Sample]:
    """Up to ``per_book`` consecutive ``length``-token chunks from the start of each book.

    Books too short for one chunk are skipped; an empty result is an error, since a
    perplexity of nothing would silently read as perfect.
    """
    files = book_files(data)
    samples = []
    for path in files:
        ids = tokenizer(book_text(path))["input_ids"]
        for k in range(min(per_book, len(ids) // length)):
            samples.append(Sample(torch.tensor(ids[k * length : (k + 1) * length])))
    if not samples:
        raise ValueError(f"no book in {[str(f) for f in files]} has {length} tokens")
    return samples


@dataclass(frozen=True)
class Perplexity:
    """Perplexity over all scored tokens, and over those predicted at positions ≥ W0 alone."""

    all: float
    past_w0: float | None
    tokens: int


def perplexity(model: RotatedModel, factor_set: FactorSet | None, samples: list[Sample]) -> Perplexity:
    """Score ``samples`` rotated with ``factor_set`` (None: the model's own RoPE)."""
    model.use(factor_set)
    w0 = model.info.original_window
    total, count, past_total, past_count = 0.0, 0, 0.0, 0
    for sample in samples:
        nll = model.token_nll(sample.ids)
        keep = sample.scored if sample.scored is not None else torch.ones_like(nll, dtype=torch.bool)
        total += float(nll[keep].sum())
        count += int(keep.sum())
        # nll[j] predicts the token at position j + 1.
        past = keep & (torch.arange(1, nll.numel() + 1) >= w0)
        past_total += float(nll[past].sum())
        past_count += int(past.sum())
    return Perplexity(
        all=math.exp(total / count),
        past_w0=math.exp(past_total / past_count) if past_count else None,
        tokens=count,
    )


def sliding_perplexity(model: RotatedModel, samples: list[Sample], window: int, stride: int) -> Perplexity:
    """Plain RoPE (the model's own) at positions ≥ W0, its context cut to the last ``window`` tokens.

    The floor an extension must beat to be worth its memory: a model that never sees more
    than ``window`` tokens at once, scored on the same tokens as the extensions' past-W0
    part. Positions ≥ W0 go in blocks of ``stride``; each block is scored by one forward
    over the ``window`` tokens that end with it (rotated from position 0, as plain RoPE
    would run a fresh request), so every position ≥ W0 is scored exactly once, and a scored
    token sees between ``window - stride`` and ``window - 1`` tokens before it (every earlier
    token when the sample's start is nearer). Positions are indices into the sample:
    p is the predicted token ``ids[p]``. Only positions ≥ W0 are scored, so ``all`` equals
    ``past_w0``; a sample's ``scored`` mask is honoured.
    """
    if not 0 < stride < window:
        raise ValueError(f"stride {stride} must be in (0, window {window}): each block needs context")
    model.use(None)
    w0 = model.info.original_window
    total, count = 0.0, 0
    for sample in samples:
        length = sample.ids.numel()
        keep = sample.scored if sample.scored is not None else torch.ones(length - 1, dtype=torch.bool)
        for first in range(w0, length, stride):  # scored positions [first, end)
            end = min(first + stride, length)
            start = max(0, end - window)
            nll = model.token_nll(sample.ids[start:end])  # nll[j] predicts position start + j + 1
            block = keep[first - 1 : end - 1]
            total += float(nll[first - start - 1 :][block].sum())
            count += int(block.sum())
    if not count:
        raise ValueError(f"no scored token at a position ≥ W0 ({w0}): nothing to measure")
    ppl = math.exp(total / count)
    return Perplexity(all=ppl, past_w0=ppl, tokens=count)
