/* The im2col matrix of a 2-d convolution, [N·Ho·Wo, C·kh·kw] in C order: row (n, ho, wo), column
 * (c, i, j) holds x[n, c, ho·sh − ph + i·dh, wo·sw − pw + j·dw] (0 outside the image), the layout of
 * F.unfold(x).transpose(1, 2).reshape(−1, C·kh·kw) (lowprec.backward.im2col_of) written in one pass:
 * no [N, K, L] intermediate and no transposing copy. Pure data movement, so bit-identical.
 * Conventions: cpu_common.h. */
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
