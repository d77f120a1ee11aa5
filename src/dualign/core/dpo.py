"""The policy step as DPO on pseudo-preferences (docs/method.md, section 4). Pure torch.

A pair is (x, y0, y1); `preference` is p = P(y1 > y0). Margins are taken as y1 over y0.
"""
from __future__ import annotations

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
