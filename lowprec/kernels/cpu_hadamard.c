/* The block random Hadamard transform of lowprec.hadamard.block_rht by the fast Walsh–Hadamard
 * transform, operation for operation as the torch version: x contiguous [outer, n_in, inner], blocks
 * of n rows along the middle dim (the tail zero-padded); per block, (inverse: rows times their signs,)
 * log2(n) butterfly stages h = 1, 2, 4, ... (rows i, i + h of each 2h-group -> a + b, a - b), times
 * c = fp32(1/√n), (forward: times the signs). Vectorized across up to FC inner columns at a time.
 * Conventions: cpu_common.h. */
#include "cpu_fwht.h"

__attribute__((always_inline)) static inline void fwht_cols(const float* x, float* out, const float* sg, int64_t o,
                                                          int64_t b, int64_t n_in, int64_t n_out, int64_t inner,
                                                          int64_t i0, const int64_t ni, const int n,
                                                          const int inverse, float c) {
    float v[MAXN][FC];
    fwht_cols_v(x, v, sg, o, b, n_in, inner, i0, ni, n, inverse, c);
    for (int r = 0; r < n; r++) {
        float* op = out + (o * n_out + b * n + r) * inner + i0;
        for (int64_t i = 0; i < ni; i++) op[i] = v[r][i];
    }
}

/* inner = 1 (blocks along the last dim): blocks b0..b0+nk-1 of row o, block k in lane k (a transpose
 * through the buffer), so the butterflies still run across FC lanes; the same operations per element. */
__attribute__((always_inline)) static inline void fwht_rows(const float* x, float* out, const float* sg, int64_t o,
                                                          int64_t b0, int64_t nk, int64_t n_in, int64_t n_out, int n,
                                                          int inverse, float c) {
    float v[MAXN][FC];
    for (int64_t k = 0; k < nk; k++) {
        const int64_t base = (b0 + k) * n;
        for (int r = 0; r < n; r++) {
            const float s = inverse ? sg[r] : 1.0f;
            const float xv = base + r < n_in ? x[o * n_in + base + r] : 0.0f;
            v[r][k] = inverse ? xv * s : xv;
        }
    }
    for (int h = 1; h < n; h *= 2)
        for (int g = 0; g < n; g += 2 * h)
            for (int r = g; r < g + h; r++)
                for (int64_t k = 0; k < nk; k++) {
                    const float a = v[r][k], bb = v[r + h][k];
                    v[r][k] = a + bb;
                    v[r + h][k] = a - bb;
                }
    for (int r = 0; r < n; r++) {
        const float s = inverse ? 1.0f : sg[r];
        for (int64_t k = 0; k < nk; k++) v[r][k] = inverse ? v[r][k] * c : (v[r][k] * c) * s;
    }
    for (int64_t k = 0; k < nk; k++)
        for (int r = 0; r < n; r++) out[o * n_out + (b0 + k) * n + r] = v[r][k];
}

static void fwht_block_scalar(const float* src, float* v, const float* sg, int n, float c, int inverse) {
    for (int r = 0; r < n; r++) v[r] = inverse ? src[r] * sg[r] : src[r];
    for (int h = 1; h < n; h *= 2)
        for (int gg = 0; gg < n; gg += 2 * h)
            for (int r = gg; r < gg + h; r++) {
                const float a = v[r], bb = v[r + h];
                v[r] = a + bb;
                v[r + h] = a - bb;
            }
    for (int r = 0; r < n; r++) v[r] = inverse ? v[r] * c : (v[r] * c) * sg[r];
}

#if VW == 16 && defined(SHUF)
#define FWHT_ROW_VECTORS 1
#define XOR1 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14
#define XOR2 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13
#define XOR4 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11
#define XOR8 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7
static inline vf fwht16_v(vf v) { /* stages h = 1, 2, 4, 8 within the 16 lanes */
    const vi l = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vf p = SHUF(v, v, XOR1);
    v = sel((l & 1) != 0, p - v, v + p);
    p = SHUF(v, v, XOR2);
    v = sel((l & 2) != 0, p - v, v + p);
    p = SHUF(v, v, XOR4);
    v = sel((l & 4) != 0, p - v, v + p);
    p = SHUF(v, v, XOR8);
    return sel((l & 8) != 0, p - v, v + p);
}
#else
#define FWHT_ROW_VECTORS 0
#endif

/* Blocks of n along a row: dst[b·n + r] from src[b·n + r] (in place allowed), nb blocks; forward:
 * butterflies, times c, times the signs; inverse: times the signs, butterflies, times c. n = 16 or 32
 * as one or two vectors per block, else one by one. */
static void fwht_row(const float* src, float* dst, int64_t nb, const float* sg, int n, float c, int inverse) {
#if VW == 16 && defined(SHUF)
    if (n == 16 || n == 32) {
        vf s0, s1, cv = vsplat(c);
        memcpy(&s0, sg, sizeof(vf));
        memcpy(&s1, sg + (n == 32 ? 16 : 0), sizeof(vf));
        for (int64_t b = 0; b < nb; b++) {
            vf v0, v1;
            memcpy(&v0, src + b * n, sizeof(vf));
            if (inverse) v0 = v0 * s0;
            v0 = fwht16_v(v0);
            if (n == 32) {
                memcpy(&v1, src + b * n + 16, sizeof(vf));
                if (inverse) v1 = v1 * s1;
                v1 = fwht16_v(v1);
                const vf a = v0;
                v0 = a + v1;
                v1 = inverse ? (a - v1) * cv : ((a - v1) * cv) * s1;
                memcpy(dst + b * n + 16, &v1, sizeof(vf));
            }
            v0 = inverse ? v0 * cv : (v0 * cv) * s0;
            memcpy(dst + b * n, &v0, sizeof(vf));
        }
        return;
    }
#endif
    for (int64_t b = 0; b < nb; b++) fwht_block_scalar(src + b * n, dst + b * n, sg, n, c, inverse);
}

/* out: contiguous [outer, ceil(n_in/n)·n, inner]. Returns 0, or -1 for n not a power of two in [2, 32]. */
int lp_fwht_f32(const float* x, float* out, const float* signs, int64_t outer, int64_t n_in, int64_t inner, int n,
                int inverse, int nthreads) {
    if (n < 2 || n > MAXN || (n & (n - 1))) return -1;
    const float c = (float)(1.0 / sqrt((double)n));
    const int64_t nb = (n_in + n - 1) / n, n_out = nb * n, nic = (inner + FC - 1) / FC;
    if (inner == 1 && FWHT_ROW_VECTORS && (n == 16 || n == 32)) { /* each block one or two vectors */
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && outer * n_out >= 65536)
        for (int64_t o = 0; o < outer; o++) {
            const int64_t full = n_in / n;
            fwht_row(x + o * n_in, out + o * n_out, full, signs, n, c, inverse);
            if (full < nb) { /* the tail block, zero-padded */
                float t[MAXN];
                for (int r = 0; r < n; r++) t[r] = full * n + r < n_in ? x[o * n_in + full * n + r] : 0.0f;
                fwht_row(t, out + o * n_out + full * n, 1, signs, n, c, inverse);
            }
        }
        return 0;
    }
    if (inner == 1) {
        const int64_t nbc = (nb + FC - 1) / FC;
#pragma omp parallel for collapse(2) num_threads(nthreads) if (nthreads > 1 && outer * n_out >= 65536)
        for (int64_t o = 0; o < outer; o++)
            for (int64_t bc = 0; bc < nbc; bc++) {
                const int64_t b0 = bc * FC, nk = b0 + FC <= nb ? FC : nb - b0;
                fwht_rows(x, out, signs, o, b0, nk, n_in, n_out, n, inverse, c);
            }
        return 0;
    }
#pragma omp parallel for collapse(3) num_threads(nthreads) if (nthreads > 1 && outer * n_out * inner >= 65536)
    for (int64_t o = 0; o < outer; o++)
        for (int64_t b = 0; b < nb; b++)
            for (int64_t ic = 0; ic < nic; ic++) {
                const int64_t i0 = ic * FC, ni = i0 + FC <= inner ? FC : inner - i0;
                /* the common block sizes over full chunks as constants: the butterflies unroll into whole vectors */
                if (ni == FC && n == 16)
                    fwht_cols(x, out, signs, o, b, n_in, n_out, inner, i0, FC, 16, inverse, c);
                else if (ni == FC && n == 32)
                    fwht_cols(x, out, signs, o, b, n_in, n_out, inner, i0, FC, 32, inverse, c);
                else
                    fwht_cols(x, out, signs, o, b, n_in, n_out, inner, i0, ni, n, inverse, c);
            }
    return 0;
}

/* The block RHT along tokens (dim 0) of the im2col matrix [T = N·Ho·Wo, K = C·kh·kw] of x (contiguous
 * [N, C, H, W]; g as lp_im2col_f32's), written transposed: out contiguous [K, T'] (T' = ceil(T/n)·n), so
 * that column k = (c, i, j) of the matrix is one contiguous row, gathered as shifted copies of x's rows
 * (zeros outside the image and in the tail block), and each block of n tokens is n contiguous floats.
 * The same numbers as lp_fwht_f32 on lp_im2col_f32's matrix: per block the same butterflies (rows r,
 * r + h -> a + b, a - b), times c, times the signs. n = 16 or 32: one or two vectors per block, the
 * butterflies of h < 16 between lanes (lane l and l ^ h: a + b in the lower, a - b in the upper). */
static void im2col_column(const float* x, float* row, const int64_t* g, int64_t k) {
    const int64_t N = g[0], C = g[1], H = g[2], W = g[3], kh = g[4], kw = g[5], sh = g[6], sw = g[7];
    const int64_t ph = g[8], pw = g[9], dh = g[10], dw = g[11], Ho = g[12], Wo = g[13];
    const int64_t c = k / (kh * kw), di = (k % (kh * kw)) / kw * dh, dj = k % kw * dw;
    int64_t lo = 0, hi = Wo, hlo = 0, hhi = Ho; /* the wo (ho) whose wi = wo·sw - pw + dj (hi) is in the image */
    while (lo < Wo && lo * sw - pw + dj < 0) lo++;
    while (hi > lo && (hi - 1) * sw - pw + dj >= W) hi--;
    while (hlo < Ho && hlo * sh - ph + di < 0) hlo++;
    while (hhi > hlo && (hhi - 1) * sh - ph + di >= H) hhi--;
    if (sh == 1 && sw == 1 && Wo == W && hlo < hhi && lo < hi) { /* each image's tokens: x's plane shifted */
        const int64_t a = hlo * W + lo, e = (hhi - 1) * W + hi, shift = (di - ph) * W + dj - pw;
        for (int64_t nn = 0; nn < N; nn++) {
            float* dst = row + nn * Ho * Wo;
            memset(dst, 0, (size_t)a * sizeof(float));
            memcpy(dst + a, x + (nn * C + c) * H * W + a + shift, (size_t)(e - a) * sizeof(float));
            memset(dst + e, 0, (size_t)(Ho * Wo - e) * sizeof(float));
            for (int64_t ho = hlo; ho < hhi; ho++) { /* the columns that wrapped from the next or last row */
                for (int64_t wo = 0; wo < lo; wo++) dst[ho * W + wo] = 0.0f;
                for (int64_t wo = hi; wo < Wo; wo++) dst[ho * W + wo] = 0.0f;
            }
        }
        return;
    }
    for (int64_t nn = 0; nn < N; nn++) {
        float* dst = row + nn * Ho * Wo;
        const float* plane = x + (nn * C + c) * H * W - pw + dj;
        memset(dst, 0, (size_t)(hlo * Wo) * sizeof(float));
        for (int64_t ho = hlo; ho < hhi; ho++) {
            float* d = dst + ho * Wo;
            const float* xr = plane + (ho * sh - ph + di) * W;
            for (int64_t wo = 0; wo < lo; wo++) d[wo] = 0.0f;
            if (sw == 1)
                memcpy(d + lo, xr + lo, (size_t)(hi - lo) * sizeof(float));
            else
                for (int64_t wo = lo; wo < hi; wo++) d[wo] = xr[wo * sw];
            for (int64_t wo = hi; wo < Wo; wo++) d[wo] = 0.0f;
        }
        memset(dst + hhi * Wo, 0, (size_t)((Ho - hhi) * Wo) * sizeof(float));
    }
}

/* Returns 0, or -1 for n not a power of two in [2, 32]. */
int lp_im2col_fwht_f32(const float* x, float* out, const int64_t* g, const float* signs, int n, int nthreads) {
    if (n < 2 || n > MAXN || (n & (n - 1))) return -1;
    const float c = (float)(1.0 / sqrt((double)n));
    const int64_t T = g[0] * g[12] * g[13], K = g[1] * g[4] * g[5];
    const int64_t nb = (T + n - 1) / n, Tp = nb * n;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && Tp * K >= 65536)
    for (int64_t k = 0; k < K; k++) {
        float* row = out + k * Tp;
        im2col_column(x, row, g, k);
        for (int64_t t = T; t < Tp; t++) row[t] = 0.0f;
        fwht_row(row, row, nb, signs, n, c, 0);
    }
    return 0;
}
