/* A whole Llama-family decoder stack for a small batch of tokens, in one call, each token a query row
 * with its own position, block table and key count (a decode token, or one token of a prefill chunk
 * attending to its own prefix: loom/models/cpu_decode.py).
 *
 * A bf16 decode step of a small model runs ~10 kernels per layer, each of which is cheap next to what
 * calling it from Python costs (module calls, argument checks, tensor allocation, ctypes: 0.5-1 ms a
 * layer on this VM's cores, as much as the layer's weights take to stream). This file chains the same
 * kernels (gemv.c, attention.c, elementwise.c) in C, in the order the modules of loom/models/llama.py
 * and glm.py call them, on the same bf16 values: for decode tokens its output and the KV it writes are
 * bit-identical to the module path, which is its twin (tests/kernels/test_decoder.py).
 *
 * Per layer, for T tokens (all K/V written before any row attends, so a chunk's rows see each other):
 *   x = rms_norm(h [+ residual])       input_layernorm (the first layer's residual is h itself)
 *   qkv = x W_qkv [+ b]; q, k = rotary(q, k); K/V cache[slot] = k, v
 *   a = attention(q, cache) W_o        [GLM-4: rms_norm(a), post_self_attn_layernorm]
 *   x = rms_norm(a + residual)         post_attention_layernorm
 *   h = silu_and_mul(x W_gate_up) W_down [GLM-4: rms_norm(h), post_mlp_layernorm]
 * and after the last layer, the model's norm of h + residual.
 */
#include "common.h"

#ifdef LOOM_NATIVE

int loom_gemv_bf16(const void *x, int x_kind, const uint16_t *w, const float *scale, const float *bias,
                   void *y, int y_kind, int64_t M, int64_t N, int64_t K, int nthreads);
int loom_gemv_int8(const void *x, int x_kind, const int8_t *w, const float *scale, const float *bias,
                   void *y, int y_kind, int64_t M, int64_t N, int64_t K, int nthreads);
int loom_gemv_int4(const void *x, int x_kind, const uint8_t *w, const uint16_t *scale, const uint16_t *zero,
                   int64_t G, const float *bias, void *y, int y_kind, int64_t M, int64_t N, int64_t K,
                   int nthreads);
int loom_attention_decode(const void *q, const void *kc, const void *vc, const int64_t *block_table,
                          const int64_t *seq_lens, void *out, int kind, int64_t S, int64_t H, int64_t KvH,
                          int64_t D, int64_t num_blocks, int64_t block_size, int64_t max_blocks, float scale,
                          int nthreads);
void loom_rms_norm(const void *x, const void *residual, const void *w, void *y, void *sum_out, int kind,
                   int64_t M, int64_t K, float eps, int nthreads);
void loom_silu_and_mul(const void *x, void *y, int kind, int64_t M, int64_t I, int nthreads);
void loom_rotary(const void *x, int64_t x_stride, void *y, const void *cos, const void *sin, int kind,
                 int64_t T, int64_t heads, int64_t head_dim, int64_t rotary_dim, int interleaved,
                 int nthreads);

/* One linear, as its LinearMethod runs it (loom/layers/quant): bf16 weights (Bf16Widened) add a float32
 * bias before rounding; int8 (Int8) and int4 (Int4) weights round their product, then add a bf16 bias as
 * torch adds two bf16 tensors (in float32, rounded once). Layouts match loom/kernels/decoder.py. */
enum { W_BF16 = 0, W_INT8 = 1, W_INT4 = 2 };
typedef struct {
    const void *weight;         /* bf16 or int8 panels, or int4 blocks of 8 output channels (gemv.c) */
    const void *scale;          /* int8: [N] float32; int4: [N / 8, K / group_size, 8] bf16; bf16: NULL */
    const uint16_t *zero;       /* int4: as its scales, else NULL */
    const float *bias;          /* [N] float32, added before rounding, or NULL */
    const uint16_t *bias_after; /* [N] bf16, added after rounding, or NULL */
    int64_t out_features, group_size;
    int32_t kind;
} loom_linear;

typedef struct {
    const uint16_t *input_norm, *post_attention_norm;
    const uint16_t *post_self_attn_norm, *post_mlp_norm; /* GLM-4's extra norms, else NULL */
    loom_linear qkv, o, gate_up, down;
    uint16_t *k_cache, *v_cache; /* [KvH, num_blocks, block_size, D] */
} loom_layer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, rotary_dim, intermediate;
    int64_t num_blocks, block_size;
    int32_t interleaved;
    float eps, scale;
    const loom_layer *layers;
    const uint16_t *final_norm;
} loom_stack;

static int linear(const loom_linear *l, const uint16_t *x, uint16_t *y, int64_t T, int64_t K, int nt) {
    int64_t N = l->out_features;
    int rc = l->kind == W_INT8   ? loom_gemv_int8(x, BF16, l->weight, l->scale, l->bias, y, BF16, T, N, K, nt)
             : l->kind == W_INT4 ? loom_gemv_int4(x, BF16, l->weight, l->scale, l->zero, l->group_size, l->bias,
                                                  y, BF16, T, N, K, nt)
                                 : loom_gemv_bf16(x, BF16, l->weight, l->scale, l->bias, y, BF16, T, N, K, nt);
    if (rc || !l->bias_after) return rc;
    for (int64_t t = 0; t < T; t++)
        for (int64_t n = 0; n < N; n++)
            y[t * N + n] = round_bf16(widen_bf16(y[t * N + n]) + widen_bf16(l->bias_after[n]));
    return 0;
}

/* x [T, hidden] bf16 in (the embeddings), out [T, hidden] (the final norm's output); cos, sin
 * [T, rotary_dim / 2] bf16; slots [T] each token's cache slot; block_table [T, max_blocks] and
 * seq_lens [T] (this token included). Returns 0; -1 if out of memory; -2 if a slot, a sequence length
 * or a block id is out of range (checked before anything is written). */
int loom_decode_stack(const loom_stack *m, const uint16_t *x, uint16_t *out, int64_t T, const uint16_t *cos,
                      const uint16_t *sin, const int64_t *slots, const int64_t *block_table,
                      int64_t max_blocks, const int64_t *seq_lens, int nthreads) {
    int64_t E = m->hidden, H = m->num_heads, KvH = m->num_kv_heads, D = m->head_dim, I = m->intermediate;
    int64_t q_size = H * D, kv_size = KvH * D, qkv_n = q_size + 2 * kv_size;
    int64_t num_slots = m->num_blocks * m->block_size;
    for (int64_t t = 0; t < T; t++) {
        int64_t L = seq_lens[t];
        if (slots[t] < 0 || slots[t] >= num_slots || L < 1 || L > max_blocks * m->block_size) return -2;
        for (int64_t b = 0; b < (L + m->block_size - 1) / m->block_size; b++) {
            int64_t id = block_table[t * max_blocks + b];
            if (id < 0 || id >= m->num_blocks) return -2;
        }
    }
    size_t n = T * (4 * E + qkv_n + q_size + kv_size + q_size + 2 * I + I);
    uint16_t *buf = malloc(n * sizeof(uint16_t));
    if (!buf) return -1;
    uint16_t *h = buf, *h2 = h + T * E, *res = h2 + T * E, *xn = res + T * E, *qkv = xn + T * E;
    uint16_t *q = qkv + T * qkv_n, *k = q + T * q_size, *attn = k + T * kv_size, *gu = attn + T * q_size;
    uint16_t *act = gu + T * 2 * I, *tmp;
    memcpy(h, x, T * E * sizeof(uint16_t));
    int rc = 0;
    for (int64_t l = 0; l < m->num_layers && !rc; l++) {
        const loom_layer *ly = m->layers + l;
        if (l == 0) {
            loom_rms_norm(h, NULL, ly->input_norm, xn, NULL, BF16, T, E, m->eps, nthreads);
            memcpy(res, h, T * E * sizeof(uint16_t));
        } else {
            loom_rms_norm(h, res, ly->input_norm, xn, res, BF16, T, E, m->eps, nthreads);
        }
        if ((rc = linear(&ly->qkv, xn, qkv, T, E, nthreads))) break;
        loom_rotary(qkv, qkv_n, q, cos, sin, BF16, T, H, D, m->rotary_dim, m->interleaved, nthreads);
        loom_rotary(qkv + q_size, qkv_n, k, cos, sin, BF16, T, KvH, D, m->rotary_dim, m->interleaved,
                    nthreads);
        for (int64_t t = 0; t < T; t++)
            for (int64_t g = 0; g < KvH; g++) {
                size_t at = (g * num_slots + slots[t]) * D, bytes = D * sizeof(uint16_t);
                memcpy(ly->k_cache + at, k + (t * KvH + g) * D, bytes);
                memcpy(ly->v_cache + at, qkv + t * qkv_n + q_size + kv_size + g * D, bytes);
            }
        rc = loom_attention_decode(q, ly->k_cache, ly->v_cache, block_table, seq_lens, attn, BF16, T, H, KvH,
                                   D, m->num_blocks, m->block_size, max_blocks, m->scale, nthreads);
        if (rc || (rc = linear(&ly->o, attn, h, T, q_size, nthreads))) break;
        if (ly->post_self_attn_norm) {
            loom_rms_norm(h, NULL, ly->post_self_attn_norm, h2, NULL, BF16, T, E, m->eps, nthreads);
            tmp = h, h = h2, h2 = tmp;
        }
        loom_rms_norm(h, res, ly->post_attention_norm, xn, res, BF16, T, E, m->eps, nthreads);
        if ((rc = linear(&ly->gate_up, xn, gu, T, E, nthreads))) break;
        loom_silu_and_mul(gu, act, BF16, T, I, nthreads);
        if ((rc = linear(&ly->down, act, h, T, I, nthreads))) break;
        if (ly->post_mlp_norm) {
            loom_rms_norm(h, NULL, ly->post_mlp_norm, h2, NULL, BF16, T, E, m->eps, nthreads);
            tmp = h, h = h2, h2 = tmp;
        }
    }
    if (!rc) loom_rms_norm(h, res, m->final_norm, out, res, BF16, T, E, m->eps, nthreads);
    free(buf);
    return rc;
}
#endif
