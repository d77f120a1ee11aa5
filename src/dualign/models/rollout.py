"""The rollout path: sample K responses per prompt from a causal LM (batched with length-sorted prompts, KV cache
through `generate`), and the rollout stage's on-disk form (a `datasets` dataset with prompts, responses, token
counts and scores)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from dualign.models.decode import decode, left_padded, steps_for
from dualign.util.progress import bar


@dataclass
class Rollouts:
    prompt_index: torch.Tensor  # [n] index of the prompt each response answers
    response_ids: list[list[int]]  # generated tokens up to and including EOS (the stop is part of the response)
    prompts: list[str]
    responses: list[str]  # decoded without special tokens
    finished: list[bool] | None = None  # ended with EOS (False: cut at max_new_tokens); None: every response is whole


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
    cache: str = "dynamic",
    backend: str = "hf",
) -> Rollouts:
    """num_samples responses for every prompt, prompt-major order. Deterministic for a given seed.

    Prompts are grouped by length (left padding only up to the longest prompt of each batch) and every batch of
    `batch_size` sequences is one `generate` call (backend=hf) or one run of dualign's decode loop (backend=fast,
    models/decode.py), so the KV cache serves all K samples of a prompt together."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    processors = LogitsProcessorList([AllowedTokens(allowed_token_ids.to(device))] if allowed_token_ids is not None else [])
    prompts_per_batch = max(1, batch_size // num_samples)
    by_length = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # stable: equal lengths keep order
    outputs: dict[int, list[list[int]]] = {}
    steps = steps_for(model, min(batch_size, len(prompt_ids) * num_samples)) if backend == "fast" else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            bar(len(prompt_ids) * num_samples, "rollouts", "seq") as progress:
        torch.manual_seed(seed)
        for start in range(0, len(by_length), prompts_per_batch):
            members = by_length[start : start + prompts_per_batch]
            chunk = [prompt_ids[i] for i in members]
            if backend == "fast":
                rows = decode(model, chunk, num_samples, max_new_tokens, pad_token_id=pad_id,
                              eos_token_id=tokenizer.eos_token_id, temperature=temperature, top_p=top_p,
                              min_new_tokens=min_new_tokens, allowed_token_ids=allowed_token_ids, steps=steps)
            else:
                rows = _generate(model, chunk, num_samples, max_new_tokens, pad_id, tokenizer.eos_token_id, temperature,
                                 top_p, min_new_tokens, processors, cache)
            for row, tokens in enumerate(rows):
                if tokenizer.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
                outputs.setdefault(members[row // num_samples], []).append(tokens)
            progress.update(len(members) * num_samples)
    model.train(was_training)
    index = [i for i in range(len(prompt_ids)) for _ in range(num_samples)]
    generated = [tokens for i in range(len(prompt_ids)) for tokens in outputs[i]]
    prompt_index = torch.tensor(index)
    return Rollouts(
        prompt_index=prompt_index,
        response_ids=generated,
        prompts=[prompts[i] for i in index],
        responses=tokenizer.batch_decode(generated, skip_special_tokens=True),
        finished=ended_with(generated, tokenizer.eos_token_id),
    )


def _generate(model, chunk, num_samples, max_new_tokens, pad_id, eos_id, temperature, top_p, min_new_tokens,
              processors, cache) -> list[list[int]]:
    """One `generate` call for prompts `chunk`: their generated tokens, K rows a prompt (padding after EOS)."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_padded(chunk, pad_id, device)
    width = input_ids.shape[1]
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
        # static: a preallocated KV cache written in place (the dynamic one concatenates every step)
        **({"cache_implementation": "static"} if cache == "static" else {}),
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    return output[:, width:].tolist()


def ended_with(response_ids: list[list[int]], eos_token_id: int) -> list[bool]:
    return [bool(ids) and ids[-1] == eos_token_id for ids in response_ids]


def to_dataset(rollouts: Rollouts, scores: torch.Tensor, names: list[str]):
    """The rollout stage's stored form: one row per response, with its prompt, token count and every score."""
    import datasets

    columns = {
        "prompt_index": rollouts.prompt_index.tolist(),
        "prompt": rollouts.prompts,
        "response": rollouts.responses,
        "response_ids": rollouts.response_ids,
        "response_tokens": [len(ids) for ids in rollouts.response_ids],
        "finished": rollouts.finished if rollouts.finished is not None else [True] * len(rollouts.responses),
    }
    columns.update({f"score/{name}": scores[i].tolist() for i, name in enumerate(names)})
    return datasets.Dataset.from_dict(columns)


def from_dataset(dataset, names: list[str], expected_rows: int | None = None) -> tuple[Rollouts, torch.Tensor]:
    """Back from the stored form; raises ValueError when rows or score columns are not what the caller expects."""
    missing = [c for c in ["prompt_index", "prompt", "response", "response_ids", "finished"] + [f"score/{n}" for n in names]
               if c not in dataset.column_names]
    if missing:
        raise ValueError(f"rollout dataset lacks column {missing[0]!r}")
    if expected_rows is not None and len(dataset) != expected_rows:
        raise ValueError(f"rollout dataset has {len(dataset)} rows, expected {expected_rows}")
    columns = dataset.to_dict()
    rollouts = Rollouts(torch.tensor(columns["prompt_index"], dtype=torch.long), columns["response_ids"],
                        columns["prompt"], columns["response"], columns["finished"])
    scores = torch.tensor([columns[f"score/{n}"] for n in names], dtype=torch.float32).reshape(len(names), len(dataset))
    return rollouts, scores
