/* The control server: framing, validation and client bookkeeping for the line-JSON protocol (ctl.h).
 *
 * Invariants, Redis style:
 *  - a client's input buffer holds at most max_line + 1 bytes (one line and its newline); a longer line is
 *    answered "line_too_long" once and the rest of it is dropped up to its newline;
 *  - a client's unsent output (libuv's write queue, i.e. what the kernel would not take) stays under
 *    max_output, else the client is disconnected: a reader that stalls costs the daemon a bounded amount;
 *  - while a client has a deferred call, its reading stops, so its answers keep request order and the
 *    kernel socket buffer (not our memory) holds whatever it pipelines meanwhile;
 *  - a client's memory lives until its handle is closed AND its last call is answered, so a deferred
 *    answer to a client that has gone is dropped, never written to freed memory. */
#include "service/ctl.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "core/err.h"

/* The first read buffer; it doubles up to max_line + 1 only for clients that send long lines. */
#define CTL_INBUF_MIN 4096

struct ctl_client {
  uv_pipe_t pipe;
  ctl_server *srv;
  ctl_client *prev, *next;
  char *in;
  size_t in_len, in_cap;
  ctl_call *blocked; /* the deferred call in flight, if any */
  int refs;          /* the handle + each unanswered call */
  unsigned discarding : 1, subscriber : 1, closing : 1, eof : 1, shutting : 1, ready : 1;
};

struct ctl_call {
  ctl_client *client;
  const ctl_command *cmd;
  json_t *req;  /* the parsed request (owns id and args); NULL when it did not parse */
  json_t *args; /* owned */
  int in_handler, answered;
};

/* One encoded line, shared by every write that sends it (a broadcast writes it to each subscriber). */
typedef struct {
  int refs;
  size_t len;
  char data[];
} out_buf;

typedef struct {
  uv_write_t req;
  out_buf *buf;
} out_req;

static void client_drive(ctl_client *c);
static void on_resume(uv_idle_t *idle);

/* ---- output ---- */

static out_buf *out_new(const char *s, size_t len) {
  out_buf *b = malloc(sizeof *b + len + 1);
  if (!b) return NULL;
  b->refs = 1;
  b->len = len + 1;
  memcpy(b->data, s, len);
  b->data[len] = '\n';
  return b;
}

static void out_unref(out_buf *b) {
  if (--b->refs == 0) free(b);
}

static void client_close(ctl_client *c);

static void on_write(uv_write_t *req, int status) {
  out_req *w = (out_req *)req;
  ctl_client *c = req->handle->data;
  out_unref(w->buf);
  free(w);
  if (status < 0 && status != UV_ECANCELED) client_close(c); /* EPIPE: the peer has gone */
}

static void client_send(ctl_client *c, out_buf *b) {
  if (c->closing) return;
  out_req *w = malloc(sizeof *w);
  if (!w) {
    client_close(c);
    return;
  }
  w->buf = b;
  b->refs++;
  uv_buf_t ub = uv_buf_init(b->data, (unsigned)b->len);
  if (uv_write(&w->req, (uv_stream_t *)&c->pipe, &ub, 1, on_write) != 0) {
    out_unref(b);
    free(w);
    client_close(c);
    return;
  }
  /* libuv writes what the kernel takes at once; the rest waits in its queue, which is the bound. */
  if (uv_stream_get_write_queue_size((uv_stream_t *)&c->pipe) > c->srv->cfg.max_output) {
    c->srv->dropped++;
    client_close(c);
  }
}

static void client_send_json(ctl_client *c, json_t *msg) {
  size_t n = json_dumpb(msg, NULL, 0, JSON_COMPACT);
  out_buf *b = n ? malloc(sizeof *b + n + 1) : NULL;
  if (!b || json_dumpb(msg, b->data, n, JSON_COMPACT) != n) {
    free(b);
    client_close(c); /* out of memory: the client cannot be told, and must not wait forever */
    return;
  }
  b->refs = 1;
  b->len = n + 1;
  b->data[n] = '\n';
  client_send(c, b);
  out_unref(b);
}

/* ---- clients ---- */

static void client_unref(ctl_client *c) {
  if (--c->refs == 0) {
    free(c->in);
    free(c);
  }
}

static void server_maybe_closed(ctl_server *srv);

static void on_client_closed(uv_handle_t *h) {
  ctl_client *c = h->data;
  ctl_server *srv = c->srv;
  c->srv = NULL;
  srv->handles--;
  client_unref(c);
  server_maybe_closed(srv);
}

static void client_close(ctl_client *c) {
  if (c->closing) return;
  c->closing = 1;
  ctl_server *srv = c->srv;
  if (c->prev) c->prev->next = c->next;
  else srv->head = c->next;
  if (c->next) c->next->prev = c->prev;
  srv->clients--;
  if (c->subscriber) srv->subscribers--;
  uv_close((uv_handle_t *)&c->pipe, on_client_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  ctl_client *c = req->handle->data;
  free(req);
  client_close(c);
}

/* Closes once what is queued has been written (after EOF, or after refusing a client). */
static void client_finish(ctl_client *c) {
  if (c->closing || c->shutting) return;
  c->shutting = 1;
  uv_read_stop((uv_stream_t *)&c->pipe);
  uv_shutdown_t *req = malloc(sizeof *req);
  if (!req || uv_shutdown(req, (uv_stream_t *)&c->pipe, on_shutdown) != 0) {
    free(req);
    client_close(c);
  }
}

/* ---- calls ---- */

static ctl_call *call_new(ctl_client *c) {
  ctl_call *call = calloc(1, sizeof *call);
  if (!call) return NULL;
  call->client = c;
  c->refs++;
  return call;
}

static void call_free(ctl_call *call) {
  ctl_client *c = call->client;
  json_decref(call->req);
  json_decref(call->args);
  free(call);
  client_unref(c);
}

/* Sends {"id", "ok", key: payload} (payload taken) and ends the call. */
static void call_answer(ctl_call *call, int ok, const char *key, json_t *payload) {
  ctl_client *c = call->client;
  if (call->answered) { /* a handler answering twice is a bug; the first answer stands */
    json_decref(payload);
    return;
  }
  call->answered = 1;
  if (!c->closing) {
    json_t *id = call->req && json_is_object(call->req) ? json_object_get(call->req, "id") : NULL;
    json_t *msg = json_object();
    if (msg) {
      json_object_set_new(msg, "id", id ? json_incref(id) : json_null());
      json_object_set_new(msg, "ok", json_boolean(ok));
      json_object_set_new(msg, key, payload);
      payload = NULL;
      client_send_json(c, msg);
      json_decref(msg);
    }
  }
  json_decref(payload);
  if (c->blocked == call) {
    c->blocked = NULL;
    if (!c->closing) { /* the requests queued behind it run on the next loop turn */
      c->ready = 1;
      uv_idle_start(&c->srv->resume, on_resume);
    }
  }
  if (!call->in_handler) call_free(call);
}

void ctl_reply(ctl_call *call, json_t *result) {
  call_answer(call, 1, "result", result ? result : json_object());
}

static void reply_errorv(ctl_call *call, const char *code, const char *fmt, va_list ap) {
  char msg[1024];
  int n = vsnprintf(msg, sizeof msg, fmt, ap);
  if (n >= (int)sizeof msg) { /* cut at a character boundary: the message must stay valid UTF-8 */
    size_t end = sizeof msg - 1;
    while (end && ((unsigned char)msg[end - 1] & 0xC0) == 0x80) end--;
    if (end && ((unsigned char)msg[end - 1] & 0x80)) end--;
    msg[end] = '\0';
  }
  json_t *err = json_pack("{s:s, s:s}", "code", code, "message", msg);
  if (!err) err = json_pack("{s:s, s:s}", "code", code, "message", "(message is not valid UTF-8)");
  call_answer(call, 0, "error", err);
}

void ctl_reply_error(ctl_call *call, const char *code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  reply_errorv(call, code, fmt, ap);
  va_end(ap);
}

const char *ctl_errcode_name(int rc) {
  switch (rc) {
  case MOCO_EBUSY: return "busy";
  case MOCO_ESTATE: return "state";
  case MOCO_EINVAL:
  case MOCO_ERANGE:
  case MOCO_ECONFIG: return "bad_args";
  case MOCO_ENOENT: return "not_found";
  default: return "internal";
  }
}

void ctl_reply_errno(ctl_call *call, int rc) {
  const char *msg = moco_errmsg();
  ctl_reply_error(call, ctl_errcode_name(rc), "%s", msg[0] ? msg : moco_strerror(rc));
}

void ctl_call_subscribe(ctl_call *call) {
  ctl_client *c = call->client;
  if (c->closing || c->subscriber) return;
  c->subscriber = 1;
  c->srv->subscribers++;
}

const ctl_command *ctl_call_command(const ctl_call *call) { return call->cmd; }

ctl_server *ctl_call_server(const ctl_call *call) {
  return call->client->closing ? NULL : call->client->srv;
}

/* ---- validation ---- */

static const char *json_type_name(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT: return "object";
  case JSON_ARRAY: return "array";
  case JSON_STRING: return "string";
  case JSON_INTEGER: return "integer";
  case JSON_REAL: return "real";
  case JSON_TRUE:
  case JSON_FALSE: return "boolean";
  default: return "null";
  }
}

static const char *ctl_type_name(ctl_type t) {
  static const char *names[] = {"any", "string", "integer", "number", "boolean", "object", "array"};
  return names[t];
}

json_t *ctl_describe(const ctl_server *srv) {
  json_t *list = json_array();
  for (const ctl_command *c = srv->table; list && c->name; c++) {
    json_t *args = json_array();
    for (const ctl_arg *a = c->args; a && a->name; a++)
      json_array_append_new(args, json_pack("{s:s, s:s, s:b}", "name", a->name, "type", ctl_type_name(a->type),
                                            "required", (a->flags & CTL_ARG_REQUIRED) != 0));
    json_array_append_new(list, json_pack("{s:s, s:o, s:b, s:b, s:s}", "name", c->name, "args", args, "any_args",
                                          (c->flags & CTL_ANY_ARGS) != 0, "changes_state",
                                          (c->flags & CTL_CHANGES_STATE) != 0, "help", c->help ? c->help : ""));
  }
  return list;
}

static int type_ok(ctl_type t, const json_t *v) {
  switch (t) {
  case CTL_T_STRING: return json_is_string(v);
  case CTL_T_INT: return json_is_integer(v);
  case CTL_T_NUMBER: return json_is_number(v);
  case CTL_T_BOOL: return json_is_boolean(v);
  case CTL_T_OBJECT: return json_is_object(v);
  case CTL_T_ARRAY: return json_is_array(v);
  default: return 1;
  }
}

static const ctl_arg *find_arg(const ctl_arg *spec, const char *name) {
  for (; spec && spec->name; spec++)
    if (strcmp(spec->name, name) == 0) return spec;
  return NULL;
}

/* Answers bad_args and returns -1 at the first field that breaks cmd's spec. */
static int check_args(ctl_call *call, const ctl_command *cmd, json_t *args) {
  const char *key;
  json_t *v;
  if (cmd->flags & CTL_ANY_ARGS) return 0;
  json_object_foreach(args, key, v) {
    const ctl_arg *a = find_arg(cmd->args, key);
    if (!a) {
      char allowed[512] = "";
      size_t n = 0;
      for (const ctl_arg *s = cmd->args; s && s->name && n < sizeof allowed; s++)
        n += snprintf(allowed + n, sizeof allowed - n, "%s%s", n ? ", " : "", s->name);
      ctl_reply_error(call, "bad_args", "args.%s: unknown argument of '%s' (%s%s)", key, cmd->name,
                      n ? "allowed: " : "it takes none", allowed);
      return -1;
    }
    if (!type_ok(a->type, v)) {
      ctl_reply_error(call, "bad_args", "args.%s: expected %s, got %s", key, ctl_type_name(a->type),
                      json_type_name(v));
      return -1;
    }
    if ((a->type == CTL_T_INT || a->type == CTL_T_NUMBER) && a->min < a->max) {
      double x = json_number_value(v);
      if (!(x >= a->min && x <= a->max)) {
        ctl_reply_error(call, "bad_args", "args.%s: %g is out of range [%g, %g]", key, x, a->min,
                        a->max);
        return -1;
      }
    }
  }
  for (const ctl_arg *a = cmd->args; a && a->name; a++)
    if ((a->flags & CTL_ARG_REQUIRED) && !json_object_get(args, a->name)) {
      ctl_reply_error(call, "bad_args", "args.%s: missing (required by '%s')", a->name, cmd->name);
      return -1;
    }
  return 0;
}

static const ctl_command *find_command(const ctl_command *table, const char *name) {
  for (; table->name; table++)
    if (strcmp(table->name, name) == 0) return table;
  return NULL;
}

/* Parses and checks the request; on failure answers the call and returns -1. */
static int parse_request(ctl_call *call, const char *line, size_t len) {
  ctl_server *srv = call->client->srv;
  json_error_t jerr;
  call->req = json_loadb(line, len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &jerr);
  if (!call->req) {
    ctl_reply_error(call, "bad_json", "column %d: %s", jerr.column, jerr.text);
    return -1;
  }
  if (!json_is_object(call->req)) {
    ctl_reply_error(call, "bad_request", "request: expected a JSON object, got %s",
                    json_type_name(call->req));
    return -1;
  }
  const char *key;
  json_t *v;
  json_object_foreach(call->req, key, v) {
    if (strcmp(key, "id") && strcmp(key, "cmd") && strcmp(key, "args")) {
      ctl_reply_error(call, "bad_request", "request.%s: unknown key (allowed: id, cmd, args)", key);
      return -1;
    }
  }
  json_t *cmd = json_object_get(call->req, "cmd");
  if (!cmd || !json_is_string(cmd)) {
    ctl_reply_error(call, "bad_request", "request.cmd: %s%s", cmd ? "expected string, got " : "missing",
                    cmd ? json_type_name(cmd) : "");
    return -1;
  }
  call->cmd = find_command(srv->table, json_string_value(cmd));
  if (!call->cmd) {
    ctl_reply_error(call, "unknown_command", "unknown command '%s'", json_string_value(cmd));
    return -1;
  }
  json_t *args = json_object_get(call->req, "args");
  if (args && !json_is_object(args)) {
    ctl_reply_error(call, "bad_args", "args: expected object, got %s", json_type_name(args));
    return -1;
  }
  call->args = args ? json_incref(args) : json_object();
  if (!call->args) {
    ctl_reply_error(call, "internal", "out of memory");
    return -1;
  }
  return check_args(call, call->cmd, call->args);
}

static void run_handler(ctl_call *call) {
  ctl_client *c = call->client;
  ctl_server *srv = c->srv;
  if (srv->cfg.gate && srv->cfg.gate(call, call->cmd, srv->data) != 0) {
    if (!call->answered) ctl_reply_error(call, "state", "'%s' refused now", call->cmd->name);
    return;
  }
  moco_error_clear();
  int rc = call->cmd->handler(call, call->args, srv->data);
  if (call->answered) return;
  if (rc < 0) ctl_reply_errno(call, rc);
  else if (!c->closing) { /* deferred: the client's next requests wait for this answer */
    c->blocked = call;
    uv_read_stop((uv_stream_t *)&c->pipe);
  }
}

static void handle_line(ctl_client *c, char *line, size_t len) {
  while (len && (line[len - 1] == '\r' || line[len - 1] == ' ' || line[len - 1] == '\t')) len--;
  if (len == 0) return; /* blank lines are keep-alives, not requests */
  ctl_call *call = call_new(c);
  if (!call) {
    client_close(c);
    return;
  }
  call->in_handler = 1; /* an answer given inside leaves freeing the call to us */
  if (parse_request(call, line, len) == 0) run_handler(call);
  call->in_handler = 0;
  if (call->answered) call_free(call);
}

/* ---- input ---- */

static void answer_too_long(ctl_client *c, size_t max_line) {
  ctl_call *call = call_new(c);
  if (!call) {
    client_close(c);
    return;
  }
  ctl_reply_error(call, "line_too_long",
                  "request line longer than %zu bytes; discarded up to its newline", max_line);
}

/* Runs every complete line in the buffer, until the client blocks on a deferred call or closes. The
 * buffer never holds more than max_line + 1 bytes, so every complete line in it is within the limit. */
static void process_input(ctl_client *c) {
  size_t pos = 0, max_line = c->srv->cfg.max_line;
  while (!c->closing && !c->blocked && pos < c->in_len) {
    char *start = c->in + pos, *nl = memchr(start, '\n', c->in_len - pos);
    if (!nl) break;
    size_t len = (size_t)(nl - start);
    pos += len + 1;
    if (c->discarding) c->discarding = 0; /* the tail of an over-long line ends here */
    else handle_line(c, start, len);
  }
  if (c->closing) return;
  if (pos) {
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
  }
  if (c->blocked) return;
  if (c->discarding) c->in_len = 0;
  else if (c->in_len > max_line) { /* no newline within the limit: answer now, drop up to the newline */
    answer_too_long(c, max_line);
    c->discarding = 1;
    c->in_len = 0;
  }
}

static int in_reserve(ctl_client *c, size_t need) {
  if (c->in_cap >= need) return 0;
  size_t cap = c->in_cap ? c->in_cap : CTL_INBUF_MIN;
  while (cap < need) cap *= 2;
  char *p = realloc(c->in, cap);
  if (!p) return -1;
  c->in = p;
  c->in_cap = cap;
  return 0;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  ctl_client *c = h->data;
  size_t limit = c->srv->cfg.max_line + 1;
  size_t want = c->in_len + CTL_INBUF_MIN < limit ? c->in_len + CTL_INBUF_MIN : limit;
  if (c->in_len == c->in_cap && in_reserve(c, want) != 0) {
    *buf = uv_buf_init(NULL, 0); /* libuv reports UV_ENOBUFS and the client is closed */
    return;
  }
  size_t room = (c->in_cap < limit ? c->in_cap : limit) - c->in_len;
  *buf = uv_buf_init(c->in + c->in_len, (unsigned)room);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  ctl_client *c = s->data;
  if (nread == UV_EOF) {
    /* A last request without its newline still counts: `printf '{"cmd":"status"}' | nc -U` works. */
    c->eof = 1;
    uv_read_stop(s);
    if (c->in_len && !c->discarding && in_reserve(c, c->in_len + 1) == 0) c->in[c->in_len++] = '\n';
  } else if (nread < 0) {
    client_close(c);
    return;
  } else {
    c->in_len += (size_t)nread;
  }
  client_drive(c);
}

/* Runs what is buffered, then reads on, waits for a deferred answer, or closes after EOF. */
static void client_drive(ctl_client *c) {
  process_input(c);
  if (c->closing || c->blocked) return;
  if (c->eof) client_finish(c);
  else uv_read_start((uv_stream_t *)&c->pipe, on_alloc, on_read);
}

static void on_resume(uv_idle_t *idle) {
  ctl_server *srv = idle->data;
  uv_idle_stop(idle);
  /* Rescan from the head each time: driving one client can close others (a broadcast drops them). */
  for (;;) {
    ctl_client *c = srv->head;
    while (c && !c->ready) c = c->next;
    if (!c) break;
    c->ready = 0;
    client_drive(c);
  }
}

/* ---- server ---- */

static void on_connection(uv_stream_t *listener, int status) {
  ctl_server *srv = listener->data;
  if (status < 0 || srv->closing) return;
  ctl_client *c = calloc(1, sizeof *c);
  if (!c) return;
  c->srv = srv;
  c->refs = 1;
  c->pipe.data = c;
  uv_pipe_init(srv->loop, &c->pipe, 0);
  srv->handles++;
  c->next = srv->head;
  if (srv->head) srv->head->prev = c;
  srv->head = c;
  srv->clients++;
  if (uv_accept(listener, (uv_stream_t *)&c->pipe) != 0) {
    client_close(c);
    return;
  }
  if (srv->clients > srv->cfg.max_clients) {
    srv->rejected++;
    ctl_call *call = call_new(c);
    if (call)
      ctl_reply_error(call, "busy", "too many clients (at most %d); try again later",
                      srv->cfg.max_clients);
    client_finish(c);
    return;
  }
  uv_read_start((uv_stream_t *)&c->pipe, on_alloc, on_read);
}

void ctl_config_default(ctl_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->path = CTL_DEFAULT_SOCKET;
  cfg->max_line = CTL_MAX_LINE;
  cfg->max_output = CTL_MAX_OUTPUT;
  cfg->max_clients = CTL_MAX_CLIENTS;
}

/* Something at the path: a live server (refuse), a stale socket from a crashed run (remove; returns 1),
 * or a file that is not a socket (refuse: it is not ours to delete). */
static int clear_stale(const char *path) {
  struct stat st;
  if (lstat(path, &st) != 0)
    return errno == ENOENT ? 0 : moco_error(MOCO_EIO, "socket %s: %s", path, strerror(errno));
  if (!S_ISSOCK(st.st_mode))
    return moco_error(MOCO_EINVAL, "socket %s: the path exists and is not a socket", path);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  memcpy(sa.sun_path, path, strlen(path) + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return moco_error(MOCO_EIO, "socket %s: socket(): %s", path, strerror(errno));
  int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa), err = errno;
  close(fd);
  /* EAGAIN: a live server whose backlog is full. */
  if (rc == 0 || err == EAGAIN || err == EINPROGRESS)
    return moco_error(MOCO_EBUSY, "socket %s is in use by a running mocod", path);
  if (err == ENOENT) return 0;
  if (err != ECONNREFUSED)
    return moco_error(MOCO_EIO, "socket %s: cannot tell whether it is in use: %s", path,
                      strerror(err));
  if (unlink(path) != 0 && errno != ENOENT)
    return moco_error(MOCO_EIO, "socket %s: removing the stale socket: %s", path, strerror(errno));
  return 1;
}

static int make_parent(const char *path) {
  const char *slash = strrchr(path, '/');
  if (!slash || slash == path) return 0;
  char dir[sizeof(((struct sockaddr_un *)0)->sun_path)];
  size_t n = (size_t)(slash - path);
  memcpy(dir, path, n);
  dir[n] = '\0';
  if (mkdir(dir, 0700) != 0 && errno != EEXIST)
    return moco_error(MOCO_EIO, "socket %s: creating directory %s: %s", path, dir, strerror(errno));
  return 0;
}

/* Binds and listens on a socket that only its owner can connect to: the mode is set between bind and
 * listen, while connections are still refused, so there is no moment when others could get in. chmod
 * rather than umask, because umask is per process and other threads may be creating files. */
static int open_socket(ctl_server *srv, const char *path, int *out_fd) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  memcpy(sa.sun_path, path, strlen(path) + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return moco_error(MOCO_EIO, "socket %s: socket(): %s", path, strerror(errno));
  struct stat st;
  int rc = 0;
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    rc = errno == EADDRINUSE ? moco_error(MOCO_EBUSY, "socket %s is in use by a running mocod", path)
                             : moco_error(MOCO_EIO, "socket %s: bind: %s", path, strerror(errno));
    close(fd);
    return rc;
  }
  if (chmod(path, 0600) != 0 || stat(path, &st) != 0)
    rc = moco_error(MOCO_EIO, "socket %s: setting mode 0600: %s", path, strerror(errno));
  else if ((st.st_mode & 0777) != 0600)
    rc = moco_error(MOCO_EIO, "socket %s: mode is %03o after chmod, expected 0600", path,
                    (unsigned)(st.st_mode & 0777));
  else if (listen(fd, 128) != 0)
    rc = moco_error(MOCO_EIO, "socket %s: listen: %s", path, strerror(errno));
  if (rc) {
    close(fd);
    unlink(path);
    return rc;
  }
  srv->ino = st.st_ino;
  srv->dev = st.st_dev;
  *out_fd = fd;
  return 0;
}

int ctl_init(ctl_server *srv, uv_loop_t *loop, const ctl_config *cfg, const ctl_command *table,
             void *data) {
  memset(srv, 0, sizeof *srv);
  ctl_config_default(&srv->cfg);
  if (cfg) srv->cfg = *cfg;
  const char *path = srv->cfg.path ? srv->cfg.path : CTL_DEFAULT_SOCKET;
  if (strlen(path) == 0 || strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path))
    return moco_error(MOCO_EINVAL, "socket %s: path length %zu, allowed 1..%zu", path, strlen(path),
                      sizeof(((struct sockaddr_un *)0)->sun_path) - 1);
  if (srv->cfg.max_line == 0 || srv->cfg.max_output == 0 || srv->cfg.max_clients <= 0)
    return moco_error(MOCO_EINVAL, "socket %s: max_line, max_output and max_clients must be > 0", path);
  srv->path = strdup(path);
  if (!srv->path) return moco_error(MOCO_ENOMEM, "socket %s: out of memory", path);
  srv->cfg.path = srv->path;
  srv->loop = loop;
  srv->table = table;
  srv->data = data;

  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);

  int fd = -1, rc = make_parent(path);
  if (!rc && (rc = clear_stale(path)) == 1) {
    srv->replaced_stale = 1;
    rc = 0;
  }
  if (!rc) rc = open_socket(srv, path, &fd);
  if (rc) {
    free(srv->path);
    srv->path = NULL;
    return rc;
  }
  /* From here on the handles exist; a failure closes them and the loop finishes the close. */
  uv_pipe_init(loop, &srv->listener, 0);
  uv_idle_init(loop, &srv->resume);
  srv->listener.data = srv->resume.data = srv;
  srv->handles = 2;
  int uvrc = uv_pipe_open(&srv->listener, fd);
  if (uvrc) close(fd); /* not adopted by the handle */
  else uvrc = uv_listen((uv_stream_t *)&srv->listener, 128, on_connection);
  if (uvrc) {
    ctl_close(srv, NULL);
    return moco_error(MOCO_EIO, "socket %s: listening: %s", path, uv_strerror(uvrc));
  }
  return 0;
}

static void on_server_handle_closed(uv_handle_t *h) {
  ctl_server *srv = h->data;
  srv->handles--;
  server_maybe_closed(srv);
}

static void server_maybe_closed(ctl_server *srv) {
  if (!srv->closing || srv->handles > 0) return;
  struct stat st;
  /* Unlink only the socket we bound: a newer mocod may own the path now. */
  if (stat(srv->path, &st) == 0 && (unsigned long long)st.st_ino == srv->ino &&
      (unsigned long long)st.st_dev == srv->dev)
    unlink(srv->path);
  free(srv->path);
  srv->path = NULL;
  if (srv->close_cb) srv->close_cb(srv);
}

void ctl_close(ctl_server *srv, void (*cb)(ctl_server *)) {
  if (srv->closing) return;
  srv->closing = 1;
  srv->close_cb = cb;
  while (srv->head) client_close(srv->head);
  uv_close((uv_handle_t *)&srv->listener, on_server_handle_closed);
  uv_close((uv_handle_t *)&srv->resume, on_server_handle_closed);
}

int ctl_broadcast(ctl_server *srv, const char *line) {
  if (srv->closing || srv->subscribers == 0) return 0;
  size_t len = strlen(line);
  while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) len--;
  out_buf *b = out_new(line, len);
  if (!b) return 0;
  int sent = 0;
  for (ctl_client *c = srv->head, *next; c; c = next) {
    next = c->next; /* client_send may close c (over max_output), unlinking it */
    if (c->subscriber && !c->shutting) {
      client_send(c, b);
      sent += !c->closing;
    }
  }
  out_unref(b);
  return sent;
}
