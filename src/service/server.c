#include "service/server.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <uv.h>

#include "core/dist.h"
#include "core/err.h"
#include "core/file.h"
#include "service/config.h"
#include "service/ctl.h"
#include "service/log.h"
#include "service/stats.h"
#include "service/metrics.h"
#include "service/world.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

enum { JOB_NICE = 5 }; /* nice levels the job threads give up to the loop thread */

typedef enum { ST_RUNNING, ST_PAUSED, ST_STOPPING, ST_FINISHED, ST_ERROR } run_state;
static const char *const state_names[] = {"running", "paused", "stopping", "finished", "error"};

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
static const char *const reason_names[] = {"periodic", "command", "stop", "finish"};

/* One job off the loop. The worker touches the trainer and this struct only. */
typedef struct {
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

typedef struct {
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

static void pump(server *s);

/* ---------------------------------------------------------------------------------------------------
 * Small helpers.
 * ------------------------------------------------------------------------------------------------- */

static double mono_now(void) { return uv_hrtime() * 1e-9; }

static void emit(server *s, json_t *ev) {
  if (!ev) return;
  /* A progress log that cannot be written (disk full, file system gone) is said once, not per event,
   * and again when it works again; training goes on either way. */
  if (progress_write(&s->plog, ev)) {
    if (!s->plog_failing) log_msg(LL_WARNING, "%s (training goes on; said once)", moco_errmsg());
    s->plog_failing = 1;
  } else if (s->plog_failing) {
    s->plog_failing = 0;
    log_msg(LL_NOTICE, "progress log %s is written again", s->plog.path);
  }
  if (s->ctl_open && s->ctl.subscribers > 0) {
    char *line = progress_line(ev);
    if (line) ctl_broadcast(&s->ctl, line);
    free(line);
  }
  json_decref(ev);
}

/* ---------------------------------------------------------------------------------------------------
 * Jobs: run on the work queue, finished on the loop.
 * ------------------------------------------------------------------------------------------------- */

/* The control loop must answer while a step computes, also on a busy machine: the threads that run
 * jobs (and the data threads they start, which inherit it) yield to it by a few nice levels. */
static void lower_priority_once(void) {
  static _Thread_local int done;
  if (done) return;
  done = 1;
  pid_t tid = (pid_t)syscall(SYS_gettid);
  errno = 0;
  int now = getpriority(PRIO_PROCESS, (id_t)tid);
  if (errno == 0 && setpriority(PRIO_PROCESS, (id_t)tid, now + JOB_NICE) != 0)
    log_msg(LL_DEBUG, "setpriority: %s", strerror(errno));
}

static void job_work(uv_work_t *req) {
  job *j = req->data;
  server *s = j->req.loop->data;
  lower_priority_once();
  double t0 = mono_now();
  moco_error_clear();
  switch (j->kind) {
  case JOB_STEP:
    world_send(WORLD_STEP, NULL, 0); /* every rank takes its share of the same step */
    j->rc = trainer_step(s->tr, &j->stats);
    break;
  case JOB_EVAL: j->rc = trainer_evaluate(s->tr, &j->ereq, &j->eres); break;
  case JOB_EXPORT:
    j->rc = j->model ? trainer_export_model(s->tr, j->enc, j->path, &j->bytes)
                     : trainer_export(s->tr, j->split, j->enc, j->embeddings, j->path, &j->rows, &j->dim);
    break;
  case JOB_CHECKPOINT:
    j->rc = checkpoint_save(s->tr, j->config_text, j->sets_text, j->dir, j->keep, &j->saved);
    break;
  }
  j->seconds = mono_now() - t0;
  if (j->rc) snprintf(j->err, sizeof j->err, "%s", moco_errmsg()[0] ? moco_errmsg() : moco_strerror(j->rc));
}

static void job_done(uv_work_t *req, int status);

static void job_start(server *s, job_kind kind) {
  job *j = &s->job;
  trainer_interrupt(s->tr, 0);
  j->kind = kind;
  j->rc = 0;
  j->err[0] = '\0';
  j->req.data = j;
  s->busy = 1;
  int rc = uv_queue_work(s->loop, &j->req, job_work, job_done);
  if (rc) {
    /* Only fails on invalid arguments; report it as the job's failure. */
    s->busy = 0;
    j->rc = MOCO_EINVAL;
    snprintf(j->err, sizeof j->err, "uv_queue_work: %s", uv_strerror(rc));
    job_done(&j->req, 0);
  }
}

static void start_checkpoint(server *s, job_reason why, ctl_call *call) {
  job *j = &s->job;
  j->reason = why;
  j->call = call;
  free(j->config_text);
  free(j->sets_text);
  j->config_text = json_dumps(s->config, JSON_COMPACT);
  j->sets_text = json_dumps(s->set_values, JSON_COMPACT);
  snprintf(j->dir, sizeof j->dir, "%s", s->cfg.checkpoint.dir);
  j->keep = s->cfg.checkpoint.keep;
  if (!j->config_text || !j->sets_text) {
    j->rc = MOCO_ENOMEM;
    snprintf(j->err, sizeof j->err, "checkpoint: out of memory");
  }
  job_start(s, JOB_CHECKPOINT);
}

/* encoder: TRAINER_QUERY, TRAINER_KEY, or -1 for eval.encoder. The periodic monitor may work on subsets
 * (eval.train_limit, eval.limit) to stay cheap; the final evaluation and the command use every sample
 * unless the command names limits (args). */
static void start_eval(server *s, job_reason why, ctl_call *call, int probe, int encoder,
                       const json_t *args) {
  job *j = &s->job;
  j->reason = why;
  j->call = call;
  j->ereq.encoder = encoder < 0 ? s->cfg.trainer.eval_encoder : (trainer_encoder)encoder;
  j->ereq.train_limit = why == WHY_PERIODIC ? s->cfg.eval.train_limit
                                            : json_integer_value(json_object_get(args, "train_limit"));
  j->ereq.eval_limit = why == WHY_PERIODIC ? s->cfg.eval.limit
                                           : json_integer_value(json_object_get(args, "limit"));
  j->ereq.knn = 1;
  j->ereq.probe = probe;
  job_start(s, JOB_EVAL);
}

/* ---- what each finished job means ---- */

static void enter_error(server *s, const char *what, const char *msg) {
  s->state = ST_ERROR;
  snprintf(s->error, sizeof s->error, "%s: %.1000s", what, msg);
  log_msg(LL_WARNING, "training stopped: %s", s->error);
  json_t *ev = progress_event("error");
  json_object_set_new(ev, "step", json_integer(s->stats.snap.step));
  json_object_set_new(ev, "message", json_string(s->error));
  emit(s, ev);
  if (s->cfg.service.exit_on_finish) {
    /* Nobody is expected to come and look: exit, with a status that says it failed. */
    s->state = ST_STOPPING;
    s->exit_code = 1;
  }
}

static void after_step(server *s, job *j) {
  if (j->rc) {
    enter_error(s, "step", j->err);
    return;
  }
  metrics_observe(&s->metrics.step_seconds, j->stats.seconds);
  if (j->stats.skipped > s->skipped_logged) {
    char why[512];
    trainer_skipped(s->tr, why, sizeof why);
    log_msg(LL_WARNING, "skipped %llu damaged record(s), %llu so far (data.bad_record skip); the last: %s",
            (unsigned long long)(j->stats.skipped - s->skipped_logged), (unsigned long long)j->stats.skipped, why);
    s->skipped_logged = j->stats.skipped;
  }
  stats_step(&s->stats, &j->stats);
  int64_t step = j->stats.step;
  int64_t every_log = s->cfg.log.every_steps;
  if (step % every_log == 0 || step >= j->stats.total_steps) emit(s, stats_progress_event(&s->stats));
  int64_t every_eval = s->cfg.eval.every_steps;
  if (every_eval > 0 && step % every_eval == 0 && step < j->stats.total_steps) s->eval_due = 1;
  int64_t every_ck = s->cfg.checkpoint.every_steps;
  int64_t every_sec = s->cfg.checkpoint.every_seconds;
  if ((every_ck > 0 && step % every_ck == 0) ||
      (every_sec > 0 && mono_now() - s->ckpt_time >= (double)every_sec))
    s->ckpt_due = 1;
}

static void after_eval(server *s, job *j) {
  metrics_observe(&s->metrics.eval_seconds, j->seconds);
  if (j->rc) {
    log_msg(LL_WARNING, "evaluation failed: %s", j->err);
    if (j->call) ctl_reply_error(j->call, ctl_errcode_name(j->rc), "evaluation failed: %s", j->err);
    return;
  }
  json_t *fig = stats_eval_figures(&j->eres);
  json_t *ev = progress_event("eval");
  json_object_update(ev, fig);
  json_object_set_new(ev, "reason", json_string(reason_names[j->reason]));
  json_object_set_new(ev, "encoder", json_string(j->ereq.encoder == TRAINER_KEY ? "key" : "query"));
  emit(s, ev);
  const trainer_eval_result *r = &j->eres;
  char group[64] = "", recall[128] = "";
  if (r->has_group)
    snprintf(group, sizeof group, ", group %.2f%% / %.2f%%", 100.0 * r->knn.group_acc,
             100.0 * r->knn_small.group_acc);
  if (r->has_retrieval)
    snprintf(recall, sizeof recall, ", recall@1 %.2f%% @10 %.2f%% (embeddings %.2f%%, %.2f%%)",
             100.0 * r->recall1, 100.0 * r->recall10, 100.0 * r->recall1_emb, 100.0 * r->recall10_emb);
  log_msg(LL_NOTICE, "eval at step %lld: kNN %.2f%% (k=%d, T=%g) / %.2f%% (k=%d, T=%g)%s%s, alignment %.4f "
          "uniformity %.4f",
          (long long)r->step, 100.0 * r->knn.acc, r->knn.k, r->knn.t, 100.0 * r->knn_small.acc, r->knn_small.k,
          r->knn_small.t, group, recall, r->alignment, r->uniformity);
  if (j->eres.has_probe) log_msg(LL_NOTICE, "linear probe: %.2f%%", 100.0 * j->eres.probe_acc);
  json_decref(s->last_eval);
  s->last_eval = fig;
  s->metrics.have_knn = j->eres.has_knn;
  s->metrics.knn_acc = j->eres.knn.acc;
  if (j->call) ctl_reply(j->call, json_deep_copy(fig));
}

/* A checkpoint that could not be written: training goes on (the next one is tried as usual), and the
 * operator learns it from every channel, not only the human log: an error event, status, and the
 * answer to whoever asked (the stop command included). */
static void checkpoint_failed(server *s, job *j) {
  int64_t step = s->stats.snap.step;
  log_msg(LL_WARNING, "checkpoint failed at step %lld (%s): %s", (long long)step, reason_names[j->reason],
          j->err);
  s->ckpt_failures++;
  /* The next try comes after a full interval: with checkpoint.every_seconds, a failed write must not
   * make every following step try again (and write and delete a whole checkpoint each time). */
  s->ckpt_time = mono_now();
  json_decref(s->ckpt_error);
  s->ckpt_error = json_pack("{s:I, s:f, s:s, s:s}", "step", (json_int_t)step, "time",
                            round(log_unix_time() * 1000) / 1000, "reason", reason_names[j->reason],
                            "message", j->err);
  json_t *ev = progress_event("error");
  json_object_set_new(ev, "step", json_integer(step));
  json_object_set_new(ev, "what", json_string("checkpoint"));
  json_object_set_new(ev, "reason", json_string(reason_names[j->reason]));
  json_object_set_new(ev, "message", json_string(j->err));
  emit(s, ev);
  if (j->reason == WHY_STOP) {
    s->exit_code = 1; /* the steps since the last checkpoint are lost */
    s->stop_ckpt_failed = 1;
  }
  if (j->call) ctl_reply_error(j->call, ctl_errcode_name(j->rc), "checkpoint failed: %s", j->err);
}

static void after_checkpoint(server *s, job *j) {
  metrics_observe(&s->metrics.ckpt_seconds, j->seconds);
  if (j->rc) {
    checkpoint_failed(s, j);
    return;
  }
  const checkpoint_info *c = &j->saved;
  if (c->pruned)
    log_msg(LL_WARNING, "disk full: deleted %d older checkpoint%s of %s to write this one", c->pruned,
            c->pruned == 1 ? "" : "s", j->dir);
  json_decref(s->ckpt_error);
  s->ckpt_error = NULL;
  int64_t step = s->stats.snap.step;
  s->ckpt_step = step;
  s->ckpt_time = mono_now();
  json_decref(s->last_checkpoint);
  s->last_checkpoint = json_pack("{s:s, s:I, s:f, s:I}", "path", c->path, "step", (json_int_t)step,
                                 "time", round(c->time * 1000) / 1000, "bytes", (json_int_t)c->bytes);
  json_t *ev = progress_event("checkpoint");
  json_object_set_new(ev, "step", json_integer(step));
  json_object_set_new(ev, "path", json_string(c->path));
  json_object_set_new(ev, "bytes", json_integer(c->bytes));
  json_object_set_new(ev, "seconds", json_real(round(j->seconds * 1000) / 1000));
  json_object_set_new(ev, "reason", json_string(reason_names[j->reason]));
  emit(s, ev);
  log_msg(LL_NOTICE, "checkpoint at step %lld: %s (%lld bytes, %.3f s)", (long long)step, c->path,
          (long long)c->bytes, j->seconds);
  if (j->call) ctl_reply(j->call, json_deep_copy(s->last_checkpoint));
}

static void after_export(server *s, job *j) {
  if (j->rc) {
    log_msg(LL_WARNING, "export failed: %s", j->err);
    if (j->call) ctl_reply_error(j->call, ctl_errcode_name(j->rc), "export failed: %s", j->err);
    return;
  }
  const char *enc = j->enc == TRAINER_KEY ? "key" : "query";
  if (j->model) {
    log_msg(LL_NOTICE, "exported the %s encoder of step %lld to %s (%lld bytes)", enc, (long long)s->stats.snap.step,
            j->path, (long long)j->bytes);
    if (j->call)
      ctl_reply(j->call, json_pack("{s:s, s:s, s:I, s:I, s:s}", "path", j->path, "encoder", enc, "step",
                                   (json_int_t)s->stats.snap.step, "bytes", (json_int_t)j->bytes, "format", "safetensors"));
    return;
  }
  log_msg(LL_NOTICE, "exported %lld x %d %s of the %s split to %s", (long long)j->rows, j->dim,
          j->embeddings ? "embeddings" : "features", j->split, j->path);
  if (j->call)
    ctl_reply(j->call, json_pack("{s:s, s:s, s:I, s:i, s:s}", "path", j->path, "split", j->split, "rows",
                                 (json_int_t)j->rows, "dim", j->dim, "what",
                                 j->embeddings ? "embeddings" : "features"));
}

/* The figures of status, for Prometheus; the histograms are kept up to date as jobs end. */
static const metrics_snapshot *fill_metrics(server *s) {
  metrics_snapshot *m = &s->metrics;
  m->state = state_names[s->state];
  stats_metrics(&s->stats, m);
  m->ckpt_step = s->last_checkpoint ? s->ckpt_step : -1;
  m->ckpt_time = json_number_value(json_object_get(s->last_checkpoint, "time"));
  m->ckpt_failures = (uint64_t)s->ckpt_failures;
  m->start_time = s->started;
  m->clients = s->ctl.clients;
  return m;
}

static void job_done(uv_work_t *req, int status) {
  job *j = req->data;
  server *s = req->loop->data;
  s->busy = 0;
  trainer_describe(s->tr, &s->stats.snap);
  if (status == UV_ECANCELED && !j->rc) {
    j->rc = MOCO_ESTATE;
    snprintf(j->err, sizeof j->err, "cancelled");
  }
  switch (j->kind) {
  case JOB_STEP: after_step(s, j); break;
  case JOB_EVAL: after_eval(s, j); break;
  case JOB_CHECKPOINT: after_checkpoint(s, j); break;
  case JOB_EXPORT: after_export(s, j); break;
  }
  j->call = NULL;
  if (s->metrics_http) metrics_publish(s->metrics_http, fill_metrics(s));
  pump(s);
}

/* ---------------------------------------------------------------------------------------------------
 * Operations queued by commands, applied between jobs.
 * ------------------------------------------------------------------------------------------------- */

static void op_push(server *s, op_kind kind, ctl_call *call, json_t *args) {
  op *o = calloc(1, sizeof *o);
  if (!o) {
    if (call) ctl_reply_errno(call, MOCO_ENOMEM);
    return;
  }
  o->kind = kind;
  o->call = call;
  o->args = args ? json_incref(args) : NULL;
  if (s->ops_tail) s->ops_tail->next = o;
  else s->ops = o;
  s->ops_tail = o;
}

static op *op_pop(server *s) {
  op *o = s->ops;
  if (o) {
    s->ops = o->next;
    if (!s->ops) s->ops_tail = NULL;
    o->next = NULL;
  }
  return o;
}

static void op_free(op *o) {
  json_decref(o->args);
  free(o);
}

static json_t *state_reply(server *s) {
  return json_pack("{s:s, s:I}", "state", state_names[s->state], "step",
                   (json_int_t)s->stats.snap.step);
}

/* Applies a set of dotted keys (already validated against the schema and the trainer) and logs each
 * change; the config and the trainer change together or not at all. */
static int apply_set(server *s, json_t *changes, json_t **applied) {
  json_t *next = json_deep_copy(s->config);
  if (!next) return MOCO_ENOMEM;
  const char *key;
  json_t *v;
  int rc = 0;
  json_object_foreach(changes, key, v) {
    if ((rc = config_set(next, key, v, 1))) break;
  }
  mocod_config *mc = malloc(sizeof *mc);
  if (!mc) rc = MOCO_ENOMEM;
  if (!rc) rc = config_read(next, mc);
  if (!rc) rc = trainer_apply_runtime(s->tr, &mc->trainer);
  if (rc) {
    free(mc);
    json_decref(next);
    return rc;
  }
  if (dist_active()) { /* the other ranks apply it before the next step, as this one has */
    char *text = json_dumps(next, JSON_COMPACT);
    if (text) world_send(WORLD_SET, text, strlen(text));
    free(text);
  }
  *applied = json_object();
  json_object_foreach(changes, key, v) {
    json_t *old = config_get(s->config, key);
    json_t *ev = progress_event("config_change");
    json_object_set_new(ev, "step", json_integer(s->stats.snap.step));
    json_object_set_new(ev, "key", json_string(key));
    json_object_set(ev, "old", old ? old : json_null());
    json_object_set(ev, "new", v);
    char *o = json_dumps(old ? old : json_null(), LOG_JSON_FLAGS);
    char *n = json_dumps(v, LOG_JSON_FLAGS);
    log_msg(LL_NOTICE, "set %s: %s -> %s", key, o ? o : "?", n ? n : "?");
    free(o);
    free(n);
    emit(s, ev);
    json_object_set(*applied, key, v);
    json_object_set(s->set_values, key, v);
  }
  json_decref(s->config);
  s->config = next;
  s->cfg = *mc;
  free(mc);
  s->ckpt_step = -1; /* the newest checkpoint lacks these values: the next checkpoint or stop writes one */
  trainer_describe(s->tr, &s->stats.snap);
  log_set_level(s->cfg.log.level);
  return 0;
}

/* Lays {"optim": {"lr": 0.1}} out as {"optim.lr": 0.1}: sections may be given as nested objects. */
static int flatten_into(json_t *out, const char *prefix, json_t *obj) {
  const char *key;
  json_t *v;
  if (json_object_size(obj) == 0) return moco_error(MOCO_EINVAL, "args.%s: an empty object sets nothing", prefix);
  json_object_foreach(obj, key, v) {
    char path[256];
    if (snprintf(path, sizeof path, "%s%s%s", prefix, *prefix ? "." : "", key) >= (int)sizeof path)
      return moco_error(MOCO_EINVAL, "args.%s...: key too long", prefix);
    int rc = json_is_object(v) ? flatten_into(out, path, v) : json_object_set(out, path, v) ? MOCO_ENOMEM : 0;
    if (rc) return rc;
  }
  return 0;
}

/* Turns the set command's args into {dotted key: value}: either {"key": K, "value": V} or
 * {"optim.lr": 0.1, "contrast": {"temperature": 0.2}, ...}. */
static int set_changes(json_t *args, json_t **out) {
  json_t *k = json_object_get(args, "key");
  if (k) {
    json_t *v = json_object_get(args, "value");
    if (!json_is_string(k) || !v || json_object_size(args) != 2)
      return moco_error(MOCO_EINVAL, "set: expected {\"key\": \"a.b\", \"value\": V} or {\"a.b\": V, ...}");
    *out = json_pack("{s:O}", json_string_value(k), v);
    return *out ? 0 : MOCO_ENOMEM;
  }
  if (json_object_size(args) == 0) return moco_error(MOCO_EINVAL, "set: no key given");
  *out = json_object();
  int rc = *out ? flatten_into(*out, "", args) : MOCO_ENOMEM;
  if (rc) {
    json_decref(*out);
    *out = NULL;
  }
  return rc;
}

/* A refused key is a bad argument of the request, whatever the reason (unknown, not runtime, out of
 * range): code bad_args, the message naming args.KEY. */
static int set_refused(int rc) {
  char msg[1024];
  snprintf(msg, sizeof msg, "%s", moco_errmsg());
  return rc == MOCO_ENOMEM ? rc : moco_error(MOCO_EINVAL, "args.%s", msg);
}

static void run_op(server *s, op *o) {
  switch (o->kind) {
  case OP_PAUSE:
    if (s->state == ST_RUNNING) {
      s->state = ST_PAUSED;
      log_msg(LL_NOTICE, "paused at step %lld", (long long)s->stats.snap.step);
    }
    if (o->call) ctl_reply(o->call, state_reply(s));
    break;
  case OP_RESUME:
    if (s->state == ST_PAUSED) {
      s->state = ST_RUNNING;
      log_msg(LL_NOTICE, "resumed at step %lld", (long long)s->stats.snap.step);
    }
    if (o->call) ctl_reply(o->call, state_reply(s));
    break;
  case OP_SET: {
    json_t *changes = NULL, *applied = NULL;
    int rc = set_changes(o->args, &changes);
    if (!rc) rc = apply_set(s, changes, &applied);
    json_decref(changes);
    if (o->call) {
      if (rc) ctl_reply_errno(o->call, rc);
      else ctl_reply(o->call, json_pack("{s:o}", "changed", applied));
    } else {
      json_decref(applied);
    }
    break;
  }
  case OP_STOP:
    if (s->state != ST_STOPPING) {
      log_msg(LL_NOTICE, "stopping at step %lld (%s)", (long long)s->stats.snap.step,
              o->call ? "stop command" : "signal");
      s->stop_reason_signal = o->call == NULL;
    }
    s->state = ST_STOPPING;
    if (o->call) {
      o->next = s->stoppers;
      s->stoppers = o;
      return; /* answered at shutdown */
    }
    break;
  case OP_CHECKPOINT:
  case OP_EVAL:
  case OP_EXPORT: break; /* started as jobs by pump */
  }
  op_free(o);
}

/* ---------------------------------------------------------------------------------------------------
 * The scheduler: called whenever a job ends or an operation arrives. Decides the next job.
 * ------------------------------------------------------------------------------------------------- */

static void shutdown_server(server *s);

static int export_prepare(server *s, op *o) {
  job *j = &s->job;
  json_t *a = o->args;
  const char *split = json_string_value(json_object_get(a, "split"));
  const char *enc = json_string_value(json_object_get(a, "encoder"));
  const char *what = json_string_value(json_object_get(a, "what"));
  j->model = !strcmp(ctl_call_command(o->call)->name, "export_model");
  split = split ? split : "eval";
  if (strcmp(split, "train") && strcmp(split, "eval"))
    return moco_error(MOCO_EINVAL, "args.split: \"%s\" not allowed, expected \"train\" or \"eval\"", split);
  int e = (int)s->cfg.trainer.eval_encoder;
  if (enc && enum_value_of(trainer_encoder_names, enc, &e))
    return moco_error(MOCO_EINVAL, "args.encoder: \"%s\" not allowed, expected \"query\" or \"key\"", enc);
  what = what ? what : "features";
  if (strcmp(what, "features") && strcmp(what, "embeddings"))
    return moco_error(MOCO_EINVAL, "args.what: \"%s\" not allowed, expected \"features\" or \"embeddings\"",
                      what);
  const char *path = json_string_value(json_object_get(a, "path"));
  /* room for the sibling files' suffix, ".labels.npy.tmp" */
  int rc = file_path_check("args.path", path, 16);
  if (rc) return rc;
  snprintf(j->split, sizeof j->split, "%s", split);
  snprintf(j->path, sizeof j->path, "%s", path);
  j->enc = (trainer_encoder)e;
  j->embeddings = !strcmp(what, "embeddings");
  return 0;
}

/* Starts the job an operation needs; returns 1 when a job was started. */
static int start_op_job(server *s, op *o) {
  switch (o->kind) {
  case OP_CHECKPOINT:
    if (s->ckpt_step == s->stats.snap.step && s->last_checkpoint) {
      /* Nothing changed since the newest checkpoint: it is the answer. */
      ctl_reply(o->call, json_deep_copy(s->last_checkpoint));
      return 0;
    }
    start_checkpoint(s, WHY_COMMAND, o->call);
    return 1;
  case OP_EVAL:
  {
    const char *enc = json_string_value(json_object_get(o->args, "encoder"));
    int e = -1;
    if (enc && enum_value_of(trainer_encoder_names, enc, &e)) {
      ctl_reply_error(o->call, "bad_args", "args.encoder: \"%s\" not allowed, expected \"query\" or \"key\"",
                      enc);
      return 0;
    }
    start_eval(s, WHY_COMMAND, o->call, json_is_true(json_object_get(o->args, "probe")), e, o->args);
    return 1;
  }
  case OP_EXPORT: {
    int rc = export_prepare(s, o);
    if (rc) {
      ctl_reply_errno(o->call, rc);
      return 0;
    }
    s->job.call = o->call;
    job_start(s, JOB_EXPORT);
    return 1;
  }
  default: return 0;
  }
}

static void pump(server *s) {
  if (s->busy) return;
  op *o;
  while ((o = op_pop(s))) {
    if (o->kind == OP_CHECKPOINT || o->kind == OP_EVAL || o->kind == OP_EXPORT) {
      int started = start_op_job(s, o);
      op_free(o);
      if (started) return;
      continue;
    }
    run_op(s, o);
  }
  if (s->state == ST_STOPPING) {
    if (!s->stop_ckpt && s->ckpt_step != s->stats.snap.step && !s->error[0]) {
      s->stop_ckpt = 1;
      start_checkpoint(s, WHY_STOP, NULL);
      return;
    }
    shutdown_server(s);
    return;
  }
  if (s->state != ST_RUNNING) return;
  if (s->eval_due) {
    s->eval_due = 0;
    start_eval(s, WHY_PERIODIC, NULL, 0, -1, NULL);
    return;
  }
  if (s->ckpt_due) {
    s->ckpt_due = 0;
    if (s->ckpt_step != s->stats.snap.step) {
      start_checkpoint(s, WHY_PERIODIC, NULL);
      return;
    }
  }
  if (s->stats.snap.step < s->stats.snap.total_steps) {
    job_start(s, JOB_STEP);
    return;
  }
  /* Training is done: a final evaluation (with the probe when configured), a final checkpoint. */
  if (s->finish_stage == 0) {
    s->finish_stage = 1;
    log_msg(LL_NOTICE, "training finished at step %lld", (long long)s->stats.snap.step);
    start_eval(s, WHY_FINISH, NULL, s->cfg.eval.probe_at_end, -1, NULL);
    return;
  }
  if (s->finish_stage == 1) {
    s->finish_stage = 2;
    if (s->ckpt_step != s->stats.snap.step) {
      start_checkpoint(s, WHY_FINISH, NULL);
      return;
    }
  }
  s->finish_stage = 3;
  s->state = ST_FINISHED;
  json_t *ev = progress_event("finished");
  json_object_set_new(ev, "step", json_integer(s->stats.snap.step));
  emit(s, ev);
  if (s->cfg.service.exit_on_finish) {
    s->state = ST_STOPPING;
    pump(s);
  }
}

/* ---------------------------------------------------------------------------------------------------
 * Shutdown.
 * ------------------------------------------------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h) { (void)h; }

static void on_ctl_closed(ctl_server *c) { (void)c; }

static void shutdown_server(server *s) {
  int64_t step = s->stats.snap.step;
  json_t *ev = progress_event("stop");
  json_object_set_new(ev, "step", json_integer(step));
  json_object_set_new(ev, "reason",
                      json_string(s->error[0] ? "error" : s->stop_reason_signal ? "signal"
                                  : s->stoppers                                 ? "command"
                                                                                : "finished"));
  if (s->last_checkpoint) json_object_set(ev, "checkpoint", json_object_get(s->last_checkpoint, "path"));
  if (s->stop_ckpt_failed) json_object_set(ev, "checkpoint_error", json_object_get(s->ckpt_error, "message"));
  emit(s, ev);
  while (s->stoppers) {
    op *o = s->stoppers;
    s->stoppers = o->next;
    if (s->stop_ckpt_failed) {
      /* Success naming an older checkpoint would hide that the steps since it are lost. */
      json_t *older = s->last_checkpoint ? json_object_get(s->last_checkpoint, "path") : NULL;
      ctl_reply_error(o->call, "internal",
                      "stopped at step %lld, but its checkpoint failed: %s; steps since %s are lost",
                      (long long)step, json_string_value(json_object_get(s->ckpt_error, "message")),
                      older ? json_string_value(older) : "the start");
    } else {
      json_t *r = state_reply(s);
      json_object_set_new(r, "state", json_string("stopped"));
      if (s->last_checkpoint)
        json_object_set(r, "checkpoint", json_object_get(s->last_checkpoint, "path"));
      ctl_reply(o->call, r);
    }
    op_free(o);
  }
  log_msg(LL_NOTICE, "mocod stopped at step %lld", (long long)step);
  if (s->ctl_open) {
    s->ctl_open = 0;
    ctl_close(&s->ctl, on_ctl_closed);
  }
  uv_close((uv_handle_t *)&s->sig_term, on_handle_closed);
  uv_close((uv_handle_t *)&s->sig_int, on_handle_closed);
  uv_close((uv_handle_t *)&s->sig_hup, on_handle_closed);
}

/* ---------------------------------------------------------------------------------------------------
 * Signals.
 * ------------------------------------------------------------------------------------------------- */

/* A stop does not wait for an evaluation or an export: they are given up at their next chunk. A step
 * or a checkpoint in flight is always finished. */
static void interrupt_long_job(server *s) {
  if (s->busy && (s->job.kind == JOB_EVAL || s->job.kind == JOB_EXPORT)) trainer_interrupt(s->tr, 1);
}

/* Under mpirun a SIGTERM also comes when another rank has died: mpirun then ends the job. The step in
 * flight can never finish, so there is no stopping cleanly: say which rank is gone and end at once; the
 * newest checkpoint resumes the run. */
static void on_lost_rank(server *s) {
  char who[256];
  if (!world_lost_rank(who, sizeof who)) return;
  log_msg(LL_WARNING, "%s: the world of %d cannot go on; ending the job at step %lld (resume from the "
          "newest checkpoint with --resume)", who, dist_size(), (long long)s->stats.snap.step);
  json_t *ev = progress_event("error");
  json_object_set_new(ev, "step", json_integer(s->stats.snap.step));
  json_object_set_new(ev, "message", json_string(who));
  emit(s, ev);
  dist_abort(1);
}

static void on_stop_signal(uv_signal_t *h, int signum) {
  server *s = h->loop->data;
  log_msg(LL_NOTICE, "received %s", signum == SIGTERM ? "SIGTERM" : "SIGINT");
  on_lost_rank(s);
  if (s->state == ST_STOPPING) return;
  op_push(s, OP_STOP, NULL, NULL);
  interrupt_long_job(s);
  pump(s);
}

/* logrotate moved the files away, or someone removed their directory: recreate the directory, reopen
 * by name. What cannot be reopened keeps going to the file opened before, and the log says so. */
static void on_hup(uv_signal_t *h, int signum) {
  (void)signum;
  server *s = h->loop->data;
  const char *lf = s->cfg.log.file, *pf = s->cfg.log.progress;
  int failed = 0;
  if (*lf && (server_make_dirs(lf, 0) || log_reopen())) {
    log_msg(LL_WARNING, "SIGHUP: %s; still writing to the log file opened before", moco_errmsg());
    failed = 1;
  }
  if (*pf && (server_make_dirs(pf, 0) || progress_reopen(&s->plog))) {
    log_msg(LL_WARNING, "SIGHUP: %s; still writing to the progress log opened before", moco_errmsg());
    failed = 1;
  }
  if (!failed) log_msg(LL_NOTICE, "SIGHUP: log files reopened");
}

/* ---------------------------------------------------------------------------------------------------
 * Commands.
 * ------------------------------------------------------------------------------------------------- */

static json_t *status_json(server *s) {
  json_t *r = json_object();
  json_object_set_new(r, "state", json_string(state_names[s->state]));
  stats_status(&s->stats, s->state == ST_RUNNING, r);
  json_object_set(r, "last_checkpoint", s->last_checkpoint ? s->last_checkpoint : json_null());
  json_object_set(r, "last_checkpoint_error", s->ckpt_error ? s->ckpt_error : json_null());
  json_object_set_new(r, "checkpoint_failures", json_integer(s->ckpt_failures));
  json_object_set(r, "last_eval", s->last_eval ? s->last_eval : json_null());
  json_object_set_new(r, "error", s->error[0] ? json_string(s->error) : json_null());
  json_object_set_new(r, "pid", json_integer(getpid()));
  json_object_set_new(r, "uptime_sec", json_real(round((log_unix_time() - s->started) * 1000) / 1000));
  json_object_set_new(r, "clients", json_integer(s->ctl.clients));
  json_object_set_new(r, "subscribers", json_integer(s->ctl.subscribers));
  json_object_set_new(r, "pending", json_integer(s->busy + (s->ops != NULL)));
  return r;
}

static int cmd_status(ctl_call *call, json_t *args, void *data) {
  (void)args;
  ctl_reply(call, status_json(data));
  return 0;
}

static int cmd_config(ctl_call *call, json_t *args, void *data) {
  server *s = data;
  json_t *key = json_object_get(args, "key");
  if (key) {
    const char *k = json_string_value(key);
    const config_option *o = config_option_find(k);
    json_t *v = config_get(s->config, k);
    if (!o && json_is_object(v)) { /* a section ("optim"): its values, and which of them set may change */
      json_t *runtime = json_array();
      size_t n = strlen(k);
      for (size_t i = 0; i < config_n_options; i++)
        if ((config_options[i].flags & CONFIG_RUNTIME) && !strncmp(config_options[i].path, k, n) &&
            config_options[i].path[n] == '.')
          json_array_append_new(runtime, json_string(config_options[i].path));
      ctl_reply(call, json_pack("{s:s, s:O, s:o}", "key", k, "value", v, "runtime_keys", runtime));
      return 0;
    }
    if (!o || !v) return moco_error(MOCO_ENOENT, "args.key: unknown key '%s'", k);
    ctl_reply(call, json_pack("{s:s, s:O, s:b, s:s}", "key", k, "value", v, "runtime",
                              (o->flags & CONFIG_RUNTIME) != 0, "doc", o->doc));
    return 0;
  }
  json_t *runtime = json_array();
  for (size_t i = 0; i < config_n_options; i++)
    if (config_options[i].flags & CONFIG_RUNTIME)
      json_array_append_new(runtime, json_string(config_options[i].path));
  ctl_reply(call, json_pack("{s:O, s:o}", "config", s->config, "runtime_keys", runtime));
  return 0;
}

static int cmd_metrics(ctl_call *call, json_t *args, void *data) {
  (void)args;
  char *text = metrics_render(fill_metrics(data));
  if (!text) return moco_error(MOCO_ENOMEM, "metrics: out of memory");
  ctl_reply(call, json_pack("{s:s}", "text", text));
  free(text);
  return 0;
}

static int cmd_commands(ctl_call *call, json_t *args, void *data) {
  (void)args;
  server *s = data;
  ctl_reply(call, json_pack("{s:o}", "commands", ctl_describe(&s->ctl)));
  return 0;
}

static int cmd_subscribe(ctl_call *call, json_t *args, void *data) {
  (void)args;
  server *s = data;
  ctl_call_subscribe(call);
  ctl_reply(call, json_pack("{s:s, s:I}", "state", state_names[s->state], "step",
                            (json_int_t)s->stats.snap.step));
  return 0;
}

/* pause, resume, stop, checkpoint, eval, export, export_model: queued, answered when applied. */
static int cmd_queued(ctl_call *call, json_t *args, void *data) {
  server *s = data;
  const char *name = ctl_call_command(call)->name;
  op_kind k = !strcmp(name, "pause")        ? OP_PAUSE
              : !strcmp(name, "resume")     ? OP_RESUME
              : !strcmp(name, "stop")       ? OP_STOP
              : !strcmp(name, "checkpoint") ? OP_CHECKPOINT
              : !strcmp(name, "eval")       ? OP_EVAL
                                            : OP_EXPORT;
  if ((k == OP_PAUSE || k == OP_RESUME) && s->state != ST_RUNNING && s->state != ST_PAUSED) {
    ctl_reply_error(call, "state", "cannot %s: training is %s", name, state_names[s->state]);
    return 0;
  }
  if (k == OP_CHECKPOINT && s->state == ST_ERROR) {
    ctl_reply_error(call, "state", "no checkpoint of a run that failed (%s); the last good one is kept",
                    s->error);
    return 0;
  }
  op_push(s, k, call, args);
  if (k == OP_STOP) interrupt_long_job(s);
  pump(s);
  return 0;
}

static int cmd_set(ctl_call *call, json_t *args, void *data) {
  server *s = data;
  json_t *changes = NULL;
  int rc = set_changes(args, &changes);
  if (rc) return rc;
  /* Validate now, so that a bad request is refused at once even while a step runs. */
  json_t *trial = json_deep_copy(s->config);
  const char *key;
  json_t *v;
  json_object_foreach(changes, key, v) {
    if ((rc = config_set(trial, key, v, 1))) break;
  }
  json_decref(trial);
  json_decref(changes);
  if (rc) return set_refused(rc);
  op_push(s, OP_SET, call, args);
  pump(s);
  return 0;
}

static int gate(ctl_call *call, const ctl_command *cmd, void *data) {
  server *s = data;
  if ((cmd->flags & CTL_CHANGES_STATE) && s->state == ST_STOPPING) {
    ctl_reply_error(call, "state", "mocod is stopping");
    return 1;
  }
  return 0;
}

static const ctl_arg config_args[] = {{"key", CTL_T_STRING, 0, 0, 0}, {NULL, 0, 0, 0, 0}};
static const ctl_arg eval_args[] = {{"probe", CTL_T_BOOL, 0, 0, 0},
                                    {"encoder", CTL_T_STRING, 0, 0, 0},
                                    {"train_limit", CTL_T_INT, 0, 0, 1e12},
                                    {"limit", CTL_T_INT, 0, 0, 1e12},
                                    {NULL, 0, 0, 0, 0}};
static const ctl_arg export_args[] = {{"path", CTL_T_STRING, CTL_ARG_REQUIRED, 0, 0},
                                      {"split", CTL_T_STRING, 0, 0, 0},
                                      {"encoder", CTL_T_STRING, 0, 0, 0},
                                      {"what", CTL_T_STRING, 0, 0, 0},
                                      {NULL, 0, 0, 0, 0}};

static const ctl_arg export_model_args[] = {{"path", CTL_T_STRING, CTL_ARG_REQUIRED, 0, 0},
                                            {"encoder", CTL_T_STRING, 0, 0, 0},
                                            {NULL, 0, 0, 0, 0}};

static const ctl_command commands[] = {
    {"status", cmd_status, CTL_SAFE_WHILE_RUNNING, NULL,
     "state, progress, last step's diagnostics, throughput, ETA, last checkpoint and evaluation"},
    {"config", cmd_config, CTL_SAFE_WHILE_RUNNING, config_args,
     "the effective config (or one key with its doc), and the keys `set` may change"},
    {"pause", cmd_queued, CTL_CHANGES_STATE, NULL, "pause training after the current step"},
    {"resume", cmd_queued, CTL_CHANGES_STATE, NULL, "resume a paused run"},
    {"stop", cmd_queued, CTL_CHANGES_STATE, NULL,
     "finish the current step, write a checkpoint and exit; answers when done"},
    {"checkpoint", cmd_queued, CTL_CHANGES_STATE, NULL, "write a checkpoint now; answers with the file"},
    {"eval", cmd_queued, CTL_CHANGES_STATE, eval_args,
     "kNN monitor and alignment/uniformity now (probe: true adds a linear probe)"},
    {"export", cmd_queued, CTL_CHANGES_STATE, export_args,
     "write features (or embeddings) of the train or eval split to a file"},
    {"export_model", cmd_queued, CTL_CHANGES_STATE, export_model_args,
     "write the query (or key) encoder as safetensors, for PyTorch (scripts/load_encoder.py)"},
    {"set", cmd_set, CTL_CHANGES_STATE | CTL_ANY_ARGS, NULL,
     "change runtime settings between steps: {\"optim.lr\": 0.03, ...}"},
    {"metrics", cmd_metrics, CTL_SAFE_WHILE_RUNNING, NULL,
     "the Prometheus text exposition of status's figures, durations and process figures"},
    {"subscribe", cmd_subscribe, CTL_SAFE_WHILE_RUNNING, NULL,
     "receive every progress, eval, checkpoint and config_change event as a line"},
    {"commands", cmd_commands, CTL_SAFE_WHILE_RUNNING, NULL,
     "this table: every command with its arguments and what it does"},
    {NULL, NULL, 0, NULL, NULL},
};

/* ---------------------------------------------------------------------------------------------------
 * Start-up.
 * ------------------------------------------------------------------------------------------------- */

int server_make_dirs(const char *path, int is_dir) { return file_make_dirs(path, is_dir, 0700); }

static void on_skip(void *ctx, const char *path, const char *why) {
  (void)ctx;
  log_msg(LL_WARNING, "skipping damaged checkpoint %s: %s", path, why);
}

/* The checkpoint's `set` values (taken) less the keys this command line's --set flags name and those
 * the config already holds. */
static json_t *restorable_sets(json_t *sets, const server_options *opt, const json_t *config) {
  if (!json_is_object(sets)) {
    json_decref(sets);
    return json_object();
  }
  for (int i = 0; i < opt->n_sets; i++) {
    char key[256];
    snprintf(key, sizeof key, "%.*s", (int)strcspn(opt->sets[i], "="), opt->sets[i]);
    json_object_del(sets, key);
  }
  const char *key;
  json_t *v;
  void *tmp;
  json_object_foreach_safe(sets, tmp, key, v) if (json_equal(v, config_get(config, key))) json_object_del(sets, key);
  return sets;
}

/* Warns about every option whose value differs between the checkpoint's config and this run's (the
 * `set` values about to be restored aside). */
static void compare_configs(const json_t *then, const json_t *now, const json_t *restore) {
  for (size_t i = 0; i < config_n_options; i++) {
    const char *p = config_options[i].path;
    json_t *a = config_get(then, p), *b = config_get(now, p);
    if (a && b && !json_equal(a, b) && !json_object_get(restore, p)) {
      char *x = json_dumps(a, LOG_JSON_FLAGS), *y = json_dumps(b, LOG_JSON_FLAGS);
      log_msg(LL_WARNING, "resume: %s was %.80s in the checkpoint, now %.80s", p, x ? x : "?", y ? y : "?");
      free(x);
      free(y);
    }
  }
}

static int resume_from_checkpoint(server *s, const server_options *opt, char *from, size_t from_len) {
  int mode = opt->resume;
  from[0] = '\0';
  if (mode == 0) return 0;
  const char *dir = s->cfg.checkpoint.dir;
  checkpoint_file f;
  int rc = checkpoint_read_latest(&f, dir, on_skip, NULL);
  if (rc == MOCO_ENOENT && mode < 0) return 0;
  if (rc) return moco_error_wrap(rc, "resume");
  blob_reader body = f.body; /* before trainer_load reads through it */
  rc = trainer_load(s->tr, &f.body);
  if (!rc) world_send(WORLD_START, body.data + body.pos, body.len - body.pos);
  if (!rc) {
    json_t *then = checkpoint_json(&f.body, "CONF");
    s->restore = restorable_sets(checkpoint_json(&f.body, "SETV"), opt, s->config);
    if (then) compare_configs(then, s->config, s->restore);
    json_decref(then);
  }
  if (rc) {
    checkpoint_file_free(&f);
    return moco_error_wrap(rc, "resume from %s (start with --no-resume or another checkpoint.dir)",
                           f.path[0] ? f.path : dir);
  }
  snprintf(from, from_len, "%s", f.path);
  s->ckpt_step = f.step;
  s->last_checkpoint = json_pack("{s:s, s:I, s:f, s:I}", "path", f.path, "step", (json_int_t)f.step,
                                 "time", f.time, "bytes", (json_int_t)f.len);
  checkpoint_file_free(&f);
  return 0;
}

/* Applies the checkpoint's `set` values (config_change events and log lines say which); one the trainer
 * refuses now is left at the file's value, with a warning. */
static void restore_sets(server *s) {
  if (!s->restore || json_object_size(s->restore) == 0) return;
  json_t *applied = NULL;
  log_msg(LL_NOTICE, "resume: restoring %zu value(s) changed with set", json_object_size(s->restore));
  if (apply_set(s, s->restore, &applied))
    log_msg(LL_WARNING, "resume: the values changed with set could not be restored: %s", moco_errmsg());
  json_decref(applied);
}

static int fail(const server_options *opt, int rc, const char *what) {
  char msg[1400];
  snprintf(msg, sizeof msg, "%s: %s", what, moco_errmsg()[0] ? moco_errmsg() : moco_strerror(rc));
  log_msg(LL_WARNING, "%s", msg);
  if (opt->ready) opt->ready(opt->ready_ctx, rc, msg);
  return 1;
}

/* Every path option mocod opens or builds names under, with the bytes it appends. */
static const struct {
  const char *key;
  size_t extra;
} path_options[] = {{"checkpoint.dir", CHECKPOINT_NAME_ROOM}, {"log.file", 0}, {"log.progress", 0},
                    {"service.pid_file", 0}};

int server_check_paths(const json_t *config) {
  for (size_t i = 0; i < sizeof path_options / sizeof path_options[0]; i++) {
    int rc = file_path_check(path_options[i].key, config_str(config, path_options[i].key),
                             path_options[i].extra);
    if (rc) return rc;
  }
  return 0;
}

int server_open_log(const json_t *config) {
  int lvl = LL_NOTICE;
  int rc = enum_value_of(log_level_names, config_str(config, "log.level"), &lvl);
  const char *lf = config_str(config, "log.file");
  if (!rc && *lf) rc = server_make_dirs(lf, 0);
  if (!rc) rc = log_open(lf, (log_level)lvl);
  return rc;
}

static int open_progress(server *s) {
  const char *pf = s->cfg.log.progress;
  int rc = *pf ? server_make_dirs(pf, 0) : 0;
  return rc ? rc : progress_open(&s->plog, pf);
}

int server_run(json_t *config, const server_options *opt) {
  server *s = calloc(1, sizeof *s);
  if (!s) return fail(opt, MOCO_ENOMEM, "start");
  uv_loop_t loop;
  uv_loop_init(&loop);
  loop.data = s;
  s->loop = &loop;
  s->config = json_incref(config);
  s->set_values = json_object();
  s->opt = opt;
  s->ckpt_step = -1;
  s->started = log_unix_time();
  s->ckpt_time = mono_now();
  log_set_main_thread();
  int rc = server_check_paths(config), code = 1;
  char from[FILE_PATH_MAX + CHECKPOINT_NAME_ROOM] = "";

  if (rc || (rc = config_read(s->config, &s->cfg))) {
    code = fail(opt, rc, "config");
    goto out;
  }
  if ((rc = open_progress(s))) {
    code = fail(opt, rc, "progress log");
    goto out;
  }
  if (s->plog.repaired)
    log_msg(LL_WARNING, "progress log %s: removed a torn last line of %ld bytes (killed mid-write)",
            s->plog.path, s->plog.repaired);
  if ((rc = server_make_dirs(s->cfg.checkpoint.dir, 1))) {
    code = fail(opt, rc, "checkpoint.dir");
    goto out;
  }
  ctl_config cc;
  ctl_config_default(&cc);
  cc.path = s->cfg.service.socket;
  cc.gate = gate;
  if ((rc = ctl_init(&s->ctl, &loop, &cc, commands, s))) {
    code = fail(opt, rc, "control socket");
    goto out;
  }
  s->ctl_open = 1;
  if ((rc = trainer_create(&s->tr, &s->cfg.trainer))) {
    code = fail(opt, rc, "trainer");
    goto out;
  }
  if ((rc = resume_from_checkpoint(s, opt, from, sizeof from))) {
    code = fail(opt, rc, "checkpoint");
    goto out;
  }
  if (!from[0]) world_send(WORLD_START, NULL, 0); /* a fresh start everywhere */
  trainer_describe(s->tr, &s->stats.snap);
  s->skipped_logged = s->stats.snap.skipped; /* a resumed run's earlier skips were logged by that run */
  if (s->ctl.replaced_stale)
    log_msg(LL_WARNING, "replaced the stale socket %s (left by a mocod that did not stop cleanly)", cc.path);
  const char *ml = s->cfg.service.metrics_listen;
  if (*ml && (rc = metrics_http_start(&s->metrics_http, ml))) {
    code = fail(opt, rc, "metrics");
    goto out;
  }
  if (s->metrics_http) {
    metrics_publish(s->metrics_http, fill_metrics(s));
    log_msg(LL_NOTICE, "metrics at http://%s/metrics", ml);
  }
  uv_signal_init(&loop, &s->sig_term);
  uv_signal_init(&loop, &s->sig_int);
  uv_signal_init(&loop, &s->sig_hup);
  uv_signal_start(&s->sig_term, on_stop_signal, SIGTERM);
  uv_signal_start(&s->sig_int, on_stop_signal, SIGINT);
  uv_signal_start(&s->sig_hup, on_hup, SIGHUP);

  char summary[2048];
  trainer_summary(s->tr, summary, sizeof summary);
  log_msg(LL_NOTICE, "%s", summary);
  if (from[0])
    log_msg(LL_NOTICE, "resumed from %s at step %lld", from, (long long)s->stats.snap.step);
  log_msg(LL_NOTICE, "mocod %d ready on %s (config %s), step %lld of %lld, world of %d", (int)getpid(),
          cc.path, opt->config_path ? opt->config_path : "defaults", (long long)s->stats.snap.step,
          (long long)s->stats.snap.total_steps, dist_size());
  json_t *ev = progress_event("start");
  json_object_set_new(ev, "step", json_integer(s->stats.snap.step));
  json_object_set_new(ev, "total_steps", json_integer(s->stats.snap.total_steps));
  json_object_set_new(ev, "pid", json_integer(getpid()));
  json_object_set_new(ev, "world_size", json_integer(dist_size()));
  json_object_set_new(ev, "resumed_from", from[0] ? json_string(from) : json_null());
  json_object_set(ev, "config", s->config);
  json_object_set(ev, "restored", s->restore && json_object_size(s->restore) ? s->restore : json_null());
  emit(s, ev);
  restore_sets(s);
  s->state = ST_RUNNING;
  if (opt->ready) opt->ready(opt->ready_ctx, 0, NULL);
  pump(s);
  uv_run(&loop, UV_RUN_DEFAULT);
  code = s->exit_code;

out:
  if (s->ctl_open) {
    /* Failed after the socket was up: close it so that the file is unlinked. */
    ctl_close(&s->ctl, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
  }
  while (s->ops) op_free(op_pop(s));
  metrics_http_stop(s->metrics_http);
  if (s->tr) trainer_destroy(s->tr);
  free(s->job.config_text);
  free(s->job.sets_text);
  json_decref(s->set_values);
  json_decref(s->restore);
  json_decref(s->last_eval);
  json_decref(s->last_checkpoint);
  json_decref(s->ckpt_error);
  json_decref(s->config);
  progress_close(&s->plog);
  if (uv_loop_close(&loop)) log_msg(LL_WARNING, "event loop closed with handles still open");
  free(s);
  return code;
}
