"""DPO pieces against hand computations."""
import math

import torch
import torch.nn.functional as F

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


def test_all_pairs_loss_is_the_mean_pairwise_dpo_loss_over_every_pair_of_a_group():
    import itertools

    from dualign.core.dpo import all_pairs_loss

    torch.manual_seed(0)
    log_ratio, composite, beta = torch.randn(3, 5), torch.randn(3, 5), 0.7
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[2, 3:] = False  # a short group: its padding slots take part in no pair
    expected = []
    for g in range(3):
        members = [i for i in range(5) if valid[g, i]]
        losses = [dpo_loss(log_ratio[g, j:j + 1] - log_ratio[g, i:i + 1],
                           torch.sigmoid(composite[g, j:j + 1] - composite[g, i:i + 1]), beta)
                  for i, j in itertools.combinations(members, 2)]
        expected.append(torch.cat(losses).mean())
    assert torch.allclose(all_pairs_loss(log_ratio, composite, beta, valid), torch.stack(expected), atol=1e-6)
    # with two responses a group is one consecutive pair: the paper's loss
    pair = all_pairs_loss(log_ratio[:, :2], composite[:, :2], beta)
    assert torch.allclose(pair, dpo_loss(log_ratio[:, 1] - log_ratio[:, 0],
                                         torch.sigmoid(composite[:, 1] - composite[:, 0]), beta), atol=1e-6)


def test_listwise_loss_is_minimised_by_the_tilted_log_ratios():
    """Its gradient vanishes where log pi/pi_ref = r_lambda / beta + c on the sample set, and only there."""
    from dualign.core.dpo import listwise_loss

    composite, beta = torch.randn(2, 6), 0.5
    at_optimum = (composite / beta + 3.0).requires_grad_(True)
    listwise_loss(at_optimum, composite, beta).sum().backward()
    assert at_optimum.grad.abs().max() < 1e-6
    elsewhere = torch.randn(2, 6, requires_grad=True)
    listwise_loss(elsewhere, composite, beta).sum().backward()
    assert elsewhere.grad.abs().max() > 1e-3


def _expand(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """One group's distinct values [K] repeated by their counts: the samples as drawn."""
    return torch.repeat_interleave(values, count.long())


def test_grouped_losses_over_distinct_responses_with_counts_equal_the_losses_over_every_sample():
    """Merging identical samples into one response with a count changes neither the loss nor its gradient."""
    from dualign.core.dpo import all_pairs_loss, listwise_loss

    torch.manual_seed(1)
    count = torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 4.0, 1.0, 1.0]])  # 0: an empty slot
    log_ratio, composite, beta = torch.randn(2, 4), torch.randn(2, 4), 0.6
    for loss in (all_pairs_loss, listwise_loss):
        merged_input = log_ratio.clone().requires_grad_(True)
        merged = loss(merged_input, composite, beta, count)
        merged.sum().backward()
        for g in range(2):
            samples = _expand(log_ratio[g], count[g]).requires_grad_(True)
            expected = loss(samples.unsqueeze(0), _expand(composite[g], count[g]).unsqueeze(0), beta)
            expected.sum().backward()
            assert torch.allclose(merged[g], expected[0], atol=1e-6), loss.__name__
            # the merged gradient of a response is the sum over its copies
            per_response = torch.zeros(4).index_add_(0, torch.repeat_interleave(torch.arange(4), count[g].long()),
                                                     samples.grad)
            assert torch.allclose(merged_input.grad[g], per_response, atol=1e-6), loss.__name__
        assert torch.isfinite(merged_input.grad).all()


def test_group_metrics_equal_trl_metrics_over_every_sample_pair():
    """rewards/* over a group's distinct responses with counts equal dpo_metrics over every pair of its samples, the
    one with the higher r_lambda chosen (ties: the earlier sample)."""
    import itertools

    from dualign.core.dpo import group_metrics

    torch.manual_seed(2)
    count = torch.tensor([[3.0, 1.0, 2.0, 0.0, 2.0], [1.0, 4.0, 1.0, 1.0, 1.0]])
    log_ratio, beta = torch.randn(2, 5), 0.6
    composite = torch.tensor([[1.0, 0.0, 1.0, 5.0, -1.0], [0.5, 0.5, 2.0, -1.0, 0.5]])  # ties inside each group
    log_ratio[1, 4] = log_ratio[1, 0]  # equal rewards: not an accurate pair
    chosen, rejected = [], []
    for g in range(2):
        samples = [i for i in range(5) for _ in range(int(count[g, i]))]
        for i, j in itertools.combinations(samples, 2):
            if i == j:
                continue  # two copies of one response: not a pair of distinct responses
            first, second = (i, j) if composite[g, i] >= composite[g, j] else (j, i)
            chosen.append(beta * log_ratio[g, first])
            rejected.append(beta * log_ratio[g, second])
    chosen, rejected = torch.stack(chosen), torch.stack(rejected)
    metrics = group_metrics(log_ratio, composite, beta, count)
    assert torch.isclose(metrics["rewards/chosen"], chosen.mean(), atol=1e-6)
    assert torch.isclose(metrics["rewards/rejected"], rejected.mean(), atol=1e-6)
    assert torch.isclose(metrics["rewards/margins"], (chosen - rejected).mean(), atol=1e-6)
    assert torch.isclose(metrics["rewards/accuracies"], (chosen > rejected).float().mean(), atol=1e-6)


def test_hard_labels_over_merged_pairs_are_win_fractions():
    """all_pairs_loss with labels = fraction of c_i c_j Bernoulli draws won equals the mean over the drawn pairs."""
    from dualign.core.dpo import all_pairs_loss

    count = torch.tensor([[2.0, 1.0]])
    log_ratio, composite, beta = torch.tensor([[0.3, -0.4]]), torch.tensor([[1.0, 0.0]]), 1.0
    labels = torch.tensor([[[0.0, 0.5], [0.0, 0.0]]])  # of the 2 sample pairs (copy of y0, y1), y0 won one
    loss = all_pairs_loss(log_ratio, composite, beta, count, labels)
    margin = log_ratio[0, 0] - log_ratio[0, 1]
    win, lose = -F.logsigmoid(beta * margin), -F.logsigmoid(-beta * margin)
    # 3 sample pairs: the two copies of y0 (log 2), copy 1 over y1 won, copy 2 over y1 lost
    assert torch.allclose(loss, ((math.log(2) + win + lose) / 3).view(1), atol=1e-6)


def test_given_labels_replace_the_pseudo_preferences_of_the_scores():
    """A batch with a `label` column (a dataset's own preferences: PeCAID's pre-alignment) learns those labels,
    whatever the scores, the multipliers or the hard-label draw say."""
    from dualign.training.policy_steps import DPOStep

    class Fixed(torch.nn.Module):  # the logits of every position: token 1 likelier in row 0, token 2 in row 1
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(1.0))

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, 4)
            logits[0::2, :, 1] = 2.0
            logits[1::2, :, 2] = 1.0
            return type("Out", (), {"logits": self.scale * logits})()

    ids = torch.tensor([[[0, 1, 1], [0, 2, 2]]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.tensor([[[0, 1, 1]] * 2]),
             "ref_logps": torch.tensor([[-2.0, -3.0]]), "reward": torch.tensor([[5.0, -5.0]]),
             "utility": torch.tensor([[[5.0, -5.0]]]), "label_uniform": torch.tensor([[0.5]]),
             "label": torch.tensor([1.0])}  # y1 preferred, though the scores prefer y0 by far
    policy = Fixed()
    loss, _ = DPOStep(0.5, labels="hard")(policy, batch, torch.tensor([1.0]), 0)
    logits = policy(ids.view(2, 3), None).logits
    logps = response_logprobs(logits, ids.view(2, 3), batch["response_mask"].view(2, 3)) - batch["ref_logps"].view(2)
    assert torch.allclose(loss, dpo_loss((logps[1] - logps[0]).view(1), torch.tensor([1.0]), 0.5).mean())
