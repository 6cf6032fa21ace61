/* Pooling: MaxPool2d (kernel, stride, implicit -inf padding) and global average pooling. */
#include "core/layers.h"

#include <math.h>
#include <string.h>

#include "hot.h"

int conv_geom_init(conv_geom *g, int C, int H, int W, int K, int stride, int pad) {
  g->C = C, g->H = H, g->W = W, g->K = K, g->stride = stride, g->pad = pad;
  g->OH = g->OW = 0;
  if (C < 1 || K < 1 || stride < 1 || pad < 0) return -1;
  if (H + 2 * pad < K || W + 2 * pad < K) return -1;
  g->OH = (H + 2 * pad - K) / stride + 1;
  g->OW = (W + 2 * pad - K) / stride + 1;
  return 0;
}

/* One input plane [H, W] to one output plane [OH, OW]. */
static void maxpool_plane(float *out, int32_t *argmax, const float *inp, const conv_geom *g) {
  for (int oh = 0; oh < g->OH; oh++) {
    int h0 = oh * g->stride - g->pad;
    int ha = h0 < 0 ? 0 : h0, hb = h0 + g->K > g->H ? g->H : h0 + g->K;
    for (int ow = 0; ow < g->OW; ow++) {
      int w0 = ow * g->stride - g->pad;
      int wa = w0 < 0 ? 0 : w0, wb = w0 + g->K > g->W ? g->W : w0 + g->K;
      /* PyTorch requires pad <= K/2, so every window holds at least one real pixel. */
      float best = -INFINITY;
      int32_t arg = ha * g->W + wa;
      for (int h = ha; h < hb; h++)
        for (int w = wa; w < wb; w++) {
          float v = inp[h * g->W + w];
          if (v > best || isnan(v)) best = v, arg = h * g->W + w;
        }
      out[oh * g->OW + ow] = best;
      argmax[oh * g->OW + ow] = arg;
    }
  }
}

void maxpool_forward(float *out, int32_t *argmax, const float *inp, int B, const conv_geom *g) {
  size_t in_plane = (size_t)g->H * g->W, out_plane = (size_t)g->OH * g->OW;
  size_t planes = (size_t)B * g->C;
  for (size_t p = 0; p < planes; p++)
    maxpool_plane(out + p * out_plane, argmax + p * out_plane, inp + p * in_plane, g);
}

void maxpool_backward(float *dinp, const float *dout, const int32_t *argmax, int B, const conv_geom *g) {
  size_t in_plane = (size_t)g->H * g->W, out_plane = (size_t)g->OH * g->OW;
  size_t planes = (size_t)B * g->C;
  memset(dinp, 0, planes * in_plane * sizeof(float));
  for (size_t p = 0; p < planes; p++) {
    float *di = dinp + p * in_plane;
    const float *d = dout + p * out_plane;
    const int32_t *a = argmax + p * out_plane;
    /* Overlapping windows (stride < kernel) may share a winner: accumulate. */
    for (size_t i = 0; i < out_plane; i++) di[a[i]] += d[i];
  }
}

void avgpool_forward(float *out, const float *inp, int B, int C, int S) {
  size_t planes = (size_t)B * C;
  float inv = 1.0f / (float)S;
  for (size_t p = 0; p < planes; p++) {
    const float *x = inp + p * S;
    float s = 0.0f;
    for (int i = 0; i < S; i++) s += x[i];
    out[p] = s * inv;
  }
}

void avgpool_backward(float *dinp, const float *dout, int B, int C, int S) {
  size_t planes = (size_t)B * C;
  float inv = 1.0f / (float)S;
  for (size_t p = 0; p < planes; p++) {
    float v = dout[p] * inv;
    float *dx = dinp + p * S;
    for (int i = 0; i < S; i++) dx[i] = v;
  }
}
