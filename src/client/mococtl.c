/* mococtl: the command-line client of mocod's control socket (protocol: include/service/ctl.h).
 * Plain blocking sockets and a line buffer; no event loop is needed for one request at a time. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "core/clock.h"
#include "service/ctl.h"

/* Exit status, for scripts. */
enum { EXIT_OK = 0, EXIT_ANSWERED_ERROR = 1, EXIT_UNREACHABLE = 2, EXIT_USAGE = 3 };

/* An answer longer than this is not from mocod. */
#define MAX_ANSWER (64u << 20)
/* How long a command answered from mocod's loop may take before mocod counts as not answering. */
#define DEFAULT_TIMEOUT 30.0
/* Significant digits of a real in human output, alone or inside an array. */
#define HUMAN_REAL_DIGITS 6

/* What mococtl knows of each command of mocod's table (src/service/server.c; `mococtl commands` lists
 * the daemon's): how the words after it become the request's args, whether it waits for work off
 * mocod's loop, and its usage line. A command the daemon has and this table lacks still works through
 * the generic path (KEY=VALUE words as args); a row adds it to the usage, the completion script and the
 * check in tests/test_mococtl.c that the two tables agree. */
typedef enum {
  W_NONE,  /* no words */
  W_PAIRS, /* KEY=VALUE words, KEY one of `args` (NULL: any) */
  W_SET,   /* KEY=VALUE words, any config key: the args object itself */
  W_KEY,   /* an optional config key or section */
  W_RAW,   /* one JSON request line, sent as is */
  W_MODEL, /* PATH [query|key]: the path made absolute (the daemon may run elsewhere) */
} words_kind;

typedef struct {
  const char *name;  /* as typed */
  const char *cmd;   /* the protocol command */
  words_kind words;
  const char *args;  /* W_PAIRS: the argument names, space-separated */
  int waits;         /* answered after work off mocod's loop: no default timeout */
  const char *usage; /* the words, for the usage text */
  const char *help;
} client_cmd;

static const client_cmd client_cmds[] = {
    {"status", "status", W_NONE, NULL, 0, "", "state, progress, loss, diagnostics, speed, ETA"},
    {"metrics", "metrics", W_NONE, NULL, 0, "",
     "the Prometheus text exposition (as served by service.metrics_listen)"},
    {"pause", "pause", W_NONE, NULL, 0, "", "hold training after the current step"},
    {"resume", "resume", W_NONE, NULL, 0, "", "continue a paused run"},
    {"stop", "stop", W_NONE, NULL, 1, "", "finish the step, write a checkpoint, exit"},
    {"checkpoint", "checkpoint", W_NONE, NULL, 1, "", "write a checkpoint now (answers with the file)"},
    {"eval", "eval", W_PAIRS, "probe encoder train_limit limit", 1,
     "[probe=true] [encoder=query|key] [train_limit=N] [limit=N]",
     "kNN accuracy, alignment, uniformity now (probe=true adds the linear probe)"},
    {"export", "export", W_PAIRS, "path split encoder what", 1,
     "path=FILE.npy [split=eval|train] [encoder=query|key] [what=features|embeddings]",
     "write a split's features or embeddings as .npy (labels and ids beside it)"},
    {"set", "set", W_SET, NULL, 0, "KEY=VALUE...",
     "change runtime settings between steps (VALUE is JSON if it parses, else a string)"},
    {"config", "config", W_KEY, NULL, 0, "[KEY|SECTION]",
     "the effective config, one section (optim) or one key with its doc"},
    {"watch", "subscribe", W_NONE, NULL, 0, "", "live progress until training stops"},
    {"commands", "commands", W_NONE, NULL, 0, "", "the daemon's commands and their arguments"},
    {"export-model", "export_model", W_MODEL, NULL, 1, "PATH [query|key]",
     "write the encoder as safetensors (scripts/load_encoder.py loads it)"},
    {"raw", NULL, W_RAW, NULL, 0, "JSON", "send one request line as is, print the answer line"},
    {NULL, NULL, 0, NULL, 0, NULL, NULL},
};

static const client_cmd generic = {NULL, NULL, W_PAIRS, NULL, 0, "", ""};

static const client_cmd *find_cmd(const char *name) {
  for (const client_cmd *c = client_cmds; c->name; c++)
    if (!strcmp(c->name, name)) return c;
  return NULL;
}

static void print_usage(FILE *f) {
  fputs("usage: mococtl [-s SOCKET] [--json] [--timeout SEC] COMMAND [WORDS]\ncommands:\n", f);
  for (const client_cmd *c = client_cmds; c->name; c++) {
    char head[160];
    snprintf(head, sizeof head, "%s %s", c->name, c->usage);
    if (strlen(head) > 22) fprintf(f, "  %s\n  %22s %s\n", head, "", c->help);
    else fprintf(f, "  %-22s %s\n", head, c->help);
  }
  fputs("  OTHER KEY=VALUE...     any other command of the daemon (`commands` lists them)\n"
        "options: --json prints answers and events as JSON lines, for scripts; --timeout defaults to 30 s\n"
        "  (none for stop, checkpoint, eval, export); --bash-completion prints the completion script\n"
        "socket: -s, else $MOCOD_SOCKET, else " CTL_DEFAULT_SOCKET "\n"
        "exit status: 0 ok, 1 mocod answered an error, 2 mocod not reachable, 3 usage\n",
        f);
}

typedef struct {
  int fd;
  const char *path;
  char *buf;
  size_t len, cap;
} conn;

static int die_usage(const char *fmt, const char *arg) {
  fprintf(stderr, "mococtl: ");
  fprintf(stderr, fmt, arg);
  fputs(" (mococtl --help lists the commands)\n", stderr);
  return EXIT_USAGE;
}

static int conn_open(conn *c, const char *path) {
  memset(c, 0, sizeof *c);
  c->path = path;
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof sa.sun_path) {
    fprintf(stderr, "mococtl: cannot connect to %s: path too long\n", path);
    return -1;
  }
  strcpy(sa.sun_path, path);
  c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    fprintf(stderr, "mococtl: cannot connect to %s: %s\n", path, strerror(errno));
    if (c->fd >= 0) close(c->fd);
    return -1;
  }
  return 0;
}

static void conn_close(conn *c) {
  close(c->fd);
  free(c->buf);
}

static int conn_send(conn *c, const char *line) {
  size_t n = strlen(line);
  for (size_t off = 0; off < n + 1;) {
    const char *p = off < n ? line + off : "\n";
    size_t left = off < n ? n - off : 1;
    ssize_t k = send(c->fd, p, left, MSG_NOSIGNAL); /* a daemon gone mid-send is an error, not a signal */
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) {
      fprintf(stderr, "mococtl: %s: sending: %s\n", c->path, strerror(errno));
      return -1;
    }
    off += (size_t)k;
  }
  return 0;
}

/* The next line (NUL-terminated, in c->buf, valid until the next call). Returns its length, -1 when the
 * connection closed, -2 on timeout (timeout <= 0: none), -3 on a read error or an oversized line. */
static long conn_line(conn *c, double timeout, size_t *consumed) {
  double deadline = clock_now() + timeout;
  if (*consumed) { /* drop the line returned last time */
    memmove(c->buf, c->buf + *consumed, c->len - *consumed);
    c->len -= *consumed;
    *consumed = 0;
  }
  for (;;) {
    char *nl = c->buf ? memchr(c->buf, '\n', c->len) : NULL;
    if (nl) {
      *nl = '\0';
      *consumed = (size_t)(nl - c->buf) + 1;
      return (long)(nl - c->buf);
    }
    if (c->len + 4096 > c->cap) {
      if (c->cap >= MAX_ANSWER) return -3;
      size_t cap = c->cap ? c->cap * 2 : 65536;
      char *p = realloc(c->buf, cap);
      if (!p) return -3;
      c->buf = p;
      c->cap = cap;
    }
    if (timeout > 0) {
      double left = deadline - clock_now();
      struct pollfd pf = {.fd = c->fd, .events = POLLIN};
      int r = left > 0 ? poll(&pf, 1, (int)ceil(left * 1000)) : 0;
      if (r < 0 && errno == EINTR) continue;
      if (r == 0) return -2;
    }
    ssize_t k = read(c->fd, c->buf + c->len, c->cap - c->len - 1);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) return -3;
    if (k == 0) return -1;
    c->len += (size_t)k;
  }
}

/* Reads lines until one that is a response (subscribers also get events). Returns the parsed response
 * or NULL after printing why; *raw keeps the line when asked. */
static json_t *conn_answer(conn *c, double timeout, size_t *consumed, char **raw) {
  for (;;) {
    long n = conn_line(c, timeout, consumed);
    if (n == -1) fprintf(stderr, "mococtl: %s: connection closed before the answer\n", c->path);
    if (n == -2) fprintf(stderr, "mococtl: %s: no answer within %g s\n", c->path, timeout);
    if (n == -3) fprintf(stderr, "mococtl: %s: reading the answer failed\n", c->path);
    if (n < 0) return NULL;
    json_t *msg = json_loadb(c->buf, (size_t)n, 0, NULL);
    if (!msg) {
      fprintf(stderr, "mococtl: %s: the answer is not JSON: %.200s\n", c->path, c->buf);
      return NULL;
    }
    if (!json_object_get(msg, "event")) {
      if (raw) *raw = strdup(c->buf);
      return msg;
    }
    json_decref(msg);
  }
}

/* ---- human-readable output ---- */

static void print_scalar(FILE *f, const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_STRING: fputs(json_string_value(v), f); break;
  case JSON_INTEGER: fprintf(f, "%" JSON_INTEGER_FORMAT, json_integer_value(v)); break;
  case JSON_REAL: fprintf(f, "%.*g", HUMAN_REAL_DIGITS, json_real_value(v)); break;
  case JSON_TRUE: fputs("true", f); break;
  case JSON_FALSE: fputs("false", f); break;
  case JSON_NULL: fputs("-", f); break;
  default: { /* arrays (and objects where a scalar is expected) stay JSON, their reals as short as
                 the scalars' rather than every digit a double holds */
    char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(HUMAN_REAL_DIGITS));
    fputs(s ? s : "?", f);
    free(s);
  }
  }
}

static void format_duration(char *out, size_t n, double sec);

/* Times as dates, durations as h:mm:ss, the rest as they came: the key says which. */
static void print_value(FILE *f, const char *key, const json_t *v) {
  size_t n = strlen(key);
  int is_time = !strcmp(key, "time") || (n > 5 && !strcmp(key + n - 5, "_time"));
  int is_span = !strcmp(key, "eta_sec") || !strcmp(key, "uptime_sec");
  if (json_is_number(v) && is_time) {
    time_t t = (time_t)json_number_value(v);
    struct tm tm;
    char buf[64];
    strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S %Z", localtime_r(&t, &tm));
    fputs(buf, f);
  } else if (json_is_number(v) && is_span) {
    char buf[32];
    format_duration(buf, sizeof buf, json_number_value(v));
    fputs(buf, f);
  } else {
    print_scalar(f, v);
  }
}

/* "key: value" lines with the values aligned; nested objects after them, indented under their key. */
static void print_object(const json_t *obj, int indent) {
  const char *key;
  json_t *v;
  int width = 0;
  json_object_foreach((json_t *)obj, key, v) if ((int)strlen(key) > width) width = (int)strlen(key);
  for (int nested = 0; nested < 2; nested++) {
    json_object_foreach((json_t *)obj, key, v) {
      if (nested != (json_is_object(v) && json_object_size(v) > 0)) continue;
      if (nested) {
        printf("%*s%s:\n", indent, "", key);
        print_object(v, indent + 2);
        continue;
      }
      printf("%*s%s:%*s ", indent, "", key, width - (int)strlen(key), "");
      print_value(stdout, key, v);
      putchar('\n');
    }
  }
}

static void format_duration(char *out, size_t n, double sec) {
  if (!(sec >= 0) || sec > 1e8) {
    snprintf(out, n, "-");
    return;
  }
  long s = lround(sec);
  snprintf(out, n, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
}

static double num(const json_t *obj, const char *key, int *found) {
  json_t *v = json_object_get(obj, key);
  *found = json_is_number(v);
  return *found ? json_number_value(v) : 0;
}

/* status: the known fields first in a fixed order, then whatever else mocod sent. */
static void print_status(const json_t *result) {
  json_t *rest = json_deep_copy(result);
  json_t *top = json_object();
  int has_step, has_total, has_progress;
  double step = num(result, "step", &has_step), total = num(result, "total_steps", &has_total);
  double progress = num(result, "progress", &has_progress);
  if (json_object_get(result, "state")) json_object_set(top, "state", json_object_get(result, "state"));
  if (has_step) {
    char s[96];
    int n = snprintf(s, sizeof s, "%.0f", step);
    if (has_total) n += snprintf(s + n, sizeof s - (size_t)n, " / %.0f", total);
    if (has_progress) snprintf(s + n, sizeof s - (size_t)n, " (%.1f%%)", 100 * progress);
    json_object_set_new(top, "step", json_string(s));
  }
  static const char *order[] = {"epoch", "loss", "lr", "temperature", "hardness", "samples_per_sec",
                                "eta_sec", "queue_fill", NULL};
  for (int i = 0; order[i]; i++) {
    json_t *v = json_object_get(result, order[i]);
    if (v && !strcmp(order[i], "eta_sec")) { /* the same h:mm:ss as watch's bar */
      char d[32];
      format_duration(d, sizeof d, json_is_number(v) ? json_number_value(v) : -1);
      json_object_set_new(top, "eta", json_string(d));
    } else if (v) {
      json_object_set(top, order[i], v);
    }
  }
  static const char *shown[] = {"state", "step", "total_steps", "progress", NULL};
  for (int i = 0; shown[i]; i++) json_object_del(rest, shown[i]);
  for (int i = 0; order[i]; i++) json_object_del(rest, order[i]);
  json_object_update(top, rest); /* last_checkpoint, last_eval, diagnostics, and anything new */
  print_object(top, 0);
  json_decref(top);
  json_decref(rest);
}

/* ---- watch ---- */

/* One line: "[#####.....] 500/1000  50.0%  loss 4.500  inst_acc 0.250  hardness 0.50  900 samples/s  ETA 0:01:01" */
static void format_progress(char *out, size_t n, const json_t *ev) {
  int has_step, has_total, f;
  double step = num(ev, "step", &has_step), total = num(ev, "total_steps", &has_total);
  size_t k = 0;
#define ADD(...) k += (size_t)snprintf(out + k, k < n ? n - k : 0, __VA_ARGS__)
  if (has_step && has_total && total > 0) {
    enum { W = 24 };
    int fill = (int)(W * fmin(fmax(step / total, 0), 1));
    ADD("[%.*s%.*s] %.0f/%.0f %5.1f%%", fill, "########################", W - fill,
        "........................", step, total, 100 * step / total);
  } else if (has_step) {
    ADD("step %.0f", step);
  }
  double v;
  if ((v = num(ev, "loss", &f)), f) ADD("  loss %.4f", v);
  if ((v = num(ev, "inst_acc", &f)), f) ADD("  inst_acc %.3f", v);
  if ((v = num(ev, "hardness", &f)), f) ADD("  hardness %.2f", v);
  if ((v = num(ev, "samples_per_sec", &f)), f) ADD("  %.0f samples/s", v);
  if ((v = num(ev, "eta_sec", &f)), f) {
    char d[32];
    format_duration(d, sizeof d, v);
    ADD("  ETA %s", d);
  }
#undef ADD
  if (k >= n && n) out[n - 1] = '\0';
}

/* Any other event: "eval: step 500  knn_acc 0.8125". */
static void print_event(const json_t *ev) {
  const char *key;
  json_t *v;
  printf("%s:", json_string_value(json_object_get(ev, "event")));
  json_object_foreach((json_t *)ev, key, v) {
    if (!strcmp(key, "event") || !strcmp(key, "time")) continue;
    printf("  %s ", key);
    print_value(stdout, key, v);
  }
  putchar('\n');
}

/* Draws progress events as one bar redrawn in place (terminals) or one line each; other events as lines,
 * the bar redrawn under them. Ends with 0 at a stop or finished event, 2 if the connection closes first. */
static int watch(conn *c, const json_t *subscribed, int as_json, size_t *consumed) {
  const char *state = json_string_value(json_object_get(subscribed, "state"));
  if (!as_json) {
    json_t *ev = json_deep_copy(subscribed);
    json_object_set_new(ev, "event", json_string("subscribed"));
    print_event(ev);
    json_decref(ev);
    fflush(stdout);
  }
  if (state && (!strcmp(state, "finished") || !strcmp(state, "error")))
    return EXIT_OK; /* nothing more will come */
  int tty = isatty(STDOUT_FILENO);
  char bar[512] = "";
  for (;;) {
    long n = conn_line(c, 0, consumed);
    if (n < 0) {
      if (bar[0]) putchar('\n');
      fflush(stdout);
      fprintf(stderr, "mococtl: %s: connection closed before training ended\n", c->path);
      return EXIT_UNREACHABLE;
    }
    json_t *ev = json_loadb(c->buf, (size_t)n, 0, NULL);
    const char *name = json_string_value(json_object_get(ev, "event"));
    if (!name) { /* a response, or noise: not an event */
      json_decref(ev);
      continue;
    }
    int end = !strcmp(name, "stop") || !strcmp(name, "finished");
    if (as_json) {
      puts(c->buf);
    } else if (!strcmp(name, "progress")) {
      format_progress(bar, sizeof bar, ev);
      if (tty) printf("\r%s\033[K", bar);
      else puts(bar);
    } else {
      if (tty && bar[0]) fputs("\r\033[K", stdout); /* the event line goes where the bar was */
      print_event(ev);
      if (tty && bar[0] && !end) printf("%s\033[K", bar);
    }
    fflush(stdout);
    json_decref(ev);
    if (end) {
      if (tty && bar[0] && !strcmp(name, "progress")) putchar('\n');
      return EXIT_OK;
    }
  }
}

/* ---- main ---- */

/* KEY=VALUE words as an args object; VALUE is JSON when it parses (0.01, true, "x"), else text. With
 * `allowed` (space-separated names), KEY must be one of them. Returns NULL after writing the problem. */
static int word_in(const char *list, const char *w, size_t n) {
  for (const char *p = list; *p;) {
    size_t k = strcspn(p, " ");
    if (k == n && !strncmp(p, w, n)) return 1;
    p += k + (p[k] == ' ');
  }
  return 0;
}

static json_t *parse_pairs(int argc, char **argv, const char *allowed, char *problem, size_t n) {
  json_t *args = json_object();
  for (int i = 0; i < argc; i++) {
    const char *eq = strchr(argv[i], '=');
    size_t klen = eq ? (size_t)(eq - argv[i]) : 0;
    if (!klen || (allowed && !word_in(allowed, argv[i], klen))) {
      if (!klen) snprintf(problem, n, "'%.100s': expected KEY=VALUE", argv[i]);
      else snprintf(problem, n, "'%.100s': unknown argument; allowed: %s", argv[i], allowed);
      json_decref(args);
      return NULL;
    }
    json_t *v = json_loads(eq + 1, JSON_DECODE_ANY, NULL);
    if (!v) v = json_string(eq + 1);
    json_object_setn_new(args, argv[i], klen, v);
  }
  return args;
}

typedef struct {
  const char *path;
  int as_json;
  double timeout; /* seconds; 0: none */
  const char *cmd;             /* the word typed */
  const client_cmd *row;       /* its row, or &generic */
  char **words; /* the command's own words */
  int nwords;
} options;

static void print_completion(void);

/* Options may come before or after the command; "--" ends them. Returns 0, or an exit status
 * (-1: done, exit 0). */
static int parse_options(int argc, char **argv, options *o) {
  const char *env = getenv("MOCOD_SOCKET");
  memset(o, 0, sizeof *o);
  o->path = env && *env ? env : CTL_DEFAULT_SOCKET;
  o->timeout = -1;
  o->words = argv; /* reused in place: words never outnumber argv */
  int n = 0, done = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (done || a[0] != '-' || !a[1]) o->words[n++] = argv[i];
    else if (!strcmp(a, "--")) done = 1;
    else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      print_usage(stdout);
      return -1;
    } else if (!strcmp(a, "--bash-completion")) {
      print_completion();
      return -1;
    } else if (!strcmp(a, "--json")) o->as_json = 1;
    else if (!strcmp(a, "-s") || !strcmp(a, "--socket")) {
      if (++i == argc) return die_usage("%s needs a socket path", a);
      o->path = argv[i];
    } else if (!strcmp(a, "--timeout")) {
      char *end;
      if (++i == argc) return die_usage("%s needs seconds", a);
      o->timeout = strtod(argv[i], &end);
      if (*end || !(o->timeout >= 0)) return die_usage("--timeout: '%s' is not seconds", argv[i]);
    } else return die_usage("unknown option %s", a);
  }
  if (n == 0) return die_usage("%s", "no command given");
  o->cmd = o->words[0];
  o->row = find_cmd(o->cmd);
  if (!o->row) o->row = &generic;
  o->words++;
  o->nwords = n - 1;
  /* Commands that wait for work done off mocod's loop (a whole evaluation, a checkpoint write, the
   * last step before stopping) wait as long as it takes; the rest are answered from the loop at once. */
  if (o->timeout < 0) o->timeout = o->row->waits ? 0 : DEFAULT_TIMEOUT;
  return 0;
}

/* mocod resolves a relative path from its own directory, not ours: send it absolute. */
static json_t *export_model_args(const char *path, const char *encoder) {
  char cwd[4096], abs[8200];
  if (path[0] != '/') {
    if (!getcwd(cwd, sizeof cwd)) return NULL;
    snprintf(abs, sizeof abs, "%s/%s", cwd, path);
    path = abs;
  }
  json_t *args = json_pack("{s:s}", "path", path);
  if (encoder) json_object_set_new(args, "encoder", json_string(encoder));
  return args;
}

/* The request line for the command, or NULL after a usage message. */
static char *build_request(const options *o) {
  const client_cmd *r = o->row;
  json_t *args = NULL;
  char problem[400] = "";
  switch (r->words) {
  case W_RAW:
    if (o->nwords == 1) return strdup(o->words[0]);
    snprintf(problem, sizeof problem, "raw needs exactly one JSON request");
    break;
  case W_KEY:
    if (o->nwords == 1) args = json_pack("{s:s}", "key", o->words[0]);
    else if (o->nwords > 1) snprintf(problem, sizeof problem, "%s takes at most one key", o->cmd);
    break;
  case W_SET:
    if (o->nwords < 1) snprintf(problem, sizeof problem, "set needs KEY=VALUE words");
    else args = parse_pairs(o->nwords, o->words, NULL, problem, sizeof problem);
    break;
  case W_PAIRS:
    if (o->nwords) args = parse_pairs(o->nwords, o->words, r->args, problem, sizeof problem);
    break;
  case W_MODEL:
    if (o->nwords < 1 || o->nwords > 2 || (o->nwords == 2 && strcmp(o->words[1], "query") && strcmp(o->words[1], "key")))
      snprintf(problem, sizeof problem, "export-model needs PATH and optionally query or key");
    else if (!(args = export_model_args(o->words[0], o->nwords == 2 ? o->words[1] : NULL)))
      snprintf(problem, sizeof problem, "export-model: cannot resolve %.100s", o->words[0]);
    break;
  case W_NONE:
    if (o->nwords) snprintf(problem, sizeof problem, "%s takes no arguments", o->cmd);
    break;
  }
  if (problem[0]) {
    die_usage("%s", problem);
    return NULL;
  }
  json_t *req = json_pack("{s:i, s:s}", "id", 1, "cmd", r->cmd ? r->cmd : o->cmd);
  if (args) json_object_set_new(req, "args", args);
  char *line = json_dumps(req, JSON_COMPACT);
  json_decref(req);
  return line;
}

static const char *str_or(const json_t *v, const char *fallback) {
  return json_is_string(v) ? json_string_value(v) : fallback;
}

/* commands: one line per command, its arguments, what it does. */
static void print_commands(const json_t *result) {
  size_t i;
  json_t *c;
  json_array_foreach(json_object_get(result, "commands"), i, c) {
    char args[256] = "";
    size_t k = 0, j;
    json_t *a;
    json_array_foreach(json_object_get(c, "args"), j, a) {
      int req = json_is_true(json_object_get(a, "required"));
      k += (size_t)snprintf(args + k, k < sizeof args ? sizeof args - k : 0, "%s%s%s=%s%s", k ? " " : "",
                            req ? "" : "[", str_or(json_object_get(a, "name"), "?"),
                            str_or(json_object_get(a, "type"), "?"), req ? "" : "]");
    }
    if (json_is_true(json_object_get(c, "any_args"))) snprintf(args, sizeof args, "KEY=VALUE...");
    printf("%s%s%s\n    %s\n", str_or(json_object_get(c, "name"), "?"), args[0] ? " " : "", args,
           str_or(json_object_get(c, "help"), ""));
  }
}

static void print_result(const options *o, const json_t *result) {
  if (o->as_json || (!strcmp(o->cmd, "config") && o->nwords == 0)) {
    /* For people, 10 digits: 0.2 rather than jansson's round-trip 0.20000000000000001. */
    char *s = json_dumps(result, o->as_json ? JSON_COMPACT : JSON_INDENT(2) | JSON_REAL_PRECISION(10));
    puts(s ? s : "{}");
    free(s);
  } else if (!strcmp(o->cmd, "status")) {
    print_status(result);
  } else if (!strcmp(o->cmd, "commands")) {
    print_commands(result);
  } else if (!strcmp(o->cmd, "metrics")) {
    fputs(str_or(json_object_get(result, "text"), ""), stdout); /* as a scraper would see it */
  } else if (json_object_size(result)) {
    print_object(result, 0);
  } else {
    puts("ok");
  }
}

static void print_error(const options *o, const json_t *err) {
  if (o->as_json) {
    char *s = json_dumps(err, JSON_COMPACT | JSON_ENCODE_ANY);
    puts(s ? s : "null");
    free(s);
  }
  fprintf(stderr, "mococtl: %s (%s)\n", str_or(json_object_get(err, "message"), "no message"),
          str_or(json_object_get(err, "code"), "no code"));
}

/* ---- bash completion, generated from client_cmds (scripts/mococtl.bash-completion is this output) ---- */

static void print_completion(void) {
  fputs("# bash completion for mococtl, generated by `mococtl --bash-completion` from its command table\n"
        "# (tests/test_mococtl.c checks that scripts/mococtl.bash-completion is current). Use:\n"
        "#   . scripts/mococtl.bash-completion      or copy it to /etc/bash_completion.d/mococtl\n"
        "_mococtl() {\n"
        "  local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} cmd= i\n"
        "  local -a sock=()\n"
        "  for ((i = 1; i < COMP_CWORD; i++)); do\n"
        "    case ${COMP_WORDS[i]} in\n"
        "      -s|--socket) sock=(-s \"${COMP_WORDS[i+1]}\"); ((i++)) ;;\n"
        "      --timeout) ((i++)) ;;\n"
        "      -*) ;;\n"
        "      *) [[ -z $cmd ]] && cmd=${COMP_WORDS[i]} ;;\n"
        "    esac\n"
        "  done\n"
        "  case $prev in\n"
        "    -s|--socket) COMPREPLY=($(compgen -f -- \"$cur\")); return ;;\n"
        "    --timeout) return ;;\n"
        "  esac\n"
        "  if [[ $cur == -* ]]; then\n"
        "    COMPREPLY=($(compgen -W \"-s --socket --json --timeout --help --bash-completion\" -- \"$cur\"))\n"
        "    return\n"
        "  fi\n"
        "  if [[ -z $cmd ]]; then\n"
        "    COMPREPLY=($(compgen -W \"",
        stdout);
  for (const client_cmd *c = client_cmds; c->name; c++) printf("%s%s", c == client_cmds ? "" : " ", c->name);
  fputs("\" -- \"$cur\"))\n"
        "    return\n"
        "  fi\n"
        "  local keys\n"
        "  case $cmd in\n",
        stdout);
  for (const client_cmd *c = client_cmds; c->name; c++) {
    if (c->words != W_PAIRS || !c->args) continue;
    printf("    %s) keys=\"", c->name);
    for (const char *p = c->args; *p;) {
      size_t n = strcspn(p, " ");
      printf("%s%.*s=", p == c->args ? "" : " ", (int)n, p);
      p += n + (p[n] == ' ');
    }
    fputs("\" ;;\n", stdout);
  }
  /* set and config: the keys `set` may change, asked from the running daemon (no jq needed) */
  fputs("    set|config)\n"
        "      keys=$(mococtl \"${sock[@]}\" --json config 2>/dev/null | grep -o '\"runtime_keys\":\\[[^]]*' |\n"
        "             grep -o '\"[a-z0-9_.]*\"' | tr -d '\"' | sed 1d)\n"
        "      [[ $cmd == set ]] && keys=$(printf '%s= ' $keys) ;;\n"
        "    *) return ;;\n"
        "  esac\n"
        "  COMPREPLY=($(compgen -W \"$keys\" -- \"$cur\"))\n"
        "  [[ ${COMPREPLY[0]} == *= ]] && compopt -o nospace\n"
        "}\n"
        "complete -F _mococtl mococtl\n",
        stdout);
}

int main(int argc, char **argv) {
  options o;
  int rc = parse_options(argc, argv, &o);
  if (rc) return rc < 0 ? EXIT_OK : rc;
  char *request = build_request(&o);
  if (!request) return EXIT_USAGE;
  conn c;
  if (conn_open(&c, o.path) != 0) {
    free(request);
    return EXIT_UNREACHABLE;
  }
  size_t consumed = 0;
  char *raw = NULL;
  json_t *answer = conn_send(&c, request) == 0 ? conn_answer(&c, o.timeout, &consumed, &raw) : NULL;
  free(request);
  rc = EXIT_UNREACHABLE;
  if (answer) {
    int ok = json_is_true(json_object_get(answer, "ok"));
    json_t *result = json_object_get(answer, "result");
    json_t *err = json_object_get(answer, "error");
    rc = ok ? EXIT_OK : EXIT_ANSWERED_ERROR;
    if (o.row->words == W_RAW) puts(raw);
    else if (!ok && o.row == &generic && !strcmp(str_or(json_object_get(err, "code"), ""), "unknown_command"))
      rc = die_usage("unknown command '%s' (neither mococtl's nor the daemon's)", o.cmd);
    else if (!ok) print_error(&o, err);
    else if (o.row->cmd && !strcmp(o.row->cmd, "subscribe")) rc = watch(&c, result, o.as_json, &consumed);
    else print_result(&o, result);
  }
  free(raw);
  json_decref(answer);
  conn_close(&c);
  return rc;
}
