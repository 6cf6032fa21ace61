#include "testutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/tensor.h"

/* Central difference along coordinate i, divided by the step x_i really took in float; *left is set
 * when an evaluation fell outside the piece `base` of a piecewise-smooth loss (see gc_spec.regime). */
static double gc_diff(gc_loss_fn f, void *ctx, float *x, size_t i, double h, const gc_spec *s,
                      uint64_t base, int *left) {
  float keep = x[i];
  float xp = (float)(keep + h), xm = (float)(keep - h);
  x[i] = xp;
  double lp = f(ctx);
  if (s->regime && s->regime(ctx) != base) *left = 1;
  x[i] = xm;
  double lm = f(ctx);
  if (s->regime && s->regime(ctx) != base) *left = 1;
  x[i] = keep;
  return (lp - lm) / ((double)xp - (double)xm);
}

double gc_max_abs(const float *g, size_t n) {
  double m = 0.0;
  for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)g[i]));
  return m;
}

double gc_atol(double h, double c_eval, double scale, double m3, double c_grad, double gmax) {
  const double u = 0x1p-24;
  return c_eval * u * scale / h + h * h / 6.0 * m3 + c_grad * u * gmax;
}

gc_result gc_check(gc_loss_fn f, void *ctx, float *x, const float *grad, size_t n, const gc_spec *s) {
  gc_result r = {0};
  size_t big = 0, planted = 0;
  for (size_t i = 1; i < n; i++)
    if (fabsf(grad[i]) > fabsf(grad[big])) big = i;
  uint64_t base = 0;
  if (s->regime) f(ctx), base = s->regime(ctx);
  size_t stride = n > s->max_checks ? n / s->max_checks : 1;
  /* the strided coordinates, then the largest entry when the stride stepped over it */
  int extra = big % stride != 0;
  for (size_t i = 0; i < n || extra; i += stride) {
    if (i >= n) i = big, extra = 0;
    int left = 0;
    double fd = gc_diff(f, ctx, x, i, s->h, s, base, &left), a = grad[i];
    double tol = s->atol + s->rtol * fabs(fd);
    if (s->richardson) tol += fabs(gc_diff(f, ctx, x, i, 2 * s->h, s, base, &left) - fd);
    if (left) {
      r.skipped++;
    } else {
      double ratio = fabs(a - fd) / tol;
      if (r.checked++ == 0 || ratio > r.ratio) r.ratio = ratio, r.worst_i = i, r.a = a, r.f = fd, r.tol = tol;
      if (r.checked == 1 || fabs(a) > fabs(grad[planted])) planted = i, r.plant_ratio = fabs(1.01 * a - fd) / tol;
    }
    if (i == big && big % stride != 0) break;
  }
  const char *v = getenv("MOCOD_GC_VERBOSE");
  if (v && *v == '1')
    fprintf(stderr,
            "gradcheck %s: n=%zu checked %zu skipped %zu worst |a-f|/tol %.3g (margin %.1fx) at %zu (a %.7g, "
            "f %.7g, tol %.3g); 1%% planted at %zu: %.3g\n",
            s->name ? s->name : "?", n, r.checked, r.skipped, r.ratio, 1.0 / r.ratio, r.worst_i, r.a, r.f,
            r.tol, planted, r.plant_ratio);
  return r;
}

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

const char *test_run_id(void) {
  static char id[32];
  const char *run = getenv("MOCOD_TEST_RUN");
  if (run && *run) return run;
  if (!id[0]) snprintf(id, sizeof id, "%d", (int)getpid()); /* a benchmark: no runner */
  return id;
}

char *test_tmpdir(void) {
  static char buf[96];
  snprintf(buf, sizeof buf, "/tmp/mocod-test-%s-XXXXXX", test_run_id());
  if (!mkdtemp(buf)) return NULL;
  return buf;
}

static char scratch_dir[96];
static char scratch_slots[4][512];

void test_scratch_setup(void) { snprintf(scratch_dir, sizeof scratch_dir, "%s", test_tmpdir()); }
void test_scratch_teardown(void) { rm_rf(scratch_dir); }
const char *test_scratch_dir(void) { return scratch_dir; }
const char *test_scratch_slot(int k) { return scratch_slots[k]; }

const char *test_scratch_path(int k, const char *name) {
  snprintf(scratch_slots[k], sizeof scratch_slots[k], "%s/%s", scratch_dir, name);
  return scratch_slots[k];
}

/* The environment a process was started with (/proc/PID/environ: NUL-separated name=value entries),
 * into *buf (grown as needed); its length, 0 for a zombie or a process we may not read. */
static size_t read_environ(int pid, char **buf, size_t *cap) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/environ", pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  size_t len = 0;
  for (;;) {
    if (len == *cap) {
      size_t grown = *cap ? 2 * *cap : 1 << 16;
      char *b = realloc(*buf, grown);
      if (!b) break;
      *buf = b, *cap = grown;
    }
    ssize_t k = read(fd, *buf + len, *cap - len);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) break;
    len += (size_t)k;
  }
  close(fd);
  return len;
}

static int has_entry(const char *env, size_t len, const char *entry) {
  size_t n = strlen(entry);
  for (size_t i = 0; i < len; i += strnlen(env + i, len - i) + 1)
    if (len - i >= n && !memcmp(env + i, entry, n) && (i + n == len || env[i + n] == '\0')) return 1;
  return 0;
}

/* SIGKILLs every process but this one whose environment holds `entry` (name=value), until a scan of
 * /proc finds none left (a process being killed may just have forked); returns how many it killed. */
static int kill_tagged(const char *entry) {
  char *env = NULL;
  size_t cap = 0;
  int killed = 0;
  for (int round = 0; round < 100; round++) {
    int found = 0;
    DIR *d = opendir("/proc");
    if (!d) break;
    struct dirent *de;
    while ((de = readdir(d))) {
      int pid = atoi(de->d_name);
      if (pid <= 0 || pid == getpid()) continue;
      size_t len = read_environ(pid, &env, &cap);
      if (!len || !has_entry(env, len, entry)) continue;
      char cmd[256] = "", path[64];
      snprintf(path, sizeof path, "/proc/%d/cmdline", pid);
      FILE *f = fopen(path, "r");
      if (f) {
        size_t k = fread(cmd, 1, sizeof cmd - 1, f);
        for (size_t i = 0; i + 1 < k; i++) cmd[i] = cmd[i] ? cmd[i] : ' ';
        cmd[k] = '\0';
        fclose(f);
      }
      if (kill(pid, SIGKILL) == 0) {
        /* Also a daemon that was still exiting after reporting a failed start: the line names it. */
        fprintf(stderr, "test reaper: killed pid %d (%s), still running after its test (%s)\n", pid, cmd,
                entry);
        killed++;
        found++;
      }
    }
    closedir(d);
    if (!found) break;
    usleep(10000);
  }
  free(env);
  return killed;
}

static int reaper_fd = -1; /* the write end of the reaper's pipe: it reads EOF when the test ends */
static pid_t reaper_pid;

void test_reaper_start(void) {
  static unsigned n;
  char id[96], entry[128];
  snprintf(id, sizeof id, "%s.%d.%u", test_run_id(), (int)getpid(), n++);
  snprintf(entry, sizeof entry, "MOCOD_TEST_ID=%s", id);
  setenv("MOCOD_TEST_ID", id, 1);
  int p[2];
  if (pipe2(p, O_CLOEXEC)) {
    fprintf(stderr, "test reaper: pipe: %s\n", strerror(errno));
    return;
  }
  pid_t pid = fork();
  if (pid < 0) {
    fprintf(stderr, "test reaper: fork: %s\n", strerror(errno));
    close(p[0]);
    close(p[1]);
    return;
  }
  if (pid == 0) {
    close(p[1]);
    setsid(); /* out of the test's process group, which a timeout kills */
    char c;
    ssize_t k;
    while ((k = read(p[0], &c, 1)) > 0 || (k < 0 && errno == EINTR)) {
    }
    kill_tagged(entry);
    _exit(0); /* no atexit handlers or leak report of the test's copy */
  }
  close(p[0]);
  reaper_fd = p[1];
  reaper_pid = pid;
}

void test_reaper_stop(void) {
  if (reaper_fd < 0) return;
  close(reaper_fd);
  reaper_fd = -1;
  while (waitpid(reaper_pid, NULL, 0) < 0 && errno == EINTR) {
  }
  unsetenv("MOCOD_TEST_ID");
  /* What it killed was reparented here when this process is their subreaper: reap them. */
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

void test_reaper_sweep(void) {
  char entry[64], pattern[96];
  snprintf(entry, sizeof entry, "MOCOD_TEST_RUN=%s", test_run_id());
  kill_tagged(entry);
  snprintf(pattern, sizeof pattern, "/tmp/mocod-test-%s-*", test_run_id());
  glob_t g;
  if (glob(pattern, 0, NULL, &g) == 0) {
    for (size_t i = 0; i < g.gl_pathc; i++) rm_rf(g.gl_pathv[i]);
    globfree(&g);
  }
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

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

double median_of(double *t, int n) {
  qsort(t, (size_t)n, sizeof *t, cmp_double);
  return t[n / 2];
}

double best_of(const double *t, int n) {
  double m = t[0];
  for (int i = 1; i < n; i++) m = t[i] < m ? t[i] : m;
  return m;
}

double sgemm_gflops(int n, int reps) {
  size_t len = (size_t)n * n;
  float *a = tensor_alloc(len), *b = tensor_alloc(len), *c = tensor_alloc(len);
  double *t = malloc((size_t)reps * sizeof *t);
  double gf = 0.0;
  if (a && b && c && t) {
    rng_t r;
    rng_init(&r, 1, 1);
    fill_uniform(a, len, &r, -1, 1);
    fill_uniform(b, len, &r, -1, 1);
    mat_mul(c, a, b, n, n, n, 0, 0, 1.0f, 0.0f); /* first touch, OpenBLAS buffers */
    for (int i = 0; i < reps; i++) {
      double t0 = clock_now();
      mat_mul(c, a, b, n, n, n, 0, 0, 1.0f, 0.0f);
      t[i] = clock_now() - t0;
    }
    gf = 2.0 * n * n * n / median_of(t, reps) / 1e9;
  }
  free(t);
  tensor_free(a), tensor_free(b), tensor_free(c);
  return gf;
}

double net_train_flops(const net *n) {
  double f = 0.0;
  int first = 1;
  for (int i = 0; i < n->n_layers; i++) {
    const layer *L = &n->layers[i];
    if (L->kind != LAYER_LINEAR && L->kind != LAYER_CONV2D) continue;
    double fl = 2.0 * (double)L->w_len * L->out_shape.h * L->out_shape.w;
    f += first ? 2 * fl : 3 * fl;
    first = 0;
  }
  return f;
}

long proc_status_kb(const char *field) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long v = -1;
  size_t n = strlen(field);
  while (f && fgets(line, sizeof line, f))
    if (!strncmp(line, field, n)) v = atol(line + n + 1);
  if (f) fclose(f);
  return v;
}
