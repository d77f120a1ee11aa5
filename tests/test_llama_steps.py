"""dualign's own prefill and decode steps for Llama-family models (models/llama_steps.py) give the logits of the
model's own forward with transformers' cache (models/decode.ModelSteps), through left padding, grouped-query
attention, attention biases, the K-fold repeat of a prefill and rows leaving the batch; with LoRA adapters on (the
policy) and off (pi_ref's adapter-disabled view)."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dualign.models.decode import ModelSteps, left_padded, steps_for
from dualign.models.hf import AdapterDisabled
from dualign.models.llama_steps import LlamaSteps

SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "qwen2":  # q, k, v biases
        return Qwen2ForCausalLM(Qwen2Config(**SIZES, use_sliding_window=False)).eval()
    return LlamaForCausalLM(LlamaConfig(**SIZES, attention_bias=kind == "llama_bias", mlp_bias=kind == "llama_bias")).eval()


def _run(steps, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits after the prefill, two steps for 2 samples a prompt, then a step after some rows left."""
    input_ids, mask = left_padded(prompts, 0, "cpu")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = [steps.prefill(input_ids, mask, positions, 4)]
        steps.repeat(2)
        position = positions[:, -1].repeat_interleave(2)
        generator = torch.Generator().manual_seed(1)
        for _ in range(2):
            position = position + 1
            out.append(steps.step(torch.randint(3, 97, (len(position),), generator=generator), position))
        keep = torch.tensor([0, 3, 4])
        steps.select(keep)
        out.append(steps.step(torch.tensor([5, 6, 7]), position[keep] + 1))
    return out


PROMPTS = [[5, 6, 7, 8, 9, 10], [3, 4], [11, 12, 13]]


@pytest.mark.parametrize("native", [True, False])  # a decode step's attention in C (models/native.py) or torch
@pytest.mark.parametrize("kind", ["llama", "llama_bias", "qwen2"])
def test_steps_match_the_models_forward(kind, native):
    model = _model(kind)
    assert LlamaSteps.supports(model)
    for ours, theirs in zip(_run(LlamaSteps(model, native=native), PROMPTS), _run(ModelSteps(model), PROMPTS)):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_with_smollm2_head_shapes(dtype):
    """SmolLM2's attention shapes (head_dim 64, 3 query heads a key/value head: the C kernel's vector path) in both
    dtypes: the C attention gives the torch path's logits."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=384, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(dtype).eval()
    native, torch_path = _run(LlamaSteps(model), PROMPTS), _run(LlamaSteps(model, native=False), PROMPTS)
    assert LlamaSteps(model).native is not None or pytest.skip("no C compiler here")
    tolerance = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for ours, theirs in zip(native, torch_path):
        torch.testing.assert_close(ours.float(), theirs.float(), **tolerance)
    if dtype == torch.float32:
        for ours, theirs in zip(native, _run(ModelSteps(model), PROMPTS)):
            torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_lora_adapters_are_folded_in_and_off_for_the_reference():
    base = _model("llama")
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # adapters away from their identity start
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    policy.eval()
    reference = AdapterDisabled(policy)
    with_adapters, without = _run(LlamaSteps(policy), PROMPTS), _run(LlamaSteps(reference), PROMPTS)
    for ours, theirs in zip(with_adapters, _run(ModelSteps(policy), PROMPTS)):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    for ours, theirs in zip(without, _run(ModelSteps(reference), PROMPTS)):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    assert (with_adapters[0] - without[0]).abs().max() > 1e-2  # the adapters do change the logits


def test_other_architectures_use_their_own_forward():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    assert isinstance(steps_for(gpt2), ModelSteps)
    windowed = LlamaForCausalLM(LlamaConfig(**SIZES))
    windowed.config.model_type, windowed.config.sliding_window = "mistral", 8
    assert not LlamaSteps.supports(windowed)
