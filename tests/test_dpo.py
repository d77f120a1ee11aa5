"""DPO pieces against hand computations."""
import math

import torch

from dualign.core.dpo import dpo_loss, dpo_metrics, preference_probability, response_logprobs


def test_response_logprobs_sum_only_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    input_ids = torch.tensor([[1, 4, 2, 3, 0], [1, 5, 6, 0, 0]])
    # row 0: prompt = [1, 4], response = [2, 3], one pad; row 1: prompt = [1], response = [5, 6], two pads
    response_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    logp = logits.log_softmax(-1)
    expected = torch.stack([
        logp[0, 1, 2] + logp[0, 2, 3],  # token at t is predicted by the logits at t - 1
        logp[1, 0, 5] + logp[1, 1, 6],
    ])
    assert torch.allclose(response_logprobs(logits, input_ids, response_mask), expected)


def test_response_logprobs_restricted_alphabet_renormalises():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 6)
    input_ids = torch.tensor([[0, 4, 5]])
    mask = torch.tensor([[0, 1, 1]])
    allowed = torch.tensor([3, 4, 5])
    sub = logits[..., allowed].log_softmax(-1)
    expected = sub[0, 0, 1] + sub[0, 1, 2]
    assert torch.allclose(response_logprobs(logits, input_ids, mask, allowed), expected.view(1))


def test_dpo_loss_hand_computation():
    beta = 0.1
    margin = torch.tensor([2.0, -1.0])
    hard = dpo_loss(margin, torch.tensor([1.0, 0.0]), beta)
    expected = torch.tensor([-math.log(1 / (1 + math.exp(-0.2))), -math.log(1 / (1 + math.exp(-0.1)))])
    assert torch.allclose(hard, expected)
    soft = dpo_loss(margin, torch.tensor([0.3, 0.3]), beta)
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert math.isclose(soft[0].item(), -(0.3 * math.log(s(0.2)) + 0.7 * math.log(s(-0.2))), rel_tol=1e-6)


def test_soft_and_hard_labels_agree_in_mean():
    torch.manual_seed(2)
    margin = torch.randn(64) * 3
    p = torch.rand(64)
    soft = dpo_loss(margin, p, beta=0.5)
    draws = (torch.rand(20_000, 64) < p).float()
    hard = dpo_loss(margin.expand(20_000, 64), draws, beta=0.5).mean(0)
    assert torch.allclose(hard, soft, atol=0.03)


def test_preference_probability_uses_composite_reward_without_beta():
    reward = torch.tensor([[0.0, 1.0]])
    utility = torch.tensor([[[2.0, 0.0], [0.0, 0.5]]])  # m = 2
    lam = torch.tensor([0.5, 2.0])
    expected = torch.sigmoid(torch.tensor((1.0 + 0.5 * 0.0 + 2.0 * 0.5) - (0.0 + 0.5 * 2.0 + 0.0)))
    assert torch.allclose(preference_probability(reward, utility, lam), expected.view(1))


def test_metrics_follow_trl_names():
    log_ratio = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    logps = torch.tensor([[-3.0, -2.0], [-1.0, -4.0]])
    metrics = dpo_metrics(log_ratio, logps, torch.tensor([1.0, 0.0]), beta=0.1)
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                            "logps/chosen", "logps/rejected"}
    assert torch.isclose(metrics["rewards/chosen"], torch.tensor(0.15))  # y1 of pair 0, y0 of pair 1
    assert metrics["rewards/accuracies"] == 1.0
