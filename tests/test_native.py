"""The decode loop's C kernels (models/native.py): the attention of a decode step against a float64 reference
(left padding skipped, a prompt read from another row, float32 and bfloat16; the AVX-512 path with and without its
bfloat16 instructions, and the portable one), a layer's element-wise kernels against the torch ops they replace,
top-p sampling against the distribution it must draw from, and the build's failures turning into the torch code."""
from __future__ import annotations

import logging

import pytest
import torch

from dualign.models import native
from dualign.models.decode import nucleus_log_softmax, top_p_sample

LIBRARIES = {variant: native.kernels(variant) for variant in native.VARIANTS}
pytestmark = pytest.mark.skipif(LIBRARIES["native"] is None, reason="no C compiler here")


def _reference(queries, keys, values, begin, end, source, shared):
    """softmax(q . k) . v in float64 over [begin, end), positions below `shared` from row source[row]."""
    queries, keys, values = (t.double() for t in (queries, keys, values))
    out = torch.empty_like(queries)
    for row in range(queries.shape[0]):
        k = torch.cat([keys[source[row], :, :shared], keys[row, :, shared:]], 1)[:, begin[row]:end]
        v = torch.cat([values[source[row], :, :shared], values[row, :, shared:]], 1)[:, begin[row]:end]
        out[row] = torch.softmax(queries[row] @ k.transpose(-1, -2), -1) @ v
    return out


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,dim", [(3, 64), (8, 128), (2, 16), (9, 64)])  # vector path, then the portable one
def test_attention_matches_the_float64_reference(library, dtype, group, dim):
    kernels = LIBRARIES[library]
    if kernels is None:
        pytest.skip("not built")
    generator = torch.Generator().manual_seed(0)
    rows, kv_heads, length, end, shared = 6, 2, 40, 33, 12
    queries = torch.randn(rows, kv_heads, group, dim, generator=generator).div(dim ** 0.5).to(dtype)
    keys = torch.randn(rows, kv_heads, length, dim, generator=generator).to(dtype)
    values = torch.randn(rows, kv_heads, length, dim, generator=generator).to(dtype)
    begin = torch.tensor([0, 0, 5, 5, 11, 32])  # left padding; the last row has one position
    source = torch.tensor([0, 0, 2, 2, 4, 4])  # pairs of samples of three prompts
    keys[1, :, :shared] = values[1, :, :shared] = float("nan")  # never read: row 1 reads its prompt from row 0
    out = kernels.attend(queries, keys, values, begin, end, source, shared)
    expected = _reference(queries, keys, values, begin, end, source, shared)
    # bfloat16: the output's own rounding (2^-9 relative) and the probabilities rounded to bf16 as torch rounds them
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=8e-3)
    torch.testing.assert_close(out.double(), expected, **tolerance)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_kernels_match_the_torch_ops_they_replace(library, dtype):
    """RMSNorm after a residual add, the rotary embedding with the cache writes, SiLU(gate) * up: as the torch
    path of models/llama_steps.py computes them, rounding where it rounds."""
    kernels = LIBRARIES[library]
    if kernels is None:
        pytest.skip("not built")
    generator = torch.Generator().manual_seed(0)
    rows, hidden, heads, kv_heads, dim, length, slot = 5, 96, 6, 2, 16, 12, 7
    exact = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)  # bf16: 1 ulp

    x, delta = (torch.randn(rows, 1, hidden, generator=generator).to(dtype) for _ in range(2))
    weight = torch.rand(hidden, generator=generator).add(0.5).to(dtype)
    expected_x = x + delta
    expected = (torch.nn.functional.rms_norm(expected_x.float(), (hidden,), eps=1e-5).to(dtype) * weight)
    normed = kernels.add_rms_norm(x, delta, weight, 1e-5)
    torch.testing.assert_close(x, expected_x, atol=0, rtol=0)  # the residual, in place
    torch.testing.assert_close(normed, expected, **exact)
    torch.testing.assert_close(kernels.add_rms_norm(x, None, weight, 1e-5), expected, **exact)

    qkv = torch.randn(rows, heads + 2 * kv_heads, dim, generator=generator).to(dtype)
    cos, sin = torch.rand(20, dim, generator=generator).to(dtype), torch.rand(20, dim, generator=generator).to(dtype)
    position = torch.tensor([3, 0, 19, 7, 7])
    keys, values = torch.zeros(rows, kv_heads, length, dim, dtype=dtype), torch.zeros(rows, kv_heads, length, dim, dtype=dtype)
    queries = kernels.rotary_cache(qkv, cos, sin, position, keys, values, slot, heads)
    half = dim // 2
    turned = torch.cat((qkv[..., half:], qkv[..., :half]), -1)
    rotated = (turned * sin[position][:, None]).addcmul_(qkv, cos[position][:, None])  # torch's order of rounding
    torch.testing.assert_close(queries, rotated[:, :heads], **exact)
    torch.testing.assert_close(keys[:, :, slot], rotated[:, heads : heads + kv_heads], **exact)
    torch.testing.assert_close(values[:, :, slot], qkv[:, heads + kv_heads :], atol=0, rtol=0)
    assert keys[:, :, :slot].abs().sum() == 0 and values[:, :, slot + 1 :].abs().sum() == 0  # one slot written

    gate_up = torch.randn(rows, 1, 2 * hidden, generator=generator).mul(4).to(dtype)
    gate_up[0, 0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # SiLU's tails and its zero
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, **exact)


def test_kernels_reject_inconsistent_inputs():
    """Out-of-range indices are caught in C before anything is read or written; shapes and types in Python."""
    kernels = LIBRARIES["native"]
    queries, keys = torch.zeros(2, 1, 3, 64), torch.zeros(2, 1, 8, 64)
    with pytest.raises(ValueError, match="no position to attend"):
        kernels.attend(queries, keys, keys, torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError, match="source row out of range"):
        kernels.attend(queries, keys, keys, torch.tensor([0, 0]), 5, torch.tensor([0, 2]), 3)
    with pytest.raises(ValueError, match="do not match"):
        kernels.attend(queries, keys, keys[:, :, :, :32], torch.tensor([0, 0]), 5)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.attend(queries.double(), keys.double(), keys.double(), torch.tensor([0, 0]), 5)
    qkv, table = torch.zeros(2, 5, 64), torch.zeros(10, 64)
    with pytest.raises(ValueError, match="outside the rotary table"):
        kernels.rotary_cache(qkv, table, table, torch.tensor([3, 10]), keys, keys.clone(), 2, heads=3)
    with pytest.raises(ValueError, match="do not match"):
        kernels.rotary_cache(qkv, table, table, torch.tensor([3, 4]), keys, keys.clone(), 2, heads=2)
    with pytest.raises(ValueError, match="does not match"):
        kernels.add_rms_norm(torch.zeros(2, 64), None, torch.zeros(32), 1e-5)
    with pytest.raises(ValueError, match="top_p in"):
        kernels.top_p_sample(torch.zeros(2, 10), 1.0, 0.0)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.9), (0.7, 0.6), (1.3, 1.0)])
def test_top_p_sampling_draws_from_the_nucleus_distribution(library, dtype, temperature, top_p):
    kernels = LIBRARIES[library]
    if kernels is None:
        pytest.skip("not built")
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 600, generator=generator) * 3).to(dtype)  # 600: three blocks of 256, the last short
    logits[1, logits[1].argmax()] = float("-inf")  # a masked token: never drawn, however likely it was
    logits[2, :590] = float("-inf")  # ten tokens left, all in the last block
    expected = nucleus_log_softmax(logits.float(), temperature, top_p).exp()
    draws = 20000
    torch.manual_seed(1)
    tokens = kernels.top_p_sample(logits.repeat_interleave(draws, 0), temperature, top_p).view(4, draws)
    observed = torch.stack([torch.bincount(t, minlength=600) for t in tokens]).float() / draws
    assert (observed[expected == 0] == 0).all()  # nothing outside the nucleus, nothing masked
    # total variation against its expected size from sampling noise alone (mean absolute deviation of a binomial
    # frequency: sqrt(2 p (1 - p) / (pi n)))
    noise = 0.5 * (2 * expected * (1 - expected) / (torch.pi * draws)).sqrt().sum(-1)
    assert (0.5 * (observed - expected).abs().sum(-1) < 1.5 * noise + 0.005).all()


def test_top_p_sampling_in_c_and_in_torch_agree_and_rejected_rows_draw_again():
    """A flat distribution with top_p 0.1: most draws (82%) fall outside its nucleus of two tokens, so rows go
    through several rounds of fresh uniforms (tries=1); the frequencies still match the torch sampler's."""
    logits = (torch.arange(50) * 0.1).repeat(2, 1)
    torch.manual_seed(2)
    ours = LIBRARIES["native"].top_p_sample(logits.repeat_interleave(5000, 0), 1.0, 0.1, tries=1)
    theirs = top_p_sample(logits.repeat_interleave(5000, 0), 1.0, 0.1, native=False)
    ours_counts, theirs_counts = (torch.bincount(t, minlength=50).float() / len(t) for t in (ours, theirs))
    assert set(ours.unique().tolist()) == set(theirs.unique().tolist()) == {48, 49}
    assert 0.5 * (ours_counts - theirs_counts).abs().sum() < 0.03


def test_a_failed_build_leaves_the_torch_code_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("DUALIGN_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails
    native.kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="dualign"):
            assert native.kernels() is None
        assert "torch code is used instead" in caplog.text
        monkeypatch.delenv("CC")
        monkeypatch.setenv("DUALIGN_NATIVE", "0")
        native.kernels.cache_clear()
        assert native.kernels() is None
        assert not list(tmp_path.glob("*.so"))
    finally:
        native.kernels.cache_clear()


def test_the_library_is_built_once_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("DUALIGN_NATIVE_CACHE", str(tmp_path))
    first = native._build("native")
    assert first.parent == tmp_path and first.exists()
    built_at = first.stat().st_mtime_ns
    assert native._build("native") == first and first.stat().st_mtime_ns == built_at  # reused
    assert native._build("portable") != first  # other flags, another library
