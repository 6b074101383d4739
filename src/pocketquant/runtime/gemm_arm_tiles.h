/* The Arm micro-kernels, written once and included by gemm_arm.c for each way of taking a dot product:
 * before including it, define DOT(acc, w, a, c) (uint32x4 lane l += sum over i < 4 of w[4l + i] * a[4c + i],
 * all bytes unsigned: lane c of a, a literal, against every lane of w) and the names W4, W8, W4_TILE and
 * W8_TILE. A token's activations stay in registers (16 inputs in one), so nothing is broadcast.
 *
 * Weights enter the products unsigned: an int4 weight as its stored nibble w + 8, an int8 weight as w + 128
 * (its sign bit flipped), and the sum of the token's activations times 8 (128) is taken off afterwards, so
 * each 32-input block gives exactly the integer dot_b of kernels.h and the float steps are the same. */

static INLINE void W4_TILE(const uint8_t *a, int64_t lda, const int n, int64_t K, const uint8_t *w,
                           const uint16_t *s, int64_t per, float acc[][PANEL]) {
    const uint8x16_t nib = vdupq_n_u8(15);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < 4; k++) vst1q_f32(acc[i] + 4 * k, vdupq_n_f32(0.0f));
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *blk = w + b * 256;
        const uint16_t *sb = s + (b / per) * PANEL;
        uint8x16_t lo_a[ARM_TILE], hi_a[ARM_TILE]; /* a token's inputs 0..15 and 16..31 of the block */
        int32x4_t bias[ARM_TILE];                 /* 8 x the sum of its activations: the weights' +8 */
        for (int i = 0; i < n; i++) {
            lo_a[i] = vld1q_u8(a + i * lda + 32 * b), hi_a[i] = vld1q_u8(a + i * lda + 32 * b + 16);
            bias[i] = vdupq_n_s32(8 * (int32_t)(vaddlvq_u8(lo_a[i]) + vaddlvq_u8(hi_a[i])));
        }
        for (int k = 0; k < 4; k++) { /* rows 4k..4k+3 */
            uint32x4_t d[ARM_TILE];
            for (int i = 0; i < n; i++) d[i] = vdupq_n_u32(0);
#define CHUNK(c) /* inputs 4c.. (low nibbles, lane c of lo_a) and 16 + 4c.. (high nibbles, of hi_a) */         \
            {                                                                                                  \
                uint8x16_t raw = vld1q_u8(blk + 64 * (c) + 16 * k), lo = vandq_u8(raw, nib), hi = vshrq_n_u8(raw, 4); \
                for (int i = 0; i < n; i++) d[i] = DOT(DOT(d[i], lo, lo_a[i], c), hi, hi_a[i], c);              \
            }
            CHUNK(0) CHUNK(1) CHUNK(2) CHUNK(3)
#undef CHUNK
            float32x4_t scale = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sb + 4 * k)));
            for (int i = 0; i < n; i++) {
                float32x4_t dot = vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(d[i]), bias[i]));
                vst1q_f32(acc[i] + 4 * k, vfmaq_f32(vld1q_f32(acc[i] + 4 * k), dot, scale));
            }
        }
    }
}

static INLINE void W8_TILE(const uint8_t *a, int64_t lda, const int n, int64_t K, const int8_t *w,
                           int32_t acc[][PANEL]) {
    const uint8x16_t flip = vdupq_n_u8(0x80);
    uint32x4_t d[ARM_TILE][4];
    uint32_t sum[ARM_TILE] = {0};
    for (int i = 0; i < n; i++)
        for (int k = 0; k < 4; k++) d[i][k] = vdupq_n_u32(0);
#define STEP(c) /* step j + c: 4 inputs of 16 rows, as w + 128, against lane c of the tokens' x */         \
    if ((c) < steps)                                                                                  \
        for (int k = 0; k < 4; k++) {                                                                 \
            uint8x16_t wv = veorq_u8(vld1q_u8((const uint8_t *)w + 64 * (j + (c)) + 16 * k), flip);   \
            for (int i = 0; i < n; i++) d[i][k] = DOT(d[i][k], wv, x[i], c);                          \
        }
    int64_t j = 0;
    for (; j + 4 <= K / 4; j += 4) { /* steps j..j+3: inputs 4j .. 4j + 15 */
        const int steps = 4;
        uint8x16_t x[ARM_TILE];
        for (int i = 0; i < n; i++) x[i] = vld1q_u8(a + i * lda + 4 * j), sum[i] += vaddlvq_u8(x[i]);
        STEP(0) STEP(1) STEP(2) STEP(3)
    }
    if (j < K / 4) { /* the last 1 to 3 steps */
        const int64_t steps = K / 4 - j;
        uint8x16_t x[ARM_TILE];
        for (int i = 0; i < n; i++) {
            uint8_t part[16] = {0};
            memcpy(part, a + i * lda + 4 * j, 4 * steps);
            x[i] = vld1q_u8(part), sum[i] += vaddlvq_u8(x[i]);
        }
        STEP(0) STEP(1) STEP(2)
    }
#undef STEP
    for (int i = 0; i < n; i++) { /* the sum fits 32 bits unsigned, the result 32 bits signed */
        uint32x4_t bias = vdupq_n_u32(128u * sum[i]);
        for (int k = 0; k < 4; k++) vst1q_s32(acc[i] + 4 * k, vreinterpretq_s32_u32(vsubq_u32(d[i][k], bias)));
    }
}

static void W4(const uint8_t *a, int64_t lda, int n, int64_t K, const uint8_t *w, const uint16_t *s, int64_t per,
               float acc[][PANEL]) {
    switch (n) {
        case 4: W4_TILE(a, lda, 4, K, w, s, per, acc); break;
        case 3: W4_TILE(a, lda, 3, K, w, s, per, acc); break;
        case 2: W4_TILE(a, lda, 2, K, w, s, per, acc); break;
        default: W4_TILE(a, lda, 1, K, w, s, per, acc);
    }
}

static void W8(const uint8_t *a, int64_t lda, int n, int64_t K, const int8_t *w, int32_t acc[][PANEL]) {
    switch (n) {
        case 4: W8_TILE(a, lda, 4, K, w, acc); break;
        case 3: W8_TILE(a, lda, 3, K, w, acc); break;
        case 2: W8_TILE(a, lda, 2, K, w, acc); break;
        default: W8_TILE(a, lda, 1, K, w, acc);
    }
}
