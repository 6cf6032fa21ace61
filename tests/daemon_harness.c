#include "daemon_harness.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

int dh_standalone;

/* A failed expectation: check's failure inside a test, a message and exit outside one (benchmarks;
 * check's macros cannot even pass outside its runner). */
#define DH_ASSERT(cond, ...)                                              \
  do {                                                                    \
    if (!(cond)) dh_fail(__FILE__, __LINE__, #cond, " " __VA_ARGS__);     \
  } while (0)

static void dh_fail(const char *file, int line, const char *cond, const char *fmt, ...)
    __attribute__((format(printf, 4, 5), noreturn));
static void dh_fail(const char *file, int line, const char *cond, const char *fmt, ...) {
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (!dh_standalone) ck_abort_msg("%s:%d: %s %s", file, line, cond, msg);
  fprintf(stderr, "%s:%d: %s failed %s\n", file, line, cond, msg);
  exit(1);
}

char dh_bin[PATH_MAX], dh_repo[PATH_MAX], dh_dir[PATH_MAX], dh_sock[PATH_MAX + 32];
static char data_set[PATH_MAX + 32]; /* data.dir=<repo>/data */
static char config[PATH_MAX + 32];

void dh_setup(void) {
  const char *b = getenv("MOCOD_BIN");
  DH_ASSERT(realpath(b ? b : "build/bin", dh_bin) != NULL, "MOCOD_BIN: %s", b ? b : "build/bin");
  DH_ASSERT(getcwd(dh_repo, sizeof dh_repo) != NULL);
  snprintf(data_set, sizeof data_set, "data.dir=%s/data", dh_repo);
  snprintf(config, sizeof config, "%s/config/tiny.json", dh_repo);
  snprintf(dh_dir, sizeof dh_dir, "%s", test_tmpdir());
  snprintf(dh_sock, sizeof dh_sock, "%s/run/mocod.sock", dh_dir);
  /* Orphaned daemons (double fork) become our children, so that they can be waited for. */
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  test_reaper_start();
}

/* Daemons a test left running (it failed before stopping them) are killed before their directory
 * goes; the reaper does the same when the test never gets here (testutil.h). */
void dh_teardown(void) {
  test_reaper_stop();
  rm_rf(dh_dir);
}

char *dh_path(const char *name) {
  static char buf[8][PATH_MAX + 64];
  static int i;
  i = (i + 1) % 8;
  snprintf(buf[i], sizeof buf[i], "%s/%s", dh_dir, name);
  return buf[i];
}

char *dh_slurp(const char *path) {
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

/* Runs mocod with argv (after the config and data arguments) in the test directory. */
static int run_mocod(const char *const *args, int wait) {
  const char *argv[128];
  char exe[PATH_MAX + 16];
  snprintf(exe, sizeof exe, "%s/mocod", dh_bin);
  int n = 0;
  argv[n++] = exe;
  argv[n++] = "-c";
  argv[n++] = config;
  argv[n++] = "--set";
  argv[n++] = data_set;
  for (int i = 0; args[i] && n < 126; i++) argv[n++] = args[i];
  argv[n] = NULL;
  pid_t pid = fork();
  DH_ASSERT(pid >= 0);
  if (pid == 0) {
    if (chdir(dh_dir)) _exit(127);
    int fd = open(dh_path("out.txt"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
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

int dh_mocod(const char *first, ...) {
  const char *args[100];
  int n = 0;
  va_list ap;
  va_start(ap, first);
  for (const char *a = first; a && n < 99; a = va_arg(ap, const char *)) args[n++] = a;
  va_end(ap);
  args[n] = NULL;
  return run_mocod(args, 1);
}

static int read_pid_file(void) {
  char *s = dh_slurp(dh_path("run/mocod.pid"));
  int pid = s ? atoi(s) : 0;
  free(s);
  return pid;
}

int dh_start_argv(int *pid, const char *const *args) {
  const char *a[100];
  int n = 0;
  for (int i = 0; args[i] && n < 98; i++) a[n++] = args[i];
  a[n++] = "-d";
  a[n] = NULL;
  int rc = run_mocod(a, 1);
  if (pid) *pid = rc == 0 ? read_pid_file() : 0;
  return rc;
}

int dh_start(const char *first, ...) {
  const char *args[100];
  int n = 0;
  va_list ap;
  va_start(ap, first);
  for (const char *a = first; a && n < 96; a = va_arg(ap, const char *)) {
    args[n++] = "--set";
    args[n++] = a;
  }
  va_end(ap);
  args[n] = NULL;
  int pid = 0, rc = dh_start_argv(&pid, args);
  char *out = dh_slurp(dh_path("out.txt"));
  DH_ASSERT(rc == 0 && pid > 0, "mocod -d failed (%d): %s", rc, out ? out : "");
  free(out);
  return pid;
}

int dh_wait_exit(int pid, double timeout) {
  double end = clock_now() + timeout;
  while (clock_now() < end) {
    int st;
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (r < 0 && errno == ECHILD) return kill(pid, 0) == 0 ? -1 : 0;
    usleep(2000);
  }
  return -1;
}

void dh_stop(int pid) {
  json_t *r = dh_call_ok("{\"id\":1,\"cmd\":\"stop\"}", 20);
  const char *state = json_string_value(json_object_get(r, "state"));
  DH_ASSERT(state && !strcmp(state, "stopped"), "state %s", state ? state : "(none)");
  json_decref(r);
  int rc = dh_wait_exit(pid, 20);
  DH_ASSERT(rc == 0, "exit status %d", rc);
}

/* ---- a socket client ---- */

struct dh_client {
  int fd;
  size_t len;
  char buf[1 << 20];
};

dh_client *dh_client_open(int must_connect) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  DH_ASSERT(strlen(dh_sock) < sizeof sa.sun_path);
  memcpy(sa.sun_path, dh_sock, strlen(dh_sock) + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  DH_ASSERT(fd >= 0);
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    DH_ASSERT(!must_connect, "connect %s: %s", dh_sock, strerror(errno));
    close(fd);
    return NULL;
  }
  dh_client *c = malloc(sizeof *c);
  DH_ASSERT(c != NULL);
  c->fd = fd;
  c->len = 0;
  return c;
}

void dh_client_close(dh_client *c) {
  if (!c) return;
  close(c->fd);
  free(c);
}

int dh_client_fd(const dh_client *c) { return c->fd; }

int dh_client_send(dh_client *c, const char *text) {
  size_t n = strlen(text);
  while (n > 0) {
    ssize_t k = send(c->fd, text, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    text += k;
    n -= (size_t)k;
  }
  return 0;
}

json_t *dh_client_line(dh_client *c, double timeout) {
  double end = clock_now() + timeout;
  for (;;) {
    char *nl = memchr(c->buf, '\n', c->len);
    if (nl) {
      *nl = '\0';
      json_t *j = json_loads(c->buf, 0, NULL);
      size_t used = (size_t)(nl - c->buf) + 1;
      memmove(c->buf, nl + 1, c->len - used);
      c->len -= used;
      DH_ASSERT(j != NULL, "a line that is not JSON");
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

json_t *dh_client_call(dh_client *c, const char *line, double timeout) {
  if (dh_client_send(c, line) || dh_client_send(c, "\n")) return NULL;
  for (;;) {
    json_t *j = dh_client_line(c, timeout);
    if (!j || !json_object_get(j, "event")) return j;
    json_decref(j);
  }
}

json_t *dh_call_ok(const char *line, double timeout) {
  dh_client *c = dh_client_open(1);
  json_t *a = dh_client_call(c, line, timeout);
  dh_client_close(c);
  DH_ASSERT(a != NULL, "no answer to %s", line);
  char *text = json_dumps(a, JSON_COMPACT);
  DH_ASSERT(json_is_true(json_object_get(a, "ok")), "%s failed: %s", line, text);
  free(text);
  json_t *r = json_incref(json_object_get(a, "result"));
  json_decref(a);
  return r;
}

const char *dh_error_code(const json_t *answer) {
  return json_string_value(json_object_get(json_object_get(answer, "error"), "code"));
}

long long dh_status_step(void) {
  json_t *r = dh_call_ok("{\"id\":1,\"cmd\":\"status\"}", 5);
  long long s = json_integer_value(json_object_get(r, "step"));
  json_decref(r);
  return s;
}

void dh_wait_step(long long at_least, double timeout) {
  double end = clock_now() + timeout;
  while (dh_status_step() < at_least) {
    DH_ASSERT(clock_now() < end, "step %lld not reached in %.0f s", at_least, timeout);
    usleep(5000);
  }
}
