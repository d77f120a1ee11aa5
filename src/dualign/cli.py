"""The command lines: `python train.py` / `dualign-train` (the training job) and `dualign-evaluate`, one Hydra entry
point each, with one-line input errors (exit 2) and resumable stops (exit 128 + signal)."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dualign.config import validate
from dualign.errors import InputError
from dualign.tracking.preflight import preflight
from dualign.util.lifecycle import Terminated

# ${uid:} in run folder names: runs started in the same second never share a folder. Cached, so a process resolves
# one id; Lightning hands the resolved hydra.run.dir to the other ranks of a distributed run.
OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True, replace=True)
# ${slug:...}: a config value in a folder name, reduced to letters, digits, - _ . (never a path: Hydra makes the folder
# before the config is validated, so algorithm.name=../x would otherwise create it outside outputs/)
OmegaConf.register_new_resolver("slug", lambda value: re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value)).lstrip(".") or "_",
                                replace=True)


def config_dir() -> str:
    """DUALIGN_CONFIG_DIR, else ./conf, else the project's conf/ beside src/ (editable installs)."""
    for candidate in (os.environ.get("DUALIGN_CONFIG_DIR"), Path.cwd() / "conf", Path(__file__).resolve().parents[2] / "conf"):
        if candidate and (Path(candidate) / "train.yaml").is_file():
            return str(Path(candidate).resolve())
    sys.exit("dualign: no config folder found (set DUALIGN_CONFIG_DIR to a folder holding train.yaml)")


def _guarded(job: Callable[[DictConfig], dict], cfg: DictConfig) -> dict:
    try:
        return job(cfg)
    except InputError as error:  # bad config, data or model files: one line, no traceback
        print(f"dualign: {error.kind} error: {error}", file=sys.stderr)
        _remove_if_only_hydra(Path(HydraConfig.get().runtime.output_dir))
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # in a sweep this job fails and is recorded as failed; the sweep goes on
        sys.exit(2)
    except Terminated as stop:  # a scheduler stopped the job: say where it can resume, exit non-zero (a sweep stops too)
        print(f"dualign: {stop}; resume with the same overrides and hydra.run.dir={HydraConfig.get().runtime.output_dir} "
              "ckpt_path=last", file=sys.stderr)
        sys.exit(stop.exit_code)


def _remove_if_only_hydra(folder: Path) -> None:
    """A run refused before it built anything leaves no folder behind (only Hydra's config copy and log were there)."""
    if folder.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def hydra_entry(job: Callable[[DictConfig], dict]) -> None:
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(lambda cfg: _guarded(job, cfg))()


def train(cfg: DictConfig) -> dict:
    # a config error, an unwritable folder or an unreachable store is one line in a second, before the job's
    # libraries are loaded (run() checks again: it is also called without this CLI)
    preflight(validate(cfg))
    # deferred on purpose: the job imports torch, transformers, lightning and mlflow (about 8 s); --cfg, --help,
    # --multirun's sweep setup and config errors answer without them
    from dualign.run import run

    return run(cfg)


def main() -> None:
    hydra_entry(train)
