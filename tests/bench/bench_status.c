/* Status latency while steps compute: the real daemon trains config/tiny.json with batch 256 and
 * queue 1024 (steps of tens of milliseconds on the worker thread) while one client asks `status` every
 * 7 ms, MOCOD_STATUS_REQUESTS times (default 600). Prints the latency percentiles of the answers made
 * while a step was computing ("pending": 1) and of all answers, and the step time for scale. The
 * figures measure the machine as much as the daemon (other processes share its cores); the test
 * status_answers_while_a_step_computes in test_daemon.c judges the behaviour. Judges nothing. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "../daemon_harness.h"
#include "../testutil.h"

int main(void) {
  const char *e = getenv("MOCOD_STATUS_REQUESTS");
  int want = e && atoi(e) > 0 ? atoi(e) : 600;
  dh_standalone = 1;
  dh_setup();
  int pid = dh_start("optim.steps=100000", "optim.batch_size=256", "contrast.queue_size=1024",
                     "checkpoint.every_steps=0", "eval.every_steps=0", NULL);
  dh_wait_step(2, 60);
  dh_client *c = dh_client_open(1);
  double *all = malloc((size_t)want * sizeof *all), *during = malloc((size_t)want * sizeof *during);
  int n_all = 0, n_during = 0;
  long long first = -1, last = -1;
  double t0 = clock_now();
  while (n_all < want) {
    double t = clock_now();
    json_t *a = dh_client_call(c, "{\"id\":1,\"cmd\":\"status\"}", 10);
    double dt = clock_now() - t;
    if (!a) {
      fprintf(stderr, "bench_status: no status answer\n");
      return 1;
    }
    json_t *r = json_object_get(a, "result");
    last = json_integer_value(json_object_get(r, "step"));
    if (first < 0) first = last;
    all[n_all++] = dt;
    if (json_integer_value(json_object_get(r, "pending")) > 0) during[n_during++] = dt;
    json_decref(a);
    usleep(7000);
  }
  double wall = clock_now() - t0;
  dh_client_close(c);
  dh_stop(pid);
  printf("status: %d requests over %lld steps of batch 256 (%.1f ms a step), %d answered during a step\n",
         n_all, last - first, last > first ? 1e3 * wall / (double)(last - first) : 0.0, n_during);
  double *sets[2] = {during, all};
  int ns[2] = {n_during, n_all};
  const char *names[2] = {"during a step", "all"};
  for (int i = 0; i < 2; i++) {
    int k = ns[i];
    if (!k) continue;
    median_of(sets[i], k); /* sorts */
    printf("  %-13s latency: p50 %.3f ms, p80 %.3f ms, p99 %.3f ms, max %.3f ms\n", names[i],
           sets[i][k / 2] * 1e3, sets[i][k * 8 / 10] * 1e3, sets[i][k * 99 / 100] * 1e3, sets[i][k - 1] * 1e3);
  }
  free(all);
  free(during);
  dh_teardown();
  return 0;
}
