"""Disk caches of a text task's expensive stages, keyed by everything they depend on: scored rollouts (generated,
then scored by every used scorer, stored as a dataset) and reference log-probabilities."""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import datasets
import torch
from hydra.utils import get_object

from dualign.models.hf import fingerprint
from dualign.models.rollout import Rollouts, from_dataset, to_dataset
from dualign.models.scorers import ScorerSet, score_all
from dualign.training.data import sequence_logprobs, tokenized
from dualign.training.module import autocast_dtype
from dualign.util.cache import cached_folder
from dualign.util.timing import stage


def source_digest(target: str) -> str:
    """sha256 of the file that defines a callable scorer (its package version where the source is not readable)."""
    obj = get_object(target)
    try:
        return hashlib.sha256(Path(inspect.getsourcefile(obj)).read_bytes()).hexdigest()[:16]
    except (TypeError, OSError):
        try:
            return f"{target.split('.')[0]}=={version(target.split('.')[0])}"
        except PackageNotFoundError:
            return "unknown"


def scorer_key(cfg, names: list[str]) -> dict:
    """Cache key part for scores: each scorer's config and, for model scorers, its checkpoint's fingerprint."""
    key = {}
    for name in names:
        scorer = asdict(cfg.scorers[name])
        if scorer["name_or_path"]:
            scorer["fingerprint"] = fingerprint(scorer["name_or_path"], scorer["revision"])
        if scorer["kind"] == "callable":  # its code: an edited function is another scorer
            scorer["code"] = source_digest(scorer["_target_"])
        key[name] = {k: v for k, v in scorer.items() if k not in ("device", "batch_size")}  # no effect on scores
    return key


def scored_rollouts(cfg, scorers: ScorerSet, kind: str, key: dict, generate, expected_rows: int
                    ) -> tuple[Rollouts, torch.Tensor]:
    """The rollout stage with its disk cache: generate() -> Rollouts, scored by every used scorer, stored as a
    dataset under paths.cache_dir/<kind>/<hash>. Returns the rollouts and their assembled scores [1 + m, n]."""
    names = list(scorers.raw)
    full_key = {**key, "scorers": scorer_key(cfg, names)}

    def build(folder: Path) -> None:
        rollouts = generate()
        raw = score_all([scorers.raw[n] for n in names], rollouts.prompts, rollouts.responses, rollouts.finished)
        to_dataset(rollouts, raw, names).save_to_disk(str(folder / "rollouts"))

    def load(folder: Path):
        return from_dataset(datasets.load_from_disk(str(folder / "rollouts")), names, expected_rows)

    rollouts, raw = cached_folder(cfg.paths.cache_dir, kind, full_key, build, load)
    return rollouts, scorers.assemble(dict(zip(names, raw)))


def reference_logps(cfg, task, reference, rollouts: Rollouts, key: dict) -> torch.Tensor:
    """log pi_ref(y|x) summed over response tokens, computed once per dataset and reference, cached on disk."""
    precision = autocast_dtype(cfg.trainer.precision)  # as the policy's log-probs are taken in training
    full_key = {**key, "reference": task.cache_key(), "rows": len(rollouts.response_ids), "autocast": str(precision)}

    def build(folder: Path) -> None:
        input_ids, attention_mask, response_mask = tokenized(task.prompt_token_ids, rollouts, task.tokenizer.pad_token_id)
        with stage("reference log-probs"):
            values = sequence_logprobs(reference, input_ids, attention_mask, response_mask,
                                       batch_size=task.logprob_batch_size, autocast_dtype=precision)
        torch.save(values, folder / "ref_logps.pt")

    def load(folder: Path) -> torch.Tensor:
        values = torch.load(folder / "ref_logps.pt", weights_only=True)
        if values.shape != (len(rollouts.response_ids),) or not torch.isfinite(values).all():
            raise ValueError(f"cached reference log-probs have shape {tuple(values.shape)}")
        return values

    return cached_folder(cfg.paths.cache_dir, "reference_logps", full_key, build, load)
