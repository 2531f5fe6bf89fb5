/* N:M MVUE, approximate MVUE and MSE (lowprec.nm). Conventions: cpu_common.h. */
#include "cpu_common.h"

#define MAXM 8

/* lowprec.nm._normalize_cols: |x|·2^-E, E = floor(log2 max(max|x|, tiny)) clamped to [-126, 126]. */
static inline void normalize(const float* a, float* s, int M) {
    float bmax = a[0];
    for (int j = 1; j < M; j++) bmax = bmax < a[j] ? a[j] : bmax;
    if (bmax < 0x1p-126f) bmax = 0x1p-126f;
    int e = (int)((f_bits(bmax) >> 23) & 0xFF) - 127;
    e = e < -126 ? -126 : (e > 126 ? 126 : e);
    const float scale = bits_f((uint32_t)(127 - e) << 23);
    for (int j = 0; j < M; j++) s[j] = a[j] * scale;
}

/* lowprec.nm._probs_cols then _systematic: capped-proportional probabilities p (water-filling,
 * at most n+1 rounds; a round that caps nothing new would repeat itself exactly, so it ends the
 * loop) and the keep mask of systematic sampling with one uniform. */
static inline void mvue_keep(const float* s, float u, int n, int M, float* p, int* keep) {
    int capped[MAXM];
    float share[MAXM];
    const float floor_ = (float)n * 0x1p-126f;
    int ncap = 0;
    for (int j = 0; j < M; j++) capped[j] = 0;
    for (int round = 0; round <= n; round++) {
        float free_ = 0.0f;
        for (int j = 0; j < M; j++)
            if (!capped[j]) free_ += s[j];
        const float budget = (float)n - (float)ncap;
        const float cs = budget / (free_ < floor_ ? floor_ : free_);
        int changed = 0;
        for (int j = 0; j < M; j++) {
            share[j] = s[j] * cs;
            if (!capped[j] && share[j] >= 1.0f) {
                capped[j] = 1;
                changed = 1;
                ncap++;
            }
        }
        if (!changed) break;
    }
    int last_open = -1, ncap2 = 0;
    for (int j = 0; j < M; j++) {
        p[j] = capped[j] ? 1.0f : (share[j] > 1.0f ? 1.0f : share[j]);
        capped[j] = p[j] >= 1.0f;
        ncap2 += capped[j];
        if (p[j] > 0.0f && !capped[j]) last_open = j;
    }
    const float n_open = (float)n - (float)ncap2;
    float whole = 0.0f, frac = 0.0f, below_lo = 0.0f;
    for (int j = 0; j < M; j++) {
        const float t = frac + (capped[j] ? 0.0f : p[j]);
        const float carry = floorf(t);
        whole = whole + carry;
        frac = t - carry;
        float hi;
        if (last_open >= 0 && j >= last_open) {
            hi = n_open;
        } else {
            const float w = whole + (u < frac ? 1.0f : 0.0f);
            hi = w < n_open ? w : n_open;
        }
        keep[j] = capped[j] || hi > below_lo;
        below_lo = hi;
    }
}

/* The approximate MVUE's exact inclusion probabilities (the end of lowprec.nm._approx_draw), for
 * one block (T = float) or VW blocks in vector lanes (T = vf): t_i = s_i/S and, for n = 2,
 * p_i = t_i + s_i·Σ_{j≠i} t_j/Σ_{k≠j} s_k, every sum left to right from its first term. */
#define DEFINE_APPROX_PROBS(NAME, T)                                                                       \
    __attribute__((always_inline)) static inline T NAME##_sum_except(const T* v, const int M, const int i) { \
        T o = v[i == 0 ? 1 : 0];                                                                             \
        for (int j = i == 0 ? 2 : 1; j < M; j++)                                                             \
            if (j != i) o = o + v[j];                                                                        \
        return o;                                                                                            \
    }                                                                                                        \
    __attribute__((always_inline)) static inline void NAME(const T* s, T S, const int n, const int M, T* p) { \
        T t[MAXM], rest[MAXM];                                                                               \
        for (int j = 0; j < M; j++) t[j] = s[j] / S;                                                         \
        if (n == 1) {                                                                                        \
            for (int j = 0; j < M; j++) p[j] = t[j];                                                         \
            return;                                                                                          \
        }                                                                                                    \
        for (int j = 0; j < M; j++) rest[j] = t[j] / NAME##_sum_except(s, M, j);                             \
        for (int i = 0; i < M; i++) p[i] = t[i] + s[i] * NAME##_sum_except(rest, M, i);                     \
    }
DEFINE_APPROX_PROBS(approx_probs, float)

/* lowprec.nm._approx_draw: n draws without replacement ∝ |x| (uniforms u[0..n-1]) and the exact
 * inclusion probabilities; an entry whose probability is not > 0 is not kept. */
static inline void approx_keep(const float* s, const float* u, int n, int M, float* p, int* keep) {
    float S = s[0];
    for (int j = 1; j < M; j++) S = S + s[j];
    for (int j = 0; j < M; j++) keep[j] = 0;
    for (int r = 0; r < n; r++) {
        float tot = 0.0f;
        for (int j = 0; j < M; j++) tot += keep[j] ? 0.0f : s[j];
        const float target = u[r] * tot;
        float run = 0.0f;
        int chosen = 0;
        for (int j = 0; j < M; j++) {
            const float w = keep[j] ? 0.0f : s[j];
            run = run + w;
            if (!chosen && target < run && w > 0.0f) {
                keep[j] = 1;
                chosen = 1;
            }
        }
    }
    approx_probs(s, S, n, M, p);
    for (int j = 0; j < M; j++) keep[j] = keep[j] && p[j] > 0.0f;
}

/* lowprec.nm.nm_core for one block: kept entries x/p clamped to ±big, a block with at most n
 * non-zeros unchanged. Returns 1 when the block holds a NaN/Inf (the caller discards the output). */
static inline int nm_block(const float* xp, float* op, int64_t es, const float* u, int n, int M, int approx,
                           float big) {
    float xv[MAXM], a[MAXM], s[MAXM], p[MAXM];
    int keep[MAXM], nz = 0, bad = 0;
    for (int j = 0; j < M; j++) {
        xv[j] = xp[j * es];
        a[j] = fabsf(xv[j]);
        nz += a[j] > 0.0f;
        bad |= !(a[j] <= 0x1.fffffep127f);
    }
    if (bad) return 1;
    if (nz <= n) {
        for (int j = 0; j < M; j++) op[j * es] = xv[j];
        return 0;
    }
    normalize(a, s, M);
    if (approx)
        approx_keep(s, u, n, M, p, keep);
    else
        mvue_keep(s, u[0], n, M, p, keep);
    for (int j = 0; j < M; j++) {
        float q = keep[j] ? xv[j] / p[j] : 0.0f;
        op[j * es] = q < -big ? -big : (q > big ? big : q);
    }
    return 0;
}

/* ------------------------------------------------------------------ N:M, VW blocks at once (SIMD) */

/* The same block functions over VW blocks in the lanes of GCC/Clang vector types, branch-free: the
 * water-filling always runs its n+1 rounds (as the reference does), selects replace the branches,
 * floor(t) for 0 <= t < 2^31 is the truncating conversion. Lane for lane the same operations as the
 * scalar code above, so the same floats (the scalar code serves the tails of the block rows). */
__attribute__((always_inline)) static inline void normalize_v(const vf* a, vf* s, const int M) {
    vf bmax = a[0];
    for (int j = 1; j < M; j++) bmax = vmax(bmax, a[j]);
    bmax = vmax(bmax, vsplat(0x1p-126f));
    vi e = (((vi)bmax >> 23) & 0xFF) - 127;
    e = (e & ~(e < -126)) | (((vi){0} - 126) & (e < -126));
    e = (e & ~(e > 126)) | (((vi){0} + 126) & (e > 126));
    const vf scale = (vf)((127 - e) << 23);
    for (int j = 0; j < M; j++) s[j] = a[j] * scale;
}

__attribute__((always_inline)) static inline void mvue_keep_v(const vf* s, vf u, const int n, const int M, vf* p,
                                                             vi* keep) {
    vi capped[MAXM];
    vf share[MAXM];
    const vf floor_ = vsplat((float)n * 0x1p-126f), one = vsplat(1.0f), zero = vsplat(0.0f);
    for (int j = 0; j < M; j++) capped[j] = (vi){0};
    for (int round = 0; round <= n; round++) {
        vf free_ = zero, ncap = zero;
        for (int j = 0; j < M; j++) {
            free_ = free_ + sel(capped[j], zero, s[j]);
            ncap = ncap + vcount(capped[j]);
        }
        const vf cs = (vsplat((float)n) - ncap) / vmax(free_, floor_);
        vi fresh = (vi){0};
        for (int j = 0; j < M; j++) {
            share[j] = s[j] * cs;
            fresh |= (share[j] >= one) & ~capped[j];
            capped[j] |= share[j] >= one;
        }
        if (!vany(fresh)) break; /* no lane capped a new entry: further rounds would repeat this one bit for bit */
    }
    vi open[MAXM], closes[MAXM], after = (vi){0}, opened = (vi){0};
    vf ncap2 = zero;
    for (int j = 0; j < M; j++) {
        p[j] = sel(capped[j], one, vmin(share[j], one));
        capped[j] = p[j] >= one;
        open[j] = (p[j] > zero) & ~capped[j];
        ncap2 = ncap2 + vcount(capped[j]);
    }
    for (int j = M - 1; j >= 0; j--) {
        closes[j] = ~after;
        after |= open[j];
    }
    for (int j = 0; j < M; j++) {
        opened |= open[j];
        closes[j] &= opened;
    }
    const vf n_open = vsplat((float)n) - ncap2;
    vf whole = zero, frac = zero, below_lo = zero;
    for (int j = 0; j < M; j++) {
        const vf t = frac + sel(capped[j], zero, p[j]);
        const vf carry = __builtin_convertvector(__builtin_convertvector(t, vi), vf);
        whole = whole + carry;
        frac = t - carry;
        const vf hi = sel(closes[j], n_open, vmin(whole + vcount(u < frac), n_open));
        keep[j] = capped[j] | (hi > below_lo);
        below_lo = hi;
    }
}

DEFINE_APPROX_PROBS(approx_probs_v, vf)

__attribute__((always_inline)) static inline void approx_keep_v(const vf* s, const vf* u, const int n, const int M,
                                                               vf* p, vi* keep) {
    const vf zero = vsplat(0.0f);
    vf S = s[0];
    for (int j = 1; j < M; j++) S = S + s[j];
    for (int j = 0; j < M; j++) keep[j] = (vi){0};
    for (int r = 0; r < n; r++) {
        vf tot = zero;
        for (int j = 0; j < M; j++) tot = tot + sel(keep[j], zero, s[j]);
        const vf target = u[r] * tot;
        vf run = zero;
        vi chosen = (vi){0};
        for (int j = 0; j < M; j++) {
            const vf w = sel(keep[j], zero, s[j]);
            run = run + w;
            const vi hit = ~chosen & (target < run) & (w > zero);
            keep[j] |= hit;
            chosen |= hit;
        }
    }
    approx_probs_v(s, S, n, M, p);
    for (int j = 0; j < M; j++) keep[j] &= p[j] > zero;
}

/* lowprec.nm._mse_mask for one block, branch-free (the comparisons are data: branches on them
 * mispredict): keep the n largest |x| (ties: the lower index), the rest +0. Returns 1 on a NaN/Inf. */
static inline int mse_block(const float* xp, float* op, int64_t es, const int n, const int M) {
    float xv[MAXM], a[MAXM];
    int bad = 0;
    for (int j = 0; j < M; j++) {
        xv[j] = xp[j * es];
        a[j] = fabsf(xv[j]);
        bad |= !(a[j] <= 0x1.fffffep127f);
    }
    for (int i = 0; i < M; i++) {
        int rank = 0;
        for (int j = 0; j < M; j++)
            if (j != i) rank += (a[j] > a[i]) | ((a[j] == a[i]) & (j < i));
        op[i * es] = bits_f(f_bits(xv[i]) & (uint32_t)-(rank < n));
    }
    return bad;
}

/* VW blocks: lane l's block at element offset off[l] (elements es apart), its uniforms at indices
 * ui[l]·k + r. LANES says how the offsets run, so that the loads and stores vectorize: 1 when
 * off[l] = off[0] + l (a transposed linear δ: each block element is one vector load), M when
 * off[l] = off[0] + l·M with es = 1 (blocks back to back: a deinterleave with constant strides),
 * 0 for anything else (a batch across a row end: a gather). MODE: 0 MVUE, 1 approximate MVUE,
 * 2 MSE (mse_block lane for lane). Returns 1 when a NaN/Inf was read; *om: the running lane-wise
 * max of the outputs' magnitude bits (what LUQ after the prune needs, lowprec.kernels.cpu.nm_luq). */
__attribute__((always_inline)) static inline int nm_blocks_v(const float* x, float* out, const float* u,
                                                            uint64_t key, const int64_t* off, const uint64_t* ui,
                                                            int64_t es, float big, const int N_, const int M_,
                                                            const int MODE, const int OMAX_, const int LANES,
                                                            vi* om) {
    const int k = MODE == 1 ? N_ : MODE == 0;
    float buf[MAXM][VW] __attribute__((aligned(64)));
    float ubuf[MAXM][VW] __attribute__((aligned(64)));
    vf xv[MAXM], a[MAXM], s[MAXM], p[MAXM], uv[MAXM];
    vi keep[MAXM];
    const float* x0 = x + off[0];
    if (LANES == 1) {
        for (int j = 0; j < M_; j++) memcpy(&xv[j], x0 + j * es, sizeof(vf));
    } else if (LANES != M_ || !vdeinterleave(x0, xv, M_)) {
        if (LANES == M_)
            for (int l = 0; l < VW; l++)
                for (int j = 0; j < M_; j++) buf[j][l] = x0[l * M_ + j];
        else
            for (int l = 0; l < VW; l++)
                for (int j = 0; j < M_; j++) buf[j][l] = x[off[l] + j * es];
        for (int j = 0; j < M_; j++) memcpy(&xv[j], buf[j], sizeof(vf));
    }
    if (u) {
        for (int r = 0; r < k; r++)
            for (int l = 0; l < VW; l++) ubuf[r][l] = u[ui[l] * (uint64_t)k + (uint64_t)r];
    } else {
        for (int r = 0; r < k; r++)
            for (int l = 0; l < VW; l++) ubuf[r][l] = hash_u(key, ui[l] * (uint64_t)k + (uint64_t)r);
    }
    const vf zero = vsplat(0.0f), vbig = vsplat(big);
    vf nz = zero;
    vi bad = (vi){0};
    for (int j = 0; j < M_; j++) {
        a[j] = (vf)((vi)xv[j] & 0x7FFFFFFF);
        nz = nz + vcount(a[j] > zero);
        bad |= ~(a[j] <= vsplat(0x1.fffffep127f));
    }
    vf o[MAXM];
    if (MODE == 2) {
        for (int i = 0; i < M_; i++) {
            vi rank = (vi){0};
            for (int j = 0; j < M_; j++) /* a_j > a_i, or a tie with j < i (no NaN gets through: bad) */
                if (j != i) rank -= j < i ? a[j] >= a[i] : a[j] > a[i];
            o[i] = (vf)((vi)xv[i] & (rank < N_));
        }
    } else {
        for (int r = 0; r < k; r++) memcpy(&uv[r], ubuf[r], sizeof(vf));
        normalize_v(a, s, M_);
        if (MODE == 1)
            approx_keep_v(s, uv, N_, M_, p, keep);
        else
            mvue_keep_v(s, uv[0], N_, M_, p, keep);
        const vi sparse = nz <= vsplat((float)N_);
        for (int j = 0; j < M_; j++) {
            vf q = sel(keep[j], xv[j] / sel(keep[j], p[j], vsplat(1.0f)), zero);
            q = sel(q < -vbig, -vbig, sel(q > vbig, vbig, q));
            o[j] = sel(sparse, xv[j], q);
        }
    }
    for (int j = 0; OMAX_ && j < M_; j++) {
        const vi mag = (vi)o[j] & 0x7FFFFFFF;
        *om = (*om & ~(*om < mag)) | (mag & (*om < mag));
    }
    float* o0 = out + off[0];
    if (LANES == 1) {
        for (int j = 0; j < M_; j++) memcpy(o0 + j * es, &o[j], sizeof(vf));
    } else if (LANES != M_ || !vinterleave(o0, o, M_)) {
        for (int j = 0; j < M_; j++) memcpy(buf[j], &o[j], sizeof(vf));
        if (LANES == M_)
            for (int l = 0; l < VW; l++)
                for (int j = 0; j < M_; j++) o0[l * M_ + j] = buf[j][l];
        else
            for (int l = 0; l < VW; l++)
                for (int j = 0; j < M_; j++) out[off[l] + j * es] = buf[j][l];
    }
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
        if (nl == VW && i2 + VW <= size[2]) { /* a batch inside one row: offsets in arithmetic progression */
            const int64_t o0 = i0 * xs[0] + i1 * xs[1] + i2 * xs[2];
            const uint64_t u0 = (uint64_t)(i0 * us[0] + i1 * us[1] + i2 * us[2]);
            for (int l = 0; l < VW; l++) {
                off[l] = o0 + l * xs[2];
                ui[l] = u0 + (uint64_t)(l * us[2]);
            }
            if (xs[2] == 1)
                bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, MODE, OMAX_, 1, &om);
            else if (xs[2] == M_ && es == 1)
                bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, MODE, OMAX_, M_, &om);
            else
                bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, MODE, OMAX_, 0, &om);
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
                bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, MODE, OMAX_, 1, &om);
            } else if (nl == VW && packed) {
                bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, MODE, OMAX_, M_, &om);
            } else if (nl == VW) {
                bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, MODE, OMAX_, 0, &om);
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
