"""One scorer interface: score(prompts, responses) -> tensor of floats, one per (prompt, response) pair.

Implementations: a sequence-classification reward model or classifier, a safe-rlhf score model (`LlamaForScore`,
as beaver-7b-v1.0-reward and -cost are published), any Python callable named by `_target_`, and the exact task's
tables. Each model scorer has its own tokenizer, template, device and batch size, and scores under no_grad.
A utility that is the negation of a score (safety = minus cost) is `Negated(scorer)`.
"""
from __future__ import annotations

import functools
from typing import Optional, Protocol, Sequence

import torch
from transformers import LlamaModel, LlamaPreTrainedModel

from dualign.config.schema import ScorerConfig
from dualign.models.hf import load_pretrained, resolve_device, resolve_dtype
from dualign.util.progress import bar


class Scorer(Protocol):
    """finished[i]: whether response i ended with EOS (False: cut at max_new_tokens); None: every response is whole.
    Scorers that read text as a model was trained on it use it (safe-rlhf scores sit on the EOS token)."""

    name: str

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 finished: Optional[Sequence[bool]] = None) -> torch.Tensor: ...


class Negated:
    """-score: turns a cost model into a utility to be maximised."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.name = f"-{scorer.name}"

    def __call__(self, prompts, responses, finished=None):
        return -self.scorer(prompts, responses, finished)


SCORING_CHUNK = 1024  # responses per scorer call: the progress bar moves, and a scorer never sees more at once


def score_all(scorers: Sequence[Scorer], prompts: Sequence[str], responses: Sequence[str],
              finished: Optional[Sequence[bool]] = None) -> torch.Tensor:
    """Scores of every scorer, [len(scorers), len(prompts)], float32, with a clear error on NaN or inf. Scorers are
    called on chunks of SCORING_CHUNK responses (a score must depend on its own pair only)."""
    rows = []
    with bar(len(scorers) * len(prompts), f"scoring ({', '.join(s.name for s in scorers)})", "resp") as progress:
        for scorer in scorers:
            rows.append(_score_in_chunks(scorer, prompts, responses, finished, progress))
    return torch.stack(rows) if rows else torch.empty(0, len(prompts))


def _score_in_chunks(scorer: Scorer, prompts, responses, finished, progress) -> torch.Tensor:
    parts = []
    for start in range(0, len(prompts), SCORING_CHUNK):
        part = slice(start, start + SCORING_CHUNK)
        with torch.no_grad():
            values = torch.as_tensor(scorer(prompts[part], responses[part], None if finished is None else finished[part]),
                                     dtype=torch.float32).cpu()
        count = len(prompts[part])
        if values.dim() == 2 and values.shape[1] == 1:  # a column of scores
            values = values[:, 0]
        if values.shape != (count,):  # the right count in another shape would pair scores with wrong responses
            raise ValueError(f"scorer {scorer.name!r} returned scores of shape {tuple(values.shape)} for "
                             f"{count} responses; expected ({count},)")
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).nonzero()[0])
            raise FloatingPointError(f"scorer {scorer.name!r} returned {values[bad].item()} for response {start + bad}")
        parts.append(values)
        progress.update(count)
    return torch.cat(parts) if parts else torch.empty(0)


class ScoreNormalizer(torch.nn.Module):
    """safe-rlhf's score normaliser: buffers `mean` and `var` of shape [score_dim] and `count` [1] (saved in the state
    dict as `normalizer.*`), applied by score type: reward (x - mean) / (std + 1e-8), cost x / (std + 1e-8), critic x."""

    FUNCTIONS = {"reward": "affine", "cost": "scale", "critic": "identity"}

    def __init__(self, config):
        super().__init__()
        score_dim = getattr(config, "score_dim", 1)
        self.score_type = getattr(config, "score_type", "reward")
        if self.score_type not in self.FUNCTIONS:
            raise ValueError(f"config.score_type={self.score_type!r} is not one of {', '.join(self.FUNCTIONS)}")
        self.register_buffer("mean", self._statistic(config, "mean", score_dim, 0.0))
        self.register_buffer("var", self._statistic(config, "var", score_dim, 1.0))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    @staticmethod
    def _statistic(config, key: str, score_dim: int, default: float) -> torch.Tensor:
        """The config's statistic as safe-rlhf writes it (`normalizer.mean.tolist()`: a list of score_dim floats)."""
        value = getattr(config, key, None)
        if value is None:
            return torch.full((score_dim,), default)
        tensor = torch.as_tensor(value, dtype=torch.float32)
        if tensor.shape != (score_dim,):
            raise ValueError(f"config.{key}={value!r} has shape {tuple(tensor.shape)}; safe-rlhf writes a list of "
                             f"score_dim={score_dim} values")
        return tensor

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        function = self.FUNCTIONS[self.score_type]
        if function == "identity":
            return scores
        std = self.var.sqrt() + 1e-8
        return (scores - self.mean) / std if function == "affine" else scores / std


class LlamaForScore(LlamaPreTrainedModel):
    """safe-rlhf's score model, rebuilt on plain transformers: a Llama backbone (`model.`), a linear `score_head`
    (hidden_size -> score_dim, bias when score_bias) and the `normalizer` buffers. Loads beaver-7b-v1.0-reward / -cost
    with `from_pretrained`; as in safe-rlhf, the normaliser buffers of the state dict win over the config's lists."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.score_head = torch.nn.Linear(config.hidden_size, getattr(config, "score_dim", 1),
                                          bias=getattr(config, "score_bias", True))
        self.normalizer = ScoreNormalizer(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, ScoreNormalizer):  # a checkpoint without normaliser buffers: the config's statistics
            fresh = ScoreNormalizer(self.config)
            for name in ("mean", "var", "count"):
                getattr(module, name).copy_(getattr(fresh, name))
            return
        super()._init_weights(module)

    def forward(self, input_ids, attention_mask):
        """Per-token scores [B, T, score_dim] in float32, before normalisation (as safe-rlhf's get_scores)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.score_head(hidden).float()

    def end_scores(self, input_ids, attention_mask) -> torch.Tensor:
        """The sequence score: the per-token score at the last position whose attention mask is 1, [B, score_dim]
        (either padding side), normalised like safe-rlhf when the config says do_normalize."""
        scores = self(input_ids, attention_mask)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.bool() * positions).max(dim=1).values
        end = scores[torch.arange(scores.shape[0], device=scores.device), last]
        return self.normalizer(end) if getattr(self.config, "do_normalize", False) else end


class ModelScorer:
    """A scorer backed by a transformers checkpoint: formats each pair with the scorer's template, tokenizes with
    the scorer's own tokenizer (EOS appended by `append_eos`, right padding), scores in batches under no_grad on the
    scorer's device."""

    def __init__(self, name: str, cfg: ScorerConfig):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name, self.cfg = name, cfg
        self.device = resolve_device(cfg.device)
        gguf = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        self.tokenizer = load_pretrained(AutoTokenizer, cfg.name_or_path, f"scorers.{name}", revision=cfg.revision,
                                         trust_remote_code=cfg.trust_remote_code, **gguf)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model_class = LlamaForScore if cfg.kind == "score_model" else AutoModelForSequenceClassification
        self.model = load_pretrained(model_class, cfg.name_or_path, f"scorers.{name}", revision=cfg.revision,
                                     dtype=resolve_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code,
                                     **gguf, **cfg.from_pretrained_kwargs)
        self.model.to(self.device).eval().requires_grad_(False)
        if cfg.kind == "score_model" and not cfg.normalize:
            self.model.config.do_normalize = False
        if cfg.kind == "sequence_classifier" and self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id  # the head finds the last token through it
        self.index = self._score_index()
        self.append_eos = cfg.append_eos or ("finished" if cfg.kind == "score_model" else "never")
        if self.append_eos != "never":
            if self.tokenizer.eos_token_id is None:
                raise ValueError(f"scorers.{name}.append_eos={self.append_eos}: the tokenizer has no EOS token")
            if cfg.kind == "sequence_classifier" and self.tokenizer.eos_token_id == self.model.config.pad_token_id:
                raise ValueError(f"scorers.{name}.append_eos={self.append_eos}: EOS is the classifier's pad token, "
                                 "so it would read the token before it; use append_eos=never")

    def _score_index(self) -> int:
        """Which output to read: the classifier's label (by name or index) or the score model's dimension."""
        if self.cfg.kind == "score_model":
            count, names = getattr(self.model.config, "score_dim", 1), {}
        else:
            count = self.model.config.num_labels
            names = {str(k): int(v) for k, v in (self.model.config.label2id or {}).items()}
        label = self.cfg.label
        if label is None:
            if count != 1:
                listed = ", ".join(names) if names else f"0..{count - 1}"
                raise ValueError(f"scorers.{self.name}: the model has {count} outputs ({listed}); set scorers.{self.name}.label")
            return 0
        if str(label) in names:
            return names[str(label)]
        if str(label).isdigit() and int(label) < count:
            return int(label)
        raise ValueError(f"scorers.{self.name}.label={label!r} is not one of the model's outputs: "
                         f"{', '.join(names) if names else list(range(count))}")

    def encode(self, prompts, responses, finished=None) -> list[list[int]]:
        """Token ids of each formatted pair, EOS appended where the rule says, cut from the left to max_length."""
        texts = [self.cfg.template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        encoded = self.tokenizer(texts)["input_ids"]
        if finished is None:
            finished = [True] * len(texts)
        eos = self.tokenizer.eos_token_id
        add = {"always": [True] * len(texts), "never": [False] * len(texts), "finished": list(finished)}[self.append_eos]
        return [(ids + [eos] if with_eos else ids)[-self.cfg.max_length:] for ids, with_eos in zip(encoded, add)]

    @torch.no_grad()
    def __call__(self, prompts, responses, finished=None) -> torch.Tensor:
        encoded = self.encode(prompts, responses, finished)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch: less padding
        out = torch.empty(len(encoded))
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.cfg.batch_size):
            chunk = order[start : start + self.cfg.batch_size]
            width = max(len(encoded[i]) for i in chunk)
            input_ids = torch.tensor([encoded[i] + [pad] * (width - len(encoded[i])) for i in chunk], device=self.device)
            attention_mask = torch.tensor([[1] * len(encoded[i]) + [0] * (width - len(encoded[i])) for i in chunk],
                                          device=self.device)
            if self.cfg.kind == "score_model":
                values = self.model.end_scores(input_ids, attention_mask)[:, self.index]
            else:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
                if self.cfg.output == "probability":
                    logits = logits.softmax(-1)
                values = logits[:, self.index]
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

    def __call__(self, prompts, responses, finished=None):
        return torch.as_tensor(self.fn(list(prompts), list(responses)), dtype=torch.float32)


def build_scorer(name: str, cfg: ScorerConfig) -> Scorer:
    if cfg.kind == "callable":
        return CallableScorer(name, cfg)
    return ModelScorer(name, cfg)


def response_length(prompts: Sequence[str], responses: Sequence[str], unit: str = "words") -> list[float]:
    """A ready callable scorer: response length in words or characters (for verbosity constraints)."""
    return [float(len(r.split()) if unit == "words" else len(r)) for r in responses]


class ScorerSet:
    """The scorers a run uses, each loaded once, and the one place a constraint's negation is applied: `raw` by name
    (as the scorers and the caches see them), `assembled` [reward, utility_1, ...] (a utility being the scorer or
    its negation). `available`: scorers the task has already (the exact task's tables)."""

    def __init__(self, cfg, available: dict | None = None):
        available = dict(available or {})
        self.reward_name = cfg.reward.scorer
        self.constraints = [(c.scorer, c.negate) for c in cfg.constraints.values()]
        used = [self.reward_name] + [name for name, _ in self.constraints]
        self.raw = {name: available[name] if name in available else build_scorer(name, cfg.scorers[name])
                    for name in dict.fromkeys(used)}
        self.assembled = [self.raw[self.reward_name]] + [Negated(self.raw[name]) if negate else self.raw[name]
                                                         for name, negate in self.constraints]

    def assemble(self, raw_scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """[1 + m, n]: the reward, then every constraint's utility, from raw scorer outputs by name."""
        rows = [raw_scores[self.reward_name]]
        rows += [-raw_scores[name] if negate else raw_scores[name] for name, negate in self.constraints]
        return torch.stack(rows)

    def score_rollouts(self, rollouts) -> torch.Tensor:
        """[1 + m, n] for rollouts (the sampler's call: a scorer set that reads token ids, not text, can too)."""
        return self(rollouts.prompts, rollouts.responses, rollouts.finished)

    def __call__(self, prompts, responses, finished=None) -> torch.Tensor:
        return score_all(self.assembled, prompts, responses, finished)
