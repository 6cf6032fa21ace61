#include "train/trainer.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "contrast/hardness.h"
#include "contrast/momentum.h"
#include "core/clock.h"
#include "core/err.h"
#include "core/par.h"
#include "core/sched.h"
#include "data/dataset.h"
#include "data/views.h"

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
  _Atomic int interrupt; /* set from another thread: evaluation and export stop at the next chunk */
};

/* Eval passes go in chunks of this many samples, within the networks' max_batch. */
static int chunk_of(const trainer *t) { return t->cfg.moco.batch_size; }

void trainer_config_default(trainer_config *c) {
  memset(c, 0, sizeof *c);
  loader_config_default(&c->loader);
  moco_config_default(&c->moco);
  eval_knn_config_default(&c->knn);
  eval_probe_config_default(&c->probe);
  c->normalize = 1;
  c->embed_dim = 128;
  c->epochs = 1;
  c->eval_pairs = 1024;
  c->threads = 1;
}

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

/* Per-channel mean and std of the training set, for the loader's normalisation. */
static int train_stats(trainer *t) {
  dataset ds;
  int rc = dataset_open(&ds, "train", t->cfg.train, t->cfg.train_labels[0] ? t->cfg.train_labels : NULL,
                        t->cfg.loader.num_classes);
  if (rc) return rc;
  t->mean = malloc((size_t)ds.shape.c * sizeof(float));
  t->std = malloc((size_t)ds.shape.c * sizeof(float));
  if (!t->mean || !t->std) rc = moco_error(MOCO_ENOMEM, "normalisation statistics of %d channels", ds.shape.c);
  if (!rc) rc = dataset_stats(&ds, t->mean, t->std);
  if (!rc) t->norm_len = ds.shape.c;
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
  lc.norm_len = t->norm_len;
  lc.mean = t->norm_len ? t->mean : NULL;
  lc.std = t->norm_len ? t->std : NULL;
  int rc = loader_open(&t->ld, &lc);
  if (rc) return rc;
  t->ld_open = 1;
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
}

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
  st->filtered = (float)d.filtered / (float)b.size;
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
                      mine_strategy_name(next->mine.strategy), mine_strategy_name(now->mine.strategy));
  if (next->loss.loss != now->loss.loss)
    return moco_error(MOCO_ESTATE, "contrast.loss: cannot change while training");
  int rc = mine_config_check(&next->mine);
  if (!rc) rc = loss_config_check(&next->loss);
  if (!rc) rc = hardness_config_check(&next->hardness);
  if (!rc) rc = sched_validate(&next->sched);
  return rc;
}

int trainer_apply_runtime(trainer *t, const trainer_config *cfg) {
  int rc = trainer_check_runtime(t, cfg);
  if (rc) return rc;
  moco_config *now = &t->m.cfg;
  const moco_config *next = &cfg->moco;
  optim_config oc = t->m.opt.cfg;
  oc.weight_decay = next->optim.weight_decay;
  if ((rc = optim_set_config(&t->m.opt, &oc))) return rc;
  now->optim.weight_decay = oc.weight_decay;
  now->loss = next->loss;
  now->mine = next->mine;
  t->m.mine.cfg = next->mine; /* mine_select reads its own copy */
  if (t->m.bank.w) {
    /* The bank's size is fixed; its ascent settings follow (advbank_update reads its own copy). */
    now->advbank = next->advbank;
    t->m.bank.cfg = next->advbank;
  }
  now->hardness = next->hardness;
  t->m.hard.cfg = next->hardness; /* the controller keeps its state, follows the new settings */
  now->sched = next->sched;
  t->cfg.knn = cfg->knn;
  t->cfg.probe = cfg->probe;
  t->cfg.eval_encoder = cfg->eval_encoder;
  t->cfg.eval_pairs = cfg->eval_pairs;
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

/* Runs a split through an encoder in inference mode (BatchNorm on running statistics: nothing of the
 * training state changes) and keeps the backbone features and / or the embeddings of up to `limit`
 * samples (0: all). */
static int extract(trainer *t, loader_split split, net *n, int want_feat, int want_emb, int64_t limit,
                   features *f) {
  memset(f, 0, sizeof *f);
  uint64_t total = split == LOADER_TRAIN ? t->ld.num_samples : t->ld.eval_samples;
  int64_t cap = limit > 0 && (uint64_t)limit < total ? limit : (int64_t)total;
  f->feat_dim = (int)net_shape_size(n->layers[t->backbone_len - 1].out_shape);
  f->emb_dim = (int)net_shape_size(n->out_shape);
  if ((want_feat && !(f->feat = malloc((size_t)cap * f->feat_dim * sizeof(float)))) ||
      (want_emb && !(f->emb = malloc((size_t)cap * f->emb_dim * sizeof(float)))) ||
      !(f->labels = malloc((size_t)cap * sizeof(int32_t))) || !(f->ids = malloc((size_t)cap * sizeof(int64_t)))) {
    features_free(f);
    return moco_error(MOCO_ENOMEM, "evaluation: features of %lld samples", (long long)cap);
  }
  loader_scan s;
  int rc = loader_scan_open(&s, &t->ld, split, chunk_of(t));
  if (rc) {
    features_free(f);
    return rc;
  }
  int was_training = n->training;
  n->training = 0;
  loader_batch b;
  while (f->n < cap && !(rc = loader_scan_next(&s, &b)) && b.size > 0) {
    if (atomic_load(&t->interrupt)) {
      rc = moco_error(MOCO_ESTATE, "interrupted after %lld samples", (long long)f->n);
      break;
    }
    int take = (int)(cap - f->n < b.size ? cap - f->n : b.size);
    const float *out = net_forward(n, b.view1, take);
    if (!out) {
      rc = MOCO_ERANGE;
      break;
    }
    if (f->emb) memcpy(f->emb + f->n * f->emb_dim, out, (size_t)take * f->emb_dim * sizeof(float));
    if (f->feat)
      memcpy(f->feat + f->n * f->feat_dim, net_layer_output(n, t->backbone_len - 1),
             (size_t)take * f->feat_dim * sizeof(float));
    memcpy(f->labels + f->n, b.labels, (size_t)take * sizeof(int32_t));
    memcpy(f->ids + f->n, b.ids, (size_t)take * sizeof(int64_t));
    f->n += take;
  }
  n->training = was_training;
  loader_scan_close(&s);
  if (rc) features_free(f);
  return rc;
}

/* Alignment (Wang & Isola 2020, alpha = 2) over pairs of views of the first evaluation samples,
 * made with the training augmentations from a fixed seed so that the figure is comparable between
 * evaluations and draws nothing from the training streams. */
static int alignment(trainer *t, net *n, double *out) {
  dataset ds;
  const char *spec = t->cfg.eval[0] ? t->cfg.eval : t->cfg.train;
  const char *lab = t->cfg.eval[0] ? t->cfg.eval_labels : t->cfg.train_labels;
  int rc = dataset_open(&ds, "alignment", spec, lab[0] ? lab : NULL, t->cfg.loader.num_classes);
  if (rc) return rc;
  int P = t->cfg.eval_pairs < chunk_of(t) ? t->cfg.eval_pairs : chunk_of(t);
  if ((uint64_t)P > ds.count) P = (int)ds.count;
  size_t stride = ds.sample_bytes * (ds.has_pair ? 2 : 1);
  uint8_t *raw = malloc((size_t)P * stride);
  int64_t *ids = malloc((size_t)P * sizeof *ids);
  float *v1 = malloc((size_t)P * t->in_len * sizeof(float)), *v2 = malloc((size_t)P * t->in_len * sizeof(float));
  float *e1 = NULL;
  view_pipeline vp;
  view_scratch sc;
  int vp_open = 0, sc_open = 0, got = 0;
  if (!raw || !ids || !v1 || !v2) {
    rc = moco_error(MOCO_ENOMEM, "alignment: %d pairs", P);
    goto out;
  }
  /* Read the first P records as stored. */
  for (int fi = 0; fi < ds.n_files && got < P && !rc; fi++) {
    dataset_reader r;
    if ((rc = dataset_reader_open(&r, &ds, fi, 0))) break;
    data_record rec;
    int k;
    while (got < P && (k = dataset_reader_next(&r, &rec)) != 0) {
      if (k < 0) {
        rc = k;
        break;
      }
      memcpy(raw + (size_t)got * stride, rec.sample, ds.sample_bytes);
      if (ds.has_pair) memcpy(raw + (size_t)got * stride + ds.sample_bytes, rec.pair, ds.sample_bytes);
      ids[got++] = rec.id;
    }
    dataset_reader_close(&r);
  }
  if (rc) goto out;
  if (got < 2) {
    rc = moco_error(MOCO_EINVAL, "alignment: %d samples, need 2", got);
    goto out;
  }
  if ((rc = view_init(&vp, &t->cfg.loader.augment, t->cfg.loader.view_mode, ds.shape, ds.dtype, t->norm_len,
                      t->norm_len ? t->mean : NULL, t->norm_len ? t->std : NULL)))
    goto out;
  vp_open = 1;
  if ((rc = view_scratch_init(&sc, &vp))) goto out;
  sc_open = 1;
  view_batch_in in = {.raw = raw, .stride = stride, .n = got, .ids = ids, .seed = t->cfg.moco.seed ^ 0xa11a11, .epoch = 0};
  view_batch(&vp, &in, v1, v2, &sc);
  int d = (int)net_shape_size(n->out_shape);
  if (!(e1 = malloc((size_t)got * d * sizeof(float)))) {
    rc = moco_error(MOCO_ENOMEM, "alignment: embeddings");
    goto out;
  }
  int was = n->training;
  n->training = 0;
  const float *e = net_forward(n, v1, got);
  if (e) memcpy(e1, e, (size_t)got * d * sizeof(float));
  const float *e2 = e ? net_forward(n, v2, got) : NULL;
  rc = e2 ? eval_alignment(e1, e2, got, d, 2.0f, out) : MOCO_ERANGE;
  n->training = was;
out:
  if (sc_open) view_scratch_free(&sc);
  if (vp_open) view_free(&vp);
  free(raw);
  free(ids);
  free(v1);
  free(v2);
  free(e1);
  dataset_close(&ds);
  return rc;
}

static int count_classes(const features *a, const features *b) {
  int32_t mx = -1;
  for (int64_t i = 0; i < a->n; i++) mx = a->labels[i] > mx ? a->labels[i] : mx;
  for (int64_t i = 0; i < b->n; i++) mx = b->labels[i] > mx ? b->labels[i] : mx;
  return (int)mx + 1;
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
  int classes = t->num_classes > 0 ? t->num_classes : count_classes(&tr, &ev);
  res->n_train = tr.n;
  res->n_eval = ev.n;
  if (req->knn) {
    double acc = 0, align = 0, unif = 0;
    rc = eval_knn(&t->cfg.knn, tr.feat, tr.labels, tr.n, ev.feat, ev.labels, ev.n, tr.feat_dim, classes, &acc,
                  NULL, NULL);
    if (!rc) rc = alignment(t, n, &align);
    if (!rc) rc = eval_uniformity(ev.emb, ev.n, ev.emb_dim, 2.0f, t->cfg.eval_pairs, &unif);
    if (!rc) {
      res->has_knn = 1;
      res->knn_acc = (float)acc;
      res->k = t->cfg.knn.k;
      res->t = t->cfg.knn.temperature;
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
  *rows = f.n;
  *dim = embeddings ? f.emb_dim : f.feat_dim;
  rc = eval_export(path, embeddings ? f.emb : f.feat, f.n, *dim, t->ld.has_labels ? f.labels : NULL, f.ids);
  features_free(&f);
  return rc;
}

/* ---------------------------------------------------------------------------------------------------
 * Checkpoints.
 * ------------------------------------------------------------------------------------------------- */

void trainer_save(const trainer *t, blob_writer *w) {
  moco_save(&t->m, w);
  loader_save(&t->ld, w);
}

int trainer_load(trainer *t, blob_reader *r) {
  int rc = moco_load(&t->m, r);
  if (rc) return moco_error_wrap(rc, "model");
  if ((rc = loader_load(&t->ld, r))) return moco_error_wrap(rc, "data position");
  return 0;
}
