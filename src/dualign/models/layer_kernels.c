/* The element-wise work of a Llama layer's decode step (models/llama_steps.py), built and loaded with the decode
   kernels by models/native.py: RMSNorm (with the residual add before it), the rotary embedding with the writes of
   keys and values into the cache, and SiLU(gate) * up.

   Why: in torch each of these is several ops (RMSNorm: a cast, the norm, a cast back, the weight; the rotary
   embedding: a concatenation and two products; two cache writes; a copy of the queries), each a pass over the
   batch's activations with ~10 us of dispatch, about a quarter of a SmolLM2 decode step at batch 64. Here each is
   one pass. The results round where transformers' bf16 modules round (after the norm and again after the weight;
   after the SiLU and again after the product), so they are the torch path's up to the float32 order of sums.

   Element types: float32 (`_float32`) and bfloat16 as uint16 (`_bfloat16`); rows are split between threads. */
#include <math.h>
#include <stdint.h>

#include "bfloat16.h"

/* x <- x + delta (delta may be NULL), then out = weight * RMSNorm(x): transformers' LlamaRMSNorm (float32 norm,
   cast to the type, times the weight). x, delta, out: [rows, width]; weight: [width]. */
#define ADD_RMS_NORM(TYPE, T, LOAD, STORE)                                                                    \
    void add_rms_norm_##TYPE(T* x, const T* delta, const T* weight, T* out, int64_t rows, int64_t width,      \
                             float epsilon, int threads) {                                                    \
        _Pragma("omp parallel for num_threads(threads) schedule(static)") for (int64_t row = 0; row < rows; ++row) { \
            T* xr = x + row * width;                                                                          \
            T* o = out + row * width;                                                                         \
            if (delta) {                                                                                      \
                const T* d = delta + row * width;                                                             \
                _Pragma("omp simd") for (int64_t i = 0; i < width; ++i) xr[i] = STORE(LOAD(xr[i]) + LOAD(d[i])); \
            }                                                                                                 \
            float squares = 0.0f;                                                                             \
            _Pragma("omp simd reduction(+ : squares)") for (int64_t i = 0; i < width; ++i)                   \
                squares += LOAD(xr[i]) * LOAD(xr[i]);                                                         \
            const float scale = 1.0f / sqrtf(squares / (float)width + epsilon);                               \
            _Pragma("omp simd") for (int64_t i = 0; i < width; ++i)                                          \
                o[i] = STORE(LOAD(weight[i]) * LOAD(STORE(LOAD(xr[i]) * scale)));                             \
        }                                                                                                     \
    }
ADD_RMS_NORM(float32, float, LOAD_FLOAT32, STORE_FLOAT32)
ADD_RMS_NORM(bfloat16, uint16_t, LOAD_BFLOAT16, STORE_BFLOAT16)

/* One decode step's rotary embedding and cache writes. qkv: [rows, heads + 2 kv_heads, dim] (the fused
   projection of one token a row); cos, sin: [positions, dim] tables (sin with rotate_half's sign folded in);
   position: [rows] int64, below `positions` (the tables' rows). Writes queries [rows, heads, dim] (rotated), and
   position `slot` of keys (rotated) and values, [rows, kv_heads, length, dim]. Rounds as transformers'
   x * cos + rotate_half(x) * sin does in torch. Returns 1 (nothing written) for a position past the tables. */
#define ROTARY_CACHE(TYPE, T, LOAD, STORE)                                                                    \
    static inline void rotate_##TYPE(const T* x, const T* cos, const T* sin, T* out, int64_t dim) {           \
        const int64_t half = dim / 2;                                                                         \
        _Pragma("omp simd") for (int64_t d = 0; d < dim; ++d) {                                               \
            const float turned = LOAD(STORE(LOAD(x[d < half ? d + half : d - half]) * LOAD(sin[d])));         \
            out[d] = STORE(turned + LOAD(x[d]) * LOAD(cos[d]));                                               \
        }                                                                                                     \
    }                                                                                                         \
    int rotary_cache_##TYPE(const T* qkv, const T* cos, const T* sin, const int64_t* position, T* queries,   \
                            T* keys, T* values, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim,   \
                            int64_t length, int64_t slot, int64_t positions, int threads) {                   \
        for (int64_t row = 0; row < rows; ++row) /* 1: a position past the tables */                          \
            if (position[row] < 0 || position[row] >= positions) return 1;                                    \
        _Pragma("omp parallel for num_threads(threads) schedule(static)") for (int64_t row = 0; row < rows; ++row) { \
            const T* x = qkv + row * (heads + 2 * kv_heads) * dim;                                            \
            const T *c = cos + position[row] * dim, *s = sin + position[row] * dim;                           \
            for (int64_t h = 0; h < heads; ++h) rotate_##TYPE(x + h * dim, c, s, queries + (row * heads + h) * dim, dim); \
            for (int64_t h = 0; h < kv_heads; ++h) {                                                          \
                const int64_t at = ((row * kv_heads + h) * length + slot) * dim;                              \
                rotate_##TYPE(x + (heads + h) * dim, c, s, keys + at, dim);                                   \
                memcpy(values + at, x + (heads + kv_heads + h) * dim, sizeof(T) * (size_t)dim);               \
            }                                                                                                 \
        }                                                                                                     \
        return 0;                                                                                             \
    }
ROTARY_CACHE(float32, float, LOAD_FLOAT32, STORE_FLOAT32)
ROTARY_CACHE(bfloat16, uint16_t, LOAD_BFLOAT16, STORE_BFLOAT16)

/* out = SiLU(gate) * up, gate_up: [rows, 2 width] (gate, then up), out: [rows, width]; rounded after the SiLU and
   after the product, as torch's two ops */
#define SILU_MUL(TYPE, T, LOAD, STORE)                                                                        \
    void silu_mul_##TYPE(const T* gate_up, T* out, int64_t rows, int64_t width, int threads) {               \
        _Pragma("omp parallel for num_threads(threads) schedule(static)") for (int64_t row = 0; row < rows; ++row) { \
            const T *gate = gate_up + row * 2 * width, *up = gate + width;                                    \
            T* o = out + row * width;                                                                         \
            _Pragma("omp simd") for (int64_t i = 0; i < width; ++i) {                                         \
                const float g = LOAD(gate[i]);                                                                \
                /* exp's argument capped: -ffast-math assumes no infinity, and SiLU(g) is 0 in float there */  \
                const float silu = g / (1.0f + expf(fminf(-g, 80.0f)));                                       \
                o[i] = STORE(LOAD(STORE(silu)) * LOAD(up[i]));                                                \
            }                                                                                                 \
        }                                                                                                     \
    }
SILU_MUL(float32, float, LOAD_FLOAT32, STORE_FLOAT32)
SILU_MUL(bfloat16, uint16_t, LOAD_BFLOAT16, STORE_BFLOAT16)
