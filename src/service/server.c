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
#include "server_int.h"
#include "service/persist.h"

enum { JOB_NICE = 5 }; /* nice levels the job threads give up to the loop thread */

const char *const server_reason_names[] = {"periodic", "command", "stop", "finish"};
static const char *const state_names[] = {"running", "paused", "stopping", "finished", "error"};


static void pump(server *s);

/* ---------------------------------------------------------------------------------------------------
 * Small helpers.
 * ------------------------------------------------------------------------------------------------- */


void server_emit(server *s, json_t *ev) {
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
  double t0 = server_now();
  moco_error_clear();
  switch (j->kind) {
  case JOB_STEP:
    world_send(WORLD_STEP, NULL, 0); /* every rank takes its share of the same step */
    j->rc = trainer_step(s->tr, &j->stats);
    break;
  case JOB_EVAL:
    world_send(WORLD_EVAL, &j->ereq, sizeof j->ereq); /* every rank extracts its shard */
    j->rc = trainer_evaluate(s->tr, &j->ereq, &j->eres);
    break;
  case JOB_EXPORT:
    if (!j->model) {
      world_export ex = {!strcmp(j->split, "train"), (int32_t)j->enc, j->embeddings};
      world_send(WORLD_EXPORT, &ex, sizeof ex);
    }
    j->rc = j->model ? trainer_export_model(s->tr, j->enc, j->path, &j->bytes)
                     : trainer_export(s->tr, j->split, j->enc, j->embeddings, j->path, &j->rows, &j->dim);
    break;
  case JOB_CHECKPOINT:
    j->rc = checkpoint_save(s->tr, j->config_text, j->sets_text, j->dir, j->keep, &j->saved);
    break;
  }
  j->seconds = server_now() - t0;
  if (j->rc) snprintf(j->err, sizeof j->err, "%s", moco_errmsg()[0] ? moco_errmsg() : moco_strerror(j->rc));
}

static void job_done(uv_work_t *req, int status);

void server_job_start(server *s, job_kind kind) {
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
  server_job_start(s, JOB_EVAL);
}

/* ---- what each finished job means ---- */

static void enter_error(server *s, const char *what, const char *msg) {
  s->state = ST_ERROR;
  snprintf(s->error, sizeof s->error, "%s: %.1000s", what, msg);
  log_msg(LL_WARNING, "training stopped: %s", s->error);
  json_t *ev = progress_event("error");
  json_object_set_new(ev, "step", json_integer(s->stats.snap.step));
  json_object_set_new(ev, "message", json_string(s->error));
  server_emit(s, ev);
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
  if (step % every_log == 0 || step >= j->stats.total_steps) server_emit(s, stats_progress_event(&s->stats));
  int64_t every_eval = s->cfg.eval.every_steps;
  if (every_eval > 0 && step % every_eval == 0 && step < j->stats.total_steps) s->eval_due = 1;
  int64_t every_ck = s->cfg.checkpoint.every_steps;
  int64_t every_sec = s->cfg.checkpoint.every_seconds;
  if ((every_ck > 0 && step % every_ck == 0) ||
      (every_sec > 0 && server_now() - s->ckpt_time >= (double)every_sec))
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
  json_object_set_new(ev, "reason", json_string(server_reason_names[j->reason]));
  json_object_set_new(ev, "encoder", json_string(j->ereq.encoder == TRAINER_KEY ? "key" : "query"));
  server_emit(s, ev);
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
  case JOB_CHECKPOINT: persist_checkpoint_done(s, j); break;
  case JOB_EXPORT: persist_export_done(s, j); break;
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
    int rc = persist_set_changes(o->args, &changes);
    if (!rc) rc = persist_apply_set(s, changes, &applied);
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

static int start_op_job(server *s, op *o) {
  switch (o->kind) {
  case OP_CHECKPOINT:
    if (s->ckpt_step == s->stats.snap.step && s->last_checkpoint) {
      /* Nothing changed since the newest checkpoint: it is the answer. */
      ctl_reply(o->call, json_deep_copy(s->last_checkpoint));
      return 0;
    }
    persist_checkpoint_start(s, WHY_COMMAND, o->call);
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
    int rc = persist_export_prepare(s, o->call, o->args);
    if (rc) {
      ctl_reply_errno(o->call, rc);
      return 0;
    }
    s->job.call = o->call;
    server_job_start(s, JOB_EXPORT);
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
      persist_checkpoint_start(s, WHY_STOP, NULL);
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
      persist_checkpoint_start(s, WHY_PERIODIC, NULL);
      return;
    }
  }
  if (s->stats.snap.step < s->stats.snap.total_steps) {
    server_job_start(s, JOB_STEP);
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
      persist_checkpoint_start(s, WHY_FINISH, NULL);
      return;
    }
  }
  s->finish_stage = 3;
  s->state = ST_FINISHED;
  json_t *ev = progress_event("finished");
  json_object_set_new(ev, "step", json_integer(s->stats.snap.step));
  server_emit(s, ev);
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
  server_emit(s, ev);
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
  server_emit(s, ev);
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
  int rc = persist_set_changes(args, &changes);
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
  if (rc) return persist_set_refused(rc);
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
  s->ckpt_time = server_now();
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
  if ((rc = persist_resume(s, opt, from, sizeof from))) {
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
  server_emit(s, ev);
  persist_restore_sets(s);
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
