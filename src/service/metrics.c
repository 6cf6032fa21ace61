#include "service/metrics.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/err.h"

/* From a fast step (milliseconds) to a long evaluation or a large checkpoint (a minute). */
static const double bucket_le[METRICS_BUCKETS] = {0.001, 0.005, 0.01, 0.05, 0.1, 0.25,
                                                  0.5,   1,     2.5,  5,    10,  60};

void metrics_observe(metrics_hist *h, double seconds) {
  int i = 0;
  while (i < METRICS_BUCKETS && seconds > bucket_le[i]) i++;
  h->counts[i]++;
  h->count++;
  h->sum += seconds;
}

/* ---- rendering ---- */

typedef struct {
  char *p;
  size_t len, cap;
  int oom;
} text;

static void put(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(text *t, const char *fmt, ...) {
  if (t->oom) return;
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(t->p + t->len, t->cap - t->len, fmt, ap);
    va_end(ap);
    if (n < 0) {
      t->oom = 1;
      return;
    }
    if ((size_t)n < t->cap - t->len) {
      t->len += (size_t)n;
      return;
    }
    size_t cap = t->cap * 2 + (size_t)n;
    char *q = realloc(t->p, cap);
    if (!q) {
      t->oom = 1;
      return;
    }
    t->p = q;
    t->cap = cap;
  }
}

static void family(text *t, const char *name, const char *type, const char *help) {
  put(t, "# HELP mocod_%s %s\n# TYPE mocod_%s %s\n", name, help, name, type);
}

static void gauge(text *t, const char *name, const char *help, double v) {
  family(t, name, "gauge", help);
  put(t, "mocod_%s %.17g\n", name, v);
}

static void counter(text *t, const char *name, const char *help, double v) {
  family(t, name, "counter", help);
  put(t, "mocod_%s %.17g\n", name, v);
}

static void histogram(text *t, const char *name, const char *help, const metrics_hist *h) {
  family(t, name, "histogram", help);
  uint64_t cum = 0;
  for (int i = 0; i < METRICS_BUCKETS; i++) {
    cum += h->counts[i];
    put(t, "mocod_%s_bucket{le=\"%g\"} %llu\n", name, bucket_le[i], (unsigned long long)cum);
  }
  put(t, "mocod_%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)h->count);
  put(t, "mocod_%s_sum %.17g\nmocod_%s_count %llu\n", name, h->sum, name, (unsigned long long)h->count);
}

/* Resident bytes and CPU seconds (user + system) from /proc/self/stat, like client libraries'
 * process collectors; -1 when unreadable. */
static void proc_stat(double *rss, double *cpu) {
  *rss = *cpu = -1;
  FILE *f = fopen("/proc/self/stat", "r");
  if (!f) return;
  char buf[1024];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  char *p = strrchr(buf, ')'); /* the command name may hold spaces */
  unsigned long utime = 0, stime = 0;
  long rss_pages = 0;
  if (p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu %*d %*d %*d %*d %*d %*d "
                         "%*u %*u %ld", &utime, &stime, &rss_pages) == 3) {
    long tick = sysconf(_SC_CLK_TCK), page = sysconf(_SC_PAGESIZE);
    *cpu = (double)(utime + stime) / (double)(tick > 0 ? tick : 100);
    *rss = (double)rss_pages * (double)(page > 0 ? page : 4096);
  }
}

static int open_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  if (!d) return -1;
  int n = 0;
  struct dirent *de;
  while ((de = readdir(d))) n += de->d_name[0] != '.';
  closedir(d);
  return n - 1; /* the directory's own descriptor */
}

static const char *const states[] = {"running", "paused", "stopping", "finished", "error"};

char *metrics_render(const metrics_snapshot *s) {
  text t = {malloc(8192), 0, 8192, 0};
  if (!t.p) return NULL;
  family(&t, "state", "gauge", "1 for the state mocod is in");
  for (size_t i = 0; i < sizeof states / sizeof states[0]; i++)
    put(&t, "mocod_state{state=\"%s\"} %d\n", states[i], s->state && !strcmp(s->state, states[i]));
  gauge(&t, "step", "training steps done", (double)s->step);
  gauge(&t, "total_steps", "training length in steps", (double)s->total_steps);
  gauge(&t, "epoch", "passes over the training data (fractional)", s->epoch);
  gauge(&t, "learning_rate", "learning rate of the last step", s->lr);
  gauge(&t, "temperature", "loss temperature of the last step", s->temperature);
  gauge(&t, "momentum", "key-encoder momentum of the last step", s->momentum);
  gauge(&t, "hardness", "hardness in [0, 1] of the last step", s->hardness);
  if (s->have_step) {
    gauge(&t, "loss", "contrastive loss of the last step", s->loss);
    gauge(&t, "samples_per_second", "training throughput over the last progress window",
          s->samples_per_sec);
    if (s->fn_rate >= 0)
      gauge(&t, "false_negative_rate", "share of selected negatives with the query's class", s->fn_rate);
  }
  gauge(&t, "queue_filled", "keys in the negative queue", s->queue_filled);
  gauge(&t, "queue_size", "capacity of the negative queue", s->queue_size);
  if (s->ckpt_step >= 0) {
    gauge(&t, "last_checkpoint_step", "step of the newest checkpoint", (double)s->ckpt_step);
    gauge(&t, "last_checkpoint_timestamp_seconds", "Unix time of the newest checkpoint", s->ckpt_time);
  }
  counter(&t, "checkpoint_failures_total", "checkpoints that could not be written", (double)s->ckpt_failures);
  if (s->have_knn) gauge(&t, "last_knn_accuracy", "kNN accuracy of the last evaluation", s->knn_acc);
  gauge(&t, "clients", "connections to the control socket", s->clients);
  histogram(&t, "step_duration_seconds", "training step time, data included", &s->step_seconds);
  histogram(&t, "eval_duration_seconds", "evaluation time", &s->eval_seconds);
  histogram(&t, "checkpoint_duration_seconds", "checkpoint write time", &s->ckpt_seconds);
  double rss, cpu;
  proc_stat(&rss, &cpu);
  if (rss >= 0) gauge(&t, "process_resident_memory_bytes", "resident memory", rss);
  if (cpu >= 0) counter(&t, "process_cpu_seconds_total", "user and system CPU time", cpu);
  int fds = open_fds();
  if (fds >= 0) gauge(&t, "process_open_fds", "open file descriptors", fds);
  gauge(&t, "process_start_time_seconds", "Unix time the process started", s->start_time);
  if (t.oom) {
    free(t.p);
    return NULL;
  }
  return t.p;
}

/* ---- the HTTP endpoint (libmicrohttpd: a maintained HTTP/1.1 parser and server, so no request
 * parsing is hand-written here) ---- */

struct metrics_http {
  struct MHD_Daemon *d;
  pthread_mutex_t mu;
  metrics_snapshot snap; /* under mu */
  int port;
};

static enum MHD_Result reply(struct MHD_Connection *c, unsigned status, char *body, int owned,
                             const char *type) {
  struct MHD_Response *r = MHD_create_response_from_buffer(
      strlen(body), body, owned ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
  if (!r) {
    if (owned) free(body);
    return MHD_NO;
  }
  MHD_add_response_header(r, "Content-Type", type);
  enum MHD_Result rc = MHD_queue_response(c, status, r);
  MHD_destroy_response(r);
  return rc;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls) {
  (void)version;
  (void)upload;
  (void)con_cls;
  metrics_http *m = cls;
  if (*upload_size) return MHD_NO; /* no request bodies */
  if (strcmp(method, "GET") && strcmp(method, "HEAD"))
    return reply(c, MHD_HTTP_METHOD_NOT_ALLOWED, "only GET /metrics\n", 0, "text/plain");
  if (strcmp(url, "/metrics")) return reply(c, MHD_HTTP_NOT_FOUND, "see /metrics\n", 0, "text/plain");
  metrics_snapshot s;
  pthread_mutex_lock(&m->mu);
  s = m->snap;
  pthread_mutex_unlock(&m->mu);
  char *body = metrics_render(&s);
  if (!body) return reply(c, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory\n", 0, "text/plain");
  return reply(c, MHD_HTTP_OK, body, 1, "text/plain; version=0.0.4; charset=utf-8");
}

static int parse_listen(const char *listen, struct sockaddr_in *sa) {
  const char *colon = strrchr(listen, ':');
  char host[64];
  char *end;
  long port = colon ? strtol(colon + 1, &end, 10) : -1;
  if (!colon || colon == listen || (size_t)(colon - listen) >= sizeof host || !colon[1] || *end ||
      port < 0 || port > 65535)
    return moco_error(MOCO_EINVAL, "service.metrics_listen: \"%s\": expected HOST:PORT (e.g. 127.0.0.1:9464)",
                      listen);
  memcpy(host, listen, (size_t)(colon - listen));
  host[colon - listen] = '\0';
  memset(sa, 0, sizeof *sa);
  sa->sin_family = AF_INET;
  sa->sin_port = htons((uint16_t)port);
  if (!strcmp(host, "localhost")) strcpy(host, "127.0.0.1");
  if (inet_pton(AF_INET, host, &sa->sin_addr) != 1)
    return moco_error(MOCO_EINVAL, "service.metrics_listen: \"%s\": host must be an IPv4 address or localhost",
                      listen);
  return 0;
}

int metrics_http_start(metrics_http **out, const char *listen) {
  *out = NULL;
  struct sockaddr_in sa;
  int rc = parse_listen(listen, &sa);
  if (rc) return rc;
  metrics_http *m = calloc(1, sizeof *m);
  if (!m) return moco_error(MOCO_ENOMEM, "service.metrics_listen: out of memory");
  pthread_mutex_init(&m->mu, NULL);
  m->snap.ckpt_step = -1;
  /* One internal thread polls every connection; a slow scraper times out after 10 s. */
  m->d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, 0, NULL, NULL, on_request,
                          m, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa, MHD_OPTION_CONNECTION_TIMEOUT,
                          (unsigned)10, MHD_OPTION_CONNECTION_LIMIT, (unsigned)64, MHD_OPTION_END);
  if (!m->d) {
    int e = errno;
    pthread_mutex_destroy(&m->mu);
    free(m);
    return moco_error(MOCO_EIO, "service.metrics_listen: cannot listen on %s: %s", listen, strerror(e));
  }
  const union MHD_DaemonInfo *info = MHD_get_daemon_info(m->d, MHD_DAEMON_INFO_BIND_PORT);
  m->port = info ? info->port : ntohs(sa.sin_port);
  *out = m;
  return 0;
}

int metrics_http_port(const metrics_http *m) { return m->port; }

void metrics_publish(metrics_http *m, const metrics_snapshot *s) {
  pthread_mutex_lock(&m->mu);
  m->snap = *s;
  pthread_mutex_unlock(&m->mu);
}

void metrics_http_stop(metrics_http *m) {
  if (!m) return;
  MHD_stop_daemon(m->d);
  pthread_mutex_destroy(&m->mu);
  free(m);
}
