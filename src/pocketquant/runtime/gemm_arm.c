/* Arm (AArch64) micro-kernels over packed panels (layout in kernels.h), three ways, chosen at run time from the
 * CPU's features (getauxval on Linux, sysctl on macOS):
 *   i8mm     usmmla (ARMv8.6's matrix multiply): two tokens by two rows by 8 inputs per instruction;
 *   dotprod  udot (ARMv8.2's dot product), by lane: a token's 4 activation bytes (one lane of a register
 *            holding 16) against 4 inputs of 4 rows, each 32-bit lane summing one row, as on x86;
 *   neon     the same with widening multiplies and pairwise adds (any AArch64 CPU).
 * All compute the integers of kernels.h exactly and then the same float operations, so every path gives the
 * same bits. */
#include "kernels.h"

#if defined(__aarch64__) && !defined(PQ_EMULATE)
#include <arm_neon.h>

#define ARM_TILE 4 /* tokens per micro-kernel call: 16 accumulators, 8 unpacked weight vectors */

/* ---- neon: u8 x u8 products widened to 16 bits, summed pairwise into each row's lane ---------------- */

static INLINE uint32x4_t dot_neon(uint32x4_t acc, uint8x16_t w, uint8x16_t a) {
    uint16x8_t rows01 = vmull_u8(vget_low_u8(w), vget_low_u8(a)), rows23 = vmull_high_u8(w, a);
    return vaddq_u32(acc, vpaddq_u32(vpaddlq_u16(rows01), vpaddlq_u16(rows23)));
}

#define DOT(acc, w, a, c) dot_neon(acc, w, vreinterpretq_u8_u32(vdupq_laneq_u32(vreinterpretq_u32_u8(a), c)))
#define W4 w4_neon
#define W8 w8_neon
#define W4_TILE w4_tile_neon
#define W8_TILE w8_tile_neon
#include "gemm_arm_tiles.h"
#undef DOT
#undef W4
#undef W8
#undef W4_TILE
#undef W8_TILE

static int always(void) { return 1; }

const pq_kernels pq_neon_kernels = {"neon", always, ARM_TILE, ARM_TILE, w4_neon, w8_neon, 1};

/* Compilers that declare the dot product (matrix multiply) intrinsics only for builds that target the extension
 * throughout, not for functions that do: clang before 17 (Apple's arm64 targets enable dotprod, not i8mm);
 * GCC knows them from 8 (10). Such builds leave those paths out. */
#if defined(__clang__) && __clang_major__ < 17 && !defined(__ARM_FEATURE_DOTPROD)
#define PQ_NO_DOTPROD 1
#elif !defined(__clang__) && __GNUC__ < 8
#define PQ_NO_DOTPROD 1
#endif
#if defined(PQ_NO_DOTPROD) || (defined(__clang__) && __clang_major__ < 17 && !defined(__ARM_FEATURE_MATMUL_INT8))
#define PQ_NO_I8MM 1
#elif !defined(__clang__) && __GNUC__ < 10
#define PQ_NO_I8MM 1
#endif

#ifndef PQ_NO_DOTPROD

/* ---- what this CPU has ------------------------------------------------------------------------------- */

#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1 << 13)
#endif
static int has_dotprod(void) { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }
#ifndef PQ_NO_I8MM
static int has_i8mm(void) { return has_dotprod() && (getauxval(AT_HWCAP2) & HWCAP2_I8MM) != 0; }
#endif
#elif defined(__APPLE__)
#include <sys/sysctl.h>
static int feature(const char *name) {
    int on = 0;
    size_t size = sizeof on;
    return sysctlbyname(name, &on, &size, NULL, 0) == 0 && on;
}
static int has_dotprod(void) { return feature("hw.optional.arm.FEAT_DotProd"); }
#ifndef PQ_NO_I8MM
static int has_i8mm(void) { return has_dotprod() && feature("hw.optional.arm.FEAT_I8MM"); }
#endif
#else
static int has_dotprod(void) { return 0; }
#ifndef PQ_NO_I8MM
static int has_i8mm(void) { return 0; }
#endif
#endif

/* ---- dotprod: udot ------------------------------------------------------------------------------- */

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("dotprod"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#endif

#define DOT(acc, w, a, c) vdotq_laneq_u32(acc, w, a, c)
#define W4 w4_dotprod
#define W8 w8_dotprod
#define W4_TILE w4_tile_dotprod
#define W8_TILE w8_tile_dotprod
#include "gemm_arm_tiles.h"
#undef DOT
#undef W4
#undef W8
#undef W4_TILE
#undef W8_TILE

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

const pq_kernels pq_dotprod_kernels = {"dotprod", has_dotprod, ARM_TILE, ARM_TILE, w4_dotprod, w8_dotprod, 1};

#ifndef PQ_NO_I8MM
/* ---- i8mm: usmmla, a 2 x 8 (two tokens) by 8 x 2 (two rows) product of unsigned by signed bytes -------
 * Two consecutive 4-input steps of the panel layout, interleaved 4 bytes at a time (zip), hold 8 consecutive
 * inputs of two rows: the 8 x 2 operand. Each instruction does 32 products, twice udot's, and the products
 * are u8 x s8 as on x86, so the integers need no correction. */

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("i8mm,dotprod"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod+i8mm")
#endif

/* Two tokens' (a0, a1; equal for an odd last token) 8 bytes from offset `at` */
static INLINE uint8x16_t token_pair(const uint8_t *a0, const uint8_t *a1, int64_t at) {
    return vcombine_u8(vld1_u8(a0 + at), vld1_u8(a1 + at));
}

/* The rows 4k..4k+3 of steps j and j + 1 (vectors x and y: 4 rows x 4 inputs each) as two 8 x 2 operands */
static INLINE void row_pairs(int8x16_t x, int8x16_t y, int8x16_t out[2]) {
    int32x4_t xi = vreinterpretq_s32_s8(x), yi = vreinterpretq_s32_s8(y);
    out[0] = vreinterpretq_s8_s32(vzip1q_s32(xi, yi)); /* rows 4k, 4k+1 */
    out[1] = vreinterpretq_s8_s32(vzip2q_s32(xi, yi)); /* rows 4k+2, 4k+3 */
}

/* Tokens pair p of a tile (the last token twice when n is odd) */
#define PAIR(p) a + (2 * (p)) * lda, a + (2 * (p) + 1 < n ? 2 * (p) + 1 : 2 * (p)) * lda

static INLINE void w4_tile_i8mm(const uint8_t *a, int64_t lda, const int n, int64_t K, const uint8_t *w,
                                const uint16_t *s, int64_t per, float acc[][PANEL]) {
    const uint8x16_t nib = vdupq_n_u8(15);
    const int8x16_t eight = vdupq_n_s8(8);
    const int pairs = (n + 1) / 2;
    for (int i = 0; i < n; i++)
        for (int k = 0; k < 4; k++) vst1q_f32(acc[i] + 4 * k, vdupq_n_f32(0.0f));
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *blk = w + b * 256;
        const uint16_t *sb = s + (b / per) * PANEL;
        uint8x16_t x[2][2][2]; /* [token pair][chunk pair q][low or high nibbles]: inputs 16h + 8q .. +8 */
        for (int p = 0; p < pairs; p++)
            for (int q = 0; q < 2; q++)
                for (int h = 0; h < 2; h++) x[p][q][h] = token_pair(PAIR(p), 32 * b + 16 * h + 8 * q);
        for (int k = 0; k < 4; k++) {
            int32x4_t d[2][2]; /* [token pair][row pair]: lanes (t, r), (t, r + 1), (t + 1, r), (t + 1, r + 1) */
            for (int p = 0; p < pairs; p++) d[p][0] = d[p][1] = vdupq_n_s32(0);
            for (int q = 0; q < 2; q++) {
                uint8x16_t r0 = vld1q_u8(blk + 64 * (2 * q) + 16 * k), r1 = vld1q_u8(blk + 64 * (2 * q + 1) + 16 * k);
                int8x16_t lo[2], hi[2];
                row_pairs(vsubq_s8(vreinterpretq_s8_u8(vandq_u8(r0, nib)), eight),
                          vsubq_s8(vreinterpretq_s8_u8(vandq_u8(r1, nib)), eight), lo);
                row_pairs(vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(r0, 4)), eight),
                          vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(r1, 4)), eight), hi);
                for (int p = 0; p < pairs; p++)
                    for (int rp = 0; rp < 2; rp++) {
                        d[p][rp] = vusmmlaq_s32(d[p][rp], x[p][q][0], lo[rp]);
                        d[p][rp] = vusmmlaq_s32(d[p][rp], x[p][q][1], hi[rp]);
                    }
            }
            float32x4_t scale = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sb + 4 * k)));
            for (int p = 0; p < pairs; p++) { /* regrouped by token: rows 4k..4k+3 of tokens 2p and 2p + 1 */
                int64x2_t r01 = vreinterpretq_s64_s32(d[p][0]), r23 = vreinterpretq_s64_s32(d[p][1]);
                int32x4_t t[2] = {vreinterpretq_s32_s64(vzip1q_s64(r01, r23)),
                                  vreinterpretq_s32_s64(vzip2q_s64(r01, r23))};
                for (int u = 0; u < 2 && 2 * p + u < n; u++) {
                    float *out = acc[2 * p + u] + 4 * k;
                    vst1q_f32(out, vfmaq_f32(vld1q_f32(out), vcvtq_f32_s32(t[u]), scale));
                }
            }
        }
    }
}

static INLINE void w8_tile_i8mm(const uint8_t *a, int64_t lda, const int n, int64_t K, const int8_t *w,
                                int32_t acc[][PANEL]) {
    const int pairs = (n + 1) / 2;
    int32x4_t d[2][8]; /* [token pair][row pair] */
    for (int p = 0; p < pairs; p++)
        for (int rp = 0; rp < 8; rp++) d[p][rp] = vdupq_n_s32(0);
    for (int64_t j = 0; j < K / 4; j += 2) { /* steps j and j + 1: inputs 4j .. 4j + 7 */
        uint8x16_t x[2];
        for (int p = 0; p < pairs; p++) x[p] = token_pair(PAIR(p), 4 * j);
        for (int k = 0; k < 4; k++) {
            int8x16_t rows[2];
            row_pairs(vld1q_s8(w + 64 * j + 16 * k), vld1q_s8(w + 64 * (j + 1) + 16 * k), rows);
            for (int p = 0; p < pairs; p++)
                for (int h = 0; h < 2; h++) d[p][2 * k + h] = vusmmlaq_s32(d[p][2 * k + h], x[p], rows[h]);
        }
    }
    for (int p = 0; p < pairs; p++)
        for (int rp = 0; rp < 8; rp++) {
            vst1_s32(acc[2 * p] + 2 * rp, vget_low_s32(d[p][rp]));
            if (2 * p + 1 < n) vst1_s32(acc[2 * p + 1] + 2 * rp, vget_high_s32(d[p][rp]));
        }
}
#undef PAIR

/* One token (a decode step) takes udot's kernel: a pair would waste half of every usmmla */
static void w4_i8mm(const uint8_t *a, int64_t lda, int n, int64_t K, const uint8_t *w, const uint16_t *s,
                    int64_t per, float acc[][PANEL]) {
    switch (n) {
        case 4: w4_tile_i8mm(a, lda, 4, K, w, s, per, acc); break;
        case 3: w4_tile_i8mm(a, lda, 3, K, w, s, per, acc); break;
        case 2: w4_tile_i8mm(a, lda, 2, K, w, s, per, acc); break;
        default: w4_dotprod(a, lda, n, K, w, s, per, acc);
    }
}

static void w8_i8mm(const uint8_t *a, int64_t lda, int n, int64_t K, const int8_t *w, int32_t acc[][PANEL]) {
    if (n == 1 || K % 8) { /* one token, or an odd number of 4-input steps */
        w8_dotprod(a, lda, n, K, w, acc);
        return;
    }
    switch (n) {
        case 4: w8_tile_i8mm(a, lda, 4, K, w, acc); break;
        case 3: w8_tile_i8mm(a, lda, 3, K, w, acc); break;
        default: w8_tile_i8mm(a, lda, 2, K, w, acc);
    }
}

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

const pq_kernels pq_i8mm_kernels = {"i8mm", has_i8mm, ARM_TILE, ARM_TILE, w4_i8mm, w8_i8mm, 1};
#endif
#endif

#if defined(PQ_NO_DOTPROD) || defined(PQ_NO_I8MM) /* the paths this compiler cannot build: never chosen */
static int never(void) { return 0; }
#endif
#ifdef PQ_NO_DOTPROD
const pq_kernels pq_dotprod_kernels = {"dotprod", never, 1, 1, 0, 0, 0};
#endif
#ifdef PQ_NO_I8MM
const pq_kernels pq_i8mm_kernels = {"i8mm", never, 1, 1, 0, 0, 0};
#endif

#endif
