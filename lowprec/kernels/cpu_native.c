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
    float t[MAXM], rest[MAXM];
    for (int j = 0; j < M; j++) t[j] = s[j] / S;
    if (n == 1) {
        for (int j = 0; j < M; j++) p[j] = t[j];
    } else {
        for (int j = 0; j < M; j++) {
            float o = 0.0f;
            int first = 1;
            for (int k = 0; k < M; k++) {
                if (k == j) continue;
                o = first ? s[k] : o + s[k];
                first = 0;
            }
            rest[j] = t[j] / o;
        }
        for (int i = 0; i < M; i++) {
            float o = 0.0f;
            int first = 1;
            for (int j = 0; j < M; j++) {
                if (j == i) continue;
                o = first ? rest[j] : o + rest[j];
                first = 0;
            }
            p[i] = t[i] + s[i] * o;
        }
    }
    for (int j = 0; j < M; j++) keep[j] = keep[j] && p[j] > 0.0f;
}

/* lowprec.nm.nm_core for one block: kept entries x/p clamped to ±big, a block with at most n
 * non-zeros unchanged. */
static inline void nm_block(const float* xp, float* op, int64_t es, const float* u, int n, int M, int approx,
                            float big) {
    float xv[MAXM], a[MAXM], s[MAXM], p[MAXM];
    int keep[MAXM], nz = 0;
    for (int j = 0; j < M; j++) {
        xv[j] = xp[j * es];
        a[j] = fabsf(xv[j]);
        nz += a[j] > 0.0f;
    }
    if (nz <= n) {
        for (int j = 0; j < M; j++) op[j * es] = xv[j];
        return;
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
        for (int j = 0; j < M; j++) {
            share[j] = s[j] * cs;
            capped[j] |= share[j] >= one;
        }
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
    vf t[MAXM], rest[MAXM];
    for (int j = 0; j < M; j++) t[j] = s[j] / S;
    if (n == 1) {
        for (int j = 0; j < M; j++) p[j] = t[j];
    } else {
        for (int j = 0; j < M; j++) {
            vf o = zero;
            for (int k = 0, first = 1; k < M; k++) {
                if (k == j) continue;
                o = first ? s[k] : o + s[k];
                first = 0;
            }
            rest[j] = t[j] / o;
        }
        for (int i = 0; i < M; i++) {
            vf o = zero;
            for (int j = 0, first = 1; j < M; j++) {
                if (j == i) continue;
                o = first ? rest[j] : o + rest[j];
                first = 0;
            }
            p[i] = t[i] + s[i] * o;
        }
    }
    for (int j = 0; j < M; j++) keep[j] &= p[j] > zero;
}

/* W consecutive blocks of the innermost loop: offsets off + l·step, uniforms from index b0 + l·ustep. */
__attribute__((always_inline)) static inline void nm_blocks_v(const float* x, float* out, const float* u,
                                                             uint64_t key, int64_t step, int64_t es, uint64_t b0,
                                                             uint64_t ustep, float big, const int N_, const int M_,
                                                             const int APPROX_) {
    const int k = APPROX_ ? N_ : 1;
    float buf[MAXM][W] __attribute__((aligned(64)));
    float ubuf[MAXM][W] __attribute__((aligned(64)));
    vf xv[MAXM], a[MAXM], s[MAXM], p[MAXM], uv[MAXM];
    vi keep[MAXM];
    for (int l = 0; l < W; l++)
        for (int j = 0; j < M_; j++) buf[j][l] = x[l * step + j * es];
    for (int l = 0; l < W; l++) {
        const uint64_t b = (b0 + (uint64_t)l * ustep) * (uint64_t)k;
        for (int r = 0; r < k; r++) ubuf[r][l] = u ? u[b + (uint64_t)r] : hash_u(key, b + (uint64_t)r);
    }
    const vf zero = vsplat(0.0f), vbig = vsplat(big);
    vf nz = zero;
    for (int j = 0; j < M_; j++) {
        memcpy(&xv[j], buf[j], sizeof(vf));
        a[j] = (vf)((vi)xv[j] & 0x7FFFFFFF);
        nz = nz + vcount(a[j] > zero);
    }
    for (int r = 0; r < k; r++) memcpy(&uv[r], ubuf[r], sizeof(vf));
    normalize_v(a, s, M_);
    if (APPROX_)
        approx_keep_v(s, uv, N_, M_, p, keep);
    else
        mvue_keep_v(s, uv[0], N_, M_, p, keep);
    const vi sparse = nz <= vsplat((float)N_);
    for (int j = 0; j < M_; j++) {
        vf q = sel(keep[j], xv[j] / sel(keep[j], p[j], vsplat(1.0f)), zero);
        q = sel(q < -vbig, -vbig, sel(q > vbig, vbig, q));
        const vf o = sel(sparse, xv[j], q);
        memcpy(buf[j], &o, sizeof(vf));
    }
    for (int l = 0; l < W; l++)
        for (int j = 0; j < M_; j++) out[l * step + j * es] = buf[j][l];
}

/* One row of the loop nest (its innermost loop), W blocks at a time, the tail block by block. */
__attribute__((always_inline)) static inline void nm_row(const float* x, float* out, const float* u, uint64_t key,
                                                        const int64_t* size, const int64_t* xs, const int64_t* us,
                                                        int64_t es, float big, int64_t row, const int N_,
                                                        const int M_, const int APPROX_) {
    const int64_t i0 = row / size[1], i1 = row % size[1], n2 = size[2];
    const int64_t base = i0 * xs[0] + i1 * xs[1];
    const uint64_t ub = (uint64_t)(i0 * us[0] + i1 * us[1]);
    const int k = APPROX_ ? N_ : 1;
    int64_t i2 = 0;
    if (N_ < M_ && M_ <= MAXM)
        for (; i2 + W <= n2; i2 += W)
            nm_blocks_v(x + base + i2 * xs[2], out + base + i2 * xs[2], u, key, xs[2], es,
                        ub + (uint64_t)(i2 * us[2]), (uint64_t)us[2], big, N_, M_, APPROX_);
    for (; i2 < n2; i2++) {
        const int64_t off = base + i2 * xs[2];
        const uint64_t b = (ub + (uint64_t)(i2 * us[2])) * (uint64_t)k;
        float ubl[MAXM];
        for (int r = 0; r < k; r++) ubl[r] = u ? u[b + (uint64_t)r] : hash_u(key, b + (uint64_t)r);
        nm_block(x + off, out + off, es, ubl, N_, M_, APPROX_, big);
    }
}

/* One function per specialization, so that N_, M_, APPROX_ are literals inside the OpenMP region
 * (an outlined parallel body does not see a caller's constants). */
#define NM_SPECIAL(NAME, N_, M_, A_)                                                                        \
    static void NAME(const float* x, float* out, const float* u, uint64_t key, const int64_t* size,         \
                     const int64_t* xs, const int64_t* us, int64_t es, float big, int nthreads) {            \
        const int64_t rows = size[0] * size[1];                                                              \
        _Pragma("omp parallel for num_threads(nthreads) if (nthreads > 1 && rows * size[2] >= 16384)")     \
        for (int64_t row = 0; row < rows; row++) nm_row(x, out, u, key, size, xs, us, es, big, row, N_, M_, A_); \
    }
NM_SPECIAL(nm_12, 1, 2, 0)
NM_SPECIAL(nm_24, 2, 4, 0)
NM_SPECIAL(nm_24a, 2, 4, 1)

static void nm_generic(const float* x, float* out, const float* u, uint64_t key, const int64_t* size,
                       const int64_t* xs, const int64_t* us, int64_t es, float big, int nthreads, int n, int m,
                       int approx) {
    const int64_t rows = size[0] * size[1];
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && rows * size[2] >= 16384)
    for (int64_t row = 0; row < rows; row++) {
        const int64_t i0 = row / size[1], i1 = row % size[1];
        const int k = approx ? n : 1;
        for (int64_t i2 = 0; i2 < size[2]; i2++) {
            const int64_t off = i0 * xs[0] + i1 * xs[1] + i2 * xs[2];
            const uint64_t b = (uint64_t)(i0 * us[0] + i1 * us[1] + i2 * us[2]) * (uint64_t)k;
            float ubl[MAXM];
            for (int r = 0; r < k; r++) ubl[r] = u ? u[b + (uint64_t)r] : hash_u(key, b + (uint64_t)r);
            nm_block(x + off, out + off, es, ubl, n, m, approx, big);
        }
    }
}

/* Returns 0, or -1 for an (n, m) it does not take (m > 8). */
int lp_nm_f32(const float* x, float* out, const float* u, uint64_t key, const int64_t* size, const int64_t* xs,
              const int64_t* us, int64_t es, int n, int m, int approx, float big, int nthreads) {
    if (m < 1 || m > MAXM || n < 1 || n > m) return -1;
    if (n == 1 && m == 2 && !approx)
        nm_12(x, out, u, key, size, xs, us, es, big, nthreads);
    else if (n == 2 && m == 4 && !approx)
        nm_24(x, out, u, key, size, xs, us, es, big, nthreads);
    else if (n == 2 && m == 4 && approx)
        nm_24a(x, out, u, key, size, xs, us, es, big, nthreads);
    else
        nm_generic(x, out, u, key, size, xs, us, es, big, nthreads, n, m, approx);
    return 0;
}
