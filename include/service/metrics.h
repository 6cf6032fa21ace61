/* Metrics for Prometheus: a snapshot of the daemon's figures, rendered in the text exposition format
 * (version 0.0.4: # HELP and # TYPE lines, node_exporter's naming: base units, _total counters,
 * _seconds and _bytes suffixes, everything under the mocod_ prefix), and an optional HTTP endpoint
 * serving it at /metrics.
 *
 * Threads. The loop thread owns a metrics_snapshot and publishes a copy after every job (metrics_publish,
 * a memcpy under a mutex); the HTTP endpoint runs on libmicrohttpd's own thread and renders from the
 * copy. A scrape never waits for a step, and a step never waits for a scrape. */
#ifndef MOCO_SERVICE_METRICS_H
#define MOCO_SERVICE_METRICS_H

#include <stddef.h>
#include <stdint.h>

/* Upper bounds (seconds) of the duration histograms' buckets; +Inf is implied. */
#define METRICS_BUCKETS 12

typedef struct {
  uint64_t counts[METRICS_BUCKETS + 1]; /* per bucket, not cumulative; the last is +Inf */
  uint64_t count;
  double sum;
} metrics_hist;

void metrics_observe(metrics_hist *h, double seconds);

typedef struct {
  const char *state; /* a string constant: "running", "paused", ... */
  int64_t step, total_steps;
  double epoch, loss, lr, temperature, momentum, hardness, samples_per_sec;
  double fn_rate; /* < 0: unknown (no labels) */
  int have_step;  /* the step figures above are known */
  int queue_filled, queue_size;
  int64_t ckpt_step; /* -1: none */
  double ckpt_time;  /* Unix seconds of the newest checkpoint */
  uint64_t ckpt_failures;
  int have_knn;
  double knn_acc;
  double start_time; /* Unix seconds */
  int clients;
  metrics_hist step_seconds, eval_seconds, ckpt_seconds;
} metrics_snapshot;

/* The exposition text of s plus the process's own figures (resident memory, CPU seconds, open file
 * descriptors, from /proc/self), malloc'd; NULL when out of memory. */
char *metrics_render(const metrics_snapshot *s);

typedef struct metrics_http metrics_http;

/* Serves /metrics on "host:port" (IPv4 address or "localhost"; port 0 picks a free one) from its own
 * thread. MOCO_EINVAL naming service.metrics_listen for a bad address, MOCO_EIO when it cannot listen. */
int metrics_http_start(metrics_http **out, const char *listen);
/* The port listened on (useful with port 0). */
int metrics_http_port(const metrics_http *m);
/* Copies the snapshot for the next scrapes (loop thread). */
void metrics_publish(metrics_http *m, const metrics_snapshot *s);
void metrics_http_stop(metrics_http *m);

#endif
