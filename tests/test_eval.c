/* Evaluation: kNN against hand-built clusters and a brute-force reference, alignment and uniformity
 * against hand computation, the linear probe (separation, gradient check), the .npy export. */
#include <check.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "testutil.h"
#include "train/eval.h"
#include "service/config.h"

#define NEAR(a, b, tol) \
  ck_assert_msg(fabs((double)(a) - (double)(b)) < (tol), "%.9g vs %.9g", (double)(a), (double)(b))

/* ---- kNN ---------------------------------------------------------------------------------------- */

START_TEST(knn_classifies_hand_built_clusters) {
  /* Three classes on rays at 0°, 120° and 240°, at varied radii (the radius must not matter). Class 2
   * is absent from the test rows. */
  enum { NTR = 30, NTE = 4 };
  float train[NTR * 2], test[NTE * 2] = {2.0f, 0.1f, 0.5f, -0.05f, -0.5f, 0.8f, -3.0f, 4.9f};
  int32_t ytr[NTR], yte[NTE] = {0, 0, 1, 1}, pred[NTE];
  for (int i = 0; i < NTR; i++) {
    int c = i % 3;
    double a = 2.0 * M_PI * c / 3.0 + 0.05 * (i / 3 - 5), r = 0.5 + i;
    train[2 * i] = (float)(r * cos(a));
    train[2 * i + 1] = (float)(r * sin(a));
    ytr[i] = c;
  }
  eval_knn_config c;
  c = config_defaults()->trainer.knn;
  c.k = 5;
  c.block_rows = 3; /* two blocks, the second partial */
  double acc = 0, per[3];
  ck_assert_int_eq(eval_knn(&c, train, ytr, NTR, test, yte, NTE, 2, 3, &acc, per, pred), 0);
  NEAR(acc, 1.0, 1e-12);
  ck_assert_int_eq(pred[0], 0);
  ck_assert_int_eq(pred[3], 1);
  NEAR(per[0], 1.0, 1e-12);
  NEAR(per[1], 1.0, 1e-12);
  NEAR(per[2], -1.0, 1e-12);
  /* k beyond the train rows is capped: all 30 vote, and each class has 10 at similar weights, so the
   * weights must still favour the near ray. */
  c.k = 1000;
  ck_assert_int_eq(eval_knn(&c, train, ytr, NTR, test, yte, NTE, 2, 3, &acc, NULL, pred), 0);
  NEAR(acc, 1.0, 1e-12);
}
END_TEST

typedef struct {
  double s;
  int64_t j;
} ranked;

static int by_sim_then_row(const void *a, const void *b) {
  const ranked *x = a, *y = b;
  if (x->s != y->s) return x->s > y->s ? -1 : 1;
  return x->j < y->j ? -1 : x->j > y->j;
}

/* The definition, computed the slow way: all cosines in double, a full sort, exact votes. */
static void knn_reference(const float *tr, const int32_t *ytr, int64_t ntr, const float *te, int64_t nte,
                          int dim, int C, int k, float T, int32_t *pred) {
  ranked *r = malloc(ntr * sizeof *r);
  double *votes = malloc(C * sizeof *votes);
  if (k > ntr) k = (int)ntr;
  for (int64_t i = 0; i < nte; i++) {
    const float *q = te + i * dim;
    for (int64_t j = 0; j < ntr; j++) {
      const float *t = tr + j * dim;
      double qt = 0, qq = 0, tt = 0;
      for (int d = 0; d < dim; d++) qt += (double)q[d] * t[d], qq += (double)q[d] * q[d], tt += (double)t[d] * t[d];
      r[j] = (ranked){qq > 0 && tt > 0 ? qt / sqrt(qq * tt) : 0.0, j};
    }
    qsort(r, ntr, sizeof *r, by_sim_then_row);
    for (int c = 0; c < C; c++) votes[c] = 0;
    for (int m = 0; m < k; m++) votes[ytr[r[m].j]] += exp(r[m].s / T);
    pred[i] = 0;
    for (int c = 1; c < C; c++)
      if (votes[c] > votes[pred[i]]) pred[i] = c;
  }
  free(r);
  free(votes);
}

/* Random features where class c leans towards direction c, so votes are neither unanimous nor random. */
static void make_labelled(rng_t *r, float *x, int32_t *y, int64_t n, int dim, int C, float lean) {
  for (int64_t i = 0; i < n; i++) {
    y[i] = (int32_t)rng_below(r, C);
    for (int d = 0; d < dim; d++) x[i * dim + d] = rng_normal(r);
    x[i * dim + y[i] % dim] += lean;
  }
}

static void check_against_reference(const float *tr, const int32_t *ytr, int64_t ntr, const float *te,
                                    const int32_t *yte, int64_t nte, int dim, int C, int k, float T) {
  eval_knn_config c = {.k = k, .temperature = T, .block_rows = 16};
  int32_t *pred = malloc(nte * sizeof *pred), *ref = malloc(nte * sizeof *ref);
  double acc;
  ck_assert_int_eq(eval_knn(&c, tr, ytr, ntr, te, yte, nte, dim, C, &acc, NULL, pred), 0);
  knn_reference(tr, ytr, ntr, te, nte, dim, C, k, T, ref);
  int64_t correct = 0;
  for (int64_t i = 0; i < nte; i++) {
    ck_assert_msg(pred[i] == ref[i], "dim %d n %lld k %d: row %lld: %d vs reference %d", dim, (long long)ntr,
                  k, (long long)i, pred[i], ref[i]);
    correct += ref[i] == yte[i];
  }
  NEAR(acc, (double)correct / nte, 1e-12);
  free(pred);
  free(ref);
}

START_TEST(knn_matches_brute_force) {
  /* n = 20000 takes the sampled-threshold path, n = 300 the full scan, 784-d the raw-pixel case. */
  const struct {
    int64_t ntr;
    int dim, k;
    float T;
  } cases[] = {{20000, 8, 50, 0.1f}, {300, 8, 20, 0.07f}, {300, 8, 500, 0.5f}, {400, 784, 40, 0.1f}};
  rng_t r;
  rng_init(&r, 11, RNG_STREAM_SAMPLE);
  for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
    int64_t ntr = cases[t].ntr, nte = 40;
    int dim = cases[t].dim, C = 5;
    float *tr = malloc(ntr * dim * sizeof(float)), *te = malloc(nte * dim * sizeof(float));
    int32_t *ytr = malloc(ntr * sizeof(int32_t)), *yte = malloc(nte * sizeof(int32_t));
    make_labelled(&r, tr, ytr, ntr, dim, C, dim > 100 ? 8.0f : 1.0f);
    make_labelled(&r, te, yte, nte, dim, C, dim > 100 ? 8.0f : 1.0f);
    check_against_reference(tr, ytr, ntr, te, yte, nte, dim, C, cases[t].k, cases[t].T);
    free(tr);
    free(te);
    free(ytr);
    free(yte);
  }
}
END_TEST

START_TEST(knn_exact_ties_and_a_misleading_sample) {
  /* 32768 train rows; the threshold sample takes every 8th row (32768 / 4096).
   *   rows 16i:        near the first query (cosine ~1), class 0: 2048 rows, all in the sample
   *   rows 8i+1..8i+3: one vector repeated (cosine exactly 0.5 to the first query, 1 to the second),
   *                    class 1 below row 12000 and class 2 above: 12288 exact ties
   *   the rest:        far away, class 2
   * First query, k = 8000: the sample's top ranks are all near rows, fewer than k rows pass its
   * threshold and the row must be rescanned in full; the k-th place falls among the ties, and taking
   * them in row order (not all, not the last) makes class 1 win at T = 10. Second query, k = 3: the
   * three first tied rows, class 1. */
  enum { N = 32768, D = 4, NTE = 2 };
  float *tr = malloc(N * D * sizeof(float));
  int32_t *ytr = malloc(N * sizeof(int32_t));
  rng_t r;
  rng_init(&r, 5, RNG_STREAM_SAMPLE);
  for (int j = 0; j < N; j++) {
    float *x = tr + j * D;
    if (j % 16 == 0) {
      x[0] = 1.0f, x[1] = 0.01f * rng_uniform(&r), x[2] = x[3] = 0.0f;
      ytr[j] = 0;
    } else if (j % 8 >= 1 && j % 8 <= 3) {
      x[0] = x[1] = x[2] = x[3] = 0.5f;
      ytr[j] = j < 12000 ? 1 : 2;
    } else {
      for (int d = 0; d < D; d++) x[d] = rng_normal(&r) - (d == 0 ? 6.0f : 0.0f);
      ytr[j] = 2;
    }
  }
  const float te[NTE * D] = {1, 0, 0, 0, 0.5f, 0.5f, 0.5f, 0.5f};
  const int32_t yte[NTE] = {1, 1};
  check_against_reference(tr, ytr, N, te, yte, 1, D, 3, 8000, 10.0f);
  check_against_reference(tr, ytr, N, te + D, yte, 1, D, 3, 3, 0.1f);
  eval_knn_config c = {.k = 8000, .temperature = 10.0f, .block_rows = 4};
  double acc;
  ck_assert_int_eq(eval_knn(&c, tr, ytr, N, te, yte, 1, D, 3, &acc, NULL, NULL), 0);
  NEAR(acc, 1.0, 1e-12);
  c.k = 3;
  ck_assert_int_eq(eval_knn(&c, tr, ytr, N, te + D, yte, 1, D, 3, &acc, NULL, NULL), 0);
  NEAR(acc, 1.0, 1e-12);
  free(tr);
  free(ytr);
}
END_TEST

START_TEST(knn_refuses_bad_input) {
  float tr[6] = {1, 0, 0, 1, 1, 1}, te[2] = {1, 0};
  int32_t ytr[3] = {0, 1, 3}, yte[1] = {0};
  eval_knn_config c;
  c = config_defaults()->trainer.knn;
  double acc;
  ck_assert_int_eq(eval_knn(&c, tr, ytr, 3, te, yte, 1, 2, 2, &acc, NULL, NULL), MOCO_ERANGE);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "knn train labels[2]: 3"));
  ytr[2] = 1;
  tr[3] = NAN;
  ck_assert_int_eq(eval_knn(&c, tr, ytr, 3, te, yte, 1, 2, 2, &acc, NULL, NULL), MOCO_ERANGE);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "row 1"));
  tr[3] = 1;
  c.k = 0;
  ck_assert_int_eq(eval_knn(&c, tr, ytr, 3, te, yte, 1, 2, 2, &acc, NULL, NULL), MOCO_EINVAL);
  c.k = 2;
  c.temperature = 0;
  ck_assert_int_eq(eval_knn(&c, tr, ytr, 3, te, yte, 1, 2, 2, &acc, NULL, NULL), MOCO_EINVAL);
  c.temperature = 0.1f;
  ck_assert_int_eq(eval_knn(&c, tr, ytr, 0, te, yte, 1, 2, 2, &acc, NULL, NULL), MOCO_EINVAL);
  ck_assert_int_eq(eval_knn(&c, tr, ytr, 3, te, yte, 1, 2, 2, &acc, NULL, NULL), 0);
}
END_TEST

/* ---- alignment and uniformity ------------------------------------------------------------------- */

START_TEST(alignment_by_hand) {
  /* Pairs (e1, e1) and (e2, e1) after normalisation: squared distances 0 and 2. */
  const float x[4] = {3, 0, 0, 0.5f}, y[4] = {1, 0, 7, 0};
  double a;
  ck_assert_int_eq(eval_alignment(x, y, 2, 2, 2.0f, &a), 0);
  NEAR(a, 1.0, 1e-6);
  ck_assert_int_eq(eval_alignment(x, y, 2, 2, 1.0f, &a), 0);
  NEAR(a, sqrt(2.0) / 2, 1e-6);
  /* A zero row normalises to zero: its distance to a unit vector is 1. */
  const float z[2] = {0, 0};
  ck_assert_int_eq(eval_alignment(z, y, 1, 2, 2.0f, &a), 0);
  NEAR(a, 1.0, 1e-6);
  ck_assert_int_eq(eval_alignment(x, y, 2, 2, 0.0f, &a), MOCO_EINVAL);
}
END_TEST

START_TEST(uniformity_by_hand) {
  /* Three unit vectors 120° apart: every pair at squared distance 3, so log E exp(−2·3) = −6. */
  float tri[6];
  for (int i = 0; i < 3; i++) {
    tri[2 * i] = 2.0f * (float)cos(2 * M_PI * i / 3);
    tri[2 * i + 1] = 2.0f * (float)sin(2 * M_PI * i / 3);
  }
  double u;
  ck_assert_int_eq(eval_uniformity(tri, 3, 2, 2.0f, 4096, &u), 0);
  NEAR(u, -6.0, 1e-5);
  /* ±e1, ±e2: four pairs at distance² 2 and two at 4. */
  const float sq[8] = {1, 0, 0, 1, -1, 0, 0, -1};
  ck_assert_int_eq(eval_uniformity(sq, 4, 2, 2.0f, 4096, &u), 0);
  NEAR(u, log((4 * exp(-4.0) + 2 * exp(-8.0)) / 6), 1e-5);
  ck_assert_int_eq(eval_uniformity(sq, 4, 2, 0.5f, 4096, &u), 0);
  NEAR(u, log((4 * exp(-1.0) + 2 * exp(-2.0)) / 6), 1e-5);
  /* max_rows 3 of 6 rows takes rows 0, 2, 4: the triangle; the odd rows are noise. */
  float six[12];
  for (int i = 0; i < 3; i++) {
    six[4 * i] = tri[2 * i], six[4 * i + 1] = tri[2 * i + 1];
    six[4 * i + 2] = 0.3f, six[4 * i + 3] = 0.4f * i;
  }
  ck_assert_int_eq(eval_uniformity(six, 6, 2, 2.0f, 3, &u), 0);
  NEAR(u, -6.0, 1e-5);
  ck_assert_int_eq(eval_uniformity(six, 6, 2, 2.0f, 1, &u), MOCO_EINVAL);
}
END_TEST

START_TEST(uniformity_blocks_agree_with_direct_sum) {
  /* 600 rows: three Gram blocks of 256, the last partial. */
  enum { N = 600, D = 5 };
  float *x = malloc(N * D * sizeof(float));
  rng_t r;
  rng_init(&r, 3, RNG_STREAM_SAMPLE);
  for (int i = 0; i < N * D; i++) x[i] = rng_normal(&r);
  double u, sum = 0;
  ck_assert_int_eq(eval_uniformity(x, N, D, 2.0f, 4096, &u), 0);
  for (int i = 0; i < N; i++)
    for (int j = i + 1; j < N; j++) {
      double ab = 0, aa = 0, bb = 0;
      for (int d = 0; d < D; d++)
        ab += (double)x[i * D + d] * x[j * D + d], aa += (double)x[i * D + d] * x[i * D + d],
            bb += (double)x[j * D + d] * x[j * D + d];
      sum += exp(-2.0 * (2.0 - 2.0 * ab / sqrt(aa * bb)));
    }
  NEAR(u, log(sum / (N * (N - 1) / 2.0)), 1e-4);
  free(x);
}
END_TEST

/* ---- linear probe ------------------------------------------------------------------------------- */

START_TEST(probe_separates_a_linearly_separable_set) {
  /* Four classes in 12 dimensions, offset and scaled features (standardisation must cope), labels
   * given by the sign pattern of two hidden directions with a margin. */
  enum { NTR = 800, NTE = 400, D = 12, C = 4 };
  float *x = malloc((NTR + NTE) * D * sizeof(float));
  int32_t *y = malloc((NTR + NTE) * sizeof(int32_t));
  rng_t r;
  rng_init(&r, 21, RNG_STREAM_SAMPLE);
  for (int i = 0; i < NTR + NTE; i++) {
    float *row = x + i * D;
    float a, b;
    do {
      for (int d = 0; d < D; d++) row[d] = rng_normal(&r);
      a = row[0] + row[3] - row[5];
      b = row[1] - row[2] + 0.5f * row[7];
    } while (fabsf(a) < 0.2f || fabsf(b) < 0.2f);
    y[i] = (a > 0) * 2 + (b > 0);
    for (int d = 0; d < D; d++) row[d] = 100.0f + (d + 1) * 10.0f * row[d];
  }
  eval_probe_config c;
  c = config_defaults()->trainer.probe;
  double tr_acc, te_acc;
  ck_assert_int_eq(eval_linear_probe(&c, x, y, NTR, x + NTR * D, y + NTR, NTE, D, C, &tr_acc, &te_acc), 0);
  ck_assert_msg(tr_acc > 0.97 && te_acc > 0.95, "train %.3f test %.3f", tr_acc, te_acc);

  eval_probe p;
  ck_assert_int_eq(eval_probe_init(&p, D, C), 0);
  ck_assert_int_eq(eval_probe_fit(&p, &c, x, y, NTR), 0);
  ck_assert_int_gt(p.iterations, 5);
  ck_assert(p.loss < 0.3 && p.loss < log((double)C));
  /* Deterministic: a second fit gives the same parameters bit for bit. */
  float *first = malloc(p.n_params * sizeof(float));
  memcpy(first, p.params, p.n_params * sizeof(float));
  ck_assert_int_eq(eval_probe_fit(&p, &c, x, y, NTR), 0);
  ck_assert_int_eq(memcmp(first, p.params, p.n_params * sizeof(float)), 0);
  int32_t bad[2] = {0, 4};
  ck_assert_int_eq(eval_probe_fit(&p, &c, x, bad, 2), MOCO_ERANGE);
  c.max_iter = -1;
  ck_assert_int_eq(eval_probe_fit(&p, &c, x, y, NTR), MOCO_EINVAL);
  free(first);
  eval_probe_free(&p);
  ck_assert_int_eq(eval_probe_init(&p, D, 1), MOCO_EINVAL);
  free(x);
  free(y);
}
END_TEST

typedef struct {
  eval_probe *p;
  float wd;
  const float *x;
  const int32_t *y;
  int64_t n;
  float *work;
} probe_ctx;

/* The probe's loss by its formula in double: mean cross-entropy of softmax(W·standardise(x) + b), plus
 * wd/2·|W|². */
static double probe_ref_loss(void *ctx) {
  const probe_ctx *c = ctx;
  const eval_probe *p = c->p;
  const int D = p->dim, C = p->num_classes;
  const float *W = p->params, *b = p->params + (size_t)C * D;
  double loss = 0.0, w2 = 0.0, z[16];
  for (int64_t i = 0; i < c->n; i++) {
    double mx = -INFINITY, sum = 0.0;
    for (int k = 0; k < C; k++) {
      z[k] = b[k];
      for (int d = 0; d < D; d++) z[k] += (double)W[k * D + d] * ((double)c->x[i * D + d] - p->mean[d]) * p->inv_std[d];
      mx = fmax(mx, z[k]);
    }
    for (int k = 0; k < C; k++) sum += exp(z[k] - mx);
    loss += mx + log(sum) - z[c->y[i]];
  }
  for (int j = 0; j < C * D; j++) w2 += (double)W[j] * W[j];
  return loss / (double)c->n + 0.5 * c->wd * w2;
}

static double probe_loss_fn(void *ctx) {
  probe_ctx *c = ctx;
  return eval_probe_loss(c->p, c->wd, c->x, c->y, c->n, NULL, c->work);
}

START_TEST(probe_loss_gradient_check) {
  /* Batch sizes 1 and 13, classes 3, dims 5 and 7; a non-trivial standardisation and weight decay. */
  const int shapes[][3] = {{1, 5, 3}, {13, 7, 3}};
  rng_t r;
  rng_init(&r, 9, RNG_STREAM_SAMPLE);
  for (size_t s = 0; s < 2; s++) {
    int n = shapes[s][0], D = shapes[s][1], C = shapes[s][2];
    eval_probe p;
    ck_assert_int_eq(eval_probe_init(&p, D, C), 0);
    float *x = malloc(n * D * sizeof(float));
    int32_t *y = malloc(n * sizeof(int32_t));
    fill_uniform(x, n * D, &r, -2.0f, 2.0f);
    for (int i = 0; i < n; i++) y[i] = (int32_t)rng_below(&r, C);
    fill_uniform(p.mean, D, &r, -1.0f, 1.0f);
    fill_uniform(p.inv_std, D, &r, 0.5f, 2.0f);
    fill_uniform(p.params, p.n_params, &r, -1.0f, 1.0f);
    float *work = malloc(eval_probe_work_floats(&p, n) * sizeof(float));
    float *grad = malloc(p.n_params * sizeof(float));
    eval_probe_loss(&p, 0.1f, x, y, n, grad, work);
    probe_ctx ctx = {&p, 0.1f, x, y, n, work};
    ck_assert(fabs(probe_loss_fn(&ctx) - probe_ref_loss(&ctx)) < 1e-5 * (1 + probe_ref_loss(&ctx)));
    /* Differences of the double formula (truncation by Richardson); the float gradient's rounding:
     * dW = Σ_i g_i (x_i - mean) inv_std / n + wd W sums n terms and subtracts (Σ g)·mean, with
     * Σ_i |g_ic| <= 2 (a softmax minus its one-hot), |x| <= 2, |mean| <= 1, inv_std <= 2: at most
     * (n + 8)·u·12 per entry. */
    char what[64];
    snprintf(what, sizeof what, "probe n %d D %d", n, D);
    gc_spec spec = {.name = what, .h = 1e-3, .atol = (n + 8) * 0x1p-24 * 12, .rtol = 4 * 0x1p-24,
                    .richardson = 1, .max_checks = 1000};
    gc_assert(gc_check(probe_ref_loss, &ctx, p.params, grad, p.n_params, &spec), what);
    free(x);
    free(y);
    free(work);
    free(grad);
    eval_probe_free(&p);
  }
}
END_TEST

/* ---- export ------------------------------------------------------------------------------------- */

static unsigned char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  *len = (size_t)ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char *b = malloc(*len + 1);
  if (fread(b, 1, *len, f) != *len) *len = 0;
  fclose(f);
  return b;
}

/* Parses a .npy file as train/eval.h documents it and checks header and payload. */
static void check_npy(const char *path, const char *descr, const char *shape, const void *data, size_t bytes) {
  size_t len;
  unsigned char *b = slurp(path, &len);
  ck_assert_ptr_nonnull(b);
  ck_assert_int_eq(memcmp(b, "\x93NUMPY\x01\x00", 8), 0);
  size_t hlen = b[8] | (size_t)b[9] << 8, start = 10 + hlen;
  ck_assert_uint_eq(start % 64, 0);
  ck_assert_uint_eq(len, start + bytes);
  ck_assert_int_eq(b[start - 1], '\n');
  char head[256], want[128];
  ck_assert_uint_lt(hlen, sizeof head);
  memcpy(head, b + 10, hlen);
  head[hlen] = '\0';
  snprintf(want, sizeof want, "{'descr': '%s', 'fortran_order': False, 'shape': %s, }", descr, shape);
  ck_assert_msg(!strncmp(head, want, strlen(want)), "header %s", head);
  for (size_t i = strlen(want); i + 1 < hlen; i++) ck_assert_int_eq(head[i], ' ');
  ck_assert_int_eq(memcmp(b + start, data, bytes), 0);
  free(b);
}

START_TEST(export_round_trip) {
  char *dir = test_tmpdir();
  ck_assert_ptr_nonnull(dir);
  char path[512], side[512];
  snprintf(path, sizeof path, "%s/emb.npy", dir);
  const float x[15] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, -0.5f};
  const int32_t labels[5] = {0, 9, 3, -1, 2};
  const int64_t ids[5] = {10, 11, 12, 1LL << 40, 14};
  ck_assert_int_eq(eval_export(path, x, 5, 3, labels, ids), 0);
  check_npy(path, "<f4", "(5, 3)", x, sizeof x);
  ck_assert_int_eq(eval_export_sibling(path, ".labels.npy", side, sizeof side), 0);
  ck_assert_ptr_nonnull(strstr(side, "/emb.labels.npy"));
  check_npy(side, "<i4", "(5,)", labels, sizeof labels);
  ck_assert_int_eq(eval_export_sibling(path, ".ids.npy", side, sizeof side), 0);
  check_npy(side, "<i8", "(5,)", ids, sizeof ids);
  /* Overwriting replaces the file; no temporary file is left behind. */
  ck_assert_int_eq(eval_export(path, x + 3, 2, 6, NULL, NULL), 0);
  check_npy(path, "<f4", "(2, 6)", x + 3, 12 * sizeof(float));
  DIR *d = opendir(dir);
  int files = 0;
  for (struct dirent *e; (e = readdir(d));)
    if (e->d_name[0] != '.') {
      files++;
      ck_assert_ptr_null(strstr(e->d_name, ".tmp"));
    }
  closedir(d);
  ck_assert_int_eq(files, 3);
  /* A name without .npy gets the suffixes appended; a missing directory fails with the path. */
  ck_assert_int_eq(eval_export_sibling("run/feat", ".ids.npy", side, sizeof side), 0);
  ck_assert_str_eq(side, "run/feat.ids.npy");
  ck_assert_int_eq(eval_export_sibling(path, ".labels.npy", side, 8), MOCO_ERANGE);
  snprintf(path, sizeof path, "%s/missing/emb.npy", dir);
  ck_assert_int_eq(eval_export(path, x, 5, 3, NULL, NULL), MOCO_EIO);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "missing/emb.npy"));
  rm_rf(dir);
}
END_TEST

Suite *eval_suite(void) {
  Suite *s = suite_create("eval");
  TCase *tk = tcase_create("knn");
  tcase_set_timeout(tk, 60);
  tcase_add_test(tk, knn_classifies_hand_built_clusters);
  tcase_add_test(tk, knn_matches_brute_force);
  tcase_add_test(tk, knn_exact_ties_and_a_misleading_sample);
  tcase_add_test(tk, knn_refuses_bad_input);
  suite_add_tcase(s, tk);
  TCase *tu = tcase_create("geometry");
  tcase_add_test(tu, alignment_by_hand);
  tcase_add_test(tu, uniformity_by_hand);
  tcase_add_test(tu, uniformity_blocks_agree_with_direct_sum);
  suite_add_tcase(s, tu);
  TCase *tp = tcase_create("probe");
  tcase_set_timeout(tp, 60);
  tcase_add_test(tp, probe_separates_a_linearly_separable_set);
  tcase_add_test(tp, probe_loss_gradient_check);
  suite_add_tcase(s, tp);
  TCase *te = tcase_create("export");
  tcase_add_test(te, export_round_trip);
  suite_add_tcase(s, te);
  return s;
}
