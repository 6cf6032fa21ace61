/* Parameter-free elementwise and row-wise layers: ReLU, Flatten, L2 normalisation. */
#include "core/layers.h"

#include <math.h>
#include <string.h>

#include "hot.h"

void relu_forward(float *out, const float *inp, size_t N) {
  for (size_t i = 0; i < N; i++) out[i] = inp[i] > 0.0f ? inp[i] : 0.0f;
}

void relu_backward(float *dinp, const float *dout, const float *out, size_t N) {
  for (size_t i = 0; i < N; i++) dinp[i] = out[i] > 0.0f ? dout[i] : 0.0f;
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
