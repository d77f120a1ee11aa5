"""Text tasks: a preference dataset, a Hugging Face policy and model scorers (docs/method.md section 5).

`TextTask.prepare` loads the policy (pi_ref is it with adapters off, or a frozen copy), the scorers, runs the
rollout stage for pi_ref (cached on disk by a hash of model, data, generation and scorers), the one-shot dual solve,
and the DPO pairs with reference log-probabilities computed once and cached. Policies are evaluated on the test
split (tasks/text_evaluation.py).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dualign.config import spec
from dualign.errors import ConfigError, DataError
from dualign.models.hf import (
    PromptFormatter,
    fingerprint,
    load_policy,
    load_tokenizer,
    materialize,
    reference_for,
    save_policy,
    scale_adapters,
    with_adapters,
)
from dualign.models.rollout import Rollouts
from dualign.models.sampling import Sampler
from dualign.models.scorers import ScorerSet
from dualign.tasks.base import ReferenceStage, interpolated_weights, reference_statistics
from dualign.tasks.text_cache import reference_logps, scored_rollouts
from dualign.tasks.text_data import load_split
from dualign.tasks.text_evaluation import TextEvaluator
from dualign.training.context import RunContext
from dualign.training.data import policy_step_data, preference_pairs
from dualign.training.module import autocast_dtype
from dualign.util import seeds

log = logging.getLogger("dualign")


class PromptSet:
    """Prompts as scorers read them (`prompts`) and as the policy reads them (`prompt_token_ids`)."""

    def __init__(self, examples, formatter: PromptFormatter):
        self.examples = examples
        self.prompts = [e.prompt for e in examples]
        self.prompt_token_ids = [formatter.prompt_ids(e) for e in examples]


class TextTask:
    def __init__(self, cfg):
        cfg = replace(cfg, model=materialize(cfg.model, cfg.paths.cache_dir))  # a GGUF file: its cached plain copy
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model)
        self.formatter = PromptFormatter(self.tokenizer, cfg.model)
        self.train = PromptSet(load_split(cfg.data, cfg.data.train_split), self.formatter)
        self.test = PromptSet(load_split(cfg.data, cfg.data.test_split), self.formatter)
        self.prompts, self.prompt_token_ids = self.train.prompts, self.train.prompt_token_ids
        self.evaluation_prompts = self.test
        self.group_logprobs = None  # a forward pass over every response (prompts are not shared in the cache)
        self.allowed_token_ids = None
        self.max_new_tokens, self.min_new_tokens = cfg.generation.max_new_tokens, 0
        self.description = f"{cfg.data.kind} ({len(self.test.prompts)} test prompts)"
        self.evaluates_every_iteration = cfg.evaluation.every_iteration  # it costs rollouts of pi and pi_ref
        self.logprob_batch_size = 2 * cfg.policy_step.batch_size  # no gradients: twice the training micro-batch
        self.policy_fingerprint = fingerprint(cfg.model.name_or_path, cfg.model.revision)
        # the examples themselves, not the path: a file rewritten in place (same rows or not) is other data
        content = [(e.prompt, e.messages, e.responses) for split in (self.train, self.test) for e in split.examples]
        self.data_digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self._loaded_policy = None

    def cache_key(self) -> dict:
        """What the rollouts and log-probabilities of pi_ref depend on, for cache keys."""
        model = asdict(self.cfg.model)
        return {"policy": self.policy_fingerprint, "data": asdict(self.cfg.data), "data_digest": self.data_digest,
                "tokenization": {k: model[k] for k in ("tokenizer", "prompt_template", "use_chat_template",
                                                       "max_prompt_length", "max_length", "dtype")}}

    def sampler(self, scorers: ScorerSet, reference) -> Sampler:
        return Sampler(self.cfg.generation, self.tokenizer, self.max_new_tokens, self.min_new_tokens, None, scorers,
                       vllm_settings=self.cfg, reference=reference)

    def reference_stage(self) -> ReferenceStage:
        cfg, P = self.cfg, len(self.prompts)
        self._loaded_policy = load_policy(cfg.model)
        reference = reference_for(self._loaded_policy, cfg.model)
        scorers = ScorerSet(cfg)
        sampler = self.sampler(scorers, reference)
        # the rollout stage for pi_ref: E_ref[g] and the one-shot plug-in dual (and DPO pairs with pairs_from=reference)
        count = min(P, cfg.reference.prompts or P)
        generator = torch.Generator().manual_seed(seeds.seed("reference_prompts", cfg.seed))
        prompts = tuple(sorted(torch.randperm(P, generator=generator)[:count].tolist()))
        samples = cfg.reference.samples_per_prompt
        key = {"task": self.cache_key(), "prompts": list(prompts), "samples": samples, "seed": cfg.seed,
               "generation": asdict(cfg.generation), "split": "train"}
        rollouts, scores = scored_rollouts(
            cfg, scorers, "rollouts", key,
            lambda: sampler.sample(reference, self, prompts, samples, cfg.seed, score=False)[0], count * samples)
        return ReferenceStage(reference, scorers, sampler, prompts, samples, rollouts, scores, key)

    def enumeration(self, stage: ReferenceStage) -> None:
        return None  # open-ended text: responses cannot be enumerated

    def prepare(self) -> RunContext:
        cfg, P = self.cfg, len(self.prompts)
        if cfg.algorithm.dual_prompts > P:
            raise ConfigError(f"algorithm.dual_prompts={cfg.algorithm.dual_prompts} exceeds the {P} training prompts")
        stage = self.reference_stage()
        reference, scorers, sampler, prompts, rollouts = (stage.reference, stage.scorers, stage.sampler, stage.prompts,
                                                          stage.rollouts)
        reference_mean, threshold, one_shot = reference_statistics(cfg, stage)
        one_shot_text = str([round(v, 4) for v in one_shot.tolist()])
        if spec(cfg.algorithm.name).preference_labels:  # PeCAID's b is not in the scorers' units
            one_shot_text = "solved on the implicit scores after pre-alignment"
        log.info("pi_ref: E_ref[g] = %s from %d prompts x %d responses; one-shot lambda = %s",
                 [round(v, 4) for v in reference_mean.tolist()], len(prompts), stage.samples, one_shot_text)
        context = RunContext(cfg, self, reference, scorers, sampler, prompts, reference_mean, threshold, one_shot,
                             pairs=None, rollouts=rollouts, scores=stage.scores, reference_rollouts=rollouts,
                             reference_scores=stage.scores)
        if cfg.policy_step.name != "dpo":
            return context
        if cfg.policy_step.pairs_from == "dataset":
            pair_rollouts, key = self.dataset_rollouts(), {"task": self.cache_key(), "source": "dataset"}
            _, scores = scored_rollouts(cfg, scorers, "dataset_scores", key, lambda: pair_rollouts,
                                        len(pair_rollouts.response_ids))
        else:  # pi_ref's rollouts (pairs_from=policy: iteration 0 trains on these too)
            pair_rollouts, scores, key = rollouts, stage.scores, stage.cache_key
        return replace(context, pairs=self.pairs(context, pair_rollouts, scores, key), rollouts=pair_rollouts,
                       scores=scores)

    def dataset_rollouts(self) -> Rollouts:
        """The dataset's own responses as rollouts of pi_ref (the paper's pairs: consecutive responses of a prompt)."""
        if not any(example.responses for example in self.train.examples):
            raise DataError(f"policy_step.pairs_from=dataset pairs the dataset's responses, but data.path="
                            f"{self.cfg.data.path} has none (prompt-only); use policy_step.pairs_from=reference")
        index, ids, prompts, responses = [], [], [], []
        for i, example in enumerate(self.train.examples):
            for response in example.responses:
                index.append(i)
                ids.append(self.formatter.response_ids(response, len(self.prompt_token_ids[i])))
                prompts.append(example.prompt)
                responses.append(response)
        # the dataset's answers are whole, whatever the policy's max_length keeps of them: scorers see them ended
        return Rollouts(torch.tensor(index), ids, prompts, responses, [True] * len(responses))

    def pairs(self, context: RunContext, rollouts, scores: torch.Tensor, cache_key: dict | None = None):
        """DPO pairs with reference log-probabilities, cached on disk under cache_key (None: computed here)."""
        cfg = context.cfg  # a stage of a stepwise or preference run pairs with its own policy-step settings
        ref_logps = None if cache_key is None else reference_logps(cfg, self, context.reference, rollouts, cache_key)
        return policy_step_data(cfg.policy_step, self.prompt_token_ids, rollouts, scores, context.reference,
                                self.tokenizer.pad_token_id, cfg.algorithm.iterations, cfg.seed, None, ref_logps=ref_logps,
                                batch_size=self.logprob_batch_size,
                                autocast_dtype=autocast_dtype(cfg.trainer.precision))

    def preference_stage(self, context: RunContext, objective: int) -> tuple[RunContext, dict]:
        """PeCAID's pre-alignment of objective `objective` (0: the reward): DPO on the dataset's two responses a
        prompt, each pair labelled by that objective's column (data.preference_columns: PKU-SafeRLHF's
        better_response_id for the reward, safer_response_id for safety)."""
        cfg = context.cfg
        name = ["reward", *context.names][objective]
        column = cfg.data.preference_columns[name]  # validation checked every objective has one
        examples = [e for e in self.train.examples if e.responses]
        if not examples:
            raise DataError(f"algorithm.name={cfg.algorithm.name} learns from the dataset's labelled pairs, but data.path="
                            f"{cfg.data.path} has no responses (prompt-only)")
        unlabelled = [i for i, e in enumerate(examples) if column not in e.labels]
        if unlabelled:
            raise DataError(f"data.preference_columns.{name}={column!r}: training row {unlabelled[0]} has no such "
                            f"column (labels found: {', '.join(sorted(examples[unlabelled[0]].labels)) or 'none'})")
        rollouts, labels = self.dataset_rollouts(), torch.tensor([e.labels[column] for e in examples])
        policy_step = replace(cfg.policy_step, pairs="consecutive", labels="hard", pairs_from="dataset")
        stage = replace(context, cfg=replace(cfg, policy_step=policy_step))
        cache_key = {"task": self.cache_key(), "source": "dataset"}  # the same reference log-probs as pairs_from=dataset
        ref_logps = reference_logps(cfg, self, context.reference, rollouts, cache_key)
        scores = torch.zeros(1 + len(context.names), len(rollouts.response_ids))  # unread: the labels are given
        pairs = preference_pairs(self.prompt_token_ids, rollouts, scores, context.reference, self.tokenizer.pad_token_id,
                                 1, cfg.seed, ref_logps=ref_logps, labels=labels)
        log.info("PeCAID: %s labels from column %r: response 1 preferred in %d of %d pairs", name, column,
                 int(labels.sum()), len(labels))
        key = {"labels": column, "label_digest": hashlib.sha256(bytes(labels.tolist())).hexdigest()[:16],
               "task": self.cache_key(), "policy_step": repr(policy_step)}
        return replace(stage, pairs=pairs), key

    def new_policy(self, context: RunContext) -> torch.nn.Module:
        """The loaded policy first (with LoRA, pi_ref is that network with adapters off), then fresh loads (the
        one-shot comparison trains its own)."""
        if self._loaded_policy is not None:
            policy, self._loaded_policy = self._loaded_policy, None
            return policy
        return load_policy(self.cfg.model)

    def continue_from(self, context: RunContext, policy: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """With LoRA: the trained adapters folded into a copy of the base weights (the first policy's base IS pi_ref,
        seen with adapters off, so it must not change), fresh adapters on top; the reference is that network with its
        adapters off. Without: the policy trains on, beside a frozen copy."""
        model = self.cfg.model
        if model.lora.enabled:
            continued = with_adapters(copy.deepcopy(policy).merge_and_unload(), model)
            return continued, reference_for(continued, model)
        return policy, copy.deepcopy(policy).eval().requires_grad_(False)

    def interpolate(self, start: torch.nn.Module, end: torch.nn.Module, weight: float) -> torch.nn.Module:
        if self.cfg.model.lora.enabled:  # end = start's weights + fresh adapters (continue_from): scale the adapters
            scale_adapters(end, weight)
            return end.eval()
        end.load_state_dict(interpolated_weights(start, end, weight))
        return end.eval()

    def evaluator(self, context: RunContext) -> TextEvaluator:
        return TextEvaluator(self, context.reference, context.sampler, context.threshold)

    def save(self, context: RunContext, policy: torch.nn.Module, output_dir: Path) -> tuple[list[Path], dict]:
        saved = save_policy(policy, self.tokenizer, output_dir / "policy")
        print(f"policy saved to {saved} (save_pretrained; load with transformers/peft)")
        return [], {"policy": str(saved)}
