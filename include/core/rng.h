/* Reproducible random streams: PCG32 (O'Neill 2014). One seed and a stream id give an independent
 * sequence, so initialisation, augmentation and sampling never share a stream and each can be saved
 * and restored on its own (the state is two integers). */
#ifndef MOCO_CORE_RNG_H
#define MOCO_CORE_RNG_H

#include <stdint.h>

typedef struct {
  uint64_t state;
  uint64_t inc; /* odd; selects the stream */
} rng_t;

/* Well-known stream ids; callers may derive more (e.g. RNG_STREAM_AUGMENT + worker index). */
enum {
  RNG_STREAM_INIT = 1,
  RNG_STREAM_SHUFFLE = 2,
  RNG_STREAM_SAMPLE = 3,
  RNG_STREAM_AUGMENT = 1000,
};

void rng_init(rng_t *r, uint64_t seed, uint64_t stream);
uint32_t rng_u32(rng_t *r);
uint64_t rng_u64(rng_t *r);
/* Uniform integer in [0, n), unbiased; n > 0. */
uint32_t rng_below(rng_t *r, uint32_t n);
/* Uniform float in [0, 1). */
float rng_uniform(rng_t *r);
/* Uniform float in [lo, hi). */
float rng_range(rng_t *r, float lo, float hi);
/* Standard normal (Box-Muller, one value per call). */
float rng_normal(rng_t *r);
/* Fisher-Yates shuffle of n indices. */
void rng_shuffle_u32(rng_t *r, uint32_t *a, uint32_t n);

#endif
