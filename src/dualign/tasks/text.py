"""Text tasks: a preference dataset, a Hugging Face policy and model scorers (docs/method.md section 5).

`TextTask` gives the pipeline what the exact task gives it (prompts, their token ids, the tokenizer, the response
length), for the training and the test split. `build_text` loads everything and runs the rollout stage for pi_ref
(cached on disk by a hash of model, data, generation and scorers), the one-shot dual solve, and the DPO pairs
with reference log-probabilities computed once and cached.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from dualign.models.hf import PromptFormatter, fingerprint, load_policy, load_tokenizer, reference_for
from dualign.models.rollout import Rollouts, from_dataset, to_dataset
from dualign.models.scorers import Negated, build_scorer, score_all
from dualign.tasks.text_data import load_split
from dualign.training.data import sequence_logprobs, tokenized
from dualign.training.module import autocast_dtype
from dualign.util.cache import cached_folder

log = logging.getLogger("dualign")


class PromptSet:
    """Prompts as scorers read them (`prompts`) and as the policy reads them (`prompt_token_ids`)."""

    def __init__(self, examples, formatter: PromptFormatter):
        self.examples = examples
        self.prompts = [e.prompt for e in examples]
        self.prompt_token_ids = [formatter.prompt_ids(e) for e in examples]


class TextTask:
    def __init__(self, cfg):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model)
        self.formatter = PromptFormatter(self.tokenizer, cfg.model)
        self.train = PromptSet(load_split(cfg.data, cfg.data.train_split), self.formatter)
        self.test = PromptSet(load_split(cfg.data, cfg.data.test_split), self.formatter)
        self.prompts, self.prompt_token_ids = self.train.prompts, self.train.prompt_token_ids
        self.allowed_token_ids = None
        self.max_new_tokens, self.min_new_tokens = cfg.generation.max_new_tokens, 0
        self.policy_fingerprint = fingerprint(cfg.model.name_or_path, cfg.model.revision)
        # the examples themselves, not the path: a file rewritten in place (same rows or not) is other data
        content = [(e.prompt, e.messages, e.responses) for split in (self.train, self.test) for e in split.examples]
        self.data_digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def dataset_rollouts(self) -> Rollouts:
        """The dataset's own responses as rollouts of pi_ref (the paper's pairs: consecutive responses of a prompt)."""
        index, ids, prompts, responses = [], [], [], []
        for i, example in enumerate(self.train.examples):
            for response in example.responses:
                index.append(i)
                ids.append(self.formatter.response_ids(response, len(self.prompt_token_ids[i])))
                prompts.append(example.prompt)
                responses.append(response)
        # the dataset's answers are whole, whatever the policy's max_length keeps of them: scorers see them ended
        return Rollouts(torch.tensor(index), ids, prompts, responses, [True] * len(responses))

    def cache_key(self) -> dict:
        """What the rollouts and log-probabilities of pi_ref depend on, for cache keys."""
        model = asdict(self.cfg.model)
        return {"policy": self.policy_fingerprint, "data": asdict(self.cfg.data), "data_digest": self.data_digest,
                "tokenization": {k: model[k] for k in ("tokenizer", "prompt_template", "use_chat_template",
                                                       "max_prompt_length", "max_length", "dtype")}}


def source_digest(target: str) -> str:
    """sha256 of the file that defines a callable scorer (its package version where the source is not readable)."""
    from hydra.utils import get_object

    obj = get_object(target)
    try:
        return hashlib.sha256(Path(inspect.getsourcefile(obj)).read_bytes()).hexdigest()[:16]
    except (TypeError, OSError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"{target.split('.')[0]}=={version(target.split('.')[0])}"
        except PackageNotFoundError:
            return "unknown"


def scorer_key(cfg, names: list[str]) -> dict:
    """Cache key part for scores: each scorer's config and, for model scorers, its checkpoint's fingerprint."""
    key = {}
    for name in names:
        scorer = asdict(cfg.scorers[name])
        if scorer["name_or_path"]:
            scorer["fingerprint"] = fingerprint(scorer["name_or_path"], scorer["revision"])
        if scorer["kind"] == "callable":  # its code: an edited function is another scorer
            scorer["code"] = source_digest(scorer["_target_"])
        key[name] = {k: v for k, v in scorer.items() if k not in ("device", "batch_size")}  # no effect on scores
    return key


def load_scorers(cfg, available: dict | None = None) -> tuple[dict, list]:
    """Each configured scorer (`cfg.scorers`) that the run uses, loaded once, beside those the task already has
    (`available`: the exact task's tables): ({name: scorer}, [reward, utility_1, ...]), a utility being the scorer
    or its negation."""
    available = dict(available or {})
    used = [cfg.reward.scorer] + [c.scorer for c in cfg.constraints.values()]
    raw = {name: available[name] if name in available else build_scorer(name, cfg.scorers[name])
           for name in dict.fromkeys(used)}
    assembled = [raw[cfg.reward.scorer]] + [Negated(raw[c.scorer]) if c.negate else raw[c.scorer]
                                             for c in cfg.constraints.values()]
    return raw, assembled


def assemble(cfg, raw_scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """[1 + m, n]: the reward, then every constraint's utility (negated where configured), from raw scorer outputs."""
    rows = [raw_scores[cfg.reward.scorer]]
    rows += [-raw_scores[c.scorer] if c.negate else raw_scores[c.scorer] for c in cfg.constraints.values()]
    return torch.stack(rows)


def scored_rollouts(setup, kind: str, key: dict, generate, expected_rows: int) -> tuple[Rollouts, torch.Tensor]:
    """The rollout stage with its disk cache: generate() -> Rollouts, scored by every used scorer, stored as a
    dataset under paths.cache_dir/<kind>/<hash>. Returns the rollouts and their assembled scores [1 + m, n]."""
    cfg, names = setup.cfg, list(setup.raw_scorers)
    full_key = {**key, "scorers": scorer_key(cfg, names)}

    def build(folder: Path) -> None:
        rollouts = generate()
        raw = score_all([setup.raw_scorers[n] for n in names], rollouts.prompts, rollouts.responses, rollouts.finished)
        to_dataset(rollouts, raw, names).save_to_disk(str(folder / "rollouts"))

    def load(folder: Path):
        import datasets

        return from_dataset(datasets.load_from_disk(str(folder / "rollouts")), names, expected_rows)

    rollouts, raw = cached_folder(cfg.paths.cache_dir, kind, full_key, build, load)
    return rollouts, assemble(cfg, dict(zip(names, raw)))


def reference_logps(setup, rollouts: Rollouts, prompt_ids, key: dict) -> torch.Tensor:
    """log pi_ref(y|x) summed over response tokens, computed once per dataset and reference, cached on disk."""
    task = setup.task
    precision = autocast_dtype(setup.cfg.trainer.precision)  # as the policy's log-probs are taken in training
    full_key = {**key, "reference": task.cache_key(), "rows": len(rollouts.response_ids), "autocast": str(precision)}

    def build(folder: Path) -> None:
        input_ids, attention_mask, response_mask = tokenized(prompt_ids, rollouts, task.tokenizer.pad_token_id)
        from dualign.util.timing import stage

        with stage("reference log-probs"):
            values = sequence_logprobs(setup.reference, input_ids, attention_mask, response_mask,
                                       batch_size=2 * setup.cfg.policy_step.batch_size, autocast_dtype=precision)
        torch.save(values, folder / "ref_logps.pt")

    def load(folder: Path) -> torch.Tensor:
        values = torch.load(folder / "ref_logps.pt", weights_only=True)
        if values.shape != (len(rollouts.response_ids),) or not torch.isfinite(values).all():
            raise ValueError(f"cached reference log-probs have shape {tuple(values.shape)}")
        return values

    return cached_folder(setup.cfg.paths.cache_dir, "reference_logps", full_key, build, load)


def build_text(setup) -> None:
    """Fill `setup` for a text task (see pipeline.build for the exact task)."""
    from dualign.run import one_shot_multipliers

    cfg = setup.cfg
    task = TextTask(cfg)
    setup.task = task
    P = len(task.prompts)
    if cfg.algorithm.dual_prompts > P:
        from dualign.config import ConfigError

        raise ConfigError(f"algorithm.dual_prompts={cfg.algorithm.dual_prompts} exceeds the {P} training prompts")
    setup.policy = load_policy(cfg.model)
    setup.reference = reference_for(setup.policy, cfg.model)
    setup.raw_scorers, setup.scorers = load_scorers(cfg)
    setup.names = list(cfg.constraints)

    # the rollout stage for pi_ref: E_ref[g] and the one-shot plug-in dual (and DPO pairs with pairs_from=reference)
    count = min(P, cfg.reference.prompts or P)
    generator = torch.Generator().manual_seed(10_000 + cfg.seed)
    setup.reference_prompts = sorted(torch.randperm(P, generator=generator)[:count].tolist())
    samples = cfg.reference.samples_per_prompt
    key = {"task": task.cache_key(), "prompts": setup.reference_prompts, "samples": samples, "seed": cfg.seed,
           "generation": asdict(cfg.generation), "split": "train"}
    rollouts, scores = scored_rollouts(
        setup, "rollouts", key,
        lambda: setup.sample_and_score(setup.reference, setup.reference_prompts, samples, cfg.seed, score=False)[0],
        count * samples)
    reward = scores[0].view(count, samples)
    utility = scores[1:].view(len(setup.names), count, samples)
    setup.reference_mean = utility.mean(dim=(1, 2))
    setup.threshold = setup.thresholds(setup.reference_mean)
    setup.one_shot = one_shot_multipliers(cfg, reward, utility, setup.reference_mean, setup.threshold)
    log.info("pi_ref: E_ref[g] = %s from %d prompts x %d responses; one-shot lambda = %s",
             [round(v, 4) for v in setup.reference_mean.tolist()], count, samples,
             [round(v, 4) for v in setup.one_shot.tolist()])

    if cfg.policy_step.name == "dpo":
        if cfg.policy_step.pairs_from == "dataset":
            pair_rollouts = task.dataset_rollouts()
            pair_key = {"task": task.cache_key(), "source": "dataset"}
            _, pair_scores = scored_rollouts(setup, "dataset_scores", pair_key, lambda: pair_rollouts,
                                             len(pair_rollouts.response_ids))
        else:  # pi_ref rollouts (pairs_from=policy: iteration 0 trains on these too)
            pair_rollouts, pair_scores, pair_key = rollouts, scores, key
        setup.pairs = setup.pairs_with_reference(pair_rollouts, pair_scores, pair_key)
