/* N:M MVUE, approximate MVUE and MSE (lowprec.nm): the loops over a tensor's blocks (the math of one block:
 * cpu_nm_block.h). Conventions: cpu_common.h. */
#include "cpu_nm_block.h"

/* The uniforms of VW blocks, the r-th of k per block at index ui[l]·k + r, read from u or hashed; ui NULL:
 * the blocks' indices run u0 + l·ustep (a batch inside one row), so each r's hash inputs are one affine run. */
__attribute__((always_inline)) static inline void nm_uniforms(const float* u, uint64_t key, const uint64_t* ui,
                                                             uint64_t u0, uint64_t ustep, const int k, vf* uv) {
    for (int r = 0; r < k; r++) {
        float ub[VW] __attribute__((aligned(64)));
        const uint64_t z0 = hash_z0(key, u0 * (uint64_t)k + (uint64_t)r), zs = hash_zs(ustep * (uint64_t)k);
        if (ui && u)
            for (int l = 0; l < VW; l++) ub[l] = u[ui[l] * (uint64_t)k + (uint64_t)r];
        else if (ui)
            for (int l = 0; l < VW; l++) ub[l] = hash_u(key, ui[l] * (uint64_t)k + (uint64_t)r);
        else if (u)
            for (int l = 0; l < VW; l++) ub[l] = u[(u0 + (uint64_t)l * ustep) * (uint64_t)k + (uint64_t)r];
        else
            for (int l = 0; l < VW; l++) ub[l] = hash_mix(z0 + (uint64_t)l * zs);
        memcpy(&uv[r], ub, sizeof(vf));
    }
}

/* Raise the lane-wise running max *om to the outputs' magnitude bits. */
static inline void nm_omax(const vf* o, const int M_, vi* om) {
    for (int j = 0; j < M_; j++) {
        const vi mag = (vi)o[j] & 0x7FFFFFFF;
        *om = (*om & ~(*om < mag)) | (mag & (*om < mag));
    }
}

/* VW blocks from x0 whose offsets run on in memory (nm_blocks_v's LANES = 1 or M) <-> M vectors. */
__attribute__((always_inline)) static inline void nm_load(const float* x0, int64_t es, const int M_, const int LANES,
                                                         vf* xv) {
    float buf[MAXM][VW] __attribute__((aligned(64)));
    if (LANES == 1) {
        for (int j = 0; j < M_; j++) memcpy(&xv[j], x0 + j * es, sizeof(vf));
    } else if (!vdeinterleave(x0, xv, M_)) {
        for (int l = 0; l < VW; l++)
            for (int j = 0; j < M_; j++) buf[j][l] = x0[l * M_ + j];
        for (int j = 0; j < M_; j++) memcpy(&xv[j], buf[j], sizeof(vf));
    }
}
__attribute__((always_inline)) static inline void nm_store(float* o0, int64_t es, const int M_, const int LANES,
                                                          const vf* o) {
    float buf[MAXM][VW] __attribute__((aligned(64)));
    if (LANES == 1) {
        for (int j = 0; j < M_; j++) memcpy(o0 + j * es, &o[j], sizeof(vf));
    } else if (!vinterleave(o0, o, M_)) {
        for (int j = 0; j < M_; j++) memcpy(buf[j], &o[j], sizeof(vf));
        for (int l = 0; l < VW; l++)
            for (int j = 0; j < M_; j++) o0[l * M_ + j] = buf[j][l];
    }
}

/* VW blocks: lane l's block at element offset off[l] (elements es apart), its uniforms at indices
 * ui[l]·k + r. LANES says how the offsets run, so that the loads and stores vectorize: 1 when
 * off[l] = off[0] + l (a transposed linear δ: each block element is one vector load), M when
 * off[l] = off[0] + l·M with es = 1 (blocks back to back: a deinterleave with constant strides),
 * 0 for anything else (a batch across a row end: a gather). MODE: nm_core_v's; AFFINE: ui[l] = ui[0] +
 * l·(ui[1] - ui[0]) (a batch inside one row).
 * Returns 1 when a NaN/Inf was read; OMAX_: *om as nm_omax (what LUQ after the prune needs,
 * lowprec.kernels.cpu.nm_luq). */
__attribute__((always_inline)) static inline int nm_blocks_v(const float* x, float* out, const float* u,
                                                            uint64_t key, const int64_t* off, const uint64_t* ui,
                                                            int64_t es, float big, const int N_, const int M_,
                                                            const int MODE, const int OMAX_, const int LANES,
                                                            const int AFFINE, vi* om) {
    float buf[MAXM][VW] __attribute__((aligned(64)));
    vf xv[MAXM], uv[MAXM], o[MAXM];
    if (LANES) {
        nm_load(x + off[0], es, M_, LANES, xv);
    } else {
        for (int l = 0; l < VW; l++)
            for (int j = 0; j < M_; j++) buf[j][l] = x[off[l] + j * es];
        for (int j = 0; j < M_; j++) memcpy(&xv[j], buf[j], sizeof(vf));
    }
    nm_uniforms(u, key, AFFINE ? NULL : ui, ui[0], ui[1] - ui[0], MODE == 1 ? N_ : MODE == 0, uv);
    const vi bad = nm_core_v(xv, uv, big, N_, M_, MODE, o);
    if (OMAX_) nm_omax(o, M_, om);
    if (LANES) {
        nm_store(out + off[0], es, M_, LANES, o);
    } else {
        for (int j = 0; j < M_; j++) memcpy(buf[j], &o[j], sizeof(vf));
        for (int l = 0; l < VW; l++)
            for (int j = 0; j < M_; j++) out[off[l] + j * es] = buf[j][l];
    }
    return vany(bad);
}

/* nb blocks from offset o0 whose memory runs on (LANES = 1: side by side, block b's element j at
 * o0 + b + j·es; LANES = M: back to back, at o0 + b·M + j), uniform index u0 + b·ustep, nb a multiple
 * of VW: nm_blocks_v's batches in one loop, without per-lane offsets or a test of each batch (the
 * in-row case of the nest below: a transposed Linear δ's rows of C_out blocks, a conv δ's H·W/M). */
__attribute__((always_inline)) static inline int nm_run_v(const float* x, float* out, const float* u, uint64_t key,
                                                         int64_t o0, uint64_t u0, int64_t nb, uint64_t ustep,
                                                         int64_t es, float big, const int N_, const int M_,
                                                         const int MODE, const int OMAX_, const int LANES, vi* om) {
    vi bad = (vi){0}, m = *om; /* the running max in a register, not through the pointer each batch */
    for (int64_t b = 0; b < nb; b += VW) {
        vf xv[MAXM], uv[MAXM], o[MAXM];
        nm_load(x + o0 + b * LANES, es, M_, LANES, xv);
        nm_uniforms(u, key, NULL, u0 + (uint64_t)b * ustep, ustep, MODE == 1 ? N_ : MODE == 0, uv);
        bad |= nm_core_v(xv, uv, big, N_, M_, MODE, o);
        if (OMAX_) nm_omax(o, M_, &m);
        nm_store(out + o0 + b * LANES, es, M_, LANES, o);
    }
    *om = m;
    return vany(bad);
}

/* Blocks lo..hi-1 of the loop nest in iteration order (innermost fastest), VW at a time across row
 * ends (a convolution's H·W/M blocks per row, W its width, can be fewer than VW), the last < VW one by one.
 * Returns 1 when a NaN/Inf was read; OMAX_: raises *omax to the outputs' max magnitude bits. */
__attribute__((always_inline)) static inline int nm_span(const float* x, float* out, const float* u, uint64_t key,
                                                        const int64_t* size, const int64_t* xs, const int64_t* us,
                                                        int64_t es, float big, int64_t lo, int64_t hi, const int N_,
                                                        const int M_, const int MODE, const int OMAX_,
                                                        uint32_t* omax) {
    int64_t i2 = lo % size[2], i1 = (lo / size[2]) % size[1], i0 = lo / size[2] / size[1];
    int64_t off[VW];
    uint64_t ui[VW];
    int bad = 0;
    vi om = (vi){0};
    uint32_t oms = 0, lanes[VW];
    for (int64_t b = lo; b < hi;) {
        const int nl = hi - b >= VW && N_ < M_ ? VW : 1;
        const int64_t run = (size[2] - i2 < hi - b ? size[2] - i2 : hi - b) / VW * VW;
        if (nl == VW && (xs[2] == 1 || (xs[2] == M_ && es == 1)) && run > 0) { /* batches inside one row */
            const int64_t o0 = i0 * xs[0] + i1 * xs[1] + i2 * xs[2];
            const uint64_t u0 = (uint64_t)(i0 * us[0] + i1 * us[1] + i2 * us[2]);
            const uint64_t ust = (uint64_t)us[2];
            bad |= xs[2] == 1 ? nm_run_v(x, out, u, key, o0, u0, run, ust, es, big, N_, M_, MODE, OMAX_, 1, &om)
                              : nm_run_v(x, out, u, key, o0, u0, run, ust, es, big, N_, M_, MODE, OMAX_, M_, &om);
            i2 += run - 1;
            nest_next(&i0, &i1, &i2, size);
            b += run;
            continue;
        }
        if (nl == VW && i2 + VW <= size[2]) { /* a batch inside one row: offsets in arithmetic progression */
            const int64_t o0 = i0 * xs[0] + i1 * xs[1] + i2 * xs[2];
            const uint64_t u0 = (uint64_t)(i0 * us[0] + i1 * us[1] + i2 * us[2]);
            for (int l = 0; l < VW; l++) {
                off[l] = o0 + l * xs[2];
                ui[l] = u0 + (uint64_t)(l * us[2]);
            }
            bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, MODE, OMAX_, 0, 1, &om);
            i2 += VW - 1;
            nest_next(&i0, &i1, &i2, size);
        } else {
            for (int l = 0; l < nl; l++) {
                off[l] = i0 * xs[0] + i1 * xs[1] + i2 * xs[2];
                ui[l] = (uint64_t)(i0 * us[0] + i1 * us[1] + i2 * us[2]);
                nest_next(&i0, &i1, &i2, size);
            }
            int unit = 1, packed = es == 1; /* across row ends, memory may still run on */
            for (int l = 1; l < nl; l++) {
                unit &= off[l] == off[0] + l;
                packed &= off[l] == off[0] + l * M_;
            }
            if (nl == VW && unit) {
                bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, MODE, OMAX_, 1, 0, &om);
            } else if (nl == VW && packed) {
                bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, MODE, OMAX_, M_, 0, &om);
            } else if (nl == VW) {
                bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, MODE, OMAX_, 0, 0, &om);
            } else {
                const int k = MODE == 1 ? N_ : MODE == 0;
                float ubl[MAXM];
                for (int r = 0; r < k; r++)
                    ubl[r] = u ? u[ui[0] * (uint64_t)k + (uint64_t)r] : hash_u(key, ui[0] * (uint64_t)k + (uint64_t)r);
                bad |= MODE == 2 ? mse_block(x + off[0], out + off[0], es, N_, M_)
                                 : nm_block(x + off[0], out + off[0], es, ubl, N_, M_, MODE, big);
                for (int j = 0; OMAX_ && j < M_; j++) oms = mag_max(oms, out[off[0] + j * es]);
            }
        }
        b += nl;
    }
    memcpy(lanes, &om, sizeof(vi));
    for (int l = 0; OMAX_ && l < VW; l++) oms = lanes[l] > oms ? lanes[l] : oms;
    *omax = oms > *omax ? oms : *omax;
    return bad;
}

#define CHUNK (VW * 256) /* blocks per OpenMP work item */

/* One function per specialization, so that N_, M_, MODE are literals inside the OpenMP region
 * (an outlined parallel body does not see a caller's constants); OMAX_: *omax = max|out| too. */
#define NM_SPECIAL(NAME, N_, M_, MODE, OMAX_)                                                               \
    static int NAME(const float* x, float* out, const float* u, uint64_t key, const int64_t* size,          \
                    const int64_t* xs, const int64_t* us, int64_t es, float big, int nthreads, uint32_t* omax) { \
        const int64_t total = size[0] * size[1] * size[2], chunks = (total + CHUNK - 1) / CHUNK;            \
        int bad = 0;                                                                                         \
        uint32_t om = 0;                                                                                     \
        _Pragma("omp parallel for num_threads(nthreads) if (nthreads > 1 && total >= 4096) reduction(|:bad) reduction(max:om)") \
        for (int64_t c = 0; c < chunks; c++) {                                                               \
            const int64_t lo = c * CHUNK, hi = lo + CHUNK < total ? lo + CHUNK : total;                      \
            bad |= nm_span(x, out, u, key, size, xs, us, es, big, lo, hi, N_, M_, MODE, OMAX_, &om);         \
        }                                                                                                    \
        if (omax) *omax = om;                                                                                \
        return bad;                                                                                          \
    }
NM_SPECIAL(nm_12, 1, 2, 0, 0)
NM_SPECIAL(nm_24, 2, 4, 0, 0)
NM_SPECIAL(nm_24a, 2, 4, 1, 0)
NM_SPECIAL(nm_12_max, 1, 2, 0, 1)
NM_SPECIAL(nm_24_max, 2, 4, 0, 1)
NM_SPECIAL(nm_24a_max, 2, 4, 1, 1)
NM_SPECIAL(mse_12, 1, 2, 2, 0)
NM_SPECIAL(mse_24, 2, 4, 2, 0)

/* Any (n, m) and mode (MODE above), one block at a time. */
static int nm_generic(const float* x, float* out, const float* u, uint64_t key, const int64_t* size,
                      const int64_t* xs, const int64_t* us, int64_t es, float big, int nthreads, int n, int m,
                      int mode, uint32_t* omax) {
    const int64_t total = size[0] * size[1] * size[2], chunks = (total + CHUNK - 1) / CHUNK;
    int bad = 0;
    uint32_t om = 0;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && total >= 4096) reduction(|:bad) reduction(max:om)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t lo = c * CHUNK, hi = lo + CHUNK < total ? lo + CHUNK : total;
        int64_t i2 = lo % size[2], i1 = (lo / size[2]) % size[1], i0 = lo / size[2] / size[1];
        const int k = mode == 1 ? n : mode == 0;
        for (int64_t b = lo; b < hi; b++) {
            const int64_t off = i0 * xs[0] + i1 * xs[1] + i2 * xs[2];
            const uint64_t ub = (uint64_t)(i0 * us[0] + i1 * us[1] + i2 * us[2]) * (uint64_t)k;
            float ubl[MAXM];
            for (int r = 0; r < k; r++) ubl[r] = u ? u[ub + (uint64_t)r] : hash_u(key, ub + (uint64_t)r);
            bad |= mode == 2 ? mse_block(x + off, out + off, es, n, m)
                             : nm_block(x + off, out + off, es, ubl, n, m, mode, big);
            for (int j = 0; omax && j < m; j++) om = mag_max(om, out[off + j * es]);
            nest_next(&i0, &i1, &i2, size);
        }
    }
    if (omax) *omax = om;
    return bad;
}

/* MSE 1:2 block by block along the nest's rows: when blocks sit side by side (xs[2] = 1) the compiler
 * vectorizes this loop itself, faster than the VW-lane batches for so little work per block. */
static int mse_12_rows(const float* x, float* out, const int64_t* size, const int64_t* xs, int64_t es,
                       int nthreads) {
    const int64_t rows = size[0] * size[1];
    int bad = 0;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && rows * size[2] >= 4096) reduction(|:bad)
    for (int64_t row = 0; row < rows; row++) {
        const int64_t base = (row / size[1]) * xs[0] + (row % size[1]) * xs[1];
        for (int64_t i2 = 0; i2 < size[2]; i2++)
            bad |= mse_block(x + base + i2 * xs[2], out + base + i2 * xs[2], es, 1, 2);
    }
    return bad;
}

/* The MSE mask over the nest (deterministic: no uniforms). Returns 0, 1 on a NaN/Inf, -1 for bad (n, m). */
int lp_mse_f32(const float* x, float* out, const int64_t* size, const int64_t* xs, int64_t es, int n, int m,
               int nthreads) {
    if (m < 1 || m > MAXM || n < 1 || n > m) return -1;
    if (n == 1 && m == 2 && xs[2] == 1) return mse_12_rows(x, out, size, xs, es, nthreads);
    if (n == 1 && m == 2) return mse_12(x, out, NULL, 0, size, xs, xs, es, 0.0f, nthreads, NULL);
    if (n == 2 && m == 4) return mse_24(x, out, NULL, 0, size, xs, xs, es, 0.0f, nthreads, NULL);
    return nm_generic(x, out, NULL, 0, size, xs, xs, es, 0.0f, nthreads, n, m, 2, NULL);
}

/* Returns 0, 1 when x holds a NaN/Inf (out is then garbage), or -1 for an (n, m) it does not take.
 * omax (may be NULL): the max magnitude bits of the output (its max|.|). */
int lp_nm_f32(const float* x, float* out, const float* u, uint64_t key, const int64_t* size, const int64_t* xs,
              const int64_t* us, int64_t es, int n, int m, int approx, float big, int nthreads, uint32_t* omax) {
    if (m < 1 || m > MAXM || n < 1 || n > m) return -1;
#define NM_ARGS x, out, u, key, size, xs, us, es, big, nthreads, omax
    if (n == 1 && m == 2 && !approx) return omax ? nm_12_max(NM_ARGS) : nm_12(NM_ARGS);
    if (n == 2 && m == 4 && !approx) return omax ? nm_24_max(NM_ARGS) : nm_24(NM_ARGS);
    if (n == 2 && m == 4 && approx) return omax ? nm_24a_max(NM_ARGS) : nm_24a(NM_ARGS);
#undef NM_ARGS
    return nm_generic(x, out, u, key, size, xs, us, es, big, nthreads, n, m, approx, omax);
}
