/* Forward + backward of the default MLP encoder and of a small CNN at batch 256, next to a large square
 * sgemm measured in the same run. Prints figures, judges nothing.
 *
 * FLOPs are those the step performs (net_train_flops, tests/testutil.h): 2 x multiply-adds of every
 * matrix product, forward (F), weight gradients (F) and input gradients (F less the first parameter
 * layer's, which is skipped because nothing needs the gradient of the input images). */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../testutil.h"
#include "core/err.h"
#include "core/net.h"
#include "core/par.h"
#include "core/tensor.h"

#define REPS 15
/* Untimed passes first, for at least this long: right after par_set_threads the team's new worker
 * threads run slower for a few hundred ms (a product measured at 207 GFLOP/s then, 265 after 0.5 s of
 * work), and the first passes also fault in the activations. The daemon runs for minutes. */
#define WARMUP_SECONDS 0.5
#define GEMM_N 2048
/* Passes of the network per reference product: the reference's 48 MB evict the network's weights
 * and activations, which in training stay warm from one step to the next. */
#define PASSES 3

/* The reference product, on the team as the layers' products are. */
typedef struct {
  float *a, *b, *c;
} gemm_ref;

static double gemm_seconds(const gemm_ref *g) {
  double t0 = clock_now();
  mat_mul(g->c, g->a, g->b, GEMM_N, GEMM_N, GEMM_N, 0, 0, 1.0f, 0.0f);
  return clock_now() - t0;
}

/* Passes of the network alternate with the reference product, so that both see the same machine:
 * on a shared machine other jobs come and go within seconds, and figures taken a second apart are
 * not comparable. Reported: the best of each (the machine at its quietest) and the median of the
 * per-pair ratios. */
static void bench_net(const char *name, const char *spec_text, net_shape in, int B, const gemm_ref *g) {
  json_error_t je;
  json_t *spec = json_loads(spec_text, 0, &je);
  net n;
  if (net_build(&n, spec, in, B, name)) {
    fprintf(stderr, "%s: %s\n", name, moco_errmsg());
    exit(1);
  }
  json_decref(spec);
  rng_t r;
  rng_init(&r, 1, RNG_STREAM_INIT);
  net_init(&n, &r);
  size_t nin = net_shape_size(in) * B, nout = net_shape_size(n.out_shape) * B;
  float *x = tensor_alloc(nin), *dy = tensor_alloc(nout);
  fill_uniform(x, nin, &r, 0, 1);
  fill_uniform(dy, nout, &r, -1, 1);
  double tf[REPS], tb[REPS], tp[REPS], tg[REPS], ratio[REPS], warm_end = clock_now() + WARMUP_SECONDS;
  const double f = net_train_flops(&n) * B, fg = 2.0 * GEMM_N * GEMM_N * GEMM_N;
  for (int i = 0; i < REPS;) {
    int timed = clock_now() >= warm_end;
    double t0 = 0, t1 = 0, t2 = 0;
    for (int k = 0; k < PASSES; k++) { /* the last pass is timed: caches as in a run of steps */
      t0 = clock_now();
      net_forward(&n, x, B);
      t1 = clock_now();
      net_zero_grad(&n);
      net_backward(&n, dy, NULL, B);
      t2 = clock_now();
    }
    double gs = gemm_seconds(g);
    if (!timed) continue;
    tf[i] = t1 - t0, tb[i] = t2 - t1, tp[i] = t2 - t0, tg[i] = gs;
    ratio[i] = (f / tp[i]) / (fg / gs);
    i++;
  }
  double gf = f / best_of(tp, REPS) / 1e9, gg = fg / best_of(tg, REPS) / 1e9;
  printf("%-4s B=%d  %zu params  %.3f GFLOP/step  fwd %.2f ms  bwd %.2f ms (medians)\n", name, B,
         net_num_params(&n), f / 1e9, 1e3 * median_of(tf, REPS), 1e3 * median_of(tb, REPS));
  printf("%-4s best %.1f GFLOP/s, sgemm %d^3 alongside best %.1f GFLOP/s: ratio of bests %.2f, "
         "median of %d paired ratios %.2f\n",
         name, gf, GEMM_N, gg, gf / gg, REPS, median_of(ratio, REPS));
  tensor_free(x), tensor_free(dy);
  net_free(&n);
}

/* Optional argument: run only the named network ("mlp" or "cnn"), e.g. under perf. */
int main(int argc, char **argv) {
  const char *mlp =
      "[{\"type\":\"flatten\"},"
      "{\"type\":\"linear\",\"out\":1024},{\"type\":\"batchnorm\"},{\"type\":\"relu\"},"
      "{\"type\":\"linear\",\"out\":512},{\"type\":\"batchnorm\"},{\"type\":\"relu\"},"
      "{\"type\":\"linear\",\"out\":512},{\"type\":\"batchnorm\"},{\"type\":\"relu\"},"
      "{\"type\":\"linear\",\"out\":128},{\"type\":\"l2norm\"}]";
  const char *cnn =
      "[{\"type\":\"conv2d\",\"out\":32,\"kernel\":3,\"pad\":1},{\"type\":\"batchnorm\"},{\"type\":"
      "\"relu\"},"
      "{\"type\":\"maxpool\",\"kernel\":2},"
      "{\"type\":\"conv2d\",\"out\":64,\"kernel\":3,\"pad\":1},{\"type\":\"batchnorm\"},{\"type\":"
      "\"relu\"},"
      "{\"type\":\"maxpool\",\"kernel\":2},"
      "{\"type\":\"conv2d\",\"out\":128,\"kernel\":3,\"pad\":1},{\"type\":\"batchnorm\"},{\"type\":"
      "\"relu\"},"
      "{\"type\":\"avgpool\"},{\"type\":\"linear\",\"out\":128},{\"type\":\"l2norm\"}]";
  double gemm = sgemm_gflops(GEMM_N, REPS);
  /* OpenBLAS picks its kernels from the CPU model at load time; on a virtual CPU it may not know
   * (it then falls back to SSE3 "Prescott" kernels, 5x slower here), which OPENBLAS_CORETYPE
   * (e.g. SkylakeX, Haswell) overrides. The core in use is printed so the figures can be read. */
  printf("OpenBLAS core %s, %d threads\n", openblas_get_corename(), openblas_get_num_threads());
  printf("sgemm %d^3, OpenBLAS threading itself: %.1f GFLOP/s (median of %d)\n", GEMM_N, gemm, REPS);
  /* The layers run on mocod's compute team, as in the daemon (OpenBLAS single-threaded inside it). */
  int threads = openblas_get_num_threads();
  if (par_set_threads(threads)) {
    fprintf(stderr, "bench_net: %s\n", moco_errmsg());
    return 1;
  }
  printf("compute team: %d threads\n", threads);
  size_t len = (size_t)GEMM_N * GEMM_N;
  gemm_ref g = {tensor_alloc(len), tensor_alloc(len), tensor_alloc(len)};
  rng_t r;
  rng_init(&r, 2, 1);
  fill_uniform(g.a, len, &r, -1, 1);
  fill_uniform(g.b, len, &r, -1, 1);
  if (argc < 2 || strcmp(argv[1], "mlp") == 0) bench_net("mlp", mlp, (net_shape){1, 28, 28}, 256, &g);
  if (argc < 2 || strcmp(argv[1], "cnn") == 0) bench_net("cnn", cnn, (net_shape){1, 28, 28}, 256, &g);
  tensor_free(g.a), tensor_free(g.b), tensor_free(g.c);
  return 0;
}
