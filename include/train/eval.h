/* Evaluation of a representation from feature matrices held in memory: float32, row-major [n, dim],
 * one row per sample; labels int32 in [0, num_classes). Nothing here knows about networks or data
 * files, so the daemon, the benchmarks and the raw-pixel baseline (eval_knn on the pixels themselves)
 * share one implementation.
 *
 *   eval_knn          weighted kNN monitor (Wu et al. 2018 InstDisc; He et al. 2020 MoCo)
 *   eval_retrieval    instance retrieval: recall@k of finding each query's own gallery row
 *   eval_alignment    E‖f(x) − f(y)‖^α over positive pairs   (Wang & Isola 2020, lower is better)
 *   eval_uniformity   log E exp(−t‖f(x) − f(y)‖²) over pairs (Wang & Isola 2020, lower is better)
 *   eval_probe_*      linear probe: multinomial logistic regression on frozen features
 *   eval_export       features (+ labels, ids) as NumPy .npy files, written atomically
 *
 * Every function allocates its workspace for the call (evaluation is not part of the training step)
 * and returns 0 or a negative MOCO_E* code with the context in moco_errmsg. */
#ifndef MOCO_TRAIN_EVAL_H
#define MOCO_TRAIN_EVAL_H

#include <stddef.h>
#include <stdint.h>

/* ---- weighted kNN ------------------------------------------------------------------------------ */

/* k and temperature are the config's (eval.k, eval.temperature; defaults in src/service/config.c). */
typedef struct {
  int k;             /* neighbours (capped at the number of train rows) */
  float temperature; /* neighbour weight exp(s / temperature) */
  int block_rows;    /* test rows per similarity block; 0: EVAL_KNN_BLOCK_ROWS */
} eval_knn_config;

/* Bounds the [block, n_train] similarity buffer; not a config value (it changes no result). */
#define EVAL_KNN_BLOCK_ROWS 256

/* Classifies each test row by the k train rows of highest cosine similarity s, each voting for its
 * label with weight exp(s / T); the class with the largest total wins (ties: the lower class).
 * Neighbours tied with the k-th similarity are taken in train-row order. Rows need not be normalised:
 * similarities are computed with sgemm on the raw rows and divided by both row norms, which is the dot
 * product of the L2-normalised rows without copying the train matrix (a zero row has similarity 0 to
 * everything). The top k of a row are exact, found in O(n_train): one pass keeps the similarities above
 * a threshold read off an evenly strided sample of the row, a quickselect ranks those few (a full
 * rescan when the sample placed the threshold too high). Workspace, allocated per call:
 * block_rows × (n_train + dim) floats and 4·n_train words.
 *   train [n_train, dim], train_labels [n_train]; test [n_test, dim], test_labels [n_test]
 *   accuracy: top-1 accuracy in [0, 1]
 *   class_acc [num_classes] or NULL: accuracy per true class, -1 for a class absent from the test rows
 *   pred [n_test] or NULL: the predicted classes
 * MOCO_ERANGE for a label outside [0, num_classes) or a row whose norm is not finite (NaN, Inf). */
int eval_knn(const eval_knn_config *c, const float *train, const int32_t *train_labels, int64_t n_train,
             const float *test, const int32_t *test_labels, int64_t n_test, int dim, int num_classes,
             double *accuracy, double *class_acc, int32_t *pred);

/* Several protocols (k, T) voted over one similarity pass: the train matrix is multiplied once and the
 * candidates of a row are gathered once for the largest k. c [n_protocols] (block_rows read from c[0]);
 * out [n_protocols]: each protocol's accuracy and, where not NULL, its class_acc [num_classes] and
 * pred [n_test], as eval_knn. */
typedef struct {
  double accuracy;
  double *class_acc;
  int32_t *pred;
} eval_knn_out;

int eval_knn_protocols(const eval_knn_config *c, int n_protocols, const float *train,
                       const int32_t *train_labels, int64_t n_train, const float *test,
                       const int32_t *test_labels, int64_t n_test, int dim, int num_classes, eval_knn_out *out);

/* ---- instance retrieval ------------------------------------------------------------------------ */

/* Each query row i has one true match, gallery row target[i] (for instance an augmented view of a
 * test image against the originals of the test split); the gallery is ranked by cosine similarity to
 * the query and recall[j] is the share of queries whose match is among the first ks[j]. Tied
 * similarities (equal within the rounding of sgemm, 8·sqrt(dim)·FLT_EPSILON) count at their expected
 * value over a random order of the tied rows, so an encoder that maps everything to one point scores
 * k / n_gallery rather than 1. query [n_query, dim], target
 * [n_query] in [0, n_gallery), gallery [n_gallery, dim]; rows need not be normalised (zero rows have
 * similarity 0). Workspace, per call: 256 × (n_gallery + dim) floats. MOCO_ERANGE for a target out of
 * range or a row whose norm is not finite. */
int eval_retrieval(const float *query, const int64_t *target, int64_t n_query, const float *gallery,
                   int64_t n_gallery, int dim, const int *ks, int n_ks, double *recall);

/* ---- alignment and uniformity ------------------------------------------------------------------ */

/* E_i ‖x̂_i − ŷ_i‖^alpha over the n positive pairs (row i of x with row i of y), x̂ = x/‖x‖, computed from
 * cosines (‖x̂ − ŷ‖² = 2 − 2cos) so nothing is copied. alpha = 2 in Wang & Isola. */
int eval_alignment(const float *x, const float *y, int64_t n, int dim, float alpha, double *out);

/* log of the mean over pairs i < j of exp(−t‖x̂_i − x̂_j‖²) on at most max_rows rows (evenly strided over
 * the n rows when n > max_rows, so the figure is deterministic); t = 2 and max_rows 4096 are the usual
 * choices. Rows are normalised into a copy (m × dim floats, m = min(n, max_rows)) and the Gram matrix is
 * computed with sgemm 256 rows at a time (256 × m floats). MOCO_EINVAL when fewer than 2 rows. */
int eval_uniformity(const float *x, int64_t n, int dim, float t, int max_rows, double *out);

/* ---- linear probe ------------------------------------------------------------------------------ */

/* Multinomial logistic regression on standardised features z = (x − mean) / std (train statistics),
 *     minimise  (1/n) Σ_i −log softmax(W z_i + b)[y_i]  +  (weight_decay / 2)·‖W‖²
 * by full-batch L-BFGS (Nocedal 1980) from W = 0, b = 0. Full batch because the objective is convex and
 * small (dim·classes parameters): L-BFGS reaches its optimum in a few hundred passes with no learning
 * rate or epoch count to tune, so probe figures compare representations rather than probe schedules, and
 * the result is deterministic without a seed (as the L-BFGS probes of CPC and CLIP). Each pass is two
 * sgemms over the feature matrix; the standardisation is folded into W and b, so the features are never
 * copied. */
/* The config's eval.probe_max_iter and eval.probe_weight_decay (defaults in src/service/config.c). */
typedef struct {
  int max_iter;       /* L-BFGS iterations (each one or a few passes over the data) */
  float weight_decay; /* λ of (λ/2)‖W‖², W on standardised features; b is not decayed */
} eval_probe_config;

/* L-BFGS correction pairs kept, and the max |gradient| at which the fit stops: the usual choices
 * (Nocedal & Wright suggest 3..20 pairs), not config values. */
#define EVAL_PROBE_HISTORY 10
#define EVAL_PROBE_TOLERANCE 1e-5

typedef struct {
  int dim, num_classes;
  float *mean;    /* [dim] train feature means */
  float *inv_std; /* [dim] 1 / train standard deviations (1 for a constant feature) */
  float *params;  /* [num_classes·dim + num_classes]: W [num_classes, dim] row-major (the layout of
                     torch.nn.Linear.weight), then b [num_classes] */
  size_t n_params;
  int iterations; /* L-BFGS iterations of the last fit */
  double loss;    /* objective at the end of the last fit */
} eval_probe;

int eval_probe_init(eval_probe *p, int dim, int num_classes);
void eval_probe_free(eval_probe *p);

/* Sets mean/inv_std from x and fits params. x [n, dim], y [n]. */
int eval_probe_fit(eval_probe *p, const eval_probe_config *c, const float *x, const int32_t *y, int64_t n);

/* Top-1 accuracy of the probe on x [n, dim] with labels y; pred [n] or NULL receives the classes. */
int eval_probe_accuracy(const eval_probe *p, const float *x, const int32_t *y, int64_t n, double *accuracy,
                        int32_t *pred);

/* The objective above at the current params (with the current mean/inv_std), and its gradient
 * [n_params] when grad is not NULL; work holds eval_probe_work_floats(p, n) floats. Exposed for the
 * gradient check. */
size_t eval_probe_work_floats(const eval_probe *p, int64_t n);
double eval_probe_loss(const eval_probe *p, float weight_decay, const float *x, const int32_t *y, int64_t n,
                       float *grad, float *work);

/* Fits a probe on train and measures it on both splits (the daemon's one call). */
int eval_linear_probe(const eval_probe_config *c, const float *train, const int32_t *train_labels,
                      int64_t n_train, const float *test, const int32_t *test_labels, int64_t n_test,
                      int dim, int num_classes, double *train_acc, double *test_acc);

/* ---- embedding export ---------------------------------------------------------------------------- */

/* Writes x [n, dim] to `path` as a NumPy .npy file (format 1.0: the 6 bytes "\x93NUMPY", version 1 0,
 * u16 LE header length, the header "{'descr': '<f4', 'fortran_order': False, 'shape': (n, dim), }"
 * padded with spaces and '\n' so the data starts at a multiple of 64 bytes, then n·dim float32 LE):
 *     import numpy as np; x = np.load("emb.npy")
 * When labels (int32, "<i4", shape (n,)) or ids (int64, "<i8", shape (n,)) are given they go beside it,
 * named by replacing a trailing ".npy" of path (or appending) with ".labels.npy" / ".ids.npy".
 * Each file is written atomically: a temporary file in the same directory, fsync, rename, fsync of the
 * directory; a failure leaves any previous file in place. MOCO_EIO with the path and errno text. */
int eval_export(const char *path, const float *x, int64_t n, int dim, const int32_t *labels,
                const int64_t *ids);

/* The name of the labels / ids file that eval_export writes beside `path`, into buf. MOCO_ERANGE when
 * it does not fit. */
int eval_export_sibling(const char *path, const char *suffix, char *buf, size_t cap);

#endif
