#include "train/trainer.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "contrast/hardness.h"
#include "contrast/momentum.h"
#include "core/clock.h"
#include "core/dist.h"
#include "core/err.h"
#include "core/par.h"
#include "core/sched.h"
#include "data/dataset.h"
#include "data/views.h"
#include "train/encoder.h"

struct trainer {
  trainer_config cfg;
  loader ld;
  int ld_open;
  moco_model m;
  int m_open;
  int64_t total_steps;
  int backbone_len; /* layers of the backbone: the features are layer backbone_len - 1's output */
  int in_len;       /* floats per input sample */
  int num_classes;  /* 0 when the data has no labels */
  float *mean, *std; /* [norm_len] per-channel (per-feature) statistics of the training set */
  int norm_len;
  uint64_t stats_skipped;   /* damaged records the statistics pass left out (data.bad_record skip) */
  char stats_skip_why[512]; /* the last one's error */
  _Atomic int interrupt; /* set from another thread: evaluation and export stop at the next chunk */
};

enum { TRAINER_WORLD_CHECK_EVERY = 50 }; /* steps between comparisons of the ranks' models */

/* Eval passes go in chunks of this many samples, within the networks' max_batch (built for this rank's
 * share of a batch, train/step.h). */
static int chunk_of(const trainer *t) { return t->cfg.moco.batch_size / t->m.world; }

const enum_name trainer_encoder_names[] = {{"query", TRAINER_QUERY}, {"key", TRAINER_KEY}, {NULL, 0}};

/* ---------------------------------------------------------------------------------------------------
 * Building.
 * ------------------------------------------------------------------------------------------------- */

json_t *trainer_encoder_spec(const trainer_config *c) {
  json_t *spec = json_array();
  size_t i;
  json_t *l;
  json_array_foreach(c->backbone, i, l) json_array_append(spec, l);
  json_array_foreach(c->head, i, l) json_array_append(spec, l);
  json_array_append_new(spec, json_pack("{s:s, s:i}", "type", "linear", "out", c->embed_dim));
  json_array_append_new(spec, json_pack("{s:s}", "type", "l2norm"));
  return spec;
}

/* Builds the backbone and the head on their own, one sample deep, so that a bad layer is reported by
 * its own list ("model.head[1].out: ...") rather than by its index in the combined encoder. */
static int check_layers(const trainer_config *c, net_shape in) {
  net b, h;
  int rc = net_build(&b, c->backbone, in, 1, "model.backbone");
  if (rc) return rc;
  rc = net_build(&h, c->head, b.out_shape, 1, "model.head");
  if (!rc) net_free(&h);
  net_free(&b);
  return rc;
}

/* Per-channel mean and std of the training set, for the loader's normalisation. In a world of several
 * ranks each rank sums a contiguous range of the records and the sums are added (dist_sum_f64), so no
 * rank reads the whole set (on a gzip file a range is still reached by decompressing what comes before). */
static int train_stats(trainer *t) {
  dataset ds;
  int rc = dataset_open(&ds, "train", t->cfg.train, t->cfg.train_labels[0] ? t->cfg.train_labels : NULL,
                        t->cfg.loader.num_classes);
  if (rc) return rc;
  int C = ds.shape.c, world = dist_size(), rank = dist_rank();
  double *sums = calloc(2 * (size_t)C + 2, sizeof *sums); /* the sums, then the records and the skipped */
  t->mean = malloc((size_t)C * sizeof(float));
  t->std = malloc((size_t)C * sizeof(float));
  if (!sums || !t->mean || !t->std) rc = moco_error(MOCO_ENOMEM, "normalisation statistics of %d channels", C);
  uint64_t count = 0, skipped = 0;
  if (!rc)
    rc = dataset_stats_sums(&ds, ds.count * (uint64_t)rank / (uint64_t)world,
                            ds.count * (uint64_t)(rank + 1) / (uint64_t)world,
                            t->cfg.loader.bad_record == LOADER_BAD_SKIP, sums, &count, &skipped);
  if (world > 1 && dist_any(rc) && !rc)
    rc = moco_error(MOCO_ESTATE, "train: another rank could not read its part of the normalisation statistics");
  if (!rc) {
    if (skipped) snprintf(t->stats_skip_why, sizeof t->stats_skip_why, "%s", moco_errmsg());
    sums[2 * C] = (double)count; /* exact below 2^53 records */
    sums[2 * C + 1] = (double)skipped;
    dist_sum_f64(sums, 2 * (size_t)C + 2);
    t->stats_skipped = (uint64_t)sums[2 * C + 1];
    if (t->stats_skipped && !skipped) snprintf(t->stats_skip_why, sizeof t->stats_skip_why, "on another rank");
    rc = dataset_stats_finish(&ds, sums, (uint64_t)sums[2 * C], t->mean, t->std);
  }
  if (!rc) t->norm_len = C;
  free(sums);
  dataset_close(&ds);
  return rc;
}

static int open_loader(trainer *t) {
  loader_config lc = t->cfg.loader;
  lc.train = t->cfg.train;
  lc.train_labels = t->cfg.train_labels[0] ? t->cfg.train_labels : NULL;
  lc.eval = t->cfg.eval[0] ? t->cfg.eval : NULL;
  lc.eval_labels = t->cfg.eval_labels[0] ? t->cfg.eval_labels : NULL;
  lc.batch_size = t->cfg.moco.batch_size;
  lc.seed = t->cfg.moco.seed;
  lc.epochs = 0; /* endless: the trainer counts steps */
  lc.drop_last = 1;
  lc.share_index = dist_rank(); /* each rank makes the views of its share of every batch */
  lc.share_count = dist_size();
  lc.norm_len = t->norm_len;
  lc.mean = t->norm_len ? t->mean : NULL;
  lc.std = t->norm_len ? t->std : NULL;
  int rc = loader_open(&t->ld, &lc);
  if (rc) return rc;
  t->ld_open = 1;
  return 0;
}

/* The confusable group names classes of the data (when the data has labels). */
static int check_groups(const trainer *t, const trainer_config *cfg) {
  for (int g = 0; g < cfg->n_groups && t->num_classes > 0; g++)
    if (cfg->groups[g] < 0 || cfg->groups[g] >= t->num_classes)
      return moco_error(MOCO_ECONFIG, "eval.groups[%d]: class %lld, the data has classes 0..%d", g,
                        (long long)cfg->groups[g], t->num_classes - 1);
  return 0;
}

int trainer_create(trainer **out, const trainer_config *cfg) {
  *out = NULL;
  trainer *t = calloc(1, sizeof *t);
  if (!t) return MOCO_ENOMEM;
  t->cfg = *cfg;
  int rc = 0;
  if (!json_is_array(cfg->backbone) || json_array_size(cfg->backbone) == 0) {
    rc = moco_error(MOCO_ECONFIG, "model.backbone: expected a non-empty layer list");
    goto fail;
  }
  /* The compute team (core/par.h) does all threading of the step, matrix products included. */
  if ((rc = par_set_threads(cfg->threads < PAR_MAX_THREADS ? cfg->threads : PAR_MAX_THREADS)))
    goto fail;
  if (cfg->normalize && (rc = train_stats(t))) goto fail;
  if ((rc = open_loader(t))) goto fail;
  if (t->ld.num_samples < (uint64_t)cfg->moco.batch_size) {
    rc = moco_error(MOCO_ECONFIG, "optim.batch_size: %d larger than the %llu training samples",
                    cfg->moco.batch_size, (unsigned long long)t->ld.num_samples);
    goto fail;
  }
  int64_t per_epoch = (int64_t)(t->ld.num_samples / (uint64_t)cfg->moco.batch_size);
  t->total_steps = cfg->steps > 0 ? cfg->steps : per_epoch * cfg->epochs;
  t->num_classes = t->ld.has_labels ? t->ld.num_classes : 0;
  if ((rc = check_groups(t, cfg))) goto fail;

  moco_config mc = cfg->moco;
  mc.total_steps = t->total_steps;
  net_shape in = {t->ld.shape.c, t->ld.shape.h, t->ld.shape.w};
  t->in_len = (int)net_shape_size(in);
  if ((rc = check_layers(cfg, in))) goto fail;
  json_t *spec = trainer_encoder_spec(cfg);
  rc = moco_init(&t->m, &mc, spec, in, "model");
  json_decref(spec);
  if (rc) goto fail;
  t->m_open = 1;
  t->backbone_len = (int)json_array_size(cfg->backbone);
  /* evaluation and export read the backbone's last output (a BatchNorm there must not fuse a ReLU) */
  net_keep_output(&t->m.query, t->backbone_len - 1);
  net_keep_output(&t->m.key, t->backbone_len - 1);
  *out = t;
  return 0;
fail:
  trainer_destroy(t);
  return rc;
}

void trainer_destroy(trainer *t) {
  if (!t) return;
  if (t->m_open) moco_free(&t->m);
  if (t->ld_open) loader_close(&t->ld);
  free(t->mean);
  free(t->std);
  free(t);
}

/* ---------------------------------------------------------------------------------------------------
 * Training.
 * ------------------------------------------------------------------------------------------------- */

int64_t trainer_step_count(const trainer *t) { return t->m.step; }
int64_t trainer_total_steps(const trainer *t) { return t->total_steps; }

static double progress_of(const trainer *t) {
  return t->total_steps > 0 ? (double)t->m.step / (double)t->total_steps : 1.0;
}

void trainer_describe(const trainer *t, trainer_stats *st) {
  memset(st, 0, sizeof *st);
  const moco_config *c = &t->m.cfg;
  loader_pos pos;
  loader_position(&t->ld, &pos);
  st->step = t->m.step;
  st->total_steps = t->total_steps;
  st->epoch = t->ld.num_samples ? (double)pos.samples / (double)t->ld.num_samples : 0;
  int64_t s = t->m.step < t->total_steps ? t->m.step : t->total_steps - 1;
  st->lr = sched_lr(&c->sched, s > 0 ? s : 0, t->total_steps);
  st->temperature = c->loss.temperature;
  st->momentum = momentum_at(&c->momentum, t->m.step, t->total_steps);
  st->hardness = hardness_at(&t->m.hard, progress_of(t), NULL);
  st->queue_size = t->m.queue.queue_size;
  st->queue_filled = t->m.queue.filled;
  st->batch_size = c->batch_size;
  st->fn_rate = -1;
  st->skipped = loader_skipped(&t->ld, NULL, 0);
}

uint64_t trainer_skipped(const trainer *t, char *why, size_t n) { return loader_skipped(&t->ld, why, n); }

int trainer_step(trainer *t, trainer_stats *st) {
  double t0 = clock_now();
  loader_batch b;
  int rc = loader_next(&t->ld, &b);
  if (rc) return moco_error_wrap(rc, "step %lld: data", (long long)t->m.step + 1);
  if (b.size == 0) return moco_error(MOCO_ESTATE, "step %lld: the data stream ended", (long long)t->m.step + 1);
  double t1 = clock_now();
  moco_diag d;
  rc = moco_step(&t->m, b.view1, b.view2, b.ids, t->ld.has_labels ? b.labels : NULL, b.size, &d);
  if (rc) return moco_error_wrap(rc, "step %lld", (long long)t->m.step + 1);
  if (!isfinite(d.loss))
    return moco_error(MOCO_ERANGE, "step %lld: loss is %g (learning rate %g too high?)",
                      (long long)t->m.step, d.loss, d.lr);
  /* Ranks that drifted apart (a setting not applied everywhere, a broken all-reduce) would go on
   * training different models in silence: compare them now and then (a hash per rank, 8 bytes). */
  if (t->m.world > 1 && t->m.step % TRAINER_WORLD_CHECK_EVERY == 0 && (rc = moco_check_world(&t->m)))
    return rc;
  trainer_describe(t, st);
  st->loss = (float)d.loss;
  st->lr = d.lr;
  st->momentum = d.momentum;
  st->hardness = d.hardness;
  st->pos_sim = d.pos_sim_mean;
  st->neg_sim = d.neg_sim_mean;
  st->hardest_neg_sim = d.hardest_sim_mean;
  st->inst_acc = d.instance_accuracy;
  st->negatives = (float)d.negatives_per_query;
  st->filtered = (float)d.filtered / (float)(b.size * t->m.world); /* d counts the world's rows */
  st->fn_rate = d.false_negative_rate;
  st->data_wait = t1 - t0;
  st->seconds = clock_now() - t0;
  return 0;
}

void trainer_summary(const trainer *t, char *buf, size_t cap) {
  char enc[1024];
  net_describe(&t->m.query, enc, sizeof enc);
  snprintf(buf, cap,
           "data: %llu training samples of %dx%dx%d, %llu evaluation, %d classes; %lld steps of %d "
           "(%.2f epochs); encoder (%zu parameters): %s",
           (unsigned long long)t->ld.num_samples, t->ld.shape.c, t->ld.shape.h, t->ld.shape.w,
           (unsigned long long)t->ld.eval_samples, t->num_classes, (long long)t->total_steps,
           t->cfg.moco.batch_size,
           (double)t->total_steps * t->cfg.moco.batch_size / (double)(t->ld.num_samples ? t->ld.num_samples : 1),
           net_num_params(&t->m.query), enc);
  size_t len = strlen(buf);
  if (t->m.world > 1 && len < cap)
    len += (size_t)snprintf(buf + len, cap - len, "; %s", loader_reads_share(&t->ld)
      ? "each rank reads only the training records of its share"
      : "every rank reads the whole training stream (disjoint reads need plain IDX, .npy or CIFAR files and "
        "data.bad_record stop; docs/scale.md)");
  if (t->stats_skipped && len < cap)
    snprintf(buf + len, cap - len, "; the normalisation statistics skipped %llu damaged record(s), the last: %s",
             (unsigned long long)t->stats_skipped, t->stats_skip_why);
}

/* ---------------------------------------------------------------------------------------------------
 * Runtime settings.
 * ------------------------------------------------------------------------------------------------- */

int trainer_check_runtime(const trainer *t, const trainer_config *cfg) {
  const moco_config *now = &t->m.cfg, *next = &cfg->moco;
  /* The step sizes S, its mask and the mining workspaces for the layout it was built with. */
  mine_layout a, b;
  mine_layout_init(&a, &now->mine, now->mine.strategy == MINE_ADVERSARIAL ? 0 : now->queue_size,
                   now->batch_size);
  mine_layout_init(&b, &next->mine, next->mine.strategy == MINE_ADVERSARIAL ? 0 : now->queue_size,
                   now->batch_size);
  if (memcmp(&a, &b, sizeof a))
    return moco_error(MOCO_ESTATE,
                      "contrast.negatives.strategy: %s needs another similarity layout than %s "
                      "(mixing adds synthetic columns, adversarial a bank): start with it instead",
                      enum_name_of(mine_strategy_names, (int)next->mine.strategy),
                      enum_name_of(mine_strategy_names, (int)now->mine.strategy));
  if (next->loss.loss != now->loss.loss)
    return moco_error(MOCO_ESTATE, "contrast.loss: cannot change while training");
  return check_groups(t, cfg);
}

int trainer_apply_runtime(trainer *t, const trainer_config *cfg) {
  int rc = trainer_check_runtime(t, cfg);
  if (rc) return rc;
  /* One copy of the step's settings: the optimizer, mining, hardness controller and bank read theirs
   * through pointers into t->m.cfg. What `set` may not change is equal in both; the training length
   * is the trainer's own. The controller and the bank keep their state and follow the new settings. */
  int64_t total_steps = t->m.cfg.total_steps;
  t->m.cfg = cfg->moco;
  t->m.cfg.total_steps = total_steps;
  t->cfg = *cfg;
  return 0;
}

/* ---------------------------------------------------------------------------------------------------
 * Evaluation.
 * ------------------------------------------------------------------------------------------------- */

typedef struct {
  float *feat;   /* [n, feat_dim] backbone features (or NULL) */
  float *emb;    /* [n, emb_dim] embeddings (or NULL) */
  int32_t *labels;
  int64_t *ids;
  int64_t n;
  int feat_dim, emb_dim;
} features;

static void features_free(features *f) {
  free(f->feat);
  free(f->emb);
  free(f->labels);
  free(f->ids);
  memset(f, 0, sizeof *f);
}

/* Rows [lo, hi) of the first `cap` records that this rank extracts: contiguous shards in rank order,
 * so that the shards gathered on rank 0 are, row for row, the scan of one process. */
static void shard_of(const trainer *t, int64_t cap, int64_t *lo, int64_t *hi) {
  *lo = cap * t->m.rank / t->m.world;
  *hi = cap * (t->m.rank + 1) / t->m.world;
}

/* This rank's rows of f (features, embeddings, labels, ids) gathered on rank 0 behind its own. */
static void gather_features(features *f, int world) {
  int64_t *counts = malloc((size_t)world * sizeof *counts);
  if (!counts) { /* every rank is between collectives: nobody can be told */
    dist_abort(1);
    return;
  }
  dist_allgather(&f->n, counts, sizeof f->n);
  if (f->feat) dist_gather_rows(f->feat, (size_t)f->feat_dim * sizeof(float), counts);
  if (f->emb) dist_gather_rows(f->emb, (size_t)f->emb_dim * sizeof(float), counts);
  dist_gather_rows(f->labels, sizeof(int32_t), counts);
  dist_gather_rows(f->ids, sizeof(int64_t), counts);
  f->n = 0;
  for (int r = 0; r < world; r++) f->n += counts[r];
  free(counts);
}

/* Runs the first `limit` records (0: all) of a split through an encoder in inference mode (BatchNorm
 * on running statistics: nothing of the training state changes) and keeps the backbone features and /
 * or the embeddings. In a world of several ranks each rank runs its shard (shard_of) and rank 0
 * gathers them all; the other ranks end with nothing (f->n = 0). Every rank calls this for the same
 * split and limit: it is collective. */
static int extract(trainer *t, loader_split split, net *n, int want_feat, int want_emb, int64_t limit,
                   features *f) {
  memset(f, 0, sizeof *f);
  uint64_t total = split == LOADER_TRAIN ? t->ld.num_samples : t->ld.eval_samples;
  int64_t cap = limit > 0 && (uint64_t)limit < total ? limit : (int64_t)total, lo, hi;
  shard_of(t, cap, &lo, &hi);
  int64_t rows = t->m.rank == 0 ? cap : hi - lo; /* rank 0 receives every shard */
  f->feat_dim = (int)net_shape_size(n->layers[t->backbone_len - 1].out_shape);
  f->emb_dim = (int)net_shape_size(n->out_shape);
  int rc = 0;
  loader_scan s;
  memset(&s, 0, sizeof s);
  if ((want_feat && !(f->feat = malloc((size_t)rows * f->feat_dim * sizeof(float)))) ||
      (want_emb && !(f->emb = malloc((size_t)rows * f->emb_dim * sizeof(float)))) ||
      !(f->labels = malloc((size_t)rows * sizeof(int32_t))) || !(f->ids = malloc((size_t)rows * sizeof(int64_t))))
    rc = moco_error(MOCO_ENOMEM, "evaluation: features of %lld samples", (long long)rows);
  if (!rc && !(rc = loader_scan_open(&s, &t->ld, split, chunk_of(t))))
    rc = loader_scan_range(&s, (uint64_t)lo, (uint64_t)hi);
  int was_training = n->training;
  n->training = 0;
  loader_batch b;
  while (!rc && !(rc = loader_scan_next(&s, &b)) && b.size > 0) {
    if (atomic_load(&t->interrupt)) {
      rc = moco_error(MOCO_ESTATE, "interrupted after %lld samples", (long long)f->n);
      break;
    }
    const float *out = net_forward(n, b.view1, b.size);
    if (!out) {
      rc = MOCO_ERANGE;
      break;
    }
    if (f->emb) memcpy(f->emb + f->n * f->emb_dim, out, (size_t)b.size * f->emb_dim * sizeof(float));
    if (f->feat)
      memcpy(f->feat + f->n * f->feat_dim, net_layer_output(n, t->backbone_len - 1),
             (size_t)b.size * f->feat_dim * sizeof(float));
    memcpy(f->labels + f->n, b.labels, (size_t)b.size * sizeof(int32_t));
    memcpy(f->ids + f->n, b.ids, (size_t)b.size * sizeof(int64_t));
    f->n += b.size;
  }
  n->training = was_training;
  loader_scan_close(&s);
  if (t->m.world > 1) {
    /* A rank that failed (or rank 0, interrupted) says so before the gather, which then nobody enters. */
    if (dist_any(rc) && !rc)
      rc = moco_error(MOCO_ESTATE, "another rank could not extract its shard of the %s split (its log "
                      "says why)", split == LOADER_TRAIN ? "train" : "eval");
    if (!rc) gather_features(f, t->m.world);
  }
  if (rc) features_free(f);
  return rc;
}

/* Two augmented views of each of the first records of the evaluation split (the training split when
 * there is none) as stored, made with the training augmentations from a fixed seed so that the
 * figures built on them are comparable between evaluations and draw nothing from the training
 * streams. */
typedef struct {
  float *v1, *v2; /* [n, in_len] */
  int64_t *ids;   /* [n] record ids */
  int n;
} eval_views;

static void eval_views_free(eval_views *v) {
  free(v->v1);
  free(v->v2);
  free(v->ids);
  memset(v, 0, sizeof *v);
}

/* The first `want` records of ds, raw (a sample, then in pair data its second sample, `stride` bytes
 * per record), into raw and ids; *got of them. */
static int read_records(dataset *ds, int want, size_t stride, uint8_t *raw, int64_t *ids, int *got) {
  int rc = 0;
  *got = 0;
  for (int fi = 0; fi < ds->n_files && *got < want && !rc; fi++) {
    dataset_reader r;
    if ((rc = dataset_reader_open(&r, ds, fi, 0))) break;
    data_record rec;
    int k;
    while (*got < want && (k = dataset_reader_next(&r, &rec)) != 0) {
      if (k < 0) {
        rc = k;
        break;
      }
      uint8_t *dst = raw + (size_t)*got * stride;
      memcpy(dst, rec.sample, ds->sample_bytes);
      if (ds->has_pair) memcpy(dst + ds->sample_bytes, rec.pair, ds->sample_bytes);
      ids[(*got)++] = rec.id;
    }
    dataset_reader_close(&r);
  }
  return rc;
}

static int eval_views_make(trainer *t, const char *what, int want, uint64_t seed, eval_views *v) {
  memset(v, 0, sizeof *v);
  dataset ds;
  const char *spec = t->cfg.eval[0] ? t->cfg.eval : t->cfg.train;
  const char *lab = t->cfg.eval[0] ? t->cfg.eval_labels : t->cfg.train_labels;
  int rc = dataset_open(&ds, what, spec, lab[0] ? lab : NULL, t->cfg.loader.num_classes);
  if (rc) return rc;
  if ((uint64_t)want > ds.count) want = (int)ds.count;
  size_t stride = ds.sample_bytes * (ds.has_pair ? 2 : 1);
  uint8_t *raw = malloc((size_t)want * stride);
  v->ids = malloc((size_t)want * sizeof *v->ids);
  v->v1 = malloc((size_t)want * t->in_len * sizeof(float));
  v->v2 = malloc((size_t)want * t->in_len * sizeof(float));
  view_pipeline vp;
  view_scratch sc;
  int vp_open = 0;
  if (!raw || !v->ids || !v->v1 || !v->v2) rc = moco_error(MOCO_ENOMEM, "%s: %d samples", what, want);
  if (!rc) rc = read_records(&ds, want, stride, raw, v->ids, &v->n);
  if (!rc && !(rc = view_init(&vp, &t->cfg.loader.augment, t->cfg.loader.view_mode, ds.shape, ds.dtype,
                              t->norm_len, t->norm_len ? t->mean : NULL, t->norm_len ? t->std : NULL)))
    vp_open = 1;
  if (!rc && !(rc = view_scratch_init(&sc, &vp))) {
    view_batch_in in = {.raw = raw, .stride = stride, .n = v->n, .ids = v->ids, .seed = seed, .epoch = 0};
    view_batch(&vp, &in, v->v1, v->v2, &sc);
    view_scratch_free(&sc);
  }
  if (vp_open) view_free(&vp);
  free(raw);
  dataset_close(&ds);
  if (rc) eval_views_free(v);
  return rc;
}

/* Runs x [count, in_len] through n in inference mode, in chunks within its max_batch, keeping the
 * backbone features (feat [count, feat_dim], or NULL) and the embeddings (emb [count, emb_dim], or NULL). */
static int encode(trainer *t, net *n, const float *x, int count, float *feat, float *emb) {
  int feat_dim = (int)net_shape_size(n->layers[t->backbone_len - 1].out_shape);
  int emb_dim = (int)net_shape_size(n->out_shape), was = n->training, rc = 0;
  n->training = 0;
  for (int i = 0; i < count && !rc; i += chunk_of(t)) {
    int m = count - i < chunk_of(t) ? count - i : chunk_of(t);
    const float *out = net_forward(n, x + (size_t)i * t->in_len, m);
    if (!out) {
      rc = MOCO_ERANGE;
      break;
    }
    if (emb) memcpy(emb + (size_t)i * emb_dim, out, (size_t)m * emb_dim * sizeof(float));
    if (feat)
      memcpy(feat + (size_t)i * feat_dim, net_layer_output(n, t->backbone_len - 1),
             (size_t)m * feat_dim * sizeof(float));
  }
  n->training = was;
  return rc;
}

/* Alignment (Wang & Isola 2020, alpha = 2) over eval.pairs pairs of views of the first evaluation
 * samples. */
static int alignment(trainer *t, net *n, double *out) {
  eval_views v;
  int rc = eval_views_make(t, "alignment", t->cfg.eval_pairs, t->cfg.moco.seed ^ 0xa11a11, &v);
  if (rc) return rc;
  int d = (int)net_shape_size(n->out_shape);
  float *e1 = malloc((size_t)v.n * d * sizeof(float)), *e2 = malloc((size_t)v.n * d * sizeof(float));
  if (!e1 || !e2) rc = moco_error(MOCO_ENOMEM, "alignment: embeddings of %d pairs", v.n);
  else if (v.n < 2) rc = moco_error(MOCO_EINVAL, "alignment: %d samples, need 2", v.n);
  if (!rc) rc = encode(t, n, v.v1, v.n, NULL, e1);
  if (!rc) rc = encode(t, n, v.v2, v.n, NULL, e2);
  if (!rc) rc = eval_alignment(e1, e2, v.n, d, 2.0f, out);
  free(e1);
  free(e2);
  eval_views_free(&v);
  return rc;
}

typedef struct {
  int64_t id, row;
} id_row;

static int id_row_cmp(const void *a, const void *b) {
  int64_t x = ((const id_row *)a)->id, y = ((const id_row *)b)->id;
  return (x > y) - (x < y);
}

/* Pairs each query (an augmented view of the record with id ids[i]) with its original's row in the
 * gallery ev, keeping the queries whose original is there (the periodic monitor's gallery is a subset):
 * compacts feat/emb/target in place and returns their number, or -1 without memory. */
static int match_queries(const features *ev, const int64_t *ids, int n, float *feat, float *emb,
                         int64_t *target) {
  id_row *idx = malloc((size_t)ev->n * sizeof *idx);
  if (!idx) return -1;
  for (int64_t i = 0; i < ev->n; i++) idx[i] = (id_row){ev->ids[i], i};
  qsort(idx, (size_t)ev->n, sizeof *idx, id_row_cmp);
  int kept = 0;
  for (int i = 0; i < n; i++) {
    id_row key = {ids[i], 0}, *hit = bsearch(&key, idx, (size_t)ev->n, sizeof *idx, id_row_cmp);
    if (!hit) continue;
    memmove(feat + (size_t)kept * ev->feat_dim, feat + (size_t)i * ev->feat_dim, ev->feat_dim * sizeof(float));
    memmove(emb + (size_t)kept * ev->emb_dim, emb + (size_t)i * ev->emb_dim, ev->emb_dim * sizeof(float));
    target[kept++] = hit->row;
  }
  free(idx);
  return kept;
}

/* Instance retrieval: an augmented view of each of the first eval.retrieval_queries evaluation
 * samples (a fixed seed; pair data: its stored partner) is the query, the unaugmented evaluation split
 * ev is the gallery; recall@1 and @10 of the query's own original, on backbone features and on
 * embeddings. */
static int retrieval(trainer *t, net *n, const features *ev, trainer_eval_result *res) {
  eval_views v;
  int rc = eval_views_make(t, "retrieval", t->cfg.retrieval_queries, t->cfg.moco.seed ^ 0x7e7a11, &v);
  if (rc) return rc;
  float *feat = malloc((size_t)v.n * ev->feat_dim * sizeof(float));
  float *emb = malloc((size_t)v.n * ev->emb_dim * sizeof(float));
  int64_t *target = malloc((size_t)v.n * sizeof *target);
  int kept = 0;
  if (!feat || !emb || !target) rc = moco_error(MOCO_ENOMEM, "retrieval: features of %d queries", v.n);
  /* The second view: augmented like the first in augment mode, and in pair mode the stored partner,
   * where the first view is the sample itself and would find its original trivially. */
  if (!rc) rc = encode(t, n, v.v2, v.n, feat, emb);
  if (!rc && (kept = match_queries(ev, v.ids, v.n, feat, emb, target)) < 0)
    rc = moco_error(MOCO_ENOMEM, "retrieval: index of %lld gallery ids", (long long)ev->n);
  static const int ks[2] = {1, 10};
  double rf[2], re[2];
  if (!rc && kept > 0 &&
      !(rc = eval_retrieval(feat, target, kept, ev->feat, ev->n, ev->feat_dim, ks, 2, rf)) &&
      !(rc = eval_retrieval(emb, target, kept, ev->emb, ev->n, ev->emb_dim, ks, 2, re))) {
    res->has_retrieval = 1;
    res->retrieval_queries = kept;
    res->retrieval_gallery = ev->n;
    res->recall1 = (float)rf[0], res->recall10 = (float)rf[1];
    res->recall1_emb = (float)re[0], res->recall10_emb = (float)re[1];
  }
  free(feat);
  free(emb);
  free(target);
  eval_views_free(&v);
  return rc;
}

static int count_classes(const features *a, const features *b) {
  int32_t mx = -1;
  for (int64_t i = 0; i < a->n; i++) mx = a->labels[i] > mx ? a->labels[i] : mx;
  for (int64_t i = 0; i < b->n; i++) mx = b->labels[i] > mx ? b->labels[i] : mx;
  return (int)mx + 1;
}

/* One protocol's figures: its accuracy, the first TRAINER_MAX_CLASSES classes' accuracies and the
 * confusable group's, which weighs each class of the group by its count in the split (class_n). */
static void knn_figures(const trainer *t, const eval_knn_config *c, const eval_knn_out *o, const int64_t *class_n,
                        int classes, trainer_knn_figures *f) {
  f->acc = (float)o->accuracy;
  f->k = c->k;
  f->t = c->temperature;
  for (int y = 0; y < classes && y < TRAINER_MAX_CLASSES; y++) f->class_acc[y] = (float)o->class_acc[y];
  double hit = 0, all = 0;
  for (int g = 0; g < t->cfg.n_groups; g++) {
    int y = (int)t->cfg.groups[g];
    if (y >= classes || class_n[y] == 0) continue;
    hit += o->class_acc[y] * (double)class_n[y];
    all += (double)class_n[y];
  }
  f->group_acc = all > 0 ? (float)(hit / all) : -1.0f;
}

/* Both kNN protocols in one similarity pass over the training features. */
static int knn(trainer *t, const features *tr, const features *ev, int classes, trainer_eval_result *res) {
  double *acc = malloc(2 * (size_t)classes * sizeof *acc);
  int64_t *class_n = calloc((size_t)classes, sizeof *class_n);
  if (!acc || !class_n) {
    free(acc);
    free(class_n);
    return moco_error(MOCO_ENOMEM, "knn: per-class figures of %d classes", classes);
  }
  eval_knn_config c[2] = {t->cfg.knn, t->cfg.knn_small};
  eval_knn_out out[2] = {{.class_acc = acc}, {.class_acc = acc + classes}};
  int rc = eval_knn_protocols(c, 2, tr->feat, tr->labels, tr->n, ev->feat, ev->labels, ev->n, tr->feat_dim,
                              classes, out);
  if (!rc) {
    for (int64_t i = 0; i < ev->n; i++) class_n[ev->labels[i]]++;
    res->num_classes = classes < TRAINER_MAX_CLASSES ? classes : TRAINER_MAX_CLASSES;
    knn_figures(t, &c[0], &out[0], class_n, classes, &res->knn);
    knn_figures(t, &c[1], &out[1], class_n, classes, &res->knn_small);
    res->has_group = res->knn.group_acc >= 0;
  }
  free(acc);
  free(class_n);
  return rc;
}

void trainer_interrupt(trainer *t, int on) { atomic_store(&t->interrupt, on); }

int trainer_evaluate(trainer *t, const trainer_eval_request *req, trainer_eval_result *res) {
  double t0 = clock_now();
  memset(res, 0, sizeof *res);
  res->step = t->m.step;
  if (!t->ld.has_eval || !t->ld.has_labels)
    return moco_error(MOCO_ESTATE, "evaluation needs labelled training data and an evaluation split (data.eval)");
  net *n = req->encoder == TRAINER_KEY ? &t->m.key : &t->m.query;
  features tr, ev;
  int rc = extract(t, LOADER_TRAIN, n, 1, 0, req->train_limit, &tr);
  if (rc) return moco_error_wrap(rc, "evaluation: training features");
  if ((rc = extract(t, LOADER_EVAL, n, 1, 1, req->eval_limit, &ev))) {
    features_free(&tr);
    return moco_error_wrap(rc, "evaluation: evaluation features");
  }
  if (t->m.rank > 0) { /* its shards are on rank 0, which computes the figures alone */
    features_free(&tr);
    features_free(&ev);
    return 0;
  }
  int classes = t->num_classes > 0 ? t->num_classes : count_classes(&tr, &ev);
  res->n_train = tr.n;
  res->n_eval = ev.n;
  if (req->knn) {
    double align = 0, unif = 0;
    rc = knn(t, &tr, &ev, classes, res);
    if (!rc) rc = alignment(t, n, &align);
    if (!rc) rc = eval_uniformity(ev.emb, ev.n, ev.emb_dim, 2.0f, t->cfg.eval_pairs, &unif);
    if (!rc && t->cfg.retrieval_queries > 0) rc = retrieval(t, n, &ev, res);
    if (!rc) {
      res->has_knn = 1;
      res->alignment = (float)align;
      res->uniformity = (float)unif;
    }
  }
  if (!rc && req->probe) {
    double tr_acc = 0, te_acc = 0;
    rc = eval_linear_probe(&t->cfg.probe, tr.feat, tr.labels, tr.n, ev.feat, ev.labels, ev.n, tr.feat_dim,
                           classes, &tr_acc, &te_acc);
    if (!rc) {
      res->has_probe = 1;
      res->probe_acc = (float)te_acc;
      res->probe_train_acc = (float)tr_acc;
    }
  }
  features_free(&tr);
  features_free(&ev);
  res->seconds = clock_now() - t0;
  return rc;
}

int trainer_export(trainer *t, const char *split, trainer_encoder enc, int embeddings, const char *path,
                   int64_t *rows, int *dim) {
  loader_split sp = !strcmp(split, "train") ? LOADER_TRAIN : LOADER_EVAL;
  if (sp == LOADER_EVAL && !t->ld.has_eval) return moco_error(MOCO_ESTATE, "export: no evaluation split (data.eval)");
  features f;
  int rc = extract(t, sp, enc == TRAINER_KEY ? &t->m.key : &t->m.query, !embeddings, embeddings, 0, &f);
  if (rc) return moco_error_wrap(rc, "export");
  if (t->m.rank > 0) { /* its shard is on rank 0, which writes the files */
    features_free(&f);
    return 0;
  }
  *rows = f.n;
  *dim = embeddings ? f.emb_dim : f.feat_dim;
  rc = eval_export(path, embeddings ? f.emb : f.feat, f.n, *dim, t->ld.has_labels ? f.labels : NULL, f.ids);
  features_free(&f);
  return rc;
}

/* ---------------------------------------------------------------------------------------------------
 * Checkpoints.
 * ------------------------------------------------------------------------------------------------- */

static net_shape input_shape(const trainer *t) { return (net_shape){t->ld.shape.c, t->ld.shape.h, t->ld.shape.w}; }

void trainer_save(const trainer *t, blob_writer *w) {
  moco_save(&t->m, w);
  loader_save(&t->ld, w);
  encoder_input_save(w, input_shape(t), t->ld.dtype, t->norm_len, t->mean, t->std);
}

/* The input record (absent from checkpoints older than it) must describe this trainer's input; its
 * statistics are recomputed from the data at start, so they are not compared. */
static int load_input(trainer *t, blob_reader *r) {
  char tag[4];
  if (!blob_peek_tag(r, tag) || memcmp(tag, "NORM", 4)) return 0;
  net_shape in, here = input_shape(t);
  data_dtype dt;
  int n;
  float *mean, *std;
  int rc = encoder_input_load(r, &in, &dt, &n, &mean, &std);
  free(mean);
  free(std);
  if (!rc && (in.c != here.c || in.h != here.h || in.w != here.w || dt != t->ld.dtype))
    rc = moco_error(MOCO_ESHAPE, "input record: saved with %dx%dx%d %s samples, the data holds %dx%dx%d %s", in.c,
                    in.h, in.w, data_dtype_name(dt), here.c, here.h, here.w, data_dtype_name(t->ld.dtype));
  return rc;
}

int trainer_load(trainer *t, blob_reader *r) {
  int rc = moco_load(&t->m, r);
  if (rc) return moco_error_wrap(rc, "model");
  if ((rc = loader_load(&t->ld, r))) return moco_error_wrap(rc, "data position");
  return load_input(t, r);
}

int trainer_export_model(trainer *t, trainer_encoder which, const char *path, int64_t *bytes) {
  encoder e = {.net = which == TRAINER_KEY ? &t->m.key : &t->m.query, .backbone_len = t->backbone_len,
               .norm_len = t->norm_len, .mean = t->mean, .std = t->std, .input = t->ld.dtype, .which = which,
               .step = t->m.step};
  return encoder_write_safetensors(&e, path, bytes);
}
