#include "service/persist.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dist.h"
#include "core/enum.h"
#include "core/err.h"
#include "core/file.h"
#include "server_int.h"
#include "service/world.h"

/* ---------------------------------------------------------------------------------------------------
 * The set command.
 * ------------------------------------------------------------------------------------------------- */

/* Applies a set of dotted keys (already validated against the schema and the trainer) and logs each
 * change; the config and the trainer change together or not at all. */
int persist_apply_set(server *s, json_t *changes, json_t **applied) {
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
    server_emit(s, ev);
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
int persist_set_changes(json_t *args, json_t **out) {
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
int persist_set_refused(int rc) {
  char msg[1024];
  snprintf(msg, sizeof msg, "%s", moco_errmsg());
  return rc == MOCO_ENOMEM ? rc : moco_error(MOCO_EINVAL, "args.%s", msg);
}

/* ---------------------------------------------------------------------------------------------------
 * Resuming from a checkpoint.
 * ------------------------------------------------------------------------------------------------- */

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

int persist_resume(server *s, const server_options *opt, char *from, size_t from_len) {
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
void persist_restore_sets(server *s) {
  if (!s->restore || json_object_size(s->restore) == 0) return;
  json_t *applied = NULL;
  log_msg(LL_NOTICE, "resume: restoring %zu value(s) changed with set", json_object_size(s->restore));
  if (persist_apply_set(s, s->restore, &applied))
    log_msg(LL_WARNING, "resume: the values changed with set could not be restored: %s", moco_errmsg());
  json_decref(applied);
}

/* ---------------------------------------------------------------------------------------------------
 * Writing checkpoints (the job itself runs in server.c's worker: train/checkpoint.h).
 * ------------------------------------------------------------------------------------------------- */

void persist_checkpoint_start(server *s, int why, ctl_call *call) {
  job *j = &s->job;
  j->reason = (job_reason)why;
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
  server_job_start(s, JOB_CHECKPOINT);
}

/* A checkpoint that could not be written: training goes on (the next one is tried as usual), and the
 * operator learns it from every channel, not only the human log: an error event, status, and the
 * answer to whoever asked (the stop command included). */
static void checkpoint_failed(server *s, job *j) {
  int64_t step = s->stats.snap.step;
  log_msg(LL_WARNING, "checkpoint failed at step %lld (%s): %s", (long long)step, server_reason_names[j->reason],
          j->err);
  s->ckpt_failures++;
  /* The next try comes after a full interval: with checkpoint.every_seconds, a failed write must not
   * make every following step try again (and write and delete a whole checkpoint each time). */
  s->ckpt_time = server_now();
  json_decref(s->ckpt_error);
  s->ckpt_error = json_pack("{s:I, s:f, s:s, s:s}", "step", (json_int_t)step, "time",
                            round(log_unix_time() * 1000) / 1000, "reason", server_reason_names[j->reason],
                            "message", j->err);
  json_t *ev = progress_event("error");
  json_object_set_new(ev, "step", json_integer(step));
  json_object_set_new(ev, "what", json_string("checkpoint"));
  json_object_set_new(ev, "reason", json_string(server_reason_names[j->reason]));
  json_object_set_new(ev, "message", json_string(j->err));
  server_emit(s, ev);
  if (j->reason == WHY_STOP) {
    s->exit_code = 1; /* the steps since the last checkpoint are lost */
    s->stop_ckpt_failed = 1;
  }
  if (j->call) ctl_reply_error(j->call, ctl_errcode_name(j->rc), "checkpoint failed: %s", j->err);
}

void persist_checkpoint_done(server *s, job *j) {
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
  s->ckpt_time = server_now();
  json_decref(s->last_checkpoint);
  s->last_checkpoint = json_pack("{s:s, s:I, s:f, s:I}", "path", c->path, "step", (json_int_t)step,
                                 "time", round(c->time * 1000) / 1000, "bytes", (json_int_t)c->bytes);
  json_t *ev = progress_event("checkpoint");
  json_object_set_new(ev, "step", json_integer(step));
  json_object_set_new(ev, "path", json_string(c->path));
  json_object_set_new(ev, "bytes", json_integer(c->bytes));
  json_object_set_new(ev, "seconds", json_real(round(j->seconds * 1000) / 1000));
  json_object_set_new(ev, "reason", json_string(server_reason_names[j->reason]));
  server_emit(s, ev);
  log_msg(LL_NOTICE, "checkpoint at step %lld: %s (%lld bytes, %.3f s)", (long long)step, c->path,
          (long long)c->bytes, j->seconds);
  if (j->call) ctl_reply(j->call, json_deep_copy(s->last_checkpoint));
}

/* ---------------------------------------------------------------------------------------------------
 * Exports: the encoder as safetensors, or a split's features or embeddings (train/eval_export.h).
 * ------------------------------------------------------------------------------------------------- */

int persist_export_prepare(server *s, ctl_call *call, json_t *a) {
  job *j = &s->job;
  const char *split = json_string_value(json_object_get(a, "split"));
  const char *enc = json_string_value(json_object_get(a, "encoder"));
  const char *what = json_string_value(json_object_get(a, "what"));
  j->model = !strcmp(ctl_call_command(call)->name, "export_model");
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

void persist_export_done(server *s, job *j) {
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
