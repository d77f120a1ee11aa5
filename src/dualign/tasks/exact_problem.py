"""The exact task: a constrained alignment problem small enough to enumerate every response.

P prompts "p0".."p{P-1}", responses of exactly L tokens over a K-token alphabet "t0".."t{K-1}" (N = K**L per prompt).
Reward and utilities are seeded tables with per-position and pairwise terms; every utility is negatively correlated
with the reward so that constraints bind. pi_ref is a tiny GPT-2 after a short SFT on samples from a seeded,
prompt-dependent teacher, cached on disk. Log-probabilities of all P x N responses under any policy come from one
forward pass over the P x K**(L-1) response prefixes (each prefix holds the conditionals of K responses).
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from dualign.config.tasks import ExactTaskConfig, TinyModelConfig
from dualign.core.dpo import response_logprobs
from dualign.models.decode import nucleus_log_softmax
from dualign.models.rollout import Rollouts
from dualign.util import seeds
from dualign.util.cache import cached_folder
from dualign.util.timing import stage


def build_tokenizer(num_prompts: int, num_response_tokens: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in code: special tokens, prompt words and the response alphabet."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"p{i}" for i in range(num_prompts)]
    words += [f"t{k}" for k in range(num_response_tokens)]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


class TableScorer:
    """A scorer backed by a [P, N] table over the exact task's prompts and enumerated responses."""

    def __init__(self, name: str, table: torch.Tensor, task: "ExactProblem"):
        self.name, self.table, self.task = name, table, task

    def __call__(self, prompts, responses, finished=None):  # every enumerated response has its full length
        return self.table[self.task.prompt_indices(prompts), self.task.response_indices(responses)]


def _seeded_tables(cfg: ExactTaskConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward [P, N] and utilities [U, P, N]: standardised sums of per-position and pairwise terms."""
    P, K, L = cfg.num_prompts, cfg.num_response_tokens, cfg.response_length
    generator = torch.Generator().manual_seed(seeds.seed("exact_tables", cfg.seed))
    tokens = _enumerate_tokens(K, L)  # [N, L]

    def random_table():
        unary = torch.randn(P, L, K, generator=generator)
        pairwise = torch.randn(P, L, L, K, K, generator=generator) * cfg.pairwise_scale
        table = sum(unary[:, t, tokens[:, t]] for t in range(L))
        for s in range(L):
            for t in range(s + 1, L):
                table = table + pairwise[:, s, t, tokens[:, s], tokens[:, t]]
        return (table - table.mean()) / table.std()

    reward = random_table()
    rho = cfg.utility_correlation
    utilities = torch.stack(
        [rho * reward + (1 - rho**2) ** 0.5 * random_table() for _ in range(cfg.num_utilities)]
    ) if cfg.num_utilities else torch.empty(0, P, K**L)
    return reward, utilities


def _enumerate_tokens(K: int, L: int) -> torch.Tensor:
    """All K**L responses as alphabet indices [N, L], response n = base-K digits of n (first token most significant)."""
    n = torch.arange(K**L)
    return torch.stack([(n // K ** (L - 1 - t)) % K for t in range(L)], dim=1)


class ExactProblem:
    def __init__(self, cfg: ExactTaskConfig):
        self.cfg = cfg
        P, K, L = cfg.num_prompts, cfg.num_response_tokens, cfg.response_length
        self.tokenizer = build_tokenizer(P, K)
        self.prompts = [f"p{i}" for i in range(P)]
        self.alphabet = [f"t{k}" for k in range(K)]
        self.response_tokens = _enumerate_tokens(K, L)  # [N, L] alphabet indices
        self.responses = [" ".join(self.alphabet[k] for k in row) for row in self.response_tokens.tolist()]
        self.allowed_token_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(self.alphabet))
        bos = self.tokenizer.bos_token_id
        self.prompt_token_ids = [[bos, i] for i in self.tokenizer.convert_tokens_to_ids(self.prompts)]
        self.reward_table, self.utility_tables = _seeded_tables(cfg)
        self._prompt_lookup = {p: i for i, p in enumerate(self.prompts)}
        self._token_lookup = {t: k for k, t in enumerate(self.alphabet)}
        # token id -> prompt index / alphabet index (-1: neither), for reading rows of token ids (sequence_logprobs)
        self._token_to_prompt = torch.full((len(self.tokenizer),), -1, dtype=torch.long)
        self._token_to_prompt[torch.tensor(self.prompt_token_ids)[:, -1]] = torch.arange(P)
        self._token_to_letter = torch.full((len(self.tokenizer),), -1, dtype=torch.long)
        self._token_to_letter[self.allowed_token_ids] = torch.arange(K)

    @property
    def max_new_tokens(self) -> int:  # every response has exactly response_length tokens
        return self.cfg.response_length

    min_new_tokens = max_new_tokens

    @property
    def num_responses(self) -> int:
        return len(self.responses)

    def scorers(self) -> dict[str, TableScorer]:
        named = {"reward": TableScorer("reward", self.reward_table, self)}
        for i, table in enumerate(self.utility_tables):
            named[f"utility_{i}"] = TableScorer(f"utility_{i}", table, self)
        return named

    def prompt_indices(self, prompts) -> torch.Tensor:
        try:
            return torch.tensor([self._prompt_lookup[p] for p in prompts])
        except KeyError as missing:
            raise ValueError(f"prompt {missing} is not one of the exact task's prompts") from None

    def response_indices(self, responses) -> torch.Tensor:
        K, L = self.cfg.num_response_tokens, self.cfg.response_length
        index = []
        for text in responses:
            words = text.split()
            if len(words) != L or any(w not in self._token_lookup for w in words):
                raise ValueError(f"response {text!r} is not {L} tokens of the exact task's alphabet")
            value = 0
            for w in words:
                value = value * K + self._token_lookup[w]
            index.append(value)
        return torch.tensor(index)

    def sequences(self, prompt_index: torch.Tensor, response_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, 2 + L] of (prompt, response) pairs and their response masks."""
        prompt = torch.tensor(self.prompt_token_ids)[prompt_index]
        response = self.allowed_token_ids[self.response_tokens[response_index]]
        input_ids = torch.cat([prompt, response], dim=1)
        mask = torch.zeros_like(input_ids)
        mask[:, prompt.shape[1] :] = 1
        return input_ids, mask

    def sequence_logprobs(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """log pi(y|x) of full (prompt, response) rows [R, 2 + L], differentiable: the response trees of the rows'
        distinct prompts are walked once (enumerate_logprobs) and each row's leaf is read off. Equal to a forward pass
        over the rows, at P' * (Lp + K + ... + K**(L-1)) tokens for P' distinct prompts instead of R * (Lp + L): a
        group of a few hundred responses to one prompt costs about a tenth of its flat forward pass."""
        K, L = self.cfg.num_response_tokens, self.cfg.response_length
        device = input_ids.device
        prompt_width = len(self.prompt_token_ids[0])
        prompt = self._token_to_prompt.to(device)[input_ids[:, prompt_width - 1]]
        letters = self._token_to_letter.to(device)[input_ids[:, prompt_width:prompt_width + L]]
        if input_ids.shape[1] < prompt_width + L or (prompt < 0).any() or (letters < 0).any():
            raise ValueError(f"rows are not (prompt, {L}-token response) sequences of the exact task")
        response = (letters * K ** torch.arange(L - 1, -1, -1, device=device)).sum(-1)
        distinct, row_prompt = torch.unique(prompt, return_inverse=True)
        return self.enumerate_logprobs(model, distinct.cpu())[row_prompt, response]

    def enumerate_logprobs(self, model, prompt_index: torch.Tensor | None = None,
                           next_token: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Exact log pi(y|x) for every response, [len(prompt_index), N], differentiable.

        Walks the response tree with the KV cache: the prompts once, then every prefix of length t branches into
        its K children. Each tree node is computed once: P * (Lp + K + ... + K**(L-1)) tokens in all, against
        P * N * (Lp + L) for a forward pass over every full sequence. next_token maps a node's logits over the
        alphabet [rows, K] to its next-token log-probs (default: log_softmax; sampling: temperature and top-p).
        """
        K, L = self.cfg.num_response_tokens, self.cfg.response_length
        next_token = next_token or (lambda logits: logits.float().log_softmax(-1))
        if prompt_index is None:
            prompt_index = torch.arange(self.cfg.num_prompts)
        device = next(model.parameters()).device
        allowed = self.allowed_token_ids.to(device)
        prompt = torch.tensor(self.prompt_token_ids)[prompt_index].to(device)  # [B, Lp]
        # the cache goes in positionally: transformers 4.x names it past_key_values, 5.x cache; the model fills it
        cache = DynamicCache(config=model.config)
        logits = model(prompt, cache, use_cache=True).logits
        levels = [next_token(logits[:, -1, allowed])]  # [B * K**t, K] for t = 0 .. L-1
        for _ in range(1, L):
            cache.batch_repeat_interleave(K)  # every prefix branches into its K continuations
            children = allowed.repeat(levels[-1].shape[0]).unsqueeze(1)
            logits = model(children, cache, use_cache=True).logits
            levels.append(next_token(logits[:, -1, allowed]))
        B, N = prompt.shape[0], self.num_responses
        tokens = self.response_tokens.to(device)  # [N, L]
        total = torch.zeros(B, N, device=device)
        for t, level in enumerate(levels):
            # row of response n's length-t prefix inside prompt b's block of K**t rows
            prefix = torch.arange(N, device=device) // K ** (L - t)
            total = total + level.view(B, K**t, K)[:, prefix, tokens[:, t]]
        return total

    @torch.no_grad()
    def sample(self, model, prompts: list[str], samples: int, seed: int, temperature: float = 1.0,
               top_p: float = 1.0) -> Rollouts:
        """`samples` responses to each prompt (prompt-major), drawn from the model's exact response distribution
        under temperature and top-p (generation.backend=enumerate). Token by token sampling with the same settings
        draws from this same distribution: each tree node's next-token law is the decode loop's
        (nucleus_log_softmax), and a response's probability is the product along its path. One walk of the tree
        and one multinomial draw a prompt, instead of a decode loop over every sample."""
        was_training = model.training
        model.eval()
        prompt_index = self.prompt_indices(prompts)
        settings = lambda logits: nucleus_log_softmax(logits, temperature, top_p)  # noqa: E731
        probs = self.enumerate_logprobs(model, prompt_index, settings).double().exp().cpu()
        model.train(was_training)
        generator = torch.Generator().manual_seed(seed)
        drawn = torch.multinomial(probs, samples, replacement=True, generator=generator)  # [B, samples]
        row_prompt = torch.arange(len(prompts)).repeat_interleave(samples)
        response_ids = self.allowed_token_ids[self.response_tokens[drawn.reshape(-1)]].tolist()
        return Rollouts(prompt_index=row_prompt, response_ids=response_ids,
                        prompts=[prompts[i] for i in row_prompt.tolist()],
                        responses=[self.responses[n] for n in drawn.reshape(-1).tolist()], finished=None)


def tiny_gpt2(tokenizer, model_cfg: TinyModelConfig, max_positions: int) -> GPT2LMHeadModel:
    """A tiny GPT-2 built from a config, no dropout (the exact oracle must describe the trained function)."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=max_positions, n_embd=model_cfg.n_embd, n_layer=model_cfg.n_layer,
        n_head=model_cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def _teacher_samples(task: ExactProblem) -> torch.Tensor:
    """Responses [P * S] (indices) from a seeded autoregressive teacher whose next-token logits depend on the prompt,
    the position and the previous token."""
    cfg = task.cfg
    P, K, L, S = cfg.num_prompts, cfg.num_response_tokens, cfg.response_length, cfg.sft_samples_per_prompt
    generator = torch.Generator().manual_seed(seeds.seed("exact_teacher", cfg.seed))
    logits = torch.randn(P, L, K + 1, K, generator=generator) * cfg.teacher_sharpness  # previous token K = none
    previous = torch.full((P, S), K)
    index = torch.zeros(P, S, dtype=torch.long)
    prompt = torch.arange(P).unsqueeze(1).expand(P, S)
    for t in range(L):
        probs = logits[prompt, t, previous].softmax(-1)
        token = torch.multinomial(probs.reshape(-1, K), 1, generator=generator).reshape(P, S)
        index, previous = index * K + token, token
    return index


def reference_policy(task: ExactProblem, model_cfg: TinyModelConfig, cache_dir: str | os.PathLike) -> GPT2LMHeadModel:
    """pi_ref: the tiny model after SFT on teacher samples; trained once per (task, model) config and cached
    (atomically; an entry that does not load or whose outputs are not finite is retrained)."""
    def build(folder: Path) -> None:
        with stage("pi_ref SFT"):
            model = _sft_reference(task, model_cfg)
        model.save_pretrained(folder)
        task.tokenizer.save_pretrained(folder)

    def load(folder: Path) -> GPT2LMHeadModel:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = model(torch.tensor(task.prompt_token_ids[:1])).logits
        if not torch.isfinite(logits).all():
            raise ValueError("cached pi_ref gives non-finite logits")
        return model

    key = {"task": asdict(task.cfg), "model": asdict(model_cfg)}
    return cached_folder(cache_dir, "exact_reference", key, build, load)


def _sft_reference(task: ExactProblem, model_cfg: TinyModelConfig) -> GPT2LMHeadModel:
    cfg = task.cfg
    torch.manual_seed(seeds.seed("exact_init", cfg.seed))
    model = tiny_gpt2(task.tokenizer, model_cfg, max_positions=2 + cfg.response_length)
    samples = _teacher_samples(task)  # [P, S]
    prompt_index = torch.arange(cfg.num_prompts).unsqueeze(1).expand_as(samples).reshape(-1)
    input_ids, response_mask = task.sequences(prompt_index, samples.reshape(-1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seeds.seed("exact_sft_batches", cfg.seed))
    model.train()
    for _ in tqdm(range(cfg.sft_steps), desc="SFT of pi_ref (exact task, cached afterwards)", leave=False):
        batch = torch.randint(0, input_ids.shape[0], (cfg.sft_batch_size,), generator=generator)
        logits = model(input_ids=input_ids[batch]).logits
        loss = -response_logprobs(logits, input_ids[batch], response_mask[batch], task.allowed_token_ids).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()
