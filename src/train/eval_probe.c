/* Linear probe: multinomial logistic regression on frozen features, fitted by full-batch L-BFGS (see
 * train/eval.h for why). */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/tensor.h"
#include "train/eval.h"

/* Rows per block when only predictions are needed (bounds the logits buffer). */
#define PREDICT_BLOCK 4096
/* Armijo sufficient-decrease constant and the most step halvings of one line search. */
#define LS_C1 1e-4
#define LS_MAX 30

int eval_probe_init(eval_probe *p, int dim, int num_classes) {
  memset(p, 0, sizeof *p);
  if (dim < 1 || num_classes < 2)
    return moco_error(MOCO_EINVAL, "probe: dim %d, classes %d; allowed dim >= 1, classes >= 2", dim,
                      num_classes);
  p->dim = dim;
  p->num_classes = num_classes;
  p->n_params = (size_t)dim * num_classes + num_classes;
  p->mean = tensor_calloc(dim);
  p->inv_std = tensor_alloc(dim);
  p->params = tensor_calloc(p->n_params);
  if (!p->mean || !p->inv_std || !p->params) {
    eval_probe_free(p);
    return moco_error(MOCO_ENOMEM, "probe: %zu parameters", (size_t)dim * num_classes);
  }
  vec_fill(p->inv_std, 1.0f, dim);
  return 0;
}

void eval_probe_free(eval_probe *p) {
  tensor_free(p->mean);
  tensor_free(p->inv_std);
  tensor_free(p->params);
  memset(p, 0, sizeof *p);
}

/* W'[c] = W[c]·diag(inv_std) and b' = b − W'·mean, so that W'x + b' = W((x − mean)·inv_std) + b: the
 * standardisation costs C·D operations per pass instead of a copy of the feature matrix. */
static void fold(const eval_probe *p, float *wb) {
  const int D = p->dim, C = p->num_classes;
  const float *W = p->params, *b = p->params + (size_t)C * D;
  float *Wf = wb, *bf = wb + (size_t)C * D;
  for (int c = 0; c < C; c++) {
    const float *w = W + (size_t)c * D;
    float *wf = Wf + (size_t)c * D;
    for (int d = 0; d < D; d++) wf[d] = p->inv_std[d] * w[d];
    bf[c] = b[c] - vec_dot(wf, p->mean, D);
  }
}

/* logits [C, n] = W' [C, D] · xᵀ + b' with the folded parameters wb; x [n, D]. Class-major because
 * OpenBLAS runs this thin product (C ~ 10) markedly faster with C as the row count than as the column
 * count. */
static void logits_forward(const eval_probe *p, const float *wb, const float *x, int n, float *logits) {
  const int D = p->dim, C = p->num_classes;
  const float *bf = wb + (size_t)C * D;
  for (int c = 0; c < C; c++) vec_fill(logits + (size_t)c * n, bf[c], n);
  mat_mul(logits, wb, x, C, n, D, 0, 1, 1.0f, 1.0f);
}

/* Turns sample i's logits (column i of l [C, n]) into (softmax − onehot(y))·scale; returns its
 * cross-entropy. */
static double softmax_xent_col(float *l, int64_t n, int64_t i, int C, int32_t y, float scale) {
  float m = l[i];
  for (int c = 1; c < C; c++) m = l[c * n + i] > m ? l[c * n + i] : m;
  double z = 0.0;
  for (int c = 0; c < C; c++) z += exp((double)l[c * n + i] - m);
  double loss = m + log(z) - l[y * n + i];
  for (int c = 0; c < C; c++) l[c * n + i] = (float)(exp((double)l[c * n + i] - m) / z) * scale;
  l[y * n + i] -= scale;
  return loss;
}

/* Forward: logits = W·z + b, loss = mean_i xent(logits_i, y_i) + (λ/2)‖W‖².
 * Backward, with G = (softmax − onehot)/n [C, n] and z = (x − μ)·s:
 *     db = Σ_i G[:, i]          dW[c] = (G[c]·x − db_c·μ) ⊙ s + λW[c]
 * x [n, D], y [n], grad [n_params] or NULL, work [eval_probe_work_floats(p, n)]: logits, then the
 * folded parameters. */
size_t eval_probe_work_floats(const eval_probe *p, int64_t n) {
  return (size_t)n * p->num_classes + p->n_params;
}

double eval_probe_loss(const eval_probe *p, float weight_decay, const float *x, const int32_t *y, int64_t n,
                       float *grad, float *work) {
  const int D = p->dim, C = p->num_classes;
  const size_t CD = (size_t)C * D;
  float *logits = work, *wb = work + (size_t)n * C;
  fold(p, wb);
  logits_forward(p, wb, x, (int)n, logits);
  double loss = 0.0;
  const float scale = 1.0f / (float)n;
  for (int64_t i = 0; i < n; i++) loss += softmax_xent_col(logits, n, i, C, y[i], scale);
  loss /= (double)n;
  const float *W = p->params;
  double w2 = 0.0;
  for (size_t j = 0; j < CD; j++) w2 += (double)W[j] * W[j];
  loss += 0.5 * weight_decay * w2;
  if (!grad) return loss;

  float *dW = grad, *db = grad + CD;
  mat_mul(dW, logits, x, C, D, (int)n, 0, 0, 1.0f, 0.0f);
  for (int c = 0; c < C; c++) {
    const float *g = logits + (size_t)c * n;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += g[i];
    db[c] = (float)sum;
    float *row = dW + (size_t)c * D;
    vec_axpy(row, -db[c], p->mean, D);
    for (int d = 0; d < D; d++) row[d] *= p->inv_std[d];
    vec_axpy(row, weight_decay, W + (size_t)c * D, D);
  }
  return loss;
}

static int check_data(const eval_probe *p, const char *what, const int32_t *y, int64_t n) {
  if (n < 1 || n > INT_MAX)
    return moco_error(MOCO_EINVAL, "probe %s: %lld rows, allowed 1..%d", what, (long long)n, INT_MAX);
  for (int64_t i = 0; i < n; i++)
    if (y[i] < 0 || y[i] >= p->num_classes)
      return moco_error(MOCO_ERANGE, "probe %s labels[%lld]: %d, allowed 0..%d", what, (long long)i, y[i],
                        p->num_classes - 1);
  return 0;
}

/* Train mean and 1/std per feature, two-pass so a constant feature gets variance exactly 0 (and
 * inv_std 1: its standardised value is 0 whatever the scale). */
static int standardise_stats(eval_probe *p, const float *x, int64_t n) {
  const int D = p->dim;
  double *acc = calloc(2 * (size_t)D, sizeof(double));
  if (!acc) return moco_error(MOCO_ENOMEM, "probe: statistics of %d features", D);
  double *mu = acc, *var = acc + D;
  for (int64_t i = 0; i < n; i++)
    for (int d = 0; d < D; d++) mu[d] += x[i * D + d];
  for (int d = 0; d < D; d++) mu[d] /= (double)n;
  for (int64_t i = 0; i < n; i++)
    for (int d = 0; d < D; d++) {
      double e = x[i * D + d] - mu[d];
      var[d] += e * e;
    }
  int rc = 0;
  for (int d = 0; d < D && !rc; d++) {
    var[d] /= (double)n;
    if (!isfinite(var[d]))
      rc = moco_error(MOCO_ERANGE, "probe: feature %d is not finite (NaN or Inf)", d);
    p->mean[d] = (float)mu[d];
    p->inv_std[d] = var[d] > 0.0 ? (float)(1.0 / sqrt(var[d])) : 1.0f;
  }
  free(acc);
  return rc;
}

/* ---- L-BFGS ------------------------------------------------------------------------------------ */

typedef struct {
  const eval_probe *p;
  const eval_probe_config *c;
  const float *x;
  const int32_t *y;
  int64_t n;
  size_t P;
  float *g, *d, *x_old, *g_old, *logits;
  float *S, *Y; /* [history, P] correction pairs, ring buffer */
  double *rho, *alpha;
  int count, head;
} lbfgs;

static double dot(const float *a, const float *b, size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
  return s;
}

static double max_abs(const float *a, size_t n) {
  double m = 0.0;
  for (size_t i = 0; i < n; i++) m = fabs(a[i]) > m ? fabs(a[i]) : m;
  return m;
}

/* d = −H·g by the two-loop recursion (Nocedal & Wright, Algorithm 7.4), H₀ = γI with
 * γ = sᵀy / yᵀy of the newest pair. */
static void lbfgs_direction(lbfgs *L) {
  const size_t P = L->P;
  const int m = EVAL_PROBE_HISTORY;
  float *q = L->d;
  for (size_t j = 0; j < P; j++) q[j] = -L->g[j];
  for (int k = 0; k < L->count; k++) {
    int i = (L->head - 1 - k + m) % m;
    L->alpha[i] = L->rho[i] * dot(L->S + (size_t)i * P, q, P);
    vec_axpy(q, (float)-L->alpha[i], L->Y + (size_t)i * P, P);
  }
  if (L->count) {
    int i = (L->head - 1 + m) % m;
    const float *yv = L->Y + (size_t)i * P;
    vec_scale(q, (float)(1.0 / (L->rho[i] * dot(yv, yv, P))), P);
  }
  for (int k = L->count - 1; k >= 0; k--) {
    int i = (L->head - 1 - k + m) % m;
    double beta = L->rho[i] * dot(L->Y + (size_t)i * P, q, P);
    vec_axpy(q, (float)(L->alpha[i] - beta), L->S + (size_t)i * P, P);
  }
}

/* Stores s = θ − θ_old, y = g − g_old when the curvature sᵀy is positive (it always is for this convex
 * objective, up to rounding), which keeps H positive definite. */
static void lbfgs_push(lbfgs *L, const float *theta) {
  const size_t P = L->P;
  const int m = EVAL_PROBE_HISTORY;
  float *s = L->S + (size_t)L->head * P, *yv = L->Y + (size_t)L->head * P;
  for (size_t j = 0; j < P; j++) {
    s[j] = theta[j] - L->x_old[j];
    yv[j] = L->g[j] - L->g_old[j];
  }
  double sy = dot(s, yv, P);
  if (!(sy > 1e-12 * sqrt(dot(s, s, P) * dot(yv, yv, P)))) return;
  L->rho[L->head] = 1.0 / sy;
  L->head = (L->head + 1) % m;
  if (L->count < m) L->count++;
}

static double lbfgs_eval(lbfgs *L) {
  return eval_probe_loss(L->p, L->c->weight_decay, L->x, L->y, L->n, L->g, L->logits);
}

/* Backtracking line search along d from θ (saved in x_old, with f and g_old) until the Armijo
 * condition holds; each retry takes the minimiser of the quadratic through f, f'(0) and f(t), kept
 * within [0.1t, 0.5t]. Returns the new loss, or NAN when no decrease was found. */
static double lbfgs_line_search(lbfgs *L, float *theta, double f, double gd, double t) {
  const size_t P = L->P;
  for (int k = 0; k < LS_MAX; k++) {
    for (size_t j = 0; j < P; j++) theta[j] = L->x_old[j] + (float)t * L->d[j];
    double fn = lbfgs_eval(L);
    if (fn <= f + LS_C1 * t * gd) return fn;
    double tq = -gd * t * t / (2.0 * (fn - f - gd * t));
    t = isfinite(tq) ? fmin(fmax(tq, 0.1 * t), 0.5 * t) : 0.5 * t;
  }
  memcpy(theta, L->x_old, P * sizeof(float));
  memcpy(L->g, L->g_old, P * sizeof(float));
  return NAN;
}

static int lbfgs_alloc(lbfgs *L) {
  const size_t P = L->P, m = (size_t)EVAL_PROBE_HISTORY;
  L->g = tensor_alloc(P);
  L->d = tensor_alloc(P);
  L->x_old = tensor_alloc(P);
  L->g_old = tensor_alloc(P);
  L->logits = tensor_alloc(eval_probe_work_floats(L->p, L->n));
  L->S = tensor_alloc(m * P);
  L->Y = tensor_alloc(m * P);
  L->rho = malloc(m * sizeof(double));
  L->alpha = malloc(m * sizeof(double));
  if (L->g && L->d && L->x_old && L->g_old && L->logits && L->S && L->Y && L->rho && L->alpha) return 0;
  return moco_error(MOCO_ENOMEM, "probe: L-BFGS workspace for %lld rows", (long long)L->n);
}

static void lbfgs_free(lbfgs *L) {
  float *f[] = {L->g, L->d, L->x_old, L->g_old, L->logits, L->S, L->Y};
  for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) tensor_free(f[i]);
  free(L->rho);
  free(L->alpha);
}

/* Minimises the objective over p->params from their current value. */
static int lbfgs_run(eval_probe *p, lbfgs *L) {
  const size_t P = L->P;
  float *theta = p->params;
  double f = lbfgs_eval(L);
  int it = 0;
  for (; it < L->c->max_iter && max_abs(L->g, P) > EVAL_PROBE_TOLERANCE; it++) {
    lbfgs_direction(L);
    double gd = dot(L->g, L->d, P);
    if (!(gd < 0.0)) { /* rounding broke H: restart from steepest descent */
      L->count = 0;
      lbfgs_direction(L);
      gd = dot(L->g, L->d, P);
    }
    /* Without curvature information yet, the first step moves θ by at most 1 in max-norm. */
    double t = L->count ? 1.0 : fmin(1.0, 1.0 / max_abs(L->g, P));
    memcpy(L->x_old, theta, P * sizeof(float));
    memcpy(L->g_old, L->g, P * sizeof(float));
    double fn = lbfgs_line_search(L, theta, f, gd, t);
    if (isnan(fn)) break; /* no decrease along a descent direction: at the optimum up to rounding */
    lbfgs_push(L, theta);
    f = fn;
  }
  p->iterations = it;
  p->loss = f;
  if (!isfinite(f)) return moco_error(MOCO_ERANGE, "probe: loss is not finite after %d iterations", it);
  return 0;
}

static int check_config(const eval_probe_config *c) {
  if (c->max_iter < 0) return moco_error(MOCO_EINVAL, "probe: max_iter %d, allowed >= 0", c->max_iter);
  if (!(c->weight_decay >= 0.0f && isfinite(c->weight_decay)))
    return moco_error(MOCO_EINVAL, "probe: weight_decay %g, allowed >= 0", c->weight_decay);
  return 0;
}

int eval_probe_fit(eval_probe *p, const eval_probe_config *c, const float *x, const int32_t *y, int64_t n) {
  int rc = check_config(c);
  if (!rc) rc = check_data(p, "train", y, n);
  if (!rc) rc = standardise_stats(p, x, n);
  if (rc) return rc;
  vec_fill(p->params, 0.0f, p->n_params);
  lbfgs L = {.p = p, .c = c, .x = x, .y = y, .n = n, .P = p->n_params};
  if (!(rc = lbfgs_alloc(&L))) rc = lbfgs_run(p, &L);
  lbfgs_free(&L);
  return rc;
}

int eval_probe_accuracy(const eval_probe *p, const float *x, const int32_t *y, int64_t n, double *accuracy,
                        int32_t *pred) {
  int rc = check_data(p, "accuracy", y, n);
  if (rc) return rc;
  const int C = p->num_classes;
  int bs = n < PREDICT_BLOCK ? (int)n : PREDICT_BLOCK;
  float *wb = tensor_alloc(p->n_params), *logits = tensor_alloc((size_t)bs * C);
  if (!wb || !logits) {
    rc = moco_error(MOCO_ENOMEM, "probe: prediction workspace");
    goto out;
  }
  fold(p, wb);
  int64_t correct = 0;
  for (int64_t i0 = 0; i0 < n; i0 += bs) {
    int m = n - i0 < bs ? (int)(n - i0) : bs;
    logits_forward(p, wb, x + i0 * p->dim, m, logits);
    for (int i = 0; i < m; i++) {
      int32_t best = 0;
      for (int k = 1; k < C; k++)
        if (logits[(size_t)k * m + i] > logits[(size_t)best * m + i]) best = k;
      correct += best == y[i0 + i];
      if (pred) pred[i0 + i] = best;
    }
  }
  *accuracy = (double)correct / (double)n;
out:
  tensor_free(wb);
  tensor_free(logits);
  return rc;
}

int eval_linear_probe(const eval_probe_config *c, const float *train, const int32_t *train_labels,
                      int64_t n_train, const float *test, const int32_t *test_labels, int64_t n_test,
                      int dim, int num_classes, double *train_acc, double *test_acc) {
  eval_probe p;
  int rc = eval_probe_init(&p, dim, num_classes);
  if (rc) return rc;
  if (!(rc = eval_probe_fit(&p, c, train, train_labels, n_train)) &&
      !(rc = eval_probe_accuracy(&p, train, train_labels, n_train, train_acc, NULL)))
    rc = eval_probe_accuracy(&p, test, test_labels, n_test, test_acc, NULL);
  eval_probe_free(&p);
  return rc;
}
