"""Policy steps: losses whose minimiser is argmax_theta L(pi_theta, lambda) (docs/method.md section 4). Pure torch.

Each is called as step(policy, batch, multipliers, iteration, global_step) -> (loss, metrics). A step that samples
on-policy reports metrics["constraint_stats"] = (utility sums [m], count) for step-triggered dual updates.
"""
from __future__ import annotations

import torch

from dualign.core.dpo import (
    all_pairs_loss,
    dpo_loss,
    dpo_metrics,
    group_metrics,
    listwise_loss,
    preference_probability,
    response_logprobs,
    row_logprobs,
)
from dualign.core.duality import composite_reward
from dualign.util import seeds


class DPOStep:
    """DPO on pseudo-preferences p = sigmoid(r_lambda(y1) - r_lambda(y0)) with fixed reference log-probabilities.

    Batches carry input_ids, attention_mask and response_mask [B, 2, T], ref_logps [B, 2], reward [B, 2],
    utility [B, m, 2] and label_uniform [B, T_iterations] (hard labels: y1 wins when u < p, with a fresh u per
    iteration, so labels are re-drawn for every lambda yet a resumed run draws the same ones). Batches with a `label`
    [B] column (a dataset's own preferences: PeCAID's pre-alignment) learn those instead, whatever the scores.
    """

    def __init__(self, beta: float, labels: str = "soft", allowed_token_ids: torch.Tensor | None = None):
        self.beta, self.labels, self.allowed_token_ids = beta, labels, allowed_token_ids

    def __call__(self, policy, batch, multipliers, iteration, global_step=0):
        width = int(batch["attention_mask"].sum(-1).max())  # pairs are right-padded to the dataset's longest row
        input_ids = batch["input_ids"][..., :width]
        pairs = input_ids.shape[0]
        flat = lambda t: t[..., :width].reshape(2 * pairs, width)  # noqa: E731
        logits = policy(input_ids=flat(input_ids), attention_mask=flat(batch["attention_mask"])).logits
        logps = response_logprobs(logits, flat(input_ids), flat(batch["response_mask"]), self.allowed_token_ids)
        logps = logps.view(pairs, 2)
        log_ratio = logps - batch["ref_logps"]
        preference = preference_probability(batch["reward"], batch["utility"], multipliers)
        if "label" in batch:
            preference = batch["label"].to(preference.dtype)
        elif self.labels == "hard":
            preference = (batch["label_uniform"][:, iteration] < preference).to(preference.dtype)
        loss = dpo_loss(log_ratio[:, 1] - log_ratio[:, 0], preference, self.beta).mean()
        return loss, dpo_metrics(log_ratio.detach(), logps.detach(), preference, self.beta)


class GroupDPOStep:
    """The pseudo-preference objective over every pair of a group's samples (`all`), or the listwise cross-entropy
    between softmax(r_lambda / beta) and softmax(log pi/pi_ref) over them (`listwise`).

    Batches carry input_ids, attention_mask and response_mask [G, K, T], ref_logps, reward and count [G, K], utility
    [G, m, K] and group_index [G]: the distinct responses of each group with the number of samples each stands for
    (count 0: an empty slot, which gets no forward pass). The K log-ratios come from K sequences, the K x K margins
    and labels from them at no further model cost. Hard labels (all pairs): the fraction of Binomial(c_i c_j, p_ij)
    wins of i over j, from a seed of (run seed, iteration, group), so they are re-drawn for every lambda yet a resumed
    run draws the same.
    """

    def __init__(self, beta: float, objective: str = "all", labels: str = "soft",
                 allowed_token_ids: torch.Tensor | None = None, seed: int = 0, group_logprobs=None):
        self.beta, self.objective, self.labels, self.allowed_token_ids, self.seed = beta, objective, labels, allowed_token_ids, seed
        self.group_logprobs = group_logprobs  # the task's cheaper log pi(y|x) of rows sharing prefixes, if it has one

    def __call__(self, policy, batch, multipliers, iteration, global_step=0):
        count = batch["count"]
        filled = count.reshape(-1) > 0
        width = int(batch["attention_mask"].sum(-1).max())  # right-padded to the dataset's longest row
        rows = lambda t: t[..., :width].reshape(-1, width)[filled]  # noqa: E731
        input_ids = rows(batch["input_ids"])
        logps = row_logprobs(policy, input_ids, rows(batch["attention_mask"]), rows(batch["response_mask"]),
                             self.allowed_token_ids, self.group_logprobs)
        logps = torch.zeros(count.numel(), dtype=logps.dtype, device=logps.device).masked_scatter(filled, logps)
        log_ratio = logps.view(count.shape) - batch["ref_logps"]
        composite = composite_reward(batch["reward"], batch["utility"].movedim(1, 0), multipliers.float())
        if self.objective == "listwise":
            loss = listwise_loss(log_ratio, composite, self.beta, count)
        else:
            labels = self._hard_labels(batch, composite, iteration)
            loss = all_pairs_loss(log_ratio, composite, self.beta, count, labels)
        return loss.mean(), group_metrics(log_ratio.detach(), composite, self.beta, count)

    def _hard_labels(self, batch, composite, iteration):
        if self.labels != "hard":
            return None
        count = batch["count"].to(composite.dtype).cpu()
        pairs = count.unsqueeze(2) * count.unsqueeze(1)
        probability = torch.sigmoid(composite.unsqueeze(2) - composite.unsqueeze(1)).detach().cpu()
        wins = torch.stack([torch.binomial(pairs[i], probability[i], generator=torch.Generator().manual_seed(
            seeds.seed("group_labels", self.seed, iteration * 1_000_000 + int(g))))
            for i, g in enumerate(batch["group_index"].tolist())])
        return (wins / pairs.clamp(min=1)).to(composite.device)


class ExactStep:
    """Gradient ascent on the enumerated Lagrangian E_pi[r + lambda . g] - beta KL(pi || pi_ref), per prompt batch.

    No sampling: isolates the parametrisation gap from sampling and optimisation error. Needs a task that can
    enumerate log pi(y|x) for every response: `logprobs(policy, prompt_index)` -> [prompts, N].
    """

    def __init__(self, logprobs, beta: float, reward: torch.Tensor, utility: torch.Tensor, ref_logprob: torch.Tensor):
        self.logprobs, self.beta = logprobs, beta
        self.reward, self.utility, self.ref_logprob = reward.float(), utility.float(), ref_logprob.float()

    def __call__(self, policy, batch, multipliers, iteration, global_step=0):
        prompt_index = batch["prompt_index"]
        logprob = self.logprobs(policy, prompt_index)
        prob = logprob.exp()
        device = logprob.device
        composite = composite_reward(self.reward[prompt_index].to(device), self.utility[:, prompt_index].to(device),
                                     multipliers.float())
        kl = (prob * (logprob - self.ref_logprob[prompt_index].to(device))).sum(-1)
        lagrangian = (prob * composite).sum(-1) - self.beta * kl
        return -lagrangian.mean(), {"lagrangian": lagrangian.mean().detach(), "kl": kl.mean().detach()}


class PolicyGradientStep:
    """Online policy gradient on r + lambda . h with a per-sample KL penalty, RLOO baseline (Safe RLHF style, no PPO).

    For each prompt in the batch: K responses from the current policy, their scores, and the leave-one-out
    advantage A_j = R_j - mean_{k != j} R_k of R = r + lambda . h - beta (log pi - log pi_ref); loss = -mean(A log pi).
    `sample_and_score(policy, prompt_index, samples, seed)` is the project's rollout path: it returns the rollouts,
    their scores [1 + m, n] (reward first) and the tokenized sequences.
    """

    def __init__(self, beta, reference, sample_and_score, samples_per_prompt, reference_mean, threshold, seed,
                 allowed_token_ids=None):
        self.beta, self.reference, self.sample_and_score = beta, reference, sample_and_score
        self.samples, self.seed, self.allowed_token_ids = samples_per_prompt, seed, allowed_token_ids
        self.offset = (torch.as_tensor(reference_mean) + torch.as_tensor(threshold)).float()

    def __call__(self, policy, batch, multipliers, iteration, global_step=0):
        prompt_index = batch["prompt_index"]
        seed = seeds.seed("policy_gradient", self.seed, global_step)
        scores, input_ids, attention_mask, response_mask = self.sample_and_score(policy, prompt_index, self.samples, seed)
        device = next(policy.parameters()).device
        input_ids, attention_mask, response_mask = (t.to(device) for t in (input_ids, attention_mask, response_mask))
        logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
        logps = response_logprobs(logits, input_ids, response_mask, self.allowed_token_ids)
        with torch.no_grad():
            ref_logits = self.reference(input_ids=input_ids, attention_mask=attention_mask).logits
            ref_logps = response_logprobs(ref_logits, input_ids, response_mask, self.allowed_token_ids)
        scores = scores.to(device)
        reward, utility = scores[0], scores[1:]
        slack = utility - self.offset.to(device).unsqueeze(1)
        kl = (logps - ref_logps).detach()
        total = (composite_reward(reward, slack, multipliers.float()) - self.beta * kl).view(-1, self.samples)
        baseline = (total.sum(1, keepdim=True) - total) / (self.samples - 1)
        advantage = (total - baseline).reshape(-1)
        loss = -(advantage * logps).mean()
        return loss, {
            "reward": reward.mean(), "kl": kl.mean(), "lagrangian": total.mean(),
            "constraint_stats": (utility.sum(-1).detach(), utility.shape[-1]),
        }
