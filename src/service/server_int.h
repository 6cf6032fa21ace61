/* Internal to src/service: the server's state, shared by server.c (the loop, the clients, the command
 * table) and persist.c (checkpoints written and resumed, and the `set` values they carry). Nothing outside those two
 * includes this. */
#ifndef MOCO_SERVICE_SERVER_INT_H
#define MOCO_SERVICE_SERVER_INT_H

#include <jansson.h>
#include <uv.h>

#include "core/file.h"
#include "service/config.h"
#include "service/ctl.h"
#include "service/log.h"
#include "service/metrics.h"
#include "service/server.h"
#include "service/stats.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

typedef enum { ST_RUNNING, ST_PAUSED, ST_STOPPING, ST_FINISHED, ST_ERROR } run_state;

/* Commands that need the trainer or change the run wait here until no job is in flight. */
typedef enum { OP_PAUSE, OP_RESUME, OP_STOP, OP_SET, OP_CHECKPOINT, OP_EVAL, OP_EXPORT } op_kind;

typedef struct op {
  op_kind kind;
  ctl_call *call; /* NULL for operations mocod starts itself (a signal's stop) */
  json_t *args;   /* a reference of our own */
  struct op *next;
} op;

typedef enum { JOB_STEP, JOB_EVAL, JOB_CHECKPOINT, JOB_EXPORT } job_kind;

/* Why a checkpoint or an evaluation is taken, for the logs. */
typedef enum { WHY_PERIODIC, WHY_COMMAND, WHY_STOP, WHY_FINISH } job_reason;

/* One job off the loop. The worker touches the trainer and this struct only. */
typedef struct job {
  uv_work_t req;
  job_kind kind;
  job_reason reason;
  ctl_call *call;
  int rc;
  char err[1024];
  /* step */
  trainer_stats stats;
  /* eval */
  trainer_eval_request ereq;
  trainer_eval_result eres;
  /* checkpoint */
  char *config_text; /* the effective config, serialised into the checkpoint */
  char *sets_text;   /* set_values, likewise */
  char dir[FILE_PATH_MAX];
  int keep;
  checkpoint_info saved;
  /* export (its path checked against FILE_PATH_MAX where it was accepted) */
  char path[FILE_PATH_MAX + CHECKPOINT_NAME_ROOM];
  int64_t bytes;
  /* export (model: the encoder's weights as safetensors, else a split's features or embeddings) */
  int model;
  char split[16];
  trainer_encoder enc;
  int embeddings;
  int64_t rows;
  int dim;
  double seconds;
} job;

typedef struct server {
  uv_loop_t *loop;
  ctl_server ctl;
  int ctl_open;
  uv_signal_t sig_term, sig_int, sig_hup;
  json_t *config;
  mocod_config cfg;      /* s->config read into its fields (config_read); follows `set` */
  json_t *set_values; /* every key changed with `set` since the run began (resumes included): kept in
                         checkpoints and restored on resume, so a resume does not undo a `set` */
  json_t *restore;    /* on resume: the checkpoint's set values to apply before the first step */
  trainer *tr;
  progress_log plog;
  int plog_failing; /* the last progress_write failed */
  run_state state;
  char error[1024];
  double started; /* Unix time */

  job job;
  int busy;
  op *ops, *ops_tail;
  op *stoppers; /* stop calls answered once the final checkpoint is written */
  int stop_reason_signal;

  /* what has to happen between steps */
  int eval_due, ckpt_due;
  int finish_stage; /* 0 training, 1 final evaluation queued, 2 final checkpoint queued, 3 done */
  int stop_ckpt;    /* the checkpoint on stop has been started (once, even when it fails) */

  /* Snapshots for status, taken by the loop between jobs (the loop reads nothing of the trainer while
   * a job runs), the progress window and the rate: service/stats.h. */
  stats stats;
  json_t *last_eval;       /* the last eval event's figures */
  json_t *last_checkpoint; /* {"path","step","time"} */
  json_t *ckpt_error;      /* the last failed checkpoint {"step","time","message"}, until one succeeds */
  int64_t ckpt_failures;   /* failed checkpoints since start */
  int stop_ckpt_failed;    /* the checkpoint on stop failed: stop answers an error */
  int64_t ckpt_step;       /* step of the newest checkpoint on disk, -1 none */
  double ckpt_time;        /* monotonic seconds of the last checkpoint (or start) */
  uint64_t skipped_logged; /* damaged records skipped that the log has been told about */

  metrics_snapshot metrics; /* histograms kept here; the rest filled by fill_metrics */
  metrics_http *metrics_http; /* NULL unless service.metrics_listen is set */

  int exit_code;
  const server_options *opt;
} server;
/* The names of job_reason, for the logs and events. */
extern const char *const server_reason_names[];

/* Monotonic seconds, for intervals. */
static inline double server_now(void) { return uv_hrtime() * 1e-9; }

/* Queues s->job (filled in by the caller) of this kind on the work queue; it ends on the loop. */
void server_job_start(server *s, job_kind kind);

/* Writes an event to the progress log and to every subscriber; takes ev (NULL is ignored). */
void server_emit(server *s, json_t *ev);

#endif
