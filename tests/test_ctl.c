/* The control protocol (service/ctl.h) against real socket clients: a ctl server runs on a private loop in
 * a thread with a small command table, and the test drives it the way mococtl and stray clients would. */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/err.h"
#include "service/ctl.h"
#include "testutil.h"

/* ---- the server under test ---- */

typedef struct {
  uv_loop_t loop;
  uv_async_t stop;
  ctl_server srv;
  pthread_t thread;
  char dir[64], path[160];
  int frozen;       /* the gate refuses CTL_CHANGES_STATE commands while set */
  uv_timer_t watch; /* the scripted events of "subscribe", for mococtl watch */
  int watch_step;
  ctl_call *held;   /* the call "hold" left unanswered until "release" */
  int deferred;     /* calls taken and not yet answered ("slow", "hold") */
} tserver;

typedef struct {
  uv_timer_t timer;
  ctl_call *call;
  int ms;
  tserver *ts;
} slow_call;

static void on_slow_closed(uv_handle_t *h) { free(h->data); }

static void on_slow_timer(uv_timer_t *t) {
  slow_call *s = t->data;
  ctl_reply(s->call, json_pack("{s:i}", "slept", s->ms));
  s->ts->deferred--;
  uv_close((uv_handle_t *)t, on_slow_closed);
}

static int cmd_echo(ctl_call *call, json_t *args, void *data) {
  ctl_reply(call, json_deep_copy(args));
  return 0;
}

/* Answers later, from a timer: the deferred path eval and checkpoint take in mocod. */
static int cmd_slow(ctl_call *call, json_t *args, void *data) {
  tserver *ts = data;
  slow_call *s = malloc(sizeof *s);
  s->call = call;
  s->ms = (int)json_integer_value(json_object_get(args, "ms"));
  s->ts = ts;
  ts->deferred++;
  s->timer.data = s;
  uv_timer_init(&ts->loop, &s->timer);
  uv_timer_start(&s->timer, on_slow_timer, (uint64_t)s->ms, 0);
  return 0;
}

/* Answers only when another call says "release": a deferred answer whose timing the test controls. */
static int cmd_hold(ctl_call *call, json_t *args, void *data) {
  tserver *ts = data;
  if (ts->held) return moco_error(MOCO_EBUSY, "a call is held already");
  ts->held = call;
  ts->deferred++;
  return 0;
}

static int cmd_release(ctl_call *call, json_t *args, void *data) {
  tserver *ts = data;
  int released = ts->held != NULL;
  if (ts->held) {
    ctl_reply(ts->held, json_pack("{s:b}", "released", 1));
    ts->held = NULL;
    ts->deferred--;
  }
  ctl_reply(call, json_pack("{s:i}", "released", released));
  return 0;
}

static int cmd_sub(ctl_call *call, json_t *args, void *data) {
  ctl_call_subscribe(call);
  ctl_reply(call, NULL);
  return 0;
}

/* Broadcasts n events padded to about `size` bytes. */
static int cmd_bcast(ctl_call *call, json_t *args, void *data) {
  tserver *ts = data;
  int n = (int)json_integer_value(json_object_get(args, "n"));
  int size = (int)json_integer_value(json_object_get(args, "size"));
  char *line = malloc((size_t)size + 64);
  int sent = 0;
  for (int i = 0; i < n; i++) {
    int len = snprintf(line, 64, "{\"event\":\"progress\",\"step\":%d,\"pad\":\"", i);
    memset(line + len, 'x', (size_t)size);
    strcpy(line + len + size, "\"}\n");
    sent = ctl_broadcast(&ts->srv, line);
  }
  free(line);
  ctl_reply(call, json_pack("{s:i}", "sent", sent));
  return 0;
}

static int cmd_stats(ctl_call *call, json_t *args, void *data) {
  tserver *ts = data;
  ctl_reply(call, json_pack("{s:i, s:i, s:I, s:I, s:i}", "clients", ts->srv.clients, "subscribers",
                            ts->srv.subscribers, "dropped", (json_int_t)ts->srv.dropped, "rejected",
                            (json_int_t)ts->srv.rejected, "deferred", ts->deferred));
  return 0;
}

static int cmd_fail(ctl_call *call, json_t *args, void *data) {
  return moco_error(MOCO_EBUSY, "trainer busy: step %d in progress", 7);
}

static int cmd_freeze(ctl_call *call, json_t *args, void *data) {
  ((tserver *)data)->frozen = 1;
  ctl_reply(call, NULL);
  return 0;
}

static int cmd_poke(ctl_call *call, json_t *args, void *data) {
  ctl_reply(call, json_pack("{s:b}", "poked", 1));
  return 0;
}

static int gate(ctl_call *call, const ctl_command *cmd, void *data) {
  if (!((tserver *)data)->frozen || !(cmd->flags & CTL_CHANGES_STATE)) return 0;
  ctl_reply_error(call, "state", "'%s' changes state; the server is frozen", cmd->name);
  return 1;
}

/* What mococtl expects of mocod: status, an error, free-form set, subscribe with events. */
static int cmd_status(ctl_call *call, json_t *args, void *data) {
  ctl_reply(call, json_pack("{s:s, s:i, s:i, s:i, s:f, s:f, s:{s:f, s:f}, s:f, s:f, s:n}", "state",
                            "running", "step", 120, "total_steps", 1000, "epoch", 2, "progress", 0.12,
                            "loss", 5.25, "diagnostics", "pos_sim", 0.75, "inst_acc", 0.5,
                            "samples_per_sec", 812.5, "eta_sec", 3725.0, "last_checkpoint"));
  return 0;
}

static int cmd_pause(ctl_call *call, json_t *args, void *data) {
  return moco_error(MOCO_ESTATE, "pause: training is already paused");
}

static int cmd_config(ctl_call *call, json_t *args, void *data) {
  json_t *key = json_object_get(args, "key");
  ctl_reply(call, key ? json_pack("{s:O, s:f}", "key", key, "value", 0.25)
                      : json_pack("{s:{s:f}, s:i}", "contrast", "temperature", 0.2, "seed", 1));
  return 0;
}

static void on_watch_timer(uv_timer_t *t) {
  tserver *ts = t->data;
  static const char *events[] = {
      "{\"event\":\"progress\",\"step\":500,\"total_steps\":1000,\"loss\":4.5,\"inst_acc\":0.25,"
      "\"hardness\":0.5,\"samples_per_sec\":900,\"eta_sec\":61}",
      "{\"event\":\"eval\",\"step\":500,\"knn_acc\":0.8125}",
      "{\"event\":\"progress\",\"step\":1000,\"total_steps\":1000,\"loss\":4.0}",
      "{\"event\":\"stop\",\"reason\":\"finished\",\"step\":1000}",
  };
  ctl_broadcast(&ts->srv, events[ts->watch_step++]);
  if (ts->watch_step == 4) uv_timer_stop(t);
}

static int cmd_subscribe(ctl_call *call, json_t *args, void *data) {
  tserver *ts = data;
  ctl_call_subscribe(call);
  ctl_reply(call, json_pack("{s:s}", "state", "running"));
  ts->watch_step = 0;
  uv_timer_start(&ts->watch, on_watch_timer, 20, 20);
  return 0;
}

static const ctl_arg echo_args[] = {
    {"msg", CTL_T_STRING, 0, 0, 0},
    {"n", CTL_T_INT, 0, 0, 100},
    {"x", CTL_T_NUMBER, 0, 0, 0},
    {"v", CTL_T_ANY, 0, 0, 0},
    {NULL, 0, 0, 0, 0},
};
static const ctl_arg config_args[] = {{"key", CTL_T_STRING, 0, 0, 0}, {NULL, 0, 0, 0, 0}};
static const ctl_arg slow_args[] = {{"ms", CTL_T_INT, CTL_ARG_REQUIRED, 0, 10000}, {NULL, 0, 0, 0, 0}};
static const ctl_arg bcast_args[] = {
    {"n", CTL_T_INT, CTL_ARG_REQUIRED, 1, 100000},
    {"size", CTL_T_INT, CTL_ARG_REQUIRED, 0, 1 << 20},
    {NULL, 0, 0, 0, 0},
};

static const ctl_command table[] = {
    {"echo", cmd_echo, CTL_SAFE_WHILE_RUNNING, echo_args, "answers with its args"},
    {"slow", cmd_slow, 0, slow_args, "answers after args.ms milliseconds"},
    {"hold", cmd_hold, 0, NULL, "answers when another call releases it"},
    {"release", cmd_release, CTL_SAFE_WHILE_RUNNING, NULL, "answers the held call"},
    {"sub", cmd_sub, CTL_SAFE_WHILE_RUNNING, NULL, "subscribes"},
    {"bcast", cmd_bcast, 0, bcast_args, "broadcasts n events"},
    {"stats", cmd_stats, CTL_SAFE_WHILE_RUNNING, NULL, "client counts"},
    {"fail", cmd_fail, 0, NULL, "fails with MOCO_EBUSY"},
    {"freeze", cmd_freeze, 0, NULL, "makes the gate refuse state changes"},
    {"poke", cmd_poke, CTL_CHANGES_STATE, NULL, "a state change"},
    {"status", cmd_status, CTL_SAFE_WHILE_RUNNING, NULL, "a fixed status"},
    {"pause", cmd_pause, CTL_CHANGES_STATE, NULL, "always refused"},
    {"set", cmd_echo, CTL_CHANGES_STATE | CTL_ANY_ARGS, NULL, "answers with its args"},
    {"config", cmd_config, CTL_SAFE_WHILE_RUNNING, config_args, "a fixed config"},
    {"subscribe", cmd_subscribe, CTL_SAFE_WHILE_RUNNING, NULL, "subscribes, then four events"},
    {NULL, NULL, 0, NULL, NULL},
};

static void on_server_closed(ctl_server *srv) {
  tserver *ts = srv->data;
  uv_close((uv_handle_t *)&ts->stop, NULL);
  uv_close((uv_handle_t *)&ts->watch, NULL);
}

static void on_stop(uv_async_t *a) {
  tserver *ts = a->data;
  ctl_close(&ts->srv, on_server_closed);
}

static void *server_thread(void *arg) {
  tserver *ts = arg;
  uv_run(&ts->loop, UV_RUN_DEFAULT);
  return NULL;
}

/* Starts a server at dir/sub/ctl.sock (sub is created by ctl_init); cfg fields 0 take the defaults
 * except max_output, which the tests keep small so a stalled reader overflows quickly. */
static tserver *server_start_cfg(size_t max_output, int max_clients) {
  tserver *ts = calloc(1, sizeof *ts);
  char *dir = test_tmpdir();
  ck_assert_ptr_nonnull(dir);
  strcpy(ts->dir, dir);
  snprintf(ts->path, sizeof ts->path, "%s/sub/ctl.sock", ts->dir);
  ck_assert_int_eq(uv_loop_init(&ts->loop), 0);
  ctl_config cfg;
  ctl_config_default(&cfg);
  cfg.path = ts->path;
  cfg.gate = gate;
  if (max_output) cfg.max_output = max_output;
  if (max_clients) cfg.max_clients = max_clients;
  int rc = ctl_init(&ts->srv, &ts->loop, &cfg, table, ts);
  ck_assert_msg(rc == 0, "ctl_init: %s", moco_errmsg());
  uv_async_init(&ts->loop, &ts->stop, on_stop);
  ts->stop.data = ts;
  uv_timer_init(&ts->loop, &ts->watch);
  ts->watch.data = ts;
  ck_assert_int_eq(pthread_create(&ts->thread, NULL, server_thread, ts), 0);
  return ts;
}

static tserver *server_start(void) { return server_start_cfg(64 * 1024, 0); }

/* Stops the loop; uv_loop_close succeeding proves every handle ctl opened was closed. */
static void server_stop(tserver *ts) {
  uv_async_send(&ts->stop);
  pthread_join(ts->thread, NULL);
  ck_assert_int_eq(uv_loop_close(&ts->loop), 0);
  ck_assert_int_ne(access(ts->path, F_OK), 0); /* the socket is unlinked */
  rm_rf(ts->dir);
  free(ts);
}

/* ---- a blocking test client with its own line buffer ---- */

typedef struct {
  int fd;
  size_t len;
  char buf[1 << 16];
} conn;

static int raw_connect(const char *path) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  strcpy(sa.sun_path, path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ck_assert_int_ge(fd, 0);
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

static conn *cl_open(const char *path) {
  conn *c = calloc(1, sizeof *c);
  c->fd = raw_connect(path);
  ck_assert_msg(c->fd >= 0, "connect %s: %s", path, strerror(errno));
  return c;
}

static void cl_close(conn *c) {
  close(c->fd);
  free(c);
}

static void cl_write(conn *c, const void *p, size_t n) {
  const char *s = p;
  while (n) {
    ssize_t k = send(c->fd, s, n, MSG_NOSIGNAL);
    ck_assert_msg(k > 0, "send: %s", strerror(errno));
    s += k;
    n -= (size_t)k;
  }
}

static void cl_send(conn *c, const char *line) {
  cl_write(c, line, strlen(line));
  cl_write(c, "\n", 1);
}

/* Waits up to timeout_ms for data; 1 when some is readable (or EOF), 0 on timeout. */
static int cl_readable(conn *c, int timeout_ms) {
  struct pollfd p = {.fd = c->fd, .events = POLLIN};
  return poll(&p, 1, timeout_ms) > 0;
}

/* The next line (malloc'd, without newline), or NULL on EOF or after 5 s of silence. */
static char *cl_line(conn *c) {
  for (;;) {
    char *nl = memchr(c->buf, '\n', c->len);
    if (nl) {
      size_t n = (size_t)(nl - c->buf);
      char *line = strndup(c->buf, n);
      memmove(c->buf, nl + 1, c->len - n - 1);
      c->len -= n + 1;
      return line;
    }
    ck_assert_msg(c->len < sizeof c->buf, "line longer than the test buffer");
    if (!cl_readable(c, 5000)) return NULL;
    ssize_t k = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
    if (k <= 0) return NULL;
    c->len += (size_t)k;
  }
}

static json_t *cl_json(conn *c) {
  char *line = cl_line(c);
  ck_assert_msg(line != NULL, "no answer");
  json_error_t err;
  json_t *v = json_loads(line, 0, &err);
  ck_assert_msg(v != NULL, "answer is not JSON: %s", line);
  free(line);
  return v;
}

static json_t *cl_call(conn *c, const char *req) {
  cl_send(c, req);
  return cl_json(c);
}

/* The next answer is an error with `code` whose message contains `needle`. */
static void expect_error_reply(conn *c, const char *req, const char *code, const char *needle) {
  json_t *r = cl_json(c);
  ck_assert_msg(json_is_false(json_object_get(r, "ok")), "%s: expected an error", req);
  json_t *e = json_object_get(r, "error");
  const char *got = json_string_value(json_object_get(e, "code"));
  const char *msg = json_string_value(json_object_get(e, "message"));
  ck_assert_msg(got && strcmp(got, code) == 0, "%s: code %s, expected %s", req, got, code);
  ck_assert_msg(msg && strstr(msg, needle), "%s: message '%s' lacks '%s'", req, msg, needle);
  json_decref(r);
}

static void expect_error(conn *c, const char *req, const char *code, const char *needle) {
  cl_send(c, req);
  expect_error_reply(c, req, code, needle);
}

/* The echo command still works on this connection, with id `id`. */
static void expect_echo(conn *c, int id) {
  char req[128];
  snprintf(req, sizeof req, "{\"id\":%d,\"cmd\":\"echo\",\"args\":{\"n\":%d}}", id, id % 100);
  json_t *r = cl_call(c, req);
  ck_assert(json_is_true(json_object_get(r, "ok")));
  ck_assert_int_eq(json_integer_value(json_object_get(r, "id")), id);
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(r, "result"), "n")), id % 100);
  json_decref(r);
}

static json_int_t stat_of(conn *c, const char *key) {
  json_t *r = cl_call(c, "{\"cmd\":\"stats\"}");
  json_int_t v = json_integer_value(json_object_get(json_object_get(r, "result"), key));
  json_decref(r);
  return v;
}

/* Polls the stats until `key` reaches want (the server closes connections asynchronously). */
static void wait_stat(const char *path, const char *key, json_int_t want) {
  json_int_t v = -1;
  for (int i = 0; i < 500 && v != want; i++) {
    conn *c = cl_open(path);
    v = stat_of(c, key);
    cl_close(c);
    if (v != want) usleep(10000);
  }
  ck_assert_msg(v == want, "stats.%s = %lld, expected %lld", key, (long long)v, (long long)want);
}

static int count_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  int n = 0;
  for (struct dirent *e; (e = readdir(d));) n += e->d_name[0] != '.';
  closedir(d);
  return n;
}

/* ---- protocol ---- */

START_TEST(answers_echo_the_request_id_of_any_type) {
  tserver *ts = server_start();
  conn *c = cl_open(ts->path);
  const char *ids[] = {"7", "\"abc\"", "{\"a\":[1,2]}", "1.5", "null", "[true]"};
  for (size_t i = 0; i < sizeof ids / sizeof *ids; i++) {
    char req[128];
    snprintf(req, sizeof req, "{\"id\":%s,\"cmd\":\"echo\",\"args\":{\"msg\":\"hi\"}}", ids[i]);
    json_t *r = cl_call(c, req), *want = json_loads(ids[i], JSON_DECODE_ANY, NULL);
    ck_assert_msg(json_equal(json_object_get(r, "id"), want), "id %s not echoed", ids[i]);
    ck_assert(json_is_true(json_object_get(r, "ok")));
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(r, "result"), "msg")), "hi");
    json_decref(r);
    json_decref(want);
  }
  json_t *r = cl_call(c, "{\"cmd\":\"echo\"}");
  ck_assert(json_is_null(json_object_get(r, "id")));
  ck_assert(json_is_object(json_object_get(r, "result")));
  json_decref(r);
  cl_close(c);
  server_stop(ts);
}
END_TEST

START_TEST(every_bad_request_gets_its_error_and_the_connection_keeps_working) {
  tserver *ts = server_start();
  conn *c = cl_open(ts->path);
  struct {
    const char *req, *code, *needle;
  } cases[] = {
      {"{\"cmd\":\"echo\"", "bad_json", "column"},
      {"not json at all", "bad_json", ""},
      {"[1,2]", "bad_request", "expected a JSON object, got array"},
      {"42", "bad_request", "got integer"},
      {"{\"id\":1}", "bad_request", "request.cmd: missing"},
      {"{\"cmd\":5}", "bad_request", "request.cmd: expected string, got integer"},
      {"{\"cmd\":\"echo\",\"argz\":{}}", "bad_request", "request.argz: unknown key"},
      {"{\"cmd\":\"echo\",\"cmd\":\"echo\"}", "bad_json", "duplicate"},
      {"{\"cmd\":\"nope\"}", "unknown_command", "unknown command 'nope'"},
      {"{\"cmd\":\"echo\",\"args\":[1]}", "bad_args", "args: expected object, got array"},
      {"{\"cmd\":\"echo\",\"args\":{\"msg\":3}}", "bad_args", "args.msg: expected string, got integer"},
      {"{\"cmd\":\"echo\",\"args\":{\"n\":1.5}}", "bad_args", "args.n: expected integer, got real"},
      {"{\"cmd\":\"echo\",\"args\":{\"n\":101}}", "bad_args", "args.n: 101 is out of range [0, 100]"},
      {"{\"cmd\":\"echo\",\"args\":{\"x\":true}}", "bad_args", "args.x: expected number, got boolean"},
      {"{\"cmd\":\"echo\",\"args\":{\"bogus\":1}}", "bad_args",
       "args.bogus: unknown argument of 'echo' (allowed: msg, n, x, v)"},
      {"{\"cmd\":\"stats\",\"args\":{\"a\":1}}", "bad_args", "(it takes none)"},
      {"{\"cmd\":\"slow\",\"args\":{}}", "bad_args", "args.ms: missing (required by 'slow')"},
      {"{\"cmd\":\"fail\"}", "busy", "trainer busy: step 7 in progress"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    expect_error(c, cases[i].req, cases[i].code, cases[i].needle);
    expect_echo(c, (int)i);
  }
  /* Reals are numbers; blank lines and CRLF endings are tolerated. */
  cl_write(c, "\n  \r\n", 5);
  json_t *r = cl_call(c, "{\"cmd\":\"echo\",\"args\":{\"x\":2,\"v\":[null]}}\r");
  ck_assert(json_is_true(json_object_get(r, "ok")));
  json_decref(r);
  cl_close(c);
  server_stop(ts);
}
END_TEST

START_TEST(gate_refuses_state_changes_by_command_flags) {
  tserver *ts = server_start();
  conn *c = cl_open(ts->path);
  json_t *r = cl_call(c, "{\"cmd\":\"poke\"}");
  ck_assert(json_is_true(json_object_get(r, "ok")));
  json_decref(r);
  json_decref(cl_call(c, "{\"cmd\":\"freeze\"}"));
  expect_error(c, "{\"id\":3,\"cmd\":\"poke\"}", "state", "'poke' changes state; the server is frozen");
  expect_echo(c, 4); /* CTL_SAFE_WHILE_RUNNING commands still run */
  cl_close(c);
  server_stop(ts);
}
END_TEST

START_TEST(oversized_line_is_refused_and_the_rest_of_it_discarded) {
  tserver *ts = server_start();
  conn *c = cl_open(ts->path);
  size_t n = CTL_MAX_LINE + 5000;
  char *big = malloc(n + 1);
  memset(big, 'x', n);
  big[n] = '\n';
  /* Written while the answer comes back: the line's tail must be dropped, not parsed. */
  cl_write(c, big, n + 1);
  expect_error_reply(c, "70 KB line", "line_too_long", "longer than 65536 bytes");
  expect_echo(c, 1);
  /* Exactly at the limit is accepted: a request padded with spaces to 65536 bytes. */
  const char *req = "{\"id\":2,\"cmd\":\"echo\",\"args\":{\"n\":2}}";
  memset(big, ' ', CTL_MAX_LINE);
  memcpy(big, req, strlen(req));
  big[CTL_MAX_LINE] = '\n';
  cl_write(c, big, CTL_MAX_LINE + 1);
  json_t *r = cl_json(c);
  ck_assert(json_is_true(json_object_get(r, "ok")));
  ck_assert_int_eq(json_integer_value(json_object_get(r, "id")), 2);
  json_decref(r);
  /* One byte over is refused. */
  big[CTL_MAX_LINE] = ' ';
  big[CTL_MAX_LINE + 1] = '\n';
  cl_write(c, big, CTL_MAX_LINE + 2);
  expect_error_reply(c, "65537 byte line", "line_too_long", "discarded");
  expect_echo(c, 3);
  free(big);
  cl_close(c);
  server_stop(ts);
}
END_TEST

START_TEST(pipelined_requests_are_answered_in_order_across_a_deferred_answer) {
  tserver *ts = server_start();
  conn *c = cl_open(ts->path);
  cl_send(c, "{\"id\":1,\"cmd\":\"slow\",\"args\":{\"ms\":50}}\n{\"id\":2,\"cmd\":\"echo\"}\n"
             "{\"id\":3,\"cmd\":\"nope\"}\n{\"id\":4,\"cmd\":\"slow\",\"args\":{\"ms\":1}}");
  for (int id = 1; id <= 4; id++) {
    json_t *r = cl_json(c);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "id")), id);
    json_decref(r);
  }
  /* A deferred answer on one connection holds up nobody else: while the server holds c's call (until
   * d releases it, so no timing is involved), d is answered. */
  conn *d = cl_open(ts->path);
  cl_send(c, "{\"id\":5,\"cmd\":\"hold\"}");
  wait_stat(ts->path, "deferred", 1);
  expect_echo(d, 6);
  ck_assert_msg(!cl_readable(c, 0), "the held call was answered before its release");
  json_t *r = cl_call(d, "{\"id\":7,\"cmd\":\"release\"}");
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(r, "result"), "released")), 1);
  json_decref(r);
  r = cl_json(c);
  ck_assert_int_eq(json_integer_value(json_object_get(r, "id")), 5);
  ck_assert(json_is_true(json_object_get(json_object_get(r, "result"), "released")));
  json_decref(r);
  cl_close(c);
  cl_close(d);
  server_stop(ts);
}
END_TEST

START_TEST(a_last_request_without_newline_is_answered_before_close) {
  tserver *ts = server_start();
  conn *c = cl_open(ts->path);
  cl_write(c, "{\"id\":9,\"cmd\":\"slow\",\"args\":{\"ms\":20}}", 38);
  shutdown(c->fd, SHUT_WR);
  json_t *r = cl_json(c);
  ck_assert_int_eq(json_integer_value(json_object_get(r, "id")), 9);
  ck_assert(json_is_true(json_object_get(r, "ok")));
  json_decref(r);
  char *eof = cl_line(c);
  ck_assert_ptr_null(eof); /* then the server closes */
  cl_close(c);
  server_stop(ts);
}
END_TEST

START_TEST(many_clients_at_once) {
  enum { N = 120 };
  tserver *ts = server_start();
  conn *cs[N];
  for (int i = 0; i < N; i++) cs[i] = cl_open(ts->path);
  char req[96];
  for (int i = 0; i < N; i++) {
    snprintf(req, sizeof req, "{\"id\":%d,\"cmd\":\"slow\",\"args\":{\"ms\":%d}}", i, i % 7);
    cl_send(cs[i], req);
  }
  for (int i = N - 1; i >= 0; i--) {
    json_t *r = cl_json(cs[i]);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "id")), i);
    json_decref(r);
    expect_echo(cs[i], 1000 + i);
  }
  ck_assert_int_eq(stat_of(cs[0], "clients"), N);
  for (int i = 0; i < N; i++) cl_close(cs[i]);
  wait_stat(ts->path, "clients", 1);
  server_stop(ts);
}
END_TEST

START_TEST(clients_over_the_limit_are_told_busy_and_closed) {
  tserver *ts = server_start_cfg(64 * 1024, 2);
  conn *a = cl_open(ts->path), *b = cl_open(ts->path);
  expect_echo(a, 1);
  expect_echo(b, 2);
  conn *c = cl_open(ts->path);
  expect_error_reply(c, "third client", "busy", "too many clients (at most 2)");
  ck_assert_ptr_null(cl_line(c));
  cl_close(c);
  ck_assert_int_eq(stat_of(a, "rejected"), 1);
  cl_close(b);
  /* b's slot frees once the server has seen it go. */
  json_int_t clients = 2;
  for (int i = 0; i < 500 && clients != 1; i++) {
    clients = stat_of(a, "clients");
    if (clients != 1) usleep(10000);
  }
  ck_assert_int_eq(clients, 1);
  c = cl_open(ts->path);
  expect_echo(c, 3);
  cl_close(c);
  cl_close(a);
  server_stop(ts);
}
END_TEST

START_TEST(abrupt_disconnects_harm_nobody_and_leak_nothing) {
  tserver *ts = server_start();
  conn *keep = cl_open(ts->path);
  expect_echo(keep, 1);
  int fds = count_fds();
  for (int i = 0; i < 40; i++) {
    conn *c = cl_open(ts->path);
    switch (i % 4) {
    case 0: cl_write(c, "{\"cmd\":\"ec", 10); break;                          /* mid-line */
    case 1: cl_send(c, "{\"cmd\":\"slow\",\"args\":{\"ms\":30}}"); break;   /* mid-deferred */
    case 2: cl_send(c, "{\"cmd\":\"sub\"}"); break;                          /* a subscriber */
    default: break;                                                          /* silent */
    }
    if (i % 8 == 5) { /* reset the connection rather than close it */
      struct linger lg = {1, 0};
      setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    cl_close(c);
    if (i % 10 == 0) expect_echo(keep, 100 + i);
  }
  usleep(60000); /* the deferred answers fall due, to clients that have gone */
  json_decref(cl_call(keep, "{\"cmd\":\"bcast\",\"args\":{\"n\":3,\"size\":10}}"));
  wait_stat(ts->path, "clients", 2);
  ck_assert_int_eq(stat_of(keep, "subscribers"), 0);
  for (int i = 0; i < 200 && count_fds() != fds; i++) usleep(10000);
  ck_assert_int_eq(count_fds(), fds);
  expect_echo(keep, 2);
  cl_close(keep);
  server_stop(ts);
}
END_TEST

/* ---- subscribers ---- */

START_TEST(a_subscriber_that_never_reads_is_dropped_and_others_get_every_event) {
  tserver *ts = server_start(); /* max_output 64 KiB */
  conn *stalled = cl_open(ts->path), *reader = cl_open(ts->path), *ctl = cl_open(ts->path);
  json_decref(cl_call(stalled, "{\"cmd\":\"sub\"}"));
  json_decref(cl_call(reader, "{\"cmd\":\"sub\"}"));
  ck_assert_int_eq(stat_of(ctl, "subscribers"), 2);
  /* 4 MB in rounds of 16 KB: far past the stalled client's socket buffer plus 64 KiB, while the reader
   * drains each round before the next. */
  int step_seen = 0;
  for (int round = 0; round < 250; round++) {
    json_t *r = cl_call(ctl, "{\"cmd\":\"bcast\",\"args\":{\"n\":16,\"size\":1000}}");
    json_decref(r);
    for (int i = 0; i < 16; i++) {
      json_t *ev = cl_json(reader);
      ck_assert_str_eq(json_string_value(json_object_get(ev, "event")), "progress");
      ck_assert_int_eq(json_integer_value(json_object_get(ev, "step")), i);
      json_decref(ev);
      step_seen++;
    }
  }
  ck_assert_int_eq(step_seen, 4000);
  ck_assert_int_eq(stat_of(ctl, "dropped"), 1);
  ck_assert_int_eq(stat_of(ctl, "subscribers"), 1);
  /* The stalled client finds its buffered events and then the end of the stream. */
  int lines = 0;
  for (char *l; (l = cl_line(stalled)); lines++) free(l);
  ck_assert_int_gt(lines, 0);
  ck_assert_int_lt(lines, 4000);
  /* The reader, still subscribed, can also still ask. */
  json_t *r = cl_call(ctl, "{\"cmd\":\"bcast\",\"args\":{\"n\":1,\"size\":1}}");
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(r, "result"), "sent")), 1);
  json_decref(r);
  json_decref(cl_json(reader));
  expect_echo(reader, 5);
  cl_close(stalled);
  cl_close(reader);
  cl_close(ctl);
  server_stop(ts);
}
END_TEST

START_TEST(only_subscribers_get_events) {
  tserver *ts = server_start();
  conn *s = cl_open(ts->path), *p = cl_open(ts->path);
  json_decref(cl_call(s, "{\"cmd\":\"sub\"}"));
  json_t *r = cl_call(p, "{\"id\":1,\"cmd\":\"bcast\",\"args\":{\"n\":2,\"size\":3}}");
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(r, "result"), "sent")), 1);
  json_decref(r);
  for (int i = 0; i < 2; i++) {
    char *l = cl_line(s);
    ck_assert_msg(l && strstr(l, "\"event\":\"progress\""), "event line: %s", l);
    free(l);
  }
  ck_assert(!cl_readable(p, 50));
  cl_close(s);
  cl_close(p);
  server_stop(ts);
}
END_TEST

/* ---- the socket file ---- */

START_TEST(socket_is_owner_only) {
  tserver *ts = server_start();
  struct stat st;
  ck_assert_int_eq(stat(ts->path, &st), 0);
  ck_assert(S_ISSOCK(st.st_mode));
  ck_assert_int_eq(st.st_mode & 0777, 0600);
  char dir[200];
  snprintf(dir, sizeof dir, "%s/sub", ts->dir);
  ck_assert_int_eq(stat(dir, &st), 0);
  ck_assert_int_eq(st.st_mode & 0777, 0700);
  server_stop(ts);
}
END_TEST

START_TEST(a_second_server_on_a_live_socket_is_refused) {
  tserver *ts = server_start();
  uv_loop_t loop;
  uv_loop_init(&loop);
  ctl_server other;
  ctl_config cfg;
  ctl_config_default(&cfg);
  cfg.path = ts->path;
  ck_assert_int_eq(ctl_init(&other, &loop, &cfg, table, NULL), MOCO_EBUSY);
  ck_assert_msg(strstr(moco_errmsg(), "is in use by a running mocod"), "%s", moco_errmsg());
  ck_assert_int_eq(uv_loop_close(&loop), 0);
  conn *c = cl_open(ts->path); /* the first one is untouched */
  expect_echo(c, 1);
  cl_close(c);
  server_stop(ts);
}
END_TEST

START_TEST(a_stale_socket_is_replaced_and_other_files_are_not) {
  char *dir = test_tmpdir();
  char path[160];
  snprintf(path, sizeof path, "%s/stale.sock", dir);
  /* A crashed server leaves its socket file behind: bound, never unlinked, nobody listening. */
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  strcpy(sa.sun_path, path);
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
  close(fd);
  ck_assert_int_eq(access(path, F_OK), 0);

  uv_loop_t loop;
  uv_loop_init(&loop);
  ctl_server srv;
  ctl_config cfg;
  ctl_config_default(&cfg);
  cfg.path = path;
  ck_assert_msg(ctl_init(&srv, &loop, &cfg, table, NULL) == 0, "%s", moco_errmsg());
  ctl_close(&srv, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  ck_assert_int_ne(access(path, F_OK), 0);

  FILE *f = fopen(path, "w"); /* a regular file in the way is somebody's data */
  fputs("keep me", f);
  fclose(f);
  ck_assert_int_eq(ctl_init(&srv, &loop, &cfg, table, NULL), MOCO_EINVAL);
  ck_assert_msg(strstr(moco_errmsg(), "is not a socket"), "%s", moco_errmsg());
  ck_assert_int_eq(access(path, F_OK), 0);
  ck_assert_int_eq(uv_loop_close(&loop), 0);
  rm_rf(dir);
}
END_TEST

START_TEST(closing_with_a_deferred_call_in_flight_is_safe) {
  tserver *ts = server_start();
  conn *c = cl_open(ts->path);
  cl_send(c, "{\"cmd\":\"slow\",\"args\":{\"ms\":100}}");
  wait_stat(ts->path, "deferred", 1); /* the server has taken the request */
  server_stop(ts); /* the slow timer then answers a closed client of a closed server */
  ck_assert_ptr_null(cl_line(c));
  cl_close(c);
}
END_TEST

/* ---- mococtl against the in-process server ---- */

typedef struct {
  int status;
  char out[8192], err[4096];
} ctl_run;

static void slurp(const char *path, char *buf, size_t n) {
  FILE *f = fopen(path, "r");
  size_t k = f ? fread(buf, 1, n - 1, f) : 0;
  buf[k] = '\0';
  if (f) fclose(f);
}

/* Runs $MOCOD_BIN/mococtl with args (NULL-terminated) and MOCOD_SOCKET=env_socket when given,
 * stdout and stderr going to files (so stdout is no tty). */
static void run_mococtl(ctl_run *r, tserver *ts, const char *env_socket, const char *const *args) {
  const char *bin_dir = getenv("MOCOD_BIN");
  char bin[512], out[200], err[200];
  snprintf(bin, sizeof bin, "%s/mococtl", bin_dir ? bin_dir : "build/bin");
  snprintf(out, sizeof out, "%s/out", ts->dir);
  snprintf(err, sizeof err, "%s/err", ts->dir);
  const char *argv[16] = {"mococtl"};
  int n = 1;
  while (args[n - 1]) argv[n] = args[n - 1], n++;
  argv[n] = NULL;
  pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0) {
    if (!freopen(out, "w", stdout) || !freopen(err, "w", stderr)) _exit(126);
    if (env_socket) setenv("MOCOD_SOCKET", env_socket, 1);
    else unsetenv("MOCOD_SOCKET");
    execv(bin, (char *const *)argv);
    _exit(127);
  }
  int st;
  ck_assert_int_eq(waitpid(pid, &st, 0), pid);
  ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) < 100, "%s did not run (status %d)", bin, st);
  r->status = WEXITSTATUS(st);
  slurp(out, r->out, sizeof r->out);
  slurp(err, r->err, sizeof r->err);
}

#define MOCOCTL(r, ts, ...) run_mococtl(r, ts, NULL, (const char *const[]){__VA_ARGS__, NULL})

static void assert_has(const char *text, const char *needle) {
  ck_assert_msg(strstr(text, needle), "'%s' not in:\n%s", needle, text);
}

START_TEST(mococtl_exit_status_json_and_human_output) {
  tserver *ts = server_start();
  ctl_run r;
  MOCOCTL(&r, ts, "-s", ts->path, "--json", "status");
  ck_assert_int_eq(r.status, 0);
  json_t *j = json_loads(r.out, 0, NULL);
  ck_assert_msg(j && json_is_object(j), "--json status printed: %s", r.out);
  ck_assert_str_eq(json_string_value(json_object_get(j, "state")), "running");
  json_decref(j);

  run_mococtl(&r, ts, ts->path, (const char *const[]){"status", NULL}); /* socket from MOCOD_SOCKET */
  ck_assert_int_eq(r.status, 0);
  ck_assert_str_eq(r.out, "state:           running\n"
                          "step:            120 / 1000 (12.0%)\n"
                          "epoch:           2\n"
                          "loss:            5.25\n"
                          "samples_per_sec: 812.5\n"
                          "eta:             1:02:05\n"
                          "last_checkpoint: -\n"
                          "diagnostics:\n"
                          "  pos_sim:  0.75\n"
                          "  inst_acc: 0.5\n");

  MOCOCTL(&r, ts, "-s", ts->path, "pause");
  ck_assert_int_eq(r.status, 1);
  assert_has(r.err, "mococtl: pause: training is already paused (state)\n");
  MOCOCTL(&r, ts, "--json", "-s", ts->path, "pause");
  ck_assert_int_eq(r.status, 1);
  assert_has(r.out, "\"code\":\"state\"");

  MOCOCTL(&r, ts, "-s", ts->path, "--json", "set", "lr=0.01", "name=foo", "flag=true", "q=\"1 2\"",
          "n=3");
  ck_assert_int_eq(r.status, 0);
  j = json_loads(r.out, 0, NULL);
  json_t *want = json_pack("{s:f, s:s, s:b, s:s, s:i}", "lr", 0.01, "name", "foo", "flag", 1, "q",
                           "1 2", "n", 3);
  ck_assert_msg(json_equal(j, want), "set sent %s", r.out);
  json_decref(j);
  json_decref(want);
  MOCOCTL(&r, ts, "-s", ts->path, "set", "a=1");
  ck_assert_int_eq(r.status, 0);
  ck_assert_str_eq(r.out, "a: 1\n");

  MOCOCTL(&r, ts, "-s", ts->path, "config");
  ck_assert_int_eq(r.status, 0);
  ck_assert_str_eq(r.out, "{\n  \"contrast\": {\n    \"temperature\": 0.2\n  },\n  \"seed\": 1\n}\n");
  MOCOCTL(&r, ts, "-s", ts->path, "--json", "config", "contrast.temperature");
  ck_assert_int_eq(r.status, 0);
  ck_assert_str_eq(r.out, "{\"key\":\"contrast.temperature\",\"value\":0.25}\n");

  MOCOCTL(&r, ts, "-s", ts->path, "raw", "{\"id\":\"r\",\"cmd\":\"nope\"}");
  ck_assert_int_eq(r.status, 1);
  assert_has(r.out, "{\"id\":\"r\",\"ok\":false,\"error\":{\"code\":\"unknown_command\"");
  MOCOCTL(&r, ts, "-s", ts->path, "raw", "{\"cmd\":\"echo\",\"args\":{\"n\":4}}");
  ck_assert_int_eq(r.status, 0);
  ck_assert_str_eq(r.out, "{\"id\":null,\"ok\":true,\"result\":{\"n\":4}}\n");
  MOCOCTL(&r, ts, "-s", ts->path, "eval"); /* this server has no eval */
  ck_assert_int_eq(r.status, 1);
  assert_has(r.err, "mococtl: unknown command 'eval' (unknown_command)\n");

  char missing[200];
  snprintf(missing, sizeof missing, "%s/none.sock", ts->dir);
  MOCOCTL(&r, ts, "-s", missing, "status");
  ck_assert_int_eq(r.status, 2);
  assert_has(r.err, "mococtl: cannot connect to ");
  assert_has(r.err, "none.sock: No such file or directory");

  const char *const bad[][4] = {{"bogus"}, {"set", "novalue"}, {"set"}, {"-s"},
                                {"--timeout", "x", "status"}, {"--frob", "status"},
                                {"status", "extra"}, {"raw"}};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    run_mococtl(&r, ts, ts->path, bad[i]);
    ck_assert_msg(r.status == 3, "%s %s: status %d", bad[i][0], bad[i][1] ? bad[i][1] : "", r.status);
    assert_has(r.err, "(mococtl --help lists the commands)");
  }
  server_stop(ts);
}
END_TEST

START_TEST(mococtl_watch_prints_progress_and_events_until_stop) {
  tserver *ts = server_start();
  ctl_run r;
  MOCOCTL(&r, ts, "-s", ts->path, "watch");
  ck_assert_msg(r.status == 0, "watch: status %d, stderr %s", r.status, r.err);
  assert_has(r.out, "subscribed:  state running\n[############............] 500/1000  50.0%  loss 4.5000  inst_acc 0.250  "
                    "hardness 0.50  900 samples/s  ETA 0:01:01\n");
  assert_has(r.out, "eval:  step 500  knn_acc 0.8125\n");
  assert_has(r.out, "1000/1000 100.0%  loss 4.0000\n");
  assert_has(r.out, "stop:  reason finished  step 1000\n");
  ck_assert_ptr_null(strchr(r.out, '\r')); /* no redrawing when stdout is not a terminal */

  MOCOCTL(&r, ts, "-s", ts->path, "--json", "watch");
  ck_assert_int_eq(r.status, 0);
  int lines = 0;
  for (char *line = strtok(r.out, "\n"); line; line = strtok(NULL, "\n"), lines++) {
    json_t *ev = json_loads(line, 0, NULL);
    ck_assert_msg(ev && json_object_get(ev, "event"), "not an event: %s", line);
    json_decref(ev);
  }
  ck_assert_int_eq(lines, 4);
  server_stop(ts);
}
END_TEST

Suite *ctl_suite(void) {
  Suite *s = suite_create("ctl");
  TCase *tc = tcase_create("protocol");
  tcase_set_timeout(tc, 30);
  tcase_add_test(tc, answers_echo_the_request_id_of_any_type);
  tcase_add_test(tc, every_bad_request_gets_its_error_and_the_connection_keeps_working);
  tcase_add_test(tc, gate_refuses_state_changes_by_command_flags);
  tcase_add_test(tc, oversized_line_is_refused_and_the_rest_of_it_discarded);
  tcase_add_test(tc, pipelined_requests_are_answered_in_order_across_a_deferred_answer);
  tcase_add_test(tc, a_last_request_without_newline_is_answered_before_close);
  tcase_add_test(tc, many_clients_at_once);
  tcase_add_test(tc, clients_over_the_limit_are_told_busy_and_closed);
  tcase_add_test(tc, abrupt_disconnects_harm_nobody_and_leak_nothing);
  tcase_add_test(tc, a_subscriber_that_never_reads_is_dropped_and_others_get_every_event);
  tcase_add_test(tc, only_subscribers_get_events);
  tcase_add_test(tc, socket_is_owner_only);
  tcase_add_test(tc, a_second_server_on_a_live_socket_is_refused);
  tcase_add_test(tc, a_stale_socket_is_replaced_and_other_files_are_not);
  tcase_add_test(tc, closing_with_a_deferred_call_in_flight_is_safe);
  suite_add_tcase(s, tc);
  TCase *cli = tcase_create("mococtl");
  tcase_add_checked_fixture(cli, test_reaper_start, test_reaper_stop); /* mococtl runs as a child */
  tcase_set_timeout(cli, 30);
  tcase_add_test(cli, mococtl_exit_status_json_and_human_output);
  tcase_add_test(cli, mococtl_watch_prints_progress_and_events_until_stop);
  suite_add_tcase(s, cli);
  return s;
}
