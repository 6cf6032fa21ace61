/* Included by the layer sources after their other includes.
 *
 * GCC's -O2 vectorises a loop only when its trip count is a known multiple of the vector width
 * ("very-cheap" cost model), which leaves the elementwise loops of BatchNorm, ReLU, bias and im2col
 * scalar; they are the non-gemm part of every training step, so these files ask for O3's cost model.
 * Clang vectorises them at -O2 already.
 *
 * Without -ffast-math no compiler vectorises a float reduction (it would reassociate the sum), so the
 * reductions below keep HOT_LANES independent partial sums, which vectorise as plain elementwise adds
 * and are also more accurate than one running sum. */
#ifndef MOCO_CORE_HOT_H
#define MOCO_CORE_HOT_H

#include <stddef.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3")
#endif

#define HOT_LANES 16

/* The lanes are added pairwise, then the tail. */
static inline float hot_fold(float *acc, float tail) {
  for (int w = HOT_LANES / 2; w > 0; w /= 2)
    for (int j = 0; j < w; j++) acc[j] += acc[j + w];
  return acc[0] + tail;
}

/* sum_i x[i] */
static inline float hot_sum(const float *restrict x, size_t n) {
  float acc[HOT_LANES] = {0}, tail = 0.0f;
  size_t i = 0;
  for (; i + HOT_LANES <= n; i += HOT_LANES)
    for (int j = 0; j < HOT_LANES; j++) acc[j] += x[i + j];
  for (; i < n; i++) tail += x[i];
  return hot_fold(acc, tail);
}

/* sum_i (x[i] - m)^2 */
static inline float hot_sqdev(const float *restrict x, float m, size_t n) {
  float acc[HOT_LANES] = {0}, tail = 0.0f;
  size_t i = 0;
  for (; i + HOT_LANES <= n; i += HOT_LANES)
    for (int j = 0; j < HOT_LANES; j++) {
      float d = x[i + j] - m;
      acc[j] += d * d;
    }
  for (; i < n; i++) tail += (x[i] - m) * (x[i] - m);
  return hot_fold(acc, tail);
}

/* sum_i y[i] (x[i] - m) */
static inline float hot_dotdev(const float *restrict y, const float *restrict x, float m,
                               size_t n) {
  float acc[HOT_LANES] = {0}, tail = 0.0f;
  size_t i = 0;
  for (; i + HOT_LANES <= n; i += HOT_LANES)
    for (int j = 0; j < HOT_LANES; j++) acc[j] += y[i + j] * (x[i + j] - m);
  for (; i < n; i++) tail += y[i] * (x[i] - m);
  return hot_fold(acc, tail);
}

/* BatchNorm + ReLU's gradient sums over one plane in one pass: *s_dy = sum g[i] and
 * *s_dyx = sum g[i] (x[i] - m), g[i] = dy[i] where the forward's output y[i] > 0, else 0 (the ReLU's
 * mask). Lanes as hot_sum and hot_dotdev, so the sums equal theirs on a masked copy of dy. */
static inline void hot_relu_sums(const float *restrict dy, const float *restrict y,
                                 const float *restrict x, float m, size_t n, float *s_dy, float *s_dyx) {
  float a0[HOT_LANES] = {0}, a1[HOT_LANES] = {0}, t0 = 0.0f, t1 = 0.0f;
  size_t i = 0;
  for (; i + HOT_LANES <= n; i += HOT_LANES)
    for (int j = 0; j < HOT_LANES; j++) {
      float g = y[i + j] > 0.0f ? dy[i + j] : 0.0f;
      a0[j] += g;
      a1[j] += g * (x[i + j] - m);
    }
  for (; i < n; i++) {
    float g = y[i] > 0.0f ? dy[i] : 0.0f;
    t0 += g;
    t1 += g * (x[i] - m);
  }
  *s_dy = hot_fold(a0, t0);
  *s_dyx = hot_fold(a1, t1);
}

#endif
