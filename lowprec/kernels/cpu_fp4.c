/* Block FP4 formats: NVFP4, MXFP4, block LUQ (lowprec.fp4). Conventions: cpu_common.h. */
#include "cpu_common.h"

static inline float e2m1(float y, float u, int sr) { /* fp4.e2m1_round */
    y = y > 6.0f ? 6.0f : y;
    const float step = y < 2.0f ? 0.5f : (y < 4.0f ? 1.0f : 2.0f);
    const float inv = y < 2.0f ? 2.0f : (y < 4.0f ? 1.0f : 0.5f);
    const float r = y * inv;
    float q;
    if (sr) {
        const float f = floorf(r);
        q = f + (float)(u < r - f);
    } else {
        q = rhe(r);
    }
    return q * step;
}

static inline float e4m3(float t, int up) { /* fp4.e4m3_round, t in [0, 448] */
    int e = floor_log2f(t > 0.0f ? t : 1.0f);
    e = e < -6 ? -6 : e;
    const float r = t * pow2f(3 - e);
    return (up ? ceilf(r) : rhe(r)) * pow2f(e - 3);
}

/* The block formats of lowprec.fp4, vectorized along the tensor's contiguous axis: with blocks
 * along the last dim (inner = 1) the lanes are a block's elements and its scale is one number;
 * otherwise (blocks along an outer dim, inner > 1) the lanes are IC consecutive inner positions, i.e.
 * IC blocks side by side, each with its own scale. Per block: P0, P1, P2 as the format needs them
 * (nvfp4: s_b, d_b = s_b·s_dec; mxfp4: m, 2^-e, 2^e; block LUQ: m, α); then every element is the
 * branch-free `fp4_elem`, the reference's operations in the same order. */
#define IC 64

__attribute__((always_inline)) static inline void fp4_params(float m, float s_enc, float s_dec, int lm1, float* p0,
                                                            float* p1, float* p2, const int FMT, const int SR) {
    if (FMT == 0) {
        float t = m / 6.0f * s_enc;
        t = t > 448.0f ? 448.0f : t;
        *p0 = e4m3(t, SR);
        *p1 = *p0 * s_dec;
    } else if (FMT == 1) {
        int e = floor_log2f(m > 0.0f ? m : 1.0f) - 2;
        e = e < -126 ? -126 : e;
        if (SR) e += m * pow2f(-e) > 6.0f;
        e = e > 127 ? 127 : e;
        *p0 = m;
        *p1 = pow2f(-e);
        *p2 = pow2f(e);
    } else {
        *p0 = m;
        *p1 = m > 0.0f ? m * pow2f(-lm1) : 1.0f; /* = ldexp(m, -(L-1)): one rounding either way */
    }
}


__attribute__((always_inline)) static inline float fp4_elem(float xv, float uv, float p0, float p1, float p2,
                                                           float s_dec, const int FMT, const int SR) {
    const float a = fabsf(xv);
    float mag;
    if (FMT == 0) {
        const float y = p0 > 0.0f ? a / (p0 > 0.0f ? p1 : 1.0f) : 0.0f;
        mag = p0 > 0.0f ? (e2m1(y, uv, SR) * p0) * s_dec : 0.0f;
    } else if (FMT == 1) {
        mag = p0 > 0.0f ? e2m1(a * p1, uv, SR) * p2 : 0.0f;
    } else {
        const float y = a / p1;
        const float under = uv < y ? p1 : 0.0f;
        const float yc = y < 1.0f ? 1.0f : y;
        const float lo = p1 * pow2_bits((int)((f_bits(yc) >> 23) & 0xFF) - 127); /* yc >= 1: normal */
        const float level = uv < (a - lo) / lo ? lo + lo : lo;
        mag = p0 > 0.0f ? (y < 1.0f ? under : level) : 0.0f;
    }
    return copysignf(mag, xv);
}

/* Rows o0..o0+no-1 and columns l0..l0+nl-1 of one block (inner = 1). */
__attribute__((always_inline)) static inline void fp4_block_row(const float* x, float* out, const float* u,
                                                               uint64_t key, const int64_t* us, int64_t length,
                                                               int64_t o0, int64_t no,
                                                               int64_t l0, int64_t nl, float s_enc, float s_dec,
                                                               int lm1, const int FMT, const int SR) {
    float m = 0.0f, p0 = 0.0f, p1 = 1.0f, p2 = 1.0f;
    for (int64_t o = o0; o < o0 + no; o++)
        for (int64_t l = l0; l < l0 + nl; l++) {
            const float a = fabsf(x[o * length + l]);
            m = a > m ? a : m;
        }
    fp4_params(m, s_enc, s_dec, lm1, &p0, &p1, &p2, FMT, SR);
    for (int64_t o = o0; o < o0 + no; o++) {
        const int64_t base = o * length + l0;
        float ub[32];
        if (SR || FMT == 2)
            for (int64_t l = 0; l < nl; l++) {
                const int64_t k = o * us[0] + (l0 + l) * us[1];
                ub[l] = u ? u[k] : hash_u(key, (uint64_t)k);
            }
        else
            for (int64_t l = 0; l < nl; l++) ub[l] = 0.0f;
        for (int64_t l = 0; l < nl; l++) out[base + l] = fp4_elem(x[base + l], ub[l], p0, p1, p2, s_dec, FMT, SR);
    }
}

/* Blocks of `size` along l at inner positions i0..i0+ni-1 (inner > 1), IC of them side by side. */
__attribute__((always_inline)) static inline void fp4_block_cols(const float* x, float* out, const float* u,
                                                                uint64_t key, const int64_t* us, int64_t length,
                                                                int64_t inner,
                                                                int64_t o, int64_t l0, int64_t nl, int64_t i0,
                                                                int64_t ni, float s_enc, float s_dec, int lm1,
                                                                const int FMT, const int SR) {
    float m[IC], p0[IC], p1[IC], p2[IC], ub[IC];
    for (int64_t i = 0; i < ni; i++) m[i] = 0.0f;
    for (int64_t l = l0; l < l0 + nl; l++) {
        const float* xp = x + (o * length + l) * inner + i0;
        for (int64_t i = 0; i < ni; i++) {
            const float a = fabsf(xp[i]);
            m[i] = a > m[i] ? a : m[i];
        }
    }
    for (int64_t i = 0; i < ni; i++) {
        p1[i] = p2[i] = 1.0f;
        fp4_params(m[i], s_enc, s_dec, lm1, &p0[i], &p1[i], &p2[i], FMT, SR);
    }
    for (int64_t l = l0; l < l0 + nl; l++) {
        const int64_t base = (o * length + l) * inner + i0;
        if (SR || FMT == 2)
            for (int64_t i = 0; i < ni; i++) {
                const int64_t k = o * us[0] + l * us[1] + (i0 + i) * us[2];
                ub[i] = u ? u[k] : hash_u(key, (uint64_t)k);
            }
        else
            for (int64_t i = 0; i < ni; i++) ub[i] = 0.0f;
        for (int64_t i = 0; i < ni; i++)
            out[base + i] = fp4_elem(x[base + i], ub[i], p0[i], p1[i], p2[i], s_dec, FMT, SR);
    }
}

#define FP4_SPECIAL(NAME, FMT, SR)                                                                          \
    static void NAME(const float* x, float* out, const float* u, uint64_t key, const int64_t* us, int64_t outer, \
                     int64_t length, int64_t inner, int size, int rows, int lm1, float s_enc, float s_dec,          \
                     int nthreads) {                                                                         \
        const int64_t nob = (outer + rows - 1) / rows, nb = (length + size - 1) / size;                     \
        const int64_t nic = (inner + IC - 1) / IC;                                                           \
        _Pragma("omp parallel for collapse(2) num_threads(nthreads) if (nthreads > 1 && outer * length * inner >= 65536)") \
        for (int64_t ob = 0; ob < nob; ob++)                                                                 \
            for (int64_t b = 0; b < nb; b++) {                                                               \
                const int64_t o0 = ob * rows, l0 = b * size;                                                 \
                const int64_t no = o0 + rows <= outer ? rows : outer - o0;                                   \
                const int64_t nl = l0 + size <= length ? size : length - l0;                                 \
                if (inner == 1) {                                                                            \
                    fp4_block_row(x, out, u, key, us, length, o0, no, l0, nl, s_enc, s_dec, lm1, FMT, SR);       \
                } else {                                                                                     \
                    for (int64_t c = 0; c < nic; c++) {                                                      \
                        const int64_t i0 = c * IC, ni = i0 + IC <= inner ? IC : inner - i0;                  \
                        fp4_block_cols(x, out, u, key, us, length, inner, o0, l0, nl, i0, ni, s_enc, s_dec, lm1, \
                                       FMT, SR);                                                             \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
    }
FP4_SPECIAL(fp4_nv_rtn, 0, 0)
FP4_SPECIAL(fp4_nv_sr, 0, 1)
FP4_SPECIAL(fp4_mx_rtn, 1, 0)
FP4_SPECIAL(fp4_mx_sr, 1, 1)
FP4_SPECIAL(fp4_bluq, 2, 1)

/* x contiguous [outer, length, inner], blocks of `size` along length (`rows` > 1: size x size tiles of
 * [outer, length], inner = 1). us: the uniform index of element (o, l, i) is o·us[0] + l·us[1] + i·us[2]
 * (its position in x's logical C order: a transposed view is read in memory order, no copy). Returns 1
 * when x holds a NaN/Inf, -1 for an unknown format. */
int lp_fp4_f32(const float* x, float* out, const float* u, uint64_t key, const int64_t* us, int64_t outer,
               int64_t length, int64_t inner, int size, int rows, int fmt, int sr, int lm1, int nthreads) {
    const int64_t n = outer * length * inner;
    uint32_t mb = 0;
    for (int64_t k = 0; k < n; k++) {
        const uint32_t v = f_bits(x[k]) & 0x7FFFFFFFu;
        mb = v > mb ? v : mb;
    }
    if (mb >= 0x7F800000u) return 1;
    if (size > 32 || (rows > 1 && (inner != 1 || rows > 16))) return -1;
    float s_enc = 2688.0f / bits_f(mb); /* 6 * 448 over the tensor max (nvfp4) */
    s_enc = s_enc > 0x1.fffffep127f ? 0x1.fffffep127f : s_enc;
    const float s_dec = 1.0f / s_enc;
    if (fmt == 0 && !sr) fp4_nv_rtn(x, out, u, key, us, outer, length, inner, size, rows, lm1, s_enc, s_dec, nthreads);
    else if (fmt == 0) fp4_nv_sr(x, out, u, key, us, outer, length, inner, size, rows, lm1, s_enc, s_dec, nthreads);
    else if (fmt == 1 && !sr) fp4_mx_rtn(x, out, u, key, us, outer, length, inner, size, rows, lm1, s_enc, s_dec, nthreads);
    else if (fmt == 1) fp4_mx_sr(x, out, u, key, us, outer, length, inner, size, rows, lm1, s_enc, s_dec, nthreads);
    else if (fmt == 2) fp4_bluq(x, out, u, key, us, outer, length, inner, size, rows, lm1, s_enc, s_dec, nthreads);
    else return -1;
    return 0;
}
