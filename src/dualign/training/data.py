"""Training data for the policy steps: preference pairs with fixed reference log-probabilities, and prompt batches
for the exact step. Tensors are indexed a whole batch at a time (`__getitems__`); shuffling is seeded per epoch so a
resumed run sees the same order as an uninterrupted one."""
from __future__ import annotations

import contextlib
import logging

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dualign.core.dpo import row_logprobs
from dualign.errors import ConfigError
from dualign.util import distributed, seeds
from dualign.util.progress import bar
from dualign.util.timing import stage

log = logging.getLogger("dualign")


class TensorBatches(Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        sizes = {t.shape[0] for t in tensors.values()}
        assert len(sizes) == 1, f"tensors disagree on length: {sizes}"
        self.tensors, self.size = tensors, sizes.pop()

    def __len__(self):
        return self.size

    def __getitems__(self, indices):
        index = torch.as_tensor(indices)
        return {key: value[index] for key, value in self.tensors.items()}

    def __getitem__(self, i):
        return self.__getitems__([i])


class EpochShuffle(Sampler):
    """The epoch's order from a seeded permutation, split over ranks: rank r takes every world_size-th position
    (padded by repeating the first indices so every rank gets the same count). With B / world_size items per rank and
    batch, the ranks' batches of a step together hold exactly the one-process batch, so the averaged gradient is the same.
    Lightning's own distributed sampler is turned off (it would permute positions again)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before every epoch
        self.epoch = epoch

    def __len__(self):
        return -(-self.size // distributed.world_size())

    def __iter__(self):
        order = list(range(self.size))
        if self.shuffle:
            generator = torch.Generator().manual_seed(seeds.seed("epoch_order", self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        world = distributed.world_size()
        if world == 1:
            return iter(order)
        order += order[: (-len(order)) % world]
        return iter(order[distributed.rank()::world])


def loader(dataset: TensorBatches, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=EpochShuffle(len(dataset), seed, shuffle), collate_fn=lambda batch: batch
    )


def pad_right(sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])


@torch.no_grad()
def sequence_logprobs(model, input_ids, attention_mask, response_mask, allowed_token_ids=None, batch_size=1024,
                      autocast_dtype: torch.dtype | None = None, group_logprobs=None) -> torch.Tensor:
    """Response log-probabilities of many sequences under a frozen model, in batches, [B]. autocast_dtype: the
    training precision's autocast (bf16-mixed, 16-mixed), and group_logprobs: the task's own computation where the
    policy step uses it (Task.group_logprobs), so that reference log-probs cached here equal the policy's own at
    initialisation (the DPO log-ratio starts at exactly 0)."""
    device = next(model.parameters()).device
    autocast = (torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=False) if autocast_dtype is not None
                else contextlib.nullcontext())
    out = []
    with bar(input_ids.shape[0], "log-probabilities", "seq") as progress:
        for start in range(0, input_ids.shape[0], batch_size):
            part = slice(start, start + batch_size)
            width = int(attention_mask[part].sum(-1).max())  # right padding: columns past the longest row are padding
            ids, mask = input_ids[part, :width].to(device), attention_mask[part, :width].to(device)
            with autocast:  # the whole step as training runs it, log-softmax included
                logps = row_logprobs(model, ids, mask, response_mask[part, :width].to(device), allowed_token_ids,
                                     group_logprobs)
                out.append(logps.float().cpu())
            progress.update(ids.shape[0])
    return torch.cat(out)


def tokenized(prompt_ids: list[list[int]], rollouts, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, response_mask) [n, T] of prompt + response, right-padded for the loss."""
    sequences = [prompt_ids[p] + r for p, r in zip(rollouts.prompt_index.tolist(), rollouts.response_ids)]
    lengths = torch.tensor([len(prompt_ids[p]) for p in rollouts.prompt_index.tolist()])
    input_ids = pad_right(sequences, pad_id)
    attention_mask = pad_right([[1] * len(s) for s in sequences], 0)
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    response_mask = ((positions >= lengths.unsqueeze(1)) & attention_mask.bool()).long()
    return input_ids, attention_mask, response_mask


def preference_pairs(
    prompt_ids: list[list[int]],
    rollouts,
    scores: torch.Tensor,
    reference,
    pad_id: int,
    num_iterations: int,
    seed: int,
    allowed_token_ids: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    batch_size: int = 1024,
    autocast_dtype: torch.dtype | None = None,
    labels: torch.Tensor | None = None,
) -> TensorBatches:
    """Pairs (y0, y1) = consecutive rollouts of the same prompt, with their scores ([1 + m, n]: reward first) and
    reference log-probabilities computed once here (or given, from a cache) and reused by every iteration and epoch.
    labels [pairs]: given preferences (1: y1 preferred, a dataset's own labels), which the DPO step then learns
    instead of labels from the scores."""
    n = len(rollouts.response_ids)
    first, second = torch.arange(0, n, 2), torch.arange(1, n, 2)
    if not torch.equal(rollouts.prompt_index[first], rollouts.prompt_index[second]):
        raise ValueError("rollouts must hold an even number of responses per prompt to be paired")
    input_ids, attention_mask, response_mask = tokenized(prompt_ids, rollouts, pad_id)
    if ref_logps is None:
        with stage("reference log-probs"):
            ref_logps = sequence_logprobs(reference, input_ids, attention_mask, response_mask, allowed_token_ids, batch_size,
                                          autocast_dtype)
    pair = lambda t: torch.stack([t[first], t[second]], dim=1)  # noqa: E731
    # one column of uniforms per iteration, each from its own seed, so a column does not depend on the run's length
    uniforms = [torch.rand(len(first), generator=torch.Generator().manual_seed(seeds.seed("pair_labels", seed, t)))
                for t in range(num_iterations)]
    given = {} if labels is None else {"label": torch.as_tensor(labels, dtype=torch.float32).view(len(first))}
    return TensorBatches(
        {
            **given,
            "input_ids": pair(input_ids),
            "attention_mask": pair(attention_mask),
            "response_mask": pair(response_mask),
            "ref_logps": pair(ref_logps),
            "reward": pair(scores[0]),
            "utility": torch.stack([scores[1:, first], scores[1:, second]], dim=2).transpose(0, 1),
            "label_uniform": torch.stack(uniforms, dim=1),
        }
    )


def response_groups(prompt_ids: list[list[int]], rollouts, scores: torch.Tensor, reference, pad_id: int,
                    group_size: int | None = None, allowed_token_ids: torch.Tensor | None = None,
                    ref_logps: torch.Tensor | None = None, batch_size: int = 1024,
                    autocast_dtype: torch.dtype | None = None, group_logprobs=None) -> TensorBatches:
    """Groups of responses to one prompt for the all-pairs and listwise policy steps: [G, K, ...] tensors, a group
    being the rollouts of one prompt (in prompt-major order), or consecutive chunks of `group_size` of them.

    Within a group, samples that are the same response with the same scores are kept once, with `count` the number
    of samples it stands for (the losses weight by it, so this changes no value or gradient); groups are padded to the
    largest with count 0. Reference log-probabilities are computed once per distinct response (or given per sample,
    from a cache), not once per pair."""
    prompt_index = rollouts.prompt_index
    starts = [0] + [i for i in range(1, len(prompt_index)) if prompt_index[i] != prompt_index[i - 1]]
    counts = torch.diff(torch.tensor(starts + [len(prompt_index)]))
    size = group_size or int(counts.max())
    if (counts % size).any():
        raise ConfigError(f"policy_step.group_size={size}: prompts hold {sorted(set(counts.tolist()))} responses, not a "
                          "multiple of it; set a divisor (2: pairs)")
    if len(set(prompt_index[starts].tolist())) != len(starts):
        raise ValueError("rollouts must hold each prompt's responses together (prompt-major order)")
    input_ids, attention_mask, response_mask = tokenized(prompt_ids, rollouts, pad_id)
    # one row per (group, response, scores); prompt-major order puts a group's samples together
    group_of = torch.arange(len(prompt_index)) // size
    score_bits = scores.float().T.contiguous().view(torch.int32).long()  # equal floats, equal keys
    keys = torch.cat([group_of.unsqueeze(1), input_ids, attention_mask, score_bits], dim=1)
    unique, inverse, count = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((len(unique),), len(keys), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(keys)), reduce="amin")  # the first sample of each distinct row
    if ref_logps is None:
        with stage("reference log-probs"):
            ref_logps = sequence_logprobs(reference, input_ids[first], attention_mask[first], response_mask[first],
                                          allowed_token_ids, batch_size, autocast_dtype, group_logprobs)
    else:
        ref_logps = ref_logps[first]
    log.info("policy-step data: %d groups, %d distinct responses of %d samples (%.1f a group)",
             int(group_of[-1]) + 1, len(unique), len(keys), len(unique) / (int(group_of[-1]) + 1))
    group = unique[:, 0].contiguous()
    slot = torch.arange(len(unique)) - torch.searchsorted(group, group)  # position within its group
    groups, width = int(group[-1]) + 1, int(slot.max()) + 1

    def padded(values: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((groups, width, *values.shape[1:]), fill, dtype=values.dtype)
        out[group, slot] = values
        return out

    return TensorBatches({
        "input_ids": padded(input_ids[first], pad_id), "attention_mask": padded(attention_mask[first], 0),
        "response_mask": padded(response_mask[first], 0), "ref_logps": padded(ref_logps, 0.0),
        "reward": padded(scores[0, first], 0.0), "utility": padded(scores[1:, first].T, 0.0).transpose(1, 2),  # [G, m, K]
        "count": padded(count, 0), "group_index": torch.arange(groups),
    })


def policy_step_data(policy_step, prompt_ids, rollouts, scores, reference, pad_id: int, num_iterations: int,
                     seed: int, allowed_token_ids=None, ref_logps=None, batch_size: int = 1024,
                     autocast_dtype=None, group_logprobs=None) -> TensorBatches:
    """The DPO step's data as policy_step.pairs asks: consecutive pairs, or groups of a prompt's responses."""
    if policy_step.pairs == "consecutive":
        return preference_pairs(prompt_ids, rollouts, scores, reference, pad_id, num_iterations, seed, allowed_token_ids,
                                ref_logps=ref_logps, batch_size=batch_size, autocast_dtype=autocast_dtype)
    return response_groups(prompt_ids, rollouts, scores, reference, pad_id, policy_step.group_size, allowed_token_ids,
                           ref_logps=ref_logps, batch_size=batch_size, autocast_dtype=autocast_dtype,
                           group_logprobs=group_logprobs)


def prompt_batches(num_prompts: int, steps_per_epoch: int) -> TensorBatches:
    """For the exact step: steps_per_epoch passes over all prompts (one full batch each with batch_size=num_prompts)."""
    return TensorBatches({"prompt_index": torch.arange(num_prompts).repeat(steps_per_epoch)})
