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

enum { W_BF16 = 0, W_INT8 = 1, W_INT4 = 2 };

/* A weight as the row loops read it: bf16 or int8 panels, or int4 rows (loom's int4 layout, below) with
 * their bf16 scales and zeros per group of G input channels. */
typedef struct {
    const void *w;
    int kind;
    const uint16_t *scale, *zero;
    int64_t G;
} weight_spec;

static void dequantize_panel_int4(const weight_spec *ws, int64_t N, int64_t K, int64_t n0, float *wf);

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
 * are widened once per panel into `wf` as float32 (exactly: int8 values are float32 values), and int4
 * ones dequantized there (dequantize_panel_int4). */
static void many_rows(const out_spec *o, const float *xf, int64_t m0, int64_t m1, const weight_spec *ws,
                      int64_t panels, float *wf) {
    int64_t K = o->K, n = K * PANEL_N;
    float v[TILE_ROWS][64];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < panels; b++) {
        const uint16_t *pb = (const uint16_t *)ws->w + b * n;
        if (ws->kind == W_INT8) {
            __m256 t[2];
            for (int64_t i = 0; i < n; i += PANEL_N) {
                panel_i8((const int8_t *)ws->w + b * n + i, t);
                _mm256_storeu_ps(wf + i, t[0]);
                _mm256_storeu_ps(wf + i + 8, t[1]);
            }
        } else if (ws->kind == W_INT4) {
            dequantize_panel_int4(ws, o->N, K, b * PANEL_N, wf);
        }
        for (int64_t m = m0; m < m1; m += TILE_ROWS) {
            const float *xm = xf + m * K;
            int R = m1 - m < TILE_ROWS ? (int)(m1 - m) : TILE_ROWS;
            if (ws->kind == W_BF16) {
                TILE_ROWS_OF(tile_bf16, xm, K, pb, R, v)
            } else {
                TILE_ROWS_OF(tile_f32, xm, K, wf, R, v)
            }
            tile_out(o, v, R, 1, m, b * PANEL_N);
        }
    }
}

/* y = (x @ w.T) * scale + bias, w in panels (int4: rows past the integer kernel's limit), scale and
 * bias optional (NULL). Batches go in chunks of rows whose float32 input stays in cache while every panel
 * passes over it. Returns 0, or -1 if a buffer could not be allocated. */
static int linear(const void *x, int x_kind, const weight_spec *ws, const float *scale, const float *bias,
                  void *y, int y_kind, int64_t M, int64_t N, int64_t K, int nthreads) {
    float *buf = x_kind == F32 ? NULL : malloc(sizeof(float) * M * K);
    if (x_kind != F32 && !buf) return -1;
    const float *xf = rows_f32(x, x_kind, M * K, buf);
    out_spec o = {scale, bias, y, y_kind, N, K};
    int64_t panels = (N + PANEL_N - 1) / PANEL_N;
    int64_t chunk = CHUNK_BYTES / ((int64_t)sizeof(float) * K) / TILE_ROWS * TILE_ROWS;
    if (chunk < TILE_ROWS) chunk = TILE_ROWS;
    /* a float32 panel buffer per thread: int4 always, int8 past two rows (bf16 widens in registers) */
    int need_wf = ws->kind == W_INT4 || (ws->kind == W_INT8 && M > 2), failed = 0;
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
            if (m1 - m0 > 2 || ws->kind == W_INT4) many_rows(&o, xf, m0, m1, ws, panels, wf);
            else if (ws->kind == W_BF16) few_rows_bf16(&o, xf + m0 * K, m0, (int)(m1 - m0), ws->w, panels);
            else few_rows_i8(&o, xf + m0 * K, m0, (int)(m1 - m0), ws->w, panels);
        }
        free(wf);
    }
    free(buf);
    return failed ? -1 : 0;
}

int loom_gemv_bf16(const void *x, int x_kind, const uint16_t *w, const float *scale, const float *bias,
                   void *y, int y_kind, int64_t M, int64_t N, int64_t K, int nthreads) {
    weight_spec ws = {w, W_BF16, NULL, NULL, 0};
    return linear(x, x_kind, &ws, scale, bias, y, y_kind, M, N, K, nthreads);
}

int loom_gemv_int8(const void *x, int x_kind, const int8_t *w, const float *scale, const float *bias,
                   void *y, int y_kind, int64_t M, int64_t N, int64_t K, int nthreads) {
    weight_spec ws = {w, W_INT8, NULL, NULL, 0};
    return linear(x, x_kind, &ws, scale, bias, y, y_kind, M, N, K, nthreads);
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
/* The int4 kernels' input: x as float32 rows (in buf, unless x is float32 already), then quantized by
 * quantize_q8 into xq, d and dsum, all in one allocation (buf; NULL if out of memory). */
typedef struct {
    float *buf, *d, *dsum;
    int8_t *xq;
} q8_input;

static q8_input quantize_input(const void *x, int x_kind, int64_t M, int64_t K, int64_t G) {
    int64_t groups = K / G, nb = K / Q8_BLOCK;
    q8_input q = {malloc(sizeof(float) * (M * K + M * nb + M * groups) + M * K), NULL, NULL, NULL};
    if (!q.buf) return q;
    const float *xf = rows_f32(x, x_kind, M * K, q.buf);
    q.d = q.buf + M * K, q.dsum = q.d + M * nb;
    q.xq = (int8_t *)(q.dsum + M * groups);
    quantize_q8(xf, M, K, G, q.xq, q.d, q.dsum);
    return q;
}

int loom_gemv_int4(const void *x, int x_kind, const uint8_t *w, const uint16_t *scale, const uint16_t *zero,
                   int64_t G, const float *bias, void *y, int y_kind, int64_t M, int64_t N, int64_t K,
                   int nthreads) {
    int64_t groups = K / G, nb = K / Q8_BLOCK;
    q8_input q = quantize_input(x, x_kind, M, K, G);
    if (!q.buf) return -1;
    const float *d = q.d, *dsum = q.dsum;
    const int8_t *xq = q.xq;
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
    free(q.buf);
    return 0;
}

/* r[c] (8 values of row c) becomes r[j] (value j of each row): the 8 x 8 transpose */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* Output channels n0 .. n0 + 15 of the packed int4 weight dequantized into a panel wf [K][16] (channels
 * past N zero), each value (q - 8) * scale + zero as dequantize_int4 in loom/layers/quant/int4.py computes it: each 32 input channels of 8 output
 * channels dequantized as rows, then transposed 8 x 8. */
static void dequantize_panel_int4(const weight_spec *ws, int64_t N, int64_t K, int64_t n0, float *wf) {
    int64_t groups = K / ws->G;
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int64_t b = 0; b < K / Q8_BLOCK; b++) {
        int64_t g = b * Q8_BLOCK / ws->G;
        for (int half = 0; half < 2; half++) {
            __m256 v[4][8];
            for (int c = 0; c < 8; c++) {
                int64_t n = n0 + 8 * half + c;
                if (n >= N) {
                    for (int i = 0; i < 4; i++) v[i][c] = _mm256_setzero_ps();
                    continue;
                }
                __m256 s = _mm256_set1_ps(widen_bf16(ws->scale[n * groups + g]));
                __m256 z = _mm256_set1_ps(widen_bf16(ws->zero[n * groups + g]));
                __m256i q = unpack32((const uint8_t *)ws->w + n * (K / 2) + b * 16);
                __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
                __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
                for (int i = 0; i < 4; i++) {
                    __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
                    /* (q - 8) * scale is exact in float32: one rounding, as dequantize_int4's */
                    v[i][c] = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(qf, eight), s), z);
                }
            }
            for (int i = 0; i < 4; i++) {
                transpose8(v[i]);
                for (int j = 0; j < 8; j++)
                    _mm256_storeu_ps(wf + (b * Q8_BLOCK + 8 * i + j) * PANEL_N + 8 * half, v[i][j]);
            }
        }
    }
}

/* Batches past the int4 kernel's row limit: y = xq @ dequantize(w).T + bias, xq the input quantized to
 * int8 per 32 values and dequantized (as the kernel's input: quantize_q8), in float32 FMA chains over each
 * panel dequantized once. Returns 0, or -1 if out of memory. */
int loom_gemm_int4(const void *x, int x_kind, const uint8_t *w, const uint16_t *scale, const uint16_t *zero,
                   int64_t G, const float *bias, void *y, int y_kind, int64_t M, int64_t N, int64_t K,
                   int nthreads) {
    q8_input q = quantize_input(x, x_kind, M, K, G);
    if (!q.buf) return -1;
    /* the dequantized input xq * d, over the float32 rows quantize_input no longer needs */
    float *xd = q.buf;
    for (int64_t i = 0; i < M * K; i++) xd[i] = (float)q.xq[i] * q.d[i / Q8_BLOCK];
    weight_spec ws = {w, W_INT4, scale, zero, G};
    int rc = linear(xd, F32, &ws, NULL, bias, y, y_kind, M, N, K, nthreads);
    free(q.buf);
    return rc;
}

#else
int loom_native(void) { return 0; }
#endif
