/* Data-parallel scaling on this machine: the default job's step (config/default.json: its encoder,
 * batch 256, queue 4096, hardest 1024, shuffle BN) in worlds of N ranks, N = 1 and 2 by default
 * (MOCOD_DIST_NP="1 2 4 8 16" for more), one compute thread per rank (MOCOD_DIST_THREADS), on
 * synthetic inputs. For each N: the median step time, the median time inside collectives and its share,
 * and the collectives alone: an all-reduce of the P gradient floats and the all-gathers of a step (key
 * inputs B x 784 and keys B x d floats), medians of 20, from which docs/scale.md's cluster model is read.
 * Judges nothing.
 *
 * Run alone, it starts `mpirun -np N` of itself for each N (root needs the OMPI_ALLOW_RUN_AS_ROOT
 * variables, set here); under mpirun it measures (MOCOD_DIST_CHILD=1). The communication time includes
 * waiting for the slowest rank: on an oversubscribed machine that is most of it. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../testutil.h"
#include "core/dist.h"
#include "core/err.h"
#include "core/par.h"
#include "core/tensor.h"
#include "service/config.h"
#include "train/step.h"
#include "train/trainer.h"

enum { WARMUP = 17, STEPS = 10, REPS = 20 }; /* warm-up fills the queue (17 x 256 > 4096) */

static int fail(const char *what) {
  fprintf(stderr, "bench_dist (rank %d): %s: %s\n", dist_rank(), what, moco_errmsg());
  dist_abort(1);
  return 1;
}

/* Median seconds of REPS runs of one collective. */
static double time_sum(float *x, size_t n) {
  double t[REPS];
  for (int i = 0; i < REPS; i++) {
    dist_barrier();
    double t0 = clock_now();
    dist_sum_f32(x, n);
    t[i] = clock_now() - t0;
  }
  return median_of(t, REPS);
}

static double time_gather(const float *x, float *all, size_t n) {
  double t[REPS];
  for (int i = 0; i < REPS; i++) {
    dist_barrier();
    double t0 = clock_now();
    dist_allgather(x, all, n * sizeof *x);
    t[i] = clock_now() - t0;
  }
  return median_of(t, REPS);
}

static int child(const char *config_path) {
  json_t *root;
  trainer_config tc;
  char *report = NULL;
  if (config_load_file(&root, config_path) || config_finalize(root, &report) ||
      config_to_trainer(root, &tc))
    return fail(config_path);
  const char *th = getenv("MOCOD_DIST_THREADS");
  par_set_threads(th ? atoi(th) : 1);
  moco_config c = tc.moco;
  c.total_steps = 1000;
  c.shuffle_bn_groups = c.shuffle_bn_groups % dist_size() ? dist_size() : c.shuffle_bn_groups;
  json_t *spec = trainer_encoder_spec(&tc);
  moco_model m;
  if (moco_init(&m, &c, spec, (net_shape){1, 28, 28}, config_path)) return fail("moco_init");
  int W = dist_size(), B = c.batch_size / W, in = m.in_len;
  float *x1 = tensor_alloc((size_t)B * in), *x2 = tensor_alloc((size_t)B * in);
  int64_t *ids = malloc((size_t)B * sizeof *ids);
  rng_t r;
  rng_init(&r, 7 + (uint64_t)dist_rank(), 1);
  fill_uniform(x1, (size_t)B * in, &r, -1, 1);
  fill_uniform(x2, (size_t)B * in, &r, -1, 1);
  double tot[STEPS], comm[STEPS];
  for (int s = 0; s < WARMUP + STEPS; s++) {
    for (int i = 0; i < B; i++) ids[i] = (int64_t)s * c.batch_size + (int64_t)dist_rank() * B + i;
    moco_diag d;
    if (moco_step(&m, x1, x2, ids, NULL, B, &d)) return fail("moco_step");
    if (s >= WARMUP) tot[s - WARMUP] = d.time.total, comm[s - WARMUP] = d.time.comm;
  }
  size_t P = m.query.n_params;
  float *g = tensor_calloc(P), *keys = tensor_calloc((size_t)c.batch_size * (size_t)in);
  double t_red = time_sum(g, P);
  double t_x = time_gather(x2, keys, (size_t)B * in);
  double t_k = time_gather(x1, keys, (size_t)B * m.dim);
  if (dist_rank() == 0) {
    double st = median_of(tot, STEPS), cm = median_of(comm, STEPS);
    printf("N=%-3d step %8.2f ms  comm %7.2f ms (%5.1f%%)  | allreduce %zu floats (%.2f MB) %7.3f ms  "
           "gather inputs %7.3f ms  gather keys %7.3f ms  | %.0f samples/s\n",
           W, st * 1e3, cm * 1e3, 100 * cm / st, P, P * 4e-6, t_red * 1e3, t_x * 1e3, t_k * 1e3,
           c.batch_size / st);
    fflush(stdout);
  }
  tensor_free(g);
  tensor_free(keys);
  tensor_free(x1);
  tensor_free(x2);
  free(ids);
  moco_free(&m);
  json_decref(spec);
  json_decref(root);
  return 0;
}

int main(int argc, char **argv) {
  const char *config_path = argc > 1 ? argv[1] : "config/default.json";
  if (getenv("MOCOD_DIST_CHILD")) {
    if (dist_init(&argc, &argv)) return fail("joining the world");
    int rc = child(config_path);
    dist_finalize();
    return rc;
  }
  const char *nps = getenv("MOCOD_DIST_NP") ? getenv("MOCOD_DIST_NP") : "1 2";
  const char *mpirun = getenv("MOCOD_MPIRUN") ? getenv("MOCOD_MPIRUN") : "mpirun";
  printf("bench_dist: %s, one compute thread per rank unless MOCOD_DIST_THREADS; medians of %d steps\n",
         config_path, STEPS);
  fflush(stdout);
  char buf[64], cmd[4096];
  snprintf(buf, sizeof buf, "%s", nps);
  for (char *np = strtok(buf, " "); np; np = strtok(NULL, " ")) {
    snprintf(cmd, sizeof cmd,
             "MOCOD_DIST_CHILD=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
             "%s -np %s --oversubscribe --bind-to none %s %s",
             mpirun, np, argv[0], config_path);
    if (system(cmd) != 0) fprintf(stderr, "bench_dist: %s failed\n", cmd);
  }
  return 0;
}
