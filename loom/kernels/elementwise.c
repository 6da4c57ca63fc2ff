/* The small per-token ops of a decoder layer, each one call instead of several torch ops (at decode
 * sizes each torch op costs microseconds of dispatch, more than its arithmetic). Values are float32 or
 * bf16 (`kind`); the arithmetic follows the torch twins (loom/layers/norm.py, activation.py) step by
 * step, rounding to bf16 where they do, so that only float32 summation order differs.
 */
#include <math.h>

#include "common.h"

#ifdef LOOM_NATIVE

static inline float value(const void *x, int kind, int64_t i) {
    return kind == BF16 ? widen_bf16(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* A value as the twin's dtype holds it: rounded to bf16 in a bf16 model. */
static inline float as_kind(float v, int kind) { return kind == BF16 ? widen_bf16(round_bf16(v)) : v; }

/* RMSNorm rows of K: y = w * to_kind(h * rsqrt(mean(h^2) + eps)), h = x (float32), or with a residual
 * h = to_kind(x + residual), also written to sum_out (the next layer's residual). Eight channels at a
 * time (the squares summed in 8 lanes, then across them), the rest one by one. */
void loom_rms_norm(const void *x, const void *residual, const void *w, void *y, void *sum_out, int kind,
                   int64_t M, int64_t K, float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        float h[K > 0 ? K : 1];
        __m256 ss8 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256 v = load8(x, kind, m * K + k);
            if (residual) {
                v = _mm256_add_ps(v, load8(residual, kind, m * K + k));
                if (kind == BF16) v = as_bf16_8(v);
                store8(sum_out, kind, m * K + k, v);
            }
            _mm256_storeu_ps(h + k, v);
            ss8 = _mm256_add_ps(ss8, _mm256_mul_ps(v, v));
        }
        float ss = hsum(ss8);
        for (; k < K; k++) {
            float v = value(x, kind, m * K + k);
            if (residual) {
                v = as_kind(v + value(residual, kind, m * K + k), kind);
                store(sum_out, kind, m * K + k, v);
            }
            h[k] = v;
            ss += v * v;
        }
        float r = 1.0f / sqrtf(ss / (float)K + eps);
        __m256 r8 = _mm256_set1_ps(r);
        for (k = 0; k + 8 <= K; k += 8) {
            __m256 n = _mm256_mul_ps(_mm256_loadu_ps(h + k), r8);
            if (kind == BF16) n = as_bf16_8(n);
            store8(y, kind, m * K + k, _mm256_mul_ps(load8(w, kind, k), n));
        }
        for (; k < K; k++) store(y, kind, m * K + k, value(w, kind, k) * as_kind(h[k] * r, kind));
    }
}

/* silu(gate) * up over rows of [gate | up] (2 I wide): y [M, I]. silu(g) = g / (1 + exp(-g)), eight at a
 * time with exp8 (torch's vectorized silu uses its own exp as well). */
void loom_silu_and_mul(const void *x, void *y, int kind, int64_t M, int64_t I, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        int64_t i = 0;
        for (; i + 8 <= I; i += 8) {
            __m256 g = load8(x, kind, m * 2 * I + i), u = load8(x, kind, m * 2 * I + I + i);
            __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            store8(y, kind, m * I + i, _mm256_mul_ps(kind == BF16 ? as_bf16_8(s) : s, u));
        }
        for (; i < I; i++) {
            float g = value(x, kind, m * 2 * I + i), u = value(x, kind, m * 2 * I + I + i);
            store(y, kind, m * I + i, as_kind(g / (1.0f + expf(-g)), kind) * u);
        }
    }
}
#endif

#ifdef LOOM_NATIVE
/* Rotary embedding of T tokens' heads: x [T, heads, head_dim] read with a token stride of `x_stride`
 * elements (q and k are column slices of the qkv projection), written contiguous to y. cos, sin
 * [T, rotary_dim / 2] in the same kind. The first rotary_dim channels turn, as pairs (i, i + rot/2),
 * or (2i, 2i + 1) when interleaved; the rest are copied. In bf16 every product and sum is rounded as
 * the torch twin rounds it (loom/layers/rotary.py). */
void loom_rotary(const void *x, int64_t x_stride, void *y, const void *cos, const void *sin, int kind,
                 int64_t T, int64_t heads, int64_t head_dim, int64_t rotary_dim, int interleaved,
                 int nthreads) {
    int64_t half = rotary_dim / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < heads; h++) {
            int64_t in = t * x_stride + h * head_dim, out = (t * heads + h) * head_dim;
            for (int64_t i = 0; i < half; i++) {
                int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
                float x1 = value(x, kind, in + a), x2 = value(x, kind, in + b);
                float c = value(cos, kind, t * half + i), s = value(sin, kind, t * half + i);
                store(y, kind, out + a, as_kind(x1 * c, kind) - as_kind(x2 * s, kind));
                store(y, kind, out + b, as_kind(x2 * c, kind) + as_kind(x1 * s, kind));
            }
            for (int64_t i = rotary_dim; i < head_dim; i++) store(y, kind, out + i, value(x, kind, in + i));
        }
    }
}
#endif
