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

#define TILE 8 /* tokens processed together, so unpacked weights are reused */

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

/* Layout of a row quantized for the int4 kernels (K a multiple of 32): units of four 32-blocks, the
 * last unit holding c = 1..4 blocks. A unit starting at byte 128u holds the first 16 values of each of
 * its blocks (16c bytes), then their last 16 values. This matches how a unit's weight bytes split into
 * low and high nibbles, so the kernels never reorder weights. */
static inline int64_t lo_offset(int64_t b) { return 128 * (b / 4) + 16 * (b % 4); }
static inline int64_t hi_offset(int64_t b, int64_t nb) {
    int64_t u = b / 4, c = nb - 4 * u < 4 ? nb - 4 * u : 4;
    return 128 * u + 16 * c + 16 * (b % 4);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void pq_quantize_rows(const float *x, int64_t M, int64_t K, uint8_t *qa, float *scale, int32_t *zp,
                      int int4_layout) {
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
        /* runs of 16 contiguous values: the natural layout is one run of K */
        int64_t run = int4_layout ? 16 : K, nb = K / 32;
        for (int64_t k0 = 0; k0 < K; k0 += run) {
            int64_t b = k0 / 32;
            uint8_t *out = qa + m * K + (!int4_layout ? 0 : k0 % 32 ? hi_offset(b, nb) : lo_offset(b));
#pragma omp simd
            for (int64_t k = 0; k < run; k++) {
                float q = __builtin_roundevenf(row[k0 + k] / s) + z; /* = nearbyintf in the default rounding mode */
                q = q < -128.0f ? -128.0f : (q > 127.0f ? 127.0f : q);
                out[k] = (uint8_t)(int)(q + 128.0f);
            }
        }
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
                const uint8_t *alo = a + lo_offset(b), *ahi = a + hi_offset(b, nb);
                int32_t dot = 0;
                for (int j = 0; j < 16; j++) {
                    uint8_t p = wr[b * 16 + j];
                    dot += (int32_t)alo[j] * ((p & 15) - 8) + (int32_t)ahi[j] * ((p >> 4) - 8);
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
/* ---- AVX-512 VNNI ------------------------------------------------------------------------------- */

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c,fma")))
#define INLINE inline __attribute__((always_inline))

/* Scale of each 32-bit lane of a unit: lanes 4i..4i+3 belong to block b0 + i (zero past c blocks). */
VNNI static INLINE __m512 unit_scales(const uint16_t *sr, int64_t b0, int c, int64_t per) {
    __m128 s;
    if (per == 1) {
        s = _mm_cvtph_ps(_mm_maskz_loadu_epi16((__mmask8)((1u << c) - 1), sr + b0));
    } else {
        float f[4] = {0};
        for (int i = 0; i < c; i++) f[i] = _cvtsh_ss(sr[(b0 + i) / per]);
        s = _mm_loadu_ps(f);
    }
    return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                                 _mm512_castps128_ps512(s));
}

/* Dot products of one weight row with t tokens (activations in the int4 layout, rows K apart), before
 * the zero-point correction. A unit's 64 weight bytes give its low nibbles (first halves of its blocks)
 * and high nibbles (second halves): two dpbusd against the two halves of the unit's activations. */
VNNI static INLINE void w4_row_vnni(const uint8_t *qa, int64_t K, const uint8_t *wr, const uint16_t *sr,
                                    int64_t per, const int t, float *dots) {
    int64_t nb = K / 32;
    const __m512i nib = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8);
    __m512 acc[TILE];
    for (int i = 0; i < t; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 4) {
        int c = nb - b < 4 ? (int)(nb - b) : 4;
        __mmask64 mk = c == 4 ? ~(__mmask64)0 : ((__mmask64)1 << (16 * c)) - 1;
        __m512i raw = _mm512_maskz_loadu_epi8(mk, wr + b * 16);
        __m512i lo = _mm512_sub_epi8(_mm512_and_si512(raw, nib), eight);
        __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(raw, 4), nib), eight);
        __m512 sc = unit_scales(sr, b, c, per);
        const uint8_t *a = qa + b * 32;
        for (int i = 0; i < t; i++) {
            __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_maskz_loadu_epi8(mk, a + i * K), lo);
            d = _mm512_dpbusd_epi32(d, _mm512_maskz_loadu_epi8(mk, a + i * K + 16 * c), hi);
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[i]);
        }
    }
    for (int i = 0; i < t; i++) dots[i] = _mm512_reduce_add_ps(acc[i]);
}

VNNI static void w4_rows_vnni(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                              const uint8_t *w, const uint16_t *ws, const float *rowcorr, int64_t group,
                              float *y, int64_t N, int64_t n0, int64_t n1) {
    int64_t groups = K / group, per = group / 32;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (K / 2);
        const uint16_t *sr = ws + n * groups;
        for (int64_t m0 = 0; m0 < M; m0 += TILE) {
            int t = (int)(M - m0 < TILE ? M - m0 : TILE);
            float dots[TILE];
            if (t == TILE) w4_row_vnni(qa + m0 * K, K, wr, sr, per, TILE, dots);
            else for (int i = 0; i < t; i++) w4_row_vnni(qa + (m0 + i) * K, K, wr, sr, per, 1, dots + i);
            for (int i = 0; i < t; i++) {
                int64_t m = m0 + i;
                y[m * N + n] = as[m] * (dots[i] - (float)(128 + azp[m]) * rowcorr[n]);
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

/* ---- AVX2 (u8 x s8 through maddubs: |255 * 8 * 2| * 2 < 32768, so the int16 sums are exact) ------- */

#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static INLINE __m256i nibbles_avx2(__m256i raw, int shift) {
    return _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(raw, shift), _mm256_set1_epi8(15)),
                           _mm256_set1_epi8(8));
}

AVX2 static INLINE __m128i nibbles_sse(__m128i raw, int shift) {
    return _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, shift), _mm_set1_epi8(15)), _mm_set1_epi8(8));
}

/* int32 lanes of sum(alo * lo) + sum(ahi * hi), four bytes per lane */
AVX2 static INLINE __m256i dot2_avx2(__m256i alo, __m256i lo, __m256i ahi, __m256i hi) {
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(alo, lo), _mm256_maddubs_epi16(ahi, hi)),
                             _mm256_set1_epi16(1));
}

AVX2 static INLINE float hsum128(__m128 s) {
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

AVX2 static float w4_row_avx2(const uint8_t *a, int64_t K, const uint8_t *wr, const uint16_t *sr, int64_t per) {
    int64_t nb = K / 32, b = 0;
    __m256 acc = _mm256_setzero_ps();
    for (; b + 4 <= nb; b += 4) { /* a whole unit: blocks (b, b+1) then (b+2, b+3) */
        float f[4];
        for (int i = 0; i < 4; i++) f[i] = _cvtsh_ss(sr[(b + i) / per]);
        for (int pair = 0; pair < 2; pair++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(wr + b * 16 + 32 * pair));
            const uint8_t *ap = a + b * 32 + 32 * pair;
            __m256i d = dot2_avx2(_mm256_loadu_si256((const __m256i *)ap), nibbles_avx2(raw, 0),
                                  _mm256_loadu_si256((const __m256i *)(ap + 64)), nibbles_avx2(raw, 4));
            __m256 sc = _mm256_set_m128(_mm_set1_ps(f[2 * pair + 1]), _mm_set1_ps(f[2 * pair]));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sc, acc);
        }
    }
    __m128 tail = _mm_setzero_ps();
    for (; b < nb; b++) { /* blocks of a last, partial unit */
        __m128i raw = _mm_loadu_si128((const __m128i *)(wr + b * 16));
        __m128i p = _mm_add_epi16(
            _mm_maddubs_epi16(_mm_loadu_si128((const __m128i *)(a + lo_offset(b))), nibbles_sse(raw, 0)),
            _mm_maddubs_epi16(_mm_loadu_si128((const __m128i *)(a + hi_offset(b, nb))), nibbles_sse(raw, 4)));
        __m128i d = _mm_madd_epi16(p, _mm_set1_epi16(1));
        tail = _mm_fmadd_ps(_mm_cvtepi32_ps(d), _mm_set1_ps(_cvtsh_ss(sr[b / per])), tail);
    }
    return hsum128(_mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1))) + hsum128(tail);
}

AVX2 static void w4_rows_avx2(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                              const uint8_t *w, const uint16_t *ws, const float *rowcorr, int64_t group,
                              float *y, int64_t N, int64_t n0, int64_t n1) {
    int64_t groups = K / group, per = group / 32;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            float dot = w4_row_avx2(qa + m * K, K, w + n * (K / 2), ws + n * groups, per);
            y[m * N + n] = as[m] * (dot - (float)(128 + azp[m]) * rowcorr[n]);
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

/* y [M, N] = dequantized(acts [M, K]) @ W.T for int4 W [N, K / 2 bytes] with float16 group scales.
 * Activations come from pq_quantize_rows in the int4 layout. rowcorr[n] = sum_g scale_g * sum(w in g)
 * undoes the +128 offset and the zero point. Threads split the rows; tokens go in chunks whose
 * activations stay in the L2 cache while every row of a thread passes over them. */
void pq_linear_w4(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                  const uint8_t *w, const uint16_t *ws, const float *rowcorr, int64_t group, float *y,
                  int64_t N, int threads) {
    int lv = pq_level();
    int64_t chunk = (256 * 1024 / K) / TILE * TILE;
    if (chunk < TILE) chunk = TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < threads; i++) {
        int64_t n1, n0 = chunk_bounds(N, threads, i, &n1);
        for (int64_t m0 = 0; m0 < M && n0 < n1; m0 += chunk) {
            int64_t mc = M - m0 < chunk ? M - m0 : chunk;
            const uint8_t *a = qa + m0 * K;
            float *out = y + m0 * N;
#ifdef PQ_X86
            if (lv == PQ_AVX512VNNI) { w4_rows_vnni(a, as + m0, azp + m0, mc, K, w, ws, rowcorr, group, out, N, n0, n1); continue; }
            if (lv == PQ_AVX2) { w4_rows_avx2(a, as + m0, azp + m0, mc, K, w, ws, rowcorr, group, out, N, n0, n1); continue; }
#endif
            w4_rows_generic(a, as + m0, azp + m0, mc, K, w, ws, rowcorr, group, out, N, n0, n1);
        }
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

typedef struct {
    int64_t dim, n_heads, n_kv, head_dim, ffn;
    float eps;
    const float *attn_norm, *ffn_norm;
    /* the seven projections in the order q, k, v, o, gate, up, down: int4 (Q4_0 layout), float16 scales,
     * per-row corrections (see pq_linear_w4), group sizes */
    const uint8_t *w[7];
    const uint16_t *s[7];
    const float *c[7];
    int64_t g[7];
    /* online rotations of a rotated (SpinQuant) model: R4 on down_proj's input, R3 on queries and keys
     * (pq_hadamard's m and H_m; had_down_m 0 = none) */
    int64_t had_down_m, had_qk;
    const float *had_down;
} pq_layer;

/* One layer's KV cache, [n_kv, max_t, head_dim] each: float32, or (bits 8) int8 values with a float32
 * scale and zero point per token and head ([n_kv, max_t]): value = (q - zero) * scale. */
typedef struct {
    void *k, *v;
    float *k_scale, *k_zero, *v_scale, *v_zero;
    int64_t max_t, bits;
} pq_cache;

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
            pq_quantize_rows(src + j * D, 1, D, tmp, &scale, &zero, 0);
            int8_t *q = (int8_t *)dst + row * D;
            for (int64_t i = 0; i < D; i++) q[i] = (int8_t)(tmp[i] - 128);
            (kind ? C->v_scale : C->k_scale)[row] = scale;
            (kind ? C->v_zero : C->k_zero)[row] = (float)zero;
        }
    }
}

/* e^x for x <= 0 (softmax after subtracting the max), written so that loops over it vectorize:
 * 2^(x log2 e) = 2^n * 2^f with a degree-6 polynomial for 2^f, f in [-0.5, 0.5] (relative error ~2e-7). */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504f, n = __builtin_roundevenf(t), f = t - n;
    float p = 1.5403530e-4f;
    p = p * f + 1.3333558e-3f;
    p = p * f + 9.6181291e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022650e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
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

__attribute__((target_clones("avx2", "default")))
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

#ifdef PQ_X86
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

static void attend(const float *q, const pq_cache *C, float *att, float *probs, int64_t H, int64_t KV,
                   int64_t D, int64_t pos, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t hd = 0; hd < H; hd++) {
#ifdef PQ_X86
        if (pq_level() == PQ_AVX512VNNI && D % 16 == 0 && D <= 256) {
            attend_head_avx512(q + hd * D, C, hd / (H / KV), att + hd * D, probs + hd * (pos + 1), D, pos);
            continue;
        }
#endif
        attend_head(q + hd * D, C, hd / (H / KV), att + hd * D, probs + hd * (pos + 1), D, pos);
    }
}

/* x [dim] is updated in place; cos/sin [head_dim] for `pos`; scratch holds at least
 * 2 * (n_heads + n_kv) * head_dim + 3 * ffn + dim + n_heads * (pos + 1) floats; qa holds
 * max(dim, n_heads * head_dim, ffn) bytes. */
void pq_decode_layer(const pq_layer *L, const pq_cache *C, float *x, int64_t pos, const float *cos,
                     const float *sin, float *scratch, uint8_t *qa, int threads) {
    enum { Q, K, V, O, GATE, UP, DOWN };
    int64_t D = L->head_dim, H = L->n_heads, KV = L->n_kv, dim = L->dim, F = L->ffn;
    int64_t nq = H * D, nkv = KV * D;
    float *h = scratch, *q = h + (dim > F ? dim : F), *k = q + nq, *v = k + nkv, *att = v + nkv;
    float *g = att + nq, *u = g + F, *probs = u + F;
    float scale;
    int32_t zp;

    rms_norm(x, L->attn_norm, L->eps, dim, h);
    pq_quantize_rows(h, 1, dim, qa, &scale, &zp, 1); /* once for q, k and v */
    pq_linear_w4(qa, &scale, &zp, 1, dim, L->w[Q], L->s[Q], L->c[Q], L->g[Q], q, nq, threads);
    pq_linear_w4(qa, &scale, &zp, 1, dim, L->w[K], L->s[K], L->c[K], L->g[K], k, nkv, threads);
    pq_linear_w4(qa, &scale, &zp, 1, dim, L->w[V], L->s[V], L->c[V], L->g[V], v, nkv, threads);
    rope(q, cos, sin, H, D);
    rope(k, cos, sin, KV, D);
    if (L->had_qk) {
        pq_hadamard(q, H, D, 1, NULL);
        pq_hadamard(k, KV, D, 1, NULL);
    }
    cache_write(C, k, v, KV, D, pos, qa);
    attend(q, C, att, probs, H, KV, D, pos, threads);
    pq_quantize_rows(att, 1, nq, qa, &scale, &zp, 1);
    pq_linear_w4(qa, &scale, &zp, 1, nq, L->w[O], L->s[O], L->c[O], L->g[O], h, dim, threads);
    for (int64_t i = 0; i < dim; i++) x[i] += h[i];

    rms_norm(x, L->ffn_norm, L->eps, dim, h);
    pq_quantize_rows(h, 1, dim, qa, &scale, &zp, 1); /* once for gate and up */
    pq_linear_w4(qa, &scale, &zp, 1, dim, L->w[GATE], L->s[GATE], L->c[GATE], L->g[GATE], g, F, threads);
    pq_linear_w4(qa, &scale, &zp, 1, dim, L->w[UP], L->s[UP], L->c[UP], L->g[UP], u, F, threads);
    for (int64_t i = 0; i < F; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    if (L->had_down_m) pq_hadamard(g, 1, F, L->had_down_m, L->had_down);
    pq_quantize_rows(g, 1, F, qa, &scale, &zp, 1);
    pq_linear_w4(qa, &scale, &zp, 1, F, L->w[DOWN], L->s[DOWN], L->c[DOWN], L->g[DOWN], h, dim, threads);
    for (int64_t i = 0; i < dim; i++) x[i] += h[i];
}

/* One token through all n layers (a decode step), x [dim] in place, layer i on cache i. RoPE's
 * cos / sin for `pos` come from inv_freq [head_dim / 2] as the model computes them (float32). */
void pq_decode_layers(const pq_layer *layers, const pq_cache *caches, int64_t n, float *x, int64_t pos,
                      const float *inv_freq, float *scratch, uint8_t *qa, int threads) {
    int64_t D = layers[0].head_dim;
    float *cos = scratch, *sin = scratch + D;
    for (int64_t i = 0; i < D / 2; i++) {
        float angle = (float)pos * inv_freq[i];
        cos[i] = cos[i + D / 2] = cosf(angle);
        sin[i] = sin[i + D / 2] = sinf(angle);
    }
    for (int64_t i = 0; i < n; i++)
        pq_decode_layer(layers + i, caches + i, x, pos, cos, sin, scratch + 2 * D, qa, threads);
}
