/* One block of the block random Hadamard transform (lowprec.hadamard.block_rht) across columns: the
 * butterflies cpu_hadamard.c runs for blocks along an outer dim, into a buffer, so that a consumer
 * (cpu_fp4.c's block formats after the RHT) reads the rotated block without the rotated tensor ever
 * being written. Conventions: cpu_common.h. */
#ifndef LOWPREC_CPU_FWHT_H
#define LOWPREC_CPU_FWHT_H
#include "cpu_common.h"

#define FC 64
#define MAXN 32

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
        if (inverse)
            for (int64_t i = 0; i < ni; i++) v[r][i] = v[r][i] * c;
        else
            for (int64_t i = 0; i < ni; i++) v[r][i] = (v[r][i] * c) * s;
    }
}

#endif
