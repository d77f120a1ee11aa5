"""The rollout path: sample K responses per prompt from a causal LM (batched, KV cache through `generate`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList


@dataclass
class Rollouts:
    prompt_index: torch.Tensor  # [n] index of the prompt each response answers
    response_ids: list[list[int]]  # generated tokens, padding and EOS removed
    prompts: list[str]
    responses: list[str]


class AllowedTokens(LogitsProcessor):
    """Restricts sampling to a response alphabet (the exact task's policies are defined that way)."""

    def __init__(self, allowed_token_ids: torch.Tensor):
        self.allowed_token_ids = allowed_token_ids

    def __call__(self, input_ids, scores):
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.allowed_token_ids] = scores[:, self.allowed_token_ids]
        return masked


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: list[str],
    prompt_ids: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    allowed_token_ids: torch.Tensor | None = None,
    batch_size: int = 4096,
) -> Rollouts:
    """num_samples responses for every prompt, prompt-major order. Deterministic for a given seed."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    processors = LogitsProcessorList([AllowedTokens(allowed_token_ids.to(device))] if allowed_token_ids is not None else [])
    prompts_per_batch = max(1, batch_size // num_samples)
    index, generated = [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompt_ids), prompts_per_batch):
            chunk = prompt_ids[start : start + prompts_per_batch]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)  # left padding
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                num_return_sequences=num_samples,
                logits_processor=processors,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row, tokens in enumerate(output[:, width:].tolist()):
                if tokenizer.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
                generated.append(tokens)
                index.append(start + row // num_samples)
    model.train(was_training)
    prompt_index = torch.tensor(index)
    return Rollouts(
        prompt_index=prompt_index,
        response_ids=generated,
        prompts=[prompts[i] for i in index],
        responses=tokenizer.batch_decode(generated, skip_special_tokens=True),
    )
