/* Cost of negative selection per step next to the similarity sgemm it follows (issue 3's goal:
 * selection adds at most 30% on top of the sgemm and grows linearly in K). B = 256, d = 128, K = 4096
 * and 65536; strategies all, hardest (n = 1024), semi-hard (n = 1024, margin 0.2), mixing (MoCHi
 * N = 1024, s = 512, s' = 256). The embeddings are clustered so that similarities spread like a
 * trained model's (same-cluster ~0.5, positives ~0.9) rather than a random projection's (~0 +- 0.09).
 * Wall times are the fastest of a few runs; CPU times (the whole process: both run on the compute team) show the work itself when other jobs share the machine. Prints figures
 * only. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cblas.h>

#include "contrast/mine.h"
#include "core/err.h"
#include "core/par.h"
#include "core/tensor.h"
#include "../testutil.h"

enum { B = 256, D = 128, CLUSTERS = 64 };

static void clustered(float *x, int n, const float *centers, float noise, rng_t *r) {
  for (int i = 0; i < n; i++) {
    const float *c = centers + (size_t)rng_below(r, CLUSTERS) * D;
    float *row = x + (size_t)i * D;
    for (int k = 0; k < D; k++) row[k] = c[k] + noise * rng_normal(r) / sqrtf((float)D);
    vec_normalize(row, D);
  }
}

static double cpu_seconds(clockid_t which) {
  struct timespec ts;
  clock_gettime(which, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The fastest of a few timings: on a shared machine every other figure includes someone else's work. */
static double fastest(const double *t, int n) {
  double m = t[0];
  for (int i = 1; i < n; i++) m = t[i] < m ? t[i] : m;
  return m;
}

/* Arguments narrow the run for profiling: `bench_mine [K [strategy]]`. */
int main(int argc, char **argv) {
  static const int Ks[] = {4096, 65536};
  int only_k = argc > 1 ? atoi(argv[1]) : 0;
  mine_strategy only_s = MINE_ADVERSARIAL; /* not benchmarked: means every strategy */
  if (argc > 2 && mine_strategy_parse(argv[2], &only_s)) return 2;
  /* Both the product and the selection run on mocod's compute team, as in the daemon. */
  int threads = openblas_get_num_threads();
  if (par_set_threads(threads)) {
    fprintf(stderr, "bench_mine: %s\n", moco_errmsg());
    return 1;
  }
  static const mine_strategy strategies[] = {MINE_ALL, MINE_HARDEST, MINE_SEMI_HARD, MINE_MIXING};
  rng_t r;
  rng_init(&r, 1, RNG_STREAM_SAMPLE);
  float *centers = tensor_alloc((size_t)CLUSTERS * D);
  for (int c = 0; c < CLUSTERS; c++) {
    for (int k = 0; k < D; k++) centers[c * D + k] = rng_normal(&r);
    vec_normalize(centers + c * D, D);
  }
  float *q = tensor_alloc((size_t)B * D), *kpos = tensor_alloc((size_t)B * D), s_pos[B];
  clustered(q, B, centers, 1.0f, &r);
  for (int i = 0; i < B; i++) {
    for (int k = 0; k < D; k++) kpos[i * D + k] = q[i * D + k] + 0.5f * rng_normal(&r) / sqrtf((float)D);
    vec_normalize(kpos + i * D, D);
    s_pos[i] = vec_dot(q + i * D, kpos + i * D, D);
  }
  printf("selection per step, B=%d d=%d, %d threads (fastest of runs; overhead = select / sgemm)\n", B, D,
         threads);
  printf("%-6s %-10s %9s %9s %8s %10s %10s %8s %9s %9s\n", "K", "strategy", "sgemm ms", "select ms",
         "overhead", "sgemm cpu", "select cpu", "cpu share", "ms/1k K", "neg/query");
  for (size_t ki = 0; ki < sizeof Ks / sizeof *Ks; ki++) {
    int K = Ks[ki], reps = K > 10000 ? 5 : 15;
    if (only_k && K != only_k) continue;
    float *keys = tensor_alloc((size_t)K * D), *Sq = tensor_alloc((size_t)B * K);
    clustered(keys, K, centers, 1.0f, &r);
    double t[16], c[16];
    for (int rep = 0; rep < reps; rep++) {
      double t0 = clock_now(), c0 = cpu_seconds(CLOCK_PROCESS_CPUTIME_ID);
      mat_mul(Sq, q, keys, B, K, D, 0, 1, 1.0f, 0.0f); /* S = Q . K^T, [B,d] . [d,K] */
      t[rep] = clock_now() - t0;
      c[rep] = cpu_seconds(CLOCK_PROCESS_CPUTIME_ID) - c0;
    }
    double sgemm = fastest(t, reps), sgemm_cpu = fastest(c, reps);
    for (size_t si = 0; si < sizeof strategies / sizeof *strategies; si++) {
      if (only_s != MINE_ADVERSARIAL && strategies[si] != only_s) continue;
      mine_config mc;
      mine_config_default(&mc);
      mc.strategy = strategies[si];
      mc.num_negatives = 1024;
      mine m;
      if (mine_init(&m, &mc, B, K, D)) return 1;
      mine_layout l;
      mine_layout_init(&l, &mc, K, B);
      float *S = tensor_alloc((size_t)B * l.cols);
      uint8_t *mask = malloc((size_t)B * l.cols);
      for (int i = 0; i < B; i++) memcpy(S + (size_t)i * l.cols, Sq + (size_t)i * K, (size_t)K * sizeof(float));
      mine_input in = {.batch_size = B, .s_pos = s_pos, .hardness = 1.0f, .queue_filled = K, .dim = D,
                       .q = q, .queue_keys = keys};
      mine_stats st;
      rng_t mr;
      rng_init(&mr, 2, RNG_STREAM_SAMPLE);
      for (int rep = 0; rep < reps; rep++) {
        double t0 = clock_now(), c0 = cpu_seconds(CLOCK_PROCESS_CPUTIME_ID);
        if (mine_select(&m, &l, &in, S, mask, &mr, &st)) return 1;
        t[rep] = clock_now() - t0;
        c[rep] = cpu_seconds(CLOCK_PROCESS_CPUTIME_ID) - c0;
      }
      double sel = fastest(t, reps), sel_cpu = fastest(c, reps);
      printf("%-6d %-10s %9.2f %9.2f %7.1f%% %10.2f %10.2f %7.1f%% %9.3f %9.1f\n", K,
             mine_strategy_name(mc.strategy), sgemm * 1e3, sel * 1e3, 100.0 * sel / sgemm, sgemm_cpu * 1e3,
             sel_cpu * 1e3, 100.0 * sel_cpu / sgemm_cpu, sel * 1e6 / K, st.negatives_per_query);
      free(mask);
      tensor_free(S);
      mine_free(&m);
    }
    tensor_free(keys);
    tensor_free(Sq);
  }
  tensor_free(centers);
  tensor_free(q);
  tensor_free(kpos);
  return 0;
}
