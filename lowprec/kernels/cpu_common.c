/* The uniforms U(key, i) for tests (cpu_common.h defines them). */
#include "cpu_common.h"

void lp_uniforms(uint64_t key, int64_t n, float* out) {
    const uint64_t z0 = hash_z0(key, 0), zs = hash_zs(1);
    for (int64_t i = 0; i < n; i++) out[i] = hash_mix(z0 + (uint64_t)i * zs);
}
