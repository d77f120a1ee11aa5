"""dualign's own decode loop (generation.backend=fast): the rollout path for small models on a CPU, where
transformers' `generate` spends most of its time outside the matrix products. It differs from `generate` in what it
skips, not in what it samples:

- each prompt is prefilled once and its KV cache repeated for its K samples (`generate` prefills K copies);
- rows that have ended (EOS) leave the batch, cache included, once they are a quarter of it, instead of being
  computed on as padding to the end;
- only the last position's logits are computed during the prefill (not W x vocabulary of them);
- top-p sampling draws from the whole distribution and draws again where the token fell outside the nucleus (no
  softmax, top-k or sort of the vocabulary; a C kernel on a CPU, models/native.py); the nucleus is transformers'
  TopPLogitsWarper's (the smallest set of most likely tokens whose mass reaches top_p);
- for Llama-family models, the steps are dualign's own (models/llama_steps.py): fused projections, a preallocated
  cache, LoRA folded into the weights.

The sampled distribution is the same as `generate(do_sample=True, top_k=0, temperature, top_p)`; the random stream
is not, so a seed gives other (equally distributed) responses than with backend=hf.
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from dualign.models.llama_steps import LlamaSteps, unwrap
from dualign.models.native import TYPES, kernels

BLOCK = 256  # tokens a block of the two-level inverse CDF


def top_p_sample(logits: torch.Tensor, temperature: float, top_p: float, native: bool = True) -> torch.Tensor:
    """One token per row of logits [n, V] from softmax(logits / temperature) restricted to its top-p nucleus.

    Without sorting: a token is drawn from the whole distribution (a two-level inverse CDF: blocks of BLOCK tokens,
    then a token within the block) and kept when it is in the nucleus, i.e. when the tokens more likely than it
    weigh less than top_p together (transformers' TopPLogitsWarper keeps the same set); a row whose draw fell
    outside draws again. Conditioned on being kept, a draw follows the distribution restricted to the nucleus, which
    is top-p sampling; the nucleus holds at least top_p of the mass, so a row draws about 1 / top_p times on average.
    Most draws are kept at sight (the other tokens weigh less than top_p in all); only the others are checked
    against the whole vocabulary. On a CPU the C kernel of models/native.py does the same in one pass or two over
    the logits (native=False: these torch ops, for other devices and as its reference in the tests)."""
    library = kernels() if native and logits.device.type == "cpu" and logits.dtype in TYPES else None
    if library is not None:
        return library.top_p_sample(logits, temperature, top_p)
    probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, -1, dtype=torch.float32)
    rows_count, vocabulary = probs.shape
    if vocabulary % BLOCK:
        probs = torch.nn.functional.pad(probs, (0, BLOCK - vocabulary % BLOCK))  # zero mass: never drawn
    blocks = probs.view(rows_count, -1, BLOCK)
    block_cdf = blocks.sum(-1).cumsum(-1)  # [n, blocks]; a cumulative sum over the whole vocabulary is a slow scan
    total = block_cdf[:, -1]  # 1 up to rounding
    tokens = torch.empty(rows_count, dtype=torch.long, device=logits.device)
    rows = None  # the rows still drawing; None: all of them (no copies on the first round)
    while True:
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        row_cdf, row_total, row_blocks = pick(block_cdf), pick(total), pick(blocks)
        # u in (0, total]: a token of zero mass (masked) is never the first whose cumulative mass reaches u
        u = (1.0 - torch.rand(len(row_total), device=logits.device)) * row_total
        block = torch.searchsorted(row_cdf, u[:, None]).squeeze(1).clamp_(max=blocks.shape[1] - 1)
        before = torch.where(block > 0, row_cdf.gather(1, (block - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
        within = row_blocks[torch.arange(len(block), device=block.device), block].cumsum(-1)  # [rows, BLOCK]
        offset = torch.searchsorted(within, (u - before)[:, None]).squeeze(1).clamp_(max=BLOCK - 1)
        draw = block * BLOCK + offset
        if top_p >= 1.0:
            accept = torch.ones_like(draw, dtype=torch.bool)
        else:
            row_probs = row_blocks.view(len(draw), -1)
            drawn = row_probs.gather(1, draw[:, None]).squeeze(1)
            accept = row_total - drawn < top_p * row_total  # kept at sight
            unsure = (~accept).nonzero().squeeze(1)
            if len(unsure):
                candidates = row_probs[unsure]
                above = torch.where(candidates > drawn[unsure, None], candidates, 0.0).sum(-1)
                accept[unsure] = above < top_p * row_total[unsure]
        if rows is None:
            tokens.copy_(draw)
            rows = (~accept).nonzero().squeeze(1)
        else:
            tokens[rows[accept]] = draw[accept]
            rows = rows[~accept]
        if len(rows) == 0:
            return tokens


def nucleus_log_softmax(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log of the distribution top_p_sample draws from, for every token of logits [..., V]: softmax(logits /
    temperature) restricted to the nucleus (a token is in it when the tokens more likely than it weigh less than
    top_p together) and renormalised. For small alphabets (it compares every pair of tokens: V x V a row)."""
    logprobs = torch.log_softmax(logits.float() / temperature, -1)
    if top_p >= 1.0:
        return logprobs
    probs = logprobs.exp()
    above = torch.where(probs.unsqueeze(-2) > probs.unsqueeze(-1), probs.unsqueeze(-2), 0.0).sum(-1)
    return torch.log_softmax(logprobs.masked_fill(above >= top_p, float("-inf")), -1)


class ModelSteps:
    """Prefill and decode steps through the model's own forward and transformers' DynamicCache: any causal LM."""

    def __init__(self, model):
        self.model = model
        _, base, _ = unwrap(model)  # through peft and pi_ref's adapter-disabled view
        parameters = set(inspect.signature(base.forward).parameters)
        self.cache_key = "cache" if "cache" in parameters else "past_key_values"  # renamed in later transformers 5
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    def prefill(self, input_ids, mask, positions, new_tokens: int) -> torch.Tensor:
        self.cache, self.mask = DynamicCache(), mask
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          **{self.cache_key: self.cache}, **self.last_only).logits[:, -1]

    def repeat(self, times: int) -> None:
        self.cache.batch_repeat_interleave(times)
        self.mask = self.mask.repeat_interleave(times, 0)

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.mask = self.mask[keep]

    def step(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=position[:, None],
                          use_cache=True, **{self.cache_key: self.cache}).logits[:, -1]


def steps_for(model, rows_hint: int = 64):
    """Llama-family models (llama, mistral, qwen2) get dualign's own steps (models/llama_steps.py); others their
    own forward."""
    return LlamaSteps(model, rows_hint) if LlamaSteps.supports(model) else ModelSteps(model)


@torch.no_grad()
def left_padded(prompt_ids: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, longest prompt]: prompts padded on the left, so that generation appends."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.tensor([[pad_token_id] * (width - len(ids)) + ids for ids in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    return input_ids, mask


def decode(model, prompt_ids: list[list[int]], num_samples: int, max_new_tokens: int, *, pad_token_id: int,
           eos_token_id: int, temperature: float = 1.0, top_p: float = 1.0, min_new_tokens: int = 0,
           allowed_token_ids: torch.Tensor | None = None, steps=None) -> list[list[int]]:
    """num_samples responses to each prompt, prompt-major: [prompt 0's K responses, prompt 1's, ...], each
    max_new_tokens long: the generated tokens, then EOS repeated after the first EOS where a response stopped.
    `steps`: from `steps_for(model)`, built once for many calls (it gathers the weights); by default built here."""
    device = next(model.parameters()).device
    steps = steps if steps is not None else steps_for(model, len(prompt_ids) * num_samples)
    input_ids, mask = left_padded(prompt_ids, pad_token_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt starts at position 0
    logits = steps.prefill(input_ids, mask, positions, max_new_tokens)
    # the K samples of a prompt share its prefill
    steps.repeat(num_samples)
    logits = logits.repeat_interleave(num_samples, 0)
    position = positions[:, -1].repeat_interleave(num_samples, 0)
    alive = torch.arange(len(prompt_ids) * num_samples, device=device)  # batch row -> response index
    # tokens stay on the device until the end (no host transfer per token); rows cut at EOS by the caller
    responses = torch.full((len(prompt_ids) * num_samples, max_new_tokens), eos_token_id, dtype=torch.long, device=device)
    disallowed = None
    if allowed_token_ids is not None:
        disallowed = torch.ones(logits.shape[-1], dtype=torch.bool, device=device)
        disallowed[allowed_token_ids.to(device)] = False
    ended = torch.zeros(len(alive), dtype=torch.bool, device=device)  # rows that ended but are still in the batch
    for step in range(max_new_tokens):
        if disallowed is not None:
            logits = logits.masked_fill(disallowed, float("-inf"))
        if step < min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        tokens = top_p_sample(logits, temperature, top_p)
        responses[alive[~ended], step] = tokens[~ended]
        if step == max_new_tokens - 1:
            break
        ended |= tokens == eos_token_id
        if ended.all():
            break
        # ended rows leave the batch, cache included, once they are a quarter of it: dropping them copies the whole
        # cache, computing on them costs a quarter of a step at most
        if 4 * int(ended.sum()) >= len(ended):
            keep = (~ended).nonzero().squeeze(1)
            steps.select(keep)
            alive, tokens, position, ended = alive[keep], tokens[keep], position[keep], ended[keep]
        position = position + 1
        logits = steps.step(tokens, position)
    return responses.tolist()
