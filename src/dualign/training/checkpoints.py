"""Checkpoints that can be trusted: the newest two kept, each with a SHA-256 beside it; on resume the newest that reads
and matches its checksum is used (a damaged one is passed over in one line), and the config that shaped it must be
the config resuming it.

The fingerprint is the part of the config that changes what training computes (task, model, scorers, constraints
and thresholds, beta, seed, algorithm, policy step, sampling, optimiser, precision). Resuming with another value of
any of them is an error naming the keys, unless `allow_resume_changes` lists them; an allowed change is logged and
written to resume_changes.json in the run folder (and tagged on the MLflow run)."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from enum import Enum
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dualign.config import ConfigError, TrainConfig
from dualign.util.cache import file_sha256

log = logging.getLogger("dualign")

SECTIONS = ("seed", "beta", "data", "model", "scorers", "reward", "constraints", "algorithm", "policy_step",
            "reference", "generation", "optimizer")
TRAINER_KEYS = ("precision", "accumulate_grad_batches", "gradient_clip_val")
NO_EFFECT = ("device", "batch_size", "vllm_memory_fraction")  # where work runs and in what chunks, not what it computes


def fingerprint(cfg: TrainConfig) -> dict[str, object]:
    flat: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        elif prefix.rsplit(".", 1)[-1] not in NO_EFFECT:
            # plain values only: checkpoints load with torch.load(weights_only=True), which refuses Enum objects
            flat[prefix] = list(value) if isinstance(value, tuple) else value.value if isinstance(value, Enum) else value

    whole = asdict(cfg)
    for section in SECTIONS:
        walk(section, whole[section])
    for key in TRAINER_KEYS:
        flat[f"trainer.{key}"] = whole["trainer"][key]
    return flat


def _sidecar(path: str | Path) -> Path:
    return Path(f"{path}.sha256")


class CheckedCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that writes `<file>.sha256` beside every checkpoint and removes it with the checkpoint."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            _sidecar(filepath).write_text(file_sha256(filepath))

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            _sidecar(filepath).unlink(missing_ok=True)


def callback(folder: Path) -> CheckedCheckpoint:
    """Every epoch's checkpoint, the newest two kept; last.ckpt links to the newest."""
    return CheckedCheckpoint(dirpath=folder, filename="{epoch}-{step}", save_last="link", save_top_k=2,
                             monitor="step", mode="max", every_n_epochs=1, save_on_train_epoch_end=True)


def _problem(path: Path) -> str | None:
    """Why the checkpoint cannot be used, or None."""
    try:
        expected = _sidecar(path).read_text().strip() if _sidecar(path).is_file() else None
        if expected is not None and file_sha256(path) != expected:
            return "its SHA-256 does not match the one written with it"
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # unreadable, truncated, garbled
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


def _step(path: Path) -> int:
    found = re.search(r"step=(\d+)", path.name)
    return int(found.group(1)) if found else -1


def _candidates(folder: Path) -> list[Path]:
    """The newest first: what last.ckpt links to, then the others by step."""
    found = sorted((p for p in folder.glob("*.ckpt") if p.name != "last.ckpt"), key=_step, reverse=True)
    last = folder / "last.ckpt"
    if last.exists():
        target = last.resolve()
        found = [target] + [p for p in found if p.resolve() != target]
    return found


def resume_point(cfg: TrainConfig, output_dir: Path) -> tuple[str | None, dict]:
    """(checkpoint path or None to start over, {key: [checkpoint value, config value]} of allowed changes)."""
    if cfg.ckpt_path is None:
        return None, {}
    folder = output_dir / "checkpoints"
    if cfg.ckpt_path == "last":
        candidates = _candidates(folder) if folder.is_dir() else []
        if not candidates:  # preempted before its first checkpoint: a requeued job starts over
            log.warning("ckpt_path=last: no checkpoint in %s yet; starting from the beginning", folder)
            return None, {}
    else:
        if not Path(cfg.ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint file")
        candidates = [Path(cfg.ckpt_path)]
    chosen = None
    for path in candidates:
        problem = _problem(path)
        if problem is None:
            chosen = path
            break
        log.warning("checkpoint %s is damaged (%s); trying the one before it", path, problem)
    if chosen is None:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r}: no usable checkpoint among {[str(p) for p in candidates]}")
    if chosen != candidates[0]:
        log.warning("resuming from the older checkpoint %s", chosen)
    return str(chosen), _compare(cfg, chosen)


def _compare(cfg: TrainConfig, path: Path) -> dict:
    stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("dualign_config")
    if stored is None:
        log.warning("checkpoint %s holds no config fingerprint (written by an older dualign); not compared", path)
        return {}
    current = fingerprint(cfg)
    # through JSON both sides, so a tuple and a list (or 1 and 1.0 written as such) compare as written
    current, stored = json.loads(json.dumps(current, default=str)), json.loads(json.dumps(stored, default=str))
    changed = {key: [stored.get(key), current.get(key)] for key in sorted(set(stored) | set(current))
               if stored.get(key) != current.get(key)}
    allowed = tuple(cfg.allow_resume_changes)
    refused = [key for key in changed if not any(key == a or key.startswith(f"{a}.") for a in allowed)]
    if refused:
        listed = ", ".join(f"{key} {changed[key][0]!r} -> {changed[key][1]!r}" for key in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r}: the checkpoint was trained with another config: {listed}{more}; "
                          f"resume with its values, or allow the change with allow_resume_changes=[{','.join(refused)}]")
    if changed:
        log.warning("resuming with allowed config changes: %s", changed)
    return changed


def record_changes(output_dir: Path, changes: dict, logger) -> None:
    if not changes:
        return
    record = output_dir / "resume_changes.json"
    history = json.loads(record.read_text()) if record.is_file() else []
    record.write_text(json.dumps(history + [changes], indent=1, default=str))
    if logger is not None:  # MLflow params are immutable: the change is a tag beside them
        logger.set_tag("resume_changes", json.dumps(changes, default=str)[:4000])
