/* What every loom CPU kernel shares: the value kinds tensors come in, bf16 rounding as torch does it,
 * and AVX2 helpers. Included by each .c file of loom/kernels (compiled together by cpu.py). */
#ifndef LOOM_KERNELS_COMMON_H
#define LOOM_KERNELS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Inputs and outputs come as float32 or bf16 (the model's dtype), so that a linear is one call: */
enum { F32 = 0, BF16 = 1, F32_VIA_BF16 = 2 }; /* F32_VIA_BF16: float32, rounded to bf16 values */

/* float32 -> bf16, round to nearest even (as torch's .to(torch.bfloat16)); NaN stays NaN */
static inline uint16_t round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static inline float widen_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* x as float32 rows: x itself, or a widened / rounded copy in `buf` */
static inline const float *rows_f32(const void *x, int x_kind, int64_t n, float *buf) {
    if (x_kind == F32) return (const float *)x;
    for (int64_t i = 0; i < n; i++)
        buf[i] = x_kind == BF16 ? widen_bf16(((const uint16_t *)x)[i])
                                : widen_bf16(round_bf16(((const float *)x)[i]));
    return buf;
}

static inline void store(void *y, int y_kind, int64_t i, float v) {
    if (y_kind == BF16) ((uint16_t *)y)[i] = round_bf16(v);
    else ((float *)y)[i] = y_kind == F32_VIA_BF16 ? widen_bf16(round_bf16(v)) : v;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOOM_NATIVE 1

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 weights widened to float32 */
static inline __m256 load_bf16(const uint16_t *p) {
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

/* exp of 8 floats, within 2 ulp of expf over the range where expf is finite and normal (Cephes'
 * polynomial after reducing x = n ln 2 + r, |r| <= ln 2 / 2); below -87.3 it returns 0, above 88.7 inf. */
static inline __m256 exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.72283935546875f), lo = _mm256_set1_ps(-87.33654022216797f);
    __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ), under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln 2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
    return _mm256_andnot_ps(under, y);
}

/* 8 floats of x (float32 or bf16 values) as float32 */
static inline __m256 load8(const void *x, int kind, int64_t i) {
    return kind == BF16 ? load_bf16((const uint16_t *)x + i) : _mm256_loadu_ps((const float *)x + i);
}

/* 8 floats rounded to bf16 as round_bf16 does (nearest even, NaN kept NaN) */
static inline __m128i round8_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    /* every lane is below 2^16: the saturating pack is exact */
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* 8 floats as a bf16 tensor holds them (rounded, widened back) */
static inline __m256 as_bf16_8(__m256 v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(round8_bf16(v)), 16));
}

/* 8 values stored as `kind` at y + i (bf16: rounded) */
static inline void store8(void *y, int kind, int64_t i, __m256 v) {
    if (kind == BF16) _mm_storeu_si128((__m128i *)((uint16_t *)y + i), round8_bf16(v));
    else _mm256_storeu_ps((float *)y + i, v);
}
#endif

#endif
