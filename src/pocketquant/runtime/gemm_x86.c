/* x86 micro-kernels over packed panels (layout in kernels.h): AVX2 and AVX-512 VNNI. A token's 4
 * activation bytes are broadcast against 4 inputs of every row of the vector, so each 32-bit lane sums
 * one row; unpacked weights stay in registers for a tile of tokens. Built with -DPQ_EMULATE, the same
 * code runs on any CPU through SIMDe's portable intrinsics (a test checks every path that way). */
#include "kernels.h"

#ifdef PQ_X86

#ifdef PQ_EMULATE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>
#define TARGET(features)
#define HAS(feature) 1
#define HAS_F16C 1
#define HAS_AVXVNNI 1
#ifndef simde_mm512_cvtepi32_ps /* not in every SIMDe release */
static inline __m512 cvtepi32_ps_512(__m512i v) {
    int32_t i[16];
    float f[16];
    _mm512_storeu_si512((void *)i, v);
    for (int k = 0; k < 16; k++) f[k] = (float)i[k];
    return _mm512_loadu_ps(f);
}
#define _mm512_cvtepi32_ps cvtepi32_ps_512
#endif
#else
#include <cpuid.h>
#include <immintrin.h>
#define TARGET(features) __attribute__((target(features)))
#define HAS(feature) (__builtin_cpu_init(), __builtin_cpu_supports(feature))
/* CPUID straight, for features older compilers' __builtin_cpu_supports does not name (clang 14: f16c, avxvnni):
 * bit `bit` of register `reg` (0 eax, 1 ebx, 2 ecx, 3 edx) of leaf `leaf`, subleaf `sub` */
static int cpuid_bit(unsigned leaf, unsigned sub, int reg, int bit) {
    unsigned r[4];
    return __get_cpuid_count(leaf, sub, &r[0], &r[1], &r[2], &r[3]) && (r[reg] >> bit & 1);
}
#define HAS_F16C cpuid_bit(1, 0, 2, 29)
#define HAS_AVXVNNI cpuid_bit(7, 1, 0, 4)
#endif

#define AVX2 TARGET("avx2,fma,f16c")
#define AVXVNNI TARGET("avx2,fma,f16c,avxvnni")
#ifdef PQ_EMULATE /* SIMDe has the AVX-512VL form of the same instruction */
#define _mm256_dpbusd_avx_epi32 _mm256_dpbusd_epi32
#endif
/* compilers that know AVX-VNNI: GCC 11, clang 12 */
#if defined(PQ_EMULATE) || (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define PQ_AVXVNNI 1
#endif
#define AVX512 TARGET("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c,fma")

#define CASES(f, ...)                                                                       \
    switch (n) {                                                                            \
        case 8: f(a, lda, 8, __VA_ARGS__); break;                                           \
        case 7: f(a, lda, 7, __VA_ARGS__); break;                                           \
        case 6: f(a, lda, 6, __VA_ARGS__); break;                                           \
        case 5: f(a, lda, 5, __VA_ARGS__); break;                                           \
        case 4: f(a, lda, 4, __VA_ARGS__); break;                                           \
        case 3: f(a, lda, 3, __VA_ARGS__); break;                                           \
        case 2: f(a, lda, 2, __VA_ARGS__); break;                                           \
        default: f(a, lda, 1, __VA_ARGS__);                                                 \
    }

/* ---- AVX2: u8 x s8 through maddubs (int16 pair sums) and madd (to int32) -------------------------- */

AVX2 static INLINE __m256i bcast4(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Steps 0..7 of rows 8h..8h+7 of a panel's 32-block (256 bytes from blk), as signed bytes in [-8, 7]. */
AVX2 static INLINE void unpack_w4_avx2(const uint8_t *blk, int h, __m256i wv[8]) {
    const __m256i nib = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8);
    for (int c = 0; c < 4; c++) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)(blk + 32 * h + 64 * c));
        wv[c] = _mm256_sub_epi8(_mm256_and_si256(raw, nib), eight);
        wv[c + 4] = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(raw, 4), nib), eight);
    }
}

/* Rows 8h..8h+7 of a panel against n tokens. A block's 8 maddubs per token add up in int16 without
 * overflow: each is a pair of u8 x [-8, 7] products, at most 2 * 255 * 8 = 4080 in size, and 8 * 4080 < 32768.
 * The block's 8 unpacked weight vectors serve every token (from registers or L1). */
AVX2 static INLINE void w4_half_avx2(const uint8_t *a, int64_t lda, const int n, int64_t K, const uint8_t *w,
                                     const uint16_t *s, int64_t per, int h, float acc[][PANEL]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 f[MAX_TILE], sc = _mm256_setzero_ps();
    for (int i = 0; i < n; i++) f[i] = _mm256_setzero_ps();
    for (int64_t b = 0, left = 0; b < K / 32; b++, left--) {
        if (!left) { /* a new group */
            sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 8 * h)));
            s += PANEL, left = per;
        }
        __m256i wv[8];
        unpack_w4_avx2(w + b * 256, h, wv);
        for (int i = 0; i < n; i++) {
            const uint8_t *ai = a + i * lda + 32 * b;
            __m256i p[8]; /* the 8 steps' pair sums, added as a tree */
            for (int j = 0; j < 8; j++) p[j] = _mm256_maddubs_epi16(bcast4(ai + 4 * j), wv[j]);
            __m256i d = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3])),
                                         _mm256_add_epi16(_mm256_add_epi16(p[4], p[5]), _mm256_add_epi16(p[6], p[7])));
            f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(d, ones)), sc, f[i]);
        }
    }
    for (int i = 0; i < n; i++) _mm256_storeu_ps(acc[i] + 8 * h, f[i]);
}

/* Both halves of a panel in one pass for one or two tokens (decode): weights stream through once, in order. */
AVX2 static INLINE void w4_panel_avx2(const uint8_t *a, int64_t lda, const int n, int64_t K, const uint8_t *w,
                                      const uint16_t *s, int64_t per, float acc[][PANEL]) {
    const __m256i nib = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
    __m256 f[2][2], sc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int i = 0; i < n; i++) f[i][0] = f[i][1] = _mm256_setzero_ps();
    for (int64_t b = 0, left = 0; b < K / 32; b++, left--) {
        if (!left) { /* a new group */
            sc[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s));
            sc[1] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 8)));
            s += PANEL, left = per;
        }
        __m256i d[2][2];
        for (int i = 0; i < n; i++) d[i][0] = d[i][1] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++)
            for (int h = 0; h < 2; h++) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(w + b * 256 + 64 * c + 32 * h));
                __m256i lo = _mm256_sub_epi8(_mm256_and_si256(raw, nib), eight);
                __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(raw, 4), nib), eight);
                for (int i = 0; i < n; i++) {
                    const uint8_t *ai = a + i * lda + 32 * b + 4 * c;
                    d[i][h] = _mm256_add_epi16(d[i][h], _mm256_add_epi16(_mm256_maddubs_epi16(bcast4(ai), lo),
                                                                         _mm256_maddubs_epi16(bcast4(ai + 16), hi)));
                }
            }
        for (int i = 0; i < n; i++)
            for (int h = 0; h < 2; h++)
                f[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(d[i][h], ones)), sc[h], f[i][h]);
    }
    for (int i = 0; i < n; i++) {
        _mm256_storeu_ps(acc[i], f[i][0]);
        _mm256_storeu_ps(acc[i] + 8, f[i][1]);
    }
}

AVX2 static void w4_avx2(const uint8_t *a, int64_t lda, int n, int64_t K, const uint8_t *w, const uint16_t *s,
                         int64_t per, float acc[][PANEL]) {
    if (n == 1) return w4_panel_avx2(a, lda, 1, K, w, s, per, acc);
    if (n == 2) return w4_panel_avx2(a, lda, 2, K, w, s, per, acc);
    for (int h = 0; h < 2; h++) CASES(w4_half_avx2, K, w, s, per, h, acc)
}

/* int8 weights split as w = 16 * hi + lo, hi = w >> 4 in [-8, 7] and lo = w & 15 in [0, 15], so maddubs
 * cannot saturate: 4 steps of lo pairs (4 * 2 * 255 * 15 = 30600) and of hi pairs fit in int16. */
AVX2 static INLINE void w8_rows_avx2(const uint8_t *a, int64_t lda, const int n, int64_t K, const int8_t *w,
                                     const int h0, const int nh, int32_t acc[][PANEL]) {
    const __m256i nib = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8);
    const __m256i ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
    __m256i d[3][2];
    for (int i = 0; i < n; i++) d[i][0] = d[i][1] = _mm256_setzero_si256();
    for (int64_t j0 = 0; j0 < K / 4; j0 += 4) {
        __m256i lo16[3][2], hi16[3][2];
        for (int i = 0; i < n; i++) lo16[i][0] = lo16[i][1] = hi16[i][0] = hi16[i][1] = _mm256_setzero_si256();
        for (int64_t j = j0; j < j0 + 4 && j < K / 4; j++) /* K a multiple of 4, not always of 16 */
            for (int h = 0; h < nh; h++) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(w + 64 * j + 32 * (h0 + h)));
                __m256i lo = _mm256_and_si256(raw, nib);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib); /* sign-extended below */
                hi = _mm256_sub_epi8(_mm256_xor_si256(hi, eight), eight);
                for (int i = 0; i < n; i++) {
                    __m256i av = bcast4(a + i * lda + 4 * j);
                    lo16[i][h] = _mm256_add_epi16(lo16[i][h], _mm256_maddubs_epi16(av, lo));
                    hi16[i][h] = _mm256_add_epi16(hi16[i][h], _mm256_maddubs_epi16(av, hi));
                }
            }
        for (int i = 0; i < n; i++)
            for (int h = 0; h < nh; h++)
                d[i][h] = _mm256_add_epi32(d[i][h], _mm256_add_epi32(_mm256_madd_epi16(lo16[i][h], ones),
                                                                     _mm256_madd_epi16(hi16[i][h], sixteen)));
    }
    for (int i = 0; i < n; i++)
        for (int h = 0; h < nh; h++) _mm256_storeu_si256((__m256i *)(acc[i] + 8 * (h0 + h)), d[i][h]);
}

/* One token: both halves of the panel in one pass (decode); more: 8 rows at a time. */
AVX2 static void w8_avx2(const uint8_t *a, int64_t lda, int n, int64_t K, const int8_t *w, int32_t acc[][PANEL]) {
    if (n == 1) return w8_rows_avx2(a, lda, 1, K, w, 0, 2, acc);
    for (int h = 0; h < 2; h++) {
        if (n == 3) w8_rows_avx2(a, lda, 3, K, w, h, 1, acc);
        else w8_rows_avx2(a, lda, 2, K, w, h, 1, acc);
    }
}

static int has_avx2(void) { return HAS("avx2") && HAS("fma") && HAS_F16C; }

const pq_kernels pq_avx2_kernels = {"avx2", has_avx2, 6, 3, w4_avx2, w8_avx2, 0};

/* ---- AVX-VNNI (Intel client chips): the AVX2 layout with vpdpbusd on 256 bits ------------------------ */

#ifdef PQ_AVXVNNI

AVXVNNI static INLINE void w4_half_vnni256(const uint8_t *a, int64_t lda, const int n, int64_t K, const uint8_t *w,
                                           const uint16_t *s, int64_t per, int h, float acc[][PANEL]) {
    __m256 f[MAX_TILE], sc = _mm256_setzero_ps();
    for (int i = 0; i < n; i++) f[i] = _mm256_setzero_ps();
    for (int64_t b = 0, left = 0; b < K / 32; b++, left--) {
        if (!left) { /* a new group */
            sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 8 * h)));
            s += PANEL, left = per;
        }
        __m256i wv[8];
        unpack_w4_avx2(w + b * 256, h, wv);
        for (int i = 0; i < n; i++) {
            const uint8_t *ai = a + i * lda + 32 * b;
            __m256i d = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++) d = _mm256_dpbusd_avx_epi32(d, bcast4(ai + 4 * j), wv[j]);
            f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sc, f[i]);
        }
    }
    for (int i = 0; i < n; i++) _mm256_storeu_ps(acc[i] + 8 * h, f[i]);
}

/* One or two tokens are bound by memory, not arithmetic: the AVX2 kernels serve them. */
AVXVNNI static void w4_vnni256(const uint8_t *a, int64_t lda, int n, int64_t K, const uint8_t *w, const uint16_t *s,
                               int64_t per, float acc[][PANEL]) {
    if (n <= 2) return w4_avx2(a, lda, n, K, w, s, per, acc);
    for (int h = 0; h < 2; h++) CASES(w4_half_vnni256, K, w, s, per, h, acc)
}

AVXVNNI static INLINE void w8_half_vnni256(const uint8_t *a, int64_t lda, const int n, int64_t K, const int8_t *w,
                                           int h, int32_t acc[][PANEL]) {
    __m256i d[MAX_TILE];
    for (int i = 0; i < n; i++) d[i] = _mm256_setzero_si256();
    for (int64_t j = 0; j < K / 4; j++) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 64 * j + 32 * h));
        for (int i = 0; i < n; i++) d[i] = _mm256_dpbusd_avx_epi32(d[i], bcast4(a + i * lda + 4 * j), wv);
    }
    for (int i = 0; i < n; i++) _mm256_storeu_si256((__m256i *)(acc[i] + 8 * h), d[i]);
}

AVXVNNI static void w8_vnni256(const uint8_t *a, int64_t lda, int n, int64_t K, const int8_t *w, int32_t acc[][PANEL]) {
    if (n == 1) return w8_avx2(a, lda, n, K, w, acc);
    for (int h = 0; h < 2; h++) CASES(w8_half_vnni256, K, w, h, acc)
}

static int has_avxvnni(void) { return has_avx2() && HAS_AVXVNNI; }

const pq_kernels pq_avxvnni_kernels = {"avxvnni", has_avxvnni, 6, 6, w4_vnni256, w8_vnni256, 0};

#else /* a compiler without AVX-VNNI */

static int no_avxvnni(void) { return 0; }
const pq_kernels pq_avxvnni_kernels = {"avxvnni", no_avxvnni, 1, 1, 0, 0, 0};

#endif

/* ---- AVX-512 VNNI: vpdpbusd sums four u8 x s8 products into each int32 lane ------------------------ */

AVX512 static INLINE __m512i bcast4_512(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

AVX512 static INLINE __m512 scales16(const uint16_t *s) {
    __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s));
    __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + 8)));
    return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

AVX512 static INLINE void w4_tile_512(const uint8_t *a, int64_t lda, const int n, int64_t K, const uint8_t *w,
                                      const uint16_t *s, int64_t per, float acc[][PANEL]) {
    const __m512i nib = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8);
    __m512 f[MAX_TILE], sc = _mm512_setzero_ps();
    for (int i = 0; i < n; i++) f[i] = _mm512_setzero_ps();
    for (int64_t b = 0, left = 0; b < K / 32; b++, left--) {
        if (!left) { /* a new group */
            sc = scales16(s);
            s += PANEL, left = per;
        }
        __m512i d[MAX_TILE];
        for (int i = 0; i < n; i++) d[i] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            __m512i raw = _mm512_loadu_si512((const void *)(w + b * 256 + 64 * c));
            __m512i lo = _mm512_sub_epi8(_mm512_and_si512(raw, nib), eight);
            __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(raw, 4), nib), eight);
            for (int i = 0; i < n; i++) {
                const uint8_t *ai = a + i * lda + 32 * b + 4 * c;
                d[i] = _mm512_dpbusd_epi32(d[i], bcast4_512(ai), lo);
                d[i] = _mm512_dpbusd_epi32(d[i], bcast4_512(ai + 16), hi);
            }
        }
        for (int i = 0; i < n; i++) f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i]), sc, f[i]);
    }
    for (int i = 0; i < n; i++) _mm512_storeu_ps(acc[i], f[i]);
}

AVX512 static INLINE void w8_tile_512(const uint8_t *a, int64_t lda, const int n, int64_t K, const int8_t *w,
                                      int32_t acc[][PANEL]) {
    __m512i d[MAX_TILE];
    for (int i = 0; i < n; i++) d[i] = _mm512_setzero_si512();
    for (int64_t j = 0; j < K / 4; j++) {
        __m512i wv = _mm512_loadu_si512((const void *)(w + 64 * j));
        for (int i = 0; i < n; i++) d[i] = _mm512_dpbusd_epi32(d[i], bcast4_512(a + i * lda + 4 * j), wv);
    }
    for (int i = 0; i < n; i++) _mm512_storeu_si512((void *)acc[i], d[i]);
}

AVX512 static void w4_avx512(const uint8_t *a, int64_t lda, int n, int64_t K, const uint8_t *w, const uint16_t *s,
                             int64_t per, float acc[][PANEL]) {
    CASES(w4_tile_512, K, w, s, per, acc)
}

AVX512 static void w8_avx512(const uint8_t *a, int64_t lda, int n, int64_t K, const int8_t *w, int32_t acc[][PANEL]) {
    CASES(w8_tile_512, K, w, acc)
}

static int has_avx512(void) {
    return HAS("avx512f") && HAS("avx512bw") && HAS("avx512vl") && HAS("avx512vnni") && HAS("avx512dq") &&
           HAS("fma") && HAS_F16C;
}

const pq_kernels pq_avx512_kernels = {"avx512", has_avx512, 8, 8, w4_avx512, w8_avx512, 1};

#else /* not x86: these paths are never supported */

static int never(void) { return 0; }
const pq_kernels pq_avx2_kernels = {"avx2", never, 1, 1, 0, 0, 0};
const pq_kernels pq_avxvnni_kernels = {"avxvnni", never, 1, 1, 0, 0, 0};
const pq_kernels pq_avx512_kernels = {"avx512", never, 1, 1, 0, 0, 0};

#endif
