#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

double gradcheck(gc_loss_fn f, void *ctx, float *x, const float *grad, size_t n, float h,
                 size_t max_checks, double floor) {
  size_t stride = n > max_checks ? n / max_checks : 1;
  double worst = 0.0;
  size_t worst_i = 0;
  double worst_a = 0, worst_f = 0;
  for (size_t i = 0; i < n; i += stride) {
    float keep = x[i];
    x[i] = keep + h;
    double lp = f(ctx);
    x[i] = keep - h;
    double lm = f(ctx);
    x[i] = keep;
    double fd = (lp - lm) / (2.0 * (double)h);
    double a = grad[i];
    double denom = fabs(a) + fabs(fd);
    if (denom < floor) denom = floor;
    double err = fabs(a - fd) / denom;
    if (err > worst) {
      worst = err;
      worst_i = i;
      worst_a = a;
      worst_f = fd;
    }
  }
  const char *v = getenv("MOCOD_GC_VERBOSE");
  if (v && *v == '1')
    fprintf(stderr, "gradcheck: n=%zu worst rel err %.3g at %zu (analytic %.6g, numeric %.6g)\n", n,
            worst, worst_i, worst_a, worst_f);
  return worst;
}

void fill_uniform(float *x, size_t n, rng_t *r, float lo, float hi) {
  for (size_t i = 0; i < n; i++) x[i] = rng_range(r, lo, hi);
}

char *test_tmpdir(void) {
  static char buf[64];
  strcpy(buf, "/tmp/mocod-test-XXXXXX");
  if (!mkdtemp(buf)) return NULL;
  return buf;
}

void rm_rf(const char *path) {
  char cmd[512];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", path);
  if (system(cmd) != 0) fprintf(stderr, "rm_rf: failed on %s\n", path);
}

const char *data_path(const char *name) {
  static char buf[512];
  const char *root = getenv("MOCOD_DATA");
  snprintf(buf, sizeof buf, "%s/%s", root ? root : "data", name);
  return buf;
}

const char *bin_path(const char *name) {
  static char buf[512];
  const char *dir = getenv("MOCOD_BIN");
  snprintf(buf, sizeof buf, "%s/%s", dir && *dir ? dir : "build/bin", name);
  return buf;
}

int run_capture(const char *cmd, char *out, size_t n) {
  char full[4096];
  snprintf(full, sizeof full, "( %s ) 2>&1", cmd);
  FILE *p = popen(full, "r");
  if (!p) return -1;
  size_t len = 0, k;
  char sink[256];
  while ((k = fread(len + 1 < n ? out + len : sink, 1, len + 1 < n ? n - 1 - len : sizeof sink, p)) > 0)
    if (len + 1 < n) len += k;
  if (n) out[len] = '\0';
  int st = pclose(p);
  return st != -1 && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}
