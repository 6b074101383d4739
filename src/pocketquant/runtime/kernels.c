/* pocketquant CPU kernels for the INT4 EO8 scheme (plain C, called through ctypes): per-token activation
 * quantization, the online Hadamard transform and a whole decode step. The linear layers are in gemm.c.
 * Every path computes the same integers as pocketquant.numerics; the kernel path is chosen once, from the
 * CPU's features (gemm.c). */
#include <float.h>
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

#if defined(PQ_X86) && !defined(PQ_EMULATE)
#define PQ_ATTENTION512 1
#include <immintrin.h>
#elif defined(__aarch64__) && !defined(PQ_EMULATE)
#define PQ_ATTENTION_NEON 1
#include <arm_neon.h>
#endif

/* ---- per-token activation quantization (bit-exact with numerics.quantize_per_token) ---------------- */

PQ_CLONES_AVX512
void pq_quantize_rows(const float *x, int64_t M, int64_t K, uint8_t *qa, float *scale, int32_t *zp, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (M > 1 && threads > 1)
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        float lo = 0.0f, hi = 0.0f;
#pragma omp simd reduction(min : lo) reduction(max : hi)
        for (int64_t k = 0; k < K; k++) {
            lo = row[k] < lo ? row[k] : lo;
            hi = row[k] > hi ? row[k] : hi;
        }
        float s = (hi - lo) / 255.0f;
        if (!(s >= FLT_EPSILON)) s = FLT_EPSILON;
        float z = -128.0f - nearbyintf(lo / s);
        z = z < -128.0f ? -128.0f : (z > 127.0f ? 127.0f : z);
        scale[m] = s;
        zp[m] = (int32_t)z;
        uint8_t *out = qa + m * K;
#pragma omp simd
        for (int64_t k = 0; k < K; k++) {
            float q = PQ_ROUNDEVEN(row[k] / s) + z;
            q = q < -128.0f ? -128.0f : (q > 127.0f ? 127.0f : q);
            out[k] = (uint8_t)(int)(q + 128.0f);
        }
    }
}

/* In place, each row of x [M, n]: x <- x @ H.T / sqrt(n) for H = H_m (x) Sylvester(n / m), with H_m the
 * m x m +-1 matrix hm (row-major; m = 1 and hm NULL for a power of two). The Sylvester part is a fast
 * Walsh-Hadamard transform of each of the m segments; H_m then mixes the segments. */
void pq_hadamard(float *x, int64_t M, int64_t n, int64_t m, const float *hm) {
    int64_t p = n / m;
    float norm = 1.0f / sqrtf((float)n);
    for (int64_t r = 0; r < M; r++) {
        float *row = x + r * n;
        for (int64_t a = 0; a < m; a++) {
            float *seg = row + a * p;
            for (int64_t h = 1; h < p; h *= 2)
                for (int64_t i = 0; i < p; i += 2 * h)
                    for (int64_t j = i; j < i + h; j++) {
                        float u = seg[j], v = seg[j + h];
                        seg[j] = u + v;
                        seg[j + h] = u - v;
                    }
        }
        for (int64_t b = 0; m > 1 && b < p; b++) {
            float col[256]; /* m <= 256 (Paley orders used by Llama-family widths are far smaller) */
            for (int64_t a = 0; a < m; a++) col[a] = row[a * p + b];
            for (int64_t a = 0; a < m; a++) {
                float acc = 0.0f;
                for (int64_t c = 0; c < m; c++) acc += hm[a * m + c] * col[c];
                row[a * p + b] = acc;
            }
        }
        for (int64_t i = 0; i < n; i++) row[i] *= norm;
    }
}

/* ---- one whole decoder layer for one token (decode): no Python between its steps ----------------- */

/* pq_layer and pq_cache are in kernels.h */

static void rms_norm(const float *x, const float *w, float eps, int64_t n, float *out) {
    double ss = 0.0; /* float64 sum, then float32 as torch's mean of float32 squares (close, not exact) */
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

static void rope(float *v, const float *cos, const float *sin, int64_t heads, int64_t d) {
    int64_t h2 = d / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *r = v + h * d;
        for (int64_t i = 0; i < h2; i++) {
            float a = r[i], b = r[i + h2];
            r[i] = a * cos[i] - b * sin[i];
            r[i + h2] = b * cos[i + h2] + a * sin[i + h2];
        }
    }
}

/* Write this token's keys and values (n_kv heads of D) at `pos`, quantizing each head for an int8 cache. */
static void cache_write(const pq_cache *C, const float *k, const float *v, int64_t KV, int64_t D, int64_t pos,
                        uint8_t *tmp) {
    for (int kind = 0; kind < 2; kind++) {
        const float *src = kind ? v : k;
        void *dst = kind ? C->v : C->k;
        for (int64_t j = 0; j < KV; j++) {
            int64_t row = j * C->max_t + pos;
            if (C->bits != 8) { memcpy((float *)dst + row * D, src + j * D, D * sizeof(float)); continue; }
            float scale;
            int32_t zero;
            pq_quantize_rows(src + j * D, 1, D, tmp, &scale, &zero, 1);
            int8_t *q = (int8_t *)dst + row * D;
            for (int64_t i = 0; i < D; i++) q[i] = (int8_t)(tmp[i] - 128);
            (kind ? C->v_scale : C->k_scale)[row] = scale;
            (kind ? C->v_zero : C->k_zero)[row] = (float)zero;
        }
    }
}

/* Attention of one query head over positions 0..pos of its KV head (j), written in to oh [D]; probs
 * holds pos + 1 floats. An int8 cache is read as scale * (q - zero): scores use sum(qh * k) -
 * zero * sum(qh); values accumulate p * scale * q, minus sum(p * scale * zero) at the end. */
static float softmax_weights(float *probs, int64_t T, float mx, const pq_cache *C, int64_t base) {
    float sum = 0.0f, shift = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < T; t++) {
        probs[t] = exp_neg(probs[t] - mx);
        sum += probs[t];
    }
    float norm = 1.0f / sum;
    for (int64_t t = 0; t < T; t++) {
        probs[t] *= C->bits == 8 ? norm * C->v_scale[base + t] : norm;
        if (C->bits == 8) shift += probs[t] * C->v_zero[base + t];
    }
    return shift;
}

PQ_CLONES_AVX2
static void attend_head(const float *qh, const pq_cache *C, int64_t j, float *oh, float *probs, int64_t D,
                        int64_t pos) {
    float inv = 1.0f / sqrtf((float)D), mx = -INFINITY, qsum = 0.0f;
    int64_t base = j * C->max_t, T = pos + 1;
    const float *kf = (const float *)C->k + base * D, *vf = (const float *)C->v + base * D;
    const int8_t *kq = (const int8_t *)C->k + base * D, *vq = (const int8_t *)C->v + base * D;
    for (int64_t i = 0; i < D; i++) qsum += qh[i];
    for (int64_t t = 0; t < T; t++) {
        float sdot = 0.0f;
        if (C->bits == 8) {
#pragma omp simd reduction(+ : sdot)
            for (int64_t i = 0; i < D; i++) sdot += qh[i] * (float)kq[t * D + i];
            sdot = C->k_scale[base + t] * (sdot - C->k_zero[base + t] * qsum);
        } else {
#pragma omp simd reduction(+ : sdot)
            for (int64_t i = 0; i < D; i++) sdot += qh[i] * kf[t * D + i];
        }
        probs[t] = sdot * inv;
        mx = probs[t] > mx ? probs[t] : mx;
    }
    float shift = softmax_weights(probs, T, mx, C, base);
    for (int64_t i = 0; i < D; i++) oh[i] = -shift;
    for (int64_t t = 0; t < T; t++) {
#pragma omp simd
        for (int64_t i = 0; i < D; i++) oh[i] += probs[t] * (C->bits == 8 ? (float)vq[t * D + i] : vf[t * D + i]);
    }
}

#ifdef PQ_ATTENTION512
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

/* The same with AVX-512 for head_dim a multiple of 16 (up to 256): the query and the output stay in
 * registers, four positions' scores are reduced together. */
VNNI static INLINE __m512 load16(const void *p, int int8) {
    return int8 ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)))
                : _mm512_loadu_ps((const float *)p);
}

VNNI static void attend_head_avx512(const float *qh, const pq_cache *C, int64_t j, float *oh, float *probs,
                                    int64_t D, int64_t pos) {
    int int8 = C->bits == 8, n = (int)(D / 16), es = int8 ? 1 : 4;
    float inv = 1.0f / sqrtf((float)D), mx = -INFINITY, qsum = 0.0f;
    int64_t base = j * C->max_t, T = pos + 1;
    const char *kc = (const char *)C->k + base * D * es, *vc = (const char *)C->v + base * D * es;
    __m512 q[16], acc[16];
    for (int c = 0; c < n; c++) q[c] = _mm512_loadu_ps(qh + 16 * c);
    for (int64_t i = 0; i < D; i++) qsum += qh[i];
    for (int64_t t = 0; t < T; t++) {
        __m512 a = _mm512_setzero_ps();
        for (int c = 0; c < n; c++) a = _mm512_fmadd_ps(q[c], load16(kc + (t * D + 16 * c) * es, int8), a);
        float sdot = _mm512_reduce_add_ps(a);
        if (int8) sdot = C->k_scale[base + t] * (sdot - C->k_zero[base + t] * qsum);
        probs[t] = sdot * inv;
        mx = probs[t] > mx ? probs[t] : mx;
    }
    __m512 shift = _mm512_set1_ps(softmax_weights(probs, T, mx, C, base));
    for (int c = 0; c < n; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; t++) {
        __m512 p = _mm512_set1_ps(probs[t]);
        for (int c = 0; c < n; c++) acc[c] = _mm512_fmadd_ps(p, load16(vc + (t * D + 16 * c) * es, int8), acc[c]);
    }
    for (int c = 0; c < n; c++) _mm512_storeu_ps(oh + 16 * c, _mm512_sub_ps(acc[c], shift));
}
#endif

#ifdef PQ_ATTENTION_NEON
/* The same with NEON for head_dim a multiple of 16: four partial sums per score, and the output a quarter of a
 * 16-float slice of it at a time across all positions. */
static INLINE float32x4_t load4(const void *p, int64_t i, int int8) { /* 4 keys or values from element i */
    if (!int8) return vld1q_f32((const float *)p + i);
    int32_t v;
    memcpy(&v, (const int8_t *)p + i, 4);
    int16x8_t w = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(v)));
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)));
}

static void attend_head_neon(const float *qh, const pq_cache *C, int64_t j, float *oh, float *probs, int64_t D,
                             int64_t pos) {
    int int8 = C->bits == 8, es = int8 ? 1 : 4;
    float inv = 1.0f / sqrtf((float)D), mx = -INFINITY, qsum = 0.0f;
    int64_t base = j * C->max_t, T = pos + 1;
    const char *kc = (const char *)C->k + base * D * es, *vc = (const char *)C->v + base * D * es;
    for (int64_t i = 0; i < D; i++) qsum += qh[i];
    for (int64_t t = 0; t < T; t++) {
        const char *kt = kc + t * D * es;
        float32x4_t a[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
        for (int64_t i = 0; i < D; i += 16)
            for (int u = 0; u < 4; u++) a[u] = vfmaq_f32(a[u], vld1q_f32(qh + i + 4 * u), load4(kt, i + 4 * u, int8));
        float sdot = vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])));
        if (int8) sdot = C->k_scale[base + t] * (sdot - C->k_zero[base + t] * qsum);
        probs[t] = sdot * inv;
        mx = probs[t] > mx ? probs[t] : mx;
    }
    float32x4_t shift = vdupq_n_f32(softmax_weights(probs, T, mx, C, base));
    for (int64_t i = 0; i < D; i += 16) {
        float32x4_t o[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
        for (int64_t t = 0; t < T; t++)
            for (int u = 0; u < 4; u++) o[u] = vfmaq_n_f32(o[u], load4(vc + t * D * es, i + 4 * u, int8), probs[t]);
        for (int u = 0; u < 4; u++) vst1q_f32(oh + i + 4 * u, vsubq_f32(o[u], shift));
    }
}
#endif

/* Thread t's share of the (sequence, query head) pairs (the caller is in a parallel region of `threads`
 * threads); sequence b's head hd keeps its scores at probs + (b * H + hd) * span. */
static void attend_share(const float *q, const pq_cache *const *C, const int64_t *pos, float *att, float *probs,
                         int64_t span, int64_t B, int64_t H, int64_t KV, int64_t D, int t, int threads) {
    for (int64_t i = B * H * t / threads; i < B * H * (t + 1) / threads; i++) {
        int64_t b = i / H, hd = i % H;
        const float *qh = q + i * D;
        float *oh = att + i * D, *ph = probs + i * span;
#ifdef PQ_ATTENTION512
        if (pq_current()->vector_attention && D % 16 == 0 && D <= 256) {
            attend_head_avx512(qh, C[b], hd / (H / KV), oh, ph, D, pos[b]);
            continue;
        }
#elif defined(PQ_ATTENTION_NEON)
        if (pq_current()->vector_attention && D % 16 == 0) {
            attend_head_neon(qh, C[b], hd / (H / KV), oh, ph, D, pos[b]);
            continue;
        }
#endif
        attend_head(qh, C[b], hd / (H / KV), oh, ph, D, pos[b]);
    }
}

/* A barrier for the threads of one parallel region that spins, then yields the core, but never sleeps. A
 * decode step passes a dozen barriers per layer; the OpenMP runtime's barrier sleeps in the kernel whenever the
 * process holds more OpenMP threads than cores (one pool on the main thread and another on a server's engine
 * thread are enough), and each wake-up then costs tens of microseconds. It assumes the region has no more
 * threads than cores (the default): beyond that, a waiting thread only yields to one that was descheduled. */
typedef struct {
    atomic_int arrived, phase;
} pq_barrier;

static void barrier_wait(pq_barrier *bar, int threads) {
    if (threads == 1) return;
    int phase = atomic_load_explicit(&bar->phase, memory_order_relaxed);
    if (atomic_fetch_add_explicit(&bar->arrived, 1, memory_order_acq_rel) == threads - 1) {
        atomic_store_explicit(&bar->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&bar->phase, phase + 1, memory_order_release);
        return;
    }
    for (int spin = 0; atomic_load_explicit(&bar->phase, memory_order_acquire) == phase; spin++) {
        if (spin >= 2000) {
            sched_yield();
            continue;
        }
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ volatile("yield");
#endif
    }
}

/* The per-sequence buffers of a decode step for B sequences (rows of each one sequence apart). */
typedef struct {
    float *h, *q, *k, *v, *att, *g, *u, *probs, *scale;
    int32_t *zp;
    uint8_t *qa;
    int64_t wide, qa_row, span; /* h's and qa's row lengths; scores per head */
    pq_barrier *barrier;
} pq_rows;

/* One decoder layer for B sequences (x [B, dim] in place; sequence b at position pos[b] of its caches C[b]);
 * cos / sin [B, head_dim]. Runs inside the parallel region of pq_decode_layers: thread t of `threads` computes
 * its share of every projection (all B rows at once: one pass over the weights) and of the (sequence, head)
 * pairs; the small per-sequence steps between them are shared out by sequence. Every sequence's numbers are
 * those it gets alone. */
static void decode_layer(const pq_layer *L, const pq_cache *const *C, int64_t B, float *x, const int64_t *pos,
                         const float *cos, const float *sin, const pq_rows *R, int t, int threads) {
    enum { Q, K, V, O, GATE, UP, DOWN };
    int64_t D = L->head_dim, H = L->n_heads, KV = L->n_kv, dim = L->dim, F = L->ffn;
    int64_t nq = H * D, nkv = KV * D;
    float *h = R->h, *q = R->q, *k = R->k, *v = R->v, *att = R->att, *g = R->g, *u = R->u;
#define EACH_SEQUENCE(b) for (int64_t b = B * t / threads; b < B * (t + 1) / threads; b++)
#define BARRIER barrier_wait(R->barrier, threads)
#define SHARE(i, in, out, n) pq_linear_w4_share(R->qa, R->scale, R->zp, B, in, L->w[i], L->s[i], L->c[i], L->g[i], \
                                                out, n, t, threads)

    EACH_SEQUENCE(b) {
        rms_norm(x + b * dim, L->attn_norm, L->eps, dim, h + b * dim);
        pq_quantize_rows(h + b * dim, 1, dim, R->qa + b * dim, R->scale + b, R->zp + b, 1); /* for q, k and v */
    }
    BARRIER;
    SHARE(Q, dim, q, nq);
    SHARE(K, dim, k, nkv);
    SHARE(V, dim, v, nkv);
    BARRIER;
    EACH_SEQUENCE(b) {
        float *qb = q + b * nq, *kb = k + b * nkv;
        rope(qb, cos + b * D, sin + b * D, H, D);
        rope(kb, cos + b * D, sin + b * D, KV, D);
        if (L->had_qk) {
            pq_hadamard(qb, H, D, 1, NULL);
            pq_hadamard(kb, KV, D, 1, NULL);
        }
        cache_write(C[b], kb, v + b * nkv, KV, D, pos[b], R->qa + b * R->qa_row);
    }
    BARRIER;
    attend_share(q, C, pos, att, R->probs, R->span, B, H, KV, D, t, threads);
    BARRIER;
    EACH_SEQUENCE(b) pq_quantize_rows(att + b * nq, 1, nq, R->qa + b * nq, R->scale + b, R->zp + b, 1);
    BARRIER;
    SHARE(O, nq, h, dim);
    BARRIER;
    EACH_SEQUENCE(b) {
        float *xb = x + b * dim, *hb = h + b * dim;
        for (int64_t i = 0; i < dim; i++) xb[i] += hb[i];
        rms_norm(xb, L->ffn_norm, L->eps, dim, hb);
        pq_quantize_rows(hb, 1, dim, R->qa + b * dim, R->scale + b, R->zp + b, 1); /* for gate and up */
    }
    BARRIER;
    SHARE(GATE, dim, g, F);
    SHARE(UP, dim, u, F);
    BARRIER;
    EACH_SEQUENCE(b) {
        float *gb = g + b * F, *ub = u + b * F;
        for (int64_t i = 0; i < F; i++) gb[i] = gb[i] / (1.0f + expf(-gb[i])) * ub[i];
        if (L->had_down_m) pq_hadamard(gb, 1, F, L->had_down_m, L->had_down);
        pq_quantize_rows(gb, 1, F, R->qa + b * F, R->scale + b, R->zp + b, 1);
    }
    BARRIER;
    SHARE(DOWN, F, h, dim);
    BARRIER;
    EACH_SEQUENCE(b) /* the next layer starts with the same sequences on this thread: no barrier */
        for (int64_t i = 0; i < dim; i++) x[b * dim + i] += h[b * dim + i];
#undef SHARE
#undef BARRIER
#undef EACH_SEQUENCE
}

/* Floats of scratch that pq_decode_layers needs for B sequences whose caches hold max_t positions (the
 * quantized activations' bytes included). */
int64_t pq_decode_scratch(const pq_layer *L, int64_t B, int64_t max_t) {
    int64_t nq = L->n_heads * L->head_dim, nkv = L->n_kv * L->head_dim, wide = L->dim > L->ffn ? L->dim : L->ffn;
    int64_t qa_row = wide > nq ? wide : nq; /* bytes of quantized activations per sequence */
    return B * (2 * L->head_dim + 2 + wide + 2 * nq + 2 * nkv + 2 * L->ffn + L->n_heads * max_t + qa_row / 4 + 1);
}

/* One token for each of B sequences through all n layers (a decode step): x [B, dim] in place; sequence b is
 * at position pos[b] and uses caches[i * B + b] in layer i, whose max_t is at most max_t. One parallel region
 * for the whole step (forking threads per projection cost more than the small projections of a small model).
 * RoPE's cos / sin come from inv_freq [head_dim / 2] as the model computes them (float32). scratch holds
 * pq_decode_scratch(layers, B, max_t) floats. */
void pq_decode_layers(const pq_layer *layers, const pq_cache *const *caches, int64_t n, int64_t B, float *x,
                      const int64_t *pos, int64_t max_t, const float *inv_freq, float *scratch, int threads) {
    const pq_layer *L = layers;
    int64_t D = L->head_dim, nq = L->n_heads * D, nkv = L->n_kv * D, F = L->ffn;
    pq_rows R;
    R.wide = L->dim > F ? L->dim : F;
    R.qa_row = R.wide > nq ? R.wide : nq;
    R.span = max_t;
    float *cos = scratch, *sin = cos + B * D;
    R.scale = sin + B * D;
    R.zp = (int32_t *)(R.scale + B);
    R.h = (float *)(R.zp + B);
    R.q = R.h + B * R.wide;
    R.k = R.q + B * nq;
    R.v = R.k + B * nkv;
    R.att = R.v + B * nkv;
    R.g = R.att + B * nq;
    R.u = R.g + B * F;
    R.probs = R.u + B * F;
    R.qa = (uint8_t *)(R.probs + B * L->n_heads * max_t);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < D / 2; i++) {
            float angle = (float)pos[b] * inv_freq[i];
            cos[b * D + i] = cos[b * D + i + D / 2] = cosf(angle);
            sin[b * D + i] = sin[b * D + i + D / 2] = sinf(angle);
        }
    pq_barrier barrier = {0, 0};
    R.barrier = &barrier;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), team = omp_get_num_threads();
        for (int64_t i = 0; i < n; i++)
            decode_layer(layers + i, caches + i * B, B, x, pos, cos, sin, &R, t, team);
    }
}
