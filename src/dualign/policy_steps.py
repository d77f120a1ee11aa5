"""Policy steps: losses whose minimiser is argmax_theta L(pi_theta, lambda) (method.md section 4). Pure torch.

Each is called as step(policy, batch, multipliers, iteration) -> (loss, metrics).
"""
from __future__ import annotations

import torch

from .dpo import dpo_loss, dpo_metrics, preference_probability, response_logprobs


class DPOStep:
    """DPO on pseudo-preferences p = sigmoid(r_lambda(y1) - r_lambda(y0)) with fixed reference log-probabilities.

    Batches carry input_ids, attention_mask and response_mask [B, 2, T], ref_logps [B, 2], reward [B, 2],
    utility [B, m, 2] and label_uniform [B, T_iterations] (hard labels: y1 wins when u < p, with a fresh u per
    iteration, so labels are re-drawn for every lambda yet a resumed run draws the same ones).
    """

    def __init__(self, beta: float, labels: str = "soft", allowed_token_ids: torch.Tensor | None = None):
        self.beta, self.labels, self.allowed_token_ids = beta, labels, allowed_token_ids

    def __call__(self, policy, batch, multipliers, iteration):
        input_ids = batch["input_ids"]
        pairs, length = input_ids.shape[0], input_ids.shape[-1]
        flat = lambda t: t.reshape(2 * pairs, length)  # noqa: E731
        logits = policy(input_ids=flat(input_ids), attention_mask=flat(batch["attention_mask"])).logits
        logps = response_logprobs(logits, flat(input_ids), flat(batch["response_mask"]), self.allowed_token_ids)
        logps = logps.view(pairs, 2)
        log_ratio = logps - batch["ref_logps"]
        preference = preference_probability(batch["reward"], batch["utility"], multipliers)
        if self.labels == "hard":
            preference = (batch["label_uniform"][:, iteration] < preference).to(preference.dtype)
        loss = dpo_loss(log_ratio[:, 1] - log_ratio[:, 0], preference, self.beta).mean()
        return loss, dpo_metrics(log_ratio.detach(), logps.detach(), preference, self.beta)


class ExactStep:
    """Gradient ascent on the enumerated Lagrangian E_pi[r + lambda . g] - beta KL(pi || pi_ref), per prompt batch.

    No sampling: isolates the parametrisation gap from sampling and optimisation error. Needs a task that can
    enumerate log pi(y|x) for every response (`enumerate_logprobs`).
    """

    def __init__(self, task, beta: float, reward: torch.Tensor, utility: torch.Tensor, ref_logprob: torch.Tensor):
        self.task, self.beta = task, beta
        self.reward, self.utility, self.ref_logprob = reward.float(), utility.float(), ref_logprob.float()

    def __call__(self, policy, batch, multipliers, iteration):
        prompt_index = batch["prompt_index"]
        logprob = self.task.enumerate_logprobs(policy, prompt_index)
        prob = logprob.exp()
        device = logprob.device
        composite = self.reward[prompt_index].to(device) + torch.einsum(
            "m,mpn->pn", multipliers.float(), self.utility[:, prompt_index].to(device)
        )
        kl = (prob * (logprob - self.ref_logprob[prompt_index].to(device))).sum(-1)
        lagrangian = (prob * composite).sum(-1) - self.beta * kl
        return -lagrangian.mean(), {"lagrangian": lagrangian.mean().detach(), "kl": kl.mean().detach()}
