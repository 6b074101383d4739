/* The Arm micro-kernels, written once and included by gemm_arm.c for each way of taking a dot product:
 * before including it, define DOT(acc, w, a) (uint32x4 lane l += sum over i < 4 of w[4l + i] * a[4l + i],
 * all bytes unsigned) and the names W4, W8, W4_TILE and W8_TILE.
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
        uint32x4_t d[ARM_TILE][4];
        for (int i = 0; i < n; i++)
            for (int k = 0; k < 4; k++) d[i][k] = vdupq_n_u32(0);
        for (int c = 0; c < 4; c++)
            for (int k = 0; k < 4; k++) { /* rows 4k..4k+3: inputs 4c.. (low nibbles) and 16 + 4c.. (high) */
                uint8x16_t raw = vld1q_u8(blk + 64 * c + 16 * k), lo = vandq_u8(raw, nib), hi = vshrq_n_u8(raw, 4);
                for (int i = 0; i < n; i++) {
                    const uint8_t *ai = a + i * lda + 32 * b + 4 * c;
                    d[i][k] = DOT(d[i][k], lo, bcast4(ai));
                    d[i][k] = DOT(d[i][k], hi, bcast4(ai + 16));
                }
            }
        for (int i = 0; i < n; i++) {
            int32x4_t bias = vdupq_n_s32(8 * (int32_t)byte_sum(a + i * lda + 32 * b, 32));
            for (int k = 0; k < 4; k++) {
                float32x4_t dot = vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(d[i][k]), bias));
                float32x4_t scale = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sb + 4 * k)));
                vst1q_f32(acc[i] + 4 * k, vfmaq_f32(vld1q_f32(acc[i] + 4 * k), dot, scale));
            }
        }
    }
}

static INLINE void W8_TILE(const uint8_t *a, int64_t lda, const int n, int64_t K, const int8_t *w,
                           int32_t acc[][PANEL]) {
    const uint8x16_t flip = vdupq_n_u8(0x80);
    uint32x4_t d[ARM_TILE][4];
    for (int i = 0; i < n; i++)
        for (int k = 0; k < 4; k++) d[i][k] = vdupq_n_u32(0);
    for (int64_t j = 0; j < K / 4; j++)
        for (int k = 0; k < 4; k++) {
            uint8x16_t wv = veorq_u8(vld1q_u8((const uint8_t *)w + 64 * j + 16 * k), flip); /* w + 128 */
            for (int i = 0; i < n; i++) d[i][k] = DOT(d[i][k], wv, bcast4(a + i * lda + 4 * j));
        }
    for (int i = 0; i < n; i++) { /* the sum fits 32 bits unsigned, the result 32 bits signed */
        uint32x4_t bias = vdupq_n_u32(128u * byte_sum(a + i * lda, K));
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
