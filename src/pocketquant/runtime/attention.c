/* Causal attention over many queries at once (a prompt's prefill, or a window of evaluation), float32.
 *
 * Queries at positions start..start+T-1 attend to keys 0..their own position. For each query head, a
 * block of QB queries computes its scores against the keys as a small GEMM: the keys of its KV head are
 * first transposed into blocks of 8 positions [D][8], so one vector holds 8 positions' scores and the
 * inner loop is a broadcast and a fused multiply-add, with no horizontal sums. Keys past a block's last
 * query are never read (the causal half is skipped). Softmax uses exp_neg (kernels.h); the weighted sum
 * of values keeps 64 output floats in registers per query. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#define QB 8   /* queries per block */
#define DV 64  /* output floats kept in registers at a time (head_dim must be a multiple) */

/* kt [ceil(S / 8)][D][8] from keys k (position t, dimension d at k[t * sk + d]); positions past S are 0 */
static void transpose_keys(const float *k, int64_t sk, int64_t S, int64_t D, float *kt) {
    for (int64_t b = 0; b < (S + 7) / 8; b++)
        for (int64_t d = 0; d < D; d++)
            for (int l = 0; l < 8; l++) kt[(b * D + d) * 8 + l] = b * 8 + l < S ? k[(b * 8 + l) * sk + d] : 0.0f;
}

/* scores [QB][S8] of the block's queries qs [QB][D] (already scaled) against keys 0..S-1 */
static void block_scores(const float *qs, const float *kt, int64_t S, int64_t D, int64_t S8, float *scores) {
    for (int64_t b = 0; b < (S + 7) / 8; b++) {
        float acc[QB][8] = {{0}};
        const float *kb = kt + b * D * 8;
        for (int64_t d = 0; d < D; d++)
            for (int i = 0; i < QB; i++)
                for (int l = 0; l < 8; l++) acc[i][l] = fmaf(qs[i * D + d], kb[d * 8 + l], acc[i][l]);
        for (int i = 0; i < QB; i++)
            for (int l = 0; l < 8; l++) scores[i * S8 + b * 8 + l] = acc[i][l];
    }
}

#if defined(PQ_X86) && !defined(PQ_EMULATE)
#include <immintrin.h>

/* The same with one vector of 8 positions' scores per query: a broadcast and an FMA per query and dimension */
__attribute__((target("avx2,fma"))) static void block_scores_avx2(const float *qs, const float *kt, int64_t S,
                                                                 int64_t D, int64_t S8, float *scores) {
    for (int64_t b = 0; b < (S + 7) / 8; b++) {
        __m256 acc[QB];
        const float *kb = kt + b * D * 8;
        for (int i = 0; i < QB; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d++) {
            __m256 kv = _mm256_loadu_ps(kb + d * 8);
            for (int i = 0; i < QB; i++) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(qs + i * D + d), kv, acc[i]);
        }
        for (int i = 0; i < QB; i++) _mm256_storeu_ps(scores + i * S8 + b * 8, acc[i]);
    }
}

/* softmax_unnormalized (below) 8 positions at a time, with exp_neg's polynomial on vectors */
__attribute__((target("avx2,fma"))) static float softmax_unnormalized_avx2(float *s, int64_t n) {
    __m256 mx8 = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(s + t));
    float lanes[8], mx = -INFINITY, sum = 0.0f;
    _mm256_storeu_ps(lanes, mx8);
    for (int l = 0; l < 8; l++) mx = lanes[l] > mx ? lanes[l] : mx;
    for (int64_t r = t; r < n; r++) mx = s[r] > mx ? s[r] : mx;
    __m256 m = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        __m256 x = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(s + t), m), _mm256_set1_ps(-87.0f));
        __m256 y = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504f));
        __m256 k = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm256_sub_ps(y, k);
        __m256 p = _mm256_set1_ps(PQ_EXP2_POLY[0]);
        for (int i = 1; i < 7; i++) p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(PQ_EXP2_POLY[i]));
        __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
        __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
        _mm256_storeu_ps(s + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    _mm256_storeu_ps(lanes, acc);
    for (int l = 0; l < 8; l++) sum += lanes[l];
    for (; t < n; t++) {
        s[t] = exp_neg(s[t] - mx);
        sum += s[t];
    }
    return sum;
}

static int avx2_fma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#define PQ_VECTOR_ATTENTION 1
#define vector_available avx2_fma
#define vector_scores block_scores_avx2
#define vector_softmax softmax_unnormalized_avx2

#elif defined(__aarch64__) && !defined(PQ_EMULATE)
#include <arm_neon.h>

/* The same with NEON: two vectors of 4 positions' scores per query */
static void block_scores_neon(const float *qs, const float *kt, int64_t S, int64_t D, int64_t S8, float *scores) {
    for (int64_t b = 0; b < (S + 7) / 8; b++) {
        float32x4_t lo[QB], hi[QB];
        const float *kb = kt + b * D * 8;
        for (int i = 0; i < QB; i++) lo[i] = hi[i] = vdupq_n_f32(0.0f);
        for (int64_t d = 0; d < D; d++) {
            float32x4_t k0 = vld1q_f32(kb + d * 8), k1 = vld1q_f32(kb + d * 8 + 4);
            for (int i = 0; i < QB; i++) {
                lo[i] = vfmaq_n_f32(lo[i], k0, qs[i * D + d]);
                hi[i] = vfmaq_n_f32(hi[i], k1, qs[i * D + d]);
            }
        }
        for (int i = 0; i < QB; i++) {
            vst1q_f32(scores + i * S8 + b * 8, lo[i]);
            vst1q_f32(scores + i * S8 + b * 8 + 4, hi[i]);
        }
    }
}

/* softmax_unnormalized (below) 4 positions at a time, with exp_neg's polynomial on vectors */
static float softmax_unnormalized_neon(float *s, int64_t n) {
    float32x4_t mx4 = vdupq_n_f32(-INFINITY);
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) mx4 = vmaxq_f32(mx4, vld1q_f32(s + t));
    float mx = vmaxvq_f32(mx4), sum = 0.0f;
    for (int64_t r = t; r < n; r++) mx = s[r] > mx ? s[r] : mx;
    float32x4_t m = vdupq_n_f32(mx), acc = vdupq_n_f32(0.0f);
    for (t = 0; t + 4 <= n; t += 4) {
        float32x4_t x = vmaxq_f32(vsubq_f32(vld1q_f32(s + t), m), vdupq_n_f32(-87.0f));
        float32x4_t y = vmulq_f32(x, vdupq_n_f32(1.44269504f)), k = vrndnq_f32(y), f = vsubq_f32(y, k);
        float32x4_t p = vdupq_n_f32(PQ_EXP2_POLY[0]);
        for (int i = 1; i < 7; i++) p = vaddq_f32(vmulq_f32(p, f), vdupq_n_f32(PQ_EXP2_POLY[i]));
        int32x4_t bits = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(k), vdupq_n_s32(127)), 23);
        float32x4_t e = vmulq_f32(p, vreinterpretq_f32_s32(bits));
        vst1q_f32(s + t, e);
        acc = vaddq_f32(acc, e);
    }
    sum = vaddvq_f32(acc);
    for (; t < n; t++) {
        s[t] = exp_neg(s[t] - mx);
        sum += s[t];
    }
    return sum;
}

static int neon_attention(void) { return pq_current()->vector_attention; }
#define PQ_VECTOR_ATTENTION 1
#define vector_available neon_attention
#define vector_scores block_scores_neon
#define vector_softmax softmax_unnormalized_neon
#endif

/* s[0..n) <- e^(s - max s), returns their sum */
PQ_CLONES static float softmax_unnormalized(float *s, int64_t n) {
    float mx = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : mx)
    for (int64_t t = 0; t < n; t++) mx = s[t] > mx ? s[t] : mx;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; t++) {
        s[t] = exp_neg(s[t] - mx);
        sum += s[t];
    }
    return sum;
}

/* out [D] = sum over the n positions of p[t] * v[t] */
PQ_CLONES static void weighted_values(const float *p, const float *v, int64_t sv, int64_t n, int64_t D, float *out) {
    for (int64_t d0 = 0; d0 < D; d0 += DV) {
        float acc[DV] = {0};
        for (int64_t t = 0; t < n; t++)
            for (int d = 0; d < DV; d++) acc[d] = fmaf(p[t], v[t * sv + d0 + d], acc[d]);
        for (int d = 0; d < DV; d++) out[d0 + d] = acc[d];
    }
}

/* q: query t of head h at q[t * sq_t + h * sq_h + d]; k, v: position s of KV head j at [j * s*_h + s * s*_t + d];
 * out [T][H][D]. Needs D % 64 == 0. Returns 0, or -1 when memory runs out. */
int pq_prefill_attention(const float *q, int64_t sq_t, int64_t sq_h, const float *k, int64_t sk_h, int64_t sk_t,
                         const float *v, int64_t sv_h, int64_t sv_t, float *out, int64_t T, int64_t start, int64_t H,
                         int64_t KV, int64_t D, int threads) {
    int64_t S = start + T, S8 = (S + 7) / 8 * 8, blocks = (T + QB - 1) / QB, group = H / KV;
    float scale = 1.0f / sqrtf((float)D);
    float *kt = malloc(sizeof(float) * KV * S8 * D);
    if (!kt) return -1;
    int failed = 0;
#ifdef PQ_VECTOR_ATTENTION
    int vector = vector_available();
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < KV; j++) transpose_keys(k + j * sk_h, sk_t, S, D, kt + j * S8 * D);
#pragma omp parallel num_threads(threads)
    {
        float *qs = malloc(sizeof(float) * QB * D), *scores = malloc(sizeof(float) * QB * S8);
        if (!qs || !scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < H * blocks; item++) {
            if (failed) continue;
            /* the longest blocks (the last queries) first, so that threads finish together */
            int64_t h = item % H, blk = blocks - 1 - item / H, i0 = blk * QB, n = T - i0 < QB ? T - i0 : QB;
            int64_t j = h / group, keys = start + i0 + n; /* the block's last query sees this many keys */
            for (int i = 0; i < QB; i++)
                for (int64_t d = 0; d < D; d++) qs[i * D + d] = i < n ? q[(i0 + i) * sq_t + h * sq_h + d] * scale : 0.0f;
#ifdef PQ_VECTOR_ATTENTION
            if (vector) vector_scores(qs, kt + j * S8 * D, keys, D, S8, scores);
            else
#endif
            block_scores(qs, kt + j * S8 * D, keys, D, S8, scores);
            for (int i = 0; i < n; i++) {
                float *s = scores + i * S8;
                int64_t seen = start + i0 + i + 1;
                float *o = out + ((i0 + i) * H + h) * D;
#ifdef PQ_VECTOR_ATTENTION
                float norm = 1.0f / (vector ? vector_softmax(s, seen) : softmax_unnormalized(s, seen));
#else
                float norm = 1.0f / softmax_unnormalized(s, seen);
#endif
                weighted_values(s, v + j * sv_h, sv_t, seen, D, o);
                for (int64_t d = 0; d < D; d++) o[d] *= norm;
            }
        }
        free(qs);
        free(scores);
    }
    free(kt);
    return failed ? -1 : 0;
}
