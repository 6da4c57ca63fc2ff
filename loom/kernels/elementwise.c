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
 * h = to_kind(x + residual), also written to sum_out (the next layer's residual). */
void loom_rms_norm(const void *x, const void *residual, const void *w, void *y, void *sum_out, int kind,
                   int64_t M, int64_t K, float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        float h[K > 0 ? K : 1];
        float ss = 0;
        for (int64_t k = 0; k < K; k++) {
            float v = value(x, kind, m * K + k);
            if (residual) {
                v = as_kind(v + value(residual, kind, m * K + k), kind);
                store(sum_out, kind, m * K + k, v);
            }
            h[k] = v;
            ss += v * v;
        }
        float r = 1.0f / sqrtf(ss / (float)K + eps);
        for (int64_t k = 0; k < K; k++) store(y, kind, m * K + k, value(w, kind, k) * as_kind(h[k] * r, kind));
    }
}

/* silu(gate) * up over rows of [gate | up] (2 I wide): y [M, I]. */
void loom_silu_and_mul(const void *x, void *y, int kind, int64_t M, int64_t I, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        for (int64_t i = 0; i < I; i++) {
            float g = value(x, kind, m * 2 * I + i), u = value(x, kind, m * 2 * I + I + i);
            store(y, kind, m * I + i, as_kind(g / (1.0f + expf(-g)), kind) * u);
        }
    }
}
#endif
