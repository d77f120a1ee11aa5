"""dualign's own decode loop (generation.backend=fast): the rollout path for small models on a CPU, where
transformers' `generate` spends most of its time outside the matrix products. It differs from `generate` in what it
skips, not in what it samples:

- each prompt is prefilled once and its KV cache repeated for its K samples (`generate` prefills K copies);
- rows that have ended (EOS) leave the batch, cache included, instead of being computed on as padding;
- only the last position's logits are computed during the prefill (not W x vocabulary of them);
- top-p looks at the 256 most likely tokens first and sorts the whole vocabulary only for a row whose nucleus is
  not inside them; the kept set is the same as transformers' TopPLogitsWarper's (the smallest set of most likely
  tokens whose mass reaches top_p).

The sampled distribution is the same as `generate(do_sample=True, top_k=0, temperature, top_p)`; the random stream
is not, so a seed gives other (equally distributed) responses than with backend=hf.
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

TOP_FIRST = 256  # candidates looked at before sorting the whole vocabulary


def top_p_sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of logits [n, V] from softmax(logits / temperature) restricted to its top-p nucleus."""
    probs = (logits.float() / temperature).softmax(-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1).squeeze(1)
    top, index = probs.topk(min(TOP_FIRST, probs.shape[-1]), dim=-1)  # sorted, most likely first
    wide = top.sum(-1) < top_p  # the nucleus reaches past the candidates: sort everything for these rows
    if wide.any():
        full, full_index = probs[wide].sort(dim=-1, descending=True)
        return _fill(wide, _nucleus_draw(top[~wide], index[~wide], top_p), _nucleus_draw(full, full_index, top_p))
    return _nucleus_draw(top, index, top_p)


def _nucleus_draw(sorted_probs: torch.Tensor, index: torch.Tensor, top_p: float) -> torch.Tensor:
    # a token stays when the mass of the tokens before it is below top_p: the most likely one always stays
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    choice = torch.multinomial(sorted_probs * keep, 1)
    return index.gather(1, choice).squeeze(1)


def _fill(mask: torch.Tensor, narrow: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    out = torch.empty(mask.shape[0], dtype=torch.long, device=mask.device)
    out[~mask], out[mask] = narrow, wide
    return out


def _base(model):
    target = getattr(model, "peft_model", model)  # pi_ref as an adapter-disabled view
    return target.get_base_model() if hasattr(target, "get_base_model") else target


def _forward_parameters(model) -> set[str]:
    return set(inspect.signature(_base(model).forward).parameters)


@torch.no_grad()
def left_padded(prompt_ids: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, longest prompt]: prompts padded on the left, so that generation appends."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.tensor([[pad_token_id] * (width - len(ids)) + ids for ids in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    return input_ids, mask


def decode(model, prompt_ids: list[list[int]], num_samples: int, max_new_tokens: int, *, pad_token_id: int,
           eos_token_id: int, temperature: float = 1.0, top_p: float = 1.0, min_new_tokens: int = 0,
           allowed_token_ids: torch.Tensor | None = None) -> list[list[int]]:
    """num_samples responses to each prompt, prompt-major: [prompt 0's K responses, prompt 1's, ...], each
    max_new_tokens long: the generated tokens, then EOS repeated after the first EOS where a response stopped."""
    device = next(model.parameters()).device
    input_ids, mask = left_padded(prompt_ids, pad_token_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt starts at position 0
    cache = DynamicCache()
    parameters = _forward_parameters(model)
    cache_key = "cache" if "cache" in parameters else "past_key_values"  # renamed in later transformers 5 releases
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   **{cache_key: cache}, **last_only).logits[:, -1]
    # the K samples of a prompt share its prefill
    cache.batch_repeat_interleave(num_samples)
    logits, mask = logits.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0)
    position = positions[:, -1].repeat_interleave(num_samples, 0)
    alive = torch.arange(len(prompt_ids) * num_samples, device=device)  # batch row -> response index
    # tokens stay on the device until the end (no host transfer per token); rows cut at EOS by the caller
    responses = torch.full((len(prompt_ids) * num_samples, max_new_tokens), eos_token_id, dtype=torch.long, device=device)
    disallowed = None
    if allowed_token_ids is not None:
        disallowed = torch.ones(logits.shape[-1], dtype=torch.bool, device=device)
        disallowed[allowed_token_ids.to(device)] = False
    for step in range(max_new_tokens):
        logits = logits.float()
        if disallowed is not None:
            logits = logits.masked_fill(disallowed, float("-inf"))
        if step < min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        tokens = top_p_sample(logits, temperature, top_p)
        responses[alive, step] = tokens
        if step == max_new_tokens - 1:
            break
        going = tokens != eos_token_id
        if not going.all():  # ended rows leave the batch, and their cache with them
            if not going.any():
                break
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, tokens, mask, position = alive[keep], tokens[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position[:, None], use_cache=True,
                       **{cache_key: cache}).logits[:, -1]
    return responses.tolist()
