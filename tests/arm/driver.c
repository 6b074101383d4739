/* Runs the kernels on cases read from stdin and writes their outputs to stdout, on the path argv[1] names
 * (exit 3 when this CPU cannot run it), on 2 threads or PQ_THREADS. Built for aarch64 and run under qemu by
 * tests/test_arm.py, which writes the cases and compares the outputs with the x86 build's.
 *
 * A case: int64 kind, M, K, N, group, then
 *   kind 0 (activation quantization): float x [M, K]            -> u8 qa [M, K], float scale [M], int32 zp [M]
 *   kind 4 (int4 linear): u8 qa [M, K], float scale [M], int32 zp [M], u8 w [P, K * 8],
 *                         u16 scales [P, K / group * 16], float rowcorr [P * 16]   -> float y [M, N]
 *   kind 8 (int8 linear): u8 qa, float scale, int32 zp as above, int8 w [P, K * 16], float scales [P * 16],
 *                         int32 wsum [P * 16]                                   -> float y [M, N]
 * where P = ceil(N / 16), or
 *   kind 1 (decode steps of a whole model): n layers, B sequences, S steps, caches of max_t positions, int64
 *     dim, n_heads, n_kv, head_dim, ffn, cache bits (0: float32), had_down_m, had_qk, float eps,
 *     float inv_freq [head_dim / 2], float had_down [had_down_m ^ 2]; per layer float attn_norm [dim],
 *     ffn_norm [dim] and per projection (q k v o gate up down) int64 N, K, group and its int4 panels, scales
 *     and rowcorr as in kind 4; then per step int64 pos [B] and float x [B, dim]     -> float x [B, dim] each
 *   (header: kind, n, B, S, max_t). A test's short run: nothing is freed. Or
 *   kind 2 (prefill attention): T queries from position start, H heads, KV heads, then int64 D, float q [T, H, D],
 *     k [KV, start + T, D], v [KV, start + T, D]                                  -> float out [T, H, D]
 *   (header: kind, T, start, H, KV). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../src/pocketquant/runtime/kernels.h"

static int threads = 2; /* PQ_THREADS overrides (1 for instruction counts) */

static void *take(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p || fread(p, 1, bytes, stdin) != bytes) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
    return p;
}

static void give(const void *p, size_t bytes) { fwrite(p, 1, bytes, stdout); }

static void decode(int64_t n, int64_t B, int64_t S, int64_t max_t) {
    int64_t *c = take(sizeof(int64_t) * 8);
    int64_t dim = c[0], D = c[3], KV = c[2], bits = c[5], m = c[6];
    float *eps = take(sizeof(float)), *inv_freq = take(sizeof(float) * D / 2);
    float *had = m ? take(sizeof(float) * m * m) : NULL;
    pq_layer *layers = calloc(n, sizeof(pq_layer));
    for (int64_t i = 0; i < n; i++) {
        pq_layer *L = layers + i;
        L->dim = dim, L->n_heads = c[1], L->n_kv = KV, L->head_dim = D, L->ffn = c[4], L->eps = *eps;
        L->had_down_m = m, L->had_qk = c[7], L->had_down = had;
        L->attn_norm = take(sizeof(float) * dim), L->ffn_norm = take(sizeof(float) * dim);
        for (int j = 0; j < 7; j++) {
            int64_t *shape = take(sizeof(int64_t) * 3), P = (shape[0] + PANEL - 1) / PANEL, K = shape[1];
            L->g[j] = shape[2];
            L->w[j] = take(P * K * 8);
            L->s[j] = take(sizeof(uint16_t) * P * (K / shape[2]) * PANEL);
            L->c[j] = take(sizeof(float) * P * PANEL);
        }
    }
    pq_cache *caches = calloc(n * B, sizeof(pq_cache));
    const pq_cache **by = malloc(sizeof(pq_cache *) * n * B);
    size_t values = KV * max_t * D, size = bits ? 1 : sizeof(float);
    for (int64_t i = 0; i < n * B; i++) {
        pq_cache *C = caches + i;
        C->k = calloc(values, size), C->v = calloc(values, size), C->max_t = max_t, C->bits = bits;
        C->k_scale = calloc(KV * max_t, sizeof(float)), C->k_zero = calloc(KV * max_t, sizeof(float));
        C->v_scale = calloc(KV * max_t, sizeof(float)), C->v_zero = calloc(KV * max_t, sizeof(float));
        by[i] = C;
    }
    float *scratch = malloc(sizeof(float) * pq_decode_scratch(layers, B, max_t));
    for (int64_t step = 0; step < S; step++) {
        int64_t *pos = take(sizeof(int64_t) * B);
        float *x = take(sizeof(float) * B * dim);
        pq_decode_layers(layers, by, n, B, x, pos, max_t, inv_freq, scratch, threads);
        give(x, sizeof(float) * B * dim);
    }
}

int main(int argc, char **argv) {
    int path = -1;
    for (int i = 0; argc > 1 && i < pq_path_count(); i++)
        if (!strcmp(pq_path_name(i), argv[1])) path = i;
    if (path < 0) {
        fprintf(stderr, "unknown path\n");
        return 2;
    }
    if (pq_select(path) < 0) return 3;
    if (getenv("PQ_THREADS")) threads = atoi(getenv("PQ_THREADS"));
    int64_t h[5];
    while (fread(h, sizeof h, 1, stdin) == 1) {
        int64_t kind = h[0], M = h[1], K = h[2], N = h[3], group = h[4], P = (N + PANEL - 1) / PANEL;
        if (kind == 1) {
            decode(M, K, N, group);
            continue;
        }
        if (kind == 2) {
            int64_t T = M, start = K, H = N, KV = group, D = *(int64_t *)take(sizeof(int64_t)), S = start + T;
            float *q = take(sizeof(float) * T * H * D), *k = take(sizeof(float) * KV * S * D);
            float *v = take(sizeof(float) * KV * S * D), *out = malloc(sizeof(float) * T * H * D);
            if (pq_prefill_attention(q, H * D, D, k, S * D, D, v, S * D, D, out, T, start, H, KV, D, threads)) return 4;
            give(out, sizeof(float) * T * H * D);
            continue;
        }
        if (kind == 0) {
            float *x = take(sizeof(float) * M * K), *scale = malloc(sizeof(float) * M);
            uint8_t *qa = malloc(M * K);
            int32_t *zp = malloc(sizeof(int32_t) * M);
            pq_quantize_rows(x, M, K, qa, scale, zp, threads);
            give(qa, M * K), give(scale, sizeof(float) * M), give(zp, sizeof(int32_t) * M);
            free(x), free(scale), free(qa), free(zp);
            continue;
        }
        uint8_t *qa = take(M * K);
        float *as = take(sizeof(float) * M), *y = malloc(sizeof(float) * M * N);
        int32_t *azp = take(sizeof(int32_t) * M);
        if (kind == 4) {
            uint8_t *w = take(P * K * 8);
            uint16_t *ws = take(sizeof(uint16_t) * P * (K / group) * PANEL);
            float *rowcorr = take(sizeof(float) * P * PANEL);
            pq_linear_w4(qa, as, azp, M, K, w, ws, rowcorr, group, y, N, threads);
            free(w), free(ws), free(rowcorr);
        } else {
            int8_t *w = take(P * K * PANEL);
            float *ws = take(sizeof(float) * P * PANEL);
            int32_t *wsum = take(sizeof(int32_t) * P * PANEL);
            pq_linear_w8(qa, as, azp, M, K, w, ws, wsum, y, N, threads);
            free(w), free(ws), free(wsum);
        }
        give(y, sizeof(float) * M * N);
        free(qa), free(as), free(azp), free(y);
    }
    return 0;
}
