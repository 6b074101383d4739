/* pocketquant CPU kernels for the INT4 EO8 scheme (plain C, called through ctypes).
 *
 * Activations: int8 per token, asymmetric, stored as u8 = q + 128 so that VNNI's u8 x s8 dot product
 * applies; sum((q - zp) * w) = sum(u8 * w) - (128 + zp) * sum(w).
 * int4 weights: llama.cpp Q4_0 nibble layout (per block of 32: byte j = value j | value j + 16 << 4,
 * each stored as w + 8), one float16 scale per group (a multiple of 32).
 * int8 weights: one scale per output row.
 *
 * Every path computes the same integers as pocketquant.numerics; only the float epilogue's summation
 * order differs. The variant is chosen at run time from the CPU's features. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define PQ_X86 1
#include <immintrin.h>
#endif

#define TILE 4 /* tokens processed together, so unpacked weights are reused */

static inline float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) { bits = sign; }
        else { /* subnormal */
            float f = ldexpf((float)mant, -24);
            return sign ? -f : f;
        }
    } else if (exp == 31) { bits = sign | 0x7f800000 | (mant << 13); }
    else { bits = sign | ((exp + 112) << 23) | (mant << 13); }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---- per-token activation quantization (bit-exact with numerics.quantize_per_token) ---------------- */

__attribute__((target_clones("avx512f", "avx2", "default")))
void pq_quantize_rows(const float *x, int64_t M, int64_t K, uint8_t *qa, float *scale, int32_t *zp) {
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
        uint8_t *out = qa + m * K;
#pragma omp simd
        for (int64_t k = 0; k < K; k++) {
            float q = __builtin_roundevenf(row[k] / s) + z; /* = nearbyintf in the default rounding mode */
            q = q < -128.0f ? -128.0f : (q > 127.0f ? 127.0f : q);
            out[k] = (uint8_t)(int)(q + 128.0f);
        }
        scale[m] = s;
        zp[m] = (int32_t)z;
    }
}

/* ---- portable reference loops ------------------------------------------------------------------- */

static void w4_rows_generic(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                            const uint8_t *w, const uint16_t *ws, const float *rowcorr, int64_t group,
                            float *y, int64_t N, int64_t n0, int64_t n1) {
    int64_t nb = K / 32, groups = K / group, per = group / 32;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (K / 2);
        for (int64_t m = 0; m < M; m++) {
            const uint8_t *a = qa + m * K;
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                int32_t dot = 0;
                for (int j = 0; j < 16; j++) {
                    uint8_t p = wr[b * 16 + j];
                    dot += (int32_t)a[b * 32 + j] * ((p & 15) - 8) + (int32_t)a[b * 32 + j + 16] * ((p >> 4) - 8);
                }
                acc += fp16_to_fp32(ws[n * groups + b / per]) * (float)dot;
            }
            y[m * N + n] = as[m] * (acc - (float)(128 + azp[m]) * rowcorr[n]);
        }
    }
}

static void w8_rows_generic(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                            const int8_t *w, const float *ws, const int32_t *wsum, float *y, int64_t N,
                            int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t m = 0; m < M; m++) {
            int32_t dot = 0;
            for (int64_t k = 0; k < K; k++) dot += (int32_t)qa[m * K + k] * w[n * K + k];
            y[m * N + n] = as[m] * ws[n] * (float)(dot - (128 + azp[m]) * wsum[n]);
        }
    }
}

#ifdef PQ_X86
/* ---- x86 helpers shared by the AVX-512 and AVX2 paths --------------------------------------------- */

#define AVX2 __attribute__((target("avx2,fma,f16c")))

/* 32 int4 weights of one Q4_0 block (16 bytes) -> 32 signed bytes in order: low nibbles are values
 * 0..15, high nibbles 16..31. AVX2 only, so the AVX-512 path inlines it too. */
AVX2 static inline __m256i unpack32(const uint8_t *p) {
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_sub_epi8(_mm256_and_si256(both, _mm256_set1_epi8(15)), _mm256_set1_epi8(8));
}

/* ---- AVX-512 VNNI ------------------------------------------------------------------------------- */

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c,fma")))

VNNI static float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

VNNI static void w4_rows_vnni(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                              const uint8_t *w, const uint16_t *ws, const float *rowcorr, int64_t group,
                              float *y, int64_t N, int64_t n0, int64_t n1) {
    int64_t nb = K / 32, groups = K / group, per = group / 32;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (K / 2);
        const uint16_t *sr = ws + n * groups;
        for (int64_t m0 = 0; m0 < M; m0 += TILE) {
            int t = (int)(M - m0 < TILE ? M - m0 : TILE);
            __m512 acc[TILE];
            for (int i = 0; i < TILE; i++) acc[i] = _mm512_setzero_ps();
            int64_t b = 0;
            for (; b + 2 <= nb; b += 2) { /* two blocks of 32 per 512-bit step */
                __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(unpack32(wr + b * 16)),
                                                unpack32(wr + b * 16 + 16), 1);
                __m512 sc = _mm512_insertf32x8(_mm512_set1_ps(_cvtsh_ss(sr[b / per])),
                                               _mm256_set1_ps(_cvtsh_ss(sr[(b + 1) / per])), 1);
                for (int i = 0; i < t; i++) {
                    __m512i av = _mm512_loadu_si512((const void *)(qa + (m0 + i) * K + b * 32));
                    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), av, wv);
                    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc[i]);
                }
            }
            float tail[TILE] = {0};
            for (; b < nb; b++) { /* an odd last block */
                __m256i wv = unpack32(wr + b * 16);
                float sc = _cvtsh_ss(sr[b / per]);
                for (int i = 0; i < t; i++) {
                    __m256i av = _mm256_loadu_si256((const __m256i *)(qa + (m0 + i) * K + b * 32));
                    __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), av, wv);
                    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(dot), _mm256_extracti128_si256(dot, 1));
                    s4 = _mm_hadd_epi32(s4, s4);
                    s4 = _mm_hadd_epi32(s4, s4);
                    tail[i] += sc * (float)_mm_cvtsi128_si32(s4);
                }
            }
            for (int i = 0; i < t; i++) {
                int64_t m = m0 + i;
                y[m * N + n] = as[m] * (hsum512(acc[i]) + tail[i] - (float)(128 + azp[m]) * rowcorr[n]);
            }
        }
    }
}

VNNI static void w8_rows_vnni(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                              const int8_t *w, const float *ws, const int32_t *wsum, float *y, int64_t N,
                              int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += TILE) {
            int t = (int)(M - m0 < TILE ? M - m0 : TILE);
            __m512i acc[TILE];
            int32_t tail[TILE] = {0};
            for (int i = 0; i < TILE; i++) acc[i] = _mm512_setzero_si512();
            int64_t k = 0;
            for (; k + 64 <= K; k += 64) {
                __m512i wv = _mm512_loadu_si512((const void *)(wr + k));
                for (int i = 0; i < t; i++)
                    acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_loadu_si512((const void *)(qa + (m0 + i) * K + k)), wv);
            }
            for (; k < K; k++)
                for (int i = 0; i < t; i++) tail[i] += (int32_t)qa[(m0 + i) * K + k] * wr[k];
            for (int i = 0; i < t; i++) {
                int64_t m = m0 + i;
                int32_t dot = _mm512_reduce_add_epi32(acc[i]) + tail[i];
                y[m * N + n] = as[m] * ws[n] * (float)(dot - (128 + azp[m]) * wsum[n]);
            }
        }
    }
}

/* ---- AVX2 (u8 x s8 through maddubs: |255 * 8 * 2| and |255 * 127 * 2| < 32768 for int4; int8 uses
 * sign-split to stay exact) ---------------------------------------------------------------------- */


AVX2 static inline __m256i dot_u8s8_avx2(__m256i a, __m256i w) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, w), _mm256_set1_epi16(1));
}

AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

AVX2 static void w4_rows_avx2(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                              const uint8_t *w, const uint16_t *ws, const float *rowcorr, int64_t group,
                              float *y, int64_t N, int64_t n0, int64_t n1) {
    int64_t nb = K / 32, groups = K / group, per = group / 32;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (K / 2);
        const uint16_t *sr = ws + n * groups;
        for (int64_t m0 = 0; m0 < M; m0 += TILE) {
            int t = (int)(M - m0 < TILE ? M - m0 : TILE);
            __m256 acc[TILE];
            for (int i = 0; i < TILE; i++) acc[i] = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                __m256i wv = unpack32(wr + b * 16);
                __m256 sc = _mm256_set1_ps(_cvtsh_ss(sr[b / per]));
                for (int i = 0; i < t; i++) {
                    __m256i av = _mm256_loadu_si256((const __m256i *)(qa + (m0 + i) * K + b * 32));
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8_avx2(av, wv)), sc, acc[i]);
                }
            }
            for (int i = 0; i < t; i++) {
                int64_t m = m0 + i;
                y[m * N + n] = as[m] * (hsum256(acc[i]) - (float)(128 + azp[m]) * rowcorr[n]);
            }
        }
    }
}
#endif

/* ---- dispatch and threading --------------------------------------------------------------------- */

enum { PQ_GENERIC = 0, PQ_AVX2 = 1, PQ_AVX512VNNI = 2 };

static int detect(void) {
#ifdef PQ_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return PQ_AVX512VNNI;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return PQ_AVX2;
#endif
    return PQ_GENERIC;
}

static int level = -1;

int pq_level(void) { if (level < 0) level = detect(); return level; }

/* Force a lower path (for tests); returns the level in force. */
int pq_set_level(int wanted) {
    int best = detect();
    level = wanted < 0 || wanted > best ? best : wanted;
    return level;
}

static int64_t chunk_bounds(int64_t N, int parts, int i, int64_t *n1) {
    int64_t per = (N + parts - 1) / parts;
    per = (per + 7) & ~(int64_t)7; /* whole cache lines of output per thread */
    int64_t n0 = per * i;
    *n1 = n0 + per > N ? N : n0 + per;
    return n0 > N ? N : n0;
}

void pq_linear_w4(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                  const uint8_t *w, const uint16_t *ws, const float *rowcorr, int64_t group, float *y,
                  int64_t N, int threads) {
    int lv = pq_level();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < threads; i++) {
        int64_t n1, n0 = chunk_bounds(N, threads, i, &n1);
        if (n0 >= n1) continue;
#ifdef PQ_X86
        if (lv == PQ_AVX512VNNI) { w4_rows_vnni(qa, as, azp, M, K, w, ws, rowcorr, group, y, N, n0, n1); continue; }
        if (lv == PQ_AVX2) { w4_rows_avx2(qa, as, azp, M, K, w, ws, rowcorr, group, y, N, n0, n1); continue; }
#endif
        w4_rows_generic(qa, as, azp, M, K, w, ws, rowcorr, group, y, N, n0, n1);
    }
}

void pq_linear_w8(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                  const int8_t *w, const float *ws, const int32_t *wsum, float *y, int64_t N, int threads) {
    int lv = pq_level();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < threads; i++) {
        int64_t n1, n0 = chunk_bounds(N, threads, i, &n1);
        if (n0 >= n1) continue;
#ifdef PQ_X86
        if (lv == PQ_AVX512VNNI) { w8_rows_vnni(qa, as, azp, M, K, w, ws, wsum, y, N, n0, n1); continue; }
#endif
        w8_rows_generic(qa, as, azp, M, K, w, ws, wsum, y, N, n0, n1);
    }
}

/* In-place fast Walsh-Hadamard transform of each row of x [M, n] (n a power of two), scaled by 1/sqrt(n). */
void pq_hadamard(float *x, int64_t M, int64_t n) {
    float norm = 1.0f / sqrtf((float)n);
    for (int64_t m = 0; m < M; m++) {
        float *r = x + m * n;
        for (int64_t h = 1; h < n; h *= 2)
            for (int64_t i = 0; i < n; i += 2 * h)
                for (int64_t j = i; j < i + h; j++) {
                    float a = r[j], b = r[j + h];
                    r[j] = a + b;
                    r[j + h] = a - b;
                }
        for (int64_t i = 0; i < n; i++) r[i] *= norm;
    }
}

/* ---- one whole decoder layer for one token (decode): no Python between its steps ----------------- */

typedef struct {
    int64_t dim, n_heads, n_kv, head_dim, ffn, max_t;
    float eps;
    const float *attn_norm, *ffn_norm;
    /* the seven projections in the order q, k, v, o, gate, up, down: int4 (Q4_0 layout), float16 scales,
     * per-row corrections (see pq_linear_w4), group sizes */
    const uint8_t *w[7];
    const uint16_t *s[7];
    const float *c[7];
    int64_t g[7];
} pq_layer;

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

/* Attention of one token over positions 0..pos of the cache, heads split across threads. Cloned for
 * AVX-512 / AVX2 / baseline and picked at load time, so the dot products are vectorized. */
__attribute__((target_clones("avx512f", "avx2", "default")))
static void attend_head(const float *qh, const float *kh, const float *vh, float *oh, float *probs,
                        int64_t D, int64_t pos) {
    float inv = 1.0f / sqrtf((float)D), mx = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t <= pos; t++) {
        float sdot = 0.0f;
#pragma omp simd reduction(+ : sdot)
        for (int64_t i = 0; i < D; i++) sdot += qh[i] * kh[t * D + i];
        probs[t] = sdot * inv;
        mx = probs[t] > mx ? probs[t] : mx;
    }
    for (int64_t t = 0; t <= pos; t++) { probs[t] = expf(probs[t] - mx); sum += probs[t]; }
    for (int64_t i = 0; i < D; i++) oh[i] = 0.0f;
    for (int64_t t = 0; t <= pos; t++) {
        float p = probs[t] / sum;
#pragma omp simd
        for (int64_t i = 0; i < D; i++) oh[i] += p * vh[t * D + i];
    }
}

static void attend(const float *q, const float *kc, const float *vc, float *att, float *probs, int64_t H,
                   int64_t KV, int64_t D, int64_t max_t, int64_t pos, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t hd = 0; hd < H; hd++) {
        int64_t j = hd / (H / KV);
        attend_head(q + hd * D, kc + j * max_t * D, vc + j * max_t * D, att + hd * D, probs + hd * (pos + 1),
                    D, pos);
    }
}

/* x [dim] is updated in place; k/v caches are [n_kv, max_t, head_dim]; cos/sin [head_dim] for `pos`;
 * scratch holds at least 2 * (n_heads + n_kv) * head_dim + 3 * ffn + dim + n_heads * (pos + 1) floats; qa holds
 * max(dim, n_heads * head_dim, ffn) bytes. */
void pq_decode_layer(const pq_layer *L, float *x, float *kc, float *vc, int64_t pos, const float *cos,
                     const float *sin, float *scratch, uint8_t *qa, int threads) {
    enum { Q, K, V, O, GATE, UP, DOWN };
    int64_t D = L->head_dim, H = L->n_heads, KV = L->n_kv, dim = L->dim, F = L->ffn;
    int64_t nq = H * D, nkv = KV * D;
    float *h = scratch, *q = h + (dim > F ? dim : F), *k = q + nq, *v = k + nkv, *att = v + nkv;
    float *g = att + nq, *u = g + F, *probs = u + F;
    float scale;
    int32_t zp;

    rms_norm(x, L->attn_norm, L->eps, dim, h);
    pq_quantize_rows(h, 1, dim, qa, &scale, &zp); /* once for q, k and v */
    pq_linear_w4(qa, &scale, &zp, 1, dim, L->w[Q], L->s[Q], L->c[Q], L->g[Q], q, nq, threads);
    pq_linear_w4(qa, &scale, &zp, 1, dim, L->w[K], L->s[K], L->c[K], L->g[K], k, nkv, threads);
    pq_linear_w4(qa, &scale, &zp, 1, dim, L->w[V], L->s[V], L->c[V], L->g[V], v, nkv, threads);
    rope(q, cos, sin, H, D);
    rope(k, cos, sin, KV, D);
    for (int64_t j = 0; j < KV; j++) {
        memcpy(kc + (j * L->max_t + pos) * D, k + j * D, D * sizeof(float));
        memcpy(vc + (j * L->max_t + pos) * D, v + j * D, D * sizeof(float));
    }
    attend(q, kc, vc, att, probs, H, KV, D, L->max_t, pos, threads);
    pq_quantize_rows(att, 1, nq, qa, &scale, &zp);
    pq_linear_w4(qa, &scale, &zp, 1, nq, L->w[O], L->s[O], L->c[O], L->g[O], h, dim, threads);
    for (int64_t i = 0; i < dim; i++) x[i] += h[i];

    rms_norm(x, L->ffn_norm, L->eps, dim, h);
    pq_quantize_rows(h, 1, dim, qa, &scale, &zp); /* once for gate and up */
    pq_linear_w4(qa, &scale, &zp, 1, dim, L->w[GATE], L->s[GATE], L->c[GATE], L->g[GATE], g, F, threads);
    pq_linear_w4(qa, &scale, &zp, 1, dim, L->w[UP], L->s[UP], L->c[UP], L->g[UP], u, F, threads);
    for (int64_t i = 0; i < F; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    pq_quantize_rows(g, 1, F, qa, &scale, &zp);
    pq_linear_w4(qa, &scale, &zp, 1, F, L->w[DOWN], L->s[DOWN], L->c[DOWN], L->g[DOWN], h, dim, threads);
    for (int64_t i = 0; i < dim; i++) x[i] += h[i];
}
