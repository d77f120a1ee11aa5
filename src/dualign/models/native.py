"""The decode loop's kernels in C, compiled on first use for this CPU and loaded with ctypes: a decode step's
attention and top-p sampling (decode_kernels.c), and the element-wise work of a Llama layer's step: RMSNorm with
the residual add, the rotary embedding with the cache writes, SiLU(gate) * up (layer_kernels.c).

Why C: at a decode step each (row, key/value head) pair has a handful of query rows, and torch's batched products
for matrices that small run far below the memory bandwidth (the attention was a fifth of a SmolLM2 decode step on
2 cores); top-p sampling over a 49k vocabulary took a dozen torch ops and passes over the logits (a tenth of it);
the element-wise work was a dozen small ops a layer, each paying torch's dispatch.
The kernels need only a C compiler (`cc`, gcc or clang; no Python headers, no torch build):
the library is built once per source, compiler and CPU (`-march=native`), in about two seconds, into
`$DUALIGN_NATIVE_CACHE` (default: ~/.cache/dualign/native), and loaded into the process. OpenMP comes from the
libgomp torch already loaded, so the kernels share torch's threads.

Where they cannot be built (no compiler, another OS) the decode loop keeps its torch code, after one log line
saying why. `DUALIGN_NATIVE=0` turns them off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from filelock import FileLock

log = logging.getLogger("dualign")
SOURCES = [Path(__file__).with_name(name) for name in ("decode_kernels.c", "layer_kernels.c")]
HEADERS = [Path(__file__).with_name("bfloat16.h")]
COMPILE_FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-fPIC"]
TYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


POINTER, INT, FLOAT, THREADS = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {  # the C functions (one per type: name_float32, name_bfloat16) and their arguments
    "attend": [POINTER] * 6 + [INT] * 7 + [THREADS],
    "top_p_sample": [POINTER, INT, INT, FLOAT, FLOAT, POINTER, INT, POINTER, THREADS],
    "add_rms_norm": [POINTER] * 4 + [INT, INT, FLOAT, THREADS],
    "rotary_cache": [POINTER] * 7 + [INT] * 7 + [THREADS],
    "silu_mul": [POINTER, POINTER, INT, INT, THREADS],
}


class Kernels:
    """The compiled library's functions for float32 and bfloat16 CPU tensors."""

    def __init__(self, library: ctypes.CDLL):
        self.functions: dict[str, dict[torch.dtype, ctypes._CFuncPtr]] = {}
        for name, arguments in SIGNATURES.items():
            self.functions[name] = {}
            for dtype, type_name in TYPES.items():
                function = getattr(library, f"{name}_{type_name}")
                function.argtypes = arguments
                # attend and rotary_cache return 1 for an index out of range (begin, source, position)
                function.restype = ctypes.c_int if name in ("attend", "rotary_cache") else None
                self.functions[name][dtype] = function

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, begin: torch.Tensor,
               end: int, source: torch.Tensor | None = None, shared: int = 0,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """out [rows, kv_heads, group, dim] = softmax(queries . keys) . values over the positions [begin[row], end);
        queries [rows, kv_heads, group, dim] (scaled), keys and values [rows, kv_heads, length, dim], begin and
        source [rows] int64 (positions below `shared` are read from row source[row]'s cache, which holds the same
        ones); all contiguous, float32 or bfloat16, on the CPU."""
        rows, kv_heads, group, dim = queries.shape
        length = keys.shape[2]
        source = torch.arange(rows, dtype=torch.int64) if source is None else source
        if keys.shape != (rows, kv_heads, length, dim) or values.shape != keys.shape:
            raise ValueError(f"decode attention: keys {tuple(keys.shape)} and values {tuple(values.shape)} do not "
                             f"match queries {tuple(queries.shape)}")
        if not (0 < end <= length and 0 <= shared <= end) or any(
                t.dtype != torch.int64 or t.shape != (rows,) for t in (begin, source)):
            raise ValueError(f"decode attention: end {end} outside (0, {length}], shared {shared} outside [0, end], "
                             f"or begin / source not int64 [{rows}]")
        out = torch.empty_like(queries) if out is None else out
        tensors = (queries, keys, values, begin, source, out)
        if not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors) or out.shape != queries.shape \
                or not queries.dtype == keys.dtype == values.dtype == out.dtype or queries.dtype not in TYPES:
            raise ValueError("decode attention: contiguous CPU tensors of one dtype (float32 or bfloat16) expected")
        if self.functions["attend"][queries.dtype](
                queries.data_ptr(), keys.data_ptr(), values.data_ptr(), begin.data_ptr(), source.data_ptr(),
                out.data_ptr(), rows, kv_heads, group, length, shared, end, dim, torch.get_num_threads()):
            raise ValueError("decode attention: a row with no position to attend, or a source row out of range")
        return out

    def top_p_sample(self, logits: torch.Tensor, temperature: float, top_p: float, tries: int = 16) -> torch.Tensor:
        """One token per row of logits [n, V] (float32 or bfloat16, CPU) from softmax(logits / temperature)
        restricted to its top-p nucleus; models/decode.top_p_sample's definition and method. The uniforms come from
        torch's generator; rows whose `tries` draws all fell outside the nucleus draw again."""
        logits = logits.contiguous()
        _check("top_p_sample", logits)
        if logits.dim() != 2 or not temperature > 0 or not 0 < top_p <= 1:
            raise ValueError(f"top_p_sample: logits [n, V] (got {tuple(logits.shape)}), temperature > 0 (got "
                             f"{temperature}) and top_p in (0, 1] (got {top_p}) expected")
        tokens = rows = None  # rows: those still drawing; None: all of them
        while True:
            chunk = logits if rows is None else logits[rows]
            uniforms = torch.rand(chunk.shape[0], tries)
            drawn = torch.empty(chunk.shape[0], dtype=torch.int64)
            self.functions["top_p_sample"][logits.dtype](chunk.data_ptr(), chunk.shape[0], chunk.shape[1],
                                                         1.0 / temperature, top_p, uniforms.data_ptr(), tries,
                                                         drawn.data_ptr(), torch.get_num_threads())
            if rows is None:
                tokens = drawn
                rows = (drawn < 0).nonzero().squeeze(1)
            else:
                tokens[rows] = drawn
                rows = rows[drawn < 0]
            if len(rows) == 0:
                return tokens

    # the element-wise work of a layer's step (layer_kernels.c); contiguous tensors of one dtype, as LlamaSteps
    # passes them

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     epsilon: float) -> torch.Tensor:
        """x += delta in place (unless None), then weight * RMSNorm(x) as transformers' LlamaRMSNorm."""
        _check("add_rms_norm", x, weight, *(() if delta is None else (delta,)))
        width = x.shape[-1]
        if weight.shape != (width,) or (delta is not None and delta.shape != x.shape):
            raise ValueError(f"add_rms_norm: weight {tuple(weight.shape)} or delta "
                             f"{None if delta is None else tuple(delta.shape)} does not match x {tuple(x.shape)}")
        out = torch.empty_like(x)
        self.functions["add_rms_norm"][x.dtype](x.data_ptr(), None if delta is None else delta.data_ptr(),
                                                weight.data_ptr(), out.data_ptr(), x.numel() // width, width,
                                                epsilon, torch.get_num_threads())
        return out

    def rotary_cache(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, slot: int, heads: int) -> torch.Tensor:
        """A decode step's queries [rows, heads, dim], rotated; writes position `slot` of keys (rotated) and values
        [rows, kv_heads, length, dim]. qkv: [rows, heads + 2 kv_heads, dim]; cos, sin: [positions, dim] tables."""
        rows, kv_heads, length, dim = keys.shape
        _check("rotary_cache", qkv, cos, sin, keys, values)
        if qkv.shape != (rows, heads + 2 * kv_heads, dim) or values.shape != keys.shape or cos.shape != sin.shape \
                or cos.shape[1:] != (dim,) or not 0 <= slot < length or position.shape != (rows,) \
                or position.dtype != torch.int64:
            raise ValueError(f"rotary_cache: qkv {tuple(qkv.shape)}, cos/sin {tuple(cos.shape)}, position "
                             f"{tuple(position.shape)} do not match keys {tuple(keys.shape)} and {heads} heads, or "
                             f"slot {slot} is outside the cache")
        queries = qkv.new_empty(rows, heads, dim)
        if self.functions["rotary_cache"][qkv.dtype](
                qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), position.contiguous().data_ptr(), queries.data_ptr(),
                keys.data_ptr(), values.data_ptr(), rows, heads, kv_heads, dim, length, slot, cos.shape[0],
                torch.get_num_threads()):
            raise ValueError(f"rotary_cache: a position outside the rotary table's {cos.shape[0]} rows")
        return queries

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up for gate_up [..., 2 width] (gate first)."""
        _check("silu_mul", gate_up)
        width = gate_up.shape[-1] // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], width)
        self.functions["silu_mul"][gate_up.dtype](gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * width),
                                                  width, torch.get_num_threads())
        return out


def _check(name: str, *tensors: torch.Tensor) -> None:
    first = tensors[0]
    if first.dtype not in TYPES or not all(
            t.dtype == first.dtype and t.is_contiguous() and t.device.type == "cpu" for t in tensors):
        raise ValueError(f"{name}: contiguous CPU tensors of one dtype (float32 or bfloat16) expected")


@functools.lru_cache(maxsize=None)
def kernels(variant: str = "native") -> Kernels | None:
    """The compiled kernels, or None (logged once) where they cannot be built. The other variants are for the
    tests, to run each code path on one CPU: "no-bf16" without the AVX512-BF16 instructions, "portable" without
    any CPU-specific code (the loops any CPU runs)."""
    if os.environ.get("DUALIGN_NATIVE", "1") == "0":
        return None
    try:
        return Kernels(ctypes.CDLL(str(_build(variant))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("dualign: the decode loop's C kernels are not available (%s); its torch code is used instead",
                    error)
        return None


VARIANTS = {"native": ["-march=native"], "no-bf16": ["-march=native", "-mno-avx512bf16"], "portable": []}


def _build(variant: str = "native") -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if platform.system() != "Linux" or compiler is None:
        raise RuntimeError(f"needs Linux and a C compiler (found {platform.system()}, compiler {compiler})")
    flags = COMPILE_FLAGS + VARIANTS[variant]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    texts = [path.read_text() for path in SOURCES + HEADERS]
    key = hashlib.sha256("\n".join([*texts, compiler, version, " ".join(flags), _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("DUALIGN_NATIVE_CACHE") or Path.home() / ".cache/dualign/native")
    library = folder / f"decode_kernels-{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(library) + ".lock"):  # DDP ranks and sweep jobs build it once
        if library.exists():
            return library
        with tempfile.TemporaryDirectory(dir=folder) as staging:
            objects = [str(Path(staging) / source.with_suffix(".o").name) for source in SOURCES]
            for source, target in zip(SOURCES, objects):
                _run([compiler, *flags, f"-I{source.parent}", "-c", str(source), "-o", target])
            built = Path(staging) / library.name
            # linked without -ffast-math, which would link crtfastmath.o: flushing denormals process-wide
            try:  # glibc's vector math (libmvec) serves the vectorised expf on x86-64
                _run([compiler, "-shared", "-fopenmp", *objects, "-o", str(built), "-lmvec", "-lm"])
            except RuntimeError:
                _run([compiler, "-shared", "-fopenmp", *objects, "-o", str(built), "-lm"])
            os.replace(built, library)
    return library


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"`{' '.join(command)}` failed: {(result.stderr or result.stdout).strip()[:300]}")


def _cpu_flags() -> str:
    """-march=native builds for this CPU: a cache shared between machines (a home folder on a cluster) keeps one
    library per CPU model."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()
