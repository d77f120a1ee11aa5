"""One scorer interface: score(prompts, responses) -> tensor of floats, one per (prompt, response) pair.

Implementations: a sequence-classification reward model or classifier, a safe-rlhf score model (`LlamaForScore`,
as beaver-7b-v1.0-reward and -cost are published), any Python callable named by `_target_`, and the exact task's
tables. Each model scorer has its own tokenizer, template, device and batch size, and scores under no_grad.
A utility that is the negation of a score (safety = minus cost) is `Negated(scorer)`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import torch
from transformers import LlamaModel, LlamaPreTrainedModel

SCORER_KINDS = ("sequence_classifier", "score_model", "callable")


class Scorer(Protocol):
    name: str

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor: ...


@dataclass
class ScorerConfig:
    kind: str = "sequence_classifier"  # sequence_classifier | score_model | callable
    name_or_path: Optional[str] = None  # hub name or local folder (model scorers)
    revision: Optional[str] = None
    _target_: Optional[str] = None  # callable: dotted path of a function or class; extra keys go in kwargs
    kwargs: dict[str, Any] = field(default_factory=dict)
    template: str = "{prompt}{response}"  # how this scorer wants to read a (prompt, response) pair
    label: Optional[str] = None  # sequence_classifier with several labels: the label's name (or index) to read
    output: str = "logit"  # sequence_classifier: logit | probability (softmax over labels)
    normalize: bool = True  # score_model: apply the checkpoint's do_normalize / mean / var as safe-rlhf does
    device: str = "auto"  # auto: cuda when there is one, else cpu
    dtype: str = "float32"  # float32 | bfloat16 | float16
    batch_size: int = 16
    max_length: int = 512
    trust_remote_code: bool = False


class Negated:
    """-score: turns a cost model into a utility to be maximised."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.name = f"-{scorer.name}"

    def __call__(self, prompts, responses):
        return -self.scorer(prompts, responses)


def score_all(scorers: Sequence[Scorer], prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    """Scores of every scorer, [len(scorers), len(prompts)], float32, with a clear error on NaN or inf."""
    rows = []
    for scorer in scorers:
        with torch.no_grad():
            values = torch.as_tensor(scorer(prompts, responses), dtype=torch.float32).reshape(-1).cpu()
        if values.numel() != len(prompts):
            raise ValueError(f"scorer {scorer.name!r} returned {values.numel()} scores for {len(prompts)} responses")
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).nonzero()[0])
            raise FloatingPointError(f"scorer {scorer.name!r} returned {values[bad].item()} for response {bad}")
        rows.append(values)
    return torch.stack(rows) if rows else torch.empty(0, len(prompts))


class LlamaForScore(LlamaPreTrainedModel):
    """safe-rlhf's score model, rebuilt on plain transformers: a Llama backbone (`model.`) and a linear `score_head`
    (hidden_size -> score_dim, bias when score_bias). Loads beaver-7b-v1.0-reward / -cost with `from_pretrained`."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.score_head = torch.nn.Linear(config.hidden_size, getattr(config, "score_dim", 1),
                                          bias=getattr(config, "score_bias", True))
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        """Per-token scores [B, T, score_dim]."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.score_head(hidden)

    def end_scores(self, input_ids, attention_mask) -> torch.Tensor:
        """The sequence score: the per-token score at the last position whose attention mask is 1, [B, score_dim]
        (either padding side), normalised like safe-rlhf when the config says do_normalize."""
        scores = self(input_ids, attention_mask)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.bool() * positions).max(dim=1).values
        end = scores[torch.arange(scores.shape[0], device=scores.device), last]
        return self.normalize(end) if getattr(self.config, "do_normalize", False) else end

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        kind = getattr(self.config, "score_type", "reward")
        std = float(getattr(self.config, "var", 1.0)) ** 0.5 + 1e-8
        if kind == "reward":
            return (scores - float(getattr(self.config, "mean", 0.0))) / std
        if kind == "cost":
            return scores / std
        return scores


class ModelScorer:
    """A scorer backed by a transformers checkpoint: formats each pair with the scorer's template, tokenizes with
    the scorer's own tokenizer (right padding), scores in batches under no_grad on the scorer's device."""

    def __init__(self, name: str, cfg: ScorerConfig):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .hf_models import load_pretrained, resolve_device, resolve_dtype

        self.name, self.cfg = name, cfg
        self.device = resolve_device(cfg.device)
        self.tokenizer = load_pretrained(AutoTokenizer, cfg.name_or_path, f"scorers.{name}", revision=cfg.revision,
                                         trust_remote_code=cfg.trust_remote_code)
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "right", "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model_class = LlamaForScore if cfg.kind == "score_model" else AutoModelForSequenceClassification
        self.model = load_pretrained(model_class, cfg.name_or_path, f"scorers.{name}", revision=cfg.revision,
                                     dtype=resolve_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code)
        self.model.to(self.device).eval().requires_grad_(False)
        if cfg.kind == "score_model" and not cfg.normalize:
            self.model.config.do_normalize = False
        if cfg.kind == "sequence_classifier":
            if self.model.config.pad_token_id is None:  # the head finds the last token through pad_token_id
                self.model.config.pad_token_id = self.tokenizer.pad_token_id
            self.label_index = self._label_index()

    def _label_index(self) -> int:
        labels = self.model.config.num_labels
        label = self.cfg.label
        if label is None:
            if labels != 1:
                raise ValueError(f"scorers.{self.name}: the classifier has {labels} labels "
                                 f"({', '.join(map(str, self.model.config.id2label.values()))}); set scorers.{self.name}.label")
            return 0
        label2id = {str(k): int(v) for k, v in (self.model.config.label2id or {}).items()}
        if str(label) in label2id:
            return label2id[str(label)]
        if str(label).isdigit() and int(label) < labels:
            return int(label)
        raise ValueError(f"scorers.{self.name}.label={label!r} is not one of the classifier's labels: "
                         f"{', '.join(label2id) or list(range(labels))}")

    @torch.no_grad()
    def __call__(self, prompts, responses) -> torch.Tensor:
        texts = [self.cfg.template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
        out = torch.empty(len(texts))
        for start in range(0, len(order), self.cfg.batch_size):
            chunk = order[start : start + self.cfg.batch_size]
            batch = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                   max_length=self.cfg.max_length, return_tensors="pt").to(self.device)
            if self.cfg.kind == "score_model":
                values = self.model.end_scores(batch["input_ids"], batch["attention_mask"])[:, 0]
            else:
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                if self.cfg.output == "probability":
                    logits = logits.softmax(-1)
                values = logits[:, self.label_index]
            out[torch.tensor(chunk)] = values.float().cpu()
        return out


class CallableScorer:
    """Any Python function (prompts, responses) -> scores, or a class whose instances are such callables."""

    def __init__(self, name: str, cfg: ScorerConfig):
        import inspect

        from hydra.utils import get_object

        try:
            target = get_object(cfg._target_)
        except Exception as error:
            raise ValueError(f"scorers.{name}._target_={cfg._target_!r} cannot be imported: {error}") from None
        self.name = name
        self.fn = target(**cfg.kwargs) if inspect.isclass(target) else functools.partial(target, **cfg.kwargs)
        if not callable(self.fn):
            raise ValueError(f"scorers.{name}._target_={cfg._target_!r} is not callable")

    def __call__(self, prompts, responses):
        return torch.as_tensor(self.fn(list(prompts), list(responses)), dtype=torch.float32)


def build_scorer(name: str, cfg: ScorerConfig) -> Scorer:
    if cfg.kind == "callable":
        return CallableScorer(name, cfg)
    return ModelScorer(name, cfg)


def response_length(prompts: Sequence[str], responses: Sequence[str], unit: str = "words") -> list[float]:
    """A ready callable scorer: response length in words or characters (for verbosity constraints)."""
    return [float(len(r.split()) if unit == "words" else len(r)) for r in responses]
