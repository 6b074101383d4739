/* Shared by the kernel sources: the packed weight layout, the micro-kernel table and small helpers.
 *
 * Activations: int8 per token, asymmetric, stored as u8 = q + 128 so that u8 x s8 dot products apply;
 * sum((q - zp) * w) = sum(u8 * w) - (128 + zp) * sum(w).
 *
 * Weights are repacked at load into panels of PANEL = 16 rows, so that one vector holds 16 (AVX-512) or
 * 8 (AVX2) rows' weights for 4 consecutive inputs and a token's 4 activation bytes are broadcast against
 * it: every row's dot product grows in its own 32-bit lane, and unpacked weights stay in registers for a
 * tile of tokens.
 *   step j of a panel: 64 bytes, byte 4r + i = weight (row r, input 4j + i).
 *   int4: a 32-input block of a panel is 4 chunks of 64 bytes; chunk c holds step c in its low nibbles
 *         and step c + 4 in its high nibbles, each stored as w + 8. Scales: float16 [panels][groups][16].
 *   int8: steps in order, one byte per weight. Scales: float32 per row.
 * Rows past N (the last panel) hold zero weights and zero scales. */
#ifndef PQ_KERNELS_H
#define PQ_KERNELS_H

#include <stdint.h>
#include <string.h>

#define PANEL 16
#define MAX_TILE 8 /* most tokens one micro-kernel call takes */

/* Dot products of one panel with n <= tile tokens (rows lda bytes apart, K inputs each).
 * int4: acc[i][r] = sum over 32-blocks b, in order, of fma((float)dot_b(i, r), scale_b(r), acc);
 * every path performs exactly these float operations, so all paths give identical bits.
 * int8: acc[i][r] = the integer dot product sum(u8 * w). */
typedef void (*pq_w4_tile)(const uint8_t *a, int64_t lda, int n, int64_t K, const uint8_t *w,
                           const uint16_t *s, int64_t per, float acc[][PANEL]);
typedef void (*pq_w8_tile)(const uint8_t *a, int64_t lda, int n, int64_t K, const int8_t *w,
                           int32_t acc[][PANEL]);

typedef struct {
    const char *name;   /* what POCKETQUANT_KERNELS names */
    int (*supported)(void);
    int tile4, tile8;   /* most tokens per call of w4, w8 (at most MAX_TILE) */
    pq_w4_tile w4;
    pq_w8_tile w8;
    int vector_attention; /* the decode attention may use AVX-512 (x86) or NEON (Arm) code */
} pq_kernels;

extern const pq_kernels pq_portable_kernels, pq_avx2_kernels, pq_avxvnni_kernels, pq_avx512_kernels,
    pq_i8mm_kernels, pq_dotprod_kernels, pq_neon_kernels;
const pq_kernels *pq_current(void);
void pq_quantize_rows(const float *x, int64_t M, int64_t K, uint8_t *qa, float *scale, int32_t *zp, int threads);
void pq_linear_w4(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                  const uint8_t *w, const uint16_t *ws, const float *rowcorr, int64_t group, float *y,
                  int64_t N, int threads);
void pq_linear_w8(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K, const int8_t *w,
                  const float *ws, const int32_t *wsum, float *y, int64_t N, int threads);
int pq_prefill_attention(const float *q, int64_t sq_t, int64_t sq_h, const float *k, int64_t sk_h, int64_t sk_t,
                         const float *v, int64_t sv_h, int64_t sv_t, float *out, int64_t T, int64_t start, int64_t H,
                         int64_t KV, int64_t D, int threads);
int pq_path_count(void);
const char *pq_path_name(int i);
int pq_select(int i);
void pq_linear_w4_share(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                        const uint8_t *w, const uint16_t *ws, const float *rowcorr, int64_t group, float *y,
                        int64_t N, int t, int threads);

/* A decoder layer's weights and settings for the native decode step (mirrored by kernels.LayerParams) */
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

int64_t pq_decode_scratch(const pq_layer *L, int64_t B, int64_t max_t);
void pq_decode_layers(const pq_layer *layers, const pq_cache *const *caches, int64_t n, int64_t B, float *x,
                      const int64_t *pos, int64_t max_t, const float *inv_freq, float *scratch, int threads);

#if defined(__x86_64__) || defined(_M_X64)
#define PQ_X86 1
#endif
#define INLINE inline __attribute__((always_inline))

static inline float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: mant * 2^-24, exact in float32 */
            float f = (float)mant * (1.0f / 16777216.0f);
            return sign ? -f : f;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Round half to even, as the default rounding mode does: the compiler's builtin where it has one (it becomes one
 * instruction in vectorized loops), else nearbyintf (clang before 15). */
#if defined(__has_builtin)
#if __has_builtin(__builtin_roundevenf)
#define PQ_ROUNDEVEN __builtin_roundevenf
#endif
#endif
#ifndef PQ_ROUNDEVEN
#include <math.h>
#define PQ_ROUNDEVEN nearbyintf
#endif

/* Loops that auto-vectorize get an AVX2 + FMA clone on x86 (fmaf becomes vfmadd), some an AVX-512 or plain
 * AVX2 one; elsewhere (Arm: NEON is the baseline) plain C. */
#if defined(PQ_X86) && !defined(PQ_EMULATE)
#define PQ_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define PQ_CLONES_AVX2 __attribute__((target_clones("avx2", "default")))
#define PQ_CLONES_AVX512 __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PQ_CLONES
#define PQ_CLONES_AVX2
#define PQ_CLONES_AVX512
#endif

/* e^x for x <= 0 (softmax after subtracting the max), written so that loops over it vectorize:
 * 2^(x log2 e) = 2^n * 2^f with a degree-6 polynomial for 2^f, f in [-0.5, 0.5] (relative error ~2e-7). */
static const float PQ_EXP2_POLY[7] = {1.5403530e-4f, 1.3333558e-3f, 9.6181291e-3f, 5.5504109e-2f, 2.4022650e-1f,
                                      6.9314718e-1f, 1.0f}; /* 2^f, highest power first (vector versions too) */

static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504f, n = PQ_ROUNDEVEN(t), f = t - n;
    float p = PQ_EXP2_POLY[0];
    for (int i = 1; i < 7; i++) p = p * f + PQ_EXP2_POLY[i];
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

#endif
