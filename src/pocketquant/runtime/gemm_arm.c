/* Arm (AArch64) micro-kernels over packed panels (layout in kernels.h). A token's 4 activation bytes are
 * broadcast against 4 inputs of 4 rows, so each 32-bit lane sums one row, as on x86. Two ways to take the
 * dot products: `dotprod` (udot, ARMv8.2's dot product extension: 16 products per instruction) and `neon`
 * (widening multiplies and pairwise adds, any AArch64 CPU). Both compute the integers of kernels.h exactly
 * and then the same float operations, so every path gives the same bits. The path is chosen at run time
 * from the CPU's features (getauxval on Linux, sysctl on macOS). */
#include "kernels.h"

#if defined(__aarch64__) && !defined(PQ_EMULATE)
#include <arm_neon.h>

#define ARM_TILE 4 /* tokens per micro-kernel call: 16 accumulators, 8 unpacked weight vectors */

static INLINE uint8x16_t bcast4(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return vreinterpretq_u8_u32(vdupq_n_u32(v));
}

static INLINE uint32_t byte_sum(const uint8_t *p, int64_t n) {
    uint32_t sum = 0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) sum += vaddlvq_u8(vld1q_u8(p + i));
    for (; i < n; i++) sum += p[i];
    return sum;
}

/* ---- neon: u8 x u8 products widened to 16 bits, summed pairwise into each row's lane ---------------- */

static INLINE uint32x4_t dot_neon(uint32x4_t acc, uint8x16_t w, uint8x16_t a) {
    uint16x8_t rows01 = vmull_u8(vget_low_u8(w), vget_low_u8(a)), rows23 = vmull_high_u8(w, a);
    return vaddq_u32(acc, vpaddq_u32(vpaddlq_u16(rows01), vpaddlq_u16(rows23)));
}

#define DOT dot_neon
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

const pq_kernels pq_neon_kernels = {"neon", always, ARM_TILE, ARM_TILE, w4_neon, w8_neon, 0};

/* ---- dotprod: udot ------------------------------------------------------------------------------- */

/* clang before 17 declares the dot product intrinsics only in builds that target the extension throughout
 * (Apple's arm64 targets do); elsewhere it builds the neon path alone */
#if defined(__clang__) && __clang_major__ < 17 && !defined(__ARM_FEATURE_DOTPROD)
#define PQ_NO_DOTPROD 1
#endif

#ifndef PQ_NO_DOTPROD

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("dotprod"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#endif

static INLINE uint32x4_t dot_udot(uint32x4_t acc, uint8x16_t w, uint8x16_t a) { return vdotq_u32(acc, w, a); }

#define DOT dot_udot
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

#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
static int has_dotprod(void) { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }
#elif defined(__APPLE__)
#include <sys/sysctl.h>
static int has_dotprod(void) {
    int on = 0;
    size_t size = sizeof on;
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &on, &size, NULL, 0) == 0 && on;
}
#else
static int has_dotprod(void) { return 0; }
#endif

const pq_kernels pq_dotprod_kernels = {"dotprod", has_dotprod, ARM_TILE, ARM_TILE, w4_dotprod, w8_dotprod, 0};
#else
static int never(void) { return 0; }
const pq_kernels pq_dotprod_kernels = {"dotprod", never, 1, 1, 0, 0, 0};
#endif

#endif
