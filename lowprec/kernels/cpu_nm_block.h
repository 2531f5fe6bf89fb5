/* The N:M estimators' math for one block of M entries (lowprec.nm), in scalar code and over VW
 * blocks in the lanes of vectors; the loops over a tensor's blocks are cpu_nm.c's. Conventions:
 * cpu_common.h. */
#ifndef LOWPREC_CPU_NM_BLOCK_H
#define LOWPREC_CPU_NM_BLOCK_H
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
 * water-filling runs until no lane caps a new entry, selects replace the branches, and floor(t) of
 * systematic sampling's running sum t = frac + p (frac < 1, an open entry's p < 1: 0 <= t < 2) is
 * t >= 1. Lane for lane the same operations as the
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
        const vf carry = vcount(t >= one); /* floor(t): 0 <= t < 2, a sum of frac < 1 and p < 1 */
        whole = whole + carry;
        frac = t - carry;
        const vf hi = sel(closes[j], n_open, vmin(whole + vcount(u < frac), n_open));
        keep[j] = capped[j] | (hi > below_lo);
        below_lo = hi;
    }
}

static inline vf clamp_v(vf q, vf big) { return sel(q < -big, -big, sel(q > big, big, q)); }

/* mvue_keep_v for n = 1, M = 2 (both entries non-zero: a sparser block passes through) in closed form:
 * round 0 of the water-filling gives share_j = s_j·(1/max(s_0 + s_1, 2^-126)). If an entry's share
 * is >= 1 it is capped and round 1 (budget 0) leaves the other at p = 0: keep = capped. Else
 * p_j = share_j < 1 and systematic sampling keeps entry 0 when u < p_0 and entry 1 otherwise, except
 * when p_1 = 0 (s_1 underflowed): entry 0 is then the last open one and is kept outright. The same
 * float operations as the general rounds, so the same keep, and the same p of each kept entry, bit for
 * bit (an entry not kept keeps its round-0 share: its p is never read). */
__attribute__((always_inline)) static inline void mvue12_keep_v(const vf* s, vf u, vf* p, vi* keep) {
    const vf one = vsplat(1.0f), zero = vsplat(0.0f);
    const vf cs = one / vmax(s[0] + s[1], vsplat(0x1p-126f));
    const vf sh0 = s[0] * cs, sh1 = s[1] * cs;
    const vi cap0 = sh0 >= one, cap1 = sh1 >= one, capped = cap0 | cap1;
    const vi first = (u < sh0) | (sh1 == zero);
    p[0] = sel(cap0, one, sh0);
    p[1] = sel(cap1, one, sh1);
    keep[0] = cap0 | (~capped & first);
    keep[1] = cap1 | (~capped & ~first);
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

/* VW blocks' outputs o[j] from their entries xv[j] and uniforms uv[r] (MODE: 0 MVUE, 1 approximate
 * MVUE, 2 MSE); returns the lanes whose block holds a NaN/Inf. */
__attribute__((always_inline)) static inline vi nm_core_v(const vf* xv, const vf* uv, float big, const int N_,
                                                         const int M_, const int MODE, vf* o) {
    vf a[MAXM], s[MAXM], p[MAXM];
    vi keep[MAXM];
    const vf zero = vsplat(0.0f), vbig = vsplat(big);
    vf nz = zero;
    vi bad = (vi){0};
    for (int j = 0; j < M_; j++) {
        a[j] = (vf)((vi)xv[j] & 0x7FFFFFFF);
        nz = nz + vcount(a[j] > zero);
        bad |= ~(a[j] <= vsplat(0x1.fffffep127f));
    }
    if (MODE == 2) {
        for (int i = 0; i < M_; i++) {
            vi rank = (vi){0};
            for (int j = 0; j < M_; j++) /* a_j > a_i, or a tie with j < i (no NaN gets through: bad) */
                if (j != i) rank -= j < i ? a[j] >= a[i] : a[j] > a[i];
            o[i] = (vf)((vi)xv[i] & (rank < N_));
        }
    } else {
        normalize_v(a, s, M_);
        if (MODE == 1)
            approx_keep_v(s, uv, N_, M_, p, keep);
        else if (N_ == 1 && M_ == 2)
            mvue12_keep_v(s, uv[0], p, keep);
        else
            mvue_keep_v(s, uv[0], N_, M_, p, keep);
        const vi sparse = nz <= vsplat((float)N_);
        if (MODE == 0 && N_ == 1 && M_ == 2) { /* one entry kept (both only if both capped: p = 1, q = x) */
            const vf q = clamp_v(sel(keep[0], xv[0], xv[1]) / sel(keep[0], p[0], p[1]), vbig);
            o[0] = sel(sparse, xv[0], sel(keep[0], q, zero));
            o[1] = sel(sparse, xv[1], sel(keep[1], sel(keep[0], clamp_v(xv[1], vbig), q), zero));
        } else {
            for (int j = 0; j < M_; j++) {
                const vf q = clamp_v(sel(keep[j], xv[j] / sel(keep[j], p[j], vsplat(1.0f)), zero), vbig);
                o[j] = sel(sparse, xv[j], q);
            }
        }
    }
    return bad;
}

#endif
