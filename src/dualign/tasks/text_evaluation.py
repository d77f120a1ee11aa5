"""Evaluation on a text task's test split: responses of pi_ref and of a policy to every test prompt, scored by every
scorer; means with 95% confidence intervals, improvements over pi_ref, whether each constraint is met, win rates
against pi_ref by each score model, and a sample estimate of KL(pi || pi_ref)."""
from __future__ import annotations

from dataclasses import asdict

import torch

from dualign.tasks.base import thresholds
from dualign.tasks.text_cache import scored_rollouts
from dualign.training.data import sequence_logprobs, tokenized
from dualign.util import distributed, seeds
from dualign.util.metrics import mean_ci


class TextEvaluator:
    """Scores pi_ref once (cached rollouts on the test prompts), then any policy against it. threshold: the b of each
    constraint (None: the configured improvement, or an absolute level minus pi_ref's mean on the test split)."""

    name = "eval"
    optimum = None  # not known on a text task

    def __init__(self, task, reference, sampler, threshold: torch.Tensor | None = None):
        cfg = task.cfg
        self.task, self.cfg, self.reference_model, self.sampler = task, cfg, reference, sampler
        self.prompt_set = task.test
        self.P, self.K = len(self.prompt_set.prompts), cfg.evaluation.samples_per_prompt
        self.names = list(cfg.constraints)
        self.labels = ["reward"] + self.names
        self.seed = seeds.seed("evaluation", cfg.seed)
        key = {"task": task.cache_key(), "split": "test", "samples": self.K, "seed": self.seed,
               "generation": asdict(cfg.generation)}
        self.reference_rollouts, self.reference_scores = scored_rollouts(
            cfg, sampler.scorers, "rollouts", key, lambda: sampler.sample(
                reference, self.prompt_set, range(self.P), self.K, self.seed, score=False)[0], self.P * self.K)
        self.reference_mean = self.reference_scores[1:].view(-1, self.P, self.K).mean(dim=(1, 2))
        self.threshold = (thresholds(cfg, self.reference_mean) if threshold is None else threshold).tolist()
        reward = self.reference_scores[0].view(self.P, self.K)
        self.reference = {"objective": reward.double().mean().item(), "reward": reward.double().mean().item(),
                          "kl": 0.0, "improvement": [0.0] * len(self.names)}

    def __call__(self, policy) -> dict:
        """Test prompts sharded over ranks (each rank generates and scores its share), gathered on every rank."""
        P, K = self.P, self.K
        mine = distributed.shard(list(range(P)))
        if mine:
            seed = seeds.seed("evaluation", self.cfg.seed, step=1, rank=distributed.rank())
            rollouts, scores = self.sampler.sample(policy, self.prompt_set, mine, K, seed)
            part = (mine, scores.view(-1, len(mine), K), self._kl(policy, rollouts).view(len(mine), K), rollouts.responses)
        else:
            part = None
        order, score_parts, kl_parts, responses = [], [], [], {}
        for piece in distributed.gather(part):
            if piece is not None:
                order += piece[0]
                score_parts.append(piece[1])
                kl_parts.append(piece[2])
                responses.update({p: piece[3][i * K:(i + 1) * K] for i, p in enumerate(piece[0])})
        back = torch.argsort(torch.tensor(order))  # prompt order again
        return self._summarise(torch.cat(score_parts, dim=1)[:, back], torch.cat(kl_parts)[back], responses)

    def _summarise(self, current: torch.Tensor, kl: torch.Tensor, responses: dict) -> dict:
        P, K = self.P, self.K
        reference = self.reference_scores.view(-1, P, K)
        result = {"prompts": P, "samples_per_prompt": K, "scores": {}, "constraints": {}}
        for j, label in enumerate(self.labels):
            wins = (current[j] > reference[j]).double() + 0.5 * (current[j] == reference[j]).double()
            entry = {}
            for key, values in (("reference", reference[j]), ("policy", current[j]),
                                ("improvement", current[j] - reference[j]), ("win_rate", wins)):
                entry[key], entry[f"{key}_ci"] = mean_ci(values)
            result["scores"][label] = entry
        for i, name in enumerate(self.names):
            entry, threshold = result["scores"][name], self.threshold[i]
            result["constraints"][name] = {
                "threshold": threshold, "improvement": entry["improvement"],
                "satisfied": entry["improvement"] >= threshold,
                "satisfied_at_95": entry["improvement"] - entry["improvement_ci"] >= threshold,  # CI's lower end
            }
        reward = result["scores"]["reward"]
        result["reward"], result["reward_ci"] = reward["policy"], reward["policy_ci"]
        result["improvement"] = [result["scores"][n]["improvement"] for n in self.names]
        result["improvement_ci"] = [result["scores"][n]["improvement_ci"] for n in self.names]
        result["kl"], result["kl_ci"] = mean_ci(kl)
        result["objective"] = reward["policy"] - self.cfg.beta * result["kl"]
        result["samples"] = [
            {"prompt": self.prompt_set.prompts[p], "policy_response": responses[p][0],
             "reference_response": self.reference_rollouts.responses[p * K],
             **{f"policy/{label}": current[j, p, 0].item() for j, label in enumerate(self.labels)},
             **{f"reference/{label}": reference[j, p, 0].item() for j, label in enumerate(self.labels)}}
            for p in range(P)  # the first response to every prompt
        ][: self.cfg.evaluation.samples_logged]
        result["_score_values"] = {"labels": self.labels, "reference": self.reference_scores.tolist(),
                                   "policy": current.reshape(len(self.labels), -1).tolist()}
        return result

    def _kl(self, policy, rollouts) -> torch.Tensor:
        """Per-response log pi(y|x) - log pi_ref(y|x) on the policy's own samples: their mean estimates KL(pi || pi_ref)."""
        tensors = tokenized(self.prompt_set.prompt_token_ids, rollouts, self.task.tokenizer.pad_token_id)
        batch = 2 * self.cfg.policy_step.batch_size
        was_training = policy.training
        policy.eval()
        logps = sequence_logprobs(policy, *tensors, batch_size=batch)
        policy.train(was_training)
        return logps - sequence_logprobs(self.reference_model, *tensors, batch_size=batch)
