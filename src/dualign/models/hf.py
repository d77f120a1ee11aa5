"""Hugging Face policies: any AutoModelForCausalLM by hub name or local path, LoRA through peft, the reference
policy (the same network with adapters disabled, or a frozen copy), prompt tokenization and standard saving."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import torch

from dualign.config.tasks import HFModelConfig
from dualign.errors import LoadError
from dualign.util.cache import cached_folder

log = logging.getLogger("dualign")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str):
    return DTYPES[name]


def load_pretrained(cls, name_or_path: str, key: str, **kwargs):
    """cls.from_pretrained with one clear line when the files are not there (offline, wrong path, no weights)."""
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if Path(name_or_path).is_dir():
            hint = "the folder is there but is not a checkpoint this class reads"
        elif Path(name_or_path).is_absolute() or name_or_path.startswith((".", "~")):
            hint = "no such folder"
        else:
            hint = "offline, pass a local folder (see README: pre-downloading)"
        raise LoadError(f"{key}.name_or_path={name_or_path!r}: cannot load {getattr(cls, '__name__', cls)} ({first}); "
                        f"{hint}") from None


def without_gguf_quantization(model):
    """A GGUF checkpoint is dequantised to plain tensors on load, but transformers keeps its quantization config and
    then refuses save_pretrained ("not serializable"); the weights are ordinary, so drop the marker."""
    quantization = getattr(model.config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    if str(method).lower().endswith("gguf"):
        del model.config.quantization_config
        model.hf_quantizer, model.is_quantized = None, False
    return model


def materialize(cfg: HFModelConfig, cache_dir: str) -> HFModelConfig:
    """cfg with a GGUF checkpoint replaced by its dequantised copy (safetensors and tokenizer files), converted once
    and cached under cache_dir/converted like pi_ref's rollouts; other configs are returned as they are."""
    if cfg.gguf_file is None:
        return cfg
    gguf = Path(cfg.name_or_path) / cfg.gguf_file
    if not gguf.is_file():
        raise LoadError(f"model.gguf_file={cfg.gguf_file!r}: no such file in model.name_or_path={cfg.name_or_path!r}")
    key = {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size, "mtime_ns": gguf.stat().st_mtime_ns,
           "tokenizer": cfg.tokenizer, "dtype": str(cfg.dtype), "transformers": version("transformers")}

    def build(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to a plain checkpoint (once; cached)", gguf)
        model = load_pretrained(AutoModelForCausalLM, cfg.name_or_path, "model", gguf_file=cfg.gguf_file,
                                dtype=resolve_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code)
        without_gguf_quantization(model).save_pretrained(folder)
        tokenizer_kwargs = {} if cfg.tokenizer else {"gguf_file": cfg.gguf_file}
        load_pretrained(AutoTokenizer, cfg.tokenizer or cfg.name_or_path, "model", **tokenizer_kwargs).save_pretrained(folder)

    def load(folder: Path) -> str:
        if not (folder / "config.json").is_file():
            raise ValueError("no config.json")
        return str(folder)

    folder = cached_folder(cache_dir, "converted", key, build, load)
    return replace(cfg, name_or_path=folder, tokenizer=None, gguf_file=None)  # from_pretrained_kwargs still apply


def fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """Identifies a checkpoint for cache keys: a local folder by its config and weight files' names and sizes,
    a hub name by name and revision."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return f"{name_or_path}@{revision or 'main'}"
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name.endswith((".json", ".model")):
            digest.update(path.name.encode() + path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".pt"):
            digest.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    return f"{folder.resolve()}#{digest.hexdigest()[:16]}"


def load_tokenizer(cfg: HFModelConfig):
    """cfg's tokenizer (a GGUF model's comes from its converted copy: pass cfg through `materialize` first)."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, cfg.tokenizer or cfg.name_or_path, "model", revision=cfg.revision,
                                trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.eos_token_id is None:
        raise LoadError(f"model.tokenizer of {cfg.name_or_path!r} has no EOS token; responses could never end")
    tokenizer.padding_side = "left"  # decoder-only generation; the loss batches are padded on the right by hand
    return tokenizer


class PromptFormatter:
    """Prompt and response token ids for one policy tokenizer: the chat template when there is one (and it is
    allowed), else the configured template; prompts cut from the left, responses end with EOS."""

    def __init__(self, tokenizer, cfg: HFModelConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if cfg.use_chat_template == "always" and not has_template:
            raise LoadError(f"model.use_chat_template=always but the tokenizer of {cfg.name_or_path!r} has no chat template")
        self.chat = cfg.use_chat_template == "always" or (cfg.use_chat_template == "auto" and has_template)

    def prompt_ids(self, example) -> list[int]:
        if self.chat:
            messages = list(example.messages)
            if self.cfg.system_prompt is not None and not (messages and messages[0]["role"] == "system"):
                messages = [{"role": "system", "content": self.cfg.system_prompt}] + messages
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(self.cfg.prompt_template.format(prompt=example.prompt))["input_ids"]
        return ids[-self.cfg.max_prompt_length:]

    def response_ids(self, response: str, prompt_length: int) -> list[int]:
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return ids[: max(1, self.cfg.max_length - prompt_length)]


def _disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_causal_lm(cfg: HFModelConfig, path: str | None = None):
    from transformers import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, path or cfg.name_or_path, "model", revision=cfg.revision,
                            dtype=resolve_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code,
                            **cfg.from_pretrained_kwargs)
    if cfg.disable_dropout:
        _disable_dropout(model)
    return model


def load_policy(cfg: HFModelConfig):
    """The trainable policy, starting at pi_ref: LoRA adapters (identity at init) on the base model, or the full model."""
    model = load_causal_lm(cfg).to(resolve_device(cfg.device))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return with_adapters(model, cfg) if cfg.lora.enabled else model


def with_adapters(model, cfg: HFModelConfig):
    """model.lora's adapters (identity at init) on `model`."""
    from peft import LoraConfig, get_peft_model

    target = cfg.lora.target_modules
    target = list(target) if not isinstance(target, str) else target
    try:
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                lora_dropout=cfg.lora.dropout, target_modules=target))
    except ValueError as error:  # e.g. target modules that the architecture does not have
        raise LoadError(f"model.lora.target_modules={target}: {str(error).splitlines()[0]}") from None


def scale_adapters(policy, weight: float) -> None:
    """Multiply every LoRA adapter's contribution by weight: base + weight * BA."""
    from peft.tuners.lora import LoraLayer

    for module in policy.modules():
        if isinstance(module, LoraLayer):
            module.scale_layer(weight)


class AdapterDisabled(torch.nn.Module):
    """pi_ref as a view of a LoRA policy: the same network with its adapters off (no second copy in memory), always
    in eval mode. Its forward and generate match the base model exactly because LoRA only adds to it."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    @property
    def config(self):
        return self.peft_model.config

    def _run(self, method: str, *args, **kwargs):
        was_training = self.peft_model.training
        self.peft_model.eval()
        try:
            with self.peft_model.disable_adapter():
                return getattr(self.peft_model, method)(*args, **kwargs)
        finally:
            self.peft_model.train(was_training)

    def forward(self, *args, **kwargs):
        return self._run("forward", *args, **kwargs)

    def generate(self, *args, **kwargs):
        return self._run("generate", *args, **kwargs)


def reference_for(policy, cfg: HFModelConfig):
    """pi_ref for a freshly loaded policy: the adapter-disabled view with LoRA, else a frozen copy."""
    if cfg.lora.enabled:
        return AdapterDisabled(policy)
    reference = load_causal_lm(cfg).to(resolve_device(cfg.device))
    return reference.eval().requires_grad_(False)


def load_trained_policy(path: str, cfg: HFModelConfig):
    """A saved policy for evaluation: a peft adapter folder (on top of model.name_or_path) or a full model folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise LoadError(f"evaluation.policy_path={path!r} is not a folder")
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_causal_lm(cfg)  # the adapter sits on model.name_or_path, the reference policy
        return PeftModel.from_pretrained(base, str(folder)).eval()
    return load_causal_lm(cfg, str(folder)).eval()


def save_policy(policy, tokenizer, folder: Path) -> Path:
    """save_pretrained: the LoRA adapter (peft format) or the full model, with the tokenizer beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
