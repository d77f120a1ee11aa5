"""The policy step as DPO on pseudo-preferences (docs/method.md, section 4). Pure torch.

A pair is (x, y0, y1); `preference` is p = P(y1 > y0). Margins are taken as y1 over y0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dualign.core.duality import composite_reward


def response_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, allowed_token_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of log p(token) over response tokens only (prompt and padding masked), shape [B].

    logits [B, T, V] come from the model on input_ids [B, T]; response_mask [B, T] is 1 on response tokens.
    allowed_token_ids restricts the policy to a response alphabet (the exact task's policies are defined that way).
    """
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):  # log-softmax in float32; float64 models stay float64
        logits = logits.float()
    if allowed_token_ids is not None:
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        allowed[allowed_token_ids] = True
        logits = logits.masked_fill(~allowed, float("-inf"))
    targets = input_ids[:, 1:]
    mask = response_mask[:, 1:].bool()
    token_logprobs = torch.gather(logits.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, token_logprobs, torch.zeros_like(token_logprobs)).sum(-1)


def row_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                 allowed_token_ids: torch.Tensor | None = None, group_logprobs=None) -> torch.Tensor:
    """log pi(y|x) of full rows [B, T] under model, [B]: the task's own computation where it has one
    (Task.group_logprobs: rows that share prefixes, read off one walk of their tree), else a forward pass."""
    if group_logprobs is not None:
        return group_logprobs(model, input_ids)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return response_logprobs(logits, input_ids, response_mask, allowed_token_ids)


def preference_probability(
    reward: torch.Tensor, utility: torch.Tensor, multipliers: torch.Tensor
) -> torch.Tensor:
    """Pseudo-preference p = sigmoid(r_lambda(y1) - r_lambda(y0)) with r_lambda = r + lambda . g (no 1/beta).

    reward [B, 2] and utility [B, m, 2] hold the scores of (y0, y1).
    """
    composite = composite_reward(reward, utility.movedim(1, 0), multipliers)  # utility [B, m, 2] -> [m, B, 2]
    return torch.sigmoid(composite[:, 1] - composite[:, 0])


def dpo_loss(log_ratio_margin: torch.Tensor, preference: torch.Tensor, beta: float) -> torch.Tensor:
    """-(p log sigmoid(beta m) + (1 - p) log sigmoid(-beta m)) per pair, m = log-ratio margin of y1 over y0.

    With p in {0, 1} (hard labels) this is the standard DPO sigmoid loss with the winner as `chosen`.
    """
    scaled = beta * log_ratio_margin
    return -(preference * F.logsigmoid(scaled) + (1 - preference) * F.logsigmoid(-scaled))


def dpo_metrics(log_ratio: torch.Tensor, logps: torch.Tensor, preference: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """TRL-style metrics. log_ratio and logps are [B, 2] for (y0, y1); `chosen` is y1 where p >= 0.5."""
    chosen_is_1 = preference >= 0.5
    pick = lambda t, first: torch.where(chosen_is_1 == first, t[:, 1], t[:, 0])  # noqa: E731
    rewards_chosen, rewards_rejected = beta * pick(log_ratio, True), beta * pick(log_ratio, False)
    return {
        "rewards/chosen": rewards_chosen.mean(),
        "rewards/rejected": rewards_rejected.mean(),
        "rewards/margins": (rewards_chosen - rewards_rejected).mean(),
        "rewards/accuracies": (rewards_chosen > rewards_rejected).float().mean(),
        "logps/chosen": pick(logps, True).mean(),
        "logps/rejected": pick(logps, False).mean(),
    }


def _pair_weights(count: torch.Tensor) -> torch.Tensor:
    """c_i c_j for i < j, [G, K, K]: how many sample pairs each pair of distinct responses stands for."""
    K = count.shape[1]
    upper = torch.ones(K, K, dtype=torch.bool, device=count.device).triu(1)
    return count.unsqueeze(2) * count.unsqueeze(1) * upper


def all_pairs_loss(log_ratio: torch.Tensor, composite: torch.Tensor, beta: float, count: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """The pseudo-preference DPO loss over every pair of a group's samples, [G] (docs/method.md section 4.2).

    log_ratio, composite [G, K]: log pi/pi_ref and r_lambda of each distinct response; count [G, K]: how many of the
    group's samples it stands for (0: an empty slot; None: one each). Every unordered pair of samples counts once, with
    soft label p_ij = sigmoid(r_i - r_j) (or `labels` [G, K, K], the fraction of hard labels won by i over j). A pair of
    two copies of one response has margin 0 and loss log 2 whatever its label, so it enters as that constant: the
    value and gradient equal those over the samples with their duplicates. For K i.i.d. pi_ref samples the mean over
    pairs is a U-statistic: an unbiased estimate of the population loss E_{y, y' ~ pi_ref} l(y, y'), whose minimiser
    is the tilted policy.
    """
    count = torch.ones_like(log_ratio) if count is None else count.to(log_ratio.dtype)
    margin = beta * (log_ratio.unsqueeze(2) - log_ratio.unsqueeze(1))  # [G, K, K]: i over j
    preference = torch.sigmoid(composite.unsqueeze(2) - composite.unsqueeze(1)) if labels is None else labels
    pair_loss = -(preference * F.logsigmoid(margin) + (1 - preference) * F.logsigmoid(-margin))
    weight = _pair_weights(count)
    samples = count.sum(1)
    copies = (count * (count - 1)).sum(1) / 2  # pairs of two copies of one response
    pairs = (samples * (samples - 1) / 2).clamp(min=1)
    return ((weight * pair_loss).sum((1, 2)) + copies * math.log(2)) / pairs


def listwise_loss(log_ratio: torch.Tensor, composite: torch.Tensor, beta: float,
                  count: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy between softmax(r_lambda / beta) and softmax(log pi/pi_ref) over a group's samples, [G].
    Its minimiser on every sample set has log pi/pi_ref = r_lambda / beta + c: the tilted policy.

    count [G, K] as in all_pairs_loss: a response drawn c times enters both softmaxes with log c added, and its c
    equal terms as one, so the value and gradient equal those over the samples with their duplicates."""
    if count is None:
        count = torch.ones_like(log_ratio)
    log_count = count.to(log_ratio.dtype).log()  # -inf on empty slots: they take no mass on either side
    target = torch.softmax(composite / beta + log_count, dim=-1)
    log_model = torch.log_softmax(log_ratio + log_count, dim=-1) - log_count
    return -(target * torch.where(target > 0, log_model, torch.zeros_like(log_model))).sum(-1)


def group_metrics(log_ratio: torch.Tensor, composite: torch.Tensor, beta: float,
                  count: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """TRL-style metrics over the pairs of distinct responses of a group, each weighted by the sample pairs it stands
    for (c_i c_j); `chosen` is the response with the higher r_lambda (of equal ones, the first).

    With the group sorted by r_lambda (descending, ties by position), every pair is (earlier = chosen, later =
    rejected), so the chosen and rejected sums are one cumulative sum each; only the accuracy compares pairs."""
    count = torch.ones_like(log_ratio) if count is None else count.to(log_ratio.dtype)
    K = log_ratio.shape[1]
    # stable sort on -composite: ties keep their positions, so the earlier of two equal ones is chosen, as i < j
    order = torch.sort(-composite.detach().to(log_ratio.dtype), dim=1, stable=True).indices
    reward = (beta * log_ratio).gather(1, order)
    weight = count.gather(1, order)
    before = weight.cumsum(1) - weight  # samples ranked above each response
    after = weight.sum(1, keepdim=True) - weight.cumsum(1)  # and below it
    pairs = (weight * after).sum(1).sum().clamp(min=1)
    chosen = (weight * after * reward).sum() / pairs
    rejected = (weight * before * reward).sum() / pairs
    later = torch.ones(K, K, dtype=torch.bool, device=log_ratio.device).triu(1)
    right = (reward.unsqueeze(2) > reward.unsqueeze(1)) & later  # [G, K, K]: chosen i's reward above rejected j's
    accurate = torch.einsum("gi,gij,gj->", weight, right.to(weight.dtype), weight) / pairs
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
            "rewards/accuracies": accurate}
