/* Parameter-free elementwise and row-wise layers: ReLU, Flatten, L2 normalisation. */
#include "core/layers.h"
#include "core/par.h"

#include <math.h>
#include <string.h>

#include "hot.h"

typedef struct {
  float *out;
  const float *inp, *dout;
  size_t N;
} relu_call;

/* The pointers are read into locals: a store through a->out could otherwise change *a, and the loop
 * would reload them every element instead of vectorising. */
static void relu_forward_part(void *ctx, int part, int parts) {
  const relu_call *a = ctx;
  float *out = a->out;
  const float *inp = a->inp;
  long lo, hi;
  par_range((long)a->N, part, parts, &lo, &hi);
  for (long i = lo; i < hi; i++) out[i] = inp[i] > 0.0f ? inp[i] : 0.0f;
}

/* inp is the forward's output here: the gradient passes where it was positive. */
static void relu_backward_part(void *ctx, int part, int parts) {
  const relu_call *a = ctx;
  float *dinp = a->out;
  const float *out = a->inp, *dout = a->dout;
  long lo, hi;
  par_range((long)a->N, part, parts, &lo, &hi);
  for (long i = lo; i < hi; i++) dinp[i] = out[i] > 0.0f ? dout[i] : 0.0f;
}

void relu_forward(float *out, const float *inp, size_t N) {
  relu_call a = {.out = out, .inp = inp, .N = N};
  par_run(par_parts((long)N, PAR_MIN_FLOATS), relu_forward_part, &a);
}

void relu_backward(float *dinp, const float *dout, const float *out, size_t N) {
  relu_call a = {.out = dinp, .inp = out, .dout = dout, .N = N};
  par_run(par_parts((long)N, PAR_MIN_FLOATS), relu_backward_part, &a);
}

void flatten_forward(float *out, const float *inp, size_t N) {
  if (out != inp) memmove(out, inp, N * sizeof(float));
}

void flatten_backward(float *dinp, const float *dout, size_t N) {
  if (dinp != dout) memmove(dinp, dout, N * sizeof(float));
}

void l2norm_forward(float *out, float *norm, const float *inp, int B, int D) {
  for (int b = 0; b < B; b++) {
    const float *restrict x = inp + (size_t)b * D;
    float *restrict y = out + (size_t)b * D;
    /* Double accumulation: the norm feeds every similarity of the contrastive loss. */
    double ss = 0.0;
    for (int i = 0; i < D; i++) ss += (double)x[i] * x[i];
    float nrm = (float)sqrt(ss);
    norm[b] = nrm;
    float inv = 1.0f / (nrm > L2NORM_EPS ? nrm : L2NORM_EPS);
    for (int i = 0; i < D; i++) y[i] = x[i] * inv;
  }
}

void l2norm_backward(float *dinp, const float *dout, const float *out, const float *norm, int B,
                     int D) {
  for (int b = 0; b < B; b++) {
    const float *restrict dy = dout + (size_t)b * D;
    const float *restrict y = out + (size_t)b * D;
    float *restrict dx = dinp + (size_t)b * D;
    if (norm[b] > L2NORM_EPS) {
      /* y = x / |x|: J = (I - y y^T) / |x|, symmetric, so dx = (dy - y (y . dy)) / |x|. */
      double dot = 0.0;
      for (int i = 0; i < D; i++) dot += (double)y[i] * dy[i];
      float inv = 1.0f / norm[b], yd = (float)dot;
      for (int i = 0; i < D; i++) dx[i] = (dy[i] - y[i] * yd) * inv;
    } else {
      /* Below the clamp the map is x / eps, linear. */
      for (int i = 0; i < D; i++) dx[i] = dy[i] * (1.0f / L2NORM_EPS);
    }
  }
}
