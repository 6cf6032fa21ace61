#include "core/layers.h"
#include "core/par.h"
#include "core/tensor.h"

#include <string.h>

#include "hot.h"

/* The bias loops split over the team like the products around them; by output feature in backward,
 * so that every feature's sum over the batch runs in the same order whatever the split. */
typedef struct {
  float *dst;       /* forward: out [B, OC]; backward: dbias [OC] */
  const float *src; /* forward: bias [OC]; backward: dout [B, OC] */
  int B, OC;
} bias_call;

static void bias_fill_part(void *ctx, int part, int parts) {
  const bias_call *a = ctx;
  long lo, hi;
  par_range(a->B, part, parts, &lo, &hi);
  for (long b = lo; b < hi; b++)
    memcpy(a->dst + (size_t)b * a->OC, a->src, (size_t)a->OC * sizeof(float));
}

static void bias_grad_part(void *ctx, int part, int parts) {
  const bias_call *a = ctx;
  long lo, hi;
  par_range(a->OC, part, parts, &lo, &hi);
  float *restrict db = a->dst;
  for (int b = 0; b < a->B; b++) {
    const float *restrict d = a->src + (size_t)b * a->OC;
    for (long o = lo; o < hi; o++) db[o] += d[o];
  }
}

void linear_forward(float *out, const float *inp, const float *weight, const float *bias, int B,
                    int C, int OC) {
  /* The bias goes in first and the gemm accumulates onto it (beta = 1): one pass over out, not two. */
  if (bias) {
    bias_call a = {out, bias, B, OC};
    par_run(par_parts((long)B * OC, PAR_MIN_FLOATS), bias_fill_part, &a);
  }
  mat_mul(out, inp, weight, B, OC, C, 0, 1, 1.0f, bias ? 1.0f : 0.0f);
}

void linear_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                     const float *weight, int B, int C, int OC) {
  if (dinp) mat_mul(dinp, dout, weight, B, C, OC, 0, 0, 1.0f, 0.0f);
  mat_mul(dweight, dout, inp, OC, C, B, 1, 0, 1.0f, 1.0f);
  if (dbias) {
    bias_call a = {dbias, dout, B, OC};
    par_run(par_parts((long)B * OC, PAR_MIN_FLOATS), bias_grad_part, &a);
  }
}
