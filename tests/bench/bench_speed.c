/* Speed of mocod's training step on the configured job (issue 6): steps/s against a PyTorch reference of
 * the same job, the step's GFLOP/s as a share of a large sgemm measured in the same run, and peak memory
 * for queue sizes 4096 and 65536. Prints figures, judges nothing.
 *
 *   bench_speed [--threads LIST] [--no-torch] [--no-rss] [CONFIG]
 *
 * CONFIG defaults to config/default.json; LIST (e.g. 1,2,16) to 1, 2 and the machine's CPU count, each
 * a separate measurement with the team and the model built for that many threads (the config's
 * `threads` is printed, not used). MOCOD_BENCH_SECONDS: timing budget per side and thread count,
 * default 4. --no-torch and --no-rss leave out the PyTorch comparison and the memory figures (quick
 * before/after runs).
 *
 * The job is the config's, read through the service's config code (extends, defaults, checks) and the
 * trainer's encoder (backbone + head + linear to embed_dim + l2norm): batch, queue, temperature, key
 * momentum, shuffle-BN groups, optimizer, lr, weight decay and threads. For the comparison the
 * negatives are the whole queue (strategy all, no guards) and the loss is asymmetric InfoNCE, which is
 * what scripts/torch_reference.py implements; the configured loss and strategy are printed beside it.
 *
 * Per thread count it prints the step's phases and, per layer, the milliseconds each layer of the
 * encoders takes per step (key forward + query forward, query backward): where the time goes, and
 * which parts stop scaling with threads.
 *
 * Both sides time the step alone on ready-made N(0, 1) views of the training data's shape (four
 * batches, cycled) with a full queue of random unit keys, by the same protocol: warm-up steps, then
 * REPS repetitions of as many steps as fit the budget; the median repetition's mean step time. Both
 * count the step's work with the same formula (step_flops here, step_gflop there) and print it, so a
 * mismatch in architecture shows as two different GFLOP/step figures.
 *
 * Peak memory: this program re-runs itself as `bench_speed --rss QUEUE_SIZE CONFIG`, a fresh process
 * that builds the configured model (configured strategy and loss) with that queue, fills the queue,
 * runs a few steps and reports its own VmHWM: model, optimizer state, queue, similarity buffers and
 * OpenBLAS, without the data loader or evaluation. */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../testutil.h"
#include "core/clock.h"
#include "core/err.h"
#include "core/par.h"
#include "core/tensor.h"
#include "data/dataset.h"
#include "service/config.h"
#include "train/step.h"
#include "train/trainer.h"

#define PYTHON "/usr/bin/python3"
enum { REPS = 5, WARMUP = 3, POOL = 4, RSS_STEPS = 2, SGEMM_N = 2048, MAX_COUNTS = 8 };

typedef struct {
  json_t *root;
  trainer_config tc;
  net_shape in;
} job;

/* The config as mocod reads it, and the training data's sample shape from the file headers. On
 * failure nothing is left allocated. */
static int job_load(job *j, const char *path) {
  char *report = NULL;
  j->root = NULL;
  int rc = config_load_file(&j->root, path);
  if (!rc && (rc = config_finalize(j->root, &report)) && report) moco_error(rc, "%s", report);
  free(report);
  mocod_config *mc = rc ? NULL : malloc(sizeof *mc);
  if (!rc && !mc) rc = MOCO_ENOMEM;
  if (!rc && !(rc = config_read(j->root, mc))) j->tc = mc->trainer;
  free(mc);
  dataset ds;
  const trainer_config *c = &j->tc;
  if (!rc && !(rc = dataset_open(&ds, "train", c->train, c->train_labels[0] ? c->train_labels : NULL,
                                 c->loader.num_classes))) {
    j->in = (net_shape){ds.shape.c, ds.shape.h, ds.shape.w};
    dataset_close(&ds);
  }
  if (rc) json_decref(j->root);
  return rc;
}

/* The model of the configured job with mc's settings, its queue full of random unit keys. */
static int model_build(moco_model *m, const job *j, const moco_config *mc) {
  json_t *spec = trainer_encoder_spec(&j->tc);
  int rc = moco_init(m, mc, spec, j->in, "model");
  json_decref(spec);
  if (rc) return rc;
  int B = mc->batch_size, d = m->dim;
  float *keys = tensor_alloc((size_t)B * d);
  if (!keys) {
    moco_free(m);
    return moco_error(MOCO_ENOMEM, "queue keys");
  }
  rng_t r;
  rng_init(&r, 2, 1);
  while (m->queue.keys && m->queue.filled < m->queue.queue_size) {
    for (size_t i = 0; i < (size_t)B * d; i++) keys[i] = rng_normal(&r);
    for (int i = 0; i < B; i++) vec_normalize(keys + (size_t)i * d, (size_t)d);
    queue_enqueue(&m->queue, keys, NULL, NULL, B, 0);
  }
  tensor_free(keys);
  return 0;
}

/* POOL batches of both views, N(0, 1) like the normalised data (and like torch.randn). */
static float *views_alloc(size_t floats) {
  float *x = tensor_alloc(floats);
  rng_t r;
  rng_init(&r, 3, 1);
  for (size_t i = 0; x && i < floats; i++) x[i] = rng_normal(&r);
  return x;
}

/* Matrix-product FLOPs of one step of strategy all (scripts/torch_reference.py, step_gflop, counts the
 * same): query forward + backward (net_train_flops), key forward, and S = Q·queueᵀ with its gradient
 * dQ = dS·queue, 2·B·d·K each. */
static double step_flops(const moco_model *m, int B) {
  return B * (net_train_flops(&m->query) + net_flops_per_sample(&m->key)) +
         2.0 * 2.0 * B * m->dim * m->cfg.queue_size;
}

/* Step `it` of the timing loop, on view batch it mod POOL. */
static int step_at(moco_model *m, const float *views, long it, moco_diag *d) {
  size_t batch = (size_t)m->cfg.batch_size * m->in_len, v = (size_t)(it % POOL);
  return moco_step(m, views + 2 * v * batch, views + (2 * v + 1) * batch, NULL, NULL, m->cfg.batch_size,
                   d);
}

/* The median over REPS repetitions of the mean step time, after WARMUP steps; the repetition length
 * fits `budget` seconds in all. `phases` sums the step's own phase times over the timed steps. */
static int time_steps(moco_model *m, const float *views, double budget, double *seconds, int *steps,
                      moco_timing *phases) {
  long it = 0;
  int rc = 0;
  moco_diag d;
  double t0 = clock_now();
  while (it < WARMUP && !rc) rc = step_at(m, views, it++, &d);
  double per = (clock_now() - t0) / WARMUP;
  *steps = (int)(budget / REPS / (per > 1e-4 ? per : 1e-4));
  if (*steps < 2) *steps = 2;
  double t[REPS];
  memset(phases, 0, sizeof *phases);
  memset(m->query.prof, 0, 2 * (size_t)m->query.n_layers * sizeof(double));
  memset(m->key.prof, 0, 2 * (size_t)m->key.n_layers * sizeof(double));
  for (int r = 0; r < REPS && !rc; r++) {
    t0 = clock_now();
    for (int i = 0; i < *steps && !rc; i++) {
      rc = step_at(m, views, it++, &d);
      phases->keys += d.time.keys, phases->queries += d.time.queries;
      phases->similarity += d.time.similarity, phases->mining += d.time.mining;
      phases->loss += d.time.loss, phases->backward += d.time.backward;
      phases->update += d.time.update, phases->total += d.time.total;
    }
    t[r] = (clock_now() - t0) / *steps;
  }
  if (!rc) *seconds = median_of(t, REPS);
  return rc;
}

/* The text after "key=" up to the end of its line in a key=value output, "" when absent. */
static const char *output_text(const char *out, const char *key, char *buf, size_t cap) {
  const char *p = strstr(out, key);
  if (!p) return buf[0] = '\0', buf;
  p += strlen(key);
  snprintf(buf, cap, "%.*s", (int)strcspn(p, "\n"), p);
  return buf;
}

static double output_value(const char *out, const char *key) {
  char buf[64];
  const char *v = output_text(out, key, buf, sizeof buf);
  return *v ? atof(v) : -1.0;
}

static void print_step(const char *who, double sec, int reps, int steps, double flops, double gemm) {
  printf("%-26s %7.1f ms/step %6.2f steps/s  %6.3f GFLOP/step %6.1f GFLOP/s = %.2f of sgemm  (%dx%d)\n",
         who, 1e3 * sec, 1.0 / sec, flops / 1e9, flops / sec / 1e9, flops / sec / 1e9 / gemm, reps, steps);
}

/* The PyTorch reference on the same config; 0 with *sec set, 1 when python3-torch is missing (the
 * comparison is skipped), -1 when the reference failed. */
static int torch_reference(const char *config, const job *j, int threads, double budget, double *sec,
                           double gemm) {
  static char out[16384];
  char cmd[2048];
  snprintf(cmd, sizeof cmd,
           PYTHON " scripts/torch_reference.py --config '%s' --strategy all --threads %d --shape %d,%d,%d"
                  " --reps %d --warmup %d --budget %.1f",
           config, threads, j->in.c, j->in.h, j->in.w, REPS, WARMUP, budget);
  if (access(PYTHON, X_OK) != 0 || run_capture(PYTHON " -c 'import torch'", out, sizeof out) != 0) {
    printf("pytorch: skipped, %s cannot import torch (install python3-torch)\n", PYTHON);
    return 1;
  }
  int rc = run_capture(cmd, out, sizeof out);
  double sps = output_value(out, "torch_steps_per_sec=");
  if (rc != 0 || sps <= 0) {
    printf("pytorch: the reference failed (exit %d): %s\n%s", rc, cmd, out);
    return -1;
  }
  *sec = 1.0 / sps;
  char buf[256], who[64];
  printf("%-26s %s\n", "pytorch job", output_text(out, "torch_job=", buf, sizeof buf));
  snprintf(who, sizeof who, "pytorch %s step", output_text(out, "torch_version=", buf, sizeof buf));
  const char *shape = output_text(out, "steps:", buf, sizeof buf);
  int reps = atoi(shape), steps = strchr(shape, 'x') ? atoi(strchr(shape, 'x') + 1) : 0;
  print_step(who, *sec, reps, steps, 1e9 * output_value(out, "torch_gflop_per_step="), gemm);
  printf("%-26s %.0f MB\n", "pytorch peak RSS", output_value(out, "torch_peak_rss_mb="));
  return 0;
}

/* The child of the memory figure: the configured job with queue_size K; prints its peak RSS. */
static int rss_child(const char *config, int K) {
  job j;
  int rc = job_load(&j, config);
  if (rc) return rc;
  if ((rc = par_set_threads(j.tc.threads))) return rc;
  moco_config mc = j.tc.moco;
  mc.queue_size = K;
  moco_model m;
  float *views = NULL;
  if (!(rc = model_build(&m, &j, &mc))) {
    size_t batch = (size_t)mc.batch_size * m.in_len;
    if (!(views = views_alloc(2 * batch))) rc = moco_error(MOCO_ENOMEM, "views");
    for (int s = 0; s < RSS_STEPS && !rc; s++)
      rc = moco_step(&m, views, views + batch, NULL, NULL, mc.batch_size, NULL);
    size_t slot = (size_t)m.dim * sizeof *m.queue.keys + sizeof *m.queue.ids + sizeof *m.queue.labels +
                  sizeof *m.queue.steps;
    if (!rc)
      printf("rss_kb=%ld queue_bytes=%zu params=%zu\n", proc_status_kb("VmHWM:"), slot * (size_t)K,
             m.query.n_params);
    moco_free(&m);
  }
  tensor_free(views);
  json_decref(j.root);
  return rc;
}

static void rss_report(const char *self, const char *config, int K) {
  char cmd[4096], out[4096];
  snprintf(cmd, sizeof cmd, "'%s' --rss %d '%s'", self, K, config);
  int rc = run_capture(cmd, out, sizeof out);
  double kb = output_value(out, "rss_kb="), qb = output_value(out, "queue_bytes=");
  if (rc != 0 || kb <= 0) {
    printf("peak RSS, queue %d: the child failed (exit %d): %s", K, rc, out);
    return;
  }
  printf("peak RSS, queue_size %-6d %7.1f MB (the queue itself %.1f MB)\n", K, kb / 1024.0,
         qb / (1024.0 * 1024.0));
}

/* One thread count's figures. */
typedef struct {
  int threads;
  double gemm, sec, tsec; /* sgemm GFLOP/s, mocod and PyTorch s/step (tsec 0: not measured) */
  moco_timing ph;
  int steps;
  double *layer_ms; /* [n_layers][2]: forward (key + query) and backward ms per step */
} measure;

static void print_phases(const moco_timing *ph) {
  printf("%-26s keys %.0f%%, queries %.0f%%, similarity %.0f%%, mining %.0f%%, loss %.0f%%, backward "
         "%.0f%%, update %.0f%%\n",
         "mocod step phases", 100 * ph->keys / ph->total, 100 * ph->queries / ph->total,
         100 * ph->similarity / ph->total, 100 * ph->mining / ph->total, 100 * ph->loss / ph->total,
         100 * ph->backward / ph->total, 100 * ph->update / ph->total);
}

/* The compared job at `threads`: the team and the model are built for that count (a convolution's
 * split into parts is fixed when the net is built). Fills x; prints the step and its phases. */
static int measure_at(const job *j, const moco_config *mc, const float *views, double budget,
                      measure *x) {
  int rc = par_set_threads(x->threads);
  if (rc) return rc;
  moco_model m;
  if ((rc = model_build(&m, j, mc))) return rc;
  int L = m.query.n_layers;
  double *prof = calloc(4 * (size_t)L, sizeof *prof);
  if (!prof) {
    moco_free(&m);
    return moco_error(MOCO_ENOMEM, "layer profile");
  }
  m.query.prof = prof, m.key.prof = prof + 2 * L;
  x->gemm = sgemm_gflops(SGEMM_N, REPS);
  if (!(rc = time_steps(&m, views, budget, &x->sec, &x->steps, &x->ph))) {
    double steps = (double)REPS * x->steps;
    for (int i = 0; i < L; i++) {
      x->layer_ms[2 * i] = 1e3 * (prof[2 * i] + prof[2 * L + 2 * i]) / steps;
      x->layer_ms[2 * i + 1] = 1e3 * prof[2 * i + 1] / steps;
    }
    printf("-- %d thread%s\n", x->threads, x->threads > 1 ? "s" : "");
    printf("%-26s %7.1f GFLOP/s (median of %d)\n", "sgemm 2048^3", x->gemm, REPS);
    print_step("mocod step", x->sec, REPS, x->steps, step_flops(&m, mc->batch_size), x->gemm);
    print_phases(&x->ph);
  }
  m.query.prof = m.key.prof = NULL;
  free(prof);
  moco_free(&m);
  return rc;
}

/* Per layer, ms per step at each thread count: forward (key and query encoders together) and the
 * query encoder's backward. Layers whose every figure rounds to zero (flatten) are left out. */
static void print_layers(const net *n, const measure *x, int counts) {
  printf("per layer, ms/step  %-34s", "(fwd = key + query forward)");
  for (int c = 0; c < counts; c++) printf("   fwd/bwd @%-2d", x[c].threads);
  printf("\n");
  for (int i = 0; i < n->n_layers; i++) {
    double most = 0;
    for (int c = 0; c < counts; c++)
      most = fmax(most, fmax(x[c].layer_ms[2 * i], x[c].layer_ms[2 * i + 1]));
    if (most < 0.05) continue;
    char name[64];
    const layer *Ly = &n->layers[i];
    snprintf(name, sizeof name, "%2d %s %dx%dx%d", i, net_kind_name(Ly->kind), Ly->out_shape.c,
             Ly->out_shape.h, Ly->out_shape.w);
    printf("  %-52s", name);
    for (int c = 0; c < counts; c++) printf("   %5.1f / %5.1f", x[c].layer_ms[2 * i], x[c].layer_ms[2 * i + 1]);
    printf("\n");
  }
}

/* The thread counts: LIST as given, or 1, 2 and the CPU count (capped at the team's maximum). */
static int thread_counts(const char *list, int *out) {
  int n = 0;
  if (list) {
    for (const char *p = list; *p && n < MAX_COUNTS; p += strspn(p, ",")) {
      char *end;
      long t = strtol(p, &end, 10);
      if (end == p || t < 1 || t > PAR_MAX_THREADS) return -1;
      out[n++] = (int)t, p = end;
    }
    return n;
  }
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  int want[3] = {1, 2, (int)(cpus > PAR_MAX_THREADS ? PAR_MAX_THREADS : cpus < 1 ? 1 : cpus)};
  for (int i = 0; i < 3; i++)
    if (n == 0 || want[i] > out[n - 1]) out[n++] = want[i];
  return n;
}

int main(int argc, char **argv) {
  if (argc == 4 && strcmp(argv[1], "--rss") == 0) {
    int rc = rss_child(argv[3], atoi(argv[2]));
    if (rc) fprintf(stderr, "bench_speed --rss: %s\n", moco_errmsg());
    return rc ? 1 : 0;
  }
  const char *config = "config/default.json", *list = NULL;
  int torch = 1, rss = 1;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--threads") && i + 1 < argc)
      list = argv[++i];
    else if (!strcmp(argv[i], "--no-torch"))
      torch = 0;
    else if (!strcmp(argv[i], "--no-rss"))
      rss = 0;
    else if (argv[i][0] == '-') {
      fprintf(stderr, "usage: bench_speed [--threads 1,2,16] [--no-torch] [--no-rss] [CONFIG]\n");
      return 2;
    } else
      config = argv[i];
  }
  int counts_of[MAX_COUNTS], counts = thread_counts(list, counts_of);
  if (counts <= 0) {
    fprintf(stderr, "bench_speed: --threads %s: expected numbers in 1..%d, commas between\n", list,
            PAR_MAX_THREADS);
    return 2;
  }
  const char *env = getenv("MOCOD_BENCH_SECONDS");
  double budget = env && atof(env) > 0 ? atof(env) : 4.0;
  job j;
  if (job_load(&j, config)) {
    fprintf(stderr, "bench_speed: config %s: %s\n", config, moco_errmsg());
    return 1;
  }
  /* The compared job: every negative of the queue, plain InfoNCE, one direction. */
  moco_config mc = j.tc.moco;
  mc.loss.loss = LOSS_INFONCE;
  mc.mine = config_defaults()->trainer.moco.mine;
  mc.mine.strategy = MINE_ALL;
  mc.symmetric = 0;
  mc.total_steps = 0;
  moco_model m;
  float *views = views_alloc((size_t)2 * POOL * mc.batch_size * net_shape_size(j.in));
  if (!views || model_build(&m, &j, &mc)) {
    fprintf(stderr, "bench_speed: %s\n", views ? moco_errmsg() : "out of memory");
    return 1;
  }
  char enc[1024];
  net_describe(&m.query, enc, sizeof enc);
  printf("config %s (threads %d there), OpenBLAS core %s\n", config, j.tc.threads, openblas_get_corename());
  /* PyTorch's thread pool loses far more than mocod to cores that other work holds: say how busy the
   * machine was, so a ratio measured on a shared machine can be read for what it is. */
  double load = -1;
  FILE *la = fopen("/proc/loadavg", "r");
  if (la && fscanf(la, "%lf", &load) != 1) load = -1;
  if (la) fclose(la);
  printf("machine: %ld CPUs, load average %.2f before this run\n", sysconf(_SC_NPROCESSORS_ONLN), load);
  printf("encoder %s, %zu parameters\n", enc, m.query.n_params);
  printf("job: batch %d, queue %d, dim %d, InfoNCE over the whole queue (strategy all) for the "
         "comparison; configured: loss %s, strategy %s%s\n",
         mc.batch_size, mc.queue_size, m.dim, enum_name_of(loss_kind_names, (int)j.tc.moco.loss.loss),
         enum_name_of(mine_strategy_names, (int)j.tc.moco.mine.strategy), j.tc.moco.symmetric ? ", symmetric" : "");
  double flops = step_flops(&m, mc.batch_size);
  int L = m.query.n_layers, rc = 0, trc = 0;
  measure x[MAX_COUNTS];
  double *layer_ms = calloc((size_t)counts * 2 * L, sizeof *layer_ms);
  for (int c = 0; c < counts && layer_ms && !rc; c++) {
    x[c] = (measure){.threads = counts_of[c], .layer_ms = layer_ms + (size_t)c * 2 * L};
    rc = measure_at(&j, &mc, views, budget, &x[c]);
    int r = torch && !rc ? torch_reference(config, &j, x[c].threads, budget, &x[c].tsec, x[c].gemm) : 1;
    if (r == 0) printf("%-26s %7.2f (mocod steps/s / PyTorch steps/s)\n", "speed ratio", x[c].tsec / x[c].sec);
    if (r < 0) trc = r;
    if (r > 0) torch = 0; /* missing: said once */
  }
  tensor_free(views);
  if (rc || !layer_ms) {
    fprintf(stderr, "bench_speed: step: %s\n", layer_ms ? moco_errmsg() : "out of memory");
    return 1;
  }
  printf("-- summary: threads, mocod ms/step, share of sgemm 2048^3, speed-up over the first count, "
         "PyTorch ms/step, mocod / PyTorch\n");
  for (int c = 0; c < counts; c++) {
    printf("  %2d threads %8.1f ms %6.2f of sgemm %6.2fx", x[c].threads, 1e3 * x[c].sec,
           flops / x[c].sec / 1e9 / x[c].gemm, x[0].sec / x[c].sec);
    if (x[c].tsec > 0)
      printf(" %8.1f ms %6.2fx\n", 1e3 * x[c].tsec, x[c].tsec / x[c].sec);
    else
      printf("\n");
  }
  print_layers(&m.query, x, counts);
  free(layer_ms);
  moco_free(&m);

  char self[1024];
  ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  self[n > 0 ? n : 0] = '\0';
  const int Ks[] = {4096, 65536};
  for (int i = 0; i < 2 && n > 0 && rss; i++) rss_report(self, config, Ks[i]);
  json_decref(j.root);
  return trc < 0 ? 1 : 0;
}
