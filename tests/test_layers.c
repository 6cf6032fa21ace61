/* The layer functions: finite-difference gradients of inputs and parameters at several shapes (batch 1,
 * sizes that are not multiples of 4 or 8), Conv2d and MaxPool against naive loops, BatchNorm modes. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/layers.h"
#include "core/par.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "testutil.h"

/* One layer under test: forward maps (x, w, b) to out; the loss is sum(out * dout) for a fixed random
 * dout, so its gradient is exactly what backward computes from dout. ref is the same map in double. */
typedef struct lt lt;
struct lt {
  void (*forward)(lt *t);
  void (*backward)(lt *t); /* dx (written), dw, db (added) */
  double (*ref)(const lt *t, size_t o); /* output o by the layer's formula in double */
  uint64_t (*regime)(void *t); /* NULL, or the piece of a piecewise-smooth map x falls in (gc_spec) */
  float *x, *w, *b, *out, *dout, *dx, *dw, *db;
  size_t nx, nw, nb, nout;
  int B, C, OC, S, chunk, parts;
  conv_geom g;
  bn_dims d;
  float *saved, *ws, *rm, *rv;
};

static float *fresh(size_t n, rng_t *r, float lo, float hi) {
  float *p = tensor_calloc(n ? n : 1);
  if (r) fill_uniform(p, n, r, lo, hi);
  return p;
}

static void lt_alloc(lt *t, size_t nx, size_t nw, size_t nb, size_t nout, rng_t *r) {
  t->nx = nx, t->nw = nw, t->nb = nb, t->nout = nout;
  t->x = fresh(nx, r, -1, 1);
  t->w = fresh(nw, r, -1, 1);
  t->b = fresh(nb, r, -1, 1);
  t->out = fresh(nout, NULL, 0, 0);
  t->dout = fresh(nout, r, -1, 1);
  t->dx = fresh(nx, NULL, 0, 0);
  t->dw = fresh(nw, NULL, 0, 0);
  t->db = fresh(nb, NULL, 0, 0);
}

static void lt_free(lt *t) {
  float *p[] = {t->x,  t->w,  t->b,     t->out, t->dout, t->dx,
                t->dw, t->db, t->saved, t->ws,  t->rm,   t->rv};
  for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) tensor_free(p[i]);
  memset(t, 0, sizeof *t);
}

/* sum(ref_out * dout) in double: the loss the differences are taken on. */
static double lt_ref_loss(void *ctx) {
  const lt *t = ctx;
  double s = 0.0;
  for (size_t o = 0; o < t->nout; o++) s += t->ref(t, o) * t->dout[o];
  return s;
}

/* Runs backward at the current point (dw, db pre-filled with 0.5 to prove they are added to) and
 * checks every gradient with gc_check on the double formula of the layer (t->ref), which first has to
 * agree with the float forward to e_out per output. The differences' rounding is then 1e-16 of the
 * loss over h, their truncation is estimated per coordinate (richardson; 0 where the loss is linear
 * in the coordinate: weights, biases, and the inputs of linear maps), and what remains is the float
 * rounding of the backward, which each test bounds by e_grad (γ_n: a float sum of n terms is off by at
 * most n·u·Σ|terms|; inputs, weights and dout lie in [−1, 1]). The 0.5 round trip through dw and db
 * costs them u·(0.5 + |g|) more. */
static void lt_check(lt *t, const char *name, double h, double e_out, double e_grad) {
  t->forward(t);
  for (size_t o = 0; o < t->nout; o++)
    ck_assert_msg(fabs(t->out[o] - t->ref(t, o)) <= e_out, "%s: out[%zu] %.9g, formula %.9g", name, o,
                  t->out[o], t->ref(t, o));
  vec_fill(t->dw, 0.5f, t->nw);
  vec_fill(t->db, 0.5f, t->nb);
  t->backward(t);
  for (size_t i = 0; i < t->nw; i++) t->dw[i] -= 0.5f;
  for (size_t i = 0; i < t->nb; i++) t->db[i] -= 0.5f;
  const double u = 0x1p-24;
  double mag = 0.0; /* the double sum of the loss: 2^-52 of its magnitudes per term, over h */
  for (size_t o = 0; o < t->nout; o++) mag += fabs(t->ref(t, o) * t->dout[o]);
  e_grad += t->nout * 0x1p-52 * mag / h;
  char what[96];
  snprintf(what, sizeof what, "%s dx", name);
  gc_spec sx = {.name = what, .h = h, .atol = e_grad, .richardson = 1, .max_checks = 300,
                .regime = t->regime};
  gc_assert(gc_check(lt_ref_loss, t, t->x, t->dx, t->nx, &sx), what);
  if (t->nw) {
    snprintf(what, sizeof what, "%s dw", name);
    gc_spec sw = sx;
    sw.atol += u * (0.5 + gc_max_abs(t->dw, t->nw));
    gc_assert(gc_check(lt_ref_loss, t, t->w, t->dw, t->nw, &sw), what);
  }
  if (t->nb) {
    snprintf(what, sizeof what, "%s db", name);
    gc_spec sb = sx;
    sb.atol += u * (0.5 + gc_max_abs(t->db, t->nb));
    gc_assert(gc_check(lt_ref_loss, t, t->b, t->db, t->nb, &sb), what);
  }
}

/* γ_n: n·u·(bound on the magnitudes a float sum of n terms adds up). */
static double sum_err(double n, double magnitudes) { return n * 0x1p-24 * magnitudes; }

static int imax(int a, int b) { return a > b ? a : b; }

/* ---- linear ---- */

static double lin_ref(const lt *t, size_t o) {
  int b = (int)(o / t->OC), oc = (int)(o % t->OC);
  double s = t->nb ? t->b[oc] : 0.0;
  for (int c = 0; c < t->C; c++) s += (double)t->x[b * t->C + c] * t->w[oc * t->C + c];
  return s;
}
static void lin_f(lt *t) {
  linear_forward(t->out, t->x, t->w, t->nb ? t->b : NULL, t->B, t->C, t->OC);
}
static void lin_b(lt *t) {
  linear_backward(t->dx, t->dw, t->nb ? t->db : NULL, t->dout, t->x, t->w, t->B, t->C, t->OC);
}

START_TEST(linear_gradients_match_finite_differences) {
  static const int shapes[][4] = {{1, 3, 2, 1}, {5, 7, 3, 1}, {4, 9, 13, 0}, {3, 16, 8, 1}};
  rng_t r;
  rng_init(&r, 1, 1);
  for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
    int B = shapes[k][0], C = shapes[k][1], OC = shapes[k][2], bias = shapes[k][3];
    lt t = {.forward = lin_f, .backward = lin_b, .ref = lin_ref, .B = B, .C = C, .OC = OC};
    lt_alloc(&t, (size_t)B * C, (size_t)OC * C, bias ? OC : 0, (size_t)B * OC, &r);
    /* out: C products and the bias; dx: OC terms, dw and db: B terms */
    int n = imax(OC, B);
    lt_check(&t, "linear", 0.5, sum_err(C + 1, C + 1), sum_err(n, n));
    lt_free(&t);
  }
}
END_TEST

START_TEST(linear_forward_matches_naive) {
  rng_t r;
  rng_init(&r, 2, 1);
  lt t = {.B = 3, .C = 5, .OC = 4};
  lt_alloc(&t, 15, 20, 4, 12, &r);
  lin_f(&t);
  for (int b = 0; b < 3; b++)
    for (int o = 0; o < 4; o++) {
      double s = t.b[o];
      for (int c = 0; c < 5; c++) s += (double)t.x[b * 5 + c] * t.w[o * 5 + c];
      ck_assert(fabs(s - t.out[b * 4 + o]) < 1e-5);
    }
  lt_free(&t);
}
END_TEST

/* ---- relu, flatten, avgpool, l2norm ---- */

static double relu_ref(const lt *t, size_t o) { return t->x[o] > 0 ? t->x[o] : 0.0; }
static double flat_ref(const lt *t, size_t o) { return t->x[o]; }
static double avg_ref(const lt *t, size_t o) {
  double s = 0.0;
  for (int i = 0; i < t->S; i++) s += t->x[o * t->S + i];
  return s / t->S;
}
static double l2_ref(const lt *t, size_t o) {
  size_t row = o / t->C;
  double n2 = 0.0;
  for (int c = 0; c < t->C; c++) n2 += (double)t->x[row * t->C + c] * t->x[row * t->C + c];
  return n2 > 0 ? t->x[o] / sqrt(n2) : 0.0;
}
static void relu_f(lt *t) { relu_forward(t->out, t->x, t->nx); }
static void relu_b(lt *t) { relu_backward(t->dx, t->dout, t->out, t->nx); }
static void flat_f(lt *t) { flatten_forward(t->out, t->x, t->nx); }
static void flat_b(lt *t) { flatten_backward(t->dx, t->dout, t->nx); }
static void avg_f(lt *t) { avgpool_forward(t->out, t->x, t->B, t->C, t->S); }
static void avg_b(lt *t) { avgpool_backward(t->dx, t->dout, t->B, t->C, t->S); }
static void l2_f(lt *t) { l2norm_forward(t->out, t->saved, t->x, t->B, t->C); }
static void l2_b(lt *t) { l2norm_backward(t->dx, t->dout, t->out, t->saved, t->B, t->C); }

START_TEST(elementwise_gradients_match_finite_differences) {
  rng_t r;
  rng_init(&r, 3, 1);
  static const int sizes[] = {1, 7, 37};
  for (int k = 0; k < 3; k++) {
    size_t n = (size_t)sizes[k] * 3;
    lt t = {.forward = relu_f, .backward = relu_b, .ref = relu_ref};
    lt_alloc(&t, n, 0, 0, n, &r);
    /* Away from the kink by more than twice the step; both directions are exact. */
    for (size_t i = 0; i < n; i++) t.x[i] += t.x[i] >= 0 ? 0.05f : -0.05f;
    lt_check(&t, "relu", 1e-2, 0, 0);
    lt_free(&t);
    lt f = {.forward = flat_f, .backward = flat_b, .ref = flat_ref};
    lt_alloc(&f, n, 0, 0, n, &r);
    lt_check(&f, "flatten", 0.5, 0, 0);
    lt_free(&f);
  }
  static const int shapes[][3] = {{1, 3, 5}, {2, 5, 49}, {3, 4, 1}};
  for (int k = 0; k < 3; k++) {
    lt t = {.forward = avg_f,
            .backward = avg_b,
            .ref = avg_ref,
            .B = shapes[k][0],
            .C = shapes[k][1],
            .S = shapes[k][2]};
    lt_alloc(&t, (size_t)t.B * t.C * t.S, 0, 0, (size_t)t.B * t.C, &r);
    /* out: a sum of S terms of at most 1, over S; dx: dout / S, one rounding */
    lt_check(&t, "avgpool", 0.5, sum_err(t.S + 1, 1), sum_err(1, 1));
    lt_free(&t);
  }
}
END_TEST

START_TEST(l2norm_gradient_is_exact) {
  rng_t r;
  rng_init(&r, 4, 1);
  static const int shapes[][2] = {{1, 5}, {4, 13}, {3, 128}};
  for (int k = 0; k < 3; k++) {
    lt t = {.forward = l2_f, .backward = l2_b, .ref = l2_ref, .B = shapes[k][0], .C = shapes[k][1]};
    lt_alloc(&t, (size_t)t.B * t.C, 0, 0, (size_t)t.B * t.C, &r);
    t.saved = fresh(t.B, NULL, 0, 0);
    /* out = x / |x|: |x|² sums C positive terms (relative error C·u), a root and a division; dx =
     * (dout - out (out . dout)) / |x|: out . dout sums C terms of at most 1 */
    double nmin = INFINITY;
    for (int b = 0; b < t.B; b++) {
      double n2 = 0.0;
      for (int c = 0; c < t.C; c++) n2 += (double)t.x[b * t.C + c] * t.x[b * t.C + c];
      nmin = fmin(nmin, sqrt(n2));
    }
    lt_check(&t, "l2norm", 1e-3, sum_err(t.C + 4, 1), sum_err(t.C + 4, 1 + t.C) / nmin);
    for (int b = 0; b < t.B; b++) {
      double s = 0;
      for (int i = 0; i < t.C; i++) s += (double)t.out[b * t.C + i] * t.out[b * t.C + i];
      ck_assert(fabs(s - 1.0) < 1e-5);
    }
    lt_free(&t);
  }
  /* A zero row stays zero and its gradient is the clamped map's. */
  float x[3] = {0}, y[3], nrm, dy[3] = {1e-12f, 0, 0}, dx[3];
  l2norm_forward(y, &nrm, x, 1, 3);
  ck_assert(y[0] == 0 && y[1] == 0 && y[2] == 0);
  l2norm_backward(dx, dy, y, &nrm, 1, 3);
  ck_assert(fabsf(dx[0] - 1.0f) < 1e-5f);
}
END_TEST

/* ---- batchnorm ---- */

static void bn_f(lt *t) {
  batchnorm_forward(t->out, t->saved, t->rm, t->rv, t->x, t->w, t->b, &t->d);
}
static void bn_b(lt *t) {
  batchnorm_backward(t->dx, t->dw, t->db, t->ws, t->dout, t->x, t->w, t->out, t->saved, &t->d);
}

/* Mean and 1/sqrt(var + eps) of output o's statistics: its group's batch values in training, the
 * running ones in eval. */
static void bn_stats_ref(const lt *t, size_t o, double *mean, double *rstd) {
  const bn_dims *d = &t->d;
  int S = d->S, C = d->C, b = (int)(o / ((size_t)C * S)), c = (int)(o / S % C);
  if (!d->training) {
    *mean = t->rm[c];
    *rstd = 1.0 / sqrt((double)t->rv[c] + d->eps);
    return;
  }
  int G = d->G < 1 ? 1 : d->G > d->B ? d->B : d->G, g = 0;
  while ((g + 1) * d->B / G <= b) g++;
  int b0 = g * d->B / G, b1 = (g + 1) * d->B / G, n = (b1 - b0) * S;
  double m = 0.0, v = 0.0;
  for (int i = b0; i < b1; i++)
    for (int p = 0; p < S; p++) m += t->x[((size_t)i * C + c) * S + p];
  m /= n;
  for (int i = b0; i < b1; i++)
    for (int p = 0; p < S; p++) v += pow(t->x[((size_t)i * C + c) * S + p] - m, 2);
  *mean = m;
  *rstd = 1.0 / sqrt(v / n + d->eps);
}

/* The affine value, before the fused ReLU. */
static double bn_affine_ref(const lt *t, size_t o) {
  double mean, rstd;
  bn_stats_ref(t, o, &mean, &rstd);
  int c = (int)(o / t->d.S % t->d.C);
  return (t->x[o] - mean) * rstd * t->w[c] + t->b[c];
}

static double bn_ref(const lt *t, size_t o) {
  double y = bn_affine_ref(t, o);
  return t->d.relu && !(y > 0) ? 0.0 : y;
}

/* BatchNorm + ReLU: the signs of every affine value (each depends on all of its group's inputs). */
static uint64_t bn_relu_regime(void *ctx) {
  const lt *t = ctx;
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t o = 0; o < t->nout; o++) h = (h ^ (uint64_t)(bn_affine_ref(t, o) > 0)) * 0x100000001b3ULL;
  return h;
}

/* Rounding bounds of BatchNorm (see lt_check). Training: the mean sums N = samples·S values (error N·u
 * in x - mean, so N·u·rstd in xhat), the variance N positive terms (relative N·u, half of it in rstd,
 * so (N/2 + 3)·u·|xhat|); dx = γ·rstd·(dy - mean(dy) - xhat·mean(dy·xhat)) carries both means' N·u
 * on magnitudes up to 2 + xhat², dγ = Σ dy·xhat and dβ = Σ dy sum the n = B·S outputs of a channel.
 * Eval: a handful of roundings per entry. rstd and |xhat| are taken at their largest in the data. */
static void bn_bounds(const lt *t, double *e_out, double *e_grad) {
  const bn_dims *d = &t->d;
  const double u = 0x1p-24;
  double rmax = 0, xmax = 0, gmax = 0;
  for (size_t o = 0; o < t->nout; o++) {
    double mean, rstd;
    bn_stats_ref(t, o, &mean, &rstd);
    rmax = fmax(rmax, rstd);
    xmax = fmax(xmax, fabs(t->x[o] - mean) * rstd);
  }
  for (int c = 0; c < d->C; c++) gmax = fmax(gmax, fabs(t->w[c]));
  int G = d->G < 1 ? 1 : d->G > d->B ? d->B : d->G;
  double N = d->training ? (double)((d->B + G - 1) / G) * d->S : 1, n = (double)d->B * d->S;
  double e_xhat = (N + 8) * u * (rmax + xmax);
  *e_out = gmax * e_xhat + 2 * u;
  double e_dx = (2 * N + 8) * u * gmax * rmax * (2 + xmax * xmax);
  double e_dgamma = sum_err(n, n * xmax) + n * e_xhat;
  *e_grad = fmax(e_dx, fmax(e_dgamma, sum_err(n, n)));
}

static void bn_setup(lt *t, int B, int C, int S, int G, int training, rng_t *r) {
  *t = (lt){.forward = bn_f, .backward = bn_b, .ref = bn_ref};
  t->d = (bn_dims){B, C, S, G, 0.1f, 1e-5f, training, NULL, 0};
  lt_alloc(t, (size_t)B * C * S, C, C, (size_t)B * C * S, r);
  for (int c = 0; c < C; c++) t->w[c] += 1.5f; /* gamma away from 0 */
  t->saved = fresh(batchnorm_saved_len(C, B), NULL, 0, 0);
  t->ws = fresh(2 * (size_t)C, NULL, 0, 0);
  t->rm = fresh(C, r, -0.5f, 0.5f);
  t->rv = fresh(C, r, 0.5f, 2.0f);
}

START_TEST(batchnorm_gradients_match_finite_differences) {
  /* B, C, S, G, training: vectors, images, split groups (even and uneven), eval mode. */
  static const int cases[][5] = {
      {5, 3, 1, 1, 1}, {2, 7, 1, 1, 1},  {3, 2, 9, 1, 1}, {4, 3, 25, 1, 1}, {6, 5, 1, 2, 1},
      {7, 3, 4, 3, 1}, {8, 2, 17, 4, 1}, {4, 3, 1, 1, 0}, {2, 3, 10, 1, 0}, {1, 5, 6, 1, 1}};
  rng_t r;
  rng_init(&r, 5, 1);
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    lt t;
    bn_setup(&t, cases[k][0], cases[k][1], cases[k][2], cases[k][3], cases[k][4], &r);
    double e_out, e_grad;
    bn_bounds(&t, &e_out, &e_grad);
    char name[64];
    snprintf(name, sizeof name, "batchnorm B %d C %d S %d G %d%s", cases[k][0], cases[k][1], cases[k][2],
             cases[k][3], cases[k][4] ? "" : " eval");
    /* eval mode is linear in x: a long step; training: small, truncation estimated */
    lt_check(&t, name, cases[k][4] ? 1e-3 : 0.5, e_out, e_grad);
    /* The same with the ReLU fused: a ReLU adds no rounding (it passes or zeroes a value), so the
     * bounds stand; coordinates whose steps flip an output's sign are skipped (regime). */
    t.d.relu = 1, t.regime = bn_relu_regime;
    vec_fill(t.dx, 0.0f, t.nx);
    strcat(name, " + relu");
    lt_check(&t, name, 1e-3, e_out, e_grad); /* short steps: a long one would cross most kinks */
    lt_free(&t);
  }
}
END_TEST

/* BatchNorm + ReLU in one pass against batchnorm then relu_forward, relu_backward then batchnorm, on a
 * team of two threads: outputs, gradients and running statistics equal bit for bit. Vectors, images,
 * split groups and eval mode; sizes that split across both threads. */
START_TEST(batchnorm_relu_fused_equals_the_two_layers) {
  static const int cases[][5] = {{64, 40, 1, 1, 1}, {8, 6, 64 * 64, 3, 1}, {16, 5, 49, 1, 1},
                                 {6, 4, 25, 2, 1},   {8, 6, 33 * 33, 1, 0}, {32, 9, 1, 1, 0}};
  rng_t r;
  rng_init(&r, 21, 1);
  ck_assert_int_eq(par_set_threads(2), 0);
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    lt u, f;
    bn_setup(&u, cases[k][0], cases[k][1], cases[k][2], cases[k][3], cases[k][4], &r);
    bn_setup(&f, cases[k][0], cases[k][1], cases[k][2], cases[k][3], cases[k][4], &r);
    float *pu[] = {u.x, u.w, u.b, u.dout, u.rm, u.rv}, *pf[] = {f.x, f.w, f.b, f.dout, f.rm, f.rv};
    size_t len[] = {u.nx, u.nw, u.nb, u.nout, (size_t)u.d.C, (size_t)u.d.C};
    for (int i = 0; i < 6; i++) memcpy(pf[i], pu[i], len[i] * sizeof(float));
    float *y = fresh(u.nout, NULL, 0, 0), *dy = fresh(u.nout, NULL, 0, 0);
    /* unfused: BN into out, ReLU into y; backward: the ReLU's dy, then BN */
    bn_f(&u);
    relu_forward(y, u.out, u.nout);
    relu_backward(dy, u.dout, y, u.nout);
    memcpy(u.dout, dy, u.nout * sizeof(float));
    bn_b(&u);
    f.d.relu = 1;
    bn_f(&f);
    bn_b(&f);
    ck_assert_msg(memcmp(y, f.out, u.nout * sizeof(float)) == 0, "case %zu: out differs", k);
    ck_assert_msg(memcmp(u.dx, f.dx, u.nx * sizeof(float)) == 0, "case %zu: dx differs", k);
    ck_assert_msg(memcmp(u.dw, f.dw, u.nw * sizeof(float)) == 0, "case %zu: dgamma differs", k);
    ck_assert_msg(memcmp(u.db, f.db, u.nb * sizeof(float)) == 0, "case %zu: dbeta differs", k);
    ck_assert(memcmp(u.rm, f.rm, len[4] * sizeof(float)) == 0 && memcmp(u.rv, f.rv, len[5] * sizeof(float)) == 0);
    tensor_free(y), tensor_free(dy);
    lt_free(&u), lt_free(&f);
  }
  ck_assert_int_eq(par_set_threads(1), 0);
}
END_TEST

START_TEST(batchnorm_train_updates_running_stats_and_eval_uses_them) {
  rng_t r;
  rng_init(&r, 6, 1);
  const int B = 6, C = 3, S = 4;
  lt t;
  bn_setup(&t, B, C, S, 1, 1, &r);
  vec_fill(t.rm, 0.0f, C);
  vec_fill(t.rv, 1.0f, C);
  t.d.momentum = 0.25f;
  bn_f(&t);
  double mean[3] = {0}, var[3] = {0};
  int n = B * S;
  for (int c = 0; c < C; c++) {
    for (int b = 0; b < B; b++)
      for (int s = 0; s < S; s++) mean[c] += t.x[(b * C + c) * S + s];
    mean[c] /= n;
    for (int b = 0; b < B; b++)
      for (int s = 0; s < S; s++) var[c] += pow(t.x[(b * C + c) * S + s] - mean[c], 2);
    var[c] /= n;
    /* Training output: normalised with the biased batch variance. */
    for (int b = 0; b < B; b++)
      for (int s = 0; s < S; s++) {
        int i = (b * C + c) * S + s;
        double y = (t.x[i] - mean[c]) / sqrt(var[c] + 1e-5) * t.w[c] + t.b[c];
        ck_assert(fabs(y - t.out[i]) < 1e-4);
      }
    /* Running statistics: PyTorch's momentum convention with the unbiased variance. */
    ck_assert(fabs(t.rm[c] - 0.25 * mean[c]) < 1e-6);
    ck_assert(fabs(t.rv[c] - (0.75 + 0.25 * var[c] * n / (n - 1))) < 1e-5);
  }
  /* Eval: the running statistics, whatever the batch holds. */
  t.d.training = 0;
  fill_uniform(t.x, t.nx, &r, -3, 3);
  float rm[3], rv[3];
  memcpy(rm, t.rm, sizeof rm);
  memcpy(rv, t.rv, sizeof rv);
  bn_f(&t);
  for (int c = 0; c < C; c++) {
    ck_assert(rm[c] == t.rm[c] && rv[c] == t.rv[c]);
    for (int b = 0; b < B; b++)
      for (int s = 0; s < S; s++) {
        int i = (b * C + c) * S + s;
        double y = (t.x[i] - rm[c]) / sqrt(rv[c] + 1e-5) * t.w[c] + t.b[c];
        ck_assert(fabs(y - t.out[i]) < 1e-4);
      }
  }
  lt_free(&t);
}
END_TEST

START_TEST(split_batchnorm_normalises_each_group_alone) {
  rng_t r;
  rng_init(&r, 7, 1);
  const int B = 8, C = 5, G = 2;
  lt t, h;
  bn_setup(&t, B, C, 1, G, 1, &r);
  bn_setup(&h, B / G, C, 1, 1, 1, &r);
  memcpy(h.w, t.w, C * sizeof(float));
  memcpy(h.b, t.b, C * sizeof(float));
  vec_fill(t.rm, 0.0f, C), vec_fill(t.rv, 1.0f, C);
  bn_f(&t);
  float rm_sum[5] = {0}, rv_sum[5] = {0};
  for (int g = 0; g < G; g++) {
    memcpy(h.x, t.x + g * (B / G) * C, h.nx * sizeof(float));
    vec_fill(h.rm, 0.0f, C), vec_fill(h.rv, 1.0f, C);
    bn_f(&h);
    for (size_t i = 0; i < h.nout; i++)
      ck_assert(fabsf(h.out[i] - t.out[g * (B / G) * C + i]) < 1e-5f);
    for (int c = 0; c < C; c++) rm_sum[c] += h.rm[c] / G, rv_sum[c] += h.rv[c] / G;
  }
  /* The running statistics follow the average of the groups' updates. */
  for (int c = 0; c < C; c++) {
    ck_assert(fabsf(rm_sum[c] - t.rm[c]) < 1e-6f);
    ck_assert(fabsf(rv_sum[c] - t.rv[c]) < 1e-6f);
  }
  lt_free(&t);
  lt_free(&h);
}
END_TEST

/* ---- conv2d ---- */

static double conv_ref(const lt *t, size_t o) {
  const conv_geom *g = &t->g;
  int ow = (int)(o % g->OW), oh = (int)(o / g->OW % g->OH), oc = (int)(o / ((size_t)g->OW * g->OH) % t->OC);
  int b = (int)(o / ((size_t)g->OW * g->OH * t->OC)), K = g->K;
  double s = t->nb ? t->b[oc] : 0.0;
  for (int c = 0; c < g->C; c++)
    for (int i = 0; i < K; i++)
      for (int j = 0; j < K; j++) {
        int ih = oh * g->stride - g->pad + i, iw = ow * g->stride - g->pad + j;
        if (ih < 0 || ih >= g->H || iw < 0 || iw >= g->W) continue;
        s += (double)t->x[(((size_t)b * g->C + c) * g->H + ih) * g->W + iw] * t->w[((oc * g->C + c) * K + i) * K + j];
      }
  return s;
}

static void conv_f(lt *t) {
  conv2d_forward(t->out, t->ws, t->x, t->w, t->nb ? t->b : NULL, t->B, t->OC, &t->g, t->chunk,
                 t->parts);
}
static void conv_b(lt *t) {
  conv2d_backward(t->dx, t->dw, t->nb ? t->db : NULL, t->ws, t->dout, t->x, t->w, t->B, t->OC,
                  &t->g, t->chunk, t->parts);
}

/* B, C, H, W, OC, K, stride, pad, chunk, bias */
static const int conv_cases[][10] = {
    {2, 2, 5, 5, 3, 3, 1, 1, 1, 1}, {3, 3, 7, 6, 2, 3, 2, 0, 3, 1}, {1, 1, 6, 6, 4, 5, 2, 2, 1, 0},
    {5, 2, 4, 4, 3, 1, 1, 0, 2, 1}, {2, 3, 9, 7, 5, 3, 3, 1, 2, 1}, {3, 2, 5, 5, 3, 2, 1, 0, 2, 0},
    {4, 1, 3, 3, 2, 3, 1, 2, 4, 1},
};

static void conv_setup(lt *t, const int *c, int parts, rng_t *r) {
  *t = (lt){.forward = conv_f, .backward = conv_b, .ref = conv_ref, .B = c[0], .OC = c[4], .chunk = c[8],
            .parts = parts};
  ck_assert_int_eq(conv_geom_init(&t->g, c[1], c[2], c[3], c[5], c[6], c[7]), 0);
  size_t nx = (size_t)c[0] * c[1] * c[2] * c[3], nw = (size_t)c[4] * c[1] * c[5] * c[5];
  lt_alloc(t, nx, nw, c[9] ? c[4] : 0, (size_t)c[0] * c[4] * t->g.OH * t->g.OW, r);
  t->ws = fresh(conv2d_workspace_len(&t->g, t->OC, t->chunk, t->parts), NULL, 0, 0);
}

/* Every case on one part, and on three parts shared by a team of two threads. */
START_TEST(conv2d_gradients_match_finite_differences) {
  rng_t r;
  rng_init(&r, 8, 1);
  ck_assert_int_eq(par_set_threads(2), 0);
  for (size_t k = 0; k < sizeof conv_cases / sizeof conv_cases[0]; k++)
    for (int parts = 1; parts <= 3; parts += 2) {
      lt t;
      conv_setup(&t, conv_cases[k], parts, &r);
      /* out: C·K² products and the bias; dx: up to OC·K² terms, dw and db: B·OH·OW */
      const conv_geom *g = &t.g;
      int fan_in = g->C * g->K * g->K, n = imax(t.OC * g->K * g->K, t.B * g->OH * g->OW);
      char name[64];
      snprintf(name, sizeof name, "conv2d case %zu parts %d", k, parts);
      lt_check(&t, name, 0.5, sum_err(fan_in + 1, fan_in + 1), sum_err(n, n));
      lt_free(&t);
    }
  ck_assert_int_eq(par_set_threads(1), 0);
}
END_TEST

START_TEST(conv2d_matches_naive_convolution) {
  rng_t r;
  rng_init(&r, 9, 1);
  for (size_t k = 0; k < sizeof conv_cases / sizeof conv_cases[0]; k++) {
    lt t;
    conv_setup(&t, conv_cases[k], 1, &r);
    conv_f(&t);
    const conv_geom *g = &t.g;
    int K = g->K;
    for (int b = 0; b < t.B; b++)
      for (int o = 0; o < t.OC; o++)
        for (int oh = 0; oh < g->OH; oh++)
          for (int ow = 0; ow < g->OW; ow++) {
            double s = t.nb ? t.b[o] : 0.0;
            for (int c = 0; c < g->C; c++)
              for (int i = 0; i < K; i++)
                for (int j = 0; j < K; j++) {
                  int ih = oh * g->stride - g->pad + i, iw = ow * g->stride - g->pad + j;
                  if (ih < 0 || ih >= g->H || iw < 0 || iw >= g->W) continue;
                  s += (double)t.x[((b * g->C + c) * g->H + ih) * g->W + iw] *
                       t.w[((o * g->C + c) * K + i) * K + j];
                }
            float got = t.out[((b * t.OC + o) * g->OH + oh) * g->OW + ow];
            ck_assert_msg(fabs(s - got) < 1e-4, "case %zu: %g vs %g", k, s, got);
          }
    lt_free(&t);
  }
}
END_TEST

/* The same convolution with chunk 1 on one part, and with (chunk, parts) on a team of `threads`. */
static void conv_compare(int chunk, int parts, int threads) {
  rng_t r;
  rng_init(&r, 10, 1);
  int c[10] = {7, 3, 6, 6, 4, 3, 1, 1, 1, 1};
  lt a, b;
  conv_setup(&a, c, 1, &r);
  c[8] = chunk;
  conv_setup(&b, c, parts, &r);
  memcpy(b.x, a.x, a.nx * sizeof(float));
  memcpy(b.w, a.w, a.nw * sizeof(float));
  memcpy(b.b, a.b, a.nb * sizeof(float));
  memcpy(b.dout, a.dout, a.nout * sizeof(float));
  conv_f(&a), conv_b(&a);
  ck_assert_int_eq(par_set_threads(threads), 0);
  conv_f(&b), conv_b(&b);
  ck_assert_int_eq(par_set_threads(1), 0);
  for (size_t i = 0; i < a.nout; i++) ck_assert(fabsf(a.out[i] - b.out[i]) < 1e-5f);
  for (size_t i = 0; i < a.nx; i++) ck_assert(fabsf(a.dx[i] - b.dx[i]) < 1e-5f);
  for (size_t i = 0; i < a.nw; i++) ck_assert(fabsf(a.dw[i] - b.dw[i]) < 1e-4f);
  for (size_t i = 0; i < a.nb; i++) ck_assert(fabsf(a.db[i] - b.db[i]) < 1e-4f);
  lt_free(&a);
  lt_free(&b);
}

START_TEST(conv2d_chunk_does_not_change_results) { conv_compare(3, 1, 1); }
END_TEST

/* More parts than threads, and more parts than chunks (an empty part). */
START_TEST(conv2d_parts_on_threads_do_not_change_results) {
  conv_compare(2, 2, 2);
  conv_compare(2, 3, 2);
  conv_compare(3, 5, 2);
}
END_TEST

/* ---- maxpool ---- */

static double mp_ref(const lt *t, size_t o) {
  const conv_geom *g = &t->g;
  int ow = (int)(o % g->OW), oh = (int)(o / g->OW % g->OH), p = (int)(o / ((size_t)g->OW * g->OH));
  double best = -INFINITY;
  for (int i = 0; i < g->K; i++)
    for (int j = 0; j < g->K; j++) {
      int ih = oh * g->stride - g->pad + i, iw = ow * g->stride - g->pad + j;
      if (ih >= 0 && ih < g->H && iw >= 0 && iw < g->W)
        best = fmax(best, t->x[((size_t)p * g->H + ih) * g->W + iw]);
    }
  return best;
}
static void mp_f(lt *t) { maxpool_forward(t->out, (int32_t *)t->saved, t->x, t->B, &t->g); }
static void mp_b(lt *t) { maxpool_backward(t->dx, t->dout, (const int32_t *)t->saved, t->B, &t->g); }

/* B, C, H, W, K, stride, pad */
static const int pool_cases[][7] = {
    {2, 3, 4, 4, 2, 2, 0}, {1, 2, 7, 5, 3, 2, 1}, {3, 1, 5, 5, 3, 1, 0}, {2, 2, 6, 7, 2, 3, 1},
    {1, 1, 3, 3, 3, 3, 0}, {2, 3, 5, 7, 2, 2, 0}, {1, 2, 6, 6, 3, 2, 0}, {1, 2, 28, 29, 2, 2, 0}};

static void pool_setup(lt *t, const int *c, rng_t *r) {
  *t = (lt){.forward = mp_f, .backward = mp_b, .ref = mp_ref, .B = c[0]};
  ck_assert_int_eq(conv_geom_init(&t->g, c[1], c[2], c[3], c[4], c[5], c[6]), 0);
  size_t nx = (size_t)c[0] * c[1] * c[2] * c[3], nout = (size_t)c[0] * c[1] * t->g.OH * t->g.OW;
  lt_alloc(t, nx, 0, 0, nout, r);
  t->saved = fresh(nout, NULL, 0, 0); /* the winners' offsets */
  /* Distinct values 0.05 apart, so no step of the finite differences changes a window's winner. */
  uint32_t *perm = malloc(nx * sizeof *perm);
  for (size_t i = 0; i < nx; i++) perm[i] = (uint32_t)i;
  rng_shuffle_u32(r, perm, (uint32_t)nx);
  for (size_t i = 0; i < nx; i++) t->x[i] = 0.05f * (float)perm[i] - 1.0f;
  free(perm);
}

START_TEST(maxpool_matches_naive_and_gradients) {
  rng_t r;
  rng_init(&r, 11, 1);
  for (size_t k = 0; k < sizeof pool_cases / sizeof pool_cases[0]; k++) {
    lt t;
    pool_setup(&t, pool_cases[k], &r);
    mp_f(&t);
    const conv_geom *g = &t.g;
    for (int p = 0; p < t.B * g->C; p++)
      for (int oh = 0; oh < g->OH; oh++)
        for (int ow = 0; ow < g->OW; ow++) {
          float best = -INFINITY;
          for (int i = 0; i < g->K; i++)
            for (int j = 0; j < g->K; j++) {
              int ih = oh * g->stride - g->pad + i, iw = ow * g->stride - g->pad + j;
              if (ih >= 0 && ih < g->H && iw >= 0 && iw < g->W &&
                  t.x[(p * g->H + ih) * g->W + iw] > best)
                best = t.x[(p * g->H + ih) * g->W + iw];
            }
          ck_assert(best == t.out[(p * g->OH + oh) * g->OW + ow]);
        }
    /* the max is exact; a pixel's gradient adds the dout of up to K² windows it wins; steps of 0.01
     * and 0.02 keep every window's winner */
    char name[64];
    snprintf(name, sizeof name, "maxpool case %zu", k);
    lt_check(&t, name, 1e-2, 0, sum_err(g->K * g->K, g->K * g->K));
    lt_free(&t);
  }
}
END_TEST

START_TEST(maxpool_ties_send_the_gradient_to_the_first_maximum) {
  /* 2x2 stride 2 (the vectorised path) and 3x3 stride 1 (the general one), every value equal. */
  for (int k = 0; k < 2; k++) {
    conv_geom g;
    conv_geom_init(&g, 1, 4, 4, k ? 3 : 2, k ? 1 : 2, 0);
    float x[16], y[4], dy[4] = {1, 2, 3, 4}, dx[16];
    int32_t idx[4];
    vec_fill(x, 0.5f, 16);
    maxpool_forward(y, idx, x, 1, &g);
    maxpool_backward(dx, dy, idx, 1, &g);
    float total = 0;
    for (int i = 0; i < 16; i++) total += dx[i];
    ck_assert(total == 10.0f);
    if (k == 0)
      ck_assert(dx[0] == 1 && dx[1] == 0 && dx[4] == 0 && dx[2] == 2 && dx[8] == 3 && dx[10] == 4);
    else
      ck_assert(dx[0] == 1 && dx[1] == 2 && dx[4] == 3 && dx[5] == 4);
  }
}
END_TEST

/* Rectified inputs (half the values 0, so many windows tie): every winner the forward stores is the
 * first maximum of its window in scan order, on the vectorised 2x2 path and the general one alike. */
START_TEST(maxpool_stores_the_first_maximum_of_each_window) {
  rng_t r;
  rng_init(&r, 12, 1);
  /* Widths whose 2x2 rows take blocks of 8, of 4 and single windows; a 3x3 kernel for the general path. */
  const int widths[] = {27, 13, 7}, kernels[] = {2, 2, 2, 3};
  for (int k = 0; k < 4; k++) {
    int H = 10, W = widths[k % 3], P = 2 * 3;
    conv_geom g;
    conv_geom_init(&g, 3, H, W, kernels[k], 2, 0);
    size_t nx = (size_t)P * H * W, nout = (size_t)P * g.OH * g.OW;
    float *x = fresh(nx, &r, -1, 1), *y = fresh(nout, NULL, 0, 0);
    int32_t *idx = malloc(nout * sizeof *idx);
    for (size_t i = 0; i < nx; i++) x[i] = x[i] > 0 ? x[i] : 0.0f;
    maxpool_forward(y, idx, x, 2, &g);
    for (int p = 0; p < P; p++)
      for (int o = 0; o < g.OH * g.OW; o++) {
        const float *plane = x + (size_t)p * H * W;
        int oh = o / g.OW, ow = o % g.OW, at = -1;
        for (int i = 0; i < g.K; i++)
          for (int j = 0; j < g.K; j++) {
            int pos = (oh * 2 + i) * W + ow * 2 + j;
            if (at < 0 || plane[pos] > plane[at]) at = pos;
          }
        ck_assert_int_eq(idx[p * g.OH * g.OW + o], at);
        ck_assert(y[p * g.OH * g.OW + o] == plane[at]);
      }
    tensor_free(x), tensor_free(y), free(idx);
  }
}
END_TEST

/* ---- the compute team ---- */

static float *copy_of(const float *x, size_t n) {
  float *c = fresh(n, NULL, 0, 0);
  if (n) memcpy(c, x, n * sizeof(float));
  return c;
}

static void same_bits(const float *a, const float *b, size_t n, const char *what) {
  ck_assert_msg(n == 0 || memcmp(a, b, n * sizeof(float)) == 0, "%s differs on two threads", what);
}

/* Forward and backward on a team of one thread, then on two: layers that split by sample, plane or
 * channel must not change a bit. Running statistics (BatchNorm) are restored in between. */
static void same_on_two_threads(lt *t) {
  size_t nc = t->rm ? (size_t)t->d.C : 0;
  float *rm = copy_of(t->rm, nc), *rv = copy_of(t->rv, nc);
  t->forward(t), t->backward(t);
  float *out = copy_of(t->out, t->nout), *dx = copy_of(t->dx, t->nx), *dw = copy_of(t->dw, t->nw),
        *db = copy_of(t->db, t->nb), *rm1 = copy_of(t->rm, nc), *rv1 = copy_of(t->rv, nc);
  if (nc) memcpy(t->rm, rm, nc * sizeof(float)), memcpy(t->rv, rv, nc * sizeof(float));
  memset(t->dw, 0, t->nw * sizeof(float));
  memset(t->db, 0, t->nb * sizeof(float));
  ck_assert_int_eq(par_set_threads(2), 0);
  t->forward(t), t->backward(t);
  ck_assert_int_eq(par_set_threads(1), 0);
  same_bits(out, t->out, t->nout, "out");
  same_bits(dx, t->dx, t->nx, "dx");
  same_bits(dw, t->dw, t->nw, "dw");
  same_bits(db, t->db, t->nb, "db");
  same_bits(rm1, t->rm, nc, "running mean");
  same_bits(rv1, t->rv, nc, "running var");
  float *all[] = {rm, rv, out, dx, dw, db, rm1, rv1};
  for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) tensor_free(all[k]);
}

/* Sizes well above the smallest part, so that both threads get work. */
START_TEST(layers_split_across_threads_match_one_thread) {
  rng_t r;
  rng_init(&r, 12, 1);
  lt t = {.forward = relu_f, .backward = relu_b};
  lt_alloc(&t, 300001, 0, 0, 300001, &r);
  same_on_two_threads(&t);
  lt_free(&t);
  bn_setup(&t, 8, 6, 64 * 64, 3, 1, &r);
  same_on_two_threads(&t);
  lt_free(&t);
  bn_setup(&t, 8, 6, 64 * 64, 1, 0, &r);
  same_on_two_threads(&t);
  lt_free(&t);
  static const int pool[7] = {2, 4, 130, 128, 2, 2, 0};
  pool_setup(&t, pool, &r);
  same_on_two_threads(&t);
  lt_free(&t);
}
END_TEST

START_TEST(conv_geometry_rejects_kernels_that_do_not_fit) {
  conv_geom g;
  ck_assert_int_eq(conv_geom_init(&g, 1, 28, 28, 3, 1, 1), 0);
  ck_assert_int_eq(g.OH, 28);
  ck_assert_int_eq(conv_geom_init(&g, 1, 28, 28, 2, 2, 0), 0);
  ck_assert_int_eq(g.OW, 14);
  ck_assert_int_eq(conv_geom_init(&g, 1, 7, 7, 3, 2, 1), 0);
  ck_assert_int_eq(g.OH, 4);
  ck_assert_int_eq(conv_geom_init(&g, 1, 2, 2, 5, 1, 1), -1);
  ck_assert_int_eq(conv_geom_init(&g, 1, 2, 2, 1, 0, 0), -1);
}
END_TEST

Suite *layers_suite(void) {
  Suite *s = suite_create("layers");
  TCase *tc = tcase_create("layers");
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, linear_forward_matches_naive);
  tcase_add_test(tc, linear_gradients_match_finite_differences);
  tcase_add_test(tc, elementwise_gradients_match_finite_differences);
  tcase_add_test(tc, l2norm_gradient_is_exact);
  tcase_add_test(tc, batchnorm_gradients_match_finite_differences);
  tcase_add_test(tc, batchnorm_relu_fused_equals_the_two_layers);
  tcase_add_test(tc, batchnorm_train_updates_running_stats_and_eval_uses_them);
  tcase_add_test(tc, split_batchnorm_normalises_each_group_alone);
  tcase_add_test(tc, conv2d_gradients_match_finite_differences);
  tcase_add_test(tc, conv2d_matches_naive_convolution);
  tcase_add_test(tc, conv2d_chunk_does_not_change_results);
  tcase_add_test(tc, conv2d_parts_on_threads_do_not_change_results);
  tcase_add_test(tc, maxpool_matches_naive_and_gradients);
  tcase_add_test(tc, maxpool_ties_send_the_gradient_to_the_first_maximum);
  tcase_add_test(tc, maxpool_stores_the_first_maximum_of_each_window);
  tcase_add_test(tc, conv_geometry_rejects_kernels_that_do_not_fit);
  tcase_add_test(tc, layers_split_across_threads_match_one_thread);
  suite_add_tcase(s, tc);
  return s;
}
