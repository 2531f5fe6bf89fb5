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

static inline float pow2_bits(int k) { return bits_f((uint32_t)(k + 127) << 23); } /* normal 2^k */

#endif
