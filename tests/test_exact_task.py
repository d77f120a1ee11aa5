"""The exact task and its oracle against direct computation and Monte-Carlo sampling of the model."""
import pytest
import torch

from dualign.config import ExactTaskConfig, TinyModelConfig
from dualign.core.dpo import response_logprobs
from dualign.core.oracle import ExactOracle, Instance
from dualign.models.decode import nucleus_log_softmax
from dualign.models.rollout import sample_responses
from dualign.tasks.exact_problem import ExactProblem, reference_policy, tiny_gpt2
from dualign.training.data import sequence_logprobs

SMALL = ExactTaskConfig(num_prompts=4, num_response_tokens=4, response_length=3, sft_steps=60, sft_samples_per_prompt=64)


@pytest.fixture(scope="module")
def task():
    return ExactProblem(SMALL)


@pytest.fixture(scope="module")
def reference(task, cache_dir):
    return reference_policy(task, TinyModelConfig(), cache_dir)


def test_enumeration_matches_full_forward_of_every_sequence(task, reference):
    fast = task.enumerate_logprobs(reference).detach()
    P, N = fast.shape
    prompt_index = torch.arange(P).repeat_interleave(N)
    response_index = torch.arange(N).repeat(P)
    input_ids, response_mask = task.sequences(prompt_index, response_index)
    direct = sequence_logprobs(reference, input_ids, torch.ones_like(input_ids), response_mask, task.allowed_token_ids)
    assert torch.allclose(fast.reshape(-1), direct, atol=1e-5)
    assert torch.allclose(fast.exp().sum(-1), torch.ones(P), atol=1e-5)


def test_enumeration_is_differentiable(task):
    torch.manual_seed(0)
    model = tiny_gpt2(task.tokenizer, TinyModelConfig(n_layer=1, n_embd=16, n_head=2), max_positions=8)
    (task.enumerate_logprobs(model).exp() * task.reward_table).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_sequence_logprobs_read_off_the_tree_equal_a_forward_pass_with_the_same_gradient(task):
    """The grouped policy step's log pi(y|x) of sampled rows (prompts repeated, in any order) through the response
    tree: the values and the parameter gradient of a plain forward pass over the rows."""
    torch.manual_seed(0)
    model = tiny_gpt2(task.tokenizer, TinyModelConfig(n_layer=1, n_embd=16, n_head=2), max_positions=8)
    prompt_index, response_index = torch.tensor([2, 0, 2, 3, 2]), torch.tensor([5, 63, 5, 0, 17])
    input_ids, response_mask = task.sequences(prompt_index, response_index)
    weights = torch.randn(len(input_ids))
    gradients = []
    for logps in (lambda: task.sequence_logprobs(model, input_ids),
                  lambda: response_logprobs(model(input_ids=input_ids).logits, input_ids, response_mask,
                                            task.allowed_token_ids)):
        model.zero_grad()
        values = logps()
        (weights * values).sum().backward()
        gradients.append((values.detach(), [p.grad.clone() for p in model.parameters()]))
    (tree, tree_grad), (flat, flat_grad) = gradients
    assert torch.allclose(tree, flat, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(tree_grad, flat_grad))
    with pytest.raises(ValueError, match="not \\(prompt, 3-token response\\) sequences"):
        task.sequence_logprobs(model, input_ids[:, :-1])


def test_oracle_agrees_with_monte_carlo_sampling_of_the_model(task, reference):
    ref_logprob = task.enumerate_logprobs(reference).detach()
    instance = Instance(ref_logprob, task.reward_table, task.utility_tables, beta=1.0, threshold=[0.2, 0.1])
    rollouts = sample_responses(
        reference, task.tokenizer, task.prompts, task.prompt_token_ids, 4000, SMALL.response_length, seed=0,
        min_new_tokens=SMALL.response_length, allowed_token_ids=task.allowed_token_ids,
    )
    scorers = task.scorers()
    sampled_reward = scorers["reward"](rollouts.prompts, rollouts.responses).double()
    exact_reward = ExactOracle(instance).evaluate(ref_logprob)["reward"]
    standard_error = sampled_reward.std().item() / len(sampled_reward) ** 0.5
    assert abs(sampled_reward.mean().item() - exact_reward) < 4 * standard_error
    # response frequencies of prompt 0 against the enumerated probabilities
    first = rollouts.prompt_index == 0
    counts = torch.bincount(task.response_indices([r for r, f in zip(rollouts.responses, first) if f]),
                            minlength=task.num_responses).double()
    expected = ref_logprob[0].double().exp() * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected.clamp(min=1e-9))[expected > 5].sum().item()
    dof = int((expected > 5).sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5


def test_tree_sampler_draws_what_the_decode_loop_draws(task, reference):
    """generation.backend=enumerate: response frequencies equal the token-by-token law under temperature and top-p
    (the nucleus taken at each node), the same as transformers' generate with those settings."""
    temperature, top_p, samples = 0.8, 0.9, 6000
    warped = task.enumerate_logprobs(reference, torch.tensor([1]),
                                     lambda logits: nucleus_log_softmax(logits, temperature, top_p)).detach()[0]
    assert abs(warped.exp().sum().item() - 1) < 1e-5 and (warped == float("-inf")).any()  # the nucleus cut some
    tree = task.sample(reference, [task.prompts[1], task.prompts[2]], samples, seed=0, temperature=temperature,
                       top_p=top_p)
    generated = sample_responses(reference, task.tokenizer, [task.prompts[1]], [task.prompt_token_ids[1]], samples,
                                 SMALL.response_length, seed=0, temperature=temperature, top_p=top_p,
                                 min_new_tokens=SMALL.response_length, allowed_token_ids=task.allowed_token_ids)
    assert tree.prompt_index.tolist() == [0] * samples + [1] * samples and tree.prompts[samples] == task.prompts[2]
    assert task.tokenizer.batch_decode(tree.response_ids[:20], skip_special_tokens=True) == tree.responses[:20]
    expected = warped.double().exp() * samples
    for responses in (tree.responses[:samples], generated.responses):
        counts = torch.bincount(task.response_indices(responses), minlength=task.num_responses).double()
        assert counts[expected == 0].sum() == 0  # never outside a nucleus
        chi2 = ((counts - expected) ** 2 / expected.clamp(min=1e-9))[expected > 5].sum().item()
        dof = int((expected > 5).sum()) - 1
        assert chi2 < dof + 5 * (2 * dof) ** 0.5
    again = task.sample(reference, [task.prompts[1]], 50, seed=0, temperature=temperature, top_p=top_p)
    assert again.responses == task.sample(reference, [task.prompts[1]], 50, seed=0, temperature=temperature,
                                          top_p=top_p).responses  # seeded


def test_reference_cache_reloads_through_from_pretrained(task, reference, cache_dir):
    again = reference_policy(task, TinyModelConfig(), cache_dir)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), again.state_dict().values()))
    assert list(cache_dir.glob("exact_reference/*/model.safetensors"))


def test_reference_is_far_from_uniform(task, reference):
    logprob = task.enumerate_logprobs(reference).detach()
    entropy = -(logprob.exp() * logprob).sum(-1).mean()
    assert entropy < 0.85 * torch.log(torch.tensor(float(task.num_responses)))


def test_utilities_trade_off_against_reward():
    task = ExactProblem(ExactTaskConfig())  # the default task: tables only, no SFT
    for table in task.utility_tables:
        correlation = torch.corrcoef(torch.stack([task.reward_table.reshape(-1), table.reshape(-1)]))[0, 1]
        assert correlation < -0.3


def test_table_scorer_rejects_foreign_text(task):
    scorer = task.scorers()["reward"]
    with pytest.raises(ValueError, match="not 3 tokens"):
        scorer(["p0"], ["t0 t1"])
    with pytest.raises(ValueError, match="not one of the exact task's prompts"):
        scorer(["p99"], ["t0 t1 t2"])
