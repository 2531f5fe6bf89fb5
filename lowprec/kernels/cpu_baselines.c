/* The element-by-element baselines of lowprec.baselines with one per-tensor scale: radix-4 FP4
 * (radix4), LUQ's grid rounded to nearest (fp4_rdn), the uniform INT grid with stochastic rounding
 * (int_sr). Pass 1: max|x| (as the max of the magnitude bits: monotone, NaN/Inf at the top) and the
 * non-finite test; then the scale exactly as the reference computes it; pass 2: every element, the
 * reference's fp32 operations in its order. Conventions: cpu_common.h. */
#include "cpu_common.h"

static inline int floordiv2(int v) { return v >= 0 ? v / 2 : -((1 - v) / 2); } /* floor(v / 2) */

/* radix4: y = a/α, e = floor(log2 max(y, 2^-126)), k = min(floor((e+1)/2), L-1), |Q| = α·4^k for
 * k >= 0 and a > 0, else 0. */
static inline float radix4_elem(float x, float alpha, int lm1) {
    const float a = fabsf(x);
    const float y = a / alpha;
    const float yc = y < 0x1p-126f ? 0x1p-126f : y;
    int k = floordiv2((int)((f_bits(yc) >> 23) & 0xFF) - 127 + 1);
    k = k > lm1 ? lm1 : k;
    const float mag = (k >= 0 && a > 0.0f) ? alpha * pow2_bits(2 * k) : 0.0f;
    return copysignf(mag, x);
}

/* fp4_rdn: y = a/α, lo = α·2^floor(log2 max(y, 1)), |Q| = 0 below α, else min(a >= 1.5·lo ? 2·lo : lo, m). */
static inline float rdn_elem(float x, float m, float alpha) {
    const float a = fabsf(x);
    const float y = a / alpha;
    const float yc = y < 1.0f ? 1.0f : y;
    const float lo = alpha * pow2_bits((int)((f_bits(yc) >> 23) & 0xFF) - 127);
    float mag = a >= 1.5f * lo ? 2.0f * lo : lo;
    mag = y < 1.0f ? 0.0f : (mag < m ? mag : m);
    return copysignf(mag, x);
}

/* int_sr: q = min(floor(a/s + u), qmax), |Q| = q·s. */
static inline float intsr_elem(float x, float u, float s, float qmax) {
    const float a = fabsf(x);
    float q = floorf(a / s + u);
    q = q > qmax ? qmax : q;
    return copysignf(q * s, x);
}

/* One pass over the nest applying EXPR (of xv, and uv = the element's uniform when STOCH). */
#define ELEM_PASS(STOCH, EXPR)                                                                              \
    _Pragma("omp parallel for collapse(2) num_threads(nthreads) if (nthreads > 1 && n0 * n1 * n2 >= 65536)") \
    for (int64_t i0 = 0; i0 < n0; i0++)                                                                     \
        for (int64_t i1 = 0; i1 < n1; i1++) {                                                               \
            const float* xp = x + i0 * xs[0] + i1 * xs[1];                                                  \
            float* op = out + i0 * xs[0] + i1 * xs[1];                                                      \
            const uint64_t ub = (uint64_t)(i0 * us[0] + i1 * us[1]);                                        \
            if (s2 == 1 && (!STOCH || (t2 == 1 && u))) { /* contiguous rows: loops that vectorize */        \
                const float* up = STOCH ? u + ub : 0;                                                       \
                for (int64_t i = 0; i < n2; i++) {                                                          \
                    const float xv = xp[i], uv = STOCH ? up[i] : 0.0f;                                     \
                    (void)uv;                                                                               \
                    op[i] = EXPR;                                                                           \
                }                                                                                           \
            } else if (s2 == 1 && STOCH && !u) { /* uniform index affine in i: the hash vectorizes */     \
                const uint64_t z0 = hash_z0(key, ub), zs = hash_zs((uint64_t)t2);                           \
                for (int64_t i = 0; i < n2; i++) {                                                          \
                    const float xv = xp[i], uv = hash_mix(z0 + (uint64_t)i * zs);                           \
                    op[i] = EXPR;                                                                           \
                }                                                                                           \
            } else {                                                                                        \
                for (int64_t i = 0; i < n2; i++) {                                                          \
                    const uint64_t k = ub + (uint64_t)(i * t2);                                             \
                    const float xv = xp[i * s2], uv = STOCH ? (u ? u[k] : hash_u(key, k)) : 0.0f;         \
                    (void)uv;                                                                               \
                    op[i * s2] = EXPR;                                                                      \
                }                                                                                           \
            }                                                                                               \
        }

/* kind 0 radix4 (param: levels), 1 fp4_rdn (param: L; fmax and e_tiny of the input dtype), 2 int_sr
 * (param: qmax). Returns 0, 1 (a NaN/Inf in x: out is garbage) or 2 (max|x| = 0: the caller returns
 * zeros), -1 for an unknown kind. */
int lp_elem_f32(const float* x, float* out, const float* u, uint64_t key, const int64_t* size, const int64_t* xs,
                const int64_t* us, int kind, int param, float fmax, int e_tiny, int nthreads) {
    const int64_t n0 = size[0], n1 = size[1], n2 = size[2], s2 = xs[2], t2 = us[2];
    uint32_t mb = 0;
    for (int64_t i0 = 0; i0 < n0; i0++)
        for (int64_t i1 = 0; i1 < n1; i1++) {
            const float* xp = x + i0 * xs[0] + i1 * xs[1];
            uint32_t rm = 0;
            for (int64_t i = 0; i < n2; i++) rm = mag_max(rm, xp[i * s2]);
            mb = rm > mb ? rm : mb;
        }
    if (mb >= 0x7F800000u) return 1;
    const float amax = bits_f(mb);
    if (!(amax > 0.0f)) return 2;
    if (kind == 0) { /* α = m·4^-i, i = clamp(floor((floor(log2 m) - e_tiny)/2), 0, L-1) */
        int i = floordiv2(floor_log2f(amax) - e_tiny);
        i = i < 0 ? 0 : (i > param - 1 ? param - 1 : i);
        const float alpha = amax * pow2f(-2 * i);
        const int lm1 = param - 1;
        ELEM_PASS(0, radix4_elem(xv, alpha, lm1))
    } else if (kind == 1) { /* lowprec.luq.luq_scale: m = min(max, fmax), α = m·2^-clamp(floor(log2 m) - e_tiny, 0, L-1) */
        const float m = amax < fmax ? amax : fmax;
        int j = floor_log2f(m) - e_tiny;
        j = j < 0 ? 0 : (j > param - 1 ? param - 1 : j);
        const float alpha = ldexpf(m, -j);
        ELEM_PASS(0, rdn_elem(xv, m, alpha))
    } else if (kind == 2) { /* lowprec.intq.int_step: s = m/qmax, at least the smallest subnormal */
        const float qmax = (float)param;
        float s = amax / qmax;
        s = s < 0x1p-149f ? 0x1p-149f : s;
        ELEM_PASS(1, intsr_elem(xv, uv, s, qmax))
    } else {
        return -1;
    }
    return 0;
}
