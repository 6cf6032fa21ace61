/* Conv2d as im2col + sgemm (Chellapilla et al. 2006).
 *
 * For a chunk of nb samples the columns are laid side by side: col [C K K, nb P] with P = OH OW, so one
 * sgemm  tmp [OC, nb P] = weight [OC, C K K] · col  covers the chunk, and a copy scatters tmp into the
 * [B, OC, P] layout (adding the bias on the way). The copy moves OC nb P floats while the gemm does
 * C K K times as many multiply-adds, and a wide gemm runs near peak where a 49-column one does not.
 * Backward gathers dout the same way, recomputes col (cheaper than keeping it for the whole batch), and
 * does  dweight += dtmp · col^T  and  dcol = weight^T · dtmp  followed by col2im. */
#include "core/layers.h"
#include "core/tensor.h"

#include <string.h>

#include "hot.h"

/* Columns per sgemm the chunking aims at, and the workspace it may not exceed (floats). */
#define CONV_TARGET_COLS 2048
#define CONV_MAX_WS ((size_t)8 << 20)

int conv2d_chunk(const conv_geom *g, int OC, int max_batch) {
  size_t P = (size_t)g->OH * g->OW, rows = (size_t)g->C * g->K * g->K + (size_t)OC;
  size_t nb = (CONV_TARGET_COLS + P - 1) / P;
  while (nb > 1 && rows * P * nb > CONV_MAX_WS) nb--;
  if (nb > (size_t)max_batch) nb = (size_t)max_batch;
  return nb < 1 ? 1 : (int)nb;
}

size_t conv2d_workspace_len(const conv_geom *g, int OC, int chunk) {
  size_t P = (size_t)g->OH * g->OW;
  return ((size_t)g->C * g->K * g->K + (size_t)OC) * P * (size_t)chunk;
}

/* Range [*a, *b) of output positions o whose input position o s - pad + k lies inside [0, n). */
static void valid_range(int *a, int *b, int k, int n, int out_n, const conv_geom *g) {
  int lo = g->pad - k, hi = n + g->pad - k; /* need lo <= o s < hi */
  int oa = lo <= 0 ? 0 : (lo + g->stride - 1) / g->stride;
  int ob = hi <= 0 ? 0 : (hi + g->stride - 1) / g->stride;
  if (oa > out_n) oa = out_n;
  if (ob > out_n) ob = out_n;
  if (ob < oa) ob = oa;
  *a = oa, *b = ob;
}

/* col rows (c, ki, kj), ld floats apart, each [OH, OW]; x is one sample [C, H, W]. */
static void im2col(float *col, size_t ld, const float *x, const conv_geom *g) {
  int K = g->K, s = g->stride;
  for (int c = 0; c < g->C; c++)
    for (int ki = 0; ki < K; ki++)
      for (int kj = 0; kj < K; kj++) {
        float *dst = col + ((size_t)(c * K + ki) * K + kj) * ld;
        int ha, hb, wa, wb;
        valid_range(&ha, &hb, ki, g->H, g->OH, g);
        valid_range(&wa, &wb, kj, g->W, g->OW, g);
        memset(dst, 0, (size_t)ha * g->OW * sizeof(float));
        for (int oh = ha; oh < hb; oh++) {
          float *restrict d = dst + (size_t)oh * g->OW;
          const float *restrict src = x + ((size_t)c * g->H + oh * s - g->pad + ki) * g->W - g->pad + kj;
          for (int ow = 0; ow < wa; ow++) d[ow] = 0.0f;
          if (s == 1)
            memcpy(d + wa, src + wa, (size_t)(wb - wa) * sizeof(float));
          else
            for (int ow = wa; ow < wb; ow++) d[ow] = src[ow * s];
          for (int ow = wb; ow < g->OW; ow++) d[ow] = 0.0f;
        }
        memset(dst + (size_t)hb * g->OW, 0, (size_t)(g->OH - hb) * g->OW * sizeof(float));
      }
}

/* The adjoint of im2col: dx [C, H, W] += scatter of col. */
static void col2im(float *dx, const float *col, size_t ld, const conv_geom *g) {
  int K = g->K, s = g->stride;
  for (int c = 0; c < g->C; c++)
    for (int ki = 0; ki < K; ki++)
      for (int kj = 0; kj < K; kj++) {
        const float *src = col + ((size_t)(c * K + ki) * K + kj) * ld;
        int ha, hb, wa, wb;
        valid_range(&ha, &hb, ki, g->H, g->OH, g);
        valid_range(&wa, &wb, kj, g->W, g->OW, g);
        for (int oh = ha; oh < hb; oh++) {
          const float *restrict sr = src + (size_t)oh * g->OW;
          float *restrict d = dx + ((size_t)c * g->H + oh * s - g->pad + ki) * g->W - g->pad + kj;
          if (s == 1)
            for (int ow = wa; ow < wb; ow++) d[ow] += sr[ow];
          else
            for (int ow = wa; ow < wb; ow++) d[ow * s] += sr[ow];
        }
      }
}

void conv2d_forward(float *out, float *ws, const float *inp, const float *weight, const float *bias,
                    int B, int OC, const conv_geom *g, int chunk) {
  size_t P = (size_t)g->OH * g->OW, in_len = (size_t)g->C * g->H * g->W, out_len = (size_t)OC * P;
  int CKK = g->C * g->K * g->K;
  for (int b = 0; b < B; b += chunk) {
    int nb = B - b < chunk ? B - b : chunk;
    size_t ld = (size_t)nb * P;
    float *col = ws, *tmp = ws + (size_t)CKK * ld;
    for (int s = 0; s < nb; s++) im2col(col + s * P, ld, inp + (b + s) * in_len, g);
    if (nb == 1) {
      /* One sample: the gemm writes [OC, P] in place, onto the bias. */
      float *o = out + b * out_len;
      for (int oc = 0; oc < OC; oc++) {
        float v = bias ? bias[oc] : 0.0f;
        for (size_t p = 0; p < P; p++) o[oc * P + p] = v;
      }
      mat_mul(o, weight, col, OC, (int)ld, CKK, 0, 0, 1.0f, 1.0f);
      continue;
    }
    mat_mul(tmp, weight, col, OC, (int)ld, CKK, 0, 0, 1.0f, 0.0f);
    for (int s = 0; s < nb; s++)
      for (int oc = 0; oc < OC; oc++) {
        const float *restrict t = tmp + (size_t)oc * ld + s * P;
        float *restrict o = out + (b + s) * out_len + oc * P;
        float v = bias ? bias[oc] : 0.0f;
        for (size_t p = 0; p < P; p++) o[p] = t[p] + v;
      }
  }
}

void conv2d_backward(float *dinp, float *dweight, float *dbias, float *ws, const float *dout,
                     const float *inp, const float *weight, int B, int OC, const conv_geom *g,
                     int chunk) {
  size_t P = (size_t)g->OH * g->OW, in_len = (size_t)g->C * g->H * g->W, out_len = (size_t)OC * P;
  int CKK = g->C * g->K * g->K;
  for (int b = 0; b < B; b += chunk) {
    int nb = B - b < chunk ? B - b : chunk;
    size_t ld = (size_t)nb * P;
    float *col = ws, *dtmp = ws + (size_t)CKK * ld;
    const float *dt = dout + b * out_len; /* one sample is already [OC, P] */
    if (nb > 1) {
      for (int s = 0; s < nb; s++)
        for (int oc = 0; oc < OC; oc++)
          memcpy(dtmp + (size_t)oc * ld + s * P, dout + (b + s) * out_len + oc * P, P * sizeof(float));
      dt = dtmp;
    }
    if (dbias)
      for (int oc = 0; oc < OC; oc++) dbias[oc] += hot_sum(dt + (size_t)oc * ld, ld);
    for (int s = 0; s < nb; s++) im2col(col + s * P, ld, inp + (b + s) * in_len, g);
    mat_mul(dweight, dt, col, OC, CKK, (int)ld, 0, 1, 1.0f, 1.0f);
    if (!dinp) continue;
    mat_mul(col, weight, dt, CKK, (int)ld, OC, 1, 0, 1.0f, 0.0f);
    float *dx = dinp + b * in_len;
    memset(dx, 0, (size_t)nb * in_len * sizeof(float));
    for (int s = 0; s < nb; s++) col2im(dx + s * in_len, col + s * P, ld, g);
  }
}
