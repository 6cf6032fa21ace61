/* Evaluation on raw Fashion-MNIST pixels (scaled to [0, 1]): the weighted kNN baseline (k = 200,
 * T = 0.1; the reference figure for this protocol is 78.9%) and the linear probe, with their times.
 * The data set is read here with zlib so the benchmark depends on nothing but the evaluation library.
 * MOCOD_FMNIST overrides the directory (default /usr/share/datasets/fashion-mnist). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "core/err.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "../testutil.h"
#include "train/eval.h"
#include "service/config.h"

static uint32_t be32(const unsigned char *b) {
  return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

/* Reads a gzipped IDX file of unsigned bytes: magic 0x0803 (images [n, rows, cols]) or 0x0801
 * (labels [n]). Returns the payload (malloc'd) and its row count and row size, or NULL. */
static unsigned char *read_idx_gz(const char *path, int *n, int *row) {
  gzFile f = gzopen(path, "rb");
  if (!f) return NULL;
  unsigned char head[16], *data = NULL;
  if (gzread(f, head, 8) != 8) goto fail;
  uint32_t magic = be32(head), dims = magic & 0xff;
  if ((magic >> 8) != 0x08 || dims < 1 || dims > 3) goto fail;
  if (dims > 1 && gzread(f, head + 8, 4 * (dims - 1)) != (int)(4 * (dims - 1))) goto fail;
  *n = (int)be32(head + 4);
  *row = 1;
  for (uint32_t d = 1; d < dims; d++) *row *= (int)be32(head + 4 + 4 * d);
  size_t bytes = (size_t)*n * *row;
  if (!(data = malloc(bytes)) || gzread(f, data, (unsigned)bytes) != (int)bytes) goto fail;
  gzclose(f);
  return data;
fail:
  fprintf(stderr, "bench_eval: cannot read %s\n", path);
  free(data);
  gzclose(f);
  return NULL;
}

typedef struct {
  float *x;
  int32_t *y;
  int n, dim;
} split;

static int load_split(const char *dir, const char *prefix, split *s) {
  char ip[512], lp[512];
  snprintf(ip, sizeof ip, "%s/%s-images-idx3-ubyte.gz", dir, prefix);
  snprintf(lp, sizeof lp, "%s/%s-labels-idx1-ubyte.gz", dir, prefix);
  int nl, one;
  unsigned char *img = read_idx_gz(ip, &s->n, &s->dim), *lab = img ? read_idx_gz(lp, &nl, &one) : NULL;
  if (!lab || nl != s->n) {
    free(img);
    free(lab);
    return -1;
  }
  s->x = tensor_alloc((size_t)s->n * s->dim);
  s->y = malloc(s->n * sizeof(int32_t));
  for (size_t i = 0; i < (size_t)s->n * s->dim; i++) s->x[i] = img[i] / 255.0f;
  for (int i = 0; i < s->n; i++) s->y[i] = lab[i];
  free(img);
  free(lab);
  return 0;
}

int main(void) {
  const char *dir = getenv("MOCOD_FMNIST") ? getenv("MOCOD_FMNIST") : "/usr/share/datasets/fashion-mnist";
  split tr, te;
  if (load_split(dir, "train", &tr) || load_split(dir, "t10k", &te)) return 1;
  printf("fashion-mnist raw pixels: train %d x %d, test %d\n", tr.n, tr.dim, te.n);

  eval_knn_config kc;
  kc = config_defaults()->trainer.knn;
  double acc, class_acc[10], t0 = clock_now();
  if (eval_knn(&kc, tr.x, tr.y, tr.n, te.x, te.y, te.n, tr.dim, 10, &acc, class_acc, NULL)) {
    fprintf(stderr, "knn: %s\n", moco_errmsg());
    return 1;
  }
  double t_knn = clock_now() - t0;
  printf("knn k=%d T=%.2f: accuracy %.2f%% in %.2f s (%.0f test rows/s, %.1f GFLOP/s of similarities; "
         "reference 78.9%%)\n",
         kc.k, kc.temperature, 100 * acc, t_knn, te.n / t_knn, 2.0 * te.n * tr.n * tr.dim / t_knn / 1e9);
  printf("knn per class:");
  for (int c = 0; c < 10; c++) printf(" %.1f", 100 * class_acc[c]);
  printf("\n");

  eval_probe_config pc;
  pc = config_defaults()->trainer.probe;
  eval_probe p;
  double tr_acc, te_acc;
  t0 = clock_now();
  if (eval_probe_init(&p, tr.dim, 10) || eval_probe_fit(&p, &pc, tr.x, tr.y, tr.n) ||
      eval_probe_accuracy(&p, tr.x, tr.y, tr.n, &tr_acc, NULL) ||
      eval_probe_accuracy(&p, te.x, te.y, te.n, &te_acc, NULL)) {
    fprintf(stderr, "probe: %s\n", moco_errmsg());
    return 1;
  }
  double t_probe = clock_now() - t0;
  printf("linear probe (L-BFGS, wd %g): train %.2f%%, test %.2f%% in %.2f s (%d iterations, loss %.4f)\n",
         pc.weight_decay, 100 * tr_acc, 100 * te_acc, t_probe, p.iterations, p.loss);
  eval_probe_free(&p);

  /* The shape of a trained backbone's output: 512 ReLU features (random ones here, of the pixels). */
  enum { F = 512 };
  float *R = tensor_alloc((size_t)tr.dim * F), *ftr = tensor_alloc((size_t)tr.n * F),
        *fte = tensor_alloc((size_t)te.n * F);
  rng_t rng;
  rng_init(&rng, 1, RNG_STREAM_INIT);
  for (size_t i = 0; i < (size_t)tr.dim * F; i++) R[i] = rng_normal(&rng);
  mat_mul(ftr, tr.x, R, tr.n, F, tr.dim, 0, 0, 1.0f, 0.0f);
  mat_mul(fte, te.x, R, te.n, F, te.dim, 0, 0, 1.0f, 0.0f);
  for (size_t i = 0; i < (size_t)tr.n * F; i++) ftr[i] = ftr[i] > 0 ? ftr[i] : 0;
  for (size_t i = 0; i < (size_t)te.n * F; i++) fte[i] = fte[i] > 0 ? fte[i] : 0;
  t0 = clock_now();
  if (eval_linear_probe(&pc, ftr, tr.y, tr.n, fte, te.y, te.n, F, 10, &tr_acc, &te_acc)) {
    fprintf(stderr, "probe: %s\n", moco_errmsg());
    return 1;
  }
  printf("linear probe on %d x %d random ReLU features: train %.2f%%, test %.2f%% in %.2f s\n", tr.n, F,
         100 * tr_acc, 100 * te_acc, clock_now() - t0);
  tensor_free(R);
  tensor_free(ftr);
  tensor_free(fte);

  double align, unif;
  t0 = clock_now();
  if (eval_alignment(te.x, te.x + te.dim, te.n - 1, te.dim, 2.0f, &align) ||
      eval_uniformity(te.x, te.n, te.dim, 2.0f, 4096, &unif)) {
    fprintf(stderr, "align/uniform: %s\n", moco_errmsg());
    return 1;
  }
  printf("pixels: alignment of consecutive test rows %.4f, uniformity (4096 rows) %.4f in %.2f s\n", align,
         unif, clock_now() - t0);
  tensor_free(tr.x);
  tensor_free(te.x);
  free(tr.y);
  free(te.y);
  return 0;
}
