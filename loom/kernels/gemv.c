/* Small-batch CPU linears for weight types torch has no fast kernel for on AVX2 CPUs (bf16, int8):
 * y[m, n] = sum_k x[m, k] * w(n, k), for a few rows x (decode steps), reading the weight once.
 *
 * A decode step with a few sequences is bound by how fast the weights stream from memory, so the
 * kernels read them in their stored width (bf16, int8) and widen to float32 in registers, where
 * torch either widens the whole weight first or takes a scalar path. Every kernel accumulates in float32.
 *
 * Work split: output channels in blocks of 4, each block a task of an OpenMP loop;
 * inside a block, the input rows in pairs, so the block's weights come from memory once and from L1 for
 * the next pair. Built by loom/kernels/build.py with -march=native; without AVX2 and FMA only
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

/* The int8 weight [N, K] times its per-channel scales [N] as float32 [N, K] (q * scale, one rounding, as
 * loom/layers/quant/int8.py's dequantize_int8), for the float32 GEMM of batches past the kernel's row
 * limit: torch's two ops for it (widen, multiply) take longer than the GEMM's own overhead on the weight. */
void loom_dequantize_int8(const int8_t *w, const float *scale, float *out, int64_t N, int64_t K, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        __m256 s = _mm256_set1_ps(scale[n]);
        for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(out + n * K + k, _mm256_mul_ps(load_i8(w + n * K + k), s));
    }
}

/* int4 (loom/layers/quant/int4.py): a 4-bit q in 0..15 stands for (q - 8) * scale + zero, scale and zero
 * per (output channel, group of G input channels). Each 32 input channels of a row are 16 bytes: byte j
 * holds q[j] in its low nibble and q[j + 16] in its high one.
 *
 * Widening 4-bit weights to float32 costs more instructions than streaming them costs time (a float
 * path ran no faster than the int8 kernel), so the input is quantized too, as llama.cpp's q4_0 x q8_0 dot
 * does: each 32 input values get a scale d = max|x| / 127 and int8 values xq = round(x / d), and a block
 * of 32 products is one integer dot (maddubs). The result is exactly the product of the dequantized
 * weight and the dequantized input (xq * d) up to float32 summation order:
 *   sum over groups of  scale * sum_b d_b ((q - 8) . xq)_b  +  zero * sum_b d_b sum(xq_b). */
#define Q8_BLOCK 32

/* Rows of x (M x K float32) as int8 blocks of 32 with their scales d [M, K / 32], and per group of G the
 * sums of the dequantized input, sum_b d_b sum(xq_b) [M, K / G]. */
static void quantize_q8(const float *x, int64_t M, int64_t K, int64_t G, int8_t *xq, float *d, float *dsum) {
    int64_t nb = M * K / Q8_BLOCK, per_group = G / Q8_BLOCK;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * Q8_BLOCK;
        __m256 amax = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
        for (int i = 0; i < Q8_BLOCK; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
        float m[8], mx = 0;
        _mm256_storeu_ps(m, amax);
        for (int i = 0; i < 8; i++) mx = m[i] > mx ? m[i] : mx;
        float db = mx / 127.0f, id = db > 0 ? 1.0f / db : 0.0f;
        int sum = 0;
        for (int i = 0; i < Q8_BLOCK; i += 8) {
            /* round half to even (the default rounding mode), as torch.round */
            __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i), _mm256_set1_ps(id)));
            int32_t q[8];
            _mm256_storeu_si256((__m256i *)q, v);
            for (int j = 0; j < 8; j++) {
                xq[b * Q8_BLOCK + i + j] = (int8_t)q[j];
                sum += q[j];
            }
        }
        d[b] = db;
        if (b % per_group == 0) dsum[b / per_group] = 0;
        dsum[b / per_group] += db * (float)sum;
    }
}

/* 32 weights of one row (16 bytes) as unsigned bytes 0..15 */
static inline __m256i unpack32(const uint8_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

/* 8 int32 partial sums of a block's 32 products q . xq */
static inline __m256i dot32(__m256i q, __m256i xq) {
    __m256i pairs = _mm256_maddubs_epi16(q, xq); /* q unsigned, xq signed; |pair| <= 2 * 15 * 127 */
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

/* sum over groups of zero * dsum, one weight row against one input row */
static inline float zero_term(const uint16_t *ze, const float *dsum, int64_t groups) {
    __m256 t = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) t = _mm256_fmadd_ps(load_bf16(ze + g), _mm256_loadu_ps(dsum + g), t);
    float out = hsum(t);
    for (; g < groups; g++) out += widen_bf16(ze[g]) * dsum[g];
    return out;
}

/* R weight rows (row r at w + r * K / 2, its scales and zeros at r * groups) against MR input rows of
 * xq (their block scales d, their group sums dsum). `pf`: the next block's bytes, as in DOT_BLOCK. The
 * hot loop does the integer dots and one scale per group; the zero points' term is a separate dot over
 * groups (zero_term). */
static inline __attribute__((always_inline)) void dot_i4(const int8_t *xq, const float *d, const float *dsum,
                                                         int64_t K, int64_t G, const uint8_t *w,
                                                         const uint16_t *sc, const uint16_t *ze,
                                                         const uint8_t *pf, int R, int MR, float out[4][2]) {
    int64_t groups = K / G, nb = K / Q8_BLOCK, per_group = G / Q8_BLOCK;
    const __m256i eight = _mm256_set1_epi8(8);
    __m256 tot[4][2];
    for (int r = 0; r < 4; r++) tot[r][0] = tot[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256 acc[4][2];
        for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
            __m256i xa = _mm256_loadu_si256((const __m256i *)(xq + b * Q8_BLOCK));
            __m256i xb = MR > 1 ? _mm256_loadu_si256((const __m256i *)(xq + K + b * Q8_BLOCK)) : xa;
            __m256 da = _mm256_set1_ps(d[b]), dbv = _mm256_set1_ps(MR > 1 ? d[nb + b] : 0);
            /* the 8 of (q - 8), subtracted in integers: no float cancellation between q . xq and 8 sum(xq) */
            __m256i ea = dot32(eight, xa), eb = MR > 1 ? dot32(eight, xb) : ea;
            if (pf) _mm_prefetch((const char *)(pf + 64 * b), _MM_HINT_T0); /* 4 rows x 16 bytes */
            for (int r = 0; r < R; r++) {
                __m256i q = unpack32(w + r * (K / 2) + b * 16);
                __m256 pa = _mm256_cvtepi32_ps(_mm256_sub_epi32(dot32(q, xa), ea));
                acc[r][0] = _mm256_fmadd_ps(pa, da, acc[r][0]);
                if (MR > 1) {
                    __m256 pb = _mm256_cvtepi32_ps(_mm256_sub_epi32(dot32(q, xb), eb));
                    acc[r][1] = _mm256_fmadd_ps(pb, dbv, acc[r][1]);
                }
            }
        }
        for (int r = 0; r < R; r++) {
            __m256 s = _mm256_set1_ps(widen_bf16(sc[r * groups + g]));
            for (int i = 0; i < MR; i++) tot[r][i] = _mm256_fmadd_ps(acc[r][i], s, tot[r][i]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int i = 0; i < MR; i++)
            out[r][i] = hsum(tot[r][i]) + zero_term(ze + r * groups, dsum + i * groups, groups);
}

/* y = quantize_q8(x) @ dequantize(w).T + bias: w [N, K / 2] packed as above, scales and zeros
 * [N, K / G] bf16, K % G == 0, G % 32 == 0 (checked by the caller). Returns 0, or -1 if out of memory. */
int loom_gemv_int4(const void *x, int x_kind, const uint8_t *w, const uint16_t *scale, const uint16_t *zero,
                   int64_t G, const float *bias, void *y, int y_kind, int64_t M, int64_t N, int64_t K,
                   int nthreads) {
    int64_t groups = K / G, nb = K / Q8_BLOCK;
    float *buf = malloc(sizeof(float) * (M * K + M * nb + M * groups) + M * K);
    if (!buf) return -1;
    const float *xf = rows_f32(x, x_kind, M * K, buf);
    float *d = buf + M * K, *dsum = d + M * nb;
    int8_t *xq = (int8_t *)(dsum + M * groups);
    quantize_q8(xf, M, K, G, xq, d, dsum);
    int64_t blocks = (N + 3) / 4;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * 4;
        int R = N - n0 < 4 ? (int)(N - n0) : 4;
        const uint8_t *wb = w + n0 * (K / 2);
        const uint16_t *sb = scale + n0 * groups, *zb = zero + n0 * groups;
        for (int64_t m = 0; m < M; m += 2) {
            float out[4][2];
            int MR = M - m > 1 ? 2 : 1;
            const uint8_t *pf = m == 0 && b + 1 < blocks ? wb + 2 * K : NULL;
            const int8_t *xm = xq + m * K;
            const float *dm = d + m * nb, *sm = dsum + m * groups;
            if (R == 4 && MR == 2) dot_i4(xm, dm, sm, K, G, wb, sb, zb, pf, 4, 2, out);
            else if (R == 4) dot_i4(xm, dm, sm, K, G, wb, sb, zb, pf, 4, 1, out);
            else if (MR == 2) dot_i4(xm, dm, sm, K, G, wb, sb, zb, pf, R, 2, out);
            else dot_i4(xm, dm, sm, K, G, wb, sb, zb, pf, R, 1, out);
            for (int r = 0; r < R; r++)
                for (int i = 0; i < MR; i++) {
                    float v = out[r][i];
                    store(y, y_kind, (m + i) * N + n0 + r, bias ? v + bias[n0 + r] : v);
                }
        }
    }
    free(buf);
    return 0;
}

/* The packed int4 weight [N, K / 2] dequantized to float32 [N, K], (q - 8) * scale + zero as
 * loom/layers/quant/int4.py's dequantize_int4 computes it, for the float32 GEMM of batches past the
 * kernel's row limit. */
void loom_dequantize_int4(const uint8_t *w, const uint16_t *scale, const uint16_t *zero, int64_t G, float *out,
                          int64_t N, int64_t K, int nthreads) {
    int64_t groups = K / G;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t b = 0; b < K / Q8_BLOCK; b++) {
            int64_t g = b * Q8_BLOCK / G;
            __m256 s = _mm256_set1_ps(widen_bf16(scale[n * groups + g]));
            __m256 z = _mm256_set1_ps(widen_bf16(zero[n * groups + g])), eight = _mm256_set1_ps(8.0f);
            __m256i q = unpack32(w + n * (K / 2) + b * 16);
            int8_t v[32];
            _mm256_storeu_si256((__m256i *)v, q);
            for (int i = 0; i < 4; i++) {
                __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(v + 8 * i))));
                /* (q - 8) * scale is exact in float32: one rounding, as dequantize_int4's */
                __m256 v8 = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(qf, eight), s), z);
                _mm256_storeu_ps(out + n * K + b * Q8_BLOCK + 8 * i, v8);
            }
        }
    }
}

#else
int loom_native(void) { return 0; }
#endif
