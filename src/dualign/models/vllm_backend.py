"""generation.backend=vllm: rollouts through vLLM for GPU users (optional dependency: `pip install vllm`).

The engine loads pi_ref (model.name_or_path) once. pi_ref's rollouts use the base weights; a LoRA policy's rollouts
save its current adapter to a temporary folder and pass it as a LoRARequest, so the engine never needs the training
weights. A fully fine-tuned policy (model.lora.enabled=false) would need its weights copied into the engine at every
dual step; that is refused in one line (use generation.backend=hf). Not run on the CPU machine this was written on.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from dualign.errors import LoadError
from dualign.models.rollout import Rollouts, ended_with


class VLLMGenerator:
    def __init__(self, cfg):
        try:
            from vllm import LLM
        except ImportError:
            raise LoadError("generation.backend=vllm needs the vllm package (pip install vllm, on a CUDA machine); "
                            "or use generation.backend=hf") from None
        model = cfg.model
        self.lora = model.lora.enabled
        self.llm = LLM(model=model.name_or_path, tokenizer=model.tokenizer or model.name_or_path, revision=model.revision,
                       dtype="auto" if model.dtype == "auto" else model.dtype, seed=cfg.seed,
                       trust_remote_code=model.trust_remote_code, enable_lora=self.lora,
                       max_lora_rank=model.lora.r if self.lora else 16,
                       gpu_memory_utilization=cfg.generation.vllm_memory_fraction)
        self.version = 0
        self.adapters = Path(tempfile.mkdtemp(prefix="dualign-vllm-"))

    def _lora_request(self, model, reference):
        if model is reference:
            return None  # pi_ref: the engine's own base weights
        from peft import PeftModel

        if not self.lora or not isinstance(model, PeftModel):
            raise LoadError("generation.backend=vllm samples pi_ref and LoRA policies; a fully fine-tuned policy needs "
                            "generation.backend=hf")
        from vllm.lora.request import LoRARequest

        self.version += 1  # a new id each time: the adapter changes between dual steps
        folder = self.adapters / f"v{self.version}"
        model.save_pretrained(folder)
        return LoRARequest(f"policy-{self.version}", self.version, str(folder))

    def sample(self, model, reference, tokenizer, prompts, prompt_ids, num_samples, max_new_tokens, seed,
               temperature=1.0, top_p=1.0, min_new_tokens=0) -> Rollouts:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                min_tokens=min_new_tokens, seed=seed)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids], params,
                                    lora_request=self._lora_request(model, reference), use_tqdm=False)
        index, generated = [], []
        eos = tokenizer.eos_token_id
        for i, output in enumerate(outputs):
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                if sample.finish_reason == "stop" and (not tokens or tokens[-1] != eos):
                    tokens.append(eos)  # the stop is part of the response, as in the hf backend
                generated.append(tokens)
                index.append(i)
        return Rollouts(torch.tensor(index), generated, [prompts[i] for i in index],
                        tokenizer.batch_decode(generated, skip_special_tokens=True), ended_with(generated, eos))
