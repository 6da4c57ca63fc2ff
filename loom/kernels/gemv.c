/* Small-batch CPU linears for weight types torch has no fast kernel for on AVX2 CPUs (bf16, int8):
 * y[m, n] = sum_k x[m, k] * w(n, k), for a few rows x (decode steps), reading the weight once.
 *
 * A decode step with a few sequences is bound by how fast the weights stream from memory, so the
 * kernels read them in their stored width (bf16, int8) and widen to float32 in registers, where
 * torch either widens the whole weight first or takes a scalar path. Every kernel accumulates in float32.
 *
 * Work split: output channels in blocks of 4, each block a task of an OpenMP loop;
 * inside a block, the input rows in pairs, so the block's weights come from memory once and from L1 for
 * the next pair. Built by loom/kernels/cpu.py with -march=native; without AVX2 and FMA only
 * loom_native() is useful (it returns 0 and the Python side falls back to torch).
 */
#include "common.h"

#ifdef LOOM_NATIVE
int loom_native(void) { return 1; }

static inline __m256 load_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}


/* One block of R weight rows against MR input rows (MR is 1 or 2), for weights of any 8-wide loader.
 * K % 8 == 0 (checked by the caller). `pf`, when not NULL, is the next block's weights: each step
 * prefetches as many of its bytes as it reads of this block's, so the next block is in cache when its
 * turn comes (the hardware prefetcher alone left a one-thread decode at a third of the bandwidth). */
#define DOT_BLOCK(NAME, WT, LOAD)                                                                      \
    static inline __attribute__((always_inline)) void NAME(const float *x, int64_t K, const WT *w,   \
                                                           const WT *pf, int R, int MR,              \
                                                           float out[4][2]) {                        \
        __m256 acc[4][2];                                                                              \
        for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();                      \
        const float *x1 = x + (MR > 1 ? K : 0);                                                        \
        for (int64_t k = 0; k < K; k += 8) {                                                           \
            __m256 xa = _mm256_loadu_ps(x + k);                                                        \
            __m256 xb = MR > 1 ? _mm256_loadu_ps(x1 + k) : xa;                                         \
            if (pf) _mm_prefetch((const char *)(pf + 4 * k), _MM_HINT_T0);                             \
            for (int r = 0; r < R; r++) {                                                              \
                __m256 wv = LOAD(w + r * K + k);                                                       \
                acc[r][0] = _mm256_fmadd_ps(wv, xa, acc[r][0]);                                        \
                if (MR > 1) acc[r][1] = _mm256_fmadd_ps(wv, xb, acc[r][1]);                            \
            }                                                                                          \
        }                                                                                              \
        for (int r = 0; r < R; r++)                                                                    \
            for (int i = 0; i < MR; i++) out[r][i] = hsum(acc[r][i]);                                  \
    }

DOT_BLOCK(dot_bf16, uint16_t, load_bf16)
DOT_BLOCK(dot_i8, int8_t, load_i8)

/* The driver: y = (x @ w.T) * scale + bias, scale (per output channel) and bias optional (NULL). Blocks
 * of 4 output channels (the last one may be short), pairs of input rows; R and MR are constants in each
 * branch so the compiler unrolls the block. Returns 0, or -1 if the widened input's buffer could not be
 * allocated. */
#define GEMV(NAME, WT, DOT)                                                                            \
    int NAME(const void *x, int x_kind, const WT *w, const float *scale, const float *bias, void *y,  \
             int y_kind, int64_t M, int64_t N, int64_t K, int nthreads) {                              \
        float *buf = x_kind == F32 ? NULL : malloc(sizeof(float) * M * K);                             \
        if (x_kind != F32 && !buf) return -1;                                                          \
        const float *xf = rows_f32(x, x_kind, M * K, buf);                                             \
        int64_t blocks = (N + 3) / 4;                                                                  \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                             \
        for (int64_t b = 0; b < blocks; b++) {                                                         \
            int64_t n0 = b * 4;                                                                        \
            int R = N - n0 < 4 ? (int)(N - n0) : 4;                                                    \
            const WT *wb = w + n0 * K;                                                                 \
            for (int64_t m = 0; m < M; m += 2) {                                                       \
                float out[4][2];                                                                       \
                int MR = M - m > 1 ? 2 : 1;                                                            \
                const WT *pf = m == 0 && b + 1 < blocks ? wb + 4 * K : NULL;                           \
                if (R == 4 && MR == 2) DOT(xf + m * K, K, wb, pf, 4, 2, out);                          \
                else if (R == 4) DOT(xf + m * K, K, wb, pf, 4, 1, out);                                \
                else if (MR == 2) DOT(xf + m * K, K, wb, pf, R, 2, out);                               \
                else DOT(xf + m * K, K, wb, pf, R, 1, out);                                            \
                for (int r = 0; r < R; r++)                                                            \
                    for (int i = 0; i < MR; i++) {                                                     \
                        float v = scale ? out[r][i] * scale[n0 + r] : out[r][i];                       \
                        store(y, y_kind, (m + i) * N + n0 + r, bias ? v + bias[n0 + r] : v);          \
                    }                                                                                  \
            }                                                                                          \
        }                                                                                              \
        free(buf);                                                                                     \
        return 0;                                                                                      \
    }

GEMV(loom_gemv_bf16, uint16_t, dot_bf16)
GEMV(loom_gemv_int8, int8_t, dot_i8)

#else
int loom_native(void) { return 0; }
#endif
