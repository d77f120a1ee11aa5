"""The task sections of the config: `data` and `model` hold one of these dataclasses, chosen by their `kind`. Each
task config says what its task can do (`enumerable`: every response can be enumerated, so the exact policy step,
exact dual estimates and the oracle are available; `dataset_responses`: the data has its own responses to pair) and
checks its own fields and the options that depend on it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from omegaconf import MISSING

from dualign.config.algorithms import spec
from dualign.config.checks import choice, positive, within
from dualign.config.schema import ChatTemplate, Dtype, TrainConfig
from dualign.errors import ConfigError


@dataclass
class ExactTaskConfig:
    """The exact task (tasks/exact.py): every response can be enumerated, so the optimum is known exactly."""
    enumerable: ClassVar[bool] = True
    dataset_responses: ClassVar[bool] = False
    model_kinds: ClassVar[tuple[str, ...]] = ("tiny_gpt2",)

    kind: str = "exact"
    num_prompts: int = 16
    num_response_tokens: int = 8
    response_length: int = 3  # N = 8**3 = 512 responses per prompt
    num_utilities: int = 2  # tables utility_0 .. utility_{n-1}; constraints pick among them
    utility_correlation: float = -0.5  # correlation of every utility with the reward (negative: constraints bind)
    pairwise_scale: float = 0.5  # weight of the pairwise (y_s, y_t) terms against the per-position ones
    teacher_sharpness: float = 1.5  # std of the teacher's logits: higher makes pi_ref further from uniform
    seed: int = 0
    sft_samples_per_prompt: int = 256
    sft_steps: int = 300
    sft_lr: float = 3.0e-3
    sft_batch_size: int = 512

    def scorer_names(self) -> tuple[str, ...]:
        return ("reward",) + tuple(f"utility_{i}" for i in range(self.num_utilities))

    def check(self, cfg: TrainConfig) -> None:
        if self.num_response_tokens < 2 or self.response_length < 1 or self.num_prompts < 1:
            raise ConfigError("data: need num_prompts >= 1, num_response_tokens >= 2 and response_length >= 1")
        within("data.utility_correlation", self.utility_correlation, -1, 1, "[]")  # outside it the tables are complex
        for key in ("num_utilities", "pairwise_scale", "teacher_sharpness", "sft_steps"):
            positive(f"data.{key}", getattr(self, key), strict=False)
        for key in ("sft_samples_per_prompt", "sft_lr", "sft_batch_size"):
            positive(f"data.{key}", getattr(self, key))
        if cfg.algorithm.dual_prompts > self.num_prompts:
            raise ConfigError(f"algorithm.dual_prompts={cfg.algorithm.dual_prompts} exceeds data.num_prompts={self.num_prompts}")
        if cfg.generation.max_new_tokens not in (None, self.response_length):
            raise ConfigError(f"generation.max_new_tokens={cfg.generation.max_new_tokens} must be null or "
                              f"data.response_length={self.response_length} on the exact task")
        if cfg.generation.backend == "vllm":
            raise ConfigError("generation.backend=vllm is for text tasks; the exact task samples with "
                              "generation.backend=enumerate (its default), hf or fast")


@dataclass
class TinyModelConfig:
    """A tiny GPT-2 built from a config (no download); pi_ref is it after SFT on the exact task's teacher."""
    kind: str = "tiny_gpt2"
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4

    def check(self, cfg: TrainConfig) -> None:
        for key in ("n_layer", "n_embd", "n_head"):
            positive(f"model.{key}", getattr(self, key))
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} must be a multiple of model.n_head={self.n_head}")


FORMATS = ("pku_saferlhf", "hh_rlhf", "jsonl")


@dataclass
class TextDataConfig:
    """A preference dataset in its published schema (tasks/text_data.py)."""
    enumerable: ClassVar[bool] = False
    dataset_responses: ClassVar[bool] = True
    model_kinds: ClassVar[tuple[str, ...]] = ("hf",)

    kind: str = "pku_saferlhf"  # pku_saferlhf | hh_rlhf | jsonl
    path: str = MISSING  # hub name, local folder, or a .jsonl / .parquet file (jsonl)
    revision: Optional[str] = None
    data_dir: Optional[str] = None  # hh_rlhf subset, e.g. harmless-base
    train_split: str = "train"
    test_split: str = "test"
    prompt_column: str = "prompt"  # jsonl only
    # jsonl only; [] (or none of them in the file): prompt-only data, for runs that pair pi_ref's or the policy's samples
    response_columns: list[str] = field(default_factory=lambda: ["response_0", "response_1"])
    max_train_rows: Optional[int] = None  # filter: keep the first N training rows (count logged)
    max_test_prompts: Optional[int] = None  # filter: evaluate on the first N test prompts (count logged)
    drop_identical_responses: bool = False  # filter: pairs whose two responses are equal carry no preference
    drop_mismatched_prompts: bool = False  # hh_rlhf filter: chosen and rejected with different conversations
    test_fraction: Optional[float] = None  # a single file: hold out this fraction of its rows (seeded) as the test split
    # algorithm=pecaid's labels, one per objective: objective (reward, or a constraint's name) -> the column holding the
    # index (0 or 1) of the response that objective prefers (pku_saferlhf: better_response_id, safer_response_id)
    preference_columns: dict[str, str] = field(default_factory=dict)

    def scorer_names(self) -> tuple[str, ...]:
        return ()  # text tasks score with the configured scorers only

    def check(self, cfg: TrainConfig) -> None:
        if cfg.generation.max_new_tokens is None:
            raise ConfigError("generation.max_new_tokens is null; text tasks need a response length limit")
        if not self.path:
            raise ConfigError("data.path is empty; give a hub dataset name or a local folder or file")
        if cfg.generation.backend == "enumerate":
            raise ConfigError("generation.backend=enumerate draws from the exact task's enumerated responses; text "
                              "tasks sample with generation.backend=fast, hf or vllm")
        if self.kind == "jsonl" and not self.response_columns and cfg.policy_step.pairs_from == "dataset":
            raise ConfigError("policy_step.pairs_from=dataset pairs the dataset's responses, but data.response_columns "
                              "is empty (prompt-only data); use policy_step.pairs_from=reference or name the columns")
        for key in ("max_train_rows", "max_test_prompts"):
            if getattr(self, key) is not None:
                positive(f"data.{key}", getattr(self, key))
        if self.test_fraction is not None:
            within("data.test_fraction", self.test_fraction, 0, 1)
        if spec(cfg.algorithm.name).preference_labels:
            self._check_preference_labels(cfg)

    def _check_preference_labels(self, cfg: TrainConfig) -> None:
        """PeCAID learns every objective from the dataset's own labels on its two responses a prompt."""
        name = cfg.algorithm.name
        if self.kind == "hh_rlhf":
            raise ConfigError(f"algorithm.name={name} needs one preference label per objective; hh_rlhf rows hold one "
                              "(chosen over rejected): use pku_saferlhf or a jsonl file with a label column per objective")
        if self.kind == "jsonl" and len(self.response_columns) != 2:
            raise ConfigError(f"algorithm.name={name} reads labels on pairs: data.response_columns must name the two "
                              f"responses a row, not {list(self.response_columns)}")
        for objective in ("reward", *cfg.constraints):
            if objective not in self.preference_columns:
                raise ConfigError(f"algorithm.name={name} learns each objective from the dataset's labels: "
                                  f"data.preference_columns has no column for {objective!r} (e.g. "
                                  f"data.preference_columns.{objective}=safer_response_id)")
        if cfg.reference.prompts is not None and cfg.algorithm.dual_prompts > cfg.reference.prompts:
            raise ConfigError(f"algorithm.dual_prompts={cfg.algorithm.dual_prompts} exceeds reference.prompts="
                              f"{cfg.reference.prompts}: {name} centres implicit utilities on pi_ref's mean per prompt, "
                              "so its dual step samples only prompts with pi_ref rollouts")


@dataclass
class LoraSettings:
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Any = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # or "all-linear"


@dataclass
class HFModelConfig:
    """Any Hugging Face causal LM (models/hf.py). With LoRA the reference is the same network with the adapters
    disabled (no second copy); without, a frozen copy."""
    kind: str = "hf"
    name_or_path: str = MISSING  # hub name or local folder (${package_dir:NAME}: an installed package's folder)
    revision: Optional[str] = None
    tokenizer: Optional[str] = None  # default: name_or_path
    gguf_file: Optional[str] = None  # a .gguf in name_or_path: dequantised once, cached as a plain checkpoint
    from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)  # passed on to from_pretrained (model)
    system_prompt: Optional[str] = None  # chat template: a system message before every prompt (None: the template's own)
    dtype: Dtype = Dtype.auto
    device: str = "auto"  # where pi_ref works before training (rollouts, reference log-probs); Lightning places the policy
    trust_remote_code: bool = False  # off unless you trust the checkpoint's code
    gradient_checkpointing: bool = False
    disable_dropout: bool = True  # as TRL: dropout makes the policy and reference log-probs disagree at init
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompt_template: str = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"  # used when no chat template applies
    use_chat_template: ChatTemplate = ChatTemplate.auto
    max_prompt_length: int = 256  # prompts are cut from the left (the question is at the end)
    max_length: int = 512  # prompt + response tokens

    def check(self, cfg: TrainConfig) -> None:
        if not self.name_or_path:
            raise ConfigError("model.name_or_path is empty")
        if self.gguf_file is not None and not self.gguf_file.endswith(".gguf"):
            raise ConfigError(f"model.gguf_file={self.gguf_file!r} is not a .gguf file name")
        reserved = {"revision", "dtype", "trust_remote_code", "gguf_file"} & set(self.from_pretrained_kwargs)
        if reserved:
            raise ConfigError(f"model.from_pretrained_kwargs.{sorted(reserved)[0]}: set model.{sorted(reserved)[0]} instead")
        if "{prompt}" not in self.prompt_template:
            raise ConfigError(f"model.prompt_template={self.prompt_template!r} has no {{prompt}} field")
        positive("model.max_prompt_length", self.max_prompt_length)
        if self.max_length <= self.max_prompt_length:
            raise ConfigError(f"model.max_length={self.max_length} must exceed model.max_prompt_length={self.max_prompt_length}")
        if self.lora.enabled:
            positive("model.lora.r", self.lora.r)
            positive("model.lora.alpha", self.lora.alpha)
            within("model.lora.dropout", self.lora.dropout, 0, 1, "[)")


DATA_KINDS = {"exact": ExactTaskConfig, **{kind: TextDataConfig for kind in FORMATS}}
MODEL_KINDS = {"tiny_gpt2": TinyModelConfig, "hf": HFModelConfig}


def check_kind(key: str, kind: str, kinds: dict) -> None:
    choice(f"{key}.kind", kind, tuple(kinds))
