/* Block FP4 formats: NVFP4, MXFP4, block LUQ (lowprec.fp4). Conventions: cpu_common.h. */
#include <stdlib.h>

#include "cpu_fwht.h"

static inline float e2m1(float y, float u, int sr) { /* fp4.e2m1_round */
    y = y > 6.0f ? 6.0f : y;
    const float step = y < 2.0f ? 0.5f : (y < 4.0f ? 1.0f : 2.0f);
    if (!sr) {
        /* rhe(y / step) * step in two additions: y + step·2^23 lies in [2^23·step, 2^24·step), whose
         * spacing is step, so the sum rounds y half-to-even onto the step grid (y < 4·step here) and
         * subtracting step·2^23 back is exact. */
        const float big = step * 8388608.0f;
        return (y + big) - big;
    }
    const float inv = y < 2.0f ? 2.0f : (y < 4.0f ? 1.0f : 0.5f);
    const float r = y * inv;
    const float f = floorf(r);
    return (f + (float)(u < r - f)) * step;
}

/* The block formats of lowprec.fp4, vectorized along the tensor's contiguous axis. Blocks along the
 * last dim (inner = 1): G blocks at a time (across row ends when whole blocks fill every row), their
 * maxima and scales with the blocks in the lanes, then their elements with a block's elements in the
 * lanes (a row's partial last block, and the tail, one by one). Blocks along an outer dim (inner > 1):
 * the lanes are IC consecutive inner positions, i.e. IC blocks side by side, each with its own scale.
 * Per block: P0, P1, P2 as the format needs them (nvfp4: s_b, d_b = s_b·s_dec; mxfp4: m, 2^-e, 2^e;
 * block LUQ: m, α); then every element is the branch-free `fp4_elem`, the reference's operations in
 * the same order.
 *
 * A block's max|x| is the max of its magnitude bits (the same number for finite values; a NaN/Inf
 * reads >= 0x7F800000): the NaN/Inf test is that max, so MXFP4 and block LUQ read x in one pass (a
 * block holding one is not written and the call returns 1: its output is discarded). */
#define IC 64
#define G 16
#define NONFINITE 0x7F800000u

/* The block parameters from mb = max|x| as bits, branch-free (lanes = blocks). floor(log2 v) is read
 * from the exponent field: for a subnormal v that gives -127, not v's own exponent (< -126), and
 * both clamp to the same value (NVFP4's E4M3 exponent at -6; MXFP4's e = floor(log2 m) - 2 at -126),
 * so the powers of two below are normal numbers (pow2_bits). c2 = 2^-(L-1) (block LUQ). */
__attribute__((always_inline)) static inline void fp4_params(uint32_t mb, float s_enc, float s_dec, float c2,
                                                            float* p0, float* p1, float* p2, const int FMT,
                                                            const int SR) {
    const float m = bits_f(mb);
    if (FMT == 0) { /* fp4.e4m3_round of t in [0, 448], up for SR */
        float t = m / 6.0f * s_enc;
        t = t > 448.0f ? 448.0f : t;
        int e = (int)(f_bits(t > 0.0f ? t : 1.0f) >> 23) - 127;
        e = e < -6 ? -6 : e;
        const float r = t * pow2_bits(3 - e);
        *p0 = (SR ? ceilf(r) : rhe(r)) * pow2_bits(e - 3);
        *p1 = *p0 * s_dec;
        *p2 = 1.0f;
    } else if (FMT == 1) {
        int e = (int)(f_bits(m > 0.0f ? m : 1.0f) >> 23) - 129;
        e = e < -126 ? -126 : e;
        if (SR) e += m * pow2_bits(-e) > 6.0f; /* e <= 126: m finite, so floor(log2 m) - 2 <= 125 */
        *p0 = m;
        *p1 = pow2_bits(-e);
        *p2 = pow2_bits(e);
    } else {
        *p0 = m;
        *p1 = m > 0.0f ? m * c2 : 1.0f; /* = ldexp(m, -(L-1)): one rounding either way */
        *p2 = 1.0f;
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

/* The uniform index of row o's first element: o = hi·R + lo with R = us[3] rows per group, hi·us[4] +
 * lo·us[0] (a convolution's δ as [C_out, N, H·W] read in NCHW memory order: rows (n, c), R = C_out);
 * one level, o·us[0], when us[4] = R·us[0]. */
static inline int64_t row_u(int64_t o, const int64_t* us) { return (o / us[3]) * us[4] + (o % us[3]) * us[0]; }

/* ub[0, n) = the uniforms of indices k0 + i·ks: the given ones (u), or hashed from key (zeros without SR). */
__attribute__((always_inline)) static inline void fp4_uniforms(float* restrict ub, int64_t n, const float* restrict u,
                                                              uint64_t key, int64_t k0, int64_t ks, const int SR) {
    if (SR && u) {
        for (int64_t i = 0; i < n; i++) ub[i] = u[k0 + i * ks];
    } else if (SR) {
        const uint64_t z0 = hash_z0(key, (uint64_t)k0), zs = hash_zs((uint64_t)ks);
        for (int64_t i = 0; i < n; i++) ub[i] = hash_mix(z0 + (uint64_t)i * zs);
    } else {
        for (int64_t i = 0; i < n; i++) ub[i] = 0.0f;
    }
}

/* G full blocks of SIZE back to back at x[0, G·SIZE) (inner = 1; they may span row ends); kb[g]: the
 * uniform index of block g's first element, ks: its step along the block (kb NULL: the index runs on
 * from k0 in steps of ks through all G blocks, one loop). Returns 1, writing nothing, when one holds a
 * NaN/Inf. */
__attribute__((always_inline)) static inline int fp4_group(const float* restrict x, float* restrict out,
                                                          const float* restrict u, uint64_t key, int64_t k0,
                                                          const int64_t* kb, int64_t ks, float s_enc, float s_dec,
                                                          float c2, const int FMT, const int SR, const int SIZE) {
    uint32_t mb[G], top = 0;
    float p0[G], p1[G], p2[G];
    float ub[G * 32] __attribute__((aligned(64)));
    for (int g = 0; g < G; g++) {
        uint32_t m = 0;
        for (int j = 0; j < SIZE; j++) m = mag_max(m, x[g * SIZE + j]);
        mb[g] = m;
    }
    for (int g = 0; g < G; g++) top = mb[g] > top ? mb[g] : top;
    if (top >= NONFINITE) return 1;
    for (int g = 0; g < G; g++) fp4_params(mb[g], s_enc, s_dec, c2, &p0[g], &p1[g], &p2[g], FMT, SR);
    if (SR && !kb) {
        fp4_uniforms(ub, G * SIZE, u, key, k0, ks, SR);
    } else if (SR && u) {
        for (int g = 0; g < G; g++)
            for (int j = 0; j < SIZE; j++) ub[g * SIZE + j] = u[kb[g] + j * ks];
    } else if (SR) { /* one hash step for all blocks, each block's own start */
        const uint64_t zs = hash_zs((uint64_t)ks);
        for (int g = 0; g < G; g++) {
            const uint64_t z0 = hash_z0(key, (uint64_t)kb[g]);
            for (int j = 0; j < SIZE; j++) ub[g * SIZE + j] = hash_mix(z0 + (uint64_t)j * zs);
        }
    }
    for (int g = 0; g < G; g++)
        for (int j = 0; j < SIZE; j++)
            out[g * SIZE + j] = fp4_elem(x[g * SIZE + j], SR ? ub[g * SIZE + j] : 0.0f, p0[g], p1[g], p2[g], s_dec,
                                         FMT, SR);
    return 0;
}

/* out[0, nl) from x[0, nl) with one block's parameters, element l's uniform at k0 + l·ks (nl <= 32). */
__attribute__((always_inline)) static inline void fp4_run(const float* x, float* out, int64_t nl, const float* u,
                                                         uint64_t key, int64_t k0, int64_t ks, float p0, float p1,
                                                         float p2, float s_dec, const int FMT, const int SR) {
    float ub[32];
    fp4_uniforms(ub, nl, u, key, k0, ks, SR);
    for (int64_t l = 0; l < nl; l++) out[l] = fp4_elem(x[l], ub[l], p0, p1, p2, s_dec, FMT, SR);
}

/* Rows o0..o0+no-1 and columns l0..l0+nl-1 of one block (inner = 1): a tile, or one block of a row. */
__attribute__((always_inline)) static inline int fp4_block_row(const float* x, float* out, const float* u,
                                                              uint64_t key, const int64_t* us, int64_t length,
                                                              int64_t o0, int64_t no, int64_t l0, int64_t nl,
                                                              float s_enc, float s_dec, float c2, const int FMT,
                                                              const int SR) {
    uint32_t mb = 0;
    float p0, p1, p2;
    for (int64_t o = o0; o < o0 + no; o++)
        for (int64_t l = l0; l < l0 + nl; l++) mb = mag_max(mb, x[o * length + l]);
    if (mb >= NONFINITE) return 1;
    fp4_params(mb, s_enc, s_dec, c2, &p0, &p1, &p2, FMT, SR);
    for (int64_t o = o0; o < o0 + no; o++)
        fp4_run(x + o * length + l0, out + o * length + l0, nl, u, key, row_u(o, us) + l0 * us[1], us[1], p0, p1, p2,
                s_dec, FMT, SR);
    return 0;
}

/* Blocks of `size` along l at inner positions i0..i0+ni-1 (inner > 1), IC of them side by side; their
 * element (l, i) read at xb[(l - l0)·xr + i] (x itself, or a buffer of rotated rows: lp_rht_nvfp4_f32). */
__attribute__((always_inline)) static inline int fp4_block_cols(const float* xb, int64_t xr, float* out,
                                                               const float* u, uint64_t key, const int64_t* us,
                                                               int64_t length, int64_t inner, int64_t o, int64_t l0,
                                                               int64_t nl, int64_t i0, int64_t ni, float s_enc,
                                                               float s_dec, float c2, const int FMT, const int SR) {
    uint32_t mb[IC], top = 0;
    float p0[IC], p1[IC], p2[IC], ub[IC];
    for (int64_t i = 0; i < ni; i++) mb[i] = 0;
    for (int64_t l = 0; l < nl; l++) {
        const float* xp = xb + l * xr;
        for (int64_t i = 0; i < ni; i++) /* not mag_max: GCC 12 then spills in the strided-gather variant */
            mb[i] = mag_bits(xp[i]) > mb[i] ? mag_bits(xp[i]) : mb[i];
    }
    for (int64_t i = 0; i < ni; i++) top = mb[i] > top ? mb[i] : top;
    if (top >= NONFINITE) return 1;
    for (int64_t i = 0; i < ni; i++) fp4_params(mb[i], s_enc, s_dec, c2, &p0[i], &p1[i], &p2[i], FMT, SR);
    for (int64_t l = l0; l < l0 + nl; l++) {
        const int64_t base = (o * length + l) * inner + i0;
        const float* xp = xb + (l - l0) * xr;
        fp4_uniforms(ub, ni, u, key, row_u(o, us) + l * us[1] + i0 * us[2], us[2], SR);
        for (int64_t i = 0; i < ni; i++)
            out[base + i] = fp4_elem(xp[i], ub[i], p0[i], p1[i], p2[i], s_dec, FMT, SR);
    }
    return 0;
}

/* Work item `gi` of the whole blocks of a [outer, length] matrix (inner = 1, rows = 1, length % size == 0:
 * no block crosses a row end) read back to back in memory: group gi < ng = its G blocks, else the
 * blocks after the last group one by one. Block b sits in row o = b / (length/size) at l = (b mod
 * length/size)·size, its first element's uniform index row_u(o) + l·us[1], so a row short of G blocks
 * (a Linear's C_out read in δ's own layout) still fills the lanes. */
__attribute__((always_inline)) static inline int fp4_flat_item(const float* x, float* out, const float* u,
                                                              uint64_t key, const int64_t* us, int64_t length,
                                                              int64_t nblocks, int64_t gi, int64_t ng, int size,
                                                              float s_enc, float s_dec, float c2, const int FMT,
                                                              const int SR) {
    const int64_t bpr = length / size;
    if (gi < ng) {
        int64_t kb[G], o = gi * G / bpr, r = gi * G - o * bpr; /* block gi·G: row o, r-th block of it */
        /* one affine run: the G blocks inside one row, or rows back to back in the uniform index too */
        const int run = r + G <= bpr || (us[0] == length * us[1] && us[4] == us[3] * us[0]);
        for (int g = 0; g < G; g++) {
            kb[g] = row_u(o, us) + r * size * us[1];
            if (++r == bpr) r = 0, o++;
        }
        const int64_t off = gi * G * size;
        const int64_t* k = run ? 0 : kb;
        if (size == 16) return fp4_group(x + off, out + off, u, key, kb[0], k, us[1], s_enc, s_dec, c2, FMT, SR, 16);
        return fp4_group(x + off, out + off, u, key, kb[0], k, us[1], s_enc, s_dec, c2, FMT, SR, 32);
    }
    int bad = 0;
    for (int64_t b = ng * G; b < nblocks; b++) {
        const int64_t o = b / bpr;
        bad |= fp4_block_row(x, out, u, key, us, length, o, 1, (b - o * bpr) * size, size, s_enc, s_dec, c2, FMT,
                             SR);
    }
    return bad;
}

/* One row's work item `gi` (inner = 1, rows = 1, length % size != 0): group gi < ng, else the blocks
 * after the groups (the last one partial). */
__attribute__((always_inline)) static inline int fp4_row_item(const float* x, float* out, const float* u,
                                                             uint64_t key, const int64_t* us, int64_t length,
                                                             int64_t o, int64_t gi, int64_t ng, int size,
                                                             float s_enc, float s_dec, float c2, const int FMT,
                                                             const int SR) {
    if (gi < ng) {
        const int64_t l0 = gi * G * size, off = o * length + l0;
        const int64_t k0 = row_u(o, us) + l0 * us[1];
        if (size == 16) return fp4_group(x + off, out + off, u, key, k0, 0, us[1], s_enc, s_dec, c2, FMT, SR, 16);
        return fp4_group(x + off, out + off, u, key, k0, 0, us[1], s_enc, s_dec, c2, FMT, SR, 32);
    }
    int bad = 0;
    for (int64_t l0 = ng * G * size; l0 < length; l0 += size)
        bad |= fp4_block_row(x, out, u, key, us, length, o, 1, l0, l0 + size <= length ? size : length - l0, s_enc,
                             s_dec, c2, FMT, SR);
    return bad;
}

#define FP4_SPECIAL(NAME, FMT, SR)                                                                          \
    static int NAME(const float* x, float* out, const float* u, uint64_t key, const int64_t* us, int64_t outer, \
                    int64_t length, int64_t inner, int size, int rows, float c2, float s_enc, float s_dec,        \
                    int nthreads) {                                                                          \
        const int par = nthreads > 1 && outer * length * inner >= 65536;                                     \
        int bad = 0;                                                                                         \
        if (inner == 1 && rows == 1 && length % size == 0) {                                                 \
            const int64_t nblocks = outer * (length / size);                                                 \
            const int64_t ng = size == 16 || size == 32 ? nblocks / G : 0;                                   \
            _Pragma("omp parallel for num_threads(nthreads) if (par) reduction(|:bad)")                      \
            for (int64_t gi = 0; gi <= ng; gi++)                                                             \
                bad |= fp4_flat_item(x, out, u, key, us, length, nblocks, gi, ng, size, s_enc, s_dec, c2, FMT, SR); \
            return bad;                                                                                      \
        }                                                                                                    \
        if (inner == 1 && rows == 1) {                                                                       \
            const int64_t ng = size == 16 || size == 32 ? length / (G * size) : 0;                           \
            _Pragma("omp parallel for collapse(2) num_threads(nthreads) if (par) reduction(|:bad)")           \
            for (int64_t o = 0; o < outer; o++)                                                              \
                for (int64_t gi = 0; gi <= ng; gi++)                                                         \
                    bad |= fp4_row_item(x, out, u, key, us, length, o, gi, ng, size, s_enc, s_dec, c2, FMT, SR); \
            return bad;                                                                                      \
        }                                                                                                    \
        const int64_t nob = (outer + rows - 1) / rows, nb = (length + size - 1) / size;                     \
        const int64_t nic = (inner + IC - 1) / IC;                                                           \
        _Pragma("omp parallel for collapse(2) num_threads(nthreads) if (par) reduction(|:bad)")              \
        for (int64_t ob = 0; ob < nob; ob++)                                                                 \
            for (int64_t b = 0; b < nb; b++) {                                                               \
                const int64_t o0 = ob * rows, l0 = b * size;                                                 \
                const int64_t no = o0 + rows <= outer ? rows : outer - o0;                                   \
                const int64_t nl = l0 + size <= length ? size : length - l0;                                 \
                if (inner == 1) {                                                                            \
                    bad |= fp4_block_row(x, out, u, key, us, length, o0, no, l0, nl, s_enc, s_dec, c2, FMT, SR); \
                } else {                                                                                     \
                    for (int64_t c = 0; c < nic; c++) {                                                      \
                        const int64_t i0 = c * IC, ni = i0 + IC <= inner ? IC : inner - i0;                  \
                        bad |= fp4_block_cols(x + (o0 * length + l0) * inner + i0, inner, out, u, key, us, length, \
                                              inner, o0, l0, nl, i0, ni, s_enc, s_dec, c2, FMT, SR);         \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
        return bad;                                                                                          \
    }
FP4_SPECIAL(fp4_nv_rtn, 0, 0)
FP4_SPECIAL(fp4_nv_sr, 0, 1)
FP4_SPECIAL(fp4_mx_rtn, 1, 0)
FP4_SPECIAL(fp4_mx_sr, 1, 1)
FP4_SPECIAL(fp4_bluq, 2, 1)

/* NVFP4's tensor scale from mb = max|x| as bits (finite). */
static void nvfp4_tensor_scale(uint32_t mb, float* s_enc, float* s_dec) {
    float e = 2688.0f / bits_f(mb); /* 6 * 448 over the tensor max */
    e = e > 0x1.fffffep127f ? 0x1.fffffep127f : e;
    *s_enc = e;
    *s_dec = 1.0f / e;
}

/* x contiguous [outer, length, inner], blocks of `size` along length (`rows` > 1: size x size tiles of
 * [outer, length], inner = 1). us: the uniform index of element (o, l, i) is row_u(o) + l·us[1] + i·us[2]
 * (its position in x's logical C order: a transposed view is read in memory order, no copy). Returns 1
 * when x holds a NaN/Inf (out is then garbage), -1 for an unknown format. Only NVFP4 reads x in a
 * first pass (max|x| for its tensor scale); the others test each block as they go. */
int lp_fp4_f32(const float* x, float* out, const float* u, uint64_t key, const int64_t* us, int64_t outer,
               int64_t length, int64_t inner, int size, int rows, int fmt, int sr, int lm1, int nthreads) {
    if (size < 1 || size > 32 || (rows > 1 && (inner != 1 || rows > 16)) || fmt < 0 || fmt > 2) return -1;
    float s_enc = 1.0f, s_dec = 1.0f;
    if (fmt == 0) {
        const int64_t n = outer * length * inner;
        uint32_t mb = 0;
        for (int64_t k = 0; k < n; k++) mb = mag_max(mb, x[k]);
        if (mb >= NONFINITE) return 1;
        nvfp4_tensor_scale(mb, &s_enc, &s_dec);
    }
    const float c2 = pow2f(-lm1);
#define FP4_ARGS x, out, u, key, us, outer, length, inner, size, rows, c2, s_enc, s_dec, nthreads
    if (fmt == 0) return sr ? fp4_nv_sr(FP4_ARGS) : fp4_nv_rtn(FP4_ARGS);
    if (fmt == 1) return sr ? fp4_mx_sr(FP4_ARGS) : fp4_mx_rtn(FP4_ARGS);
    return fp4_bluq(FP4_ARGS);
#undef FP4_ARGS
}

/* Block (o, b) of n rows at columns i0..i0+ni-1 of x rotated (cpu_fwht.h), then NVFP4 over it (SR as
 * given: IS_SR), or (MAX_ONLY) only the max of its magnitude bits folded into *mb. */
__attribute__((always_inline)) static inline int rht_nv_item(const float* x, float* out, const float* sg,
                                                            const float* u, uint64_t key, const int64_t* us,
                                                            int64_t o, int64_t b, int64_t n_in, int64_t n_out,
                                                            int64_t inner, int64_t i0, const int64_t ni, const int n,
                                                            float c, float s_enc, float s_dec, uint32_t* mb,
                                                            const int MAX_ONLY, const int IS_SR) {
    float v[MAXN][FC];
    fwht_cols_v(x, v, sg, o, b, n_in, inner, i0, ni, n, 0, c);
    if (MAX_ONLY) {
        uint32_t m = *mb;
        for (int r = 0; r < n; r++)
            for (int64_t i = 0; i < ni; i++) m = mag_max(m, v[r][i]);
        *mb = m;
        return 0;
    }
    int bad = 0;
    for (int h = 0; h < n; h += 16) /* NVFP4's blocks of 16 */
        bad |= fp4_block_cols(&v[h][0], FC, out, u, key, us, n_out, inner, o, b * n + h, 16, i0, ni, s_enc, s_dec,
                              1.0f, 0, IS_SR);
    return bad;
}

#define RHT_NV_ITEM(MAX_ONLY, IS_SR)                                                                           \
    (ni == FC && n == 16                                                                                        \
         ? rht_nv_item(x, out, signs, u, key, us, o, b, n_in, n_out, inner, i0, FC, 16, c, s_enc, s_dec, &mb,   \
                       MAX_ONLY, IS_SR)                                                                        \
         : rht_nv_item(x, out, signs, u, key, us, o, b, n_in, n_out, inner, i0, ni, n, c, s_enc, s_dec, &mb,    \
                       MAX_ONLY, IS_SR))

/* NVFP4 of lowprec.hadamard.block_rht(x, signs) along its blocks (lowprec.kernels.cpu.rht_nvfp4): x
 * contiguous [outer, n_in, inner] (inner > 1), rotated along the middle dim in blocks of n (16 or 32;
 * the tail zero-padded), then NVFP4 (blocks of 16 along the same dim; n = 32 holds two) into out
 * contiguous [outer, n_out = ceil(n_in/n)·n, inner]; us: the uniform strides of out's elements (as
 * lp_fp4_f32's). The numbers of lp_fwht_f32 then lp_fp4_f32, without the rotated tensor in memory: each
 * block is rotated twice, as the tensor scale is the max over the whole rotated tensor (a first pass
 * that writes nothing). Returns 1 when the rotation holds a NaN/Inf, -1 for an unsupported n. */
int lp_rht_nvfp4_f32(const float* x, float* out, const float* signs, const float* u, uint64_t key,
                     const int64_t* us, int64_t outer, int64_t n_in, int64_t inner, int n, int sr, int nthreads) {
    if ((n != 16 && n != 32) || inner < 2) return -1;
    const float c = (float)(1.0 / sqrt((double)n));
    const int64_t nb = (n_in + n - 1) / n, n_out = nb * n, nic = (inner + IC - 1) / IC;
    const int par = nthreads > 1 && outer * n_out * inner >= 65536;
    float s_enc = 1.0f, s_dec = 1.0f;
    uint32_t top = 0;
#pragma omp parallel for collapse(3) num_threads(nthreads) if (par) reduction(max : top)
    for (int64_t o = 0; o < outer; o++)
        for (int64_t b = 0; b < nb; b++)
            for (int64_t ic = 0; ic < nic; ic++) {
                const int64_t i0 = ic * IC, ni = i0 + IC <= inner ? IC : inner - i0;
                uint32_t mb = 0;
                RHT_NV_ITEM(1, 0);
                top = mb > top ? mb : top;
            }
    if (top >= NONFINITE) return 1;
    nvfp4_tensor_scale(top, &s_enc, &s_dec);
    int bad = 0;
#pragma omp parallel for collapse(3) num_threads(nthreads) if (par) reduction(| : bad)
    for (int64_t o = 0; o < outer; o++)
        for (int64_t b = 0; b < nb; b++)
            for (int64_t ic = 0; ic < nic; ic++) {
                const int64_t i0 = ic * IC, ni = i0 + IC <= inner ? IC : inner - i0;
                uint32_t mb = 0;
                bad |= sr ? RHT_NV_ITEM(0, 1) : RHT_NV_ITEM(0, 0);
            }
    return bad;
}
#undef RHT_NV_ITEM

/* One block of 16 (NVFP4), x -> out, its uniforms at k0 + j·ks; 1 (nothing written) for a NaN/Inf. */
__attribute__((always_inline)) static inline int nv_block(const float* x, float* out, const float* u, uint64_t key,
                                                         int64_t k0, int64_t ks, float s_enc, float s_dec,
                                                         const int SR) {
    uint32_t mb = 0;
    float p0, p1, p2;
    for (int j = 0; j < 16; j++) mb = mag_max(mb, x[j]);
    if (mb >= NONFINITE) return 1;
    fp4_params(mb, s_enc, s_dec, 1.0f, &p0, &p1, &p2, 0, SR);
    fp4_run(x, out, 16, u, key, k0, ks, p0, p1, p2, s_dec, 0, SR);
    return 0;
}

#if FWHT_ROW_VECTORS
/* Block t_in (a multiple of 16) of image token range of column k's row of lp_im2col_fwht_f32's matrix in the
 * geometry lp_im2col_rht_nvfp4_f32 takes (n = 16, stride 1, Wo = W, each image's Ho·Wo tokens whole
 * blocks): 16 consecutive floats of x from offset base + t_in (base: the image's plane of channel c
 * shifted by (i·dh - ph)·W + j·dw - pw, may be < 0), the lanes outside the image zeroed (tk: -1 where
 * inside), rotated in registers: the values im2col_rht_row computes, by the same operations. A block that
 * would reach outside x (size floats) is read lane by lane. */
__attribute__((always_inline)) static inline vf im2col_rht_block(const float* x, const int32_t* tk, int64_t base,
                                                                int64_t t_in, int64_t size, vf cv, vf s0) {
    vi m;
    memcpy(&m, tk + t_in, sizeof(vi));
    const int64_t o = base + t_in;
    vf v;
    if (o >= 0 && o + 16 <= size) {
        memcpy(&v, x + o, sizeof(vf));
        v = (vf)((vi)v & m);
    } else { /* only the lanes inside the image are read (they are inside x) */
        for (int l = 0; l < 16; l++) v[l] = m[l] ? x[o + l] : 0.0f;
    }
    return (fwht16_v(v) * cv) * s0;
}

/* Column k's (c, i, j) geometry: its mask row in tab and the shift of x's planes. */
#define IM2COL_COLUMN(k)                                                                                       \
    const int64_t N = g[0], C = g[1], H = g[2], W = g[3], kh = g[4], kw = g[5], HW = g[12] * g[13];           \
    const int64_t ch = (k) / (kh * kw), i = (k) % (kh * kw) / kw, j = (k) % kw, size = N * C * H * W;         \
    const int64_t shift = (i * g[10] - g[8]) * W + j * g[11] - g[9];                                           \
    const int32_t* tk = tab + (i * kw + j) * HW;                                                              \
    vf s0, cv = vsplat(c);                                                                                    \
    memcpy(&s0, sg, sizeof(vf))

/* max|.| (as bits) of column k's rotated row, nothing written. */
static uint32_t im2col_rht_row_max(const float* x, const int64_t* g, const int32_t* tab, const float* sg, float c,
                                   int64_t k) {
    IM2COL_COLUMN(k);
    vi top = (vi){0};
    for (int64_t nn = 0; nn < N; nn++)
        for (int64_t t = 0; t < HW; t += 16) {
            const vi mag = (vi)im2col_rht_block(x, tk, (nn * C + ch) * H * W + shift, t, size, cv, s0) & 0x7FFFFFFF;
            const vi gt = mag > top;
            top = (mag & gt) | (top & ~gt);
        }
    uint32_t r = 0;
    for (int l = 0; l < 16; l++) r = (uint32_t)top[l] > r ? (uint32_t)top[l] : r;
    return r;
}

/* Column k's rotated row quantized into out (its row of [K, T]): G blocks at a time rotated into an L1
 * buffer and quantized from it (fp4_group), the last < G one by one (nv_block); element t's uniform at
 * k0 + t·ks. */
__attribute__((always_inline)) static inline int im2col_rht_nv_row(const float* x, float* out, const int64_t* g,
                                                                  const int32_t* tab, const float* sg, float c,
                                                                  int64_t k, const float* u, uint64_t key, int64_t k0,
                                                                  int64_t ks, float s_enc, float s_dec, const int SR) {
    IM2COL_COLUMN(k);
    float buf[G * 16] __attribute__((aligned(64)));
    const int64_t T = N * HW;
    int bad = 0;
    for (int64_t t0 = 0; t0 < T; t0 += G * 16) {
        const int64_t nb = T - t0 < G * 16 ? (T - t0) / 16 : G;
        for (int64_t b = 0; b < nb; b++) {
            const int64_t t = t0 + 16 * b, nn = t / HW;
            const vf v = im2col_rht_block(x, tk, (nn * C + ch) * H * W + shift, t - nn * HW, size, cv, s0);
            memcpy(buf + 16 * b, &v, sizeof(vf));
        }
        if (nb == G) {
            bad |= fp4_group(buf, out + t0, u, key, k0 + t0 * ks, 0, ks, s_enc, s_dec, 1.0f, 0, SR, 16);
        } else {
            for (int64_t b = 0; b < nb; b++)
                bad |= nv_block(buf + 16 * b, out + t0 + 16 * b, u, key, k0 + (t0 + 16 * b) * ks, ks, s_enc, s_dec,
                                SR);
        }
    }
    return bad;
}
#undef IM2COL_COLUMN
#endif

/* NVFP4 (blocks of 16 along tokens) of lp_im2col_fwht_f32's rotated im2col matrix, written as it writes
 * it ([K, T] rows, the [T, K] view's tokens contiguous; us: the uniform strides of those rows, as
 * lp_fp4_f32's), with the same numbers, where n = 16, the stride is 1, Wo = W and each image's Ho·Wo
 * tokens are whole blocks (so T' = T): every block of a row is 16 consecutive floats of a shifted plane of
 * x, masked, rotated in registers (im2col_rht_block), so the matrix is neither gathered nor read back:
 * a first pass finds NVFP4's tensor max (nothing written), the second rotates again and quantizes from an
 * L1 buffer. Returns 1 for a NaN/Inf, -1 for another geometry (the caller makes the rotated matrix, then
 * NVFP4 of it), -2 when the mask table cannot be allocated. */
int lp_im2col_rht_nvfp4_f32(const float* x, float* out, const int64_t* g, const float* signs, const float* u,
                            uint64_t key, const int64_t* us, int n, int sr, int nthreads) {
#if FWHT_ROW_VECTORS
    const int64_t Ho = g[12], Wo = g[13], kh = g[4], kw = g[5], T = g[0] * Ho * Wo, K = g[1] * kh * kw;
    if (n != 16 || g[6] != 1 || g[7] != 1 || Wo != g[3] || (Ho * Wo) % 16) return -1;
    const float c = (float)(1.0 / sqrt((double)n));
    const int par = nthreads > 1 && T * K >= 65536;
    int32_t* tab = malloc((size_t)(kh * kw * Ho * Wo) * sizeof(int32_t));
    if (!tab) return -2;
    for (int64_t i = 0; i < kh; i++) /* -1 where token t of kernel offset (i, j) reads inside the image */
        for (int64_t j = 0; j < kw; j++)
            for (int64_t t = 0; t < Ho * Wo; t++) {
                const int64_t hin = t / Wo - g[8] + i * g[10], win = t % Wo - g[9] + j * g[11];
                tab[(i * kw + j) * Ho * Wo + t] = -(int32_t)(hin >= 0 && hin < g[2] && win >= 0 && win < g[3]);
            }
    uint32_t top = 0;
#pragma omp parallel for num_threads(nthreads) if (par) reduction(max : top)
    for (int64_t k = 0; k < K; k++) {
        const uint32_t m = im2col_rht_row_max(x, g, tab, signs, c, k);
        top = m > top ? m : top;
    }
    int bad = top >= NONFINITE;
    if (!bad) {
        float s_enc, s_dec;
        nvfp4_tensor_scale(top, &s_enc, &s_dec);
#pragma omp parallel for num_threads(nthreads) if (par) reduction(| : bad)
        for (int64_t k = 0; k < K; k++)
            bad |= sr ? im2col_rht_nv_row(x, out + k * T, g, tab, signs, c, k, u, key, row_u(k, us), us[1], s_enc,
                                          s_dec, 1)
                      : im2col_rht_nv_row(x, out + k * T, g, tab, signs, c, k, u, key, row_u(k, us), us[1], s_enc,
                                          s_dec, 0);
    }
    free(tab);
    return bad;
#else
    (void)x, (void)out, (void)g, (void)signs, (void)u, (void)key, (void)us, (void)n, (void)sr, (void)nthreads;
    return -1;
#endif
}
