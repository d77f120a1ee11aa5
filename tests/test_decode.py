"""dualign's decode loop (generation.backend=fast, models/decode.py): it samples what transformers' generate samples.
Top-p keeps the same tokens as transformers' TopPLogitsWarper (inside the first candidates and past them), the first
token's frequencies match the model's warped probabilities, and whole responses obey EOS, min_new_tokens and the
allowed tokens, prompts of different lengths included."""
from __future__ import annotations

import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import TopPLogitsWarper

from dualign.models.decode import decode, nucleus_log_softmax, top_p_sample
from dualign.models.rollout import sample_responses

POLICY = ROOT / "tests" / "fixtures" / "tiny_models" / "policy"


@pytest.mark.parametrize("native", [True, False])  # the C kernel (models/native.py) and the torch ops
@pytest.mark.parametrize("spread", [8.0, 0.05])  # peaked: a nucleus of a few tokens; flat: of most of them
def test_top_p_keeps_the_tokens_transformers_keeps(spread, native):
    torch.manual_seed(0)
    logits = torch.randn(6, 1000) * spread
    kept_by_transformers = torch.isfinite(TopPLogitsWarper(0.9)(None, logits.clone()))
    draws = torch.stack([top_p_sample(logits, 1.0, 0.9, native) for _ in range(400)], dim=1)  # [6, 400]
    for row in range(6):
        assert kept_by_transformers[row, draws[row]].all()  # never outside the nucleus
    if spread > 1:  # a few tokens: each one of them is drawn, as often as its renormalised probability says
        for row in range(6):
            assert set(draws[row].tolist()) == set(kept_by_transformers[row].nonzero().squeeze(1).tolist())
        expected = TopPLogitsWarper(0.9)(None, logits.clone()).softmax(-1)
        observed = torch.stack([torch.bincount(d, minlength=1000) for d in draws]).float() / draws.shape[1]
        assert (0.5 * (observed - expected).abs().sum(-1)).max() < 0.1  # 400 draws of a few tokens


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_nucleus_log_softmax_is_the_warped_distribution_transformers_samples(temperature, top_p):
    torch.manual_seed(0)
    logits = torch.randn(50, 8) * 2.0  # an alphabet of 8 (the exact task's); nuclei of 1 to 8 tokens
    expected = TopPLogitsWarper(top_p)(None, logits / temperature).softmax(-1)
    assert torch.allclose(nucleus_log_softmax(logits, temperature, top_p).exp(), expected, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_policy():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(POLICY).eval(), AutoTokenizer.from_pretrained(POLICY)


def test_first_token_frequencies_match_the_warped_probabilities(tiny_policy):
    model, tokenizer = tiny_policy
    prompt = tokenizer("BEGINNING OF CONVERSATION: USER: How do I take care of a garden? ASSISTANT:")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[:, -1]
    expected = TopPLogitsWarper(0.9)(None, logits / 0.8).softmax(-1)[0]
    torch.manual_seed(1)
    first = torch.tensor([r[0] for r in decode(model, [prompt], 6000, 1, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id, temperature=0.8, top_p=0.9)])
    observed = torch.bincount(first, minlength=expected.numel()).float() / first.numel()
    assert 0.5 * (observed - expected).abs().sum() < 0.03  # sampling noise at 6000 draws is about 0.01-0.02


def test_responses_end_at_eos_and_respect_lengths_and_allowed_tokens(tiny_policy):
    model, tokenizer = tiny_policy
    prompts = ["How do I take care of a garden?", "Tell me about a knife and why it matters so much to everyone."]
    ids = [tokenizer(f"BEGINNING OF CONVERSATION: USER: {p} ASSISTANT:")["input_ids"] for p in prompts]
    out = sample_responses(model, tokenizer, prompts, ids, 5, 40, seed=0, top_p=0.9, min_new_tokens=3, backend="fast")
    assert out.prompt_index.tolist() == [0] * 5 + [1] * 5 and len(out.response_ids) == 10
    for response, finished in zip(out.response_ids, out.finished):
        assert 3 <= len(response) <= 40
        assert tokenizer.eos_token_id not in response[:-1] and finished == (response[-1] == tokenizer.eos_token_id)
    assert any(out.finished) and len({tuple(r) for r in out.response_ids}) > 2
    again = sample_responses(model, tokenizer, prompts, ids, 5, 40, seed=0, top_p=0.9, min_new_tokens=3, backend="fast")
    assert again.response_ids == out.response_ids  # a seed gives the same responses
    allowed = torch.tensor([5, 6, 7, tokenizer.eos_token_id])
    limited = sample_responses(model, tokenizer, prompts, ids, 4, 6, seed=0, allowed_token_ids=allowed, backend="fast")
    assert all(set(r) <= set(allowed.tolist()) for r in limited.response_ids)

