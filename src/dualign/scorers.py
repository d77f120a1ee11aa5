"""One scorer interface: score(prompts, responses) -> tensor of floats, one per (prompt, response) pair.

A reward model, a cost model, the exact task's tables or any Python function implement it. A utility that is
the negation of a score (safety = minus cost) is `Negated(scorer)`.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch


class Scorer(Protocol):
    name: str

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor: ...


class Negated:
    """-score: turns a cost model into a utility to be maximised."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.name = f"-{scorer.name}"

    def __call__(self, prompts, responses):
        return -self.scorer(prompts, responses)


def score_all(scorers: Sequence[Scorer], prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    """Scores of every scorer, [len(scorers), len(prompts)], float32, with a clear error on NaN or inf."""
    rows = []
    for scorer in scorers:
        with torch.no_grad():
            values = torch.as_tensor(scorer(prompts, responses), dtype=torch.float32).reshape(-1)
        if values.numel() != len(prompts):
            raise ValueError(f"scorer {scorer.name!r} returned {values.numel()} scores for {len(prompts)} responses")
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).nonzero()[0])
            raise FloatingPointError(f"scorer {scorer.name!r} returned {values[bad].item()} for response {bad}")
        rows.append(values)
    return torch.stack(rows) if rows else torch.empty(0, len(prompts))
