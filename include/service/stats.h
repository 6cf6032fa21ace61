/* What the daemon reports about training: the figures of the last step and the current settings
 * (snapshots the loop takes between jobs, so that it never reads the trainer while a step runs), the
 * means over the window of steps since the last progress event, throughput and ETA, and their JSON
 * forms: the progress event, the training part of `status` and an evaluation's figures.
 * Loop thread only. */
#ifndef MOCO_SERVICE_STATS_H
#define MOCO_SERVICE_STATS_H

#include <jansson.h>

#include "service/metrics.h"
#include "train/trainer.h"

typedef struct {
  trainer_stats snap; /* current settings and counters (trainer_describe between jobs) */
  trainer_stats last; /* the last step's figures */
  int have_last;
  /* progress window: sums over the steps since the last progress event */
  int win_n, win_fn_n;
  double win_loss, win_pos, win_neg, win_hard, win_acc, win_negs, win_filt, win_fn, win_sec;
  double rate; /* samples/s over the last window */
} stats;

/* Records a finished step: its figures become `last` and join the window. */
void stats_step(stats *s, const trainer_stats *st);

/* The "progress" event of the window's means (and a verbose log line); starts a new window. */
json_t *stats_progress_event(stats *s);

/* Seconds left at the last window's rate; -1 when unknown. */
double stats_eta(const stats *s);

/* Adds the training fields of `status` to r: step, total_steps, epoch, progress, the current settings,
 * the last step's figures (loss null before the first), throughput, ETA (null unless running), queue,
 * batch size, world size and skipped records. */
void stats_status(const stats *s, int running, json_t *r);

/* The training figures of the Prometheus snapshot (step .. queue size). */
void stats_metrics(const stats *s, metrics_snapshot *m);

/* An evaluation's figures, as the eval event and status's last_eval carry them. */
json_t *stats_eval_figures(const trainer_eval_result *r);

#endif
