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
    fwht_buf(v, n, nk, sg, c, inverse);
    for (int64_t k = 0; k < nk; k++)
        for (int r = 0; r < n; r++) out[o * n_out + (b0 + k) * n + r] = v[r][k];
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

/* Returns 0, or -1 for n not a power of two in [2, 32]. */
int lp_im2col_fwht_f32(const float* x, float* out, const int64_t* g, const float* signs, int n, int nthreads) {
    if (n < 2 || n > MAXN || (n & (n - 1))) return -1;
    const float c = (float)(1.0 / sqrt((double)n));
    const int64_t T = g[0] * g[12] * g[13], K = g[1] * g[4] * g[5];
    const int64_t nb = (T + n - 1) / n, Tp = nb * n;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && Tp * K >= 65536)
    for (int64_t k = 0; k < K; k++) im2col_rht_row(x, out + k * Tp, g, signs, n, c, k);
    return 0;
}
