/* Two kernels of dualign's decode loop on a CPU (built and loaded by models/native.py): the attention of a decode
   step over a preallocated KV cache (models/llama_steps.py), and top-p sampling (models/decode.py), at the end.

   ---- attention ------------------------------------------------------------------------------------------------

   Why: at a decode step each (row, key/value head) pair attends with only `group` query rows (3 for SmolLM2), and
   torch's batched products for matrices this small run far below the memory bandwidth (about 240 us a layer for
   2.4 MB of keys at batch 64, against about 80 us for the same product when the keys are in cache). Here one pass
   over a pair's written keys and values serves all its query heads: the dot products, the softmax and the
   weighted sum of values, in float32, over the positions [begin[row], end) only (left padding and the positions
   not yet written are skipped, not masked).

   Layouts (all contiguous):
     queries, out: [rows, kv_heads, group, dim]   (the scaling is folded into the queries)
     keys, values: [rows, kv_heads, length, dim]
     begin:        [rows] int64, the first valid position of each row
   Element types: float32 (attend_float32) and bfloat16 as uint16 (attend_bfloat16). The AVX-512 path is used
   where the compiler targets it (-march=native on such a CPU), dim is a multiple of 64 and group at most 8; the
   portable loops otherwise. On that path the scores come 16 positions a vector (their dot products' lanes summed
   by one shuffle tree), the exponentials from an inlined polynomial, and in bfloat16 both products from the
   AVX512-BF16 dot-product instruction where the CPU has it (keys: pairs of dimensions; values: pairs of
   positions). A SmolLM2 step spends as long waiting for the cache's bytes as computing on them: the values are
   prefetched while the keys are worked on.
   The K samples of a prompt share its prefill: `source[row]` names a row whose cache holds the same positions
   below `shared` (the prompt), read from there, so that the prompt is read once for the K rows while it is in
   cache. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bfloat16.h"

#define MAX_GROUP 8 /* query heads per key/value head on the AVX-512 path */
#define BLOCK 4     /* 16-wide vectors of the value sums a pass (64 dimensions) */

/* softmax over s[first:end] in place, first < end (the maximum subtracted; the loops vectorise, expf included,
   under -ffast-math, which also assumes no infinities: none is used) */
static inline void softmax(float* s, int64_t first, int64_t end) {
    float top = s[first], total = 0.0f;
#pragma omp simd reduction(max : top)
    for (int64_t l = first; l < end; ++l) top = s[l] > top ? s[l] : top;
#pragma omp simd reduction(+ : total)
    for (int64_t l = first; l < end; ++l) {
        s[l] = expf(s[l] - top);
        total += s[l];
    }
    const float scale = 1.0f / total;
#pragma omp simd
    for (int64_t l = first; l < end; ++l) s[l] *= scale;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VECTOR_PATH 1

static inline __m512 load_bfloat16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void store_bfloat16(uint16_t* p, __m512 x) { /* round to nearest even (finite values) */
    __m512i bits = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
static inline __mmask16 first_lanes(int64_t count) { return count >= 16 ? 0xffff : (__mmask16)((1u << count) - 1); }

/* r[j] = the sum of v[j]'s 16 lanes, for 16 vectors at once: a tree of adds over transposing shuffles (about 3
   instructions a vector, against about 8 for a reduction each) */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; ++i)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* exp(x) for finite x <= 0: 2^n 2^f, n = round(x log2 e), 2^f = e^(f ln 2) by its Taylor polynomial of degree 6
   (|f ln 2| <= 0.35: relative error about 1e-7). 16 lanes in a dozen instructions, no call. */
static inline __m512 exp_negative(__m512 x) {
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 g = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147181f));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n); /* 0 where 2^n underflows */
}

/* s[0:count] -> exp(s - max s), lanes past count set to 0 (s has room for count rounded up to 16); returns the
   sum. The softmax's division is left to the weighted sums (one multiply per output instead of one per score). */
static inline float exp_scores(float* s, int64_t count) {
    __m512 top = _mm512_set1_ps(-3.0e38f);
    for (int64_t i = 0; i < count; i += 16)
        top = _mm512_mask_max_ps(top, first_lanes(count - i), top, _mm512_loadu_ps(s + i));
    const __m512 largest = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < count; i += 16) {
        const __m512 e = _mm512_maskz_mov_ps(first_lanes(count - i),
                                             exp_negative(_mm512_sub_ps(_mm512_loadu_ps(s + i), largest)));
        _mm512_storeu_ps(s + i, e);
        total = _mm512_add_ps(total, e);
    }
    return _mm512_reduce_add_ps(total);
}

/* q . k as 16 partial sums (their total is the dot product); dim a multiple of 64 */
static inline __m512 dot_float32(const float* q, const float* k, int64_t dim) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
    for (int64_t c = 16; c < dim; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(k + c), acc);
    return acc;
}
#if defined(__AVX512BF16__)
static inline __m512 dot_bfloat16(const uint16_t* q, const uint16_t* k, int64_t dim) {
    /* pairs of bf16 products summed in float32 (the product of two bf16 is exact) */
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < dim; c += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + c), (__m512bh)_mm512_loadu_si512(k + c));
    return acc;
}
#else
static inline __m512 dot_bfloat16(const uint16_t* q, const uint16_t* k, int64_t dim) {
    __m512 acc = _mm512_mul_ps(load_bfloat16(q), load_bfloat16(k));
    for (int64_t c = 16; c < dim; c += 16) acc = _mm512_fmadd_ps(load_bfloat16(q + c), load_bfloat16(k + c), acc);
    return acc;
}
#endif

/* scores[h * stride + l - first] = exp(q[h] . key l - max) for l in [first, end), 16 positions a vector;
   inverse_totals[h] = 1 / their sum. The values are only prefetched. */
#define SCORES(NAME, T, DOT)                                                                                   \
    static inline void NAME(const T* q, const T* keys, const T* shared_keys, const T* values,                  \
                            const T* shared_values, int64_t first, int64_t shared, int64_t end, int64_t dim,    \
                            int group, float* scores, int64_t stride, float* inverse_totals) {                 \
        for (int h = 0; h < group; ++h) {                                                                      \
            const T* qh = q + h * dim;                                                                         \
            for (int64_t l = first; l < end; l += 16) {                                                       \
                __m512 dots[16];                                                                               \
                for (int j = 0; j < 16; ++j)                                                                   \
                    dots[j] = l + j < end ? DOT(qh, (l + j < shared ? shared_keys : keys) + (l + j) * dim, dim) \
                                          : _mm512_setzero_ps();                                               \
                /* the values of these positions, into L2 while the keys are worked on (4% of a SmolLM2 decode) */ \
                for (int j = 0; h == 0 && j < 16 && l + j < end; ++j)                                          \
                    for (int64_t byte = 0; byte < dim * (int64_t)sizeof(T); byte += 64)                        \
                        _mm_prefetch((const char*)((l + j < shared ? shared_values : values) + (l + j) * dim) + byte, \
                                     _MM_HINT_T1);                                                             \
                _mm512_storeu_ps(scores + h * stride + l - first, sum16(dots));                               \
            }                                                                                                  \
            inverse_totals[h] = 1.0f / exp_scores(scores + h * stride, end - first);                           \
        }                                                                                                      \
    }
SCORES(scores_float32, float, dot_float32)
SCORES(scores_bfloat16, uint16_t, dot_bfloat16)

/* out[h] = the weighted sum of values over [first, end) with the weights scores[h] / their total, in float32 FMAs:
   BLOCK x GROUP accumulators, 64 dimensions a pass. GROUP is a constant at each call site (see the dispatch), so the
   accumulators are registers. */
#define VALUES_FMA(TYPE, T, LOAD, STORE)                                                                       \
    static inline __attribute__((always_inline)) void values_fma_##TYPE(                                       \
        const T* values, const T* shared_values, T* out, int64_t first, int64_t shared, int64_t end, int64_t dim, \
        const int GROUP, const float* scores, int64_t stride, const float* inverse_totals) {                   \
        for (int64_t c = 0; c < dim; c += 16 * BLOCK) {                                                        \
            __m512 acc[BLOCK][MAX_GROUP];                                                                      \
            for (int b = 0; b < BLOCK; ++b)                                                                    \
                for (int h = 0; h < GROUP; ++h) acc[b][h] = _mm512_setzero_ps();                               \
            for (int64_t l = first; l < end; ++l) {                                                           \
                const T* v = (l < shared ? shared_values : values) + l * dim + c;                             \
                __m512 p[MAX_GROUP];                                                                           \
                for (int h = 0; h < GROUP; ++h) p[h] = _mm512_set1_ps(scores[h * stride + l - first]);         \
                for (int b = 0; b < BLOCK; ++b) {                                                              \
                    const __m512 vb = LOAD(v + 16 * b);                                                        \
                    for (int h = 0; h < GROUP; ++h) acc[b][h] = _mm512_fmadd_ps(p[h], vb, acc[b][h]);         \
                }                                                                                              \
            }                                                                                                  \
            for (int b = 0; b < BLOCK; ++b)                                                                    \
                for (int h = 0; h < GROUP; ++h)                                                                \
                    STORE(out + h * dim + c + 16 * b, _mm512_mul_ps(acc[b][h], _mm512_set1_ps(inverse_totals[h]))); \
        }                                                                                                      \
    }
VALUES_FMA(float32, float, _mm512_loadu_ps, _mm512_storeu_ps)
VALUES_FMA(bfloat16, uint16_t, load_bfloat16, store_bfloat16)

/* One (row, kv head) pair. Positions below `shared` are read from the pair's source (`shared_keys`,
   `shared_values`). */
static inline __attribute__((always_inline)) void pair_vector_float32(
    const float* q, const float* keys, const float* values, const float* shared_keys, const float* shared_values,
    float* out, int64_t first, int64_t shared, int64_t end, int64_t dim, const int GROUP, float* scores,
    int64_t stride, uint16_t* rounded) {
    (void)rounded;
    float inverse_totals[MAX_GROUP];
    scores_float32(q, keys, shared_keys, values, shared_values, first, shared, end, dim, GROUP, scores, stride,
                   inverse_totals);
    values_fma_float32(values, shared_values, out, first, shared, end, dim, GROUP, scores, stride, inverse_totals);
}

#if defined(__AVX512BF16__)
/* The weighted sum of values with bf16 dot products over pairs of positions: the weights of positions l and l+1
   (rounded to bf16, as transformers' bf16 attention rounds its probabilities) side by side in each 32-bit lane,
   against the two positions' values interleaved (unpack), 32 dimensions a pass, in the unpack's order until the
   store. */
static inline __attribute__((always_inline)) void pair_vector_bfloat16(
    const uint16_t* q, const uint16_t* keys, const uint16_t* values, const uint16_t* shared_keys,
    const uint16_t* shared_values, uint16_t* out, int64_t first, int64_t shared, int64_t end, int64_t dim,
    const int GROUP, float* scores, int64_t stride, uint16_t* rounded) {
    float inverse_totals[MAX_GROUP];
    scores_bfloat16(q, keys, shared_keys, values, shared_values, first, shared, end, dim, GROUP, scores, stride,
                    inverse_totals);
    const int64_t count = end - first, pair_count = (count + 1) / 2;
    for (int h = 0; h < GROUP; ++h) /* zeros past count: an odd last position's partner weighs 0 */
        for (int64_t i = 0; i < count; i += 16)
            _mm256_storeu_si256((__m256i*)(rounded + h * stride + i),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(scores + h * stride + i)));
    /* lanes 4j..4j+3 of the low sums hold dimensions 8j..8j+3, of the high sums 8j+4..8j+7 */
    const __m512i order_low = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i order_high = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int64_t c = 0; c < dim; c += 32) {
        __m512 low[MAX_GROUP], high[MAX_GROUP];
        for (int h = 0; h < GROUP; ++h) low[h] = high[h] = _mm512_setzero_ps();
        for (int64_t i = 0; i < pair_count; ++i) {
            const int64_t l = first + 2 * i, m = l + 1 < end ? l + 1 : l;
            const __m512i a = _mm512_loadu_si512((l < shared ? shared_values : values) + l * dim + c);
            const __m512i b = _mm512_loadu_si512((m < shared ? shared_values : values) + m * dim + c);
            const __m512bh pair_low = (__m512bh)_mm512_unpacklo_epi16(a, b);
            const __m512bh pair_high = (__m512bh)_mm512_unpackhi_epi16(a, b);
            for (int h = 0; h < GROUP; ++h) {
                uint32_t weights;
                memcpy(&weights, rounded + h * stride + 2 * i, sizeof weights);
                const __m512bh both = (__m512bh)_mm512_set1_epi32((int)weights);
                low[h] = _mm512_dpbf16_ps(low[h], both, pair_low);
                high[h] = _mm512_dpbf16_ps(high[h], both, pair_high);
            }
        }
        for (int h = 0; h < GROUP; ++h) {
            const __m512 scale = _mm512_set1_ps(inverse_totals[h]);
            store_bfloat16(out + h * dim + c, _mm512_mul_ps(_mm512_permutex2var_ps(low[h], order_low, high[h]), scale));
            store_bfloat16(out + h * dim + c + 16,
                           _mm512_mul_ps(_mm512_permutex2var_ps(low[h], order_high, high[h]), scale));
        }
    }
}
#else
static inline __attribute__((always_inline)) void pair_vector_bfloat16(
    const uint16_t* q, const uint16_t* keys, const uint16_t* values, const uint16_t* shared_keys,
    const uint16_t* shared_values, uint16_t* out, int64_t first, int64_t shared, int64_t end, int64_t dim,
    const int GROUP, float* scores, int64_t stride, uint16_t* rounded) {
    (void)rounded;
    float inverse_totals[MAX_GROUP];
    scores_bfloat16(q, keys, shared_keys, values, shared_values, first, shared, end, dim, GROUP, scores, stride,
                    inverse_totals);
    values_fma_bfloat16(values, shared_values, out, first, shared, end, dim, GROUP, scores, stride, inverse_totals);
}
#endif
#else
#define VECTOR_PATH 0
#endif

/* One (row, kv head) pair, any group and dim. */
#define PAIR_PORTABLE(NAME, T, LOAD, STORE)                                                                    \
    static void NAME(const T* q, const T* keys, const T* values, const T* shared_keys, const T* shared_values,  \
                     T* out, int64_t first, int64_t shared, int64_t end, int64_t dim, int group, float* query,  \
                     float* scores) {                                                                          \
        for (int64_t i = 0; i < group * dim; ++i) query[i] = LOAD(q[i]);                                       \
        for (int h = 0; h < group; ++h) {                                                                      \
            float* s = scores + h * end;                                                                       \
            const float* qh = query + h * dim;                                                                 \
            for (int64_t l = first; l < end; ++l) {                                                           \
                const T* k = (l < shared ? shared_keys : keys) + l * dim;                                     \
                float dot = 0.0f;                                                                              \
                _Pragma("omp simd reduction(+ : dot)") for (int64_t d = 0; d < dim; ++d) dot += qh[d] * LOAD(k[d]); \
                s[l] = dot;                                                                                    \
            }                                                                                                  \
            softmax(s, first, end);                                                                            \
            float* sum = query + h * dim; /* the query row is no longer needed */                              \
            for (int64_t d = 0; d < dim; ++d) sum[d] = 0.0f;                                                  \
            for (int64_t l = first; l < end; ++l) {                                                           \
                const float p = s[l];                                                                          \
                const T* v = (l < shared ? shared_values : values) + l * dim;                                 \
                _Pragma("omp simd") for (int64_t d = 0; d < dim; ++d) sum[d] += p * LOAD(v[d]);              \
            }                                                                                                  \
            for (int64_t d = 0; d < dim; ++d) out[h * dim + d] = STORE(sum[d]);                               \
        }                                                                                                      \
    }
PAIR_PORTABLE(pair_portable_float32, float, LOAD_FLOAT32, STORE_FLOAT32)
PAIR_PORTABLE(pair_portable_bfloat16, uint16_t, LOAD_BFLOAT16, STORE_BFLOAT16)

#if VECTOR_PATH
#define CASE(TYPE, G)                                                                                          \
    case G: pair_vector_##TYPE(q, k, v, sk, sv, o, first, shared, end, dim, G, scores, stride, rounded); continue;
#define DISPATCH(TYPE)                                                                                         \
    if (vector) switch (group) { CASE(TYPE, 1) CASE(TYPE, 2) CASE(TYPE, 3) CASE(TYPE, 4) CASE(TYPE, 5)          \
                                 CASE(TYPE, 6) CASE(TYPE, 7) CASE(TYPE, 8) }
#else
#define DISPATCH(TYPE)
#endif

#define ATTEND(TYPE, T)                                                                                        \
    int attend_##TYPE(const T* queries, const T* keys, const T* values, const int64_t* begin,                  \
                      const int64_t* source, T* out, int64_t rows, int64_t kv_heads, int64_t group,            \
                      int64_t length, int64_t shared, int64_t end, int64_t dim, int threads) {                 \
        for (int64_t row = 0; row < rows; ++row) /* 1: a row with nothing to attend or a source out of range */ \
            if (begin[row] < 0 || begin[row] >= end || source[row] < 0 || source[row] >= rows) return 1;       \
        const int vector = VECTOR_PATH && dim % 64 == 0 && group <= MAX_GROUP;                                 \
        (void)vector;                                                                                          \
        _Pragma("omp parallel num_threads(threads)") {                                                         \
            /* per head: end scores rounded up to whole vectors, and again as bf16 (the vector path) */        \
            const int64_t stride = (end + 15) / 16 * 16;                                                       \
            float* query = malloc(sizeof(float) * (size_t)(group * dim + group * stride) +                     \
                                  sizeof(uint16_t) * (size_t)(group * stride));                                \
            float* scores = query + group * dim;                                                               \
            uint16_t* rounded = (uint16_t*)(scores + group * stride);                                          \
            (void)rounded;                                                                                     \
            _Pragma("omp for schedule(static)") for (int64_t pair = 0; pair < rows * kv_heads; ++pair) {       \
                const int64_t row = pair / kv_heads, head = pair % kv_heads, first = begin[row];               \
                const int64_t from = (source[row] * kv_heads + head) * length * dim;                           \
                const T* q = queries + pair * group * dim;                                                     \
                const T *k = keys + pair * length * dim, *v = values + pair * length * dim;                    \
                const T *sk = keys + from, *sv = values + from;                                                \
                T* o = out + pair * group * dim;                                                               \
                DISPATCH(TYPE)                                                                                 \
                pair_portable_##TYPE(q, k, v, sk, sv, o, first, shared, end, dim, (int)group, query, scores);  \
            }                                                                                                  \
            free(query);                                                                                       \
        }                                                                                                      \
        return 0;                                                                                              \
    }
ATTEND(float32, float)
ATTEND(bfloat16, uint16_t)


/* ---- top-p sampling ------------------------------------------------------------------------------------------------

   One token per row of logits [rows, vocab] from softmax(logits / temperature) restricted to its top-p nucleus, as
   models/decode.top_p_sample (the same definition and method, in one pass or two over the vocabulary instead of a
   dozen torch ops): a token is drawn from the whole distribution (blocks of SAMPLE_BLOCK tokens, then a token
   within the block) and kept when the tokens more likely than it weigh less than top_p together; otherwise the row
   draws again with its next uniform. uniforms: [rows, tries] in [0, 1), from torch's generator (seeded runs stay
   reproducible). out[row] = -1 where all the row's tries were rejected (the caller draws again with fresh ones).
   Logits of -inf (masked tokens) get no mass. */
#define SAMPLE_BLOCK 256

#define SAMPLE(TYPE, T, LOAD)                                                                                  \
    void top_p_sample_##TYPE(const T* logits, int64_t rows, int64_t vocab, float inverse_temperature,         \
                             float top_p, const float* uniforms, int64_t tries, int64_t* out, int threads) {   \
        const int64_t blocks = (vocab + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;                                      \
        _Pragma("omp parallel num_threads(threads)") {                                                         \
            float* probs = malloc(sizeof(float) * (size_t)vocab);                                              \
            double* cumulative = malloc(sizeof(double) * (size_t)blocks);                                      \
            _Pragma("omp for schedule(static)") for (int64_t row = 0; row < rows; ++row) {                     \
                const T* x = logits + row * vocab;                                                             \
                float top = LOAD(x[0]);                                                                        \
                _Pragma("omp simd reduction(max : top)") for (int64_t i = 0; i < vocab; ++i) {                 \
                    const float value = LOAD(x[i]);                                                            \
                    top = value > top ? value : top;                                                           \
                }                                                                                              \
                double running = 0.0;                                                                          \
                for (int64_t b = 0; b < blocks; ++b) {                                                         \
                    const int64_t stop = (b + 1) * SAMPLE_BLOCK < vocab ? (b + 1) * SAMPLE_BLOCK : vocab;      \
                    float mass = 0.0f;                                                                         \
                    _Pragma("omp simd reduction(+ : mass)") for (int64_t i = b * SAMPLE_BLOCK; i < stop; ++i) { \
                        /* -inf (masked) clamped to a finite exponent whose exp is 0: -ffast-math assumes no inf */ \
                        probs[i] = expf(fmaxf((LOAD(x[i]) - top) * inverse_temperature, -200.0f));             \
                        mass += probs[i];                                                                      \
                    }                                                                                          \
                    running += mass;                                                                           \
                    cumulative[b] = running;                                                                   \
                }                                                                                              \
                const double total = running;                                                                  \
                float known_out = -1.0f; /* the largest probability found outside the nucleus */               \
                out[row] = -1;                                                                                 \
                for (int64_t t = 0; t < tries; ++t) {                                                          \
                    const double u = (1.0 - uniforms[row * tries + t]) * total; /* in (0, total] */            \
                    int64_t b = 0;                                                                             \
                    while (b < blocks - 1 && cumulative[b] < u) ++b;                                           \
                    const int64_t start = b * SAMPLE_BLOCK;                                                    \
                    const int64_t stop = start + SAMPLE_BLOCK < vocab ? start + SAMPLE_BLOCK : vocab;          \
                    double reached = b ? cumulative[b - 1] : 0.0;                                              \
                    int64_t token = -1;                                                                        \
                    for (int64_t i = start; i < stop; ++i) {                                                   \
                        if (probs[i] > 0.0f) token = i; /* the last token with mass, should rounding fall short */ \
                        reached += probs[i];                                                                   \
                        if (reached >= u && probs[i] > 0.0f) break;                                            \
                    }                                                                                          \
                    if (token < 0) continue;                                                                   \
                    const float p = probs[token];                                                              \
                    int keep;                                                                                  \
                    if (top_p >= 1.0f) keep = 1;                                                               \
                    else if (p <= known_out) keep = 0;                                                         \
                    else if (total - p < top_p * total) keep = 1; /* the others weigh less than top_p */       \
                    else {                                                                                     \
                        float above = 0.0f;                                                                    \
                        _Pragma("omp simd reduction(+ : above)") for (int64_t i = 0; i < vocab; ++i)           \
                            above += probs[i] > p ? probs[i] : 0.0f;                                           \
                        keep = above < top_p * total;                                                          \
                    }                                                                                          \
                    if (keep) {                                                                                \
                        out[row] = token;                                                                      \
                        break;                                                                                 \
                    }                                                                                          \
                    known_out = p > known_out ? p : known_out;                                                 \
                }                                                                                              \
            }                                                                                                  \
            free(probs);                                                                                       \
            free(cumulative);                                                                                  \
        }                                                                                                      \
    }
SAMPLE(float32, float, LOAD_FLOAT32)
SAMPLE(bfloat16, uint16_t, LOAD_BFLOAT16)
