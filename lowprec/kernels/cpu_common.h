/* What the C twins share (see lowprec/kernels/native.py for the contract; one .so is built from
 * every cpu_*.c file of this folder):
 *
 * Bit-exactness: every function mirrors lowprec/kernels/cpu.py's torch core (or the reference)
 * operation for operation in fp32, so given the same uniforms the outputs are bit-identical:
 * compiled with -ffp-contract=off (no a*b+c -> FMA) and without fast-math; sums inside a block run
 * left to right.
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
#ifndef LOWPREC_CPU_COMMON_H
#define LOWPREC_CPU_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL

/* U from the hash's input z = key + (i + 1)·GOLDEN: the top 24 bits of splitmix64's finalizer without
 * its last xor-shift ((z ^ z >> 31) >> 40 = z >> 40, as z >> 71 is 0), converted from a signed 32-bit
 * integer (cheaper than from 64 bits; the value < 2^24 is the same). A loop over an affine index
 * k0 + i·ks passes z = Z0 + i·ZS (`hash_z0`, `hash_zs`: the same sum mod 2^64), which the compiler
 * strength-reduces to one vector addition per step instead of a 64-bit multiply. */
static inline float hash_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return (float)(int32_t)(uint32_t)(z >> 40) * 0x1p-24f;
}
static inline uint64_t hash_z0(uint64_t key, uint64_t k0) { return key + (k0 + 1) * GOLDEN; }
static inline uint64_t hash_zs(uint64_t ks) { return ks * GOLDEN; }
static inline float hash_u(uint64_t key, uint64_t i) { return hash_mix(hash_z0(key, i)); }

static inline float bits_f(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t f_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

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

/* The next position of a loop nest of three (Layout above), i2 fastest. */
static inline void nest_next(int64_t* i0, int64_t* i1, int64_t* i2, const int64_t* size) {
    if (++*i2 < size[2]) return;
    *i2 = 0;
    if (++*i1 < size[1]) return;
    *i1 = 0;
    ++*i0;
}

static inline float pow2_bits(int k) { return bits_f((uint32_t)(k + 127) << 23); } /* normal 2^k */

/* |v|'s bits: ordered as |v| for finite v, a NaN/Inf reads >= 0x7F800000 (max|x| and the finite test in one). */
static inline uint32_t mag_bits(float v) { return f_bits(v) & 0x7FFFFFFFu; }
static inline uint32_t mag_max(uint32_t m, float v) { return mag_bits(v) > m ? mag_bits(v) : m; }

/* VW floats in the lanes of a GCC/Clang vector type (on any target: the compiler splits what the
 * hardware lacks), and branch-free lane helpers (masks are -1/0 per lane). */
#define VW 16
typedef float vf __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));

static inline vf sel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vsplat(float v) { return (vf){0} + v; }
static inline vf vmin(vf a, vf b) { return sel(a < b, a, b); }
static inline vf vmax(vf a, vf b) { return sel(a < b, b, a); }
static inline vf vcount(vi m) { return (vf)(m & (vi)vsplat(1.0f)); } /* mask (-1/0) -> 1.0f/0.0f: one AND */
static inline int vany(vi m) { /* any lane set: eight 64-bit ORs, not sixteen lane extractions */
    uint64_t w[VW / 2], o = 0;
    memcpy(w, &m, sizeof(vi));
    for (int i = 0; i < VW / 2; i++) o |= w[i];
    return o != 0;
}

/* Blocks of M = 2 or 4 floats back to back at p (VW blocks) <-> M vectors, lane l = block l, element j
 * in vector j: two-input shuffles (a loop of scalar moves through memory would stall every vector
 * load on store forwarding). Other M, or a compiler without __builtin_shufflevector: that loop. */
#if VW == 16 && (defined(__clang__) || __GNUC__ >= 12)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#define EVEN8 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define ODD8 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#define LO_LO 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI_HI 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define ZIP_LO 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23
#define ZIP_HI 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
__attribute__((always_inline)) static inline int vdeinterleave(const float* p, vf* xv, const int M) {
    vf v[4];
    if (M != 2 && M != 4) return 0;
    memcpy(v, p, (size_t)M * sizeof(vf));
    if (M == 2) {
        xv[0] = SHUF(v[0], v[1], EVEN8);
        xv[1] = SHUF(v[0], v[1], ODD8);
        return 1;
    }
    const vf e01 = SHUF(v[0], v[1], EVEN8), o01 = SHUF(v[0], v[1], ODD8); /* j = 0, 2 | 1, 3 of blocks 0-7 */
    const vf e23 = SHUF(v[2], v[3], EVEN8), o23 = SHUF(v[2], v[3], ODD8); /* ... of blocks 8-15 */
    const vf a = SHUF(e01, e23, EVEN8), b = SHUF(e01, e23, ODD8); /* j = 0 | 2 of all 16 */
    const vf c = SHUF(o01, o23, EVEN8), d = SHUF(o01, o23, ODD8); /* j = 1 | 3 */
    xv[0] = a, xv[1] = c, xv[2] = b, xv[3] = d;
    return 1;
}
__attribute__((always_inline)) static inline int vinterleave(float* p, const vf* o, const int M) {
    vf v[4];
    if (M != 2 && M != 4) return 0;
    if (M == 2) {
        v[0] = SHUF(o[0], o[1], ZIP_LO);
        v[1] = SHUF(o[0], o[1], ZIP_HI);
    } else {
        const vf a = SHUF(o[0], o[2], ZIP_LO), b = SHUF(o[0], o[2], ZIP_HI); /* the inverse of the above */
        const vf c = SHUF(o[1], o[3], ZIP_LO), d = SHUF(o[1], o[3], ZIP_HI);
        v[0] = SHUF(a, c, ZIP_LO), v[1] = SHUF(a, c, ZIP_HI), v[2] = SHUF(b, d, ZIP_LO), v[3] = SHUF(b, d, ZIP_HI);
    }
    memcpy(p, v, (size_t)M * sizeof(vf));
    return 1;
}
#else
static inline int vdeinterleave(const float* p, vf* xv, const int M) { return (void)p, (void)xv, (void)M, 0; }
static inline int vinterleave(float* p, const vf* o, const int M) { return (void)p, (void)o, (void)M, 0; }
#endif

#endif
