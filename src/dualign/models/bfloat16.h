/* bfloat16 as uint16_t: conversions to and from float32, rounding as torch rounds (to nearest, ties to even). */
#ifndef DUALIGN_BFLOAT16_H
#define DUALIGN_BFLOAT16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* element access for kernels written once for both types: float32 (float) and bfloat16 (uint16_t) */
#define LOAD_FLOAT32(x) (x)
#define STORE_FLOAT32(x) (x)
#define LOAD_BFLOAT16(x) bf16_to_float(x)
#define STORE_BFLOAT16(x) float_to_bf16(x)
#endif
