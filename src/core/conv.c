/* Conv2d as im2col + sgemm (Chellapilla et al. 2006).
 *
 * For a chunk of nb samples the columns are laid side by side: col [C K K, nb P] with P = OH OW, so one
 * sgemm  tmp [OC, nb P] = weight [OC, C K K] · col  covers the chunk, and a copy scatters tmp into the
 * [B, OC, P] layout (adding the bias on the way). The copy moves OC nb P floats while the gemm does
 * C K K times as many multiply-adds, and a wide gemm runs near peak where a 49-column one does not.
 * Backward gathers dout the same way, recomputes col (cheaper than keeping it for the whole batch), and
 * does  dweight += dtmp · col^T  and  dcol = weight^T · dtmp  followed by col2im. */
#include "core/layers.h"
#include "core/par.h"
#include "core/tensor.h"

#include <string.h>

#include "hot.h"

/* The row copies below must stay inline vector moves: GCC would otherwise turn the block loops and the
 * zeroing of the padding into calls to memmove and memset of a few dozen bytes, one per row. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif

/* Columns per sgemm the chunking aims at, and the workspace it may not exceed (floats): 1 MB keeps
 * col and tmp in a 2 MB L2 between im2col, the gemm and the scatter (measured on the 28x28 CNN:
 * larger chunks were slower, not faster). */
#define CONV_TARGET_COLS 1024
#define CONV_MAX_WS ((size_t)1 << 18)

/* Rows of a feature map are short (28, 14, 7 floats), too short for a vectorised loop, whose scalar
 * tail would do most of the work (and a copy loop of a few floats becomes a call to memcpy). These copy
 * (or add) n floats as a few 8-float blocks, or two 4-float ones below 8, the last block overlapping
 * the previous, so a row costs one or two vector moves. */
#define ROW_BLOCK 8
#define ROW_HALF (ROW_BLOCK / 2)
static inline void copy_row(float *restrict d, const float *restrict s, int n) {
  if (n < ROW_BLOCK) {
    if (n < ROW_HALF) {
      for (int i = 0; i < n; i++) d[i] = s[i];
      return;
    }
    memcpy(d, s, ROW_HALF * sizeof(float));
    memcpy(d + n - ROW_HALF, s + n - ROW_HALF, ROW_HALF * sizeof(float));
    return;
  }
  int i = 0;
  for (; i + ROW_BLOCK <= n; i += ROW_BLOCK) memcpy(d + i, s + i, ROW_BLOCK * sizeof(float));
  if (i < n) memcpy(d + n - ROW_BLOCK, s + n - ROW_BLOCK, ROW_BLOCK * sizeof(float));
}

/* d[i] += s[i]; the overlapping last block is summed from the values before any store. */
static inline void add_row(float *restrict d, const float *restrict s, int n) {
  if (n < ROW_BLOCK) {
    for (int i = 0; i < n; i++) d[i] += s[i];
    return;
  }
  float last[ROW_BLOCK];
  for (int j = 0; j < ROW_BLOCK; j++) last[j] = d[n - ROW_BLOCK + j] + s[n - ROW_BLOCK + j];
  int i = 0;
  for (; i + ROW_BLOCK <= n; i += ROW_BLOCK)
    for (int j = 0; j < ROW_BLOCK; j++) d[i + j] += s[i + j];
  if (i < n) memcpy(d + n - ROW_BLOCK, last, sizeof last);
}

/* Padded input size. */
static size_t padded_len(const conv_geom *g) {
  return (size_t)g->C * (g->H + 2 * g->pad) * (g->W + 2 * g->pad);
}

int conv2d_chunk(const conv_geom *g, int OC, int max_batch) {
  size_t P = (size_t)g->OH * g->OW, rows = (size_t)g->C * g->K * g->K + (size_t)OC;
  size_t nb = (CONV_TARGET_COLS + P - 1) / P;
  while (nb > 1 && rows * P * nb > CONV_MAX_WS) nb--;
  if (nb > (size_t)max_batch) nb = (size_t)max_batch;
  return nb < 1 ? 1 : (int)nb;
}

/* One part's workspace: col [C K K, chunk P] | tmp [OC, chunk P] | one padded sample | the part's
 * weight and bias gradients [OC, C K K] [OC] (parts after the first sum into their own, see backward). */
static size_t part_len(const conv_geom *g, int OC, int chunk) {
  size_t P = (size_t)g->OH * g->OW, CKK = (size_t)g->C * g->K * g->K;
  return (CKK + (size_t)OC) * P * (size_t)chunk + padded_len(g) + ((size_t)OC * CKK + (size_t)OC);
}

size_t conv2d_workspace_len(const conv_geom *g, int OC, int chunk, int parts) {
  return (size_t)parts * part_len(g, OC, chunk);
}

/* Part p's own weight and bias gradient slots: [OC, C K K] then [OC], at the end of its workspace. */
static float *part_grads(float *ws, const conv_geom *g, int OC, int chunk, int p) {
  size_t len = part_len(g, OC, chunk), nw = (size_t)OC * g->C * g->K * g->K;
  return ws + (size_t)p * len + len - nw - (size_t)OC;
}

/* xp [C, H + 2 pad, W + 2 pad] = x [C, H, W] inside a zero border. im2col then reads every kernel
 * offset without bounds checks; for small maps (7x7) the checks and short copies otherwise cost more
 * than the gemm. */
static void pad_input(float *restrict xp, const float *restrict x, const conv_geom *g) {
  int p = g->pad, Wp = g->W + 2 * p;
  for (int c = 0; c < g->C; c++) {
    float *dst = xp + (size_t)c * (g->H + 2 * p) * Wp;
    memset(dst, 0, (size_t)p * Wp * sizeof(float));
    dst += (size_t)p * Wp;
    for (int h = 0; h < g->H; h++, dst += Wp) {
      const float *src = x + ((size_t)c * g->H + h) * g->W;
      for (int w = 0; w < p; w++) dst[w] = 0.0f, dst[p + g->W + w] = 0.0f;
      copy_row(dst + p, src, g->W);
    }
    memset(dst, 0, (size_t)p * Wp * sizeof(float));
  }
}

/* col rows (c, ki, kj), ld floats apart, each [OH, OW], from a padded sample xp. */
static void im2col(float *col, size_t ld, const float *xp, const conv_geom *g) {
  int K = g->K, s = g->stride, OW = g->OW, Hp = g->H + 2 * g->pad, Wp = g->W + 2 * g->pad;
  for (int c = 0; c < g->C; c++)
    for (int ki = 0; ki < K; ki++)
      for (int kj = 0; kj < K; kj++) {
        float *restrict d = col + ((size_t)(c * K + ki) * K + kj) * ld;
        const float *restrict src = xp + ((size_t)c * Hp + ki) * Wp + kj;
        for (int oh = 0; oh < g->OH; oh++, d += OW, src += (size_t)s * Wp) {
          if (s == 1)
            copy_row(d, src, OW);
          else
            for (int ow = 0; ow < OW; ow++) d[ow] = src[ow * s];
        }
      }
}

/* The adjoint of im2col: dxp [C, Hp, Wp] += scatter of col. */
static void col2im(float *dxp, const float *col, size_t ld, const conv_geom *g) {
  int K = g->K, s = g->stride, OW = g->OW, Hp = g->H + 2 * g->pad, Wp = g->W + 2 * g->pad;
  for (int c = 0; c < g->C; c++)
    for (int ki = 0; ki < K; ki++)
      for (int kj = 0; kj < K; kj++) {
        const float *restrict sr = col + ((size_t)(c * K + ki) * K + kj) * ld;
        float *restrict d = dxp + ((size_t)c * Hp + ki) * Wp + kj;
        for (int oh = 0; oh < g->OH; oh++, sr += OW, d += (size_t)s * Wp) {
          if (s == 1)
            add_row(d, sr, OW);
          else
            for (int ow = 0; ow < OW; ow++) d[ow * s] += sr[ow];
        }
      }
}

/* dx [C, H, W] = interior of dxp. */
static void unpad(float *restrict dx, const float *restrict dxp, const conv_geom *g) {
  int p = g->pad, Wp = g->W + 2 * p;
  for (int c = 0; c < g->C; c++)
    for (int h = 0; h < g->H; h++) {
      const float *src = dxp + ((size_t)c * (g->H + 2 * p) + h + p) * Wp + p;
      float *dst = dx + ((size_t)c * g->H + h) * g->W;
      copy_row(dst, src, g->W);
    }
}

/* Columns of nb samples side by side; xp is the padding workspace (unused without padding). */
static void im2col_chunk(float *col, float *xp, const float *inp, int nb, const conv_geom *g) {
  size_t P = (size_t)g->OH * g->OW, ld = (size_t)nb * P, in_len = (size_t)g->C * g->H * g->W;
  for (int s = 0; s < nb; s++) {
    const float *x = inp + s * in_len;
    if (g->pad) pad_input(xp, x, g), x = xp;
    im2col(col + s * P, ld, x, g);
  }
}

/* The arguments of one call, shared by its parts. */
typedef struct {
  float *out, *ws, *dinp, *dweight, *dbias;
  const float *inp, *weight, *bias, *dout;
  int B, OC, chunk;
  const conv_geom *g;
} conv_call;

/* Samples [b, b + nb) forward, with the workspace ws. */
static void forward_chunk(const conv_call *a, float *ws, int b, int nb) {
  const conv_geom *g = a->g;
  size_t P = (size_t)g->OH * g->OW, in_len = (size_t)g->C * g->H * g->W, out_len = (size_t)a->OC * P;
  size_t ld = (size_t)nb * P;
  int CKK = g->C * g->K * g->K, OC = a->OC;
  float *col = ws, *tmp = ws + (size_t)CKK * ld, *xp = tmp + (size_t)OC * ld;
  im2col_chunk(col, xp, a->inp + b * in_len, nb, g);
  if (nb == 1) {
    /* One sample: the gemm writes [OC, P] in place, onto the bias. */
    float *o = a->out + b * out_len;
    for (int oc = 0; oc < OC; oc++) {
      float v = a->bias ? a->bias[oc] : 0.0f;
      for (size_t p = 0; p < P; p++) o[oc * P + p] = v;
    }
    mat_mul(o, a->weight, col, OC, (int)ld, CKK, 0, 0, 1.0f, 1.0f);
    return;
  }
  mat_mul(tmp, a->weight, col, OC, (int)ld, CKK, 0, 0, 1.0f, 0.0f);
  for (int s = 0; s < nb; s++)
    for (int oc = 0; oc < OC; oc++) {
      const float *restrict t = tmp + (size_t)oc * ld + s * P;
      float *restrict o = a->out + (b + s) * out_len + oc * P;
      float v = a->bias ? a->bias[oc] : 0.0f;
      for (size_t p = 0; p < P; p++) o[p] = t[p] + v;
    }
}

/* Samples [b, b + nb) backward: dweight and dbias (when not NULL) are this part's accumulators. */
static void backward_chunk(const conv_call *a, float *ws, float *dweight, float *dbias, int b,
                           int nb) {
  const conv_geom *g = a->g;
  size_t P = (size_t)g->OH * g->OW, in_len = (size_t)g->C * g->H * g->W, out_len = (size_t)a->OC * P;
  size_t ld = (size_t)nb * P;
  int CKK = g->C * g->K * g->K, OC = a->OC;
  float *col = ws, *dtmp = ws + (size_t)CKK * ld, *xp = dtmp + (size_t)OC * ld;
  const float *dt = a->dout + b * out_len; /* one sample is already [OC, P] */
  if (nb > 1) {
    for (int s = 0; s < nb; s++)
      for (int oc = 0; oc < OC; oc++)
        memcpy(dtmp + (size_t)oc * ld + s * P, a->dout + (b + s) * out_len + oc * P,
               P * sizeof(float));
    dt = dtmp;
  }
  if (dbias)
    for (int oc = 0; oc < OC; oc++) dbias[oc] += hot_sum(dt + (size_t)oc * ld, ld);
  im2col_chunk(col, xp, a->inp + b * in_len, nb, g);
  mat_mul(dweight, dt, col, OC, CKK, (int)ld, 0, 1, 1.0f, 1.0f);
  if (!a->dinp) return;
  mat_mul(col, a->weight, dt, CKK, (int)ld, OC, 1, 0, 1.0f, 0.0f);
  for (int s = 0; s < nb; s++) {
    float *dx = a->dinp + (b + s) * in_len, *dxp = g->pad ? xp : dx;
    memset(dxp, 0, (g->pad ? padded_len(g) : in_len) * sizeof(float));
    col2im(dxp, col + s * P, ld, g);
    if (g->pad) unpad(dx, dxp, g);
  }
}

/* Part `part` takes a near-equal share of the samples and does them in near-equal chunks of at most
 * a->chunk: whole chunks per part would leave a part with twice the average work when the chunks are
 * few (B 256 in chunks of 15 on 16 threads: 18 chunks, two parts with two), and a last chunk of one
 * sample would starve its gemm. Returns the part's number of chunks; chunk c < that is [*c0, *c1). */
static int part_chunk(const conv_call *a, int part, int parts, int c, int *c0, int *c1) {
  long b0, b1, lo, hi;
  par_range(a->B, part, parts, &b0, &b1);
  int n = (int)((b1 - b0 + a->chunk - 1) / a->chunk);
  if (c < n) {
    par_range(b1 - b0, c, n, &lo, &hi);
    *c0 = (int)(b0 + lo), *c1 = (int)(b0 + hi);
  }
  return n;
}

static void forward_part(void *ctx, int part, int parts) {
  const conv_call *a = ctx;
  int c0, c1;
  float *ws = a->ws + (size_t)part * part_len(a->g, a->OC, a->chunk);
  for (int c = 0; c < part_chunk(a, part, parts, c, &c0, &c1); c++) forward_chunk(a, ws, c0, c1 - c0);
}

/* The first part adds into dweight and dbias; the others into their own slots, which the caller adds
 * in part order, so the sum does not depend on which thread finishes first. */
static void backward_part(void *ctx, int part, int parts) {
  const conv_call *a = ctx;
  const conv_geom *g = a->g;
  size_t nw = (size_t)a->OC * g->C * g->K * g->K;
  float *ws = a->ws + (size_t)part * part_len(g, a->OC, a->chunk), *dw = a->dweight, *db = a->dbias;
  if (part > 0) {
    dw = part_grads(a->ws, g, a->OC, a->chunk, part);
    memset(dw, 0, (nw + (size_t)a->OC) * sizeof(float));
    db = a->dbias ? dw + nw : NULL;
  }
  int c0, c1;
  for (int c = 0; c < part_chunk(a, part, parts, c, &c0, &c1); c++)
    backward_chunk(a, ws, dw, db, c0, c1 - c0);
}

void conv2d_forward(float *out, float *ws, const float *inp, const float *weight, const float *bias,
                    int B, int OC, const conv_geom *g, int chunk, int parts) {
  conv_call a = {.out = out, .ws = ws, .inp = inp, .weight = weight, .bias = bias, .B = B, .OC = OC,
                 .chunk = chunk, .g = g};
  par_run(parts, forward_part, &a);
}

void conv2d_backward(float *dinp, float *dweight, float *dbias, float *ws, const float *dout,
                     const float *inp, const float *weight, int B, int OC, const conv_geom *g,
                     int chunk, int parts) {
  conv_call a = {.ws = ws, .dinp = dinp, .dweight = dweight, .dbias = dbias, .inp = inp,
                 .weight = weight, .dout = dout, .B = B, .OC = OC, .chunk = chunk, .g = g};
  par_run(parts, backward_part, &a);
  size_t nw = (size_t)OC * g->C * g->K * g->K;
  for (int p = 1; p < parts; p++) {
    const float *dw = part_grads(ws, g, OC, chunk, p);
    vec_axpy(dweight, 1.0f, dw, nw);
    if (dbias) vec_axpy(dbias, 1.0f, dw + nw, (size_t)OC);
  }
}
