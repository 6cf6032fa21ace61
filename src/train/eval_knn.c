/* Weighted kNN monitor, instance retrieval and the alignment / uniformity figures: everything in
 * train/eval.h that is built on cosine similarities. */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/tensor.h"
#include "train/eval.h"

/* Rows of the Gram block of eval_uniformity. */
#define UNIFORMITY_BLOCK 256

static int check_shape(const char *what, int64_t n, int dim) {
  if (n < 1 || n > INT_MAX)
    return moco_error(MOCO_EINVAL, "%s: %lld rows, allowed 1..%d", what, (long long)n, INT_MAX);
  if (dim < 1) return moco_error(MOCO_EINVAL, "%s: dim %d, allowed >= 1", what, dim);
  return 0;
}

static int check_labels(const char *what, const int32_t *y, int64_t n, int num_classes) {
  for (int64_t i = 0; i < n; i++)
    if (y[i] < 0 || y[i] >= num_classes)
      return moco_error(MOCO_ERANGE, "%s labels[%lld]: %d, allowed 0..%d", what, (long long)i, y[i],
                        num_classes - 1);
  return 0;
}

/* 1/‖x_i‖ per row (0 for a zero row). A non-finite norm means a NaN or Inf feature, which would make
 * every similarity of the row meaningless: refused here rather than voted on. */
static int inverse_norms(const char *what, const float *x, int64_t n, int dim, float *inv) {
  for (int64_t i = 0; i < n; i++) {
    const float *r = x + i * dim;
    double s = 0.0;
    for (int j = 0; j < dim; j++) s += (double)r[j] * r[j];
    if (!isfinite(s))
      return moco_error(MOCO_ERANGE, "%s row %lld: norm is not finite (NaN or Inf feature)", what,
                        (long long)i);
    inv[i] = s > 0.0 ? (float)(1.0 / sqrt(s)) : 0.0f;
  }
  return 0;
}

/* The value of rank k (0-based) in descending order of a[0..n); reorders a. Hoare partition around a
 * median of three (Wirth's FIND): O(n) on average, and long runs of equal values split evenly instead
 * of degrading to O(n²). */
static float select_desc(float *a, int64_t n, int64_t k) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    float x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi];
    float pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
    int64_t i = lo, j = hi;
    while (i <= j) {
      while (a[i] > pivot) i++;
      while (a[j] < pivot) j--;
      if (i <= j) {
        float t = a[i];
        a[i++] = a[j];
        a[j--] = t;
      }
    }
    /* a[lo..j] >= pivot >= a[i..hi], and everything strictly between equals the pivot. */
    if (k <= j)
      hi = j;
    else if (k >= i)
      lo = i;
    else
      return a[k];
  }
  return a[k];
}

/* Rows sampled (evenly strided) to place the candidate threshold of a kNN row; rows shorter than
 * KNN_SAMPLE_MIN are scanned in full. */
#define KNN_SAMPLE 4096
#define KNN_SAMPLE_MIN (4 * KNN_SAMPLE)

typedef struct {
  float *cand_s;   /* [n_train] candidate similarities, in train-row order */
  int32_t *cand_i; /* [n_train] their train rows */
  float *scratch;  /* [n_train] selection buffer */
  double *votes;   /* [num_classes] */
} knn_row_work;

/* Gathers the similarities s_j = raw_j·inv_j (train-norm scaling) that are >= t. */
static int64_t knn_gather(const float *raw, const float *inv, int64_t n, float t, knn_row_work *w) {
  int64_t c = 0;
  for (int64_t j = 0; j < n; j++) {
    float s = raw[j] * inv[j];
    if (s >= t) w->cand_s[c] = s, w->cand_i[c++] = (int32_t)j;
  }
  return c;
}

/* The candidates of one row: every train row whose similarity reaches a threshold t that lies, with
 * high probability, a little below the k-th largest similarity. t is the value of rank 2e + 16 in an
 * evenly strided sample of KNN_SAMPLE similarities, where e = k·KNN_SAMPLE/n is the expected sample
 * rank of the k-th largest: a few hundred candidates out of 60 000, found in one cheap pass instead of
 * a selection over the whole row. When fewer than k reach t (a sample that happened to hold the
 * nearest rows) the row is gathered in full, so the result never depends on the sample. */
static int64_t knn_candidates(const float *raw, const float *inv, int64_t n, int k, knn_row_work *w) {
  int64_t rank = 2 * (int64_t)((double)k * KNN_SAMPLE / (double)n) + 16, c = 0;
  if (n >= KNN_SAMPLE_MIN && rank < KNN_SAMPLE) {
    int64_t stride = n / KNN_SAMPLE;
    for (int i = 0; i < KNN_SAMPLE; i++) w->scratch[i] = raw[i * stride] * inv[i * stride];
    c = knn_gather(raw, inv, n, select_desc(w->scratch, KNN_SAMPLE, rank), w);
  }
  return c >= k ? c : knn_gather(raw, inv, n, -INFINITY, w);
}

/* Vote of one test row among its nc candidates (cand_s, cand_i, at least k of them): the k largest
 * similarities win; those equal to the k-th value are taken in train-row order so the outcome does not
 * depend on the selection's reordering. Weights exp((s − s_max)/T) rank the classes as exp(s/T) does
 * but cannot overflow for small T. */
static int32_t knn_vote(int64_t nc, const int32_t *labels, int k, float T, knn_row_work *w, int num_classes) {
  memcpy(w->scratch, w->cand_s, nc * sizeof(float));
  float thr = select_desc(w->scratch, nc, k - 1), smax = thr;
  int64_t above = 0;
  for (int64_t j = 0; j < nc; j++)
    if (w->cand_s[j] > thr) {
      above++;
      if (w->cand_s[j] > smax) smax = w->cand_s[j];
    }
  int64_t ties = k - above;
  memset(w->votes, 0, num_classes * sizeof(double));
  const double inv_t = 1.0 / T;
  for (int64_t j = 0; j < nc; j++) {
    float s = w->cand_s[j];
    if (s > thr || (s == thr && ties-- > 0)) w->votes[labels[w->cand_i[j]]] += exp((s - smax) * inv_t);
  }
  int32_t best = 0;
  for (int c = 1; c < num_classes; c++)
    if (w->votes[c] > w->votes[best]) best = c;
  return best;
}

static int check_knn_args(const eval_knn_config *c, int n_protocols, int64_t n_train, int64_t n_test,
                          int dim, int num_classes) {
  int rc;
  if ((rc = check_shape("knn train", n_train, dim)) || (rc = check_shape("knn test", n_test, dim)))
    return rc;
  if (n_protocols < 1) return moco_error(MOCO_EINVAL, "knn: %d protocols, need >= 1", n_protocols);
  for (int p = 0; p < n_protocols; p++) {
    if (c[p].k < 1) return moco_error(MOCO_EINVAL, "knn protocol %d: k %d, allowed >= 1", p, c[p].k);
    if (!(c[p].temperature > 0.0f && isfinite(c[p].temperature)))
      return moco_error(MOCO_EINVAL, "knn protocol %d: temperature %g, allowed > 0", p, c[p].temperature);
  }
  if (c->block_rows < 0) return moco_error(MOCO_EINVAL, "knn: block_rows %d, allowed >= 0", c->block_rows);
  if (num_classes < 1) return moco_error(MOCO_EINVAL, "knn: num_classes %d, allowed >= 1", num_classes);
  return 0;
}

typedef struct {
  float *train_inv, *test_block, *sims;
  knn_row_work row;
} knn_work;

static void knn_work_free(knn_work *w) {
  tensor_free(w->train_inv);
  tensor_free(w->test_block);
  tensor_free(w->sims);
  tensor_free(w->row.cand_s);
  tensor_free(w->row.scratch);
  free(w->row.cand_i);
  free(w->row.votes);
}

static int knn_work_alloc(knn_work *w, int64_t n_train, int rows, int dim, int num_classes) {
  size_t scratch = n_train > rows ? n_train : rows; /* also holds the test block's inverse norms */
  w->train_inv = tensor_alloc(n_train);
  w->test_block = tensor_alloc((size_t)rows * dim);
  w->sims = tensor_alloc((size_t)rows * n_train);
  w->row.cand_s = tensor_alloc(n_train);
  w->row.scratch = tensor_alloc(scratch);
  w->row.cand_i = malloc(n_train * sizeof(int32_t));
  w->row.votes = malloc(num_classes * sizeof(double));
  if (w->train_inv && w->test_block && w->sims && w->row.cand_s && w->row.scratch && w->row.cand_i &&
      w->row.votes)
    return 0;
  knn_work_free(w);
  return moco_error(MOCO_ENOMEM, "knn: workspace for %d x %lld similarities", rows, (long long)n_train);
}

int eval_knn(const eval_knn_config *c, const float *train, const int32_t *train_labels, int64_t n_train,
             const float *test, const int32_t *test_labels, int64_t n_test, int dim, int num_classes,
             double *accuracy, double *class_acc, int32_t *pred) {
  eval_knn_out out = {.class_acc = class_acc, .pred = pred};
  int rc = eval_knn_protocols(c, 1, train, train_labels, n_train, test, test_labels, n_test, dim, num_classes,
                              &out);
  if (!rc) *accuracy = out.accuracy;
  return rc;
}

/* Largest k of the protocols, capped at the train rows: the candidates every protocol votes from. */
static int knn_k_max(const eval_knn_config *c, int n_protocols, int64_t n_train) {
  int k = 1;
  for (int p = 0; p < n_protocols; p++) k = c[p].k > k ? c[p].k : k;
  return k < n_train ? k : (int)n_train;
}

int eval_knn_protocols(const eval_knn_config *c, int n_protocols, const float *train,
                       const int32_t *train_labels, int64_t n_train, const float *test,
                       const int32_t *test_labels, int64_t n_test, int dim, int num_classes, eval_knn_out *out) {
  int rc = check_knn_args(c, n_protocols, n_train, n_test, dim, num_classes);
  if (!rc) rc = check_labels("knn train", train_labels, n_train, num_classes);
  if (!rc) rc = check_labels("knn test", test_labels, n_test, num_classes);
  if (rc) return rc;
  int block = c->block_rows > 0 ? c->block_rows : EVAL_KNN_BLOCK_ROWS;
  int rows = block < n_test ? block : (int)n_test;
  int k_max = knn_k_max(c, n_protocols, n_train);
  knn_work w;
  if ((rc = knn_work_alloc(&w, n_train, rows, dim, num_classes))) return rc;
  /* hits[(p·classes + y)·2 + 0/1]: correct / all test rows of class y under protocol p */
  int64_t *hits = calloc(2 * (size_t)num_classes * n_protocols, sizeof *hits);
  if (!hits) {
    rc = moco_error(MOCO_ENOMEM, "knn: per-class counts");
    goto out;
  }
  if ((rc = inverse_norms("knn train", train, n_train, dim, w.train_inv))) goto out;
  for (int64_t b0 = 0; b0 < n_test && !rc; b0 += rows) {
    int m = n_test - b0 < rows ? (int)(n_test - b0) : rows;
    /* Normalising the few test rows of the block costs nothing; the train side is scaled afterwards. */
    memcpy(w.test_block, test + b0 * dim, (size_t)m * dim * sizeof(float));
    if ((rc = inverse_norms("knn test", w.test_block, m, dim, w.row.scratch))) break;
    for (int r = 0; r < m; r++) vec_scale(w.test_block + (size_t)r * dim, w.row.scratch[r], dim);
    mat_mul(w.sims, w.test_block, train, m, (int)n_train, dim, 0, 1, 1.0f, 0.0f);
    for (int r = 0; r < m; r++) {
      int64_t nc = knn_candidates(w.sims + (size_t)r * n_train, w.train_inv, n_train, k_max, &w.row);
      int32_t y = test_labels[b0 + r];
      for (int p = 0; p < n_protocols; p++) {
        int k = c[p].k < n_train ? c[p].k : (int)n_train;
        int32_t pr = knn_vote(nc, train_labels, k, c[p].temperature, &w.row, num_classes);
        if (out[p].pred) out[p].pred[b0 + r] = pr;
        int64_t *h = hits + 2 * ((size_t)p * num_classes + y);
        h[0] += pr == y, h[1]++;
      }
    }
  }
  for (int p = 0; p < n_protocols && !rc; p++) {
    int64_t correct = 0;
    for (int y = 0; y < num_classes; y++) {
      const int64_t *h = hits + 2 * ((size_t)p * num_classes + y);
      correct += h[0];
      if (out[p].class_acc) out[p].class_acc[y] = h[1] ? (double)h[0] / (double)h[1] : -1.0;
    }
    out[p].accuracy = (double)correct / (double)n_test;
  }
out:
  free(hits);
  knn_work_free(&w);
  return rc;
}

/* ---- instance retrieval ------------------------------------------------------------------------ */

/* Query rows per similarity block of eval_retrieval. */
#define RETRIEVAL_BLOCK 256

static int check_retrieval_args(const int64_t *target, int64_t n_query, int64_t n_gallery, int dim,
                                const int *ks, int n_ks) {
  int rc;
  if ((rc = check_shape("retrieval queries", n_query, dim)) ||
      (rc = check_shape("retrieval gallery", n_gallery, dim)))
    return rc;
  for (int i = 0; i < n_ks; i++)
    if (ks[i] < 1) return moco_error(MOCO_EINVAL, "retrieval: ks[%d] %d, allowed >= 1", i, ks[i]);
  for (int64_t i = 0; i < n_query; i++)
    if (target[i] < 0 || target[i] >= n_gallery)
      return moco_error(MOCO_ERANGE, "retrieval: target[%lld] %lld, allowed 0..%lld", (long long)i,
                        (long long)target[i], (long long)n_gallery - 1);
  return 0;
}

/* Adds one query's recall@k for every k: `above` gallery rows beat its match, `tied` (the match
 * included) equal it; the match's rank among the tied rows is uniform, so recall@k is the chance that
 * it falls within the first k − above of them. */
static void retrieval_count(int64_t above, int64_t tied, const int *ks, int n_ks, double *sum) {
  for (int i = 0; i < n_ks; i++) {
    int64_t room = ks[i] - above;
    sum[i] += room <= 0 ? 0.0 : room >= tied ? 1.0 : (double)room / (double)tied;
  }
}

int eval_retrieval(const float *query, const int64_t *target, int64_t n_query, const float *gallery,
                   int64_t n_gallery, int dim, const int *ks, int n_ks, double *recall) {
  int rc = check_retrieval_args(target, n_query, n_gallery, dim, ks, n_ks);
  if (rc) return rc;
  int rows = n_query < RETRIEVAL_BLOCK ? (int)n_query : RETRIEVAL_BLOCK;
  float *ginv = tensor_alloc(n_gallery), *qb = tensor_alloc((size_t)rows * dim);
  float *sims = tensor_alloc((size_t)rows * n_gallery), *qinv = tensor_alloc(rows);
  if (!ginv || !qb || !sims || !qinv) {
    rc = moco_error(MOCO_ENOMEM, "retrieval: %d x %lld similarities", rows, (long long)n_gallery);
    goto out;
  }
  for (int i = 0; i < n_ks; i++) recall[i] = 0.0;
  /* Cosines of equal rows can differ by the rounding of sgemm, whose kernels sum a column in an order
   * that depends on where it lies in the block: a dot product of unit vectors carries an error of
   * about sqrt(dim) roundings, so differences within a few times that are ties. */
  const float tie = 8.0f * sqrtf((float)dim) * FLT_EPSILON;
  if ((rc = inverse_norms("retrieval gallery", gallery, n_gallery, dim, ginv))) goto out;
  for (int64_t b0 = 0; b0 < n_query && !rc; b0 += rows) {
    int m = n_query - b0 < rows ? (int)(n_query - b0) : rows;
    memcpy(qb, query + b0 * dim, (size_t)m * dim * sizeof(float));
    if ((rc = inverse_norms("retrieval queries", qb, m, dim, qinv))) break;
    for (int r = 0; r < m; r++) vec_scale(qb + (size_t)r * dim, qinv[r], dim);
    mat_mul(sims, qb, gallery, m, (int)n_gallery, dim, 0, 1, 1.0f, 0.0f);
    for (int r = 0; r < m; r++) {
      const float *s = sims + (size_t)r * n_gallery;
      int64_t t = target[b0 + r], above = 0, tied = 0;
      float st = s[t] * ginv[t];
      for (int64_t j = 0; j < n_gallery; j++) {
        float d = s[j] * ginv[j] - st;
        above += d > tie;
        tied += fabsf(d) <= tie;
      }
      retrieval_count(above, tied, ks, n_ks, recall);
    }
  }
  for (int i = 0; i < n_ks && !rc; i++) recall[i] /= (double)n_query;
out:
  tensor_free(ginv);
  tensor_free(qb);
  tensor_free(sims);
  tensor_free(qinv);
  return rc;
}

/* ---- alignment and uniformity ------------------------------------------------------------------ */

int eval_alignment(const float *x, const float *y, int64_t n, int dim, float alpha, double *out) {
  int rc = check_shape("alignment", n, dim);
  if (rc) return rc;
  if (!(alpha > 0.0f && isfinite(alpha)))
    return moco_error(MOCO_EINVAL, "alignment: alpha %g, allowed > 0", alpha);
  double sum = 0.0;
  for (int64_t i = 0; i < n; i++) {
    const float *a = x + i * dim, *b = y + i * dim;
    double ab = 0.0, aa = 0.0, bb = 0.0;
    for (int j = 0; j < dim; j++) {
      ab += (double)a[j] * b[j];
      aa += (double)a[j] * a[j];
      bb += (double)b[j] * b[j];
    }
    if (!isfinite(ab + aa + bb))
      return moco_error(MOCO_ERANGE, "alignment: pair %lld: not finite (NaN or Inf feature)", (long long)i);
    /* A zero row normalises to zero (as vec_normalize does): ‖0 − ŷ‖² is ‖ŷ‖². */
    double d2 = (aa > 0.0 ? 1.0 : 0.0) + (bb > 0.0 ? 1.0 : 0.0);
    if (aa > 0.0 && bb > 0.0) d2 -= 2.0 * ab / sqrt(aa * bb);
    sum += pow(d2 > 0.0 ? d2 : 0.0, 0.5 * alpha);
  }
  *out = sum / (double)n;
  return 0;
}

/* Rows i·n/m (i < m) of x, normalised, into xs [m, dim]; sq[i] = ‖x̂_i‖², 1 or 0 for a zero row. */
static int sample_normalised(const float *x, int64_t n, int dim, int m, float *xs, float *sq) {
  for (int i = 0; i < m; i++) {
    int64_t src = (int64_t)i * n / m;
    memcpy(xs + (size_t)i * dim, x + src * dim, dim * sizeof(float));
    float norm = vec_normalize(xs + (size_t)i * dim, dim);
    if (!isfinite(norm))
      return moco_error(MOCO_ERANGE, "uniformity row %lld: norm is not finite (NaN or Inf feature)",
                        (long long)src);
    sq[i] = norm > 0.0f ? 1.0f : 0.0f;
  }
  return 0;
}

int eval_uniformity(const float *x, int64_t n, int dim, float t, int max_rows, double *out) {
  int rc = check_shape("uniformity", n, dim);
  if (rc) return rc;
  if (!(t > 0.0f && isfinite(t))) return moco_error(MOCO_EINVAL, "uniformity: t %g, allowed > 0", t);
  int m = n < max_rows ? (int)n : max_rows;
  if (m < 2)
    return moco_error(MOCO_EINVAL, "uniformity: %d rows (n %lld, max_rows %d), need at least 2", m,
                      (long long)n, max_rows);
  int bs = m < UNIFORMITY_BLOCK ? m : UNIFORMITY_BLOCK;
  float *xs = tensor_alloc((size_t)m * dim), *g = tensor_alloc((size_t)bs * m), *sq = tensor_alloc(m);
  if (!xs || !g || !sq) {
    rc = moco_error(MOCO_ENOMEM, "uniformity: %d rows of %d", m, dim);
    goto out;
  }
  if ((rc = sample_normalised(x, n, dim, m, xs, sq))) goto out;
  double sum = 0.0;
  for (int r0 = 0; r0 < m; r0 += bs) {
    int rows = m - r0 < bs ? m - r0 : bs;
    mat_mul(g, xs + (size_t)r0 * dim, xs, rows, m, dim, 0, 1, 1.0f, 0.0f);
    for (int r = 0; r < rows; r++)
      for (int j = r0 + r + 1; j < m; j++) {
        double d2 = (double)sq[r0 + r] + sq[j] - 2.0 * g[(size_t)r * m + j];
        sum += exp(-(double)t * (d2 > 0.0 ? d2 : 0.0));
      }
  }
  *out = log(sum / (0.5 * (double)m * (m - 1)));
out:
  tensor_free(xs);
  tensor_free(g);
  tensor_free(sq);
  return rc;
}
