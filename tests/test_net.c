/* The network: building from JSON (shapes, sizes, every error case), end-to-end gradients, training
 * vs eval, clone, init, save/load. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/layers.h"
#include "core/net.h"
#include "core/tensor.h"
#include "testutil.h"

static json_t *spec(const char *text) {
  json_error_t e;
  json_t *j = json_loads(text, 0, &e);
  ck_assert_msg(j != NULL, "bad test JSON: %s", e.text);
  return j;
}

/* Builds from text; returns the code and leaves the message in moco_errmsg(). */
static int build(net *n, const char *text, net_shape in, int max_batch) {
  json_t *j = spec(text);
  moco_error_clear();
  int rc = net_build(n, j, in, max_batch, "model.backbone");
  json_decref(j);
  return rc;
}

static const char *small_cnn =
    "[{\"type\":\"conv2d\",\"out\":4,\"kernel\":3,\"pad\":1},{\"type\":\"batchnorm\"},{\"type\":"
    "\"relu\"},"
    "{\"type\":\"maxpool\",\"kernel\":2},{\"type\":\"conv2d\",\"out\":3,\"kernel\":3,\"stride\":2,"
    "\"bias\":false},"
    "{\"type\":\"flatten\"},{\"type\":\"linear\",\"out\":7},{\"type\":\"batchnorm\",\"momentum\":0."
    "2},"
    "{\"type\":\"relu\"},{\"type\":\"linear\",\"out\":5},{\"type\":\"l2norm\"}]";

START_TEST(build_infers_shapes_counts_and_segments) {
  net n;
  ck_assert_int_eq(build(&n, small_cnn, (net_shape){2, 9, 9}, 6), 0);
  ck_assert_int_eq(n.n_layers, 11);
  /* conv 2->4 keeps 9x9, pool to 4x4, conv stride 2: (4 - 3) / 2 + 1 = 1 -> 3x1x1 */
  ck_assert_int_eq(n.layers[3].out_shape.h, 4);
  ck_assert_int_eq(n.layers[4].out_shape.c, 3);
  ck_assert_int_eq(n.layers[4].out_shape.h, 1);
  ck_assert_int_eq(n.layers[5].out_shape.c, 3);
  ck_assert_int_eq(n.out_shape.c, 5);
  ck_assert_int_eq(n.out_shape.h, 1);
  size_t expect = 4 * 2 * 9 + 4 /* conv */ + 8 /* bn */ + 3 * 4 * 9 /* conv, no bias */ + 3 * 7 +
                  7 + 14 /* bn */ + 7 * 5 + 5;
  ck_assert_uint_eq(net_num_params(&n), expect);
  ck_assert_uint_eq(n.n_buffers, 2 * 4 + 2 * 7);
  double flops = 2.0 * (4 * 18 * 81 + 3 * 36 + 3 * 7 + 7 * 5);
  ck_assert(fabs(net_flops_per_sample(&n) - flops) < 0.5);
  /* Segments tile the arena; decay on conv and linear weights only. */
  size_t off = 0;
  int decayed = 0;
  for (int s = 0; s < n.n_segments; s++) {
    ck_assert_uint_eq(n.segments[s].off, off);
    off += n.segments[s].len;
    layer_kind k = n.layers[n.segments[s].layer].kind;
    int is_weight = n.segments[s].off == n.layers[n.segments[s].layer].w_off;
    ck_assert_int_eq(n.segments[s].no_decay,
                     !(is_weight && (k == LAYER_LINEAR || k == LAYER_CONV2D)));
    decayed += !n.segments[s].no_decay;
  }
  ck_assert_uint_eq(off, n.n_params);
  ck_assert_int_eq(decayed, 4);
  ck_assert(fabsf(n.layers[7].bn_momentum - 0.2f) < 1e-7f);
  ck_assert(fabsf(n.layers[1].bn_momentum - 0.1f) < 1e-7f);
  ck_assert(fabsf(n.layers[1].bn_eps - 1e-5f) < 1e-12f);
  ck_assert_int_eq(n.layers[3].stride, 2); /* maxpool stride defaults to the kernel */
  char line[512], tiny[8];
  size_t need = net_describe(&n, line, sizeof line);
  ck_assert_str_eq(line, "2x9x9 | conv2d 4 k3 s1 p1 -> 4x9x9 | batchnorm | relu | maxpool k2 s2 p0 "
                         "-> 4x4x4 | conv2d 3 k3 s2 p0 nobias -> 3x1x1 | flatten | "
                         "linear 7 -> 7x1x1 | batchnorm | relu | linear 5 -> 5x1x1 | l2norm");
  ck_assert_uint_eq(need, strlen(line));
  ck_assert_uint_eq(net_describe(&n, tiny, sizeof tiny), need);
  ck_assert_str_eq(tiny, "2x9x9 |");
  net_free(&n);
}
END_TEST

static void expect_error(const char *text, net_shape in, int code, const char *msg) {
  net n;
  int rc = build(&n, text, in, 4);
  ck_assert_msg(rc == code, "%s: got %s (%s)", text, moco_strerror(rc), moco_errmsg());
  ck_assert_msg(strstr(moco_errmsg(), msg) != NULL, "expected \"%s\" in \"%s\"", msg,
                moco_errmsg());
  ck_assert_ptr_null(n.params);
  ck_assert_ptr_null(n.layers);
}

START_TEST(build_errors_name_the_layer_and_field) {
  net_shape img = {1, 28, 28}, vec = {16, 1, 1};
  expect_error("[{\"type\":\"relu\"},{\"type\":\"dense\"}]", vec, MOCO_ECONFIG,
               "model.backbone[1].type: unknown layer type \"dense\"");
  expect_error("[{\"out\":3}]", vec, MOCO_ECONFIG, "model.backbone[0].type: missing field");
  expect_error("[{\"type\":7}]", vec, MOCO_ECONFIG,
               "model.backbone[0].type: must be a string, got integer");
  expect_error("[{\"type\":\"relu\"},{\"type\":\"relu\"},{\"type\":\"linear\"}]", vec, MOCO_ECONFIG,
               "model.backbone[2].out: missing field");
  expect_error("[{\"type\":\"linear\",\"out\":0}]", vec, MOCO_ECONFIG,
               "model.backbone[0].out: must be >= 1, got 0");
  expect_error("[{\"type\":\"linear\",\"out\":-3}]", vec, MOCO_ECONFIG, "must be >= 1, got -3");
  expect_error("[{\"type\":\"linear\",\"out\":\"8\"}]", vec, MOCO_ECONFIG,
               "model.backbone[0].out: must be an integer, got string");
  expect_error("[{\"type\":\"linear\",\"out\":8,\"bias\":1}]", vec, MOCO_ECONFIG,
               "model.backbone[0].bias: must be true or false, got integer");
  expect_error("[{\"type\":\"linear\",\"out\":8,\"kernel\":3}]", vec, MOCO_ECONFIG,
               "model.backbone[0].kernel: unknown key for linear (allowed: type, out, bias)");
  expect_error("[{\"type\":\"conv2d\",\"out\":8,\"kernal\":3}]", img, MOCO_ECONFIG,
               "model.backbone[0].kernal: unknown key for conv2d");
  expect_error("[{\"type\":\"conv2d\",\"out\":8}]", img, MOCO_ECONFIG,
               "model.backbone[0].kernel: missing field");
  expect_error("[{\"type\":\"conv2d\",\"out\":8,\"kernel\":3,\"stride\":0}]", img, MOCO_ECONFIG,
               "model.backbone[0].stride: must be >= 1, got 0");
  expect_error("[{\"type\":\"conv2d\",\"out\":8,\"kernel\":3,\"pad\":-1}]", img, MOCO_ECONFIG,
               "model.backbone[0].pad: must be >= 0, got -1");
  expect_error("[{\"type\":\"conv2d\",\"out\":8,\"kernel\":31}]", img, MOCO_ESHAPE,
               "model.backbone[0].kernel: 31 does not fit the input 28x28 with pad 0");
  expect_error("[{\"type\":\"maxpool\",\"kernel\":2,\"pad\":2}]", img, MOCO_ECONFIG,
               "model.backbone[0].pad: must be <= kernel/2 = 1, got 2");
  expect_error("[{\"type\":\"maxpool\"}]", img, MOCO_ECONFIG,
               "model.backbone[0].kernel: missing field");
  expect_error("[{\"type\":\"batchnorm\",\"momentum\":1.5}]", vec, MOCO_ECONFIG,
               "model.backbone[0].momentum: must be in [0, 1], got 1.5");
  expect_error("[{\"type\":\"batchnorm\",\"eps\":0}]", vec, MOCO_ECONFIG,
               "model.backbone[0].eps: must be in (0, 1], got 0");
  expect_error("[{\"type\":\"batchnorm\",\"eps\":\"small\"}]", vec, MOCO_ECONFIG,
               "must be a number, got string");
  expect_error("[{\"type\":\"relu\",\"out\":3}]", vec, MOCO_ECONFIG,
               "model.backbone[0].out: unknown key for relu");
  expect_error("[{\"type\":\"conv2d\",\"out\":32,\"kernel\":3,\"pad\":1},{\"type\":\"maxpool\","
               "\"kernel\":2},"
               "{\"type\":\"relu\"},{\"type\":\"linear\",\"out\":10}]",
               img, MOCO_ESHAPE,
               "model.backbone[3]: linear expects a vector input, got 32x14x14 (add flatten)");
  expect_error("[{\"type\":\"l2norm\"}]", img, MOCO_ESHAPE,
               "model.backbone[0]: l2norm expects a vector input");
  expect_error("[3]", vec, MOCO_ECONFIG, "model.backbone[0]: must be an object, got integer");
  expect_error("{\"type\":\"relu\"}", vec, MOCO_ECONFIG,
               "model.backbone: must be an array of layer objects");
  expect_error("[{\"type\":\"linear\",\"out\":2000000}]", vec, MOCO_ERANGE, "must be <= 1048576");
  expect_error("[{\"type\":\"relu\"}]", (net_shape){0, 1, 1}, MOCO_ESHAPE, "input shape 0x1x1");
  net n;
  json_t *j = spec("[{\"type\":\"relu\"}]");
  ck_assert_int_eq(net_build(&n, j, vec, 0, "head"), MOCO_ERANGE);
  ck_assert(strstr(moco_errmsg(), "head: max_batch must be in [1,") != NULL);
  json_decref(j);
}
END_TEST

/* ---- end-to-end gradient ---- */

/* The network's forward in double from the same parameters, layer by layer (the formulas test_layers
 * checks each float layer against). *regime hashes every ReLU's sign and every max-pool window's
 * winner: the piece of the piecewise-smooth loss the input falls in. */
typedef struct {
  net *n;
  float *x, *r;
  int B;
  double *a, *b; /* activations, [B, largest layer] each */
  uint64_t regime;
  double xhat2, scale; /* a training BatchNorm's largest xhat² and rstd·|γ| */
} net_ctx;

static void mix(uint64_t *h, uint64_t v) { *h = (*h ^ v) * 0x100000001b3ULL; }

static void ref_bn(const net *n, const layer *L, const double *x, double *y, int B, double *xhat2,
                   double *scale) {
  int C = L->in_shape.c, S = L->in_shape.h * L->in_shape.w;
  int G = n->bn_groups < 1 ? 1 : n->bn_groups > B ? B : n->bn_groups;
  const float *gamma = n->params + L->w_off, *beta = n->params + L->b_off, *rm = n->buffers + L->buf_off;
  for (int g = 0; g < G; g++) {
    int b0 = g * B / G, b1 = (g + 1) * B / G;
    for (int c = 0; c < C; c++) {
      double m = 0, v = 0, cnt = (double)(b1 - b0) * S;
      for (int b = b0; b < b1; b++)
        for (int p = 0; p < S; p++) m += x[((size_t)b * C + c) * S + p];
      m /= cnt;
      for (int b = b0; b < b1; b++)
        for (int p = 0; p < S; p++) v += pow(x[((size_t)b * C + c) * S + p] - m, 2);
      v /= cnt;
      if (!n->training) m = rm[c], v = rm[C + c];
      for (int b = b0; b < b1; b++)
        for (int p = 0; p < S; p++) {
          size_t i = ((size_t)b * C + c) * S + p;
          double xhat = (x[i] - m) / sqrt(v + L->bn_eps);
          if (n->training) *xhat2 = fmax(*xhat2, xhat * xhat);
          if (n->training) *scale = fmax(*scale, fabs(gamma[c]) / sqrt(v + L->bn_eps));
          y[i] = xhat * gamma[c] + beta[c];
        }
    }
  }
}

/* conv2d (w != NULL) or maxpool over one sample's planes */
static void ref_window(const net *n, const layer *L, const double *x, double *y, int B, uint64_t *h) {
  net_shape in = L->in_shape, out = L->out_shape;
  int K = L->kernel, conv = L->kind == LAYER_CONV2D;
  const float *w = n->params + L->w_off, *bias = L->bias ? n->params + L->b_off : NULL;
  for (int b = 0; b < B; b++)
    for (int o = 0; o < out.c; o++)
      for (int oh = 0; oh < out.h; oh++)
        for (int ow = 0; ow < out.w; ow++) {
          double s = conv ? (bias ? bias[o] : 0.0) : -INFINITY;
          int win = -1;
          for (int c = conv ? 0 : o; c < (conv ? in.c : o + 1); c++)
            for (int i = 0; i < K; i++)
              for (int j = 0; j < K; j++) {
                int ih = oh * L->stride - L->pad + i, iw = ow * L->stride - L->pad + j;
                if (ih < 0 || ih >= in.h || iw < 0 || iw >= in.w) continue;
                double v = x[(((size_t)b * in.c + c) * in.h + ih) * in.w + iw];
                if (conv) s += v * w[((o * in.c + c) * K + i) * K + j];
                else if (v > s) s = v, win = i * K + j;
              }
          if (!conv) mix(h, (uint64_t)win);
          y[(((size_t)b * out.c + o) * out.h + oh) * out.w + ow] = s;
        }
}

static void ref_layer(net_ctx *ctx, const layer *L, const double *x, double *y) {
  const net *n = ctx->n;
  int B = ctx->B;
  uint64_t *h = &ctx->regime;
  size_t in = net_shape_size(L->in_shape), out = net_shape_size(L->out_shape);
  const float *w = n->params + L->w_off;
  switch (L->kind) {
  case LAYER_LINEAR:
    for (int b = 0; b < B; b++)
      for (size_t o = 0; o < out; o++) {
        double s = L->bias ? n->params[L->b_off + o] : 0.0;
        for (size_t c = 0; c < in; c++) s += x[b * in + c] * w[o * in + c];
        y[b * out + o] = s;
      }
    break;
  case LAYER_BATCHNORM: ref_bn(n, L, x, y, B, &ctx->xhat2, &ctx->scale); break;
  case LAYER_RELU:
    for (size_t i = 0; i < (size_t)B * in; i++) {
      y[i] = x[i] > 0 ? x[i] : 0.0;
      mix(h, x[i] > 0);
    }
    break;
  case LAYER_CONV2D:
  case LAYER_MAXPOOL: ref_window(n, L, x, y, B, h); break;
  case LAYER_AVGPOOL:
    for (size_t p = 0; p < (size_t)B * out; p++) {
      double s = 0;
      for (size_t i = 0; i < in / out; i++) s += x[p * (in / out) + i];
      y[p] = s / (double)(in / out);
    }
    break;
  case LAYER_FLATTEN: memcpy(y, x, (size_t)B * in * sizeof *y); break;
  case LAYER_L2NORM:
    for (int b = 0; b < B; b++) {
      double s = 0;
      for (size_t i = 0; i < in; i++) s += x[b * in + i] * x[b * in + i];
      for (size_t i = 0; i < in; i++) y[b * in + i] = x[b * in + i] / fmax(sqrt(s), L2NORM_EPS);
    }
    break;
  }
}

static double net_ref_loss(void *ctx) {
  net_ctx *c = ctx;
  const net *n = c->n;
  size_t nin = net_shape_size(n->in_shape) * c->B;
  for (size_t i = 0; i < nin; i++) c->a[i] = c->x[i];
  c->regime = 0xcbf29ce484222325ULL;
  c->xhat2 = 0.0, c->scale = 1.0;
  for (int l = 0; l < n->n_layers; l++) {
    ref_layer(c, &n->layers[l], c->a, c->b);
    double *t = c->a;
    c->a = c->b, c->b = t;
  }
  double s = 0.0;
  for (size_t i = 0; i < net_shape_size(n->out_shape) * c->B; i++) s += c->a[i] * c->r[i];
  return s;
}

static uint64_t net_regime(void *ctx) { return ((net_ctx *)ctx)->regime; }

/* Gradient of the float network (net_backward) against differences of its double forward, on the
 * pieces where the loss is smooth (gc_spec.regime: a coordinate whose steps flip a ReLU or a max-pool
 * winner is skipped, and at most a tenth may be). Rounding of the backward, at the gradient's own scale:
 * each layer's backward is float sums bounded as in test_layers (linear and conv2d: fan-in + fan-out
 * terms; l2norm: (C + 4)(1 + C); elementwise layers a few roundings), and a training BatchNorm's
 * backward γ·rstd·(dy - mean(dy) - xhat·mean(dy·xhat)) amplifies what reaches it by up to
 * (2 + xhat²)·rstd·|γ| (both at their largest in the double forward; small groups have large rstd).
 * So atol = u·Σ_l (n_l + 8)·(2 + xhat²)·max(1, rstd·|γ|)·max|g|. */
static void check_net_grad(net_ctx *c, const char *what, float *x, const float *g, size_t n, double roundings) {
  net_ref_loss(c);
  double amp = c->n->training ? (2.0 + c->xhat2) * c->scale : 1.0;
  gc_spec s = {.name = what, .h = 1e-3, .atol = roundings * amp * 0x1p-24 * gc_max_abs(g, n), .richardson = 1,
               .max_checks = 200, .regime = net_regime};
  gc_result r = gc_check(net_ref_loss, c, x, g, n, &s);
  gc_assert(r, what);
  ck_assert_msg(r.skipped * 10 <= r.checked + r.skipped, "%s: %zu of %zu coordinates cross a kink", what,
                r.skipped, r.checked + r.skipped);
}

/* Σ over layers of (n_l + 8), n_l the terms of the layer's backward sums (see check_net_grad). */
static double net_roundings(const net *n, int B) {
  double sum = 0;
  for (int l = 0; l < n->n_layers; l++) {
    const layer *L = &n->layers[l];
    double in = (double)net_shape_size(L->in_shape), k2 = (double)L->kernel * L->kernel, nl = 0;
    switch (L->kind) {
    case LAYER_CONV2D: nl = L->in_shape.c * k2 + L->out_features * k2; break;
    case LAYER_LINEAR: nl = in + L->out_features; break;
    case LAYER_L2NORM: nl = (in + 4) * (1 + in); break;
    case LAYER_MAXPOOL: nl = k2; break;
    case LAYER_BATCHNORM: nl = 2.0 * B * L->in_shape.h * L->in_shape.w; break; /* dγ, dβ sums */
    default: break;
    }
    sum += nl + 8;
  }
  return sum;
}

static void net_gradcheck(const char *label, const char *text, net_shape in, int B, int groups, int training) {
  net n;
  ck_assert_msg(build(&n, text, in, B + 2) == 0, "%s", moco_errmsg());
  rng_t r;
  rng_init(&r, 12, RNG_STREAM_INIT);
  net_init(&n, &r);
  n.bn_groups = groups;
  n.training = training;
  size_t nin = net_shape_size(in) * B, nout = net_shape_size(n.out_shape) * B;
  size_t widest = net_shape_size(in);
  for (int l = 0; l < n.n_layers; l++) widest = widest > net_shape_size(n.layers[l].out_shape) ? widest : net_shape_size(n.layers[l].out_shape);
  net_ctx c = {&n, tensor_alloc(nin), tensor_alloc(nout), B, malloc(widest * B * sizeof(double)),
               malloc(widest * B * sizeof(double)), 0, 0, 0};
  float *dx = tensor_alloc(nin);
  fill_uniform(c.x, nin, &r, -1, 1);
  fill_uniform(c.r, nout, &r, -1, 1);
  /* Gamma and running statistics away from their defaults, so eval mode tests something. */
  for (int s = 0; s < n.n_segments; s++)
    if (n.layers[n.segments[s].layer].kind == LAYER_BATCHNORM)
      fill_uniform(n.params + n.segments[s].off, n.segments[s].len, &r, 0.5f, 1.5f);
  fill_uniform(n.buffers, n.n_buffers, &r, 0.5f, 1.5f);
  net_forward(&n, c.x, B);
  net_zero_grad(&n);
  ck_assert_int_eq(net_backward(&n, c.r, dx, B), 0);
  char what[96];
  double k = net_roundings(&n, B);
  snprintf(what, sizeof what, "net %s B %d G %d%s dx", label, B, groups, training ? "" : " eval");
  check_net_grad(&c, what, c.x, dx, nin, k);
  snprintf(what, sizeof what, "net %s B %d G %d%s dparams", label, B, groups, training ? "" : " eval");
  check_net_grad(&c, what, n.params, n.grads, n.n_params, k);
  /* Backward without dx gives the same parameter gradients (the first layer skips its input gradient). */
  float *g1 = tensor_alloc(n.n_params);
  memcpy(g1, n.grads, n.n_params * sizeof(float));
  net_forward(&n, c.x, B);
  net_zero_grad(&n);
  ck_assert_int_eq(net_backward(&n, c.r, NULL, B), 0);
  for (size_t i = 0; i < n.n_params; i++) ck_assert(g1[i] == n.grads[i]);
  tensor_free(g1);
  tensor_free(c.x), tensor_free(c.r), tensor_free(dx);
  free(c.a), free(c.b);
  net_free(&n);
}

START_TEST(whole_network_gradients_match_finite_differences) {
  const char *cnn =
      "[{\"type\":\"conv2d\",\"out\":3,\"kernel\":3,\"pad\":1},{\"type\":\"batchnorm\"},{\"type\":"
      "\"relu\"},"
      "{\"type\":\"maxpool\",\"kernel\":2},{\"type\":\"flatten\"},{\"type\":\"linear\",\"out\":6},"
      "{\"type\":\"batchnorm\"},{\"type\":\"relu\"},{\"type\":\"linear\",\"out\":5},{\"type\":"
      "\"l2norm\"}]";
  net_gradcheck("cnn", cnn, (net_shape){2, 6, 5}, 4, 1, 1);
  net_gradcheck("cnn", cnn, (net_shape){2, 6, 5}, 6, 2, 1);
  net_gradcheck("cnn", cnn, (net_shape){2, 6, 5}, 3, 1, 0);
  const char *gap = "[{\"type\":\"conv2d\",\"out\":4,\"kernel\":3,\"stride\":2,\"bias\":false},"
                    "{\"type\":\"batchnorm\"},{\"type\":\"relu\"},{\"type\":\"avgpool\"},"
                    "{\"type\":\"linear\",\"out\":3}]";
  net_gradcheck("gap", gap, (net_shape){1, 7, 7}, 5, 1, 1);
  const char *mlp = "[{\"type\":\"linear\",\"out\":9},{\"type\":\"batchnorm\"},{\"type\":\"relu\"},"
                    "{\"type\":\"linear\",\"out\":4,\"bias\":false},{\"type\":\"l2norm\"}]";
  net_gradcheck("mlp", mlp, (net_shape){7, 1, 1}, 1, 1, 0);
  net_gradcheck("mlp", mlp, (net_shape){7, 1, 1}, 9, 3, 1);
  /* Flattens hand their input and gradient through (no copy): first, twice in a row, last. */
  const char *flat = "[{\"type\":\"flatten\"},{\"type\":\"linear\",\"out\":4},{\"type\":\"relu\"},"
                     "{\"type\":\"flatten\"},{\"type\":\"flatten\"},{\"type\":\"linear\",\"out\":3}]";
  net_gradcheck("flat", flat, (net_shape){2, 3, 3}, 5, 1, 1);
  const char *tail = "[{\"type\":\"conv2d\",\"out\":2,\"kernel\":3,\"pad\":1},{\"type\":\"relu\"},"
                     "{\"type\":\"flatten\"}]";
  net_gradcheck("tail", tail, (net_shape){1, 4, 4}, 3, 1, 1);
}
END_TEST

START_TEST(forward_keeps_layer_outputs_and_checks_batch) {
  net n;
  ck_assert_int_eq(
      build(&n, "[{\"type\":\"linear\",\"out\":3},{\"type\":\"relu\"}]", (net_shape){2, 1, 1}, 4),
      0);
  rng_t r;
  rng_init(&r, 1, RNG_STREAM_INIT);
  net_init(&n, &r);
  float x[8] = {1, -2, 0.5f, 3, -1, -1, 2, 0};
  const float *y = net_forward(&n, x, 4);
  ck_assert_ptr_eq(y, net_layer_output(&n, 1));
  for (int i = 0; i < 12; i++) {
    float z = net_layer_output(&n, 0)[i];
    ck_assert(y[i] == (z > 0 ? z : 0));
  }
  ck_assert_ptr_null(net_forward(&n, x, 5));
  ck_assert_ptr_null(net_forward(&n, x, 0));
  net_forward(&n, x, 2);
  float dy[12] = {0};
  ck_assert_int_eq(net_backward(&n, dy, NULL, 3), MOCO_ESTATE);
  ck_assert_int_eq(net_backward(&n, dy, NULL, 2), 0);
  net_free(&n);
  /* An empty layer list is the identity. */
  ck_assert_int_eq(build(&n, "[]", (net_shape){3, 1, 1}, 2), 0);
  float dx[3];
  y = net_forward(&n, x, 1);
  ck_assert(y[0] == 1 && y[2] == 0.5f);
  ck_assert_int_eq(net_backward(&n, x, dx, 1), 0);
  ck_assert(dx[1] == -2);
  net_free(&n);
}
END_TEST

START_TEST(init_is_deterministic_and_pytorch_like) {
  net a, b;
  ck_assert_int_eq(build(&a, small_cnn, (net_shape){2, 9, 9}, 2), 0);
  ck_assert_int_eq(build(&b, small_cnn, (net_shape){2, 9, 9}, 2), 0);
  rng_t r1, r2;
  rng_init(&r1, 5, RNG_STREAM_INIT);
  rng_init(&r2, 5, RNG_STREAM_INIT);
  net_init(&a, &r1);
  net_init(&b, &r2);
  ck_assert(memcmp(a.params, b.params, a.n_params * sizeof(float)) == 0);
  /* conv 0: fan_in 2*3*3 = 18, bound 1/sqrt(18); BN gamma 1, beta 0, running mean 0, var 1. */
  float bound = 1.0f / sqrtf(18.0f), mx = 0;
  for (size_t i = 0; i < a.layers[0].w_len; i++)
    mx = fmaxf(mx, fabsf(a.params[a.layers[0].w_off + i]));
  ck_assert(mx <= bound && mx > 0.8f * bound);
  const layer *bn = &a.layers[1];
  for (int c = 0; c < 4; c++) {
    ck_assert(a.params[bn->w_off + c] == 1.0f && a.params[bn->b_off + c] == 0.0f);
    ck_assert(a.buffers[bn->buf_off + c] == 0.0f && a.buffers[bn->buf_off + 4 + c] == 1.0f);
  }
  rng_init(&r2, 6, RNG_STREAM_INIT);
  net_init(&b, &r2);
  ck_assert(memcmp(a.params, b.params, a.n_params * sizeof(float)) != 0);
  net_free(&a);
  net_free(&b);
}
END_TEST

START_TEST(clone_copies_parameters_and_runs_alone) {
  net a, b;
  ck_assert_int_eq(build(&a, small_cnn, (net_shape){2, 9, 9}, 3), 0);
  rng_t r;
  rng_init(&r, 8, RNG_STREAM_INIT);
  net_init(&a, &r);
  a.training = 0;
  ck_assert_int_eq(net_clone(&b, &a), 0);
  ck_assert(b.params != a.params && b.layers[0].out != a.layers[0].out);
  ck_assert(memcmp(a.params, b.params, a.n_params * sizeof(float)) == 0);
  ck_assert(a.arch_hash == b.arch_hash && b.training == 0);
  float x[3 * 162];
  fill_uniform(x, 3 * 162, &r, -1, 1);
  const float *ya = net_forward(&a, x, 3), *yb = net_forward(&b, x, 3);
  ck_assert(memcmp(ya, yb, 15 * sizeof(float)) == 0);
  net_free(&a);
  net_free(&b);
}
END_TEST

START_TEST(save_load_round_trip_is_bit_exact) {
  net a, b;
  ck_assert_int_eq(build(&a, small_cnn, (net_shape){2, 9, 9}, 3), 0);
  ck_assert_int_eq(build(&b, small_cnn, (net_shape){2, 9, 9}, 5), 0);
  rng_t r;
  rng_init(&r, 9, RNG_STREAM_INIT);
  net_init(&a, &r);
  fill_uniform(a.buffers, a.n_buffers, &r, 0, 2);
  blob_writer w;
  blob_writer_init(&w);
  net_save(&a, &w);
  ck_assert_int_eq(w.err, 0);
  blob_reader rd;
  blob_reader_init(&rd, w.data, w.len, "w.bin");
  ck_assert_int_eq(net_load(&b, &rd), 0);
  ck_assert_uint_eq(rd.pos, w.len);
  ck_assert(memcmp(a.params, b.params, a.n_params * sizeof(float)) == 0);
  ck_assert(memcmp(a.buffers, b.buffers, a.n_buffers * sizeof(float)) == 0);
  /* A corrupted byte is caught by the section checksum and leaves the network untouched. */
  w.data[40] ^= 1;
  float keep = b.params[0];
  blob_reader_init(&rd, w.data, w.len, "w.bin");
  ck_assert_int_eq(net_load(&b, &rd), MOCO_ECHECKSUM);
  ck_assert(b.params[0] == keep);
  blob_writer_free(&w);
  net_free(&a);
  net_free(&b);
}
END_TEST

static void expect_refused(const char *saved, const char *here, const char *msg) {
  net a, b;
  ck_assert_int_eq(build(&a, saved, (net_shape){8, 1, 1}, 2), 0);
  ck_assert_int_eq(build(&b, here, (net_shape){8, 1, 1}, 2), 0);
  blob_writer w;
  blob_writer_init(&w);
  net_save(&a, &w);
  vec_fill(b.params, 3.0f, b.n_params);
  blob_reader rd;
  blob_reader_init(&rd, w.data, w.len, "ckpt.bin");
  ck_assert_int_eq(net_load(&b, &rd), MOCO_ESHAPE);
  ck_assert_msg(strstr(moco_errmsg(), msg) != NULL, "expected \"%s\" in \"%s\"", msg,
                moco_errmsg());
  for (size_t i = 0; i < b.n_params; i++) ck_assert(b.params[i] == 3.0f);
  blob_writer_free(&w);
  net_free(&a);
  net_free(&b);
}

START_TEST(load_refuses_another_architecture) {
  const char *base =
      "[{\"type\":\"linear\",\"out\":6},{\"type\":\"batchnorm\"},{\"type\":\"relu\"},"
      "{\"type\":\"linear\",\"out\":4}]";
  expect_refused(base,
                 "[{\"type\":\"linear\",\"out\":6},{\"type\":\"batchnorm\"},{\"type\":\"relu\"},"
                 "{\"type\":\"linear\",\"out\":5}]",
                 "ckpt.bin: architecture differs: layer 3 (linear): out 4 in the blob, 5 here");
  expect_refused(base,
                 "[{\"type\":\"linear\",\"out\":6},{\"type\":\"relu\"},{\"type\":\"relu\"},"
                 "{\"type\":\"linear\",\"out\":4}]",
                 "layer 1 is batchnorm in the blob, relu here");
  expect_refused(base,
                 "[{\"type\":\"linear\",\"out\":6},{\"type\":\"batchnorm\"},{\"type\":\"relu\"},"
                 "{\"type\":\"linear\",\"out\":4,\"bias\":false}]",
                 "layer 3 (linear): bias 1 in the blob, 0 here");
  expect_refused(base,
                 "[{\"type\":\"linear\",\"out\":6},{\"type\":\"batchnorm\"},{\"type\":\"relu\"}]",
                 "4 layers in the blob, 3 here");
}
END_TEST

Suite *net_suite(void) {
  Suite *s = suite_create("net");
  TCase *tc = tcase_create("net");
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, build_infers_shapes_counts_and_segments);
  tcase_add_test(tc, build_errors_name_the_layer_and_field);
  tcase_add_test(tc, whole_network_gradients_match_finite_differences);
  tcase_add_test(tc, forward_keeps_layer_outputs_and_checks_batch);
  tcase_add_test(tc, init_is_deterministic_and_pytorch_like);
  tcase_add_test(tc, clone_copies_parameters_and_runs_alone);
  tcase_add_test(tc, save_load_round_trip_is_bit_exact);
  tcase_add_test(tc, load_refuses_another_architecture);
  suite_add_tcase(s, tc);
  return s;
}
