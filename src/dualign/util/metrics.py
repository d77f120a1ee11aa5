"""Means with confidence intervals over prompts, and nested results as flat MLflow metrics: `final/objective`,
`final/improvement_safety`, `final/scores/reward/policy`."""
from __future__ import annotations

import math
from numbers import Number

import torch

Z95 = 1.959964


def mean_ci(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% half-width of [P, K] values; prompts are the independent units (responses to one prompt are not)."""
    per_prompt = values.double().mean(-1)
    if per_prompt.numel() < 2:
        return per_prompt.mean().item(), float("nan")
    return per_prompt.mean().item(), Z95 * per_prompt.std().item() / math.sqrt(per_prompt.numel())


def flatten_metrics(tree: dict, prefix: str, names: list[str]) -> dict[str, float]:
    """Numbers as `prefix/key`; a list with one value per constraint as `prefix/key_<name>`; nested dicts as
    `prefix/key/...`. Keys starting with "_", other lists, strings and non-finite values are left out."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            out.update(flatten_metrics(value, f"{prefix}/{key}", names))
        elif isinstance(value, (list, tuple)) and len(value) == len(names) and all(isinstance(v, Number) for v in value):
            out.update({f"{prefix}/{key}_{name}": float(v) for name, v in zip(names, value)})
        elif isinstance(value, Number) and math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


def flatten_params(tree, prefix: str = "") -> dict[str, object]:
    """A config as MLflow params: `algorithm/iterations` ..."""
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten_params(value, f"{prefix}{key}/"))
    else:
        out[prefix.rstrip("/")] = tree
    return out
