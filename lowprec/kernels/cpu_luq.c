/* LUQ (lowprec.luq through lowprec.kernels.cpu.luq_core). Conventions: cpu_common.h. */
#include "cpu_common.h"

/* cpu.luq_core for one element: a = min(|x|, m), y = a/α, lo = α·2^floor(log2 max(y, 1)),
 * |Q| = lo·([u < y] + [u < (a - lo)/lo]). */
static inline float luq_elem(float x, float u, float m, float alpha) {
    float a = fabsf(x);
    a = a < m ? a : m;
    float y = a / alpha;
    float yc = y < 1.0f ? 1.0f : y;
    float lo = bits_f(f_bits(yc) & 0x7F800000u) * alpha;
    float r = (a - lo) / lo;
    float cnt = (float)(u < y) + (float)(u < r);
    return copysignf(lo * cnt, x);
}

void lp_luq_f32(const float* x, float* out, const float* u, uint64_t key, const int64_t* size,
                const int64_t* xs, const int64_t* us, float m, float alpha, int nthreads) {
    const int64_t n0 = size[0], n1 = size[1], n2 = size[2], s2 = xs[2], t2 = us[2];
#pragma omp parallel for collapse(2) num_threads(nthreads) if (nthreads > 1 && n0 * n1 * n2 >= 65536)
    for (int64_t i0 = 0; i0 < n0; i0++) {
        for (int64_t i1 = 0; i1 < n1; i1++) {
            const float* xp = x + i0 * xs[0] + i1 * xs[1];
            float* op = out + i0 * xs[0] + i1 * xs[1];
            const uint64_t ub = (uint64_t)(i0 * us[0] + i1 * us[1]);
            if (s2 == 1 && t2 == 1 && u) { /* the common contiguous case: a loop the compiler vectorizes */
                const float* up = u + ub;
                for (int64_t i = 0; i < n2; i++) op[i] = luq_elem(xp[i], up[i], m, alpha);
            } else if (s2 == 1 && !u) { /* contiguous in memory, uniform index affine in i (a transposed
                                           Linear δ: t2 = tokens): the hash vectorizes too */
                const uint64_t z0 = hash_z0(key, ub), zs = hash_zs((uint64_t)t2);
                for (int64_t i = 0; i < n2; i++) op[i] = luq_elem(xp[i], hash_mix(z0 + (uint64_t)i * zs), m, alpha);
            } else {
                for (int64_t i = 0; i < n2; i++) {
                    const uint64_t k = ub + (uint64_t)(i * t2);
                    op[i * s2] = luq_elem(xp[i * s2], u ? u[k] : hash_u(key, k), m, alpha);
                }
            }
        }
    }
}

/* LUQ with the top level m = min(top, fmax) known: α = m·2^-j with j = clamp(floor(log2 m) - e_tiny, 0,
 * L-1) (lowprec.luq.luq_alpha), then lp_luq_f32 (x == out allowed: element i is read before it is
 * written). Returns 2 (out untouched) when m is not > 0. */
int lp_luq_top_f32(const float* x, float* out, const float* u, uint64_t key, const int64_t* size, const int64_t* xs,
                   const int64_t* us, float top, float fmax, int L, int e_tiny, int nthreads) {
    const float m = top < fmax ? top : fmax;
    if (!(m > 0.0f)) return 2;
    int e;
    frexpf(m, &e);
    int j = (e - 1) - e_tiny;
    j = j < 0 ? 0 : (j > L - 1 ? L - 1 : j);
    lp_luq_f32(x, out, u, key, size, xs, us, m, ldexpf(m, -j), nthreads);
    return 0;
}

/* cpu.luq in full: max|x| and the non-finite test (pass 1, skipped when max_abs >= 0 is given: then
 * pass 2 tests), pass 2 = lp_luq_top_f32 with max|x| or max_abs. Returns 0, 1 (a NaN/Inf in x: out is
 * garbage, the caller raises or zeros) or 2 (m = 0: out untouched, the caller returns zeros). */
int lp_luq_auto_f32(const float* x, float* out, const float* u, uint64_t key, const int64_t* size, const int64_t* xs,
                    const int64_t* us, float max_abs, float fmax, int L, int e_tiny, int nthreads) {
    const int64_t n0 = size[0], n1 = size[1], n2 = size[2], s2 = xs[2];
    float m = max_abs;
    if (max_abs < 0.0f) { /* max|x| as the max of the magnitude bits: monotone, and NaN/Inf at the top */
        uint32_t mb = 0;
        for (int64_t i0 = 0; i0 < n0; i0++)
            for (int64_t i1 = 0; i1 < n1; i1++) {
                const float* xp = x + i0 * xs[0] + i1 * xs[1];
                uint32_t rm = 0;
                if (s2 == 1) {
                    for (int64_t i = 0; i < n2; i++) rm = mag_max(rm, xp[i]);
                } else {
                    for (int64_t i = 0; i < n2; i++) rm = mag_max(rm, xp[i * s2]);
                }
                mb = rm > mb ? rm : mb;
            }
        if (mb >= 0x7F800000u) return 1;
        m = bits_f(mb);
    }
    if (lp_luq_top_f32(x, out, u, key, size, xs, us, m, fmax, L, e_tiny, nthreads)) return 2;
    if (max_abs >= 0.0f) { /* the non-finite test pass 1 did not make */
        for (int64_t i0 = 0; i0 < n0; i0++)
            for (int64_t i1 = 0; i1 < n1; i1++)
                for (int64_t i = 0; i < n2; i++)
                    if (!(fabsf(x[i0 * xs[0] + i1 * xs[1] + i * s2]) <= 0x1.fffffep127f)) return 1;
    }
    return 0;
}
