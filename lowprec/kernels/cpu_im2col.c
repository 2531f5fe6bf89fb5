/* The im2col matrix of a 2-d convolution, [N·Ho·Wo, C·kh·kw] in C order: row (n, ho, wo), column
 * (c, i, j) holds x[n, c, ho·sh − ph + i·dh, wo·sw − pw + j·dw] (0 outside the image), the layout of
 * F.unfold(x).transpose(1, 2).reshape(−1, C·kh·kw) (lowprec.backward.im2col_of) written in one pass:
 * no [N, K, L] intermediate and no transposing copy. Also a matrix's transposing copy (lp_transpose_f32).
 * Pure data movement, so bit-identical. Conventions: cpu_common.h. */
#include "cpu_common.h"

/* x contiguous [N, C, H, W]; out contiguous [N·Ho·Wo, C·kh·kw]; g: {N, C, H, W, kh, kw, sh, sw, ph, pw,
 * dh, dw, Ho, Wo}. Returns 0. */
int lp_im2col_f32(const float* x, float* out, const int64_t* g, int nthreads) {
    const int64_t N = g[0], C = g[1], H = g[2], W = g[3], kh = g[4], kw = g[5], sh = g[6], sw = g[7];
    const int64_t ph = g[8], pw = g[9], dh = g[10], dw = g[11], Ho = g[12], Wo = g[13];
    const int64_t K = C * kh * kw;
#pragma omp parallel for collapse(2) num_threads(nthreads) if (nthreads > 1 && N * Ho * Wo * K >= 65536)
    for (int64_t n = 0; n < N; n++)
        for (int64_t ho = 0; ho < Ho; ho++)
            for (int64_t wo = 0; wo < Wo; wo++) {
                float* row = out + ((n * Ho + ho) * Wo + wo) * K;
                for (int64_t c = 0; c < C; c++) {
                    const float* plane = x + (n * C + c) * H * W;
                    for (int64_t i = 0; i < kh; i++) {
                        const int64_t hi = ho * sh - ph + i * dh;
                        float* r = row + (c * kh + i) * kw;
                        if (hi < 0 || hi >= H) {
                            for (int64_t j = 0; j < kw; j++) r[j] = 0.0f;
                            continue;
                        }
                        const float* xr = plane + hi * W;
                        for (int64_t j = 0; j < kw; j++) {
                            const int64_t wi = wo * sw - pw + j * dw;
                            r[j] = (wi >= 0 && wi < W) ? xr[wi] : 0.0f;
                        }
                    }
                }
            }
    return 0;
}

/* out = x transposed: x contiguous [R, C], out contiguous [C, R] (a Linear's δ [tokens, C_out] to the
 * [C_out, tokens] matrix of lowprec.backward; torch's transposing copy took ~3x as long on one core).
 * 8x8 tiles transposed in registers (three rounds of two-input shuffles), the edges one by one.
 * Pure data movement, so bit-identical. Returns 0. */
#if defined(__clang__) || __GNUC__ >= 12
typedef float v8f __attribute__((vector_size(32)));
#define S8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
static inline void tile8(const float* x, float* out, int64_t R, int64_t C) {
    v8f r[8], a[8], b[8], o[8];
    for (int k = 0; k < 8; k++) memcpy(&r[k], x + k * C, sizeof(v8f));
    for (int k = 0; k < 8; k += 2) { /* pairs of rows interleaved: (r0[0], r1[0], r0[1], r1[1] | same at 4..7) */
        a[k] = S8(r[k], r[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        a[k + 1] = S8(r[k], r[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int k = 0; k < 8; k += 4) /* then pairs of pairs: columns 0..3 of four rows in each half */
        for (int j = 0; j < 2; j++) {
            b[k + 2 * j] = S8(a[k + j], a[k + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            b[k + 2 * j + 1] = S8(a[k + j], a[k + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int j = 0; j < 4; j++) { /* then the halves: column j and j + 4 of all eight rows */
        o[j] = S8(b[j], b[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        o[j + 4] = S8(b[j], b[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
    for (int k = 0; k < 8; k++) memcpy(out + k * R, &o[k], sizeof(v8f));
}
#else
static inline void tile8(const float* x, float* out, int64_t R, int64_t C) {
    for (int j = 0; j < 8; j++)
        for (int k = 0; k < 8; k++) out[j * R + k] = x[k * C + j];
}
#endif

int lp_transpose_f32(const float* x, float* out, int64_t R, int64_t C, int nthreads) {
    const int64_t R8 = R - R % 8, C8 = C - C % 8;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && R * C >= 65536)
    for (int64_t c0 = 0; c0 < C8; c0 += 8) {
        for (int64_t r0 = 0; r0 < R8; r0 += 8) tile8(x + r0 * C + c0, out + c0 * R + r0, R, C);
        for (int64_t c = c0; c < c0 + 8; c++)
            for (int64_t r = R8; r < R; r++) out[c * R + r] = x[r * C + c];
    }
    for (int64_t c = C8; c < C; c++)
        for (int64_t r = 0; r < R; r++) out[c * R + r] = x[r * C + c];
    return 0;
}
