/* Quantized linear layers as a GEMM over packed panels (layout in kernels.h): repacking, the table of
 * micro-kernels chosen once per process, the threaded driver with its float epilogue, the portable
 * micro-kernels, and the int8 embedding lookup from a packed table. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

/* ---- repacking (once, at load) ------------------------------------------------------------------ */

/* int4 rows in the Q4_0 nibble layout (per 32-block, byte j = (w_j + 8) | (w_{j+16} + 8) << 4), float16
 * scales [N, K / group] -> panels. Chunk c of a block is bytes 4c..4c+3 of each row's block: their low
 * nibbles are inputs 4c.. (step c), their high nibbles inputs 16 + 4c.. (step c + 4). */
void pq_pack_w4(const uint8_t *w, const uint16_t *s, int64_t N, int64_t K, int64_t group, uint8_t *out,
                uint16_t *out_s) {
    int64_t panels = (N + PANEL - 1) / PANEL, nb = K / 32, groups = K / group;
    for (int64_t p = 0; p < panels; p++)
        for (int r = 0; r < PANEL; r++) {
            int64_t n = p * PANEL + r;
            for (int64_t b = 0; b < nb; b++)
                for (int c = 0; c < 4; c++)
                    for (int i = 0; i < 4; i++)
                        out[(p * nb + b) * 256 + 64 * c + 4 * r + i] =
                            n < N ? w[n * (K / 2) + 16 * b + 4 * c + i] : 0x88; /* 0x88: two zeros */
            for (int64_t g = 0; g < groups; g++) out_s[(p * groups + g) * PANEL + r] = n < N ? s[n * groups + g] : 0;
        }
}

/* int8 rows [N, K] -> panels */
void pq_pack_w8(const int8_t *w, int64_t N, int64_t K, int8_t *out) {
    int64_t panels = (N + PANEL - 1) / PANEL;
    for (int64_t p = 0; p < panels; p++)
        for (int r = 0; r < PANEL; r++) {
            int64_t n = p * PANEL + r;
            for (int64_t j = 0; j < K / 4; j++)
                for (int i = 0; i < 4; i++) out[(p * (K / 4) + j) * 64 + 4 * r + i] = n < N ? w[n * K + 4 * j + i] : 0;
        }
}

/* Embedding rows of a packed int8 table: out[m] = w[tokens[m]] * scale[tokens[m]] (as the reference) */
void pq_gather_w8(const int8_t *w, const float *scales, int64_t K, const int64_t *tokens, int64_t M, float *out) {
    for (int64_t m = 0; m < M; m++) {
        int64_t t = tokens[m], p = t / PANEL, r = t % PANEL;
        const int8_t *panel = w + p * (K / 4) * 64 + 4 * r;
        for (int64_t j = 0; j < K / 4; j++)
            for (int i = 0; i < 4; i++) out[m * K + 4 * j + i] = (float)panel[64 * j + i] * scales[t];
    }
}

/* ---- portable micro-kernels --------------------------------------------------------------------- */

static void w4_portable(const uint8_t *a, int64_t lda, int n, int64_t K, const uint8_t *w, const uint16_t *s,
                        int64_t per, float acc[][PANEL]) {
    for (int i = 0; i < n; i++)
        for (int r = 0; r < PANEL; r++) acc[i][r] = 0.0f;
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *blk = w + b * 256;
        const uint16_t *sb = s + (b / per) * PANEL;
        for (int i = 0; i < n; i++) {
            const uint8_t *ai = a + i * lda + 32 * b;
            int32_t dot[PANEL] = {0};
            for (int c = 0; c < 4; c++)
                for (int r = 0; r < PANEL; r++)
                    for (int q = 0; q < 4; q++) {
                        uint8_t byte = blk[64 * c + 4 * r + q];
                        dot[r] += ai[4 * c + q] * ((byte & 15) - 8) + ai[16 + 4 * c + q] * ((byte >> 4) - 8);
                    }
            for (int r = 0; r < PANEL; r++) acc[i][r] = fmaf((float)dot[r], fp16_to_fp32(sb[r]), acc[i][r]);
        }
    }
}

static void w8_portable(const uint8_t *a, int64_t lda, int n, int64_t K, const int8_t *w, int32_t acc[][PANEL]) {
    for (int i = 0; i < n; i++)
        for (int r = 0; r < PANEL; r++) {
            int32_t dot = 0;
            for (int64_t j = 0; j < K / 4; j++)
                for (int q = 0; q < 4; q++) dot += a[i * lda + 4 * j + q] * w[64 * j + 4 * r + q];
            acc[i][r] = dot;
        }
}

static int always(void) { return 1; }

const pq_kernels pq_portable_kernels = {"portable", always, 4, 4, w4_portable, w8_portable, 0};

/* ---- the table, chosen once ----------------------------------------------------------------------- */

/* This architecture's paths, best first */
#if defined(__aarch64__) && !defined(PQ_EMULATE)
static const pq_kernels *const table[] = {&pq_i8mm_kernels, &pq_dotprod_kernels, &pq_neon_kernels,
                                          &pq_portable_kernels};
#else
static const pq_kernels *const table[] = {&pq_avx512_kernels, &pq_avxvnni_kernels, &pq_avx2_kernels,
                                          &pq_portable_kernels};
#endif
enum { PATHS = sizeof table / sizeof table[0] };
static const pq_kernels *current;

int pq_path_count(void) { return PATHS; }
const char *pq_path_name(int i) { return i >= 0 && i < PATHS ? table[i]->name : ""; }
int pq_path_supported(int i) { return i >= 0 && i < PATHS && table[i]->supported(); }

/* Use path i (the first supported one for i < 0); returns the index in force, or -1 if i is unsupported. */
int pq_select(int i) {
    if (i < 0) {
        for (i = 0; !table[i]->supported(); i++) {}
    } else if (!pq_path_supported(i)) {
        return -1;
    }
    current = table[i];
    return i;
}

int pq_selected(void) {
    for (int i = 0; i < PATHS; i++)
        if (pq_current() == table[i]) return i;
    return -1;
}

const pq_kernels *pq_current(void) {
    if (!current) pq_select(-1);
    return current;
}

/* ---- the driver ---------------------------------------------------------------------------------- */

/* Panels [p0, p1) of thread t: whole panels, spread evenly. */
static int64_t share(int64_t panels, int threads, int t, int64_t *p1) {
    *p1 = panels * (t + 1) / threads;
    return panels * t / threads;
}

/* Tokens whose activations stay in the L2 cache while each panel of a thread passes over them. */
static int64_t chunk_tokens(int64_t K, int tile) {
    int64_t chunk = (128 * 1024 / K) / tile * tile;
    return chunk < tile ? tile : chunk;
}

/* y [M, N] = dequantized(acts [M, K]) @ W.T for int4 panels with float16 group scales. rowcorr[n] =
 * sum_g scale_g * sum(w in g) (padded to whole panels) undoes the +128 offset and the zero point.
 * pq_linear_w4_share computes thread t's share of the panels (for callers already in a parallel region). */
void pq_linear_w4_share(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                        const uint8_t *w, const uint16_t *ws, const float *rowcorr, int64_t group, float *y,
                        int64_t N, int t, int threads) {
    const pq_kernels *kt = pq_current();
    int64_t panels = (N + PANEL - 1) / PANEL, nb = K / 32, groups = K / group, chunk = chunk_tokens(K, kt->tile4);
    float acc[MAX_TILE][PANEL];
    int64_t p1, p0 = share(panels, threads, t, &p1);
    for (int64_t m0 = 0; m0 < M; m0 += chunk)
        for (int64_t p = p0; p < p1; p++) {
            int rows = N - p * PANEL < PANEL ? (int)(N - p * PANEL) : PANEL;
            const float *corr = rowcorr + p * PANEL;
            for (int64_t m = m0; m < M && m < m0 + chunk; m += kt->tile4) {
                int n = M - m < kt->tile4 ? (int)(M - m) : kt->tile4;
                kt->w4(qa + m * K, K, n, K, w + p * nb * 256, ws + p * groups * PANEL, group / 32, acc);
                for (int i = 0; i < n; i++) {
                    float zc = (float)(128 + azp[m + i]), *out = y + (m + i) * N + p * PANEL;
                    for (int r = 0; r < rows; r++) out[r] = as[m + i] * (acc[i][r] - zc * corr[r]);
                }
            }
        }
}

void pq_linear_w4(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K,
                  const uint8_t *w, const uint16_t *ws, const float *rowcorr, int64_t group, float *y,
                  int64_t N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) pq_linear_w4_share(qa, as, azp, M, K, w, ws, rowcorr, group, y, N, t, threads);
}

/* The same for int8 panels with one float scale per row; wsum[n] = sum(w in row n). */
void pq_linear_w8(const uint8_t *qa, const float *as, const int32_t *azp, int64_t M, int64_t K, const int8_t *w,
                  const float *ws, const int32_t *wsum, float *y, int64_t N, int threads) {
    const pq_kernels *kt = pq_current();
    int64_t panels = (N + PANEL - 1) / PANEL, chunk = chunk_tokens(K, kt->tile8);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        int32_t acc[MAX_TILE][PANEL];
        int64_t p1, p0 = share(panels, threads, t, &p1);
        for (int64_t m0 = 0; m0 < M; m0 += chunk)
            for (int64_t p = p0; p < p1; p++) {
                int rows = N - p * PANEL < PANEL ? (int)(N - p * PANEL) : PANEL;
                for (int64_t m = m0; m < M && m < m0 + chunk; m += kt->tile8) {
                    int n = M - m < kt->tile8 ? (int)(M - m) : kt->tile8;
                    kt->w8(qa + m * K, K, n, K, w + p * K * PANEL, acc);
                    for (int i = 0; i < n; i++) {
                        int32_t zc = 128 + azp[m + i];
                        float *out = y + (m + i) * N + p * PANEL;
                        for (int r = 0; r < rows; r++)
                            out[r] = as[m + i] * ws[p * PANEL + r] * (float)(acc[i][r] - zc * wsum[p * PANEL + r]);
                    }
                }
            }
    }
}
