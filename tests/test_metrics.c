/* Prometheus metrics: the exposition text (mococtl metrics and the HTTP endpoint of
 * service.metrics_listen) from a training daemon, accepted by `promtool check metrics` when Debian's
 * prometheus package is installed, and scraped twice while the step advances. */
#include <arpa/inet.h>
#include <check.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "daemon_harness.h"
#include "service/metrics.h"
#include "testutil.h"

/* A port nobody listens on now (the kernel's choice for port 0). */
static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof sa;
  ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
  ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
  close(fd);
  return ntohs(sa.sin_port);
}

/* GET path over HTTP/1.0: the whole response (malloc'd), NULL when nothing answers. */
static char *http_get(int port, const char *path) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                           .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) {
    close(fd);
    return NULL;
  }
  char req[256];
  int n = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n", path);
  ck_assert_int_eq(write(fd, req, (size_t)n), n);
  size_t cap = 1 << 16, len = 0;
  char *buf = malloc(cap);
  ssize_t k;
  while ((k = read(fd, buf + len, cap - len - 1)) > 0) {
    len += (size_t)k;
    if (len + 1 == cap) buf = realloc(buf, cap *= 2);
  }
  buf[len] = '\0';
  close(fd);
  return buf;
}

/* The value of a sample line "name value" in an exposition text; -1 when absent. */
static double sample(const char *text, const char *name) {
  char key[128];
  snprintf(key, sizeof key, "\n%s ", name);
  const char *p = strstr(text, key);
  return p ? atof(p + strlen(key)) : -1;
}

static void promtool_accepts(const char *file) {
  if (system("command -v promtool >/dev/null 2>&1") != 0) {
    fprintf(stderr, "metrics: promtool not installed; exposition not linted\n");
    return;
  }
  char cmd[4200], out[4096];
  snprintf(cmd, sizeof cmd, "promtool check metrics < %s", file);
  int rc = run_capture(cmd, out, sizeof out);
  ck_assert_msg(rc == 0, "promtool check metrics: %s", out);
}

START_TEST(metrics_over_the_socket_and_http_pass_promtool) {
  int port = free_port();
  char listen[64];
  snprintf(listen, sizeof listen, "service.metrics_listen=127.0.0.1:%d", port);
  int pid = dh_start("optim.steps=100000", "checkpoint.every_steps=5", "eval.every_steps=10", listen, NULL);
  dh_wait_step(12, 20);

  /* The protocol command and mococtl print the same format. */
  char cmd[PATH_MAX * 3];
  snprintf(cmd, sizeof cmd, "%s/mococtl -s %s metrics > %s", dh_bin, dh_sock, dh_path("m.txt"));
  ck_assert_int_eq(system(cmd), 0);
  char *text = dh_slurp(dh_path("m.txt"));
  ck_assert_msg(strstr(text, "# TYPE mocod_step gauge") && strstr(text, "mocod_checkpoint_duration_seconds_bucket") &&
                    strstr(text, "mocod_process_resident_memory_bytes") && strstr(text, "mocod_last_knn_accuracy"),
                "%s", text);
  ck_assert(sample(text, "mocod_last_checkpoint_step") >= 5);
  free(text);
  promtool_accepts(dh_path("m.txt"));

  /* HTTP, twice, while training. */
  char *a = http_get(port, "/metrics");
  ck_assert_ptr_nonnull(a);
  ck_assert_msg(strstr(a, "200 OK") && strstr(a, "text/plain; version=0.0.4"), "%.300s", a);
  double s1 = sample(a, "mocod_step");
  dh_wait_step((long long)s1 + 3, 20);
  char *b = http_get(port, "/metrics");
  double s2 = sample(b, "mocod_step");
  ck_assert_msg(s1 >= 12 && s2 > s1, "steps %g then %g", s1, s2);
  FILE *f = fopen(dh_path("h.txt"), "w");
  fputs(strstr(b, "\r\n\r\n") + 4, f);
  fclose(f);
  promtool_accepts(dh_path("h.txt"));
  free(a);
  free(b);
  char *nf = http_get(port, "/other");
  ck_assert_ptr_nonnull(strstr(nf, "404"));
  free(nf);
  dh_stop(pid);
  /* The endpoint goes with the daemon. */
  ck_assert_ptr_null(http_get(port, "/metrics"));
}
END_TEST

START_TEST(bad_listen_address_is_refused_by_name) {
  ck_assert_int_eq(dh_mocod("--set", "service.metrics_listen=nowhere", "-d", NULL), 1);
  char *out = dh_slurp(dh_path("out.txt"));
  ck_assert_msg(strstr(out, "service.metrics_listen: \"nowhere\": expected HOST:PORT"), "%s", out);
  free(out);
}
END_TEST

START_TEST(histogram_buckets_are_cumulative) {
  metrics_snapshot s = {.state = "running", .ckpt_step = -1};
  metrics_observe(&s.eval_seconds, 0.003);
  metrics_observe(&s.eval_seconds, 0.2);
  metrics_observe(&s.eval_seconds, 100);
  char *t = metrics_render(&s);
  ck_assert_ptr_nonnull(strstr(t, "mocod_eval_duration_seconds_bucket{le=\"0.001\"} 0\n"));
  ck_assert_ptr_nonnull(strstr(t, "mocod_eval_duration_seconds_bucket{le=\"0.005\"} 1\n"));
  ck_assert_ptr_nonnull(strstr(t, "mocod_eval_duration_seconds_bucket{le=\"0.25\"} 2\n"));
  ck_assert_ptr_nonnull(strstr(t, "mocod_eval_duration_seconds_bucket{le=\"60\"} 2\n"));
  ck_assert_ptr_nonnull(strstr(t, "mocod_eval_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
  ck_assert_ptr_nonnull(strstr(t, "mocod_eval_duration_seconds_count 3\n"));
  ck_assert_ptr_nonnull(strstr(t, "mocod_state{state=\"running\"} 1\n"));
  ck_assert_ptr_null(strstr(t, "mocod_last_checkpoint_step"));
  free(t);
}
END_TEST

Suite *metrics_suite(void) {
  Suite *s = suite_create("metrics");
  TCase *tc = tcase_create("metrics");
  tcase_add_checked_fixture(tc, dh_setup, dh_teardown);
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, metrics_over_the_socket_and_http_pass_promtool);
  tcase_add_test(tc, bad_listen_address_is_refused_by_name);
  tcase_add_test(tc, histogram_buckets_are_cumulative);
  suite_add_tcase(s, tc);
  return s;
}
