"""Prefill and decode steps for Llama-family causal LMs (llama, mistral, qwen2), written as plain torch over the
model's own weights, for dualign's decode loop (models/decode.py).

Why: on a CPU, a small model's decode step through transformers spends more time outside the matrix products than
in them (module calls, mask building, the cache's concatenation, SDPA's kernel for one query). Here a step is the
matrix products and a few element-wise ops a layer:
- each layer's q, k, v projections are one matrix product, and so are the MLP's gate and up projections;
- LoRA adapters (peft) are folded into those weights once a decode call (a module is linear in its input, so its
  effective weight is what it gives for the identity); an adapter-disabled view gives the base weights;
- the KV cache is preallocated for prompt + new tokens and written in place;
- on a CPU, for SiLU models, a decode step runs on C kernels between the matrix products (models/native.py,
  `_native_layer`): the attention is one pass over each row's written cache per key/value head, for all its query
  heads, reading a prompt once for its K samples; RMSNorm (with the residual add), the rotary embedding with the
  cache writes, and SiLU(gate) * up are one pass each;
- the prefill, and a step where the kernels cannot be built, is torch (`_layer`): attention as two batched matrix
  products per key/value head without repeating the keys, RMSNorm as torch's fused `rms_norm` (in float32 and cast
  back as transformers'), the model's own activation module;
- the rotary embedding's cos and sin come from a table computed once by the model's own rotary module.

Anything else (another architecture, a sliding window, a position-dependent RoPE, q/k norms) is not supported:
`LlamaSteps.supports` says so, and the decode loop then runs the model's own forward.
"""
from __future__ import annotations

import contextlib

import torch

from dualign.models.native import TYPES, kernels

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq does not depend on the sequence length


def unwrap(model):
    """(the peft wrapper or the model, the transformers model, whether adapters are on), through dualign's
    adapter-disabled view of pi_ref (models/hf.AdapterDisabled)."""
    adapters_on = True
    if hasattr(model, "peft_model"):  # models/hf.AdapterDisabled: pi_ref as the policy with adapters off
        model, adapters_on = model.peft_model, False
    if hasattr(model, "get_base_model"):
        return model, model.get_base_model(), adapters_on
    return model, model, False


class LlamaSteps:
    """Weights gathered from `model` (adapters folded in) once, then any number of prefills, each with its own KV
    cache for the prompts and the new tokens, and decode steps."""

    @staticmethod
    def supports(model) -> bool:
        _, base, _ = unwrap(model)
        config = getattr(base, "config", None)
        inner = getattr(base, "model", None)
        if config is None or getattr(config, "model_type", None) not in SUPPORTED_TYPES or inner is None:
            return False
        if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return False
        if getattr(inner.rotary_emb, "rope_type", "default") not in STATIC_ROPE:
            return False
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
            return False
        layer = inner.layers[0]
        return all(hasattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and \
            all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn")) and \
            not hasattr(layer.self_attn, "q_norm") and \
            all(hasattr(norm, "variance_epsilon") for norm in (layer.input_layernorm, layer.post_attention_layernorm))

    @torch.no_grad()
    def __init__(self, model, rows_hint: int = 64, native: bool = True):
        """native=False: decode steps in torch too (the C kernels' reference in the tests)."""
        wrapper, base, adapters_on = unwrap(model)
        inner, config = base.model, base.config
        self.embed, self.norm = inner.embed_tokens, inner.norm
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.rows_hint, self.rotary = rows_hint, inner.rotary_emb
        weight = next(base.parameters())
        self.dtype, self.device = weight.dtype, weight.device
        disabled = wrapper.disable_adapter() if (wrapper is not base and not adapters_on) else contextlib.nullcontext()
        with disabled:
            self.layers = [self._gather(layer) for layer in inner.layers]
            self.lm_head = Linear(*self._effective(base.lm_head, config.hidden_size), rows_hint)
        self.cos = self.sin = torch.empty(0, self.head_dim, dtype=self.dtype, device=self.device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        silu = getattr(config, "hidden_act", None) in ("silu", "swish")  # the element-wise kernel's activation
        self.native = kernels() if native and silu and self.device.type == "cpu" and self.dtype in TYPES else None

    def _effective(self, module, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [in, out], bias or None) of a module linear in its input, adapters included."""
        if type(module) is torch.nn.Linear:  # no adapter: the weight as it is
            return module.weight.t(), module.bias
        eye = torch.eye(width, dtype=self.dtype, device=self.device)
        zero = torch.zeros(1, width, dtype=self.dtype, device=self.device)
        bias = module(zero)[0]
        weight = (module(eye) - bias).contiguous()
        return weight, (bias if bias.abs().max() > 0 else None)

    def _gather(self, layer) -> dict:
        attention, mlp = layer.self_attn, layer.mlp
        hidden = layer.input_layernorm.weight.shape[0]
        q, k, v = (self._effective(m, hidden) for m in (attention.q_proj, attention.k_proj, attention.v_proj))
        scaling = getattr(attention, "scaling", self.head_dim**-0.5)  # folded into the queries
        q = (q[0] * scaling, None if q[1] is None else q[1] * scaling)
        gate, up = self._effective(mlp.gate_proj, hidden), self._effective(mlp.up_proj, hidden)
        o = self._effective(attention.o_proj, self.heads * self.head_dim)
        down = self._effective(mlp.down_proj, gate[0].shape[1])
        rows = self.rows_hint
        return {
            "input_norm": layer.input_layernorm, "post_norm": layer.post_attention_layernorm, "act": mlp.act_fn,
            "qkv": _fused([q, k, v], rows), "o": Linear(*o, rows),
            "gate_up": _fused([gate, up], rows), "down": Linear(*down, rows),
        }

    # --- the steps -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                new_tokens: int) -> torch.Tensor:
        """Runs the prompts [B, S] (left-padded, mask [B, S]) into a fresh cache with room for `new_tokens` more;
        the last position's logits [B, V]."""
        rows, width = input_ids.shape
        self.length = width + new_tokens
        self._rotary_table(int(positions.max()) + new_tokens + 1)
        # the C attention skips each row's left padding (it needs prompts padded on the left only) and reads the
        # prompt positions of the K samples of a prompt from one of them (`source`)
        self.begin = width - mask.sum(1).to(torch.int64)
        self.source, self.prompt_width = torch.arange(rows, device=self.device), width
        left_padded = bool((mask.bool() == (torch.arange(width, device=mask.device) >= self.begin[:, None])).all())
        self.use_native = self.native is not None and left_padded
        shape = (rows, self.kv_heads, self.length, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        lowest = torch.finfo(self.dtype).min
        # padding stays masked for good; every generated position is valid
        valid = torch.ones(rows, self.length, dtype=torch.bool, device=self.device)
        valid[:, :width] = mask.bool()
        causal = torch.ones(width, self.length, dtype=torch.bool, device=self.device).tril()
        bias = torch.zeros(rows, 1, 1, width, self.length, dtype=self.dtype, device=self.device)
        bias.masked_fill_(~(causal & valid[:, None])[:, None, None], lowest)
        # positions not yet written stay masked until a step writes them
        self.padding = torch.full((rows, self.length), lowest, dtype=self.dtype, device=self.device)
        self.valid = valid
        self.filled = 0
        return self._forward(input_ids, positions, bias)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """One new token per row [N] at its position [N]; the next logits [N, V]."""
        return self._forward(tokens[:, None], position[:, None], self.padding[:, None, None, None])

    def repeat(self, times: int) -> None:
        """Each row's cache `times` times, consecutively (the K samples of a prompt share its prefill)."""
        self.keys = [k.repeat_interleave(times, 0) for k in self.keys]
        self.values = [v.repeat_interleave(times, 0) for v in self.values]
        self.padding = self.padding.repeat_interleave(times, 0)
        self.valid = self.valid.repeat_interleave(times, 0)
        self.begin = self.begin.repeat_interleave(times, 0)
        self.source = self.source.repeat_interleave(times, 0) * times  # the first copy of each

    def select(self, keep: torch.Tensor) -> None:
        """Keeps rows `keep` (the others ended)."""
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]
        self.padding, self.valid, self.begin = self.padding[keep], self.valid[keep], self.begin[keep]
        # rows that read their prompt from the same row hold the same prompt: the first kept one becomes the source
        kept_sources = self.source[keep]
        first = torch.full((int(kept_sources.max()) + 1,), len(keep), dtype=torch.int64, device=keep.device)
        first.scatter_reduce_(0, kept_sources, torch.arange(len(keep), device=keep.device), "amin")
        self.source = first[kept_sources]

    def _rotary_table(self, positions: int) -> None:
        """cos and sin [positions, head_dim] from the model's own rotary module, computed once for all steps."""
        if self.cos.shape[0] >= positions:
            return
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, torch.arange(positions, device=self.device)[None])
        half = self.head_dim // 2
        self.cos = cos[0]
        self.sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)  # rotate_half's sign folded in

    def _reveal(self, start: int, end: int) -> None:
        self.padding[:, start:end].masked_fill_(self.valid[:, start:end], 0.0)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        start, width = self.filled, input_ids.shape[1]
        if start + width > self.length:
            raise ValueError(f"the cache holds {self.length} positions; {start + width} asked")
        self._reveal(start, start + width)  # the positions this call writes, for it (a step) and the steps after it
        x = self.embed(input_ids)
        if width == 1 and self.use_native:
            for index, layer in enumerate(self.layers):
                x = self._native_layer(index, layer, x, positions[:, 0], start)
        else:
            cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # [N, S, 1, head_dim]
            for index, layer in enumerate(self.layers):
                x = self._layer(index, layer, x, cos, sin, start, bias)
        self.filled = start + width
        return self.lm_head(self.norm(x[:, -1]))

    def _native_layer(self, index: int, layer: dict, x, position: torch.Tensor, slot: int) -> torch.Tensor:
        """A decode step's layer on the C kernels (models/native.py): what _layer computes for one position a row,
        with each run of element-wise ops one pass. x [rows, 1, hidden] is updated in place."""
        native, rows, group = self.native, x.shape[0], self.heads // self.kv_heads
        keys, values = self.keys[index], self.values[index]
        norm = layer["input_norm"]
        qkv = layer["qkv"](native.add_rms_norm(x, None, norm.weight, norm.variance_epsilon))
        queries = native.rotary_cache(qkv.view(rows, -1, self.head_dim), self.cos, self.sin, position, keys, values,
                                      slot, self.heads)
        attended = native.attend(queries.view(rows, self.kv_heads, group, self.head_dim), keys, values, self.begin,
                                 slot + 1, self.source, self.prompt_width)
        norm = layer["post_norm"]  # the residual add and the norm in one pass
        normed = native.add_rms_norm(x, layer["o"](attended.view(rows, 1, -1)), norm.weight, norm.variance_epsilon)
        return x.add_(layer["down"](native.silu_mul(layer["gate_up"](normed))))

    def _layer(self, index: int, layer: dict, x, cos, sin, start: int, bias) -> torch.Tensor:
        rows, width, _ = x.shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        group, end = heads // kv_heads, start + width
        qkv = layer["qkv"](_rms_norm(x, layer["input_norm"])).view(rows, width, heads + 2 * kv_heads, head_dim)
        rotated = _rotate(qkv[:, :, : heads + kv_heads], cos, sin)  # queries and keys in one pass
        self.keys[index][:, :, start:end] = rotated[:, :, heads:].transpose(1, 2)
        self.values[index][:, :, start:end] = qkv[:, :, heads + kv_heads :].transpose(1, 2)
        # heads g*group .. g*group + group - 1 share key/value head g (transformers' repeat_kv order); the whole
        # preallocated cache takes part, unwritten positions masked: a view of the first `end` positions is not
        # contiguous, and bf16 batched products copy it. The score scaling is folded into the query weights.
        queries = rotated[:, :, :heads].transpose(1, 2).reshape(rows, kv_heads, group * width, head_dim)
        scores = queries @ self.keys[index].transpose(-1, -2)
        scores = scores.view(rows, kv_heads, group, width, self.length).add_(bias).softmax(-1)
        attended = scores.view(rows, kv_heads, group * width, self.length) @ self.values[index]
        attended = attended.view(rows, heads, width, head_dim).transpose(1, 2).reshape(rows, width, heads * head_dim)
        x = x + layer["o"](attended)
        gate, up = layer["gate_up"](_rms_norm(x, layer["post_norm"])).chunk(2, dim=-1)
        return x.add_(layer["down"](layer["act"](gate).mul_(up)))


def _fused(parts: list[tuple[torch.Tensor, torch.Tensor | None]], rows_hint: int) -> "Linear":
    """One product for several (weight [in, out], bias) of the same input: outputs side by side."""
    weight = torch.cat([w for w, _ in parts], dim=1)
    if all(b is None for _, b in parts):
        return Linear(weight, None, rows_hint)
    bias = torch.cat([b if b is not None else weight.new_zeros(w.shape[1]) for w, b in parts])
    return Linear(weight, bias, rows_hint)


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """transformers' Llama RMSNorm (in float32, cast back, then the weight) in three ops instead of seven."""
    normed = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return normed.to(x.dtype).mul_(norm.weight)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it (x * cos + rotate_half(x) * sin), with rotate_half's sign folded into sin."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1).mul_(sin).addcmul_(x, cos)


class Linear:
    """x @ weight + bias, weight given as [in, out]. On a CPU in bf16/fp16 the weight is reordered once into
    oneDNN's blocked layout (what torch.compile's freezing does), which the plain product otherwise does on every
    call; in float32, `F.linear` on the [out, in] weight (MKL) is faster than a product with [in, out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int):
        self.bias, self.out_features = bias, weight.shape[1]
        self.packed = weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16) and \
            torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        weight = weight.t().contiguous()  # [out, in]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            flat = x.reshape(-1, x.shape[-1])
            flat = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
            return flat.view(*x.shape[:-1], self.out_features)
        return torch.nn.functional.linear(x, self.weight, self.bias)
