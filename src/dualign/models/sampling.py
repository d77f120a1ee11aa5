"""The one rollout path: responses of a model to a set of prompts, scored by the run's scorers. pi_ref's rollouts,
the dual step's, the policy-gradient step's and the evaluation's all come through `Sampler.sample`."""
from __future__ import annotations

import torch

from dualign.models.rollout import Rollouts, sample_responses
from dualign.models.vllm_backend import VLLMGenerator  # imports vllm only when an engine is made
from dualign.util import timing


class Sampler:
    """generation.* applied to a task's prompts: the tokenizer, the response length and the allowed tokens come from
    the task, the backend (transformers generate, dualign's decode loop, vLLM on GPU, or the exact task's draw from
    its enumerated response tree) from the config."""

    def __init__(self, generation, tokenizer, max_new_tokens: int, min_new_tokens: int = 0,
                 allowed_token_ids: torch.Tensor | None = None, scorers=None, vllm_settings=None, reference=None,
                 enumerator=None):
        self.generation, self.tokenizer = generation, tokenizer
        self.enumerator = enumerator  # backend=enumerate: the task's exact sampler (tasks with an enumerable tree)
        self.max_new_tokens, self.min_new_tokens, self.allowed_token_ids = max_new_tokens, min_new_tokens, allowed_token_ids
        self.scorers, self.reference = scorers, reference
        self._vllm_settings, self._vllm = vllm_settings, None

    def sample(self, model, prompt_set, prompt_index, samples: int, seed: int, score: bool = True
               ) -> tuple[Rollouts, torch.Tensor | None]:
        """`samples` responses per chosen prompt of `prompt_set` (.prompts, .prompt_token_ids) from `model`, with
        their scores [1 + m, n] (None when score=False); rollouts.prompt_index indexes prompt_set."""
        chosen = [int(i) for i in prompt_index]
        with timing.stage("rollouts (generate)"):
            rollouts = self._generate(model, [prompt_set.prompts[i] for i in chosen],
                                      [prompt_set.prompt_token_ids[i] for i in chosen], samples, seed)
        rollouts.prompt_index = torch.tensor(chosen, dtype=torch.long)[rollouts.prompt_index]  # back to prompt_set's
        if not score:
            return rollouts, None
        with timing.stage("scoring"):
            return rollouts, self.scorers.score_rollouts(rollouts)

    def _generate(self, model, prompts, prompt_ids, samples: int, seed: int) -> Rollouts:
        generation = self.generation
        if generation.backend == "enumerate":
            return self.enumerator(model, prompts, samples, seed, generation.temperature, generation.top_p)
        if generation.backend == "vllm":
            if self._vllm is None:
                self._vllm = VLLMGenerator(self._vllm_settings)
            return self._vllm.sample(model, self.reference, self.tokenizer, prompts, prompt_ids, samples,
                                     self.max_new_tokens, seed, generation.temperature, generation.top_p,
                                     self.min_new_tokens)
        return sample_responses(
            model, self.tokenizer, prompts, prompt_ids, samples, self.max_new_tokens, seed=seed,
            temperature=generation.temperature, top_p=generation.top_p, min_new_tokens=self.min_new_tokens,
            allowed_token_ids=self.allowed_token_ids, batch_size=generation.batch_size, cache=generation.cache,
            backend=generation.backend,
        )
