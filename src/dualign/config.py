"""Typed configuration: dataclasses registered in Hydra's ConfigStore, and validation before anything heavy is built.

`validate(cfg)` merges the composed config into the schema and checks values; every problem becomes a one-line
ConfigError naming the key and what is allowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dualign.errors import InputError
from dualign.models.hf import DTYPES, HFModelConfig
from dualign.models.scorers import EOS_RULES, SCORER_KINDS, ScorerConfig
from dualign.tasks.exact import ExactTaskConfig, TinyModelConfig
from dualign.tasks.text_data import FORMATS, TextDataConfig

ALGORITHMS = ("caid", "one_shot", "fixed_lambda", "primal_dual")
POLICY_STEPS = ("dpo", "exact", "policy_gradient")
PAIR_SOURCES = ("reference", "policy", "dataset")
DUAL_RULES = ("projected", "log")
LABELS = ("soft", "hard")
THRESHOLD_TYPES = ("improvement", "absolute")
DUAL_ESTIMATORS = ("rollout", "exact")
SCHEDULES = ("constant", "cosine")


class ConfigError(InputError):
    """A bad configuration value; str() is one line naming the key."""

    kind = "config"


@dataclass
class ConstraintConfig:
    scorer: str = MISSING  # a scorer name the task provides (the exact task: utility_0, utility_1, ...)
    threshold: float = MISSING  # b: required improvement over pi_ref, or tau: absolute level of E[g] (threshold_type)
    threshold_type: str = "improvement"
    negate: bool = False  # the utility is minus the score (safety = - cost)
    initial_multiplier: Optional[float] = None  # None: algorithm.initial_multiplier
    step_size: Optional[float] = None  # None: algorithm.step_size


@dataclass
class RewardConfig:
    scorer: str = "reward"


@dataclass
class AlgorithmConfig:
    name: str = "caid"
    iterations: int = 4  # T dual iterations (one_shot and fixed_lambda: policy trained iterations * epochs epochs, once)
    epochs_per_iteration: int = 1  # E
    dual_prompts: int = 16  # Q prompts for the on-policy dual step
    dual_samples: int = 64  # K responses per prompt for the dual step
    dual_estimator: str = "rollout"  # rollout (the method) or exact (enumeration; exact task only)
    max_multiplier: Optional[float] = None
    compare_one_shot: bool = True  # caid: also train one_shot on the same instance and report it beside
    initial_multiplier: Optional[float] = None  # None: caid/one_shot start at the one-shot lambda*, others at 0
    step_size: float = 1.0  # eta (projected rule) or alpha (log rule), for constraints that set none
    dual_rule: str = "projected"  # projected: max(0, lambda - eta u); log: ln lambda += alpha lambda (-u) (Safe RLHF)
    dual_every_steps: Optional[int] = None  # primal_dual: a dual step every k optimiser steps from running estimates


@dataclass
class PolicyStepConfig:
    name: str = "dpo"
    labels: str = "soft"  # soft: expected loss under p; hard: Bernoulli(p) labels, re-drawn for every lambda
    batch_size: int = 64  # pairs per step (dpo) or prompts per step (exact)
    steps_per_epoch: int = 50  # exact and policy_gradient: passes over the prompts in one epoch
    pairs_from: str = "reference"  # dpo: pi_ref rollouts once | the current policy every iteration | dataset responses
    samples_per_prompt: int = 8  # policy_gradient: K responses per prompt for the RLOO estimator


@dataclass
class ReferenceConfig:
    samples_per_prompt: int = 128  # pi_ref rollouts per prompt: DPO pairs, E_ref[g] and the one-shot dual
    prompts: Optional[int] = None  # how many training prompts get pi_ref rollouts (None: all; paper: 1000)


@dataclass
class GenerationConfig:
    """Sampling for every rollout (pi_ref, the dual step, policy-gradient steps, evaluation)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None  # None: the exact task's response length; text tasks must set it
    batch_size: int = 4096  # sequences per generate call
    cache: str = "dynamic"  # KV cache: dynamic | static (preallocated; faster for long generations where supported)
    backend: str = "hf"  # hf (transformers generate) | vllm (text tasks on GPU; pip install vllm)
    vllm_memory_fraction: float = 0.3  # GPU memory vLLM may take beside the training process


@dataclass
class EvaluationConfig:
    """Text tasks: responses of pi_ref and the trained policy on the test split, scored by every scorer."""
    samples_per_prompt: int = 2
    every_iteration: bool = False  # also evaluate after every caid iteration (logged as eval/* per iteration)
    samples_logged: int = 20  # rows of the sample table logged to MLflow
    policy_path: Optional[str] = None  # `python -m dualign.evaluate`: the saved policy or adapter to evaluate


@dataclass
class OptimizerConfig:
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    fused: Optional[bool] = None  # fused AdamW; None: where the parameters support it and it can be clipped (not under mixed precision)


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # Lightning's: auto | ddp | fsdp | deepspeed_stage_2 | ...
    precision: str = "32-true"
    log_every_n_steps: int = 5
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1  # optimiser step every N batches: policy_step.batch_size x N pairs per step
    enable_progress_bar: bool = True


@dataclass
class LoggerConfig:
    enabled: bool = True
    tracking_uri: str = "sqlite:///outputs/mlflow.db"
    experiment_name: str = "dualign"
    run_name: Optional[str] = None
    parent_run_id: Optional[str] = None  # set by the optuna sweeper: trials are child runs of the sweep's run
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class PathsConfig:
    output_dir: str = "outputs/run"
    cache_dir: str = "outputs/cache"
    fixtures_dir: str = "tests/fixtures"


@dataclass
class TrainConfig:
    seed: int = 0
    beta: float = 1.0
    data: Any = None  # ExactTaskConfig (kind: exact) or TextDataConfig (kind: pku_saferlhf | hh_rlhf | jsonl)
    model: Any = None  # TinyModelConfig (kind: tiny_gpt2) or HFModelConfig (kind: hf)
    scorers: dict[str, ScorerConfig] = field(default_factory=dict)  # model / callable scorers by name
    reward: RewardConfig = field(default_factory=RewardConfig)
    constraints: dict[str, ConstraintConfig] = field(default_factory=dict)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    policy_step: PolicyStepConfig = field(default_factory=PolicyStepConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ckpt_path: Optional[str] = None  # resume from this Lightning checkpoint ("last": the run folder's last.ckpt)
    allow_resume_changes: list[str] = field(default_factory=list)  # keys (or sections) a resumed run may change


ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _one_line(error: OmegaConfBaseException) -> str:
    message = str(getattr(error, "msg", None) or error).splitlines()[0].strip()
    key = getattr(error, "full_key", None)
    return f"{key}: {message}" if key else message


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")


def _positive(key: str, value, strict: bool = True) -> None:
    if value is None or not math.isfinite(value) or (value <= 0 if strict else value < 0):
        raise ConfigError(f"{key}={value!r} must be {'>' if strict else '>='} 0")


DATA_KINDS = {"exact": ExactTaskConfig, **{kind: TextDataConfig for kind in FORMATS}}
MODEL_KINDS = {"tiny_gpt2": TinyModelConfig, "hf": HFModelConfig}


def _typed_section(key: str, value, kinds: dict, default_kind: str):
    """`data` and `model` hold one of several dataclasses, chosen by their `kind` key."""
    value = dict(value or {})
    kind = value.setdefault("kind", default_kind)
    _choice(f"{key}.kind", kind, tuple(kinds))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(kinds[kind]), value)
        OmegaConf.to_container(merged, throw_on_missing=True)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{key}.{_one_line(error)}") from None


def validate(cfg: DictConfig | dict, scorer_names: tuple[str, ...] | None = None) -> TrainConfig:
    """The typed config, or a ConfigError naming the first bad key. scorer_names: what the task provides
    (default: the exact task's tables plus the configured scorers)."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from None
    data, model = container.pop("data", None), container.pop("model", None)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(container))
        OmegaConf.to_container(merged, throw_on_missing=True)
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from None
    typed: TrainConfig = OmegaConf.to_object(merged)
    typed.data = _typed_section("data", data, DATA_KINDS, "exact")
    typed.model = _typed_section("model", model, MODEL_KINDS, "tiny_gpt2")
    exact = isinstance(typed.data, ExactTaskConfig)
    if exact != isinstance(typed.model, TinyModelConfig):
        raise ConfigError(f"model.kind={typed.model.kind!r} does not go with data.kind={typed.data.kind!r}: the exact task "
                          "uses model=tiny_gpt2, text datasets a Hugging Face model (model.kind=hf)")

    _positive("beta", typed.beta)
    _choice("algorithm.name", typed.algorithm.name, ALGORITHMS)
    _choice("policy_step.name", typed.policy_step.name, POLICY_STEPS)
    _choice("policy_step.labels", typed.policy_step.labels, LABELS)
    _choice("algorithm.dual_estimator", typed.algorithm.dual_estimator, DUAL_ESTIMATORS)
    _choice("optimizer.schedule", typed.optimizer.schedule, SCHEDULES)
    _choice("policy_step.pairs_from", typed.policy_step.pairs_from, PAIR_SOURCES)
    _choice("algorithm.dual_rule", typed.algorithm.dual_rule, DUAL_RULES)
    _positive("algorithm.step_size", typed.algorithm.step_size)
    if typed.algorithm.dual_every_steps is not None:
        _positive("algorithm.dual_every_steps", typed.algorithm.dual_every_steps)
    if typed.algorithm.name == "primal_dual" and typed.algorithm.dual_every_steps is None:
        raise ConfigError("algorithm.dual_every_steps is null; algorithm.name=primal_dual updates lambda every k steps")
    if typed.algorithm.name == "primal_dual" and typed.policy_step.name != "policy_gradient":
        raise ConfigError(f"algorithm.name=primal_dual needs policy_step=policy_gradient (its dual step uses the policy "
                          f"step's own samples), not policy_step.name={typed.policy_step.name!r}")
    if typed.algorithm.initial_multiplier is not None:
        _positive("algorithm.initial_multiplier", typed.algorithm.initial_multiplier, strict=typed.algorithm.dual_rule == "log")
    if typed.policy_step.samples_per_prompt < 2:
        raise ConfigError(f"policy_step.samples_per_prompt={typed.policy_step.samples_per_prompt} must be >= 2 (leave-one-out baseline)")
    for key in ("iterations", "epochs_per_iteration", "dual_prompts", "dual_samples"):
        _positive(f"algorithm.{key}", getattr(typed.algorithm, key))
    for key in ("batch_size", "steps_per_epoch"):
        _positive(f"policy_step.{key}", getattr(typed.policy_step, key))
    _positive("trainer.accumulate_grad_batches", typed.trainer.accumulate_grad_batches)
    _validate_strategy(typed.trainer)
    _positive("trainer.devices", typed.trainer.devices)
    _positive("trainer.num_nodes", typed.trainer.num_nodes)
    _positive("optimizer.lr", typed.optimizer.lr)
    _positive("optimizer.weight_decay", typed.optimizer.weight_decay, strict=False)
    _positive("trainer.log_every_n_steps", typed.trainer.log_every_n_steps)
    _validate_optimizer_precision(typed)
    _positive("optimizer.warmup_steps", typed.optimizer.warmup_steps, strict=False)
    _positive("reference.samples_per_prompt", typed.reference.samples_per_prompt)
    if typed.reference.prompts is not None:
        _positive("reference.prompts", typed.reference.prompts)
    if typed.reference.samples_per_prompt % 2:
        raise ConfigError(f"reference.samples_per_prompt={typed.reference.samples_per_prompt} must be even (responses are paired)")
    _validate_generation(typed)
    _positive("evaluation.samples_per_prompt", typed.evaluation.samples_per_prompt)
    _positive("evaluation.samples_logged", typed.evaluation.samples_logged, strict=False)
    if typed.algorithm.name in ("caid", "one_shot", "primal_dual") and not typed.constraints:
        raise ConfigError(f"constraints is empty; algorithm.name={typed.algorithm.name} needs at least one constraint")
    if typed.algorithm.max_multiplier is not None:
        _positive("algorithm.max_multiplier", typed.algorithm.max_multiplier)
    if exact:
        _validate_exact(typed)
    else:
        _validate_text(typed)
    for name, scorer in typed.scorers.items():
        _validate_scorer(f"scorers.{name}", scorer)
    if scorer_names is None:
        scorer_names = (exact_scorer_names(typed.data) if exact else ()) + tuple(typed.scorers)
    _choice("reward.scorer", typed.reward.scorer, scorer_names)
    for name, constraint in typed.constraints.items():
        key = f"constraints.{name}"
        _choice(f"{key}.scorer", constraint.scorer, scorer_names)
        _choice(f"{key}.threshold_type", constraint.threshold_type, THRESHOLD_TYPES)
        if not math.isfinite(constraint.threshold):
            raise ConfigError(f"{key}.threshold={constraint.threshold!r} must be a finite number")
        if constraint.step_size is not None:
            _positive(f"{key}.step_size", constraint.step_size)
        if constraint.initial_multiplier is not None:
            # the log-space rule multiplies lambda, so it can never leave 0
            _positive(f"{key}.initial_multiplier", constraint.initial_multiplier, strict=typed.algorithm.dual_rule == "log")
    return typed


PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def _validate_optimizer_precision(typed: TrainConfig) -> None:
    """Lightning's mixed-precision plugin refuses to clip the gradients of an optimiser that unscales them inside its
    step (fused AdamW): refuse the combination here instead of at the first optimiser step."""
    trainer = typed.trainer
    if trainer.precision in ("bf16-true", "16-true", "bf16", "16", "32", "64", "64-true"):
        # a -true precision casts the policy after pi_ref's log-probs were taken (the DPO log-ratio would not start at 0)
        raise ConfigError(f"trainer.precision={trainer.precision!r} is not supported; allowed values: "
                          f"{', '.join(PRECISIONS)} (half-precision weights: model.dtype=bfloat16 with bf16-mixed)")
    _choice("trainer.precision", trainer.precision, PRECISIONS)
    clips = trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0
    mixed = trainer.precision != "32-true" and not str(trainer.strategy).startswith("deepspeed")
    if typed.optimizer.fused and clips and mixed:
        raise ConfigError(f"optimizer.fused=true cannot be clipped under trainer.precision={trainer.precision} "
                          f"(trainer.gradient_clip_val={trainer.gradient_clip_val}); set optimizer.fused=null (fused "
                          "wherever it can be clipped) or trainer.gradient_clip_val=null")
    if trainer.gradient_clip_val is not None and (not math.isfinite(trainer.gradient_clip_val) or trainer.gradient_clip_val < 0):
        raise ConfigError(f"trainer.gradient_clip_val={trainer.gradient_clip_val!r} must be null or >= 0")


def _validate_strategy(trainer: TrainerConfig) -> None:
    """Lightning runs FSDP and DeepSpeed on CUDA only: say so in one line instead of its traceback."""
    strategy = str(trainer.strategy)
    if strategy.startswith(("fsdp", "deepspeed")) and trainer.accelerator not in ("gpu", "cuda", "auto"):
        raise ConfigError(f"trainer.strategy={strategy} needs trainer.accelerator=gpu (Lightning runs it on CUDA only), "
                          f"not {trainer.accelerator!r}; a CPU check of data-parallel training: trainer=ddp "
                          "trainer.accelerator=cpu")


def _validate_generation(typed: TrainConfig) -> None:
    generation = typed.generation
    _positive("generation.temperature", generation.temperature)
    if not 0 < generation.top_p <= 1:
        raise ConfigError(f"generation.top_p={generation.top_p!r} must be in (0, 1]")
    if generation.max_new_tokens is not None:
        _positive("generation.max_new_tokens", generation.max_new_tokens)
    _positive("generation.batch_size", generation.batch_size)
    _choice("generation.cache", generation.cache, ("dynamic", "static"))
    _choice("generation.backend", generation.backend, ("hf", "vllm"))
    if not 0 < generation.vllm_memory_fraction < 1:
        raise ConfigError(f"generation.vllm_memory_fraction={generation.vllm_memory_fraction!r} must be in (0, 1)")
    if generation.backend == "vllm" and isinstance(typed.data, ExactTaskConfig):
        raise ConfigError("generation.backend=vllm is for text tasks; the exact task samples with generation.backend=hf")


def _validate_exact(typed: TrainConfig) -> None:
    data, model = typed.data, typed.model
    if data.num_response_tokens < 2 or data.response_length < 1 or data.num_prompts < 1:
        raise ConfigError("data: need num_prompts >= 1, num_response_tokens >= 2 and response_length >= 1")
    if not -1 <= data.utility_correlation <= 1:  # outside it the utility tables come out complex-valued
        raise ConfigError(f"data.utility_correlation={data.utility_correlation!r} must be in [-1, 1]")
    _positive("data.num_utilities", data.num_utilities, strict=False)
    for key in ("pairwise_scale", "teacher_sharpness", "sft_steps"):
        _positive(f"data.{key}", getattr(data, key), strict=False)
    for key in ("sft_samples_per_prompt", "sft_lr", "sft_batch_size"):
        _positive(f"data.{key}", getattr(data, key))
    for key in ("n_layer", "n_embd", "n_head"):
        _positive(f"model.{key}", getattr(model, key))
    if model.n_embd % model.n_head:
        raise ConfigError(f"model.n_embd={model.n_embd} must be a multiple of model.n_head={model.n_head}")
    if typed.algorithm.dual_prompts > typed.data.num_prompts:
        raise ConfigError(
            f"algorithm.dual_prompts={typed.algorithm.dual_prompts} exceeds data.num_prompts={typed.data.num_prompts}"
        )
    if typed.policy_step.pairs_from == "dataset":
        raise ConfigError("policy_step.pairs_from=dataset needs a text dataset; the exact task has no dataset responses")
    if typed.generation.max_new_tokens not in (None, typed.data.response_length):
        raise ConfigError(f"generation.max_new_tokens={typed.generation.max_new_tokens} must be null or "
                          f"data.response_length={typed.data.response_length} on the exact task")


def _validate_text(typed: TrainConfig) -> None:
    data, model = typed.data, typed.model
    if typed.policy_step.name == "exact" or typed.algorithm.dual_estimator == "exact":
        raise ConfigError("policy_step.name=exact and algorithm.dual_estimator=exact need data=exact (enumerable responses)")
    if typed.generation.max_new_tokens is None:
        raise ConfigError("generation.max_new_tokens is null; text tasks need a response length limit")
    if not data.path:
        raise ConfigError("data.path is empty; give a hub dataset name or a local folder or file")
    if data.kind == "jsonl" and not data.response_columns:
        raise ConfigError("data.response_columns is empty; name two response columns or one column of response lists")
    for key in ("max_train_rows", "max_test_prompts"):
        if getattr(data, key) is not None:
            _positive(f"data.{key}", getattr(data, key))
    if data.test_fraction is not None and not 0 < data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction={data.test_fraction!r} must be in (0, 1)")
    if not model.name_or_path:
        raise ConfigError("model.name_or_path is empty")
    _choice("model.dtype", model.dtype, tuple(DTYPES))
    _choice("model.use_chat_template", model.use_chat_template, ("auto", "always", "never"))
    if "{prompt}" not in model.prompt_template:
        raise ConfigError(f"model.prompt_template={model.prompt_template!r} has no {{prompt}} field")
    _positive("model.max_prompt_length", model.max_prompt_length)
    if model.max_length <= model.max_prompt_length:
        raise ConfigError(f"model.max_length={model.max_length} must exceed model.max_prompt_length={model.max_prompt_length}")
    if model.lora.enabled:
        _positive("model.lora.r", model.lora.r)
        _positive("model.lora.alpha", model.lora.alpha)
        if not 0 <= model.lora.dropout < 1:
            raise ConfigError(f"model.lora.dropout={model.lora.dropout!r} must be in [0, 1)")


def _validate_scorer(key: str, scorer: ScorerConfig) -> None:
    _choice(f"{key}.kind", scorer.kind, SCORER_KINDS)
    if scorer.kind == "callable":
        if not scorer._target_:
            raise ConfigError(f"{key}._target_ is empty; kind=callable needs the dotted path of a function or class")
        return
    if not scorer.name_or_path:
        raise ConfigError(f"{key}.name_or_path is empty; kind={scorer.kind} loads a model")
    if "{response}" not in scorer.template:
        raise ConfigError(f"{key}.template={scorer.template!r} has no {{response}} field")
    _choice(f"{key}.output", scorer.output, ("logit", "probability"))
    if scorer.append_eos is not None:
        _choice(f"{key}.append_eos", scorer.append_eos, EOS_RULES)
    _choice(f"{key}.dtype", scorer.dtype, tuple(DTYPES))
    _positive(f"{key}.batch_size", scorer.batch_size)
    _positive(f"{key}.max_length", scorer.max_length)


def exact_scorer_names(data: ExactTaskConfig) -> tuple[str, ...]:
    return ("reward",) + tuple(f"utility_{i}" for i in range(data.num_utilities))
