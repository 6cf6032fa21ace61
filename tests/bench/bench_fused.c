/* BatchNorm + ReLU fused (bn_dims.relu) against the two layers one after the other, forward and backward,
 * at the default CNN's three feature maps and the head's 512-feature vectors, batch 256, split BN in 8
 * groups as the key encoder runs it, on 1 thread and on the machine's CPU count. Each repetition times
 * the unfused pair and the fused layer back to back, so that both see the same moment of a shared
 * machine; reported are the best of each and the median of the paired ratios. Prints figures only. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "../testutil.h"
#include "core/clock.h"
#include "core/err.h"
#include "core/layers.h"
#include "core/par.h"
#include "core/tensor.h"

enum { B = 256, GROUPS = 8, REPS = 31 };

typedef struct {
  int C, S;
  float *x, *y, *z, *dy, *dz, *dx, *saved, *gamma, *beta, *rm, *rv, *dgamma, *dbeta, *ws;
} bench;

static void bench_free(bench *b) {
  float *p[] = {b->x, b->y, b->z, b->dy, b->dz, b->dx, b->saved, b->gamma, b->beta, b->rm, b->rv,
                b->dgamma, b->dbeta, b->ws};
  for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) tensor_free(p[i]);
}

static int bench_init(bench *b, int C, int S, rng_t *r) {
  size_t n = (size_t)B * C * S;
  *b = (bench){.C = C, .S = S};
  b->x = tensor_alloc(n), b->y = tensor_alloc(n), b->z = tensor_alloc(n), b->dy = tensor_alloc(n);
  b->dz = tensor_alloc(n), b->dx = tensor_alloc(n), b->saved = tensor_calloc(batchnorm_saved_len(C, B));
  b->gamma = tensor_alloc(C), b->beta = tensor_alloc(C), b->rm = tensor_calloc(C), b->rv = tensor_calloc(C);
  b->dgamma = tensor_calloc(C), b->dbeta = tensor_calloc(C), b->ws = tensor_calloc(2 * (size_t)C);
  float *all[] = {b->x, b->y, b->z, b->dy, b->dz, b->dx, b->saved, b->gamma, b->beta, b->rm, b->rv,
                  b->dgamma, b->dbeta, b->ws};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    if (!all[i]) return moco_error(MOCO_ENOMEM, "bench_fused: %zu floats", n);
  fill_uniform(b->x, n, r, -1, 1);
  fill_uniform(b->dy, n, r, -1, 1);
  fill_uniform(b->gamma, C, r, 0.5f, 1.5f);
  fill_uniform(b->beta, C, r, -0.5f, 0.5f);
  vec_fill(b->rv, 1.0f, C);
  return 0;
}

/* One forward + backward, fused or not; t[0] forward, t[1] backward seconds. */
static void pass(bench *b, int fused, double t[2]) {
  size_t n = (size_t)B * b->C * b->S;
  bn_dims d = {B, b->C, b->S, GROUPS, 0.1f, 1e-5f, 1, NULL, fused};
  double t0 = clock_now();
  batchnorm_forward(b->y, b->saved, b->rm, b->rv, b->x, b->gamma, b->beta, &d);
  if (!fused) relu_forward(b->z, b->y, n);
  double t1 = clock_now();
  if (!fused) relu_backward(b->dz, b->dy, b->z, n);
  batchnorm_backward(b->dx, b->dgamma, b->dbeta, b->ws, fused ? b->dy : b->dz, b->x, b->gamma, b->y,
                     b->saved, &d);
  t[0] = t1 - t0, t[1] = clock_now() - t1;
}

static void run(bench *b, int threads) {
  double two[2][REPS], one[2][REPS], ratio[2][REPS], t[2];
  pass(b, 0, t), pass(b, 1, t); /* untimed: fault in the pages */
  for (int k = 0; k < REPS; k++) {
    pass(b, 0, t);
    two[0][k] = t[0], two[1][k] = t[1];
    pass(b, 1, t);
    one[0][k] = t[0], one[1][k] = t[1];
    for (int w = 0; w < 2; w++) ratio[w][k] = two[w][k] / one[w][k];
  }
  char shape[32];
  snprintf(shape, sizeof shape, b->S > 1 ? "%dx%d" : "%d", b->C, b->S);
  for (int w = 0; w < 2; w++)
    printf("  %-9s %2d thread%s %-8s  two layers %7.3f ms  fused %7.3f ms  paired %5.2fx\n", shape,
           threads, threads > 1 ? "s" : " ", w ? "backward" : "forward", 1e3 * best_of(two[w], REPS),
           1e3 * best_of(one[w], REPS), median_of(ratio[w], REPS));
}

int main(void) {
  static const int shapes[][2] = {{16, 28 * 28}, {32, 14 * 14}, {64, 7 * 7}, {512, 1}};
  int counts[2] = {1, (int)sysconf(_SC_NPROCESSORS_ONLN)};
  if (counts[1] > PAR_MAX_THREADS) counts[1] = PAR_MAX_THREADS;
  rng_t r;
  rng_init(&r, 1, RNG_STREAM_SAMPLE);
  printf("BatchNorm + ReLU, batch %d, %d BN groups: best of %d and the median of the paired ratios "
         "(two layers / fused)\n", B, GROUPS, REPS);
  for (int c = 0; c < (counts[1] > 1 ? 2 : 1); c++) {
    if (par_set_threads(counts[c])) {
      fprintf(stderr, "bench_fused: %s\n", moco_errmsg());
      return 1;
    }
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
      bench b;
      if (bench_init(&b, shapes[s][0], shapes[s][1], &r)) {
        fprintf(stderr, "%s\n", moco_errmsg());
        return 1;
      }
      run(&b, counts[c]);
      bench_free(&b);
    }
  }
  return 0;
}
