"""The `dualign-train` console script and `python train.py`: one Hydra entry point."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .errors import InputError


def config_dir() -> str:
    """DUALIGN_CONFIG_DIR, else ./conf, else the project's conf/ beside src/ (editable installs)."""
    for candidate in (os.environ.get("DUALIGN_CONFIG_DIR"), Path.cwd() / "conf", Path(__file__).resolve().parents[2] / "conf"):
        if candidate and (Path(candidate) / "train.yaml").is_file():
            return str(Path(candidate).resolve())
    sys.exit("dualign: no config folder found (set DUALIGN_CONFIG_DIR to a folder holding train.yaml)")


def _main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .pipeline import run

    try:
        return run(cfg)
    except InputError as error:  # bad config, data or model files: one line, no traceback
        print(f"dualign: {error.kind} error: {error}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # in a sweep this job fails and is recorded as failed; the sweep goes on
        sys.exit(2)


def main() -> None:
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(_main)()
