from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import dualign.config  # noqa: F401  (registers the dataclass defaults that conf/ builds on)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One pi_ref cache for the whole session: each tiny task config is SFT-trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """Compose the real train.yaml with tiny settings, outputs in tmp_path."""

    def make(*overrides: str, logger: bool = False):
        GlobalHydra.instance().clear()
        base = [
            f"paths.output_dir={tmp_path / 'run'}",
            f"paths.cache_dir={cache_dir}",
            f"paths.fixtures_dir={ROOT / 'tests' / 'fixtures'}",
            f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"logger.enabled={str(logger).lower()}",
            "data.sft_steps=80",
            "reference.samples_per_prompt=64",
            "algorithm.iterations=2",
            "algorithm.epochs_per_iteration=1",
            "algorithm.dual_samples=64",
            "algorithm.compare_one_shot=false",
            "trainer.enable_progress_bar=false",
        ]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=base + list(overrides))
        GlobalHydra.instance().clear()
        return cfg

    return make
