"""The typed configuration: one dataclass per section, each the one source of its defaults (conf/ YAML files hold
only what an option changes) and each checking its own fields (`check`). Choices are Enums; OmegaConf refuses
other values when the config is validated."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

from omegaconf import MISSING

from dualign.config.checks import choice, positive, within
from dualign.errors import ConfigError


class PolicyStepName(StrEnum):
    dpo = "dpo"  # pseudo-preference DPO on pairs (docs/method.md section 4)
    exact = "exact"  # gradient ascent on the enumerated Lagrangian (tasks that can enumerate responses)
    policy_gradient = "policy_gradient"  # RLOO on r + lambda . g - beta KL from on-policy samples


class Labels(StrEnum):
    soft = "soft"  # expected DPO loss under p = sigmoid(r_lambda(y1) - r_lambda(y0))
    hard = "hard"  # Bernoulli(p) labels, re-drawn for every lambda (the paper)


class PairSource(StrEnum):
    reference = "reference"  # pi_ref rollouts, drawn once (the paper)
    policy = "policy"  # the current policy's rollouts at the start of every iteration
    dataset = "dataset"  # the dataset's own responses (text tasks)


class PairScheme(StrEnum):
    consecutive = "consecutive"  # each response meets the next one of its prompt (the paper)
    all = "all"  # every pair among a group's responses
    listwise = "listwise"  # cross-entropy of softmax(r_lambda / beta) against softmax(log pi/pi_ref) over a group


class DualRule(StrEnum):
    projected = "projected"  # lambda <- max(0, lambda - eta u)
    log = "log"  # ln lambda += alpha lambda (-u) (Safe RLHF)
    newton = "newton"  # lambda <- the trust-region Newton step on the dual, curvature Cov(g) / beta measured on-policy


class DualEstimator(StrEnum):
    rollout = "rollout"  # on-policy samples (the method)
    exact = "exact"  # enumeration (tasks that can enumerate responses)


class ThresholdType(StrEnum):
    improvement = "improvement"  # b: required improvement of E[g] over pi_ref
    absolute = "absolute"  # tau: a level of E[g]; b = tau - E_ref[g]


class Schedule(StrEnum):
    constant = "constant"
    cosine = "cosine"  # from lr to 0 over the whole run
    cosine_per_iteration = "cosine_per_iteration"  # from lr to lr / 10 within each iteration, restarting at the next


class KVCache(StrEnum):
    dynamic = "dynamic"
    static = "static"  # preallocated, written in place (faster for long generations where supported)


class Backend(StrEnum):
    hf = "hf"  # transformers generate
    fast = "fast"  # dualign's decode loop (models/decode.py; Llama-family steps in models/llama_steps.py): small models
    vllm = "vllm"  # text tasks on GPU (pip install vllm)
    enumerate = "enumerate"  # the exact task: draws from the enumerated response tree (same law as token by token)


class ScorerKind(StrEnum):
    sequence_classifier = "sequence_classifier"
    score_model = "score_model"  # safe-rlhf's LlamaForScore
    callable = "callable"  # a Python function or class named by _target_


class EosRule(StrEnum):
    finished = "finished"  # after responses that ended with EOS
    always = "always"
    never = "never"


class ScorerOutput(StrEnum):
    logit = "logit"
    probability = "probability"


class ChatTemplate(StrEnum):
    auto = "auto"  # the tokenizer's chat template when it has one
    always = "always"
    never = "never"


class Dtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    auto = "auto"  # the checkpoint's


PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


@dataclass
class ConstraintConfig:
    scorer: str = MISSING  # a scorer name the task provides (the exact task: utility_0, utility_1, ...)
    threshold: float = MISSING  # b: required improvement over pi_ref, or tau: absolute level of E[g] (threshold_type)
    threshold_type: ThresholdType = ThresholdType.improvement
    negate: bool = False  # the utility is minus the score (safety = - cost)
    initial_multiplier: Optional[float] = None  # None: algorithm.initial_multiplier
    step_size: Optional[float] = None  # None: algorithm.step_size


@dataclass
class RewardConfig:
    scorer: str = "reward"  # the scorer maximised (the exact task's reward table)


@dataclass
class AlgorithmConfig:
    """Defaults are CAID's (conf/algorithm/caid.yaml); what each name means: config/algorithms.py."""
    name: str = "caid"
    iterations: int = 6  # T dual iterations (trained once for iterations x epochs epochs where the algorithm is not iterative)
    epochs_per_iteration: int = 32  # E (the exact task's full-batch epochs are one optimiser step each)
    dual_prompts: int = 16  # Q prompts for the on-policy dual step
    dual_samples: int = 4096  # K responses per prompt for the dual step
    dual_estimator: DualEstimator = DualEstimator.rollout
    max_multiplier: Optional[float] = None
    compare_one_shot: bool = True  # also train one_shot on the same instance and report it beside (caid)
    initial_multiplier: Optional[float] = None  # None: the one-shot lambda* where the algorithm warm-starts, else 0
    # eta (projected rule) or alpha (log rule), for constraints that set none (newton: unused). None (projected only):
    # half a Newton step, eta_i = beta / (2 Var(g_i)) from each dual step's own samples (core/dual_steps.py)
    step_size: Optional[float] = None
    dual_rule: DualRule = DualRule.projected
    trust_radius: Optional[float] = None  # newton, half newton: the largest move of a multiplier a step (None: max(2, 2 lambda))
    merge_weight: Optional[float] = None  # sacpo: P-SACPO's q, weights reward-aligned + q (final - reward-aligned)
    # pecaid: epochs of each objective's pre-alignment DPO; the exact task's 192 are CAID's whole run (6 x 32), as it too
    # fits a tilt of pi_ref (at 48 the implicit rewards correlate 0.944 with the tables and PeCAID fell 19% short of
    # b; at 192, 0.990 and 1.9%). Text sizes: 2 epochs over the dataset
    preference_epochs: int = 192
    dual_every_steps: Optional[int] = None  # a dual step every k optimiser steps (step-triggered algorithms)

    def check(self, cfg: "TrainConfig") -> None:
        for key in ("iterations", "epochs_per_iteration", "dual_prompts", "dual_samples", "preference_epochs"):
            positive(f"algorithm.{key}", getattr(self, key))
        if self.step_size is not None:
            positive("algorithm.step_size", self.step_size)
        if self.dual_every_steps is not None:
            positive("algorithm.dual_every_steps", self.dual_every_steps)
        if self.max_multiplier is not None:
            positive("algorithm.max_multiplier", self.max_multiplier)
        if self.trust_radius is not None:
            positive("algorithm.trust_radius", self.trust_radius, strict=True)
        if self.merge_weight is not None:
            positive("algorithm.merge_weight", self.merge_weight, strict=False)
        # the log-space rule multiplies lambda, so it can never leave 0
        strict = self.dual_rule == DualRule.log
        if self.initial_multiplier is not None:
            positive("algorithm.initial_multiplier", self.initial_multiplier, strict=strict)
        for name, constraint in cfg.constraints.items():
            if constraint.step_size is not None:
                positive(f"constraints.{name}.step_size", constraint.step_size)
            elif self.step_size is None and self.dual_rule == DualRule.log:
                raise ConfigError(f"algorithm.dual_rule=log needs a step size alpha: set algorithm.step_size (or "
                                  f"constraints.{name}.step_size); only the projected rule sizes its own step")
            if constraint.initial_multiplier is not None:
                positive(f"constraints.{name}.initial_multiplier", constraint.initial_multiplier, strict=strict)


@dataclass
class PolicyStepConfig:
    """One section for the three steps; each key says which step reads it (conf/policy_step/*.yaml set them)."""
    name: PolicyStepName = PolicyStepName.dpo
    batch_size: int = 16  # dpo: pairs (consecutive) or groups (all, listwise) per micro-batch; exact, policy_gradient: prompts
    labels: Labels = Labels.soft  # dpo
    pairs_from: PairSource = PairSource.reference  # dpo
    pairs: PairScheme = PairScheme.listwise  # dpo: which pairs of the responses the loss compares
    group_size: Optional[int] = None  # dpo with all / listwise: responses per group (None: all of a prompt's)
    steps_per_epoch: int = 50  # exact and policy_gradient: passes over the prompts in one epoch
    samples_per_prompt: int = 8  # policy_gradient: K responses per prompt for the RLOO estimator

    def check(self, cfg: "TrainConfig") -> None:
        positive("policy_step.batch_size", self.batch_size)
        positive("policy_step.steps_per_epoch", self.steps_per_epoch)
        if self.group_size is not None and self.group_size < 2:
            raise ConfigError(f"policy_step.group_size={self.group_size} must be null or >= 2 (a group holds pairs)")
        if self.pairs == PairScheme.listwise and self.labels == Labels.hard:
            raise ConfigError("policy_step.labels=hard has no listwise form; use policy_step.pairs=all or consecutive")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"policy_step.samples_per_prompt={self.samples_per_prompt} must be >= 2 (leave-one-out baseline)")


@dataclass
class ReferenceConfig:
    # pi_ref rollouts per prompt: DPO pairs, E_ref[g] and the one-shot dual (text tasks: conf/sizes/text.yaml)
    samples_per_prompt: int = 16384
    prompts: Optional[int] = None  # how many training prompts get pi_ref rollouts (None: all; paper: 1000)

    def check(self, cfg: "TrainConfig") -> None:
        positive("reference.samples_per_prompt", self.samples_per_prompt)
        if self.prompts is not None:
            positive("reference.prompts", self.prompts)
        if self.samples_per_prompt % 2:
            raise ConfigError(f"reference.samples_per_prompt={self.samples_per_prompt} must be even (responses are paired)")


@dataclass
class GenerationConfig:
    """Sampling for every rollout (pi_ref, the dual step, policy-gradient steps, evaluation)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None  # None: the exact task's response length; text tasks must set it
    batch_size: int = 4096  # sequences per generate call
    cache: KVCache = KVCache.dynamic
    backend: Backend = Backend.hf
    vllm_memory_fraction: float = 0.3  # GPU memory vLLM may take beside the training process

    def check(self, cfg: "TrainConfig") -> None:
        positive("generation.temperature", self.temperature)
        within("generation.top_p", self.top_p, 0, 1, "(]")
        if self.max_new_tokens is not None:
            positive("generation.max_new_tokens", self.max_new_tokens)
        positive("generation.batch_size", self.batch_size)
        within("generation.vllm_memory_fraction", self.vllm_memory_fraction, 0, 1)


@dataclass
class EvaluationConfig:
    """Text tasks: responses of pi_ref and the trained policy on the test split, scored by every scorer."""
    samples_per_prompt: int = 2
    every_iteration: bool = False  # also evaluate after every iteration (logged as eval/* per iteration)
    samples_logged: int = 20  # rows of the sample table logged to MLflow
    policy_path: Optional[str] = None  # `python -m dualign.evaluate`: the saved policy or adapter to evaluate

    def check(self, cfg: "TrainConfig") -> None:
        positive("evaluation.samples_per_prompt", self.samples_per_prompt)
        positive("evaluation.samples_logged", self.samples_logged, strict=False)


@dataclass
class AdviseConfig:
    """`dualign-advise` only (training reads none of it): the thresholds it predicts for, from pi_ref's rollouts."""
    constraint: Optional[str] = None  # the constraint whose b varies (None: the first); the others keep their b
    thresholds: Optional[list[float]] = None  # improvements b to predict for (None: 10 from 5% to 95% of the edge)
    resamples: int = 200  # bootstrap resamples over prompts for the 95% intervals

    def check(self, cfg: "TrainConfig") -> None:
        positive("advise.resamples", self.resamples, strict=False)
        if self.constraint is not None and self.constraint not in cfg.constraints:
            raise ConfigError(f"advise.constraint={self.constraint!r} is not a constraint of this config "
                              f"(constraints: {', '.join(cfg.constraints) or 'none'})")
        for value in self.thresholds or []:
            positive("advise.thresholds[]", value, strict=False)


@dataclass
class OptimizerConfig:
    lr: float = 4.0e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Schedule = Schedule.constant  # the exact task: cosine_per_iteration (conf/sizes/exact.yaml)
    fused: Optional[bool] = None  # fused AdamW; None: where the parameters support it and it can be clipped

    def check(self, cfg: "TrainConfig") -> None:
        positive("optimizer.lr", self.lr)
        positive("optimizer.weight_decay", self.weight_decay, strict=False)
        positive("optimizer.warmup_steps", self.warmup_steps, strict=False)
        trainer = cfg.trainer
        clips = trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0
        mixed = trainer.precision != "32-true" and not str(trainer.strategy).startswith("deepspeed")
        if self.fused and clips and mixed:
            # Lightning's mixed-precision plugin cannot clip an optimiser that unscales inside its step (fused AdamW)
            raise ConfigError(f"optimizer.fused=true cannot be clipped under trainer.precision={trainer.precision} "
                              f"(trainer.gradient_clip_val={trainer.gradient_clip_val}); set optimizer.fused=null (fused "
                              "wherever it can be clipped) or trainer.gradient_clip_val=null")


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

    def check(self, cfg: "TrainConfig") -> None:
        for key in ("devices", "num_nodes", "log_every_n_steps", "accumulate_grad_batches"):
            positive(f"trainer.{key}", getattr(self, key))
        strategy = str(self.strategy)
        if strategy.startswith(("fsdp", "deepspeed")) and self.accelerator not in ("gpu", "cuda", "auto"):
            raise ConfigError(f"trainer.strategy={strategy} needs trainer.accelerator=gpu (Lightning runs it on CUDA "
                              f"only), not {self.accelerator!r}; a CPU check of data-parallel training: trainer=ddp "
                              "trainer.accelerator=cpu")
        if self.precision in ("bf16-true", "16-true", "bf16", "16", "32", "64", "64-true"):
            # a -true precision casts the policy after pi_ref's log-probs were taken (the DPO log-ratio would not start at 0)
            raise ConfigError(f"trainer.precision={self.precision!r} is not supported; allowed values: "
                              f"{', '.join(PRECISIONS)} (half-precision weights: model.dtype=bfloat16 with bf16-mixed)")
        choice("trainer.precision", self.precision, PRECISIONS)
        if self.gradient_clip_val is not None and not self.gradient_clip_val >= 0:
            raise ConfigError(f"trainer.gradient_clip_val={self.gradient_clip_val!r} must be null or >= 0")


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
    cache_dir: str = "outputs/cache"  # exact pi_ref, rollouts, scores and reference log-probs (by hash)
    fixtures_dir: str = "tests/fixtures"  # offline stand-ins (experiment=pku_safety_tiny)


@dataclass
class ScorerConfig:
    kind: ScorerKind = ScorerKind.sequence_classifier
    name_or_path: Optional[str] = None  # hub name or local folder (model scorers)
    revision: Optional[str] = None
    gguf_file: Optional[str] = None  # a .gguf in name_or_path (dequantised by transformers at every load)
    from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)  # passed on to the model's from_pretrained
    _target_: Optional[str] = None  # callable: dotted path of a function or class; extra keys go in kwargs
    kwargs: dict[str, Any] = field(default_factory=dict)
    template: str = "{prompt}{response}"  # how this scorer wants to read a (prompt, response) pair
    label: Optional[str] = None  # several labels (classifier) or score_dim > 1 (score_model): the name or index to read
    output: ScorerOutput = ScorerOutput.logit  # sequence_classifier: logit | probability (softmax over labels)
    normalize: bool = True  # score_model: apply the checkpoint's do_normalize / mean / var as safe-rlhf does
    # EOS after the response, in the scorer's own tokenizer: finished (after responses that ended with EOS, as safe-rlhf
    # scores generated ids; a response cut at max_new_tokens ends on its last token) | always | never.
    # None: finished for score_model (safe-rlhf trains on prompt + answer + EOS), never for sequence_classifier
    append_eos: Optional[EosRule] = None
    device: str = "auto"  # auto: cuda when there is one, else cpu
    dtype: Dtype = Dtype.float32
    batch_size: int = 16
    max_length: int = 512
    trust_remote_code: bool = False

    def check(self, key: str) -> None:
        if self.kind == ScorerKind.callable:
            if not self._target_:
                raise ConfigError(f"{key}._target_ is empty; kind=callable needs the dotted path of a function or class")
            return
        if not self.name_or_path:
            raise ConfigError(f"{key}.name_or_path is empty; kind={self.kind} loads a model")
        if "{response}" not in self.template:
            raise ConfigError(f"{key}.template={self.template!r} has no {{response}} field")
        positive(f"{key}.batch_size", self.batch_size)
        positive(f"{key}.max_length", self.max_length)


@dataclass
class TrainConfig:
    seed: int = 0
    beta: float = 1.0  # KL weight of the objective E[r] - beta * KL(pi || pi_ref)
    data: Any = None  # a task config by data.kind (config/tasks.py): ExactTaskConfig or TextDataConfig
    model: Any = None  # by model.kind: TinyModelConfig or HFModelConfig
    scorers: dict[str, ScorerConfig] = field(default_factory=dict)  # model / callable scorers by name
    reward: RewardConfig = field(default_factory=RewardConfig)
    constraints: dict[str, ConstraintConfig] = field(default_factory=dict)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    policy_step: PolicyStepConfig = field(default_factory=PolicyStepConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    advise: AdviseConfig = field(default_factory=AdviseConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ckpt_path: Optional[str] = None  # resume from this Lightning checkpoint ("last": the run folder's newest intact one)
    allow_resume_changes: list[str] = field(default_factory=list)  # keys (or sections) a resumed run may change
