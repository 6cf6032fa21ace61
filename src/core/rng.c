#include "core/rng.h"

#include <math.h>

/* splitmix64 spreads a small user seed over all 64 bits before it seeds PCG. */
static uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

void rng_init(rng_t *r, uint64_t seed, uint64_t stream) {
  r->state = 0;
  r->inc = (splitmix64(stream) << 1) | 1u;
  rng_u32(r);
  r->state += splitmix64(seed);
  rng_u32(r);
}

uint32_t rng_u32(rng_t *r) {
  uint64_t old = r->state;
  r->state = old * 6364136223846793005ULL + r->inc;
  uint32_t xorshifted = (uint32_t)(((old >> 18) ^ old) >> 27);
  uint32_t rot = (uint32_t)(old >> 59);
  return (xorshifted >> rot) | (xorshifted << ((-rot) & 31));
}

uint64_t rng_u64(rng_t *r) {
  uint64_t hi = rng_u32(r);
  return (hi << 32) | rng_u32(r);
}

uint32_t rng_below(rng_t *r, uint32_t n) {
  /* Lemire's rejection keeps the result unbiased for any n. */
  uint32_t threshold = (uint32_t)(-n) % n;
  for (;;) {
    uint32_t x = rng_u32(r);
    if (x >= threshold) return x % n;
  }
}

float rng_uniform(rng_t *r) { return (float)(rng_u32(r) >> 8) * (1.0f / 16777216.0f); }

float rng_range(rng_t *r, float lo, float hi) { return lo + (hi - lo) * rng_uniform(r); }

float rng_normal(rng_t *r) {
  float u1 = ((float)(rng_u32(r) >> 8) + 1.0f) * (1.0f / 16777217.0f); /* (0, 1]: log stays finite */
  float u2 = rng_uniform(r);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.28318530718f * u2);
}

void rng_shuffle_u32(rng_t *r, uint32_t *a, uint32_t n) {
  for (uint32_t i = n; i > 1; i--) {
    uint32_t j = rng_below(r, i);
    uint32_t t = a[i - 1];
    a[i - 1] = a[j];
    a[j] = t;
  }
}
