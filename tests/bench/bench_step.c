/* One full MoCo step of an MLP configuration (batch 256, d = 128; encoder 784 → 1024 → 512 with
 * BatchNorm and ReLU, head 512 → 512 → 128), queue 4096 and 65536, for the strategies all, hardest
 * (n = 1024) and mixing (MoCHi N = 1024, s = 512, s' = 256). Prints the median ms per step, each phase's
 * share, and mining next to the similarity sgemm it filters (the goal: selection adds at most
 * 30% on top of that sgemm, and grows linearly in K). Judges nothing.
 *
 * The queue is filled with random unit keys before timing, so every step sees K valid negatives. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../testutil.h"
#include "core/err.h"
#include "core/par.h"
#include "core/tensor.h"
#include "train/step.h"
#include "service/config.h"

static const char *MLP =
    "[{\"type\":\"linear\",\"out\":1024},{\"type\":\"batchnorm\"},{\"type\":\"relu\"},"
    "{\"type\":\"linear\",\"out\":512},{\"type\":\"batchnorm\"},{\"type\":\"relu\"},"
    "{\"type\":\"linear\",\"out\":512},{\"type\":\"relu\"},{\"type\":\"linear\",\"out\":128},"
    "{\"type\":\"l2norm\"}]";

enum { B = 256, IN = 784 };

/* Median of each phase over the timed steps. */
typedef struct {
  double v[8];
} phases;

static phases as_phases(const moco_timing *t) {
  return (phases){{t->keys, t->queries, t->similarity, t->mining, t->loss, t->backward, t->update,
                   t->total}};
}

static int run(int K, mine_strategy strategy, int steps, const float *x1, const float *x2,
               const int64_t *ids) {
  moco_config c;
  c = config_defaults()->trainer.moco;
  c.batch_size = B;
  c.queue_size = K;
  c.total_steps = 1000;
  c.mine.strategy = strategy;
  c.mine.num_negatives = 1024;
  json_error_t je;
  json_t *spec = json_loads(MLP, 0, &je);
  moco_model m;
  int rc = moco_init(&m, &c, spec, (net_shape){IN, 1, 1}, "bench");
  json_decref(spec);
  if (rc) {
    fprintf(stderr, "moco_init: %s\n", moco_errmsg());
    return rc;
  }
  /* A full queue of random unit keys. */
  rng_t r;
  rng_init(&r, 2, 1);
  float *keys = tensor_alloc((size_t)B * m.dim);
  int64_t *kid = malloc(B * sizeof *kid);
  for (int done = 0; done < K; done += B) {
    for (int i = 0; i < B * m.dim; i++) keys[i] = rng_normal(&r);
    for (int i = 0; i < B; i++) vec_normalize(keys + (size_t)i * m.dim, (size_t)m.dim), kid[i] = -1 - done - i;
    queue_enqueue(&m.queue, keys, kid, NULL, B, 0);
  }
  double *samples = malloc((size_t)steps * 8 * sizeof *samples);
  moco_diag d;
  for (int s = -2; s < steps; s++) { /* two warm-up steps */
    if ((rc = moco_step(&m, x1, x2, ids, NULL, B, &d))) {
      fprintf(stderr, "moco_step: %s\n", moco_errmsg());
      break;
    }
    if (s < 0) continue;
    phases p = as_phases(&d.time);
    for (int k = 0; k < 8; k++) samples[k * steps + s] = p.v[k];
  }
  if (!rc) {
    double med[8];
    for (int k = 0; k < 8; k++) med[k] = median_of(samples + k * steps, steps);
    double tot = med[7];
    printf("K=%-6d %-8s %7.1f ms/step  keys %4.1f%% queries %4.1f%% sim %4.1f%% mining %4.1f%% "
           "loss %4.1f%% backward %4.1f%% update %4.1f%%  mining/sim-sgemm %.2f  negatives/query %.0f\n",
           K, enum_name_of(mine_strategy_names, (int)strategy), tot * 1e3, 100 * med[0] / tot, 100 * med[1] / tot,
           100 * med[2] / tot, 100 * med[3] / tot, 100 * med[4] / tot, 100 * med[5] / tot,
           100 * med[6] / tot, med[3] / med[2], d.negatives_per_query);
  }
  free(samples);
  free(kid);
  tensor_free(keys);
  moco_free(&m);
  return rc;
}

int main(void) {
  printf("OpenBLAS: %s, %d threads\n", openblas_get_config(), openblas_get_num_threads());
  /* The step runs on mocod's compute team, as in the daemon (OpenBLAS single-threaded inside it). */
  if (par_set_threads(openblas_get_num_threads())) {
    fprintf(stderr, "bench_step: %s\n", moco_errmsg());
    return 1;
  }
  float *x1 = tensor_alloc((size_t)B * IN), *x2 = tensor_alloc((size_t)B * IN);
  int64_t ids[B];
  rng_t r;
  rng_init(&r, 1, 1);
  fill_uniform(x1, (size_t)B * IN, &r, 0, 1);
  fill_uniform(x2, (size_t)B * IN, &r, 0, 1);
  for (int i = 0; i < B; i++) ids[i] = i;
  const int Ks[] = {4096, 65536};
  const mine_strategy strategies[] = {MINE_ALL, MINE_HARDEST, MINE_MIXING};
  int rc = 0;
  for (int k = 0; k < 2 && !rc; k++)
    for (int s = 0; s < 3 && !rc; s++) rc = run(Ks[k], strategies[s], Ks[k] > 8192 ? 5 : 15, x1, x2, ids);
  tensor_free(x1);
  tensor_free(x2);
  return rc ? 1 : 0;
}
