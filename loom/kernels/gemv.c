/* CPU linears for weight types torch has no fast kernel for on AVX2 CPUs (bf16, int8, int4):
 * y[m, n] = sum_k x[m, k] * w(n, k), for any number of rows x, reading the weight in its stored width.
 *
 * bf16 and int8 weights are stored in panels of 16 output channels, [ceil(N / 16)][K][16] (cpu.py's
 * pack_panels; the last panel padded with zeros): input channel k of a panel is one load of 16 weights,
 * widened to float32 in registers (two vectors of 8 channels). Each output is one float32 FMA chain over
 * k = 0 .. K-1, then times its scale (int8) plus its bias. That chain is the same however many rows come
 * and wherever a row sits in the batch, so a row's result does not depend on the batch around it: a decode
 * token, a verified draft token and the same token in a prefill chunk get the same bits.
 *
 * A tile is up to 6 rows against one panel (12 accumulators; each weight load serves 6 rows, each
 * broadcast input value 16 channels); decode steps, bound by how fast the weights stream from memory,
 * take one row against four panels at a time, or two rows against two. Past two rows an int8 panel is
 * widened once into a float32 buffer (its widening costs more instructions than the FMAs can hide), a
 * bf16 one in registers at each use (a shift and a mask). Panels are split between OpenMP threads;
 * batches too large for the cache go in chunks of rows. Measured against torch's float32 GEMM on a
 * float32 copy of the weight: the table in cpu.py. Built by loom/kernels/build.py with -march=native;
 * without AVX2 and FMA only loom_native() is useful (it returns 0 and the Python side falls back to
 * torch).
 */
#include "common.h"

#ifdef LOOM_NATIVE
int loom_native(void) { return 1; }

#define PANEL_N 16 /* output channels per panel */
#define TILE_ROWS 6 /* most rows per tile */
/* Rows per chunk: a chunk's float32 input rows stay in cache while every panel passes over them. */
#define CHUNK_BYTES (1 << 20)

/* Input channel k of a panel: 16 weights as two float32 vectors (channels 0-7, 8-15). bf16 panels hold
 * channel j in the low half of 32-bit lane j and channel j + 8 in its high half, so that a shift and a
 * mask widen them. */
static inline void panel_bf16(const uint16_t *p, __m256 w[2]) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    w[1] = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

static inline void panel_i8(const int8_t *p, __m256 w[2]) {
    /* two 8-byte loads, each folded into its sign extension: fewer instructions than one 16-byte load */
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
}

static inline void panel_f32(const float *p, __m256 w[2]) {
    w[0] = _mm256_loadu_ps(p);
    w[1] = _mm256_loadu_ps(p + 8);
}

/* R rows of x (row stride K) against NP consecutive panels (stride K * PANEL_N): out[i][16 j + c] is row
 * i's output for channel c of panel j. R and NP are constants at each call (always_inline), so that the
 * accumulators live in registers. */
#define TILE(NAME, WT, LOAD)                                                                           \
    static inline __attribute__((always_inline)) void NAME(const float *x, int64_t K, const WT *p,    \
                                                           int R, int NP, float out[TILE_ROWS][64]) { \
        __m256 acc[TILE_ROWS][8];                                                                      \
        for (int i = 0; i < R; i++)                                                                    \
            for (int c = 0; c < 2 * NP; c++) acc[i][c] = _mm256_setzero_ps();                          \
        for (int64_t k = 0; k < K; k++) {                                                              \
            __m256 w[8];                                                                               \
            for (int j = 0; j < NP; j++) LOAD(p + (j * K + k) * PANEL_N, w + 2 * j);                   \
            for (int i = 0; i < R; i++) {                                                              \
                __m256 xb = _mm256_broadcast_ss(x + i * K + k);                                        \
                for (int c = 0; c < 2 * NP; c++) acc[i][c] = _mm256_fmadd_ps(xb, w[c], acc[i][c]);     \
            }                                                                                          \
        }                                                                                              \
        for (int i = 0; i < R; i++)                                                                    \
            for (int c = 0; c < 2 * NP; c++) _mm256_storeu_ps(out[i] + 8 * c, acc[i][c]);              \
    }

TILE(tile_bf16, uint16_t, panel_bf16)
TILE(tile_i8, int8_t, panel_i8)
TILE(tile_f32, float, panel_f32)

/* What a tile computed into y: times scale, plus bias (each per channel, optional); channels < N only. */
typedef struct {
    const float *scale, *bias;
    void *y;
    int y_kind;
    int64_t N, K;
} out_spec;

static inline void tile_out(const out_spec *o, float v[TILE_ROWS][64], int R, int NP, int64_t m, int64_t n0) {
    for (int i = 0; i < R; i++)
        for (int c = 0; c < NP * PANEL_N && n0 + c < o->N; c++) {
            float r = o->scale ? v[i][c] * o->scale[n0 + c] : v[i][c];
            store(o->y, o->y_kind, (m + i) * o->N + n0 + c, o->bias ? r + o->bias[n0 + c] : r);
        }
}

/* One or two rows (decode): bound by the weights' streaming, so they are widened in registers as they
 * come, several panels at a time so that enough accumulator chains run side by side to hide the FMA
 * latency (one row: 4 panels, 8 chains; two rows: 2 panels). */
#define FEW_ROWS(NAME, WT, TILE)                                                                       \
    static void NAME(const out_spec *o, const float *x, int64_t m, int rows, const WT *w,             \
                     int64_t panels) {                                                                 \
        float v[TILE_ROWS][64];                                                                        \
        int group = rows == 1 ? 4 : 2;                                                                 \
        _Pragma("omp for schedule(static)") for (int64_t b = 0; b < (panels + group - 1) / group; b++) { \
            const WT *p = w + group * b * o->K * PANEL_N;                                              \
            int np = panels - group * b < group ? (int)(panels - group * b) : group;                   \
            if (rows == 2 && np == 2) TILE(x, o->K, p, 2, 2, v);                                       \
            else if (rows == 2) TILE(x, o->K, p, 2, 1, v);                                             \
            else if (np == 4) TILE(x, o->K, p, 1, 4, v);                                               \
            else if (np == 3) TILE(x, o->K, p, 1, 3, v);                                               \
            else if (np == 2) TILE(x, o->K, p, 1, 2, v);                                               \
            else TILE(x, o->K, p, 1, 1, v);                                                            \
            tile_out(o, v, rows, np, m, group * b * PANEL_N);                                          \
        }                                                                                              \
    }

FEW_ROWS(few_rows_bf16, uint16_t, tile_bf16)
FEW_ROWS(few_rows_i8, int8_t, tile_i8)

enum { W_BF16 = 0, W_INT8 = 1 };

/* 6 rows at a time (R of them) against one panel: x rows from xm, tile function TILE on panel p. */
#define TILE_ROWS_OF(TILE, xm, K, p, R, v)                                                             \
    switch (R) {                                                                                       \
    case 6: TILE(xm, K, p, 6, 1, v); break;                                                            \
    case 5: TILE(xm, K, p, 5, 1, v); break;                                                            \
    case 4: TILE(xm, K, p, 4, 1, v); break;                                                            \
    case 3: TILE(xm, K, p, 3, 1, v); break;                                                            \
    case 2: TILE(xm, K, p, 2, 1, v); break;                                                            \
    default: TILE(xm, K, p, 1, 1, v);                                                                  \
    }

/* Rows m0 .. m1 - 1 (more than two), 6 at a time against each panel. bf16 panels are widened in
 * registers (a shift, a mask); int8 ones, whose widening takes more instructions than the FMAs can hide,
 * are widened once per panel into `wf` as float32 (exactly: int8 values are float32 values). */
static void many_rows(const out_spec *o, const float *xf, int64_t m0, int64_t m1, const void *w, int kind,
                      int64_t panels, float *wf) {
    int64_t K = o->K, n = K * PANEL_N;
    float v[TILE_ROWS][64];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < panels; b++) {
        const uint16_t *pb = (const uint16_t *)w + b * n;
        if (kind == W_INT8) {
            __m256 t[2];
            for (int64_t i = 0; i < n; i += PANEL_N) {
                panel_i8((const int8_t *)w + b * n + i, t);
                _mm256_storeu_ps(wf + i, t[0]);
                _mm256_storeu_ps(wf + i + 8, t[1]);
            }
        }
        for (int64_t m = m0; m < m1; m += TILE_ROWS) {
            const float *xm = xf + m * K;
            int R = m1 - m < TILE_ROWS ? (int)(m1 - m) : TILE_ROWS;
            if (kind == W_BF16) {
                TILE_ROWS_OF(tile_bf16, xm, K, pb, R, v)
            } else {
                TILE_ROWS_OF(tile_f32, xm, K, wf, R, v)
            }
            tile_out(o, v, R, 1, m, b * PANEL_N);
        }
    }
}

/* y = (x @ w.T) * scale + bias, w bf16 or int8 panels, scale and bias optional (NULL). Batches go in
 * chunks of rows whose float32 input stays in cache while every panel passes over it. Returns 0, or -1 if
 * a buffer could not be allocated. */
static int linear(const void *x, int x_kind, const void *w, int kind, const float *scale, const float *bias,
                  void *y, int y_kind, int64_t M, int64_t N, int64_t K, int nthreads) {
    float *buf = x_kind == F32 ? NULL : malloc(sizeof(float) * M * K);
    if (x_kind != F32 && !buf) return -1;
    const float *xf = rows_f32(x, x_kind, M * K, buf);
    out_spec o = {scale, bias, y, y_kind, N, K};
    int64_t panels = (N + PANEL_N - 1) / PANEL_N;
    int64_t chunk = CHUNK_BYTES / ((int64_t)sizeof(float) * K) / TILE_ROWS * TILE_ROWS;
    if (chunk < TILE_ROWS) chunk = TILE_ROWS;
    /* a float32 panel buffer per thread: int8 past two rows (bf16 widens in registers) */
    int need_wf = kind == W_INT8 && M > 2, failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *wf = need_wf ? malloc(sizeof(float) * K * PANEL_N) : NULL;
        if (need_wf && !wf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        for (int64_t m0 = 0; m0 < M && !failed; m0 += chunk) {
            int64_t m1 = m0 + chunk < M ? m0 + chunk : M;
            if (m1 - m0 > 2) many_rows(&o, xf, m0, m1, w, kind, panels, wf);
            else if (kind == W_BF16) few_rows_bf16(&o, xf + m0 * K, m0, (int)(m1 - m0), w, panels);
            else few_rows_i8(&o, xf + m0 * K, m0, (int)(m1 - m0), w, panels);
        }
        free(wf);
    }
    free(buf);
    return failed ? -1 : 0;
}

int loom_gemv_bf16(const void *x, int x_kind, const uint16_t *w, const float *scale, const float *bias,
                   void *y, int y_kind, int64_t M, int64_t N, int64_t K, int nthreads) {
    return linear(x, x_kind, w, W_BF16, scale, bias, y, y_kind, M, N, K, nthreads);
}

int loom_gemv_int8(const void *x, int x_kind, const int8_t *w, const float *scale, const float *bias,
                   void *y, int y_kind, int64_t M, int64_t N, int64_t K, int nthreads) {
    return linear(x, x_kind, w, W_INT8, scale, bias, y, y_kind, M, N, K, nthreads);
}

/* int4 (loom/layers/quant/int4.py): a 4-bit q in 0..15 stands for (q - 8) * scale + zero, scale and zero
 * per (output channel, group of G input channels).
 *
 * Widening 4-bit weights to float32 costs more instructions than streaming them costs time (a float
 * path ran no faster than the int8 kernel), so the input is quantized too, as llama.cpp's q4_0 x q8_0 dot
 * does: each 32 input values get a scale d = max|x| / 127 and int8 values xq = round(x / d), and 32
 * products are integer dots (maddubs). The result is exactly the product of the dequantized weight and
 * the dequantized input (xq * d) up to float32 summation order:
 *   sum over blocks b of  scale * d_b ((q - 8) . xq)_b  +  sum over groups of  zero * sum_b d_b sum(xq_b).
 *
 * Layout (cpu.py's pack_int4): output channels in blocks of 8 (the last padded with q = 8, scale and zero
 * 0), each block's 32 input channels b in 128 bytes: byte 32 j + 4 c + i holds channel c's q[32 b + 4 j + i]
 * in its low nibble and q[32 b + 16 + 4 j + i] in its high one. So each of the four 32-byte loads holds
 * 4 input channels of all 8 output channels, one per 32-bit lane: against 4 input values broadcast to
 * every lane, a maddubs and a madd give the 8 channels' dots side by side, and the scales, the zero
 * points and the output are vectors of 8 channels too ([N / 8][K / G][8] bf16), with no horizontal sums.
 * This is the row interleaving llama.cpp's repacked q4_0 uses on x86, in our own arrangement. */
#define Q8_BLOCK 32
#define I4_BLOCK_N 8 /* output channels per block */
#define I4_TOKENS 4  /* most input rows per pass over a block's weights */
/* Bytes ahead a decode row prefetches the weights (its block's are contiguous): 8 input blocks. */
#define I4_PREFETCH 1024
/* Rows per chunk: a chunk's int8 input stays in L2 while every block of weights passes over it. */
#define I4_CHUNK_BYTES (192 << 10)

/* Rows of x (M x K float32) as int8 blocks of 32 with their scales d [M, K / 32] and 8 * sum(xq) per
 * block (the 8 of q - 8, subtracted in integers: no float cancellation between q . xq and 8 sum(xq)),
 * and per group of G the sums of the dequantized input, sum_b d_b sum(xq_b) [M, K / G]. */
static void quantize_q8(const float *x, int64_t M, int64_t K, int64_t G, int8_t *xq, float *d, int32_t *eight,
                        float *dsum) {
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
        eight[b] = 8 * sum;
        if (b % per_group == 0) dsum[b / per_group] = 0;
        dsum[b / per_group] += db * (float)sum;
    }
}

/* The int4 kernel's input: x as float32 rows (in buf, unless x is float32 already), then quantized by
 * quantize_q8, all in one allocation (buf; NULL if out of memory). */
typedef struct {
    float *buf, *d, *dsum;
    int32_t *eight;
    int8_t *xq;
} q8_input;

static q8_input quantize_input(const void *x, int x_kind, int64_t M, int64_t K, int64_t G) {
    int64_t groups = K / G, nb = K / Q8_BLOCK;
    q8_input q = {malloc(sizeof(float) * (M * K + 2 * M * nb + M * groups) + M * K), NULL, NULL, NULL, NULL};
    if (!q.buf) return q;
    const float *xf = rows_f32(x, x_kind, M * K, q.buf);
    q.d = q.buf + M * K, q.dsum = q.d + M * nb;
    q.eight = (int32_t *)(q.dsum + M * groups);
    q.xq = (int8_t *)(q.eight + M * nb);
    quantize_q8(xf, M, K, G, q.xq, q.d, q.eight, q.dsum);
    return q;
}

/* 4 input bytes as one int32, for a broadcast to every lane */
static inline int32_t bytes4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* T input rows (T <= I4_TOKENS, a constant at each call) against one block of 8 output channels: w its
 * K / 32 x 128 bytes, sc and ze its [K / G][8] scales and zeros. tot[t]: row t's 8 outputs. */
static inline __attribute__((always_inline)) void block_i4(const q8_input *q, int64_t m, int64_t K, int64_t G,
                                                           const uint8_t *w, const uint16_t *sc,
                                                           const uint16_t *ze, int T, int prefetch,
                                                           __m256 tot[I4_TOKENS]) {
    int64_t groups = K / G, nb = K / Q8_BLOCK, per_group = G / Q8_BLOCK;
    const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int t = 0; t < T; t++) tot[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256 s = load_bf16(sc + g * I4_BLOCK_N);
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
            const uint8_t *wb = w + b * 4 * Q8_BLOCK;
            if (prefetch) {
                _mm_prefetch((const char *)(wb + I4_PREFETCH), _MM_HINT_T0);
                _mm_prefetch((const char *)(wb + I4_PREFETCH + 64), _MM_HINT_T0);
            }
            /* per row, 16-bit sums of 8 products per channel: |sum| <= 8 * 15 * 127, no overflow */
            __m256i s16[I4_TOKENS];
            for (int t = 0; t < T; t++) s16[t] = _mm256_setzero_si256();
            for (int j = 0; j < 4; j++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 32 * j));
                __m256i lo = _mm256_and_si256(v, nibble);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                for (int t = 0; t < T; t++) {
                    const int8_t *xb = q->xq + (m + t) * K + b * Q8_BLOCK;
                    __m256i xl = _mm256_set1_epi32(bytes4(xb + 4 * j));
                    __m256i xh = _mm256_set1_epi32(bytes4(xb + 16 + 4 * j));
                    /* q unsigned, xq signed */
                    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                    s16[t] = _mm256_add_epi16(s16[t], p);
                }
            }
            for (int t = 0; t < T; t++) {
                int64_t i = (m + t) * nb + b;
                __m256i dot = _mm256_madd_epi16(s16[t], ones);
                dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(q->eight[i]));
                __m256 ds = _mm256_mul_ps(s, _mm256_set1_ps(q->d[i]));
                tot[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), ds, tot[t]);
            }
        }
        __m256 z = load_bf16(ze + g * I4_BLOCK_N);
        for (int t = 0; t < T; t++)
            tot[t] = _mm256_fmadd_ps(z, _mm256_set1_ps(q->dsum[(m + t) * groups + g]), tot[t]);
    }
}

/* y = quantize_q8(x) @ dequantize(w).T + bias: w, scales and zeros in the layout above, K % G == 0,
 * G % 32 == 0 (checked by the caller). Returns 0, or -1 if out of memory. */
int loom_gemv_int4(const void *x, int x_kind, const uint8_t *w, const uint16_t *scale, const uint16_t *zero,
                   int64_t G, const float *bias, void *y, int y_kind, int64_t M, int64_t N, int64_t K,
                   int nthreads) {
    int64_t groups = K / G;
    q8_input q = quantize_input(x, x_kind, M, K, G);
    if (!q.buf) return -1;
    int64_t blocks = (N + I4_BLOCK_N - 1) / I4_BLOCK_N;
    int64_t chunk = I4_CHUNK_BYTES / K / I4_TOKENS * I4_TOKENS;
    if (chunk < I4_TOKENS) chunk = I4_TOKENS;
#pragma omp parallel num_threads(nthreads)
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        int64_t m1 = m0 + chunk < M ? m0 + chunk : M;
#pragma omp for schedule(static)
        for (int64_t c = 0; c < blocks; c++) {
            const uint8_t *wc = w + c * K / 2 * I4_BLOCK_N;
            const uint16_t *sc = scale + c * groups * I4_BLOCK_N, *ze = zero + c * groups * I4_BLOCK_N;
            int64_t n0 = c * I4_BLOCK_N;
            for (int64_t m = m0; m < m1; m += I4_TOKENS) {
                __m256 tot[I4_TOKENS];
                int T = m1 - m < I4_TOKENS ? (int)(m1 - m) : I4_TOKENS, pf = m == m0;
                if (T == 4) block_i4(&q, m, K, G, wc, sc, ze, 4, pf, tot);
                else if (T == 3) block_i4(&q, m, K, G, wc, sc, ze, 3, pf, tot);
                else if (T == 2) block_i4(&q, m, K, G, wc, sc, ze, 2, pf, tot);
                else block_i4(&q, m, K, G, wc, sc, ze, 1, pf, tot);
                for (int t = 0; t < T; t++) {
                    float v[I4_BLOCK_N];
                    _mm256_storeu_ps(v, tot[t]);
                    for (int64_t n = n0; n < n0 + I4_BLOCK_N && n < N; n++)
                        store(y, y_kind, (m + t) * N + n, bias ? v[n - n0] + bias[n] : v[n - n0]);
                }
            }
        }
    }
    free(q.buf);
    return 0;
}

#else
int loom_native(void) { return 0; }
#endif
