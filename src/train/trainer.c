/* DEVELOPMENT STAND-IN, replaced by the real trainer once the modules land: a deterministic toy run
 * (a random walk with a decaying loss and ~20 ms per step) that lets the daemon be built and tested. */
#include "train/trainer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/err.h"
#include "core/rng.h"

struct trainer {
  trainer_config cfg;
  int64_t step;
  rng_t rng;
  float w[64];
};

int trainer_create(trainer **out, const trainer_config *cfg) {
  trainer *t = calloc(1, sizeof *t);
  if (!t) return MOCO_ENOMEM;
  t->cfg = *cfg;
  rng_init(&t->rng, cfg->seed, RNG_STREAM_INIT);
  for (int i = 0; i < 64; i++) t->w[i] = rng_normal(&t->rng);
  *out = t;
  return 0;
}
void trainer_destroy(trainer *t) { free(t); }

void trainer_describe(const trainer *t, trainer_stats *st) {
  memset(st, 0, sizeof *st);
  st->step = t->step;
  st->total_steps = t->cfg.steps;
  st->lr = t->cfg.lr;
  st->temperature = t->cfg.temperature;
  st->momentum = 0.99f;
  st->queue_size = t->cfg.queue_size;
  st->queue_filled = (int)(t->step * t->cfg.batch_size < t->cfg.queue_size ? t->step * t->cfg.batch_size : t->cfg.queue_size);
  st->batch_size = t->cfg.batch_size;
  st->epoch = t->step / 10.0;
  st->fn_rate = -1;
}

int trainer_step(trainer *t, trainer_stats *st) {
  struct timespec ts = {0, 20 * 1000 * 1000};
  nanosleep(&ts, NULL);
  for (int i = 0; i < 64; i++) t->w[i] += t->cfg.lr * rng_normal(&t->rng);
  t->step++;
  trainer_describe(t, st);
  st->loss = 5.0f / (1.0f + t->step * 0.01f) + t->w[0] * 1e-3f;
  st->inst_acc = 1 - 1 / (1.0f + t->step);
  st->seconds = 0.02;
  return 0;
}
int64_t trainer_step_count(const trainer *t) { return t->step; }
int64_t trainer_total_steps(const trainer *t) { return t->cfg.steps; }
int trainer_check_runtime(const trainer *t, const trainer_config *cfg) { (void)t; (void)cfg; return 0; }
int trainer_apply_runtime(trainer *t, const trainer_config *cfg) {
  t->cfg.lr = cfg->lr;
  t->cfg.temperature = cfg->temperature;
  return 0;
}
int trainer_evaluate(trainer *t, const trainer_eval_request *req, trainer_eval_result *res) {
  memset(res, 0, sizeof *res);
  res->step = t->step;
  res->has_knn = 1;
  res->knn_acc = 0.5f;
  res->k = 200;
  res->t = 0.1f;
  res->has_probe = req->probe;
  res->probe_acc = 0.6f;
  return 0;
}
int trainer_export(trainer *t, const char *split, trainer_encoder enc, int embeddings, const char *path,
                   int64_t *rows, int *dim) {
  (void)t; (void)split; (void)enc; (void)embeddings; (void)path;
  *rows = 0;
  *dim = 0;
  return moco_error(MOCO_ESTATE, "export: not available in the development trainer");
}
void trainer_save(const trainer *t, blob_writer *w) {
  blob_section_begin(w, "DEVT");
  blob_put_u64(w, (uint64_t)t->step);
  blob_put(w, &t->rng, sizeof t->rng);
  blob_put(w, t->w, sizeof t->w);
  blob_section_end(w);
}
int trainer_load(trainer *t, blob_reader *r) {
  blob_reader s;
  uint64_t step;
  int rc = blob_section(r, "DEVT", &s);
  if (!rc) rc = blob_get_u64(&s, &step);
  if (!rc) rc = blob_get(&s, &t->rng, sizeof t->rng);
  if (!rc) rc = blob_get(&s, t->w, sizeof t->w);
  if (!rc) t->step = (int64_t)step;
  return rc;
}
