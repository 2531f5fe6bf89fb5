/* C twins of the CPU estimator cores (built and loaded by lowprec/kernels/native.py, whose docstring
 * states the contract). Every function mirrors lowprec/kernels/cpu.py's torch core operation for
 * operation in fp32, so given the same uniforms the outputs are bit-identical: compiled with
 * -ffp-contract=off (no a*b+c -> FMA) and without fast-math; sums inside a block run left to right.
 *
 * Layout: the caller describes a (possibly permuted or transposed) strided view as a nest of three
 * loops, outermost first: size[d] iterations, x offset step xs[d] (elements; output uses the same
 * offsets), uniform-index step us[d] (in units: elements for LUQ, blocks for N:M). An N:M block
 * holds M elements es apart. A uniform's index is its position in the reference's noise= layout,
 * so with u == NULL the kernel draws u = U(key, index) (below) and the caller can regenerate them.
 *
 * Uniforms: U(key, i) = top 24 bits of splitmix64(key + (i + 1)·0x9E3779B97F4A7C15) times 2^-24, the
 * same grid as torch.rand's fp32 draws; lowprec.kernels.cpu.uniforms computes the same numbers
 * with torch integer ops.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline float hash_u(uint64_t key, uint64_t i) {
    return (float)(mix64(key + (i + 1) * GOLDEN) >> 40) * 0x1p-24f;
}

static inline float bits_f(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t f_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

void lp_uniforms(uint64_t key, int64_t n, float* out) {
    for (int64_t i = 0; i < n; i++) out[i] = hash_u(key, (uint64_t)i);
}

/* ------------------------------------------------------------------------------------------- LUQ */

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
            if (s2 == 1 && t2 == 1) { /* the common contiguous case: a loop the compiler vectorizes */
                if (u) {
                    const float* up = u + ub;
                    for (int64_t i = 0; i < n2; i++) op[i] = luq_elem(xp[i], up[i], m, alpha);
                } else {
                    for (int64_t i = 0; i < n2; i++) op[i] = luq_elem(xp[i], hash_u(key, ub + (uint64_t)i), m, alpha);
                }
            } else {
                for (int64_t i = 0; i < n2; i++) {
                    const uint64_t k = ub + (uint64_t)(i * t2);
                    op[i * s2] = luq_elem(xp[i * s2], u ? u[k] : hash_u(key, k), m, alpha);
                }
            }
        }
    }
}

/* cpu.luq in full: max|x| and the non-finite test (pass 1, skipped when max_abs >= 0 is given: then
 * pass 2 tests), m = min(max|x| or max_abs, fmax), α = m·2^-j with j = clamp(floor(log2 m) - e_tiny,
 * 0, L-1) (lowprec.luq.luq_alpha), pass 2 = lp_luq_f32. Returns 0, 1 (a NaN/Inf in x: out is
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
                    for (int64_t i = 0; i < n2; i++) {
                        const uint32_t v = f_bits(xp[i]) & 0x7FFFFFFFu;
                        rm = v > rm ? v : rm;
                    }
                } else {
                    for (int64_t i = 0; i < n2; i++) {
                        const uint32_t v = f_bits(xp[i * s2]) & 0x7FFFFFFFu;
                        rm = v > rm ? v : rm;
                    }
                }
                mb = rm > mb ? rm : mb;
            }
        if (mb >= 0x7F800000u) return 1;
        m = bits_f(mb);
    }
    m = m < fmax ? m : fmax;
    if (!(m > 0.0f)) return 2;
    int e;
    frexpf(m, &e);
    int j = (e - 1) - e_tiny;
    j = j < 0 ? 0 : (j > L - 1 ? L - 1 : j);
    const float alpha = ldexpf(m, -j);
    lp_luq_f32(x, out, u, key, size, xs, us, m, alpha, nthreads);
    if (max_abs >= 0.0f) { /* the non-finite test pass 1 did not make */
        for (int64_t i0 = 0; i0 < n0; i0++)
            for (int64_t i1 = 0; i1 < n1; i1++)
                for (int64_t i = 0; i < n2; i++)
                    if (!(fabsf(x[i0 * xs[0] + i1 * xs[1] + i * s2]) <= 0x1.fffffep127f)) return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------- N:M */

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
 * one block (T = float) or W blocks in vector lanes (T = vf): t_i = s_i/S and, for n = 2,
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

/* ------------------------------------------------------------------ N:M, W blocks at once (SIMD) */

/* The same block functions over W blocks in the lanes of GCC/Clang vector types, branch-free: the
 * water-filling always runs its n+1 rounds (as the reference does), selects replace the branches,
 * floor(t) for 0 <= t < 2^31 is the truncating conversion. Lane for lane the same operations as the
 * scalar code above, so the same floats (the scalar code serves the tails of the block rows). */
#define W 16
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

static inline vf sel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vsplat(float v) { return (vf){0} + v; }
static inline vf vmin(vf a, vf b) { return sel(a < b, a, b); }
static inline vf vmax(vf a, vf b) { return sel(a < b, b, a); }
static inline vf vcount(vi m) { return __builtin_convertvector(-m, vf); } /* mask (-1/0) -> 1.0f/0.0f */
static inline int vany(vi m) { /* any lane set: eight 64-bit ORs, not sixteen lane extractions */
    uint64_t w[W / 2], o = 0;
    memcpy(w, &m, sizeof(vi));
    for (int i = 0; i < W / 2; i++) o |= w[i];
    return o != 0;
}

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

/* W blocks: lane l's block at element offset off[l] (elements es apart), its uniforms at indices
 * ui[l]·k + r. LANES says how the offsets run, so that the loads and stores vectorize: 1 when
 * off[l] = off[0] + l (a transposed linear δ: each block element is one vector load), M when
 * off[l] = off[0] + l·M with es = 1 (blocks back to back: a deinterleave with constant strides),
 * 0 for anything else (a batch across a row end: a gather). Returns 1 when a NaN/Inf was read. */
__attribute__((always_inline)) static inline int nm_blocks_v(const float* x, float* out, const float* u,
                                                            uint64_t key, const int64_t* off, const uint64_t* ui,
                                                            int64_t es, float big, const int N_, const int M_,
                                                            const int APPROX_, const int LANES) {
    const int k = APPROX_ ? N_ : 1;
    float buf[MAXM][W] __attribute__((aligned(64)));
    float ubuf[MAXM][W] __attribute__((aligned(64)));
    vf xv[MAXM], a[MAXM], s[MAXM], p[MAXM], uv[MAXM];
    vi keep[MAXM];
    const float* x0 = x + off[0];
    if (LANES == 1) {
        for (int j = 0; j < M_; j++) memcpy(&xv[j], x0 + j * es, sizeof(vf));
    } else {
        if (LANES == M_)
            for (int l = 0; l < W; l++)
                for (int j = 0; j < M_; j++) buf[j][l] = x0[l * M_ + j];
        else
            for (int l = 0; l < W; l++)
                for (int j = 0; j < M_; j++) buf[j][l] = x[off[l] + j * es];
        for (int j = 0; j < M_; j++) memcpy(&xv[j], buf[j], sizeof(vf));
    }
    if (u) {
        for (int r = 0; r < k; r++)
            for (int l = 0; l < W; l++) ubuf[r][l] = u[ui[l] * (uint64_t)k + (uint64_t)r];
    } else {
        for (int r = 0; r < k; r++)
            for (int l = 0; l < W; l++) ubuf[r][l] = hash_u(key, ui[l] * (uint64_t)k + (uint64_t)r);
    }
    const vf zero = vsplat(0.0f), vbig = vsplat(big);
    vf nz = zero;
    vi bad = (vi){0};
    for (int j = 0; j < M_; j++) {
        a[j] = (vf)((vi)xv[j] & 0x7FFFFFFF);
        nz = nz + vcount(a[j] > zero);
        bad |= ~(a[j] <= vsplat(0x1.fffffep127f));
    }
    for (int r = 0; r < k; r++) memcpy(&uv[r], ubuf[r], sizeof(vf));
    normalize_v(a, s, M_);
    if (APPROX_)
        approx_keep_v(s, uv, N_, M_, p, keep);
    else
        mvue_keep_v(s, uv[0], N_, M_, p, keep);
    const vi sparse = nz <= vsplat((float)N_);
    vf o[MAXM];
    for (int j = 0; j < M_; j++) {
        vf q = sel(keep[j], xv[j] / sel(keep[j], p[j], vsplat(1.0f)), zero);
        q = sel(q < -vbig, -vbig, sel(q > vbig, vbig, q));
        o[j] = sel(sparse, xv[j], q);
    }
    float* o0 = out + off[0];
    if (LANES == 1) {
        for (int j = 0; j < M_; j++) memcpy(o0 + j * es, &o[j], sizeof(vf));
    } else {
        for (int j = 0; j < M_; j++) memcpy(buf[j], &o[j], sizeof(vf));
        if (LANES == M_)
            for (int l = 0; l < W; l++)
                for (int j = 0; j < M_; j++) o0[l * M_ + j] = buf[j][l];
        else
            for (int l = 0; l < W; l++)
                for (int j = 0; j < M_; j++) out[off[l] + j * es] = buf[j][l];
    }
    return vany(bad);
}

/* Blocks lo..hi-1 of the loop nest in iteration order (innermost fastest), W at a time across row
 * ends (a convolution's H·W/M blocks per row can be fewer than W), the last < W one by one.
 * Returns 1 when a NaN/Inf was read. */
__attribute__((always_inline)) static inline int nm_span(const float* x, float* out, const float* u, uint64_t key,
                                                        const int64_t* size, const int64_t* xs, const int64_t* us,
                                                        int64_t es, float big, int64_t lo, int64_t hi,
                                                        const int N_, const int M_, const int APPROX_) {
    int64_t i2 = lo % size[2], i1 = (lo / size[2]) % size[1], i0 = lo / size[2] / size[1];
    int64_t off[W];
    uint64_t ui[W];
    int bad = 0;
    for (int64_t b = lo; b < hi;) {
        const int nl = hi - b >= W && N_ < M_ ? W : 1;
        if (nl == W && i2 + W <= size[2]) { /* a batch inside one row: offsets in arithmetic progression */
            const int64_t o0 = i0 * xs[0] + i1 * xs[1] + i2 * xs[2];
            const uint64_t u0 = (uint64_t)(i0 * us[0] + i1 * us[1] + i2 * us[2]);
            for (int l = 0; l < W; l++) {
                off[l] = o0 + l * xs[2];
                ui[l] = u0 + (uint64_t)(l * us[2]);
            }
            if (xs[2] == 1)
                bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, APPROX_, 1);
            else if (xs[2] == M_ && es == 1)
                bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, APPROX_, M_);
            else
                bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, APPROX_, 0);
            i2 += W;
        } else {
            for (int l = 0; l < nl; l++) {
                off[l] = i0 * xs[0] + i1 * xs[1] + i2 * xs[2];
                ui[l] = (uint64_t)(i0 * us[0] + i1 * us[1] + i2 * us[2]);
                if (++i2 == size[2]) {
                    i2 = 0;
                    if (++i1 == size[1]) {
                        i1 = 0;
                        ++i0;
                    }
                }
            }
            if (nl == W) {
                bad |= nm_blocks_v(x, out, u, key, off, ui, es, big, N_, M_, APPROX_, 0);
            } else {
                const int k = APPROX_ ? N_ : 1;
                float ubl[MAXM];
                for (int r = 0; r < k; r++)
                    ubl[r] = u ? u[ui[0] * (uint64_t)k + (uint64_t)r] : hash_u(key, ui[0] * (uint64_t)k + (uint64_t)r);
                bad |= nm_block(x + off[0], out + off[0], es, ubl, N_, M_, APPROX_, big);
            }
        }
        if (i2 == size[2]) {
            i2 = 0;
            if (++i1 == size[1]) {
                i1 = 0;
                ++i0;
            }
        }
        b += nl;
    }
    return bad;
}

#define CHUNK (W * 256) /* blocks per OpenMP work item */

/* One function per specialization, so that N_, M_, APPROX_ are literals inside the OpenMP region
 * (an outlined parallel body does not see a caller's constants). */
#define NM_SPECIAL(NAME, N_, M_, A_)                                                                        \
    static int NAME(const float* x, float* out, const float* u, uint64_t key, const int64_t* size,          \
                    const int64_t* xs, const int64_t* us, int64_t es, float big, int nthreads) {             \
        const int64_t total = size[0] * size[1] * size[2], chunks = (total + CHUNK - 1) / CHUNK;            \
        int bad = 0;                                                                                         \
        _Pragma("omp parallel for num_threads(nthreads) if (nthreads > 1 && total >= 4096) reduction(|:bad)") \
        for (int64_t c = 0; c < chunks; c++) {                                                               \
            const int64_t lo = c * CHUNK, hi = lo + CHUNK < total ? lo + CHUNK : total;                      \
            bad |= nm_span(x, out, u, key, size, xs, us, es, big, lo, hi, N_, M_, A_);                       \
        }                                                                                                    \
        return bad;                                                                                          \
    }
NM_SPECIAL(nm_12, 1, 2, 0)
NM_SPECIAL(nm_24, 2, 4, 0)
NM_SPECIAL(nm_24a, 2, 4, 1)

static int nm_generic(const float* x, float* out, const float* u, uint64_t key, const int64_t* size,
                      const int64_t* xs, const int64_t* us, int64_t es, float big, int nthreads, int n, int m,
                      int approx) {
    const int64_t total = size[0] * size[1] * size[2], chunks = (total + CHUNK - 1) / CHUNK;
    int bad = 0;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && total >= 4096) reduction(|:bad)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t lo = c * CHUNK, hi = lo + CHUNK < total ? lo + CHUNK : total;
        int64_t i2 = lo % size[2], i1 = (lo / size[2]) % size[1], i0 = lo / size[2] / size[1];
        const int k = approx ? n : 1;
        for (int64_t b = lo; b < hi; b++) {
            const int64_t off = i0 * xs[0] + i1 * xs[1] + i2 * xs[2];
            const uint64_t ub = (uint64_t)(i0 * us[0] + i1 * us[1] + i2 * us[2]) * (uint64_t)k;
            float ubl[MAXM];
            for (int r = 0; r < k; r++) ubl[r] = u ? u[ub + (uint64_t)r] : hash_u(key, ub + (uint64_t)r);
            bad |= nm_block(x + off, out + off, es, ubl, n, m, approx, big);
            if (++i2 == size[2]) {
                i2 = 0;
                if (++i1 == size[1]) {
                    i1 = 0;
                    ++i0;
                }
            }
        }
    }
    return bad;
}

/* ------------------------------------------------------------------------- block FP4 (lowprec.fp4) */

static inline float rhe(float r) { /* fp4._round_half_even, 0 <= r < 2^31 */
    const float f = floorf(r), d = r - f;
    const int odd = (int)f & 1;
    return f + (float)((d > 0.5f) | ((d == 0.5f) & odd));
}
static inline int floor_log2f(float v) { /* v > 0 finite; subnormals too (as torch.frexp): no libm call */
    const uint32_t b = f_bits(v);
    if (b & 0x7F800000u) return (int)((b >> 23) & 0xFF) - 127;
    return (31 - __builtin_clz(b & 0x7FFFFFu)) - 149;
}
static inline float pow2f(int k) { /* 2^k exactly (ldexpf only for the subnormal k < -126) */
    return k >= -126 ? bits_f((uint32_t)(k + 127) << 23) : ldexpf(1.0f, k);
}

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

static inline float pow2_bits(int k) { return bits_f((uint32_t)(k + 127) << 23); } /* normal 2^k */

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
                                                               uint64_t key, int64_t length, int64_t o0, int64_t no,
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
            for (int64_t l = 0; l < nl; l++) ub[l] = u ? u[base + l] : hash_u(key, (uint64_t)(base + l));
        else
            for (int64_t l = 0; l < nl; l++) ub[l] = 0.0f;
        for (int64_t l = 0; l < nl; l++) out[base + l] = fp4_elem(x[base + l], ub[l], p0, p1, p2, s_dec, FMT, SR);
    }
}

/* Blocks of `size` along l at inner positions i0..i0+ni-1 (inner > 1), IC of them side by side. */
__attribute__((always_inline)) static inline void fp4_block_cols(const float* x, float* out, const float* u,
                                                                uint64_t key, int64_t length, int64_t inner,
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
            for (int64_t i = 0; i < ni; i++) ub[i] = u ? u[base + i] : hash_u(key, (uint64_t)(base + i));
        else
            for (int64_t i = 0; i < ni; i++) ub[i] = 0.0f;
        for (int64_t i = 0; i < ni; i++)
            out[base + i] = fp4_elem(x[base + i], ub[i], p0[i], p1[i], p2[i], s_dec, FMT, SR);
    }
}

#define FP4_SPECIAL(NAME, FMT, SR)                                                                          \
    static void NAME(const float* x, float* out, const float* u, uint64_t key, int64_t outer, int64_t length, \
                     int64_t inner, int size, int rows, int lm1, float s_enc, float s_dec, int nthreads) {    \
        const int64_t nob = (outer + rows - 1) / rows, nb = (length + size - 1) / size;                     \
        const int64_t nic = (inner + IC - 1) / IC;                                                           \
        _Pragma("omp parallel for collapse(2) num_threads(nthreads) if (nthreads > 1 && outer * length * inner >= 65536)") \
        for (int64_t ob = 0; ob < nob; ob++)                                                                 \
            for (int64_t b = 0; b < nb; b++) {                                                               \
                const int64_t o0 = ob * rows, l0 = b * size;                                                 \
                const int64_t no = o0 + rows <= outer ? rows : outer - o0;                                   \
                const int64_t nl = l0 + size <= length ? size : length - l0;                                 \
                if (inner == 1) {                                                                            \
                    fp4_block_row(x, out, u, key, length, o0, no, l0, nl, s_enc, s_dec, lm1, FMT, SR);       \
                } else {                                                                                     \
                    for (int64_t c = 0; c < nic; c++) {                                                      \
                        const int64_t i0 = c * IC, ni = i0 + IC <= inner ? IC : inner - i0;                  \
                        fp4_block_cols(x, out, u, key, length, inner, o0, l0, nl, i0, ni, s_enc, s_dec, lm1, \
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
 * [outer, length], inner = 1). Returns 1 when x holds a NaN/Inf, -1 for an unknown format. */
int lp_fp4_f32(const float* x, float* out, const float* u, uint64_t key, int64_t outer, int64_t length,
               int64_t inner, int size, int rows, int fmt, int sr, int lm1, int nthreads) {
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
    if (fmt == 0 && !sr) fp4_nv_rtn(x, out, u, key, outer, length, inner, size, rows, lm1, s_enc, s_dec, nthreads);
    else if (fmt == 0) fp4_nv_sr(x, out, u, key, outer, length, inner, size, rows, lm1, s_enc, s_dec, nthreads);
    else if (fmt == 1 && !sr) fp4_mx_rtn(x, out, u, key, outer, length, inner, size, rows, lm1, s_enc, s_dec, nthreads);
    else if (fmt == 1) fp4_mx_sr(x, out, u, key, outer, length, inner, size, rows, lm1, s_enc, s_dec, nthreads);
    else if (fmt == 2) fp4_bluq(x, out, u, key, outer, length, inner, size, rows, lm1, s_enc, s_dec, nthreads);
    else return -1;
    return 0;
}

/* lowprec.nm._mse_mask for one block, branch-free (the comparisons are data: branches on them
 * mispredict): keep the n largest |x| (ties: the lower index), the rest +0. Returns 1 on a NaN/Inf. */
__attribute__((always_inline)) static inline int mse_block(const float* xp, float* op, int64_t es, const int n,
                                                          const int M) {
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

#define MSE_SPECIAL(NAME, N_, M_)                                                                           \
    static int NAME(const float* x, float* out, const int64_t* size, const int64_t* xs, int64_t es,        \
                    int n, int m, int nthreads) {                                                            \
        const int nn = N_ ? N_ : n, mm = M_ ? M_ : m;                                                        \
        const int64_t rows = size[0] * size[1];                                                              \
        int bad = 0;                                                                                         \
        _Pragma("omp parallel for num_threads(nthreads) if (nthreads > 1 && rows * size[2] >= 4096) reduction(|:bad)") \
        for (int64_t row = 0; row < rows; row++) {                                                           \
            const int64_t base = (row / size[1]) * xs[0] + (row % size[1]) * xs[1];                          \
            for (int64_t i2 = 0; i2 < size[2]; i2++)                                                         \
                bad |= mse_block(x + base + i2 * xs[2], out + base + i2 * xs[2], es, nn, mm);                \
        }                                                                                                    \
        return bad;                                                                                          \
    }
MSE_SPECIAL(mse_12, 1, 2)
MSE_SPECIAL(mse_24, 2, 4)
MSE_SPECIAL(mse_any, 0, 0)

/* The MSE mask over the nest (deterministic: no uniforms). Returns 0, 1 on a NaN/Inf, -1 for bad (n, m). */
int lp_mse_f32(const float* x, float* out, const int64_t* size, const int64_t* xs, int64_t es, int n, int m,
               int nthreads) {
    if (m < 1 || m > MAXM || n < 1 || n > m) return -1;
    if (n == 1 && m == 2) return mse_12(x, out, size, xs, es, n, m, nthreads);
    if (n == 2 && m == 4) return mse_24(x, out, size, xs, es, n, m, nthreads);
    return mse_any(x, out, size, xs, es, n, m, nthreads);
}

/* Returns 0, 1 when x holds a NaN/Inf (out is then garbage), or -1 for an (n, m) it does not take. */
int lp_nm_f32(const float* x, float* out, const float* u, uint64_t key, const int64_t* size, const int64_t* xs,
              const int64_t* us, int64_t es, int n, int m, int approx, float big, int nthreads) {
    if (m < 1 || m > MAXM || n < 1 || n > m) return -1;
    if (n == 1 && m == 2 && !approx) return nm_12(x, out, u, key, size, xs, us, es, big, nthreads);
    if (n == 2 && m == 4 && !approx) return nm_24(x, out, u, key, size, xs, us, es, big, nthreads);
    if (n == 2 && m == 4 && approx) return nm_24a(x, out, u, key, size, xs, us, es, big, nthreads);
    return nm_generic(x, out, u, key, size, xs, us, es, big, nthreads, n, m, approx);
}
