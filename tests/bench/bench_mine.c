/* Cost of negative selection per step next to the similarity sgemm it follows (issue 3's goal:
 * selection adds at most 30% on top of the sgemm and grows linearly in K). B = 256, d = 128, K = 4096
 * and 65536; strategies all, hardest (n = 1024), semi-hard (n = 1024, margin 0.2), mixing (MoCHi
 * N = 1024, s = 512, s' = 256). The embeddings are clustered so that similarities spread like a
 * trained model's (same-cluster ~0.5, positives ~0.9) rather than a random projection's (~0 +- 0.09).
 * Both run on the compute team, as in the daemon. Each repetition computes S with the sgemm and then
 * selects from it, so that both see the same moment of a shared machine and the selection reads S
 * fresh from the product, as in the step. Prints figures only.
 *
 *   bench_mine [K [strategy]]     (one queue size and strategy, e.g. under perf) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "contrast/mine.h"
#include "core/err.h"
#include "core/par.h"
#include "core/tensor.h"
#include "../testutil.h"
#include "service/config.h"

enum { B = 256, D = 128, CLUSTERS = 64, REPS_MAX = 31, WARMUP = 2 };

static void clustered(float *x, int n, const float *centers, float noise, rng_t *r) {
  for (int i = 0; i < n; i++) {
    const float *c = centers + (size_t)rng_below(r, CLUSTERS) * D;
    float *row = x + (size_t)i * D;
    for (int k = 0; k < D; k++) row[k] = c[k] + noise * rng_normal(r) / sqrtf((float)D);
    vec_normalize(row, D);
  }
}

int main(int argc, char **argv) {
  static const int Ks[] = {4096, 65536};
  int only_k = argc > 1 ? atoi(argv[1]) : 0;
  int only_s = MINE_ADVERSARIAL; /* not benchmarked: means every strategy */
  if (argc > 2 && enum_value_of(mine_strategy_names, argv[2], &only_s)) return 2;
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
  printf("selection per step, B=%d d=%d, %d threads. Each repetition computes S with the sgemm, as the\n"
         "step does, then selects; overhead = select / sgemm, best of each and median of the paired ratios\n",
         B, D, threads);
  printf("%-6s %-10s %9s %9s %9s %9s %9s %9s\n", "K", "strategy", "sgemm ms", "select ms", "overhead",
         "med ratio", "ms/1k K", "neg/query");
  for (size_t ki = 0; ki < sizeof Ks / sizeof *Ks; ki++) {
    int K = Ks[ki], reps = K > 10000 ? 9 : 31;
    if (only_k && K != only_k) continue;
    float *keys = tensor_alloc((size_t)K * D);
    clustered(keys, K, centers, 1.0f, &r);
    for (size_t si = 0; si < sizeof strategies / sizeof *strategies; si++) {
      if (only_s != MINE_ADVERSARIAL && (int)strategies[si] != only_s) continue;
      mine_config mc;
      mc = config_defaults()->trainer.moco.mine;
      mc.strategy = strategies[si];
      mc.num_negatives = 1024;
      mine m;
      if (mine_init(&m, &mc, B, K, D)) return 1;
      mine_layout l;
      mine_layout_init(&l, &mc, K, B);
      float *S = tensor_alloc((size_t)B * l.cols);
      uint8_t *mask = malloc((size_t)B * l.cols);
      mine_input in = {.batch_size = B, .s_pos = s_pos, .hardness = 1.0f, .queue_filled = K, .dim = D,
                       .q = q, .queue_keys = keys};
      mine_stats st;
      rng_t mr;
      rng_init(&mr, 2, RNG_STREAM_SAMPLE);
      double tg[REPS_MAX], ts[REPS_MAX], ratio[REPS_MAX];
      for (int rep = -WARMUP; rep < reps; rep++) {
        double t0 = clock_now();
        /* S = Q . K^T into S's queue columns */
        mat_mul_ld(S, l.cols, q, D, keys, D, B, K, D, 0, 1, 1.0f, 0.0f);
        double t1 = clock_now();
        if (mine_select(&m, &l, &in, S, mask, &mr, &st)) return 1;
        double t2 = clock_now();
        if (rep < 0) continue;
        tg[rep] = t1 - t0, ts[rep] = t2 - t1, ratio[rep] = ts[rep] / tg[rep];
      }
      double sgemm = best_of(tg, reps), sel = best_of(ts, reps);
      printf("%-6d %-10s %9.2f %9.2f %8.1f%% %8.1f%% %9.3f %9.1f\n", K, enum_name_of(mine_strategy_names, (int)mc.strategy),
             sgemm * 1e3, sel * 1e3, 100.0 * sel / sgemm, 100.0 * median_of(ratio, reps), sel * 1e6 / K,
             st.negatives_per_query);
      free(mask);
      tensor_free(S);
      mine_free(&m);
    }
    tensor_free(keys);
  }
  tensor_free(centers);
  tensor_free(q);
  tensor_free(kpos);
  return 0;
}
