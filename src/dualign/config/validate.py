"""`validate(cfg)`: the composed config merged into the typed schema and checked, section by section, before anything
heavy is built. Every problem becomes a one-line ConfigError naming the key and what is allowed."""
from __future__ import annotations

import math
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dualign.config.algorithms import spec
from dualign.config.checks import choice, positive
from dualign.config.schema import TrainConfig
from dualign.config.tasks import DATA_KINDS, MODEL_KINDS
from dualign.errors import ConfigError

ENUM_ERROR = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]")


def _one_line(error: OmegaConfBaseException) -> str:
    message = str(getattr(error, "msg", None) or error).splitlines()[0].strip()
    key = getattr(error, "full_key", None)
    wrong_choice = ENUM_ERROR.match(message)
    if key and wrong_choice:  # an Enum field: the same words as every other choice
        return f"{key}={wrong_choice.group(1)!r} is not allowed; allowed values: {wrong_choice.group(2)}"
    return f"{key}: {message}" if key else message


def _typed(schema, value: Any, prefix: str = ""):
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), value)
        OmegaConf.to_container(merged, throw_on_missing=True)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{prefix}{_one_line(error)}") from None


def _typed_section(key: str, value, kinds: dict, default_kind: str):
    """`data` and `model` hold one of several dataclasses, chosen by their `kind` key."""
    value = dict(value or {})
    kind = value.setdefault("kind", default_kind)
    choice(f"{key}.kind", kind, tuple(kinds))
    return _typed(kinds[kind], value, prefix=f"{key}.")


def validate(cfg: DictConfig | dict, scorer_names: tuple[str, ...] | None = None) -> TrainConfig:
    """The typed config, or a ConfigError naming the first bad key. scorer_names: what the task provides
    (default: the task's own scorers, e.g. the exact task's tables, plus the configured scorers)."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from None
    data, model = container.pop("data", None), container.pop("model", None)
    typed: TrainConfig = _typed(TrainConfig, OmegaConf.create(container))
    typed.data = _typed_section("data", data, DATA_KINDS, "exact")
    typed.model = _typed_section("model", model, MODEL_KINDS, "tiny_gpt2")
    if typed.model.kind not in typed.data.model_kinds:
        raise ConfigError(f"model.kind={typed.model.kind!r} does not go with data.kind={typed.data.kind!r} (it takes "
                          f"model.kind={' or '.join(typed.data.model_kinds)}): the exact task uses model=tiny_gpt2, "
                          "text datasets a Hugging Face model (model=hf)")

    positive("beta", typed.beta)
    algorithm = spec(typed.algorithm.name)
    for section in (typed.algorithm, typed.policy_step, typed.reference, typed.generation, typed.evaluation, typed.advise,
                    typed.trainer, typed.optimizer, typed.data, typed.model):
        section.check(typed)
    algorithm.check(typed)
    _check_capabilities(typed)
    for name, scorer in typed.scorers.items():
        scorer.check(f"scorers.{name}")
    if scorer_names is None:
        scorer_names = typed.data.scorer_names() + tuple(typed.scorers)
    choice("reward.scorer", typed.reward.scorer, scorer_names)
    for name, constraint in typed.constraints.items():
        choice(f"constraints.{name}.scorer", constraint.scorer, scorer_names)
        if not math.isfinite(constraint.threshold):
            raise ConfigError(f"constraints.{name}.threshold={constraint.threshold!r} must be a finite number")
    return typed


def _check_capabilities(typed: TrainConfig) -> None:
    """Options that need something of the task: asked of the task config once, here."""
    if not typed.data.enumerable:
        for key, value in (("policy_step.name", typed.policy_step.name), ("algorithm.dual_estimator", typed.algorithm.dual_estimator)):
            if value == "exact":
                raise ConfigError(f"{key}=exact needs a task whose responses can be enumerated (data=exact), "
                                  f"not data.kind={typed.data.kind!r}")
    if typed.policy_step.pairs_from == "dataset" and not typed.data.dataset_responses:
        raise ConfigError(f"policy_step.pairs_from=dataset needs a text dataset; data.kind={typed.data.kind!r} has no "
                          "dataset responses")
