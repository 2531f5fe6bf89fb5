/* The fast Walsh–Hadamard transform's block kernels (lowprec.hadamard.block_rht): a block across columns
 * into a buffer, blocks along a row (in registers where the vectors allow), and a row of the rotated
 * im2col matrix; cpu_hadamard.c's entry points run them, and cpu_fp4.c's NVFP4 after the RHT reads the
 * rotated blocks from them without the rotated tensor being read back. Conventions: cpu_common.h. */
#ifndef LOWPREC_CPU_FWHT_H
#define LOWPREC_CPU_FWHT_H
#include "cpu_common.h"

#define FC 64
#define MAXN 32

/* The butterflies of n rows of v (lanes 0..ni-1), times c, (forward: times the signs) in place. */
__attribute__((always_inline)) static inline void fwht_buf(float v[][FC], const int n, const int64_t ni,
                                                         const float* sg, float c, const int inverse) {
    for (int h = 1; h < n; h *= 2)
        for (int g = 0; g < n; g += 2 * h)
            for (int r = g; r < g + h; r++)
                for (int64_t i = 0; i < ni; i++) {
                    const float a = v[r][i], bb = v[r + h][i];
                    v[r][i] = a + bb;
                    v[r + h][i] = a - bb;
                }
    for (int r = 0; r < n; r++) {
        const float s = inverse ? 1.0f : sg[r];
        for (int64_t i = 0; i < ni; i++) v[r][i] = inverse ? v[r][i] * c : (v[r][i] * c) * s;
    }
}

/* v[r][i] = row r of block b (rows b·n + r of x's slab o, zero past n_in) at columns i0 + i (i < ni)
 * of x contiguous [outer, n_in, inner], rotated: (inverse: rows times their signs,) log2(n) butterfly
 * stages h = 1, 2, 4, ... (rows r, r + h of each 2h-group -> a + b, a - b), times c = fp32(1/√n),
 * (forward: times the signs): the reference's operations in its order. */
__attribute__((always_inline)) static inline void fwht_cols_v(const float* x, float v[][FC], const float* sg,
                                                            int64_t o, int64_t b, int64_t n_in, int64_t inner,
                                                            int64_t i0, const int64_t ni, const int n,
                                                            const int inverse, float c) {
    for (int r = 0; r < n; r++) {
        const int64_t row = b * n + r;
        const float* xp = x + (o * n_in + row) * inner + i0;
        const float s = inverse ? sg[r] : 1.0f;
        if (row < n_in) {
            if (inverse)
                for (int64_t i = 0; i < ni; i++) v[r][i] = xp[i] * s;
            else
                for (int64_t i = 0; i < ni; i++) v[r][i] = xp[i];
        } else {
            for (int64_t i = 0; i < ni; i++) v[r][i] = inverse ? 0.0f * s : 0.0f;
        }
    }
    fwht_buf(v, n, ni, sg, c, inverse);
}

static inline void fwht_block_scalar(const float* src, float* v, const float* sg, int n, float c, int inverse) {
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
static inline void fwht_row(const float* src, float* dst, int64_t nb, const float* sg, int n, float c, int inverse) {
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

/* The block RHT along tokens (dim 0) of the im2col matrix [T = N·Ho·Wo, K = C·kh·kw] of x (contiguous
 * [N, C, H, W]; g as lp_im2col_f32's), written transposed: out contiguous [K, T'] (T' = ceil(T/n)·n), so
 * that column k = (c, i, j) of the matrix is one contiguous row, gathered as shifted copies of x's rows
 * (zeros outside the image and in the tail block), and each block of n tokens is n contiguous floats.
 * The same numbers as lp_fwht_f32 on lp_im2col_f32's matrix: per block the same butterflies (rows r,
 * r + h -> a + b, a - b), times c, times the signs. n = 16 or 32: one or two vectors per block, the
 * butterflies of h < 16 between lanes (lane l and l ^ h: a + b in the lower, a - b in the upper). */
static inline void im2col_column(const float* x, float* row, const int64_t* g, int64_t k) {
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


/* Row k of lp_im2col_fwht_f32's [K, T'] output (column k of the im2col matrix, rotated along tokens in
 * blocks of n): gathered, the tail zero-padded, then rotated in place. */
static inline void im2col_rht_row(const float* x, float* row, const int64_t* g, const float* sg, int n, float c,
                                  int64_t k) {
    const int64_t T = g[0] * g[12] * g[13], nb = (T + n - 1) / n;
    im2col_column(x, row, g, k);
    for (int64_t t = T; t < nb * n; t++) row[t] = 0.0f;
    fwht_row(row, row, nb, sg, n, c, 0);
}

#endif
