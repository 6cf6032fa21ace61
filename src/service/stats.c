#include "service/stats.h"

#include <math.h>
#include <stdio.h>

#include "core/dist.h"
#include "service/log.h"

/* ---- evaluation figures ---- */

static json_t *f32_or_null(float x, int known) { return known ? progress_f32(x) : json_null(); }

/* One kNN protocol's fields, named knn_acc, knn_k, knn_t, group_acc, class_acc plus suffix. */
static void knn_fields(json_t *o, const char *suffix, const trainer_knn_figures *f, const trainer_eval_result *r) {
  char key[32];
  snprintf(key, sizeof key, "knn_acc%s", suffix);
  json_object_set_new(o, key, progress_f32(f->acc));
  snprintf(key, sizeof key, "knn_k%s", suffix);
  json_object_set_new(o, key, json_integer(f->k));
  snprintf(key, sizeof key, "knn_t%s", suffix);
  json_object_set_new(o, key, progress_f32(f->t));
  snprintf(key, sizeof key, "group_acc%s", suffix);
  json_object_set_new(o, key, f32_or_null(f->group_acc, r->has_group));
  json_t *per = json_array();
  for (int y = 0; y < r->num_classes; y++)
    json_array_append_new(per, f32_or_null(f->class_acc[y], f->class_acc[y] >= 0));
  snprintf(key, sizeof key, "class_acc%s", suffix);
  json_object_set_new(o, key, per);
}

json_t *stats_eval_figures(const trainer_eval_result *r) {
  json_t *o = json_object();
  json_object_set_new(o, "step", json_integer(r->step));
  if (r->has_knn) {
    knn_fields(o, "", &r->knn, r);
    knn_fields(o, "_small", &r->knn_small, r);
    json_object_set_new(o, "alignment", progress_f32(r->alignment));
    json_object_set_new(o, "uniformity", progress_f32(r->uniformity));
  }
  if (r->has_retrieval) {
    json_object_set_new(o, "recall1", progress_f32(r->recall1));
    json_object_set_new(o, "recall10", progress_f32(r->recall10));
    json_object_set_new(o, "recall1_emb", progress_f32(r->recall1_emb));
    json_object_set_new(o, "recall10_emb", progress_f32(r->recall10_emb));
    json_object_set_new(o, "retrieval_queries", json_integer(r->retrieval_queries));
    json_object_set_new(o, "retrieval_gallery", json_integer(r->retrieval_gallery));
  }
  if (r->has_probe) {
    json_object_set_new(o, "probe_acc", progress_f32(r->probe_acc));
    json_object_set_new(o, "probe_train_acc", progress_f32(r->probe_train_acc));
  }
  json_object_set_new(o, "n_train", json_integer(r->n_train));
  json_object_set_new(o, "n_eval", json_integer(r->n_eval));
  json_object_set_new(o, "eval_sec", json_real(round(r->seconds * 1000) / 1000));
  return o;
}

/* ---- steps and the progress window ---- */

void stats_step(stats *s, const trainer_stats *st) {
  s->last = *st;
  s->have_last = 1;
  s->win_n++;
  s->win_loss += st->loss;
  s->win_pos += st->pos_sim;
  s->win_neg += st->neg_sim;
  s->win_hard += st->hardest_neg_sim;
  s->win_acc += st->inst_acc;
  s->win_negs += st->negatives;
  s->win_filt += st->filtered;
  s->win_sec += st->seconds;
  if (st->fn_rate >= 0) {
    s->win_fn += st->fn_rate;
    s->win_fn_n++;
  }
}

double stats_eta(const stats *s) {
  const trainer_stats *st = &s->last;
  if (s->rate <= 0 || st->batch_size <= 0) return -1;
  return (double)(st->total_steps - st->step) * st->batch_size / s->rate;
}

static json_t *eta_json(double eta) { return eta >= 0 ? json_integer((json_int_t)llround(eta)) : json_null(); }

json_t *stats_progress_event(stats *s) {
  const trainer_stats *st = &s->last;
  double n = s->win_n;
  s->rate = s->win_sec > 0 ? n * st->batch_size / s->win_sec : 0;
  json_t *ev = progress_event("progress");
  json_object_set_new(ev, "step", json_integer(st->step));
  json_object_set_new(ev, "total_steps", json_integer(st->total_steps));
  json_object_set_new(ev, "epoch", json_real(round(st->epoch * 1000) / 1000));
  json_object_set_new(ev, "loss", progress_f32((float)(s->win_loss / n)));
  json_object_set_new(ev, "lr", progress_f32(st->lr));
  json_object_set_new(ev, "temperature", progress_f32(st->temperature));
  json_object_set_new(ev, "momentum", progress_f32(st->momentum));
  json_object_set_new(ev, "pos_sim", progress_f32((float)(s->win_pos / n)));
  json_object_set_new(ev, "neg_sim", progress_f32((float)(s->win_neg / n)));
  json_object_set_new(ev, "hardest_neg_sim", progress_f32((float)(s->win_hard / n)));
  json_object_set_new(ev, "inst_acc", progress_f32((float)(s->win_acc / n)));
  json_object_set_new(ev, "negatives", progress_f32((float)(s->win_negs / n)));
  json_object_set_new(ev, "filtered", progress_f32((float)(s->win_filt / n)));
  json_object_set_new(ev, "fn_rate",
                      f32_or_null((float)(s->win_fn / (s->win_fn_n ? s->win_fn_n : 1)), s->win_fn_n));
  json_object_set_new(ev, "hardness", progress_f32(st->hardness));
  json_object_set_new(ev, "samples_per_sec", json_real(round(s->rate * 10) / 10));
  json_object_set_new(ev, "world_size", json_integer(dist_size()));
  json_object_set_new(ev, "eta_sec", eta_json(stats_eta(s)));
  json_object_set_new(ev, "skipped", json_integer((json_int_t)st->skipped));
  log_msg(LL_VERBOSE, "step %lld/%lld loss %.4f inst_acc %.3f lr %.4g %.0f samples/s",
          (long long)st->step, (long long)st->total_steps, s->win_loss / n, s->win_acc / n, st->lr,
          s->rate);
  s->win_n = s->win_fn_n = 0;
  s->win_loss = s->win_pos = s->win_neg = s->win_hard = s->win_acc = s->win_negs = s->win_filt = 0;
  s->win_fn = s->win_sec = 0;
  return ev;
}

/* ---- status ---- */

void stats_status(const stats *s, int running, json_t *r) {
  const trainer_stats *st = &s->last, *d = &s->snap;
  json_object_set_new(r, "step", json_integer(d->step));
  json_object_set_new(r, "total_steps", json_integer(d->total_steps));
  json_object_set_new(r, "epoch", json_real(round(d->epoch * 1000) / 1000));
  json_object_set_new(r, "progress",
                      json_real(d->total_steps > 0 ? (double)d->step / (double)d->total_steps : 0));
  json_object_set_new(r, "lr", progress_f32(d->lr));
  json_object_set_new(r, "temperature", progress_f32(d->temperature));
  json_object_set_new(r, "momentum", progress_f32(d->momentum));
  json_object_set_new(r, "hardness", progress_f32(d->hardness));
  if (s->have_last) {
    json_object_set_new(r, "loss", progress_f32(st->loss));
    json_object_set_new(r, "pos_sim", progress_f32(st->pos_sim));
    json_object_set_new(r, "neg_sim", progress_f32(st->neg_sim));
    json_object_set_new(r, "hardest_neg_sim", progress_f32(st->hardest_neg_sim));
    json_object_set_new(r, "inst_acc", progress_f32(st->inst_acc));
    json_object_set_new(r, "negatives", progress_f32(st->negatives));
    json_object_set_new(r, "filtered", progress_f32(st->filtered));
    json_object_set_new(r, "fn_rate", f32_or_null(st->fn_rate, st->fn_rate >= 0));
    json_object_set_new(r, "step_sec", json_real(round(st->seconds * 1e6) / 1e6));
  } else {
    json_object_set_new(r, "loss", json_null());
  }
  json_object_set_new(r, "samples_per_sec", json_real(round(s->rate * 10) / 10));
  json_object_set_new(r, "eta_sec", eta_json(running ? stats_eta(s) : -1));
  json_object_set_new(r, "queue", json_pack("{s:i, s:i}", "filled", d->queue_filled, "size", d->queue_size));
  json_object_set_new(r, "batch_size", json_integer(d->batch_size));
  json_object_set_new(r, "world_size", json_integer(dist_size()));
  json_object_set_new(r, "skipped", json_integer((json_int_t)d->skipped));
}

void stats_metrics(const stats *s, metrics_snapshot *m) {
  const trainer_stats *d = &s->snap;
  m->step = d->step;
  m->total_steps = d->total_steps;
  m->epoch = d->epoch;
  m->lr = d->lr;
  m->temperature = d->temperature;
  m->momentum = d->momentum;
  m->hardness = d->hardness;
  m->have_step = s->have_last;
  m->loss = s->last.loss;
  m->fn_rate = s->last.fn_rate;
  m->samples_per_sec = s->rate;
  m->queue_filled = d->queue_filled;
  m->queue_size = d->queue_size;
}
