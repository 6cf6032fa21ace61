/* The real daemon: $MOCOD_BIN/mocod on config/tiny.json, each test in its own directory, driven over
 * its socket and through mococtl, killed, corrupted and restarted. */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"
#include "train/checkpoint.h"

/* ---- the environment of one test ---- */

static char bin_dir[PATH_MAX], repo_dir[PATH_MAX], dir[PATH_MAX], sock[PATH_MAX + 32];
static char data_set[PATH_MAX + 32]; /* --set data.dir=<repo>/data */
static double t_start;

/* A fresh directory with the tiny config; the daemon runs with it as working directory, so run/...
 * paths land inside it. */
static void setup(void) {
  const char *b = getenv("MOCOD_BIN");
  ck_assert_msg(realpath(b ? b : "build/bin", bin_dir) != NULL, "MOCOD_BIN: %s", b ? b : "build/bin");
  ck_assert(getcwd(repo_dir, sizeof repo_dir) != NULL);
  snprintf(data_set, sizeof data_set, "data.dir=%s/data", repo_dir);
  snprintf(dir, sizeof dir, "%s", test_tmpdir());
  snprintf(sock, sizeof sock, "%s/run/mocod.sock", dir);
  /* Orphaned daemons (double fork) become our children, so that they can be waited for. */
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  test_reaper_start(); /* kills the daemons a failed test leaves (testutil.h) */
  t_start = clock_now();
}

static void teardown(void) {
  if (getenv("MOCOD_TEST_TIMES")) fprintf(stderr, "%s: %.2f s\n", dir, clock_now() - t_start);
  test_reaper_stop();
  rm_rf(dir);
}

static char *path_in(const char *name) {
  static char buf[4][PATH_MAX + 64];
  static int i;
  i = (i + 1) % 4;
  snprintf(buf[i], sizeof buf[i], "%s/%s", dir, name);
  return buf[i];
}

static char *slurp(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *s = malloc((size_t)n + 1);
  size_t got = fread(s, 1, (size_t)n, f);
  s[got] = '\0';
  fclose(f);
  return s;
}

/* Runs a program of MOCOD_BIN in the test directory with stdout+stderr to out_file, waits for it when
 * wait is set (returns the exit status) or returns its pid. Extra args end with NULL. */
static int run_prog(const char *prog, const char *out_file, int wait, ...) {
  const char *argv[64];
  char exe[PATH_MAX + 16];
  snprintf(exe, sizeof exe, "%s/%s", bin_dir, prog);
  int n = 0;
  argv[n++] = exe;
  va_list ap;
  va_start(ap, wait);
  const char *a;
  while ((a = va_arg(ap, const char *)) && n < 62) argv[n++] = a;
  va_end(ap);
  argv[n] = NULL;
  pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0) {
    if (chdir(dir)) _exit(127);
    int fd = open(out_file ? out_file : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    execv(exe, (char *const *)argv);
    _exit(127);
  }
  if (!wait) return pid;
  int st;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* The config: config/tiny.json with the data directory made absolute, plus overrides. */
static const char *config_path(void) {
  static char p[PATH_MAX + 64];
  snprintf(p, sizeof p, "%s/config/tiny.json", repo_dir);
  return p;
}

#define MOCOD(...) \
  run_prog("mocod", path_in("out.txt"), 1, "-c", config_path(), "--set", data_set, __VA_ARGS__, NULL)

static int read_pid_file(void) {
  char *s = slurp(path_in("run/mocod.pid"));
  int pid = s ? atoi(s) : 0;
  free(s);
  return pid;
}

/* Waits for a pid (our child or, through the subreaper, grandchild) to exit; its status or -1. */
static int wait_exit(int pid, double timeout) {
  double end = clock_now() + timeout;
  while (clock_now() < end) {
    int st;
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (r < 0 && errno == ECHILD) return kill(pid, 0) == 0 ? -1 : 0;
    usleep(5000);
  }
  return -1;
}

/* ---- a socket client ---- */

typedef struct {
  int fd;
  char buf[1 << 20];
  size_t len;
} client;

static client *client_open(void) {
  client *c = calloc(1, sizeof *c);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  ck_assert_int_lt(strlen(sock), sizeof sa.sun_path);
  memcpy(sa.sun_path, sock, strlen(sock) + 1);
  c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ck_assert_msg(connect(c->fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect %s: %s", sock,
                strerror(errno));
  return c;
}

static void client_close(client *c) {
  close(c->fd);
  free(c);
}

static void client_send(client *c, const char *text) {
  size_t n = strlen(text);
  while (n > 0) {
    ssize_t k = send(c->fd, text, n, MSG_NOSIGNAL);
    ck_assert_msg(k > 0, "send: %s", strerror(errno));
    text += k;
    n -= (size_t)k;
  }
}

/* The next line as JSON, within timeout seconds (NULL on timeout or close). */
static json_t *client_line(client *c, double timeout) {
  double end = clock_now() + timeout;
  for (;;) {
    char *nl = memchr(c->buf, '\n', c->len);
    if (nl) {
      *nl = '\0';
      json_t *j = json_loads(c->buf, 0, NULL);
      size_t used = (size_t)(nl - c->buf) + 1;
      memmove(c->buf, nl + 1, c->len - used);
      c->len -= used;
      ck_assert_msg(j != NULL, "a line that is not JSON");
      return j;
    }
    int ms = (int)((end - clock_now()) * 1000);
    if (ms <= 0) return NULL;
    struct pollfd p = {.fd = c->fd, .events = POLLIN};
    if (poll(&p, 1, ms) <= 0) return NULL;
    ssize_t k = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
    if (k <= 0) return NULL;
    c->len += (size_t)k;
  }
}

/* The answer to one request, skipping event lines. */
static json_t *client_call(client *c, const char *line, double timeout) {
  client_send(c, line);
  client_send(c, "\n");
  for (;;) {
    json_t *j = client_line(c, timeout);
    if (!j || !json_object_get(j, "event")) return j;
    json_decref(j);
  }
}

/* One request on a fresh connection; asserts ok and returns the result (owned). */
static json_t *call_ok(const char *line, double timeout) {
  client *c = client_open();
  json_t *a = client_call(c, line, timeout);
  client_close(c);
  ck_assert_msg(a != NULL, "no answer to %s", line);
  ck_assert_msg(json_is_true(json_object_get(a, "ok")), "%s failed: %s", line,
                json_dumps(a, JSON_COMPACT));
  json_t *r = json_incref(json_object_get(a, "result"));
  json_decref(a);
  return r;
}

static const char *error_code(json_t *answer) {
  return json_string_value(json_object_get(json_object_get(answer, "error"), "code"));
}

static long long status_step(void) {
  json_t *r = call_ok("{\"id\":1,\"cmd\":\"status\"}", 5);
  long long s = json_integer_value(json_object_get(r, "step"));
  json_decref(r);
  return s;
}

static void wait_step(long long at_least, double timeout) {
  double end = clock_now() + timeout;
  while (status_step() < at_least) {
    ck_assert_msg(clock_now() < end, "step %lld not reached in %.0f s", at_least, timeout);
    usleep(10000);
  }
}

/* Starts a daemon with -d and the given --set overrides (NULL-terminated); returns its pid. */
static int start_daemon(const char *first, ...) {
  const char *argv[40];
  int n = 0;
  argv[n++] = "-c";
  argv[n++] = config_path();
  argv[n++] = "--set";
  argv[n++] = data_set;
  va_list ap;
  va_start(ap, first);
  for (const char *a = first; a && n < 36; a = va_arg(ap, const char *)) {
    argv[n++] = "--set";
    argv[n++] = a;
  }
  va_end(ap);
  argv[n++] = "-d";
  argv[n] = NULL;
  int rc = run_prog("mocod", path_in("out.txt"), 1, argv[0], argv[1], argv[2], argv[3], argv[4],
                    argv[5], argv[6], argv[7], argv[8], argv[9], argv[10], argv[11], argv[12],
                    argv[13], argv[14], argv[15], argv[16], argv[17], NULL);
  char *out = slurp(path_in("out.txt"));
  ck_assert_msg(rc == 0, "mocod -d failed (%d): %s", rc, out ? out : "");
  free(out);
  int pid = read_pid_file();
  ck_assert_int_gt(pid, 0);
  return pid;
}

static void stop_daemon(int pid) {
  json_t *r = call_ok("{\"id\":1,\"cmd\":\"stop\"}", 20);
  ck_assert_str_eq(json_string_value(json_object_get(r, "state")), "stopped");
  json_decref(r);
  ck_assert_int_eq(wait_exit(pid, 20), 0);
}

/* ---------------------------------------------------------------------------------------------------
 * Tests.
 * ------------------------------------------------------------------------------------------------- */

START_TEST(daemon_returns_only_when_ready_and_socket_is_private) {
  int pid = start_daemon("optim.steps=100000", NULL);
  /* No retry: the socket accepts at once. */
  struct stat st;
  ck_assert_int_eq(stat(sock, &st), 0);
  ck_assert(S_ISSOCK(st.st_mode));
  ck_assert_int_eq(st.st_mode & 0777, 0600);
  json_t *r = call_ok("{\"id\":1,\"cmd\":\"status\"}", 5);
  ck_assert_int_eq(json_integer_value(json_object_get(r, "pid")), pid);
  json_decref(r);
  stop_daemon(pid);
  ck_assert_int_eq(access(sock, F_OK), -1);
  ck_assert_int_eq(access(path_in("run/mocod.pid"), F_OK), -1);
}
END_TEST

/* A descriptor the caller left open does not live on in the daemon: a script that holds a lock on an
 * inherited fd (flock, as a landing script does) gets it back once it closes its own copy. */
START_TEST(daemon_keeps_no_inherited_descriptor) {
  int fd = open(path_in("lock"), O_RDWR | O_CREAT, 0600); /* no O_CLOEXEC: mocod inherits it */
  ck_assert_int_ge(fd, 0);
  ck_assert_int_eq(flock(fd, LOCK_EX), 0);
  int pid = start_daemon("optim.steps=100000", NULL);
  close(fd);
  int again = open(path_in("lock"), O_RDWR | O_CLOEXEC);
  ck_assert_msg(flock(again, LOCK_EX | LOCK_NB) == 0, "the daemon holds the caller's lock: %s", strerror(errno));
  close(again);
  char fds[64], link[PATH_MAX + 64], target[PATH_MAX + 64];
  snprintf(fds, sizeof fds, "/proc/%d/fd", pid);
  DIR *d = opendir(fds);
  ck_assert_ptr_nonnull(d);
  for (struct dirent *de; (de = readdir(d));) {
    snprintf(link, sizeof link, "%s/%s", fds, de->d_name);
    ssize_t n = readlink(link, target, sizeof target - 1);
    target[n > 0 ? n : 0] = '\0';
    ck_assert_msg(n <= 0 || strcmp(target, path_in("lock")), "the daemon has the lock file open as fd %s",
                  de->d_name);
  }
  closedir(d);
  stop_daemon(pid);
}
END_TEST

START_TEST(daemon_failure_is_reported_by_the_parent) {
  /* The socket's directory cannot be created: a regular file is in the way. */
  FILE *f = fopen(path_in("blocker"), "w");
  fclose(f);
  int rc = MOCOD("--set", "service.socket=blocker/mocod.sock", "-d");
  ck_assert_int_ne(rc, 0);
  char *out = slurp(path_in("out.txt"));
  ck_assert_msg(strstr(out, "blocker") != NULL, "no reason given: %s", out);
  free(out);
}
END_TEST

START_TEST(invalid_config_lists_every_problem) {
  int rc = MOCOD("--set", "contrast.temperature=-1", "--set", "optim.batchsize=3", "--check-config");
  ck_assert_int_eq(rc, 2);
  char *out = slurp(path_in("out.txt"));
  ck_assert_msg(strstr(out, "contrast.temperature: value -1 out of range") != NULL, "%s", out);
  ck_assert_msg(strstr(out, "optim.batchsize: unknown key (did you mean 'optim.batch_size'?)") != NULL,
                "%s", out);
  free(out);
  /* Layer lists are checked by building them, each under its own name. */
  ck_assert_int_eq(MOCOD("--set", "model.head=[{\"type\":\"linear\"}]", "--check-config"), 2);
  out = slurp(path_in("out.txt"));
  ck_assert_msg(strstr(out, "model.head[0].out: missing field") != NULL, "%s", out);
  free(out);
  ck_assert_int_eq(MOCOD("--check-config"), 0);
  ck_assert_int_eq(MOCOD("--print-config"), 0);
  out = slurp(path_in("out.txt"));
  json_t *j = json_loads(out, 0, NULL);
  ck_assert_msg(j != NULL, "--print-config is not JSON");
  ck_assert(json_is_integer(json_object_get(json_object_get(j, "contrast"), "queue_size")));
  json_decref(j);
  free(out);
}
END_TEST

START_TEST(every_command_over_the_socket) {
  int pid = start_daemon("optim.steps=100000", "checkpoint.every_steps=0", "checkpoint.every_seconds=0",
                         NULL);
  client *sub = client_open();
  json_t *a = client_call(sub, "{\"id\":7,\"cmd\":\"subscribe\"}", 5);
  ck_assert(json_is_true(json_object_get(a, "ok")));
  ck_assert_int_eq(json_integer_value(json_object_get(a, "id")), 7);
  json_decref(a);

  json_t *r = call_ok("{\"id\":1,\"cmd\":\"config\"}", 5);
  ck_assert(json_is_object(json_object_get(r, "config")));
  ck_assert(json_array_size(json_object_get(r, "runtime_keys")) > 0);
  json_decref(r);
  r = call_ok("{\"id\":1,\"cmd\":\"config\",\"args\":{\"key\":\"optim.lr\"}}", 5);
  ck_assert(json_is_true(json_object_get(r, "runtime")));
  json_decref(r);

  r = call_ok("{\"id\":1,\"cmd\":\"pause\"}", 10);
  ck_assert_str_eq(json_string_value(json_object_get(r, "state")), "paused");
  json_decref(r);
  long long s1 = status_step();
  usleep(200000);
  ck_assert_int_eq(status_step(), s1);
  r = call_ok("{\"id\":1,\"cmd\":\"resume\"}", 10);
  ck_assert_str_eq(json_string_value(json_object_get(r, "state")), "running");
  json_decref(r);
  wait_step(s1 + 2, 10);

  r = call_ok("{\"id\":1,\"cmd\":\"set\",\"args\":{\"optim.lr\":0.01,\"contrast.temperature\":0.3}}", 10);
  ck_assert(json_number_value(json_object_get(json_object_get(r, "changed"), "optim.lr")) == 0.01);
  json_decref(r);
  r = call_ok("{\"id\":1,\"cmd\":\"status\"}", 5);
  ck_assert(fabs(json_number_value(json_object_get(r, "temperature")) - 0.3) < 1e-6);
  json_decref(r);
  client *c = client_open();
  a = client_call(c, "{\"id\":2,\"cmd\":\"set\",\"args\":{\"contrast.queue_size\":64}}", 5);
  ck_assert(json_is_false(json_object_get(a, "ok")));
  ck_assert_str_eq(error_code(a), "bad_args");
  json_decref(a);
  a = client_call(c, "{\"id\":3,\"cmd\":\"set\",\"args\":{\"optim.lr\":-5}}", 5);
  ck_assert_str_eq(error_code(a), "bad_args");
  json_decref(a);
  /* The strategy changes between steps, unless it needs columns the daemon was not built with. */
  a = client_call(c, "{\"id\":4,\"cmd\":\"set\",\"args\":{\"contrast.negatives.strategy\":\"random\","
                     "\"contrast.negatives.num_negatives\":32}}", 10);
  ck_assert(json_is_true(json_object_get(a, "ok")));
  json_decref(a);
  a = client_call(c, "{\"id\":5,\"cmd\":\"set\",\"args\":{\"contrast.negatives.strategy\":\"mixing\"}}", 10);
  ck_assert_str_eq(error_code(a), "state");
  ck_assert_ptr_nonnull(strstr(json_string_value(json_object_get(json_object_get(a, "error"), "message")),
                               "another similarity layout"));
  json_decref(a);
  client_close(c);

  r = call_ok("{\"id\":1,\"cmd\":\"checkpoint\"}", 20);
  const char *file = json_string_value(json_object_get(r, "path"));
  ck_assert_ptr_nonnull(file);
  char full[PATH_MAX + 64];
  snprintf(full, sizeof full, "%s/%s", dir, file);
  ck_assert_int_eq(access(file[0] == '/' ? file : full, R_OK), 0);
  json_decref(r);

  r = call_ok("{\"id\":1,\"cmd\":\"eval\"}", 30);
  ck_assert(json_is_number(json_object_get(r, "knn_acc")));
  ck_assert(json_is_number(json_object_get(r, "alignment")));
  json_decref(r);
  r = call_ok("{\"id\":1,\"cmd\":\"status\"}", 5);
  ck_assert(json_is_object(json_object_get(r, "last_eval")));
  ck_assert(json_is_object(json_object_get(r, "last_checkpoint")));
  json_decref(r);

  r = call_ok("{\"id\":1,\"cmd\":\"export\",\"args\":{\"path\":\"feat.bin\",\"split\":\"eval\"}}", 30);
  ck_assert_int_gt(json_integer_value(json_object_get(r, "rows")), 0);
  ck_assert_int_eq(access(path_in("feat.bin"), R_OK), 0);
  json_decref(r);

  /* The subscriber has seen progress, eval, checkpoint and config_change events. */
  int seen_progress = 0, seen_eval = 0, seen_ckpt = 0, seen_change = 0;
  json_t *ev;
  double until = clock_now() + 10;
  while ((!seen_progress || !seen_eval || !seen_ckpt || seen_change < 4) && clock_now() < until &&
         (ev = client_line(sub, 1.0))) {
    const char *name = json_string_value(json_object_get(ev, "event"));
    ck_assert_ptr_nonnull(name);
    seen_progress += !strcmp(name, "progress");
    seen_eval += !strcmp(name, "eval");
    seen_ckpt += !strcmp(name, "checkpoint");
    seen_change += !strcmp(name, "config_change");
    json_decref(ev);
  }
  ck_assert_int_gt(seen_progress, 0);
  ck_assert_int_gt(seen_eval, 0);
  ck_assert_int_gt(seen_ckpt, 0);
  ck_assert_int_eq(seen_change, 4);
  client_close(sub);
  stop_daemon(pid);
}
END_TEST

START_TEST(mococtl_drives_the_daemon) {
  int pid = start_daemon("optim.steps=100000", NULL);
  ck_assert_int_eq(run_prog("mococtl", path_in("ctl.txt"), 1, "-s", sock, "status", NULL), 0);
  char *out = slurp(path_in("ctl.txt"));
  ck_assert_msg(strstr(out, "running") != NULL, "%s", out);
  free(out);
  ck_assert_int_eq(run_prog("mococtl", path_in("ctl.txt"), 1, "-s", sock, "--json", "status", NULL), 0);
  out = slurp(path_in("ctl.txt"));
  json_t *j = json_loads(out, 0, NULL);
  ck_assert_msg(j != NULL, "--json status is not JSON: %s", out);
  json_decref(j);
  free(out);
  ck_assert_int_eq(run_prog("mococtl", NULL, 1, "-s", sock, "pause", NULL), 0);
  ck_assert_int_eq(run_prog("mococtl", NULL, 1, "-s", sock, "resume", NULL), 0);
  ck_assert_int_eq(run_prog("mococtl", NULL, 1, "-s", sock, "set", "optim.lr=0.02", NULL), 0);
  ck_assert_int_eq(run_prog("mococtl", path_in("ctl.txt"), 1, "-s", sock, "set", "model.embed_dim=8", NULL), 1);
  out = slurp(path_in("ctl.txt"));
  ck_assert_msg(strstr(out, "cannot change while training") != NULL, "%s", out);
  free(out);
  ck_assert_int_eq(run_prog("mococtl", NULL, 1, "-s", sock, "config", NULL), 0);
  ck_assert_int_eq(run_prog("mococtl", NULL, 1, "-s", sock, "checkpoint", NULL), 0);
  ck_assert_int_eq(run_prog("mococtl", NULL, 1, "-s", sock, "eval", NULL), 0);
  ck_assert_int_eq(run_prog("mococtl", NULL, 1, "-s", sock, "raw", "{\"id\":1,\"cmd\":\"status\"}", NULL), 0);
  ck_assert_int_eq(run_prog("mococtl", NULL, 1, "-s", sock, "stop", NULL), 0);
  ck_assert_int_eq(wait_exit(pid, 20), 0);
  ck_assert_int_eq(run_prog("mococtl", NULL, 1, "-s", sock, "status", NULL), 2);
}
END_TEST

START_TEST(watch_follows_training_to_the_end) {
  int pid = start_daemon("service.exit_on_finish=true", NULL);
  ck_assert_int_eq(run_prog("mococtl", path_in("watch.txt"), 1, "-s", sock, "watch", NULL), 0);
  char *out = slurp(path_in("watch.txt"));
  ck_assert_msg(strstr(out, "loss") != NULL, "%s", out);
  free(out);
  ck_assert_int_eq(wait_exit(pid, 30), 0);
}
END_TEST

/* The loop answers while a step computes, from the snapshot of the last finished step. Steps of the
 * larger batch run on a worker thread; a status request that arrives meanwhile says "pending": 1 (the
 * step was still computing when the answer was made, which a loop that waited for steps could never
 * say) and the step of the newest progress event on the same connection (log.every_steps=1: the event
 * of step s goes out before step s + 1 starts). Nothing is timed: the deadline is a liveness bound.
 * The latency figures are tests/bench/bench_status.c's. */
START_TEST(status_answers_while_a_step_computes) {
  int pid = start_daemon("optim.steps=100000", "optim.batch_size=256", "contrast.queue_size=1024",
                         "log.every_steps=1", "checkpoint.every_steps=0", "eval.every_steps=0", NULL);
  wait_step(2, 30);
  client *c = client_open();
  client_send(c, "{\"id\":0,\"cmd\":\"subscribe\"}\n");
  long long event_step = -1, first = -1, last = -1;
  int during = 0, answers = 0;
  double end = clock_now() + 40;
  while ((during < 20 || last < first + 2) && clock_now() < end) {
    client_send(c, "{\"id\":1,\"cmd\":\"status\"}\n");
    json_t *a;
    while ((a = client_line(c, 10)) && json_object_get(a, "event")) {
      if (!strcmp(json_string_value(json_object_get(a, "event")), "progress"))
        event_step = json_integer_value(json_object_get(a, "step"));
      json_decref(a);
    }
    ck_assert_msg(a != NULL, "no answer to status");
    if (json_integer_value(json_object_get(a, "id")) == 1) {
      json_t *r = json_object_get(a, "result");
      ck_assert_str_eq(json_string_value(json_object_get(r, "state")), "running");
      long long step = json_integer_value(json_object_get(r, "step"));
      ck_assert_int_ge(step, last);
      if (json_integer_value(json_object_get(r, "pending")) > 0 && event_step >= 0) {
        ck_assert_msg(step == event_step, "answered during a step with step %lld, the last finished is %lld",
                      step, event_step);
        during++;
      }
      if (first < 0) first = step;
      last = step;
      answers++;
    }
    json_decref(a);
  }
  client_close(c);
  ck_assert_msg(during >= 20, "%d of %d status answers were made while a step computed", during, answers);
  ck_assert_msg(last >= first + 2, "training did not advance while status was asked (%lld)", first);
  stop_daemon(pid);
}
END_TEST

START_TEST(bad_clients_harm_nobody) {
  int pid = start_daemon("optim.steps=100000", NULL);
  client *c = client_open();
  json_t *a = client_call(c, "{not json", 5);
  ck_assert_str_eq(error_code(a), "bad_json");
  json_decref(a);
  a = client_call(c, "{\"id\":1,\"cmd\":\"fly\"}", 5);
  ck_assert_str_eq(error_code(a), "unknown_command");
  json_decref(a);
  a = client_call(c, "{\"id\":1,\"cmd\":\"eval\",\"args\":{\"probe\":\"yes\"}}", 5);
  ck_assert_str_eq(error_code(a), "bad_args");
  json_decref(a);
  a = client_call(c, "{\"id\":1,\"cmd\":\"export\",\"args\":{\"path\":\"x\",\"split\":\"dev\"}}", 5);
  ck_assert_str_eq(error_code(a), "bad_args");
  json_decref(a);
  /* Over 64 KiB in one line. */
  size_t big = 70 * 1024;
  char *line = malloc(big + 1);
  memset(line, 'x', big);
  line[big] = '\0';
  client_send(c, line);
  free(line);
  a = client_call(c, "", 5);
  ck_assert_ptr_nonnull(a);
  ck_assert_str_eq(error_code(a), "line_too_long");
  json_decref(a);
  a = client_call(c, "{\"id\":9,\"cmd\":\"status\"}", 5);
  ck_assert(json_is_true(json_object_get(a, "ok")));
  json_decref(a);
  client_close(c);

  /* Half a request, then gone; a request and gone before the answer; a subscriber that never reads. */
  c = client_open();
  client_send(c, "{\"id\":1,\"cmd\":\"sta");
  client_close(c);
  c = client_open();
  client_send(c, "{\"id\":1,\"cmd\":\"eval\"}\n");
  client_close(c);
  client *lazy = client_open();
  client_send(lazy, "{\"id\":1,\"cmd\":\"subscribe\"}\n");
  for (int i = 0; i < 20; i++) {
    client *p = client_open();
    client_send(p, "{\"id\":1,\"cmd\":\"status\"}\n{\"id\":2,\"cmd\":\"status\"}\n");
    client_close(p);
  }
  long long s = status_step();
  wait_step(s + 3, 10);
  client_close(lazy);
  stop_daemon(pid);
}
END_TEST

START_TEST(second_instance_is_refused) {
  int pid = start_daemon("optim.steps=100000", NULL);
  int rc = MOCOD("--set", "optim.steps=100000", "-d");
  ck_assert_int_ne(rc, 0);
  char *out = slurp(path_in("out.txt"));
  ck_assert_msg(strstr(out, "another mocod") && strstr(out, "is running"), "%s", out);
  free(out);
  /* Same socket under another pid file: the socket is in use. */
  rc = MOCOD("--set", "optim.steps=100000", "--set", "service.pid_file=run/other.pid", "-d");
  ck_assert_int_ne(rc, 0);
  out = slurp(path_in("out.txt"));
  ck_assert_msg(strstr(out, "in use"), "%s", out);
  free(out);
  json_t *r = call_ok("{\"id\":1,\"cmd\":\"status\"}", 5);
  ck_assert_int_eq(json_integer_value(json_object_get(r, "pid")), pid);
  json_decref(r);
  stop_daemon(pid);
}
END_TEST

/* The step of the newest checkpoint event in the progress log. */
static long long last_checkpoint_step(void) {
  char *text = slurp(path_in("run/progress.jsonl"));
  long long step = -1;
  for (char *l = strtok(text, "\n"); l; l = strtok(NULL, "\n")) {
    json_t *j = json_loads(l, 0, NULL);
    if (j && !strcmp(json_string_value(json_object_get(j, "event")), "checkpoint"))
      step = json_integer_value(json_object_get(j, "step"));
    json_decref(j);
  }
  free(text);
  return step;
}

START_TEST(sigkill_then_resume_loses_only_steps_since_checkpoint) {
  int pid = start_daemon("optim.steps=100000", "checkpoint.every_steps=5", NULL);
  wait_step(12, 20);
  kill(pid, SIGKILL);
  ck_assert_int_eq(wait_exit(pid, 10), 128 + SIGKILL);
  /* The newest complete checkpoint on disk: the kill may land between a checkpoint's rename and its
   * progress event, so the log's newest checkpoint event can be one behind. */
  checkpoint_file f;
  ck_assert_int_eq(checkpoint_read_latest(&f, path_in("run/checkpoints"), NULL, NULL), 0);
  long long ck = f.step;
  checkpoint_file_free(&f);
  ck_assert_int_ge(ck, last_checkpoint_step());
  ck_assert_int_ge(ck, 10);
  /* The socket and the pid file are left behind, stale. */
  ck_assert_int_eq(access(sock, F_OK), 0);
  ck_assert_int_eq(access(path_in("run/mocod.pid"), F_OK), 0);
  pid = start_daemon("optim.steps=100000", "checkpoint.every_steps=5", "log.every_steps=1000", NULL);
  char *log = slurp(path_in("run/mocod.log"));
  ck_assert_msg(strstr(log, "stale pid file"), "%s", log);
  free(log);
  json_t *r = call_ok("{\"id\":1,\"cmd\":\"pause\"}", 10);
  json_decref(r);
  /* The first event of this run says where it resumed. */
  char *text = slurp(path_in("run/progress.jsonl"));
  char *start = strrchr(text, '\n');
  for (char *p = text; (p = strstr(p, "{\"event\":\"start\"")); p++) start = p;
  json_error_t e;
  json_t *ev = json_loadb(start, strcspn(start, "\n"), 0, &e);
  ck_assert_ptr_nonnull(ev);
  ck_assert_int_eq(json_integer_value(json_object_get(ev, "step")), ck);
  ck_assert_ptr_nonnull(json_string_value(json_object_get(ev, "resumed_from")));
  json_decref(ev);
  free(text);
  stop_daemon(pid);
}
END_TEST

START_TEST(damaged_newest_checkpoint_falls_back_with_a_warning) {
  int pid = start_daemon("optim.steps=100000", "checkpoint.every_steps=0", NULL);
  wait_step(2, 10);
  json_t *r = call_ok("{\"id\":1,\"cmd\":\"checkpoint\"}", 20);
  long long first = json_integer_value(json_object_get(r, "step"));
  json_decref(r);
  wait_step(first + 2, 10);
  stop_daemon(pid);
  long long newest = last_checkpoint_step();
  ck_assert_int_gt(newest, first);
  char name[64];
  snprintf(name, sizeof name, "run/checkpoints/ckpt-%012lld.mcp", newest);
  struct stat st;
  ck_assert_int_eq(stat(path_in(name), &st), 0);
  ck_assert_int_eq(truncate(path_in(name), st.st_size / 2), 0);
  pid = start_daemon("optim.steps=100000", NULL);
  r = call_ok("{\"id\":1,\"cmd\":\"pause\"}", 10);
  json_decref(r);
  char *log = slurp(path_in("run/mocod.log"));
  ck_assert_msg(strstr(log, "skipping damaged checkpoint"), "%s", log);
  free(log);
  r = call_ok("{\"id\":1,\"cmd\":\"status\"}", 5);
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(r, "last_checkpoint"), "step")),
                   first);
  json_decref(r);
  stop_daemon(pid);
}
END_TEST

START_TEST(progress_file_parses_line_by_line) {
  int pid = start_daemon("service.exit_on_finish=true", "log.every_steps=2", NULL);
  ck_assert_int_eq(wait_exit(pid, 60), 0);
  char *text = slurp(path_in("run/progress.jsonl"));
  ck_assert_ptr_nonnull(text);
  static const char *fields[] = {"step", "total_steps", "epoch", "loss", "lr", "temperature", "momentum",
                                 "pos_sim", "neg_sim", "hardest_neg_sim", "inst_acc", "negatives",
                                 "filtered", "fn_rate", "hardness", "samples_per_sec", "eta_sec", "time",
                                 NULL};
  int n = 0, progress = 0, start = 0, stop = 0, eval = 0, ckpt = 0;
  for (char *l = strtok(text, "\n"); l; l = strtok(NULL, "\n")) {
    json_error_t e;
    json_t *j = json_loads(l, 0, &e);
    ck_assert_msg(j != NULL, "line %d does not parse: %s", n + 1, e.text);
    const char *ev = json_string_value(json_object_get(j, "event"));
    ck_assert_ptr_nonnull(ev);
    ck_assert(json_is_number(json_object_get(j, "time")));
    if (!strcmp(ev, "progress")) {
      for (int i = 0; fields[i]; i++)
        ck_assert_msg(json_object_get(j, fields[i]) != NULL, "progress without %s", fields[i]);
      progress++;
    }
    start += !strcmp(ev, "start");
    stop += !strcmp(ev, "stop");
    eval += !strcmp(ev, "eval");
    ckpt += !strcmp(ev, "checkpoint");
    json_decref(j);
    n++;
  }
  free(text);
  ck_assert_int_eq(start, 1);
  ck_assert_int_eq(stop, 1);
  ck_assert_int_gt(progress, 2);
  ck_assert_int_ge(eval, 1);
  ck_assert_int_ge(ckpt, 1);
}
END_TEST

START_TEST(signals_stop_with_checkpoint_and_reopen_logs) {
  int pid = start_daemon("optim.steps=100000", "checkpoint.every_steps=0", NULL);
  wait_step(2, 10);
  ck_assert_int_eq(rename(path_in("run/mocod.log"), path_in("run/mocod.log.1")), 0);
  kill(pid, SIGHUP);
  double end = clock_now() + 5;
  while (access(path_in("run/mocod.log"), F_OK) && clock_now() < end) usleep(10000);
  ck_assert_int_eq(access(path_in("run/mocod.log"), F_OK), 0);
  kill(pid, SIGTERM);
  ck_assert_int_eq(wait_exit(pid, 20), 0);
  ck_assert_int_gt(last_checkpoint_step(), 0);
  char *log = slurp(path_in("run/mocod.log"));
  ck_assert_msg(strstr(log, "received SIGTERM") && strstr(log, "checkpoint at step"), "%s", log);
  free(log);
}
END_TEST

/* The trainer's sections of a checkpoint: between the header and the config record. */
static char *trainer_bytes(const char *file, size_t *len) {
  char *all = slurp(file);
  ck_assert_ptr_nonnull(all);
  struct stat st;
  stat(file, &st);
  /* header section: tag 4 + len 8 + payload (4 + 8 + 8) + crc 4 */
  size_t start = 4 + 8 + 20 + 4;
  char *conf = memmem(all, (size_t)st.st_size, "CONF", 4);
  ck_assert_ptr_nonnull(conf);
  *len = (size_t)(conf - all) - start;
  char *out = malloc(*len);
  memcpy(out, all + start, *len);
  free(all);
  return out;
}

START_TEST(resume_is_exact) {
  const char *steps = "optim.steps=48";
  /* Straight through. */
  int pid = start_daemon(steps, "service.exit_on_finish=true", "checkpoint.dir=straight", NULL);
  ck_assert_int_eq(wait_exit(pid, 60), 0);
  /* Stopped part-way (wherever the stop lands), then resumed to the end. On a loaded host the stop can
   * land after the last step (the client was not scheduled while tiny steps ran on): that run proves
   * nothing, so the split starts over in a fresh directory, three times at most. */
  char ckdir[32] = "";
  long long mid = 48;
  for (int attempt = 0; attempt < 3 && mid >= 48; attempt++) {
    snprintf(ckdir, sizeof ckdir, "checkpoint.dir=split%d", attempt);
    pid = start_daemon(steps, ckdir, NULL);
    wait_step(7, 20);
    stop_daemon(pid);
    mid = last_checkpoint_step();
  }
  ck_assert_msg(mid < 48, "three stops sent at step 7 all landed after the last step");
  pid = start_daemon(steps, "service.exit_on_finish=true", ckdir, NULL);
  ck_assert_int_eq(wait_exit(pid, 60), 0);
  char split[48];
  snprintf(split, sizeof split, "%s/ckpt-000000000048.mcp", ckdir + strlen("checkpoint.dir="));
  size_t la, lb;
  char *a = trainer_bytes(path_in("straight/ckpt-000000000048.mcp"), &la);
  char *b = trainer_bytes(path_in(split), &lb);
  ck_assert_uint_eq(la, lb);
  ck_assert_msg(memcmp(a, b, la) == 0, "resumed run differs from the straight one (stopped at %lld)", mid);
  free(a);
  free(b);
}
END_TEST

/* The step of the start event of the newest run in the progress log. */
static long long last_start_step(void) {
  char *text = slurp(path_in("run/progress.jsonl"));
  long long step = -1;
  for (char *l = strtok(text, "\n"); l; l = strtok(NULL, "\n")) {
    json_t *j = json_loads(l, 0, NULL);
    if (j && !strcmp(json_string_value(json_object_get(j, "event")), "start"))
      step = json_integer_value(json_object_get(j, "step"));
    json_decref(j);
  }
  free(text);
  return step;
}

START_TEST(resume_flags_choose_where_to_start) {
  /* --resume with nothing to resume from is an error, said at once. */
  int rc = MOCOD("--resume", "--set", "service.exit_on_finish=true");
  ck_assert_int_eq(rc, 1);
  char *out = slurp(path_in("out.txt"));
  ck_assert_msg(strstr(out, "no checkpoint"), "%s", out);
  free(out);
  ck_assert_int_eq(MOCOD("--set", "optim.steps=6", "--set", "service.exit_on_finish=true"), 0);
  /* By default a finished run resumes at its end; --no-resume starts over. */
  ck_assert_int_eq(MOCOD("--set", "optim.steps=6", "--set", "service.exit_on_finish=true"), 0);
  ck_assert_int_eq(last_start_step(), 6);
  ck_assert_int_eq(MOCOD("--no-resume", "--set", "optim.steps=6", "--set", "service.exit_on_finish=true"), 0);
  ck_assert_int_eq(last_start_step(), 0);
}
END_TEST

/* What a shipped config's run must show in its progress event after two steps of batch B = 128 with
 * queue_size 256 and num_negatives 16 (the event averages steps 1 and 2: the queue holds no key at step
 * 1 and B at step 2, so "all candidates" averages F = 64 and n = 16 averages 8). Values < 0: not
 * asserted. */
typedef struct {
  const char *name;
  double negatives, filtered, hardness, temperature;
} config_expect;

static const config_expect shipped[] = {
    {"default", 8, 0, 1, 0.1},     /* hardest, n = 16 */
    {"moco", 64, 0, 1, 0.1},       /* all */
    {"random", 8, 0, 1, 0.1},      /* n = 16 at random */
    {"semi-hard", -1, 0, 1, 0.1},  /* at most n: rows whose band and the hardest below hold fewer */
    {"band", 16, 0, 1, 0.1},       /* ranks [floor(0.02 B), floor(0.27 B)) = [2, 34) at step 2 */
    {"mixing", 448, 0, 1, 0.1},    /* every candidate and 512 + 256 synthetic at step 2: (0 + 896) / 2 */
    {"adversarial", 256, 0, 1, 0.1}, /* the whole bank (bank_size 256) at both steps, no queue */
    {"hcl", 64, 0, 1, 0.1},        /* all, HCL loss */
    {"triplet", 8, 0, 1, 0.1},     /* hardest n = 16, triplet loss */
    {"simclr", 318, 0, 1, 0.5},    /* the other 2(B - 1) views plus the queue: 254 + 64; tau 0.5 */
    /* curriculum: at step index 1 of 2 (progress 0.5), past warm-up 0.1, cosine: (1 - cos(pi 0.4/0.9))/2;
     * n(h) = 4096^(1-h) 16^h > B, so every candidate */
    {"curriculum", 64, 0, -1, 0.1},
    {"dynamic", 64, 0, -1, 0.1},   /* starts at 0.5 and moves at most max_step 0.01 per step */
    {"guards", 8, 0.5, 1, 0.1},    /* hardest 16 and floor(0.01 B) = 1 suspect per query at step 2 */
    {"guard-skip", 8, 0.5, 1, 0.1}, /* the same suspects, dropped instead of kept as positives */
    {"guard-ceiling", -1, -1, 1, 0.1}, /* hardest 16 of the keys below the query's own similarity: at
                                          most n where a row has many suspects; suspects: as the data has */
};

/* The last progress event of a run's progress log. */
static json_t *last_progress(const char *log) {
  char *text = slurp(path_in(log));
  ck_assert_msg(text != NULL, "%s: no progress log", log);
  json_t *last = NULL;
  for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
    json_t *j = json_loads(line, 0, NULL);
    if (j && !strcmp(json_string_value(json_object_get(j, "event")), "progress")) {
      json_decref(last);
      last = j;
    } else {
      json_decref(j);
    }
  }
  free(text);
  ck_assert_msg(last != NULL, "%s: no progress event", log);
  return last;
}

static double field(json_t *ev, const char *key) { return json_number_value(json_object_get(ev, key)); }

/* Runs config/<shipped[i].name>.json for two steps and checks its progress event against shipped[i];
 * returns the event's loss. */
static double run_shipped(size_t i) {
  const config_expect *x = &shipped[i];
  json_error_t e;
  json_t *tiny = json_load_file(config_path(), 0, &e);
  ck_assert_ptr_nonnull(tiny);
  json_t *model = json_object_get(tiny, "model");
  char *backbone = json_dumps(json_object_get(model, "backbone"), JSON_COMPACT);
  char *head = json_dumps(json_object_get(model, "head"), JSON_COMPACT);
  char set_backbone[2048], set_head[1024];
  snprintf(set_backbone, sizeof set_backbone, "model.backbone=%s", backbone);
  snprintf(set_head, sizeof set_head, "model.head=%s", head);
  free(backbone);
  free(head);
  json_decref(tiny);
  char cfg[PATH_MAX + 64], ck[64], log[64], set_log[96];
  snprintf(cfg, sizeof cfg, "%s/config/%s.json", repo_dir, x->name);
  snprintf(ck, sizeof ck, "checkpoint.dir=ck-%s", x->name);
  snprintf(log, sizeof log, "progress-%s.jsonl", x->name);
  snprintf(set_log, sizeof set_log, "log.progress=%s", log);
  int rc = run_prog("mocod", path_in("out.txt"), 1, "-c", cfg, "--set", data_set, "--set",
                    "data.train=fmnist-train-images-idx3-ubyte.gz", "--set",
                    "data.eval=", "--set", set_backbone, "--set", set_head,
                    "--set", "model.embed_dim=16", "--set", "optim.batch_size=128", "--set", "optim.steps=2",
                    "--set", "contrast.queue_size=256", "--set", "contrast.shuffle_bn_groups=2", "--set",
                    "contrast.negatives.bank_size=256", "--set", "contrast.negatives.num_negatives=16",
                    "--set", "threads=1", "--set", "service.exit_on_finish=true", "--set", ck, "--set",
                    set_log, NULL);
  char *out = slurp(path_in("out.txt"));
  ck_assert_msg(rc == 0, "config/%s.json: exit %d: %s", x->name, rc, out ? out : "");
  free(out);
  json_t *ev = last_progress(log);
  ck_assert_int_eq(json_integer_value(json_object_get(ev, "step")), 2);
  double negs = field(ev, "negatives"), h = field(ev, "hardness"), loss = field(ev, "loss");
  ck_assert_msg(isfinite(loss) && loss >= 0, "%s: loss %g", x->name, loss);
  if (x->negatives >= 0)
    ck_assert_msg(negs == x->negatives, "%s: %g negatives per query, want %g", x->name, negs, x->negatives);
  else
    ck_assert_msg(negs > 7 && negs <= 8, "%s: %g negatives per query, want (7, 8]", x->name, negs);
  if (x->filtered >= 0)
    ck_assert_msg(field(ev, "filtered") == x->filtered, "%s: filtered %g, want %g", x->name,
                  field(ev, "filtered"), x->filtered);
  ck_assert_msg(fabs(field(ev, "temperature") - x->temperature) < 1e-6, "%s: temperature %g", x->name,
                field(ev, "temperature"));
  if (x->hardness >= 0) ck_assert_msg(h == x->hardness, "%s: hardness %g", x->name, h);
  if (!strcmp(x->name, "curriculum"))
    ck_assert_msg(fabs(h - (1 - cos(M_PI * 0.4 / 0.9)) / 2) < 1e-5, "curriculum: hardness %g", h);
  if (!strcmp(x->name, "dynamic")) ck_assert_msg(fabs(h - 0.5) <= 0.02 + 1e-6, "dynamic: hardness %g", h);
  json_decref(ev);
  return loss;
}

static size_t shipped_index(const char *name) {
  size_t i = 0;
  while (strcmp(shipped[i].name, name)) i++;
  return i;
}

/* Every shipped config trains, and its strategy and loss are the ones that ran: the progress event's
 * negatives per query, filtered count, hardness and temperature are what the config's strategy gives
 * (config_expect), and the loss is the configured one (HCL and triplet differ from InfoNCE on the
 * same state; triplet's hinge is below 2 + margin). Two steps each, on the sample data with the tiny
 * network (the shipped networks are sized for the full data set and a longer budget) and no
 * evaluation split (the final kNN evaluation over the whole training set would cost 5x the run). One
 * config per iteration of the loop test, each within its own timeout: all of them in one test passed
 * a minute under ASan on a loaded 2-core machine. */
START_TEST(shipped_config_runs_its_strategy_and_loss) {
  const char *name = shipped[_i].name;
  double loss = run_shipped((size_t)_i);
  /* moco (InfoNCE) and hcl run the same steps up to the loss, default (InfoNCE) and triplet the same
   * selection: equal losses would mean the configured loss did not run. */
  if (!strcmp(name, "hcl")) {
    double infonce = run_shipped(shipped_index("moco"));
    ck_assert_msg(fabs(loss - infonce) > 1e-4, "hcl loss %g equals InfoNCE's %g", loss, infonce);
  }
  if (!strcmp(name, "triplet")) {
    double infonce = run_shipped(shipped_index("default"));
    ck_assert_msg(fabs(loss - infonce) > 1e-2 && loss <= 2.2, "triplet loss %g (InfoNCE %g)", loss, infonce);
  }
}
END_TEST

/* The reference in docs/config.md is generated from the schema; a change to the schema regenerates it
 * (build/bin/mocod --config-doc > docs/config.md). */
START_TEST(config_reference_is_current) {
  ck_assert_int_eq(run_prog("mocod", path_in("doc.md"), 1, "--config-doc", NULL), 0);
  char ref[PATH_MAX + 32];
  snprintf(ref, sizeof ref, "%s/docs/config.md", repo_dir);
  char *want = slurp(path_in("doc.md")), *have = slurp(ref);
  ck_assert_msg(have != NULL, "docs/config.md is missing");
  ck_assert_msg(!strcmp(want, have), "docs/config.md is stale: regenerate with mocod --config-doc");
  free(want);
  free(have);
}
END_TEST

Suite *daemon_suite(void) {
  Suite *s = suite_create("daemon");
  TCase *tc = tcase_create("daemon");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, daemon_returns_only_when_ready_and_socket_is_private);
  tcase_add_test(tc, daemon_keeps_no_inherited_descriptor);
  tcase_add_test(tc, daemon_failure_is_reported_by_the_parent);
  tcase_add_test(tc, invalid_config_lists_every_problem);
  tcase_add_test(tc, every_command_over_the_socket);
  tcase_add_test(tc, mococtl_drives_the_daemon);
  tcase_add_test(tc, watch_follows_training_to_the_end);
  tcase_add_test(tc, status_answers_while_a_step_computes);
  tcase_add_test(tc, bad_clients_harm_nobody);
  tcase_add_test(tc, second_instance_is_refused);
  tcase_add_test(tc, sigkill_then_resume_loses_only_steps_since_checkpoint);
  tcase_add_test(tc, damaged_newest_checkpoint_falls_back_with_a_warning);
  tcase_add_test(tc, progress_file_parses_line_by_line);
  tcase_add_test(tc, signals_stop_with_checkpoint_and_reopen_logs);
  tcase_add_test(tc, resume_is_exact);
  tcase_add_test(tc, resume_flags_choose_where_to_start);
  tcase_add_loop_test(tc, shipped_config_runs_its_strategy_and_loss, 0,
                      (int)(sizeof shipped / sizeof *shipped));
  tcase_add_test(tc, config_reference_is_current);
  suite_add_tcase(s, tc);
  return s;
}
