/* Pooling: MaxPool2d (kernel, stride, implicit -inf padding) and global average pooling. */
#include "core/layers.h"
#include "core/par.h"

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

/* Window (oh, ow) of a plane: rows [*ha, *hb), columns [*wa, *wb), clipped to the plane (implicit -inf
 * padding; PyTorch requires pad <= K/2, so every window holds at least one real pixel). */
static void window(const conv_geom *g, int oh, int ow, int *ha, int *hb, int *wa, int *wb) {
  int h0 = oh * g->stride - g->pad, w0 = ow * g->stride - g->pad;
  *ha = h0 < 0 ? 0 : h0, *hb = h0 + g->K > g->H ? g->H : h0 + g->K;
  *wa = w0 < 0 ? 0 : w0, *wb = w0 + g->K > g->W ? g->W : w0 + g->K;
}

/* Any geometry: one input plane [H, W] to one output plane [OH, OW] and its winners' offsets. */
static void maxpool_plane(float *out, int32_t *idx, const float *inp, const conv_geom *g) {
  for (int oh = 0; oh < g->OH; oh++)
    for (int ow = 0; ow < g->OW; ow++) {
      int ha, hb, wa, wb;
      window(g, oh, ow, &ha, &hb, &wa, &wb);
      int at = ha * g->W + wa;
      for (int h = ha; h < hb; h++)
        for (int w = wa; w < wb; w++) at = inp[h * g->W + w] > inp[at] ? h * g->W + w : at;
      out[oh * g->OW + ow] = inp[at];
      idx[oh * g->OW + ow] = at;
    }
}

/* The common 2x2 window with stride 2 and no padding: n outputs of one row from input rows r0, r1 (the
 * first at offset `at` of its plane), written as selects so that it vectorises; the per-window loops
 * above cost several times more on random data. The winners are 0/1 integers, which GCC turns into
 * vector selects where ternaries on them stay branches; the first maximum in scan order wins, as above.
 * Rows are short (14 or 7 outputs): a loop over a row would do most of them in its scalar tail, so a
 * row is done in blocks of a constant width, the last block overlapping the previous (conv.c's
 * copy_row does the same; the overlap writes the same values twice). */
#define POOL_BLOCK(NAME, WIDTH)                                                                      \
  static inline void NAME(float *restrict o, int32_t *restrict ix, const float *restrict r0,          \
                          const float *restrict r1, int W, int at) {                                 \
    for (int j = 0; j < (WIDTH); j++) {                                                              \
      float a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];                      \
      int32_t g1 = b > a, g2 = d > c;                                                                \
      float m1 = g1 ? b : a, m2 = g2 ? d : c;                                                        \
      int32_t s = m2 > m1;                                                                           \
      o[j] = s ? m2 : m1;                                                                            \
      ix[j] = at + 2 * j + g1 + s * (W + g2 - g1);                                                   \
    }                                                                                                \
  }
POOL_BLOCK(pool_block8, 8)
POOL_BLOCK(pool_block4, 4)
POOL_BLOCK(pool_block1, 1)

/* GCC would vectorise the loop over blocks (which never runs 16 blocks of a row) instead of each
 * block's body; without loop vectorisation here each block becomes a few vector instructions (SLP). */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-loop-vectorize")))
#endif
static void maxpool_row_2x2(float *restrict o, int32_t *restrict ix, const float *restrict r0,
                            const float *restrict r1, int OW, int W, int at) {
#define POOL_AT(ow) o + (ow), ix + (ow), r0 + 2 * (ow), r1 + 2 * (ow), W, at + 2 * (ow)
  int ow = 0;
  if (OW >= 8) {
    for (; ow + 8 <= OW; ow += 8) pool_block8(POOL_AT(ow));
    if (ow < OW) pool_block8(POOL_AT(OW - 8));
  } else if (OW >= 4) {
    pool_block4(POOL_AT(0));
    pool_block4(POOL_AT(OW - 4));
  } else {
    for (; ow < OW; ow++) pool_block1(POOL_AT(ow));
  }
#undef POOL_AT
}

static void maxpool_plane_2x2(float *out, int32_t *idx, const float *inp, const conv_geom *g) {
  int W = g->W, OW = g->OW;
  for (int oh = 0; oh < g->OH; oh++) {
    const float *r0 = inp + (size_t)2 * oh * W;
    maxpool_row_2x2(out + (size_t)oh * OW, idx + (size_t)oh * OW, r0, r0 + W, OW, W, 2 * oh * W);
  }
}

/* Each window's gradient goes to its winner, found by the forward: the plane is zeroed and the
 * gradients added (overlapping windows, stride < kernel, may share a winner). Reads a quarter of what
 * comparing the input with the output again would (2x2 windows), and writes the plane once. */
static void maxpool_plane_backward(float *restrict dinp, const float *restrict dout,
                                   const int32_t *restrict idx, const conv_geom *g) {
  memset(dinp, 0, (size_t)g->H * g->W * sizeof(float));
  for (int o = 0; o < g->OH * g->OW; o++) dinp[idx[o]] += dout[o];
}

static int is_2x2(const conv_geom *g) { return g->K == 2 && g->stride == 2 && g->pad == 0; }

typedef struct {
  float *dinp, *out;
  int32_t *idx;
  const int32_t *fwd_idx;
  const float *inp, *dout;
  const conv_geom *g;
  long planes;
} pool_call;

static void maxpool_forward_part(void *ctx, int part, int parts) {
  const pool_call *a = ctx;
  const conv_geom *g = a->g;
  size_t in_plane = (size_t)g->H * g->W, out_plane = (size_t)g->OH * g->OW;
  long lo, hi;
  par_range(a->planes, part, parts, &lo, &hi);
  for (size_t p = (size_t)lo; p < (size_t)hi; p++) {
    if (is_2x2(g))
      maxpool_plane_2x2(a->out + p * out_plane, a->idx + p * out_plane, a->inp + p * in_plane, g);
    else
      maxpool_plane(a->out + p * out_plane, a->idx + p * out_plane, a->inp + p * in_plane, g);
  }
}

static void maxpool_backward_part(void *ctx, int part, int parts) {
  const pool_call *a = ctx;
  const conv_geom *g = a->g;
  size_t in_plane = (size_t)g->H * g->W, out_plane = (size_t)g->OH * g->OW;
  long lo, hi;
  par_range(a->planes, part, parts, &lo, &hi);
  for (size_t p = (size_t)lo; p < (size_t)hi; p++)
    maxpool_plane_backward(a->dinp + p * in_plane, a->dout + p * out_plane, a->fwd_idx + p * out_plane, g);
}

static int pool_parts(long planes, const conv_geom *g) {
  return par_parts(planes * g->H * g->W, PAR_MIN_FLOATS); /* counted in input floats */
}

void maxpool_forward(float *out, int32_t *idx, const float *inp, int B, const conv_geom *g) {
  pool_call a = {.out = out, .idx = idx, .inp = inp, .g = g, .planes = (long)B * g->C};
  par_run(pool_parts(a.planes, g), maxpool_forward_part, &a);
}

void maxpool_backward(float *dinp, const float *dout, const int32_t *idx, int B, const conv_geom *g) {
  pool_call a = {.dinp = dinp, .dout = dout, .fwd_idx = idx, .g = g, .planes = (long)B * g->C};
  par_run(pool_parts(a.planes, g), maxpool_backward_part, &a);
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
