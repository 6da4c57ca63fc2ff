/* Decode attention over the paged KV cache on CPU: one query token per sequence, keys and values read
 * in place through the block table (torch's path gathers them into a padded copy first, then runs two
 * batched matmuls and a masked softmax: a dozen ops, most of a small decode step's attention time).
 *
 * q [S, H, D], out [S, H, D] and the caches [KvH, num_blocks, block_size, D] hold float32 or bf16
 * values (`kind`); block_table [S, max_blocks] and seq_lens [S] are int64. Query heads h * G .. h * G +
 * G - 1 share kv head h (GQA). Scores, softmax and the weighted sum of values are float32 (HF's eager
 * attention does its softmax in float32 too); the result is rounded once to the output kind.
 * One task per (sequence, kv head), split over OpenMP threads. D % 8 == 0 (checked by the caller).
 */
#include <math.h>

#include "common.h"

#ifdef LOOM_NATIVE

#define MAX_G 16 /* query heads per kv head handled in registers; the caller checks */

static void attend_one(const void *q, const void *kc, const void *vc, const int64_t *table, int64_t L,
                       void *out, int kind, int64_t G, int64_t D, int64_t block_size, float scale,
                       float *qf, float *scores, float *acc) {
    size_t esize = kind == BF16 ? 2 : 4;
    for (int64_t i = 0; i < G * D; i++)
        qf[i] = kind == BF16 ? widen_bf16(((const uint16_t *)q)[i]) : ((const float *)q)[i];
    /* scores[g][j] = q_g . k_j * scale */
    for (int64_t j = 0; j < L; j++) {
        const char *kp = (const char *)kc + (table[j / block_size] * block_size + j % block_size) * D * esize;
        __m256 a[MAX_G];
        for (int64_t g = 0; g < G; g++) a[g] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            __m256 kv = load8(kp, kind, d);
            for (int64_t g = 0; g < G; g++) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * D + d), kv, a[g]);
        }
        for (int64_t g = 0; g < G; g++) scores[g * L + j] = hsum(a[g]) * scale;
    }
    /* softmax per query head, then the weighted sum of values */
    float total[MAX_G];
    for (int64_t g = 0; g < G; g++) {
        float *sg = scores + g * L, m = -INFINITY, sum = 0;
        for (int64_t j = 0; j < L; j++) m = sg[j] > m ? sg[j] : m;
        for (int64_t j = 0; j < L; j++) sum += sg[j] = expf(sg[j] - m);
        total[g] = sum;
    }
    for (int64_t i = 0; i < G * D; i++) acc[i] = 0;
    for (int64_t j = 0; j < L; j++) {
        const char *vp = (const char *)vc + (table[j / block_size] * block_size + j % block_size) * D * esize;
        for (int64_t d = 0; d < D; d += 8) {
            __m256 vv = load8(vp, kind, d);
            for (int64_t g = 0; g < G; g++) {
                float *ag = acc + g * D + d;
                _mm256_storeu_ps(ag, _mm256_fmadd_ps(_mm256_set1_ps(scores[g * L + j]), vv, _mm256_loadu_ps(ag)));
            }
        }
    }
    for (int64_t g = 0; g < G; g++)
        for (int64_t d = 0; d < D; d++) store(out, kind, g * D + d, acc[g * D + d] / total[g]);
}

/* Returns 0; -1 if a task's buffers could not be allocated; -2 if a sequence's length or one of the
 * block ids it reads is out of range (nothing is read then). */
int loom_attention_decode(const void *q, const void *kc, const void *vc, const int64_t *block_table,
                          const int64_t *seq_lens, void *out, int kind, int64_t S, int64_t H, int64_t KvH,
                          int64_t D, int64_t num_blocks, int64_t block_size, int64_t max_blocks, float scale,
                          int nthreads) {
    for (int64_t s = 0; s < S; s++) {
        int64_t L = seq_lens[s];
        if (L < 1 || L > max_blocks * block_size) return -2;
        for (int64_t b = 0; b < (L + block_size - 1) / block_size; b++) {
            int64_t id = block_table[s * max_blocks + b];
            if (id < 0 || id >= num_blocks) return -2;
        }
    }
    int64_t G = H / KvH;
    size_t esize = kind == BF16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2) reduction(| : failed)
    for (int64_t s = 0; s < S; s++) {
        for (int64_t h = 0; h < KvH; h++) {
            int64_t L = seq_lens[s];
            float *buf = malloc(sizeof(float) * (2 * G * D + G * L));
            if (!buf) {
                failed = 1;
                continue;
            }
            int64_t head = (s * H + h * G) * D; /* first of this kv head's query heads, in elements */
            int64_t cache = h * num_blocks * block_size * D;
            attend_one((const char *)q + head * esize, (const char *)kc + cache * esize,
                       (const char *)vc + cache * esize, block_table + s * max_blocks, L,
                       (char *)out + head * esize, kind, G, D, block_size, scale, buf, buf + 2 * G * D,
                       buf + G * D);
            free(buf);
        }
    }
    return failed ? -1 : 0;
}
#endif
