/* dist-check: trains the tiny model for a number of steps in whatever world it is started in (alone, or
 * under mpirun), so that test_dist.c can compare a world of N with one process on the same global
 * batch. Every rank streams the same augmented batches of the repository's Fashion-MNIST sample
 * (data/loader.h: the order and each view are fixed by the seed) and takes rows [r B / N, (r + 1) B / N).
 *
 *   dist-check TRAIN_IDX STEPS SYNC_BN OUT
 *                                    OUT.loss: "step loss" per step; OUT.queue: the queue's floats
 *
 * Rank 0 writes both; every tenth step every rank compares its model with rank 0's (moco_check_world).
 * bench_dist.c is the timing counterpart. Exit status 0, or 1 with the error on stderr. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dist.h"
#include "core/err.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "data/loader.h"
#include "train/step.h"
#include "service/config.h"

/* config/tiny.json's encoder with its embedding layers, on 1x28x28 inputs. */
static const char *const SPEC =
    "[{\"type\":\"conv2d\",\"out\":8,\"kernel\":3,\"pad\":1},{\"type\":\"batchnorm\"},{\"type\":\"relu\"},"
    "{\"type\":\"maxpool\",\"kernel\":2},"
    "{\"type\":\"conv2d\",\"out\":16,\"kernel\":3,\"pad\":1},{\"type\":\"batchnorm\"},{\"type\":\"relu\"},"
    "{\"type\":\"avgpool\"},{\"type\":\"flatten\"},{\"type\":\"linear\",\"out\":32},{\"type\":\"relu\"},"
    "{\"type\":\"linear\",\"out\":16},{\"type\":\"l2norm\"}]";

enum { BATCH = 32, QUEUE = 256 };

static int fail(const char *what) {
  fprintf(stderr, "dist-check (rank %d of %d): %s: %s\n", dist_rank(), dist_size(), what, moco_errmsg());
  dist_abort(1);
  return 1;
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: dist-check TRAIN_IDX STEPS SYNC_BN OUT\n");
    return 2;
  }
  if (dist_init(&argc, &argv)) return fail("joining the world");
  int steps = atoi(argv[2]), W = dist_size(), rank = dist_rank(), B = BATCH / W;
  loader_config lc = config_defaults()->trainer.loader;
  lc.drop_last = 1;
  lc.train = argv[1];
  lc.batch_size = BATCH;
  lc.shuffle_buffer = 2000;
  lc.workers = 1;
  lc.seed = 1;
  loader ld;
  if (loader_open(&ld, &lc)) return fail("loader_open");
  size_t in = (size_t)ld.shape.c * ld.shape.h * ld.shape.w;
  moco_config c = config_defaults()->trainer.moco;
  c.batch_size = BATCH;
  c.queue_size = QUEUE;
  c.shuffle_bn_groups = 2;
  c.sync_bn = atoi(argv[3]);
  c.mine.strategy = MINE_HARDEST;
  c.mine.num_negatives = 64;
  c.sched.lr = 0.1f;
  c.momentum.encoder_momentum = 0.9f;
  c.sched.lr_schedule = SCHED_CONSTANT;
  json_error_t je;
  json_t *spec = json_loads(SPEC, 0, &je);
  moco_model m;
  net_shape shape = {ld.shape.c, ld.shape.h, ld.shape.w};
  if (moco_init(&m, &c, spec, shape, "dist-check")) return fail("moco_init");
  json_decref(spec);
  char path[4096];
  snprintf(path, sizeof path, "%s.loss", argv[4]);
  FILE *lf = rank == 0 ? fopen(path, "w") : NULL;
  if (rank == 0 && !lf) return fail(path);
  for (int t = 0; t < steps; t++) {
    loader_batch b;
    if (loader_next(&ld, &b) || b.size != BATCH) return fail("loader_next");
    size_t r0 = (size_t)rank * B;
    const float *x1 = b.view1 + r0 * in, *x2 = b.view2 + r0 * in;
    moco_diag d;
    if (moco_step(&m, x1, x2, b.ids + r0, b.labels + r0, B, &d)) return fail("moco_step");
    if (lf) fprintf(lf, "%d %.9g\n", t, d.loss);
    if (t % 10 == 9 && moco_check_world(&m)) return fail("moco_check_world");
  }
  if (rank == 0) {
    fclose(lf);
    snprintf(path, sizeof path, "%s.queue", argv[4]);
    FILE *qf = fopen(path, "wb");
    size_t n = (size_t)m.queue.filled * (size_t)m.dim;
    if (!qf || fwrite(m.queue.keys, sizeof(float), n, qf) != n || fclose(qf)) return fail(path);
  }
  loader_close(&ld);
  moco_free(&m);
  dist_finalize();
  return 0;
}
