#include "core/layers.h"
#include "core/tensor.h"

#include <string.h>

#include "hot.h"

void linear_forward(float *out, const float *inp, const float *weight, const float *bias, int B,
                    int C, int OC) {
  /* The bias goes in first and the gemm accumulates onto it (beta = 1): one pass over out, not two. */
  if (bias) {
    for (int b = 0; b < B; b++) memcpy(out + (size_t)b * OC, bias, (size_t)OC * sizeof(float));
  }
  mat_mul(out, inp, weight, B, OC, C, 0, 1, 1.0f, bias ? 1.0f : 0.0f);
}

void linear_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                     const float *weight, int B, int C, int OC) {
  if (dinp) mat_mul(dinp, dout, weight, B, C, OC, 0, 0, 1.0f, 0.0f);
  mat_mul(dweight, dout, inp, OC, C, B, 1, 0, 1.0f, 1.0f);
  if (dbias) {
    for (int b = 0; b < B; b++) {
      const float *restrict d = dout + (size_t)b * OC;
      float *restrict db = dbias;
      for (int o = 0; o < OC; o++) db[o] += d[o];
    }
  }
}
