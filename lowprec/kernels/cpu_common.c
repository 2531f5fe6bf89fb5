/* The uniforms U(key, i) for tests (cpu_common.h defines them). */
#include "cpu_common.h"

void lp_uniforms(uint64_t key, int64_t n, float* out) {
    for (int64_t i = 0; i < n; i++) out[i] = hash_u(key, (uint64_t)i);
}
