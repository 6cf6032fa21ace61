/* Soak: the real daemon trains config/tiny.json for MOCOD_SOAK_STEPS steps (default 20,000) while a
 * client asks `status` every 100 ms and `set`s the learning rate every 3 s, with a checkpoint every 500
 * steps. Prints the daemon's resident memory and open descriptors at 5%, 50% and 99.5% of the run (1k,
 * 10k and 19.9k steps by default, all while training) and once finished (after the final evaluation
 * with its linear probe and the final checkpoint), and the status latency percentiles. Judges nothing. */
#include <dirent.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../daemon_harness.h"
#include "../testutil.h"

static long vm_rss_kb(int pid) {
  char p[64], line[256];
  snprintf(p, sizeof p, "/proc/%d/status", pid);
  FILE *f = fopen(p, "r");
  long kb = -1;
  while (f && fgets(line, sizeof line, f))
    if (!strncmp(line, "VmRSS:", 6)) kb = atol(line + 6);
  if (f) fclose(f);
  return kb;
}

static int open_fds(int pid) {
  char p[64];
  snprintf(p, sizeof p, "/proc/%d/fd", pid);
  DIR *d = opendir(p);
  if (!d) return -1;
  int n = 0;
  struct dirent *de;
  while ((de = readdir(d))) n += de->d_name[0] != '.';
  closedir(d);
  return n;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(void) {
  const char *e = getenv("MOCOD_SOAK_STEPS");
  long long steps = e && atoll(e) > 0 ? atoll(e) : 20000;
  char set_steps[64];
  snprintf(set_steps, sizeof set_steps, "optim.steps=%lld", steps);
  dh_standalone = 1;
  dh_setup();
  int pid = dh_start(set_steps, "checkpoint.every_steps=500", "checkpoint.every_seconds=0",
                     "log.every_steps=100", NULL);
  dh_client *c = dh_client_open(1);
  enum { MARKS = 4 };
  long long marks[MARKS] = {steps / 20, steps / 2, steps - steps / 200, steps};
  long rss[MARKS] = {0};
  int fds[MARKS] = {0}, next_mark = 0, sets = 0;
  size_t n = 0, cap = 4096;
  double *lat = malloc(cap * sizeof *lat);
  double t0 = clock_now(), last_set = t0;
  long long step = 0, last_ckpt = -1;
  char state[32] = "running";
  while (next_mark < MARKS) {
    double t = clock_now();
    json_t *a = dh_client_call(c, "{\"id\":1,\"cmd\":\"status\"}", 10);
    if (!a) {
      fprintf(stderr, "bench_soak: no status answer\n");
      return 1;
    }
    if (n == cap) lat = realloc(lat, (cap *= 2) * sizeof *lat);
    lat[n++] = clock_now() - t;
    json_t *r = json_object_get(a, "result");
    step = json_integer_value(json_object_get(r, "step"));
    const char *st = json_string_value(json_object_get(r, "state"));
    snprintf(state, sizeof state, "%s", st ? st : "?");
    json_t *ck = json_object_get(r, "last_checkpoint");
    if (json_is_object(ck)) last_ckpt = json_integer_value(json_object_get(ck, "step"));
    int done = !strcmp(state, "finished") || !strcmp(state, "error");
    json_decref(a);
    /* The last figures once the run has finished, not during its final evaluation. */
    while (next_mark < MARKS && ((next_mark < MARKS - 1 && step >= marks[next_mark]) || done)) {
      rss[next_mark] = vm_rss_kb(pid);
      fds[next_mark] = open_fds(pid);
      next_mark++;
    }
    if (clock_now() - last_set >= 3) {
      a = dh_client_call(c, sets % 2 ? "{\"id\":2,\"cmd\":\"set\",\"args\":{\"optim.lr\":0.05}}"
                                      : "{\"id\":2,\"cmd\":\"set\",\"args\":{\"optim.lr\":0.04}}", 10);
      json_decref(a);
      sets++;
      last_set = clock_now();
    }
    usleep(100000);
  }
  double wall = clock_now() - t0;
  dh_client_close(c);
  dh_stop(pid);
  qsort(lat, n, sizeof *lat, cmp_double);
  printf("soak: %lld steps of config/tiny.json in %.1f s (%s at the end), %zu status requests every "
         "100 ms, %d sets, last checkpoint at step %lld\n",
         step, wall, state, n, sets, last_ckpt);
  for (int i = 0; i < MARKS; i++)
    printf("  at step %6lld%s: RSS %6ld kB, open fds %d\n", marks[i], i == MARKS - 1 ? " (finished)" : "",
           rss[i], fds[i]);
  printf("  RSS change while training, step %lld to %lld: %+.1f%%; finished: %+.1f%%\n", marks[0],
         marks[2], 100.0 * (double)(rss[2] - rss[0]) / (double)rss[0],
         100.0 * (double)(rss[3] - rss[0]) / (double)rss[0]);
  printf("  status latency: p50 %.3f ms, p90 %.3f ms, p99 %.3f ms, max %.3f ms\n", lat[n / 2] * 1e3,
         lat[n * 9 / 10] * 1e3, lat[n * 99 / 100] * 1e3, lat[n - 1] * 1e3);
  free(lat);
  dh_teardown();
  return 0;
}
