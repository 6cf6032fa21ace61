#include "train/step.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/dist.h"
#include "core/err.h"
#include "core/par.h"
#include "core/tensor.h"

static int adversarial(const moco_config *c) {
  return c->loss.loss != LOSS_NTXENT && c->mine.strategy == MINE_ADVERSARIAL;
}

/* Rows of the query (and key) batches: both views are queries when symmetric, and NT-Xent puts both
 * views through the query encoder. */
static int query_rows(const moco_config *c, int B) {
  return c->symmetric || c->loss.loss == LOSS_NTXENT ? 2 * B : B;
}
static int key_rows(const moco_config *c, int B) {
  return c->symmetric && c->loss.loss != LOSS_NTXENT ? 2 * B : B;
}

/* The layout of S for a batch of B: queue columns unless the strategy is adversarial (AdCo has no
 * queue of negatives; the queue, when configured, only seeds the bank). */
static void layout_for(const moco_model *m, int B, mine_layout *l) {
  int K = adversarial(&m->cfg) ? 0 : m->cfg.queue_size;
  mine_layout_init(l, &m->cfg.mine, K, B);
}

void moco_free(moco_model *m) {
  net_free(&m->query);
  net_free(&m->key);
  optim_free(&m->opt);
  if (m->queue.keys) queue_free(&m->queue);
  mine_free(&m->mine);
  if (m->bank.w) advbank_free(&m->bank);
  tensor_free(m->xq);
  tensor_free(m->xk);
  free(m->perm);
  tensor_free(m->x_world);
  tensor_free(m->k_world);
  free(m->ids_world);
  free(m->labels_world);
  tensor_free(m->k);
  tensor_free(m->s_pos);
  tensor_free(m->dpos);
  tensor_free(m->dself);
  tensor_free(m->S);
  tensor_free(m->dS);
  free(m->mask);
  packed_free(&m->pack);
  tensor_free(m->dq);
  tensor_free(m->ntxent_work);
  memset(m, 0, sizeof *m);
}

/* The rows of this rank's share of the batch (the whole batch in a world of one). */
static int share(const moco_model *m) { return m->cfg.batch_size / m->world; }

/* The keys of this rank's share: the positives of its query rows. */
static float *own_keys(const moco_model *m, int B) { return m->k + (size_t)m->rank * B * m->dim; }

static int alloc_buffers(moco_model *m) {
  const moco_config *c = &m->cfg;
  int B = share(m), R = query_rows(c, B), W = m->world;
  size_t d = (size_t)m->dim, in = (size_t)m->in_len;
  m->xq = tensor_alloc((size_t)R * in);
  m->xk = tensor_alloc((size_t)R * in);
  m->perm = malloc((size_t)W * R * sizeof *m->perm);
  m->k = tensor_calloc((size_t)W * R * d);
  m->ids_world = malloc((size_t)W * B * sizeof *m->ids_world);
  m->labels_world = malloc((size_t)W * B * sizeof *m->labels_world);
  if (!m->ids_world || !m->labels_world) return MOCO_ENOMEM;
  if (W > 1) {
    m->x_world = tensor_alloc((size_t)W * B * in);
    m->k_world = tensor_alloc((size_t)W * B * d);
    if (!m->x_world || !m->k_world) return MOCO_ENOMEM;
  }
  m->s_pos = tensor_calloc((size_t)R);
  m->dpos = tensor_calloc((size_t)R);
  m->dself = tensor_calloc((size_t)R);
  m->dq = tensor_calloc((size_t)R * d);
  if (!m->xq || !m->xk || !m->perm || !m->k || !m->s_pos || !m->dpos || !m->dself || !m->dq)
    return MOCO_ENOMEM;
  if (c->loss.loss == LOSS_NTXENT) {
    m->ntxent_work = tensor_calloc(loss_ntxent_work_len(B, c->queue_size));
    return m->ntxent_work ? 0 : MOCO_ENOMEM;
  }
  mine_layout l;
  layout_for(m, B, &l);
  size_t cells = (size_t)R * (size_t)l.cols;
  m->S = tensor_calloc(cells);
  m->dS = tensor_calloc(cells);
  m->mask = calloc(cells ? cells : 1, 1);
  if (!m->S || !m->dS || !m->mask) return MOCO_ENOMEM;
  return mine_selects_few(&c->mine) ? packed_init(&m->pack, R, packed_cap_for(l.cols)) : 0;
}

/* What a world of several ranks needs of the config (see moco_step in step.h). */
static int check_world(const moco_config *c, int W) {
  const char *no = c->symmetric                   ? "contrast.symmetric"
                   : c->loss.loss == LOSS_NTXENT  ? "loss ntxent"
                   : c->mine.in_batch_negatives   ? "contrast.negatives.in_batch_negatives"
                   : adversarial(c)               ? "the adversarial strategy"
                                                  : NULL;
  if (no)
    return moco_error(MOCO_ECONFIG, "%s: not available across ranks (world of %d); run one process", no,
                      W);
  if (c->batch_size % W)
    return moco_error(MOCO_ECONFIG, "optim.batch_size: %d does not split evenly across a world of %d ranks",
                      c->batch_size, W);
  if (c->shuffle_bn_groups % W)
    return moco_error(MOCO_ECONFIG,
                      "contrast.shuffle_bn_groups: %d is not a multiple of the world size %d (each rank "
                      "encodes groups / world of the shuffled batch's groups)",
                      c->shuffle_bn_groups, W);
  return 0;
}

int moco_init(moco_model *m, const moco_config *cfg, const json_t *spec, net_shape in,
              const char *path) {
  memset(m, 0, sizeof *m);
  int rc;
  m->cfg = *cfg;
  m->world = dist_size();
  m->rank = dist_rank();
  if (m->world > 1 && (rc = check_world(cfg, m->world))) return rc;
  int B = share(m), R = query_rows(cfg, B);
  if ((rc = net_build(&m->query, spec, in, R, path))) return rc;
  if (m->query.n_layers == 0 || m->query.layers[m->query.n_layers - 1].kind != LAYER_L2NORM) {
    net_free(&m->query);
    return moco_error(MOCO_ECONFIG, "%s: the encoder must end in l2norm (embeddings are unit rows)",
                      path);
  }
  rng_t init;
  rng_init(&init, cfg->seed, RNG_STREAM_INIT);
  net_init(&m->query, &init);
  m->dim = (int)net_shape_size(m->query.out_shape);
  m->in_len = (int)net_shape_size(in);
  rng_init(&m->rng, cfg->seed, RNG_STREAM_SAMPLE);
  if ((rc = net_clone(&m->key, &m->query))) goto fail;
  m->query.sync_bn = cfg->sync_bn;
  m->key.bn_groups = cfg->shuffle_bn_groups / m->world;
  if ((rc = optim_init(&m->opt, &m->cfg.optim, m->query.n_params, m->query.segments,
                       m->query.n_segments)))
    goto fail;
  if (cfg->queue_size > 0 && (rc = queue_init(&m->queue, cfg->queue_size, m->dim))) goto fail;
  if ((rc = mine_init(&m->mine, &m->cfg.mine, B, adversarial(cfg) ? 0 : cfg->queue_size, m->dim)))
    goto fail;
  hardness_init(&m->hard, &m->cfg.hardness);
  if (adversarial(cfg) && (rc = advbank_init(&m->bank, &m->cfg.advbank, cfg->mine.bank_size, m->dim, R, &init))) goto fail;
  if ((rc = alloc_buffers(m))) {
    moco_error(rc, "moco_init: work buffers for batch %d, queue %d", cfg->batch_size, cfg->queue_size);
    goto fail;
  }
  return 0;
fail:
  moco_free(m);
  return rc;
}

/* Training progress in [0, 1] for the schedules; 0 throughout when no length is set. */
static double progress(const moco_model *m) {
  if (m->cfg.total_steps <= 0) return 0.0;
  double p = (double)m->step / (double)m->cfg.total_steps;
  return p > 1.0 ? 1.0 : p;
}

/* ---- keys ------------------------------------------------------------------------------------- */

/* Row r of the key batch: view 2 of sample r, then (symmetric) view 1 of sample r − B. */
static const float *key_source(const float *x1, const float *x2, int B, int r, size_t in) {
  return r < B ? x2 + (size_t)r * in : x1 + (size_t)(r - B) * in;
}

/* A world of several: every rank's view 2 gathered, permuted with the shared rng (the same draws on
 * every rank), this rank's slice of the permuted batch encoded, the keys gathered and un-permuted. Equal
 * to one process's shuffle BN on the world batch when each rank's groups are its slice's share of them. */
static int keys_world(moco_model *m, const float *x2, int B) {
  int n = B * m->world;
  size_t in = (size_t)m->in_len, dim = (size_t)m->dim;
  dist_allgather(x2, m->x_world, (size_t)B * in * sizeof(float));
  for (int r = 0; r < n; r++) m->perm[r] = (uint32_t)r;
  if (m->cfg.shuffle_bn_groups > 1) rng_shuffle_u32(&m->rng, m->perm, (uint32_t)n);
  const uint32_t *slice = m->perm + (size_t)m->rank * B;
  for (int r = 0; r < B; r++)
    memcpy(m->xk + (size_t)r * in, m->x_world + (size_t)slice[r] * in, in * sizeof(float));
  const float *out = net_forward(&m->key, m->xk, B);
  if (!out) return moco_error_wrap(MOCO_ERANGE, "key encoder");
  dist_allgather(out, m->k_world, (size_t)B * dim * sizeof(float));
  for (int r = 0; r < n; r++)
    memcpy(m->k + (size_t)m->perm[r] * dim, m->k_world + (size_t)r * dim, dim * sizeof(float));
  return 0;
}

static int check_batch(const moco_model *m, int B) {
  if (B >= 1 && B <= share(m) && (m->world == 1 || B == share(m))) return 0;
  if (m->world > 1)
    return moco_error(MOCO_ERANGE, "moco step: batch of %d on rank %d, each of %d ranks takes %d", B,
                      m->rank, m->world, share(m));
  return moco_error(MOCO_ERANGE, "moco step: batch of %d, allowed [1, batch_size = %d]", B,
                    m->cfg.batch_size);
}

/* The key batch in the permuted order, rows split over the compute team (a megabyte a step). */
typedef struct {
  moco_model *m;
  const float *x1, *x2;
  int B, n;
} key_gather;

static void key_gather_part(void *ctx, int part, int parts) {
  const key_gather *g = ctx;
  size_t in = (size_t)g->m->in_len;
  long lo, hi;
  par_range(g->n, part, parts, &lo, &hi);
  for (long r = lo; r < hi; r++)
    memcpy(g->m->xk + (size_t)r * in, key_source(g->x1, g->x2, g->B, (int)g->m->perm[r], in),
           in * sizeof(float));
}

int moco_keys(moco_model *m, const float *x1, const float *x2, int B, moco_diag *d) {
  int rc = check_batch(m, B);
  if (rc) return rc;
  double t0 = clock_now();
  if (m->world > 1) {
    if ((rc = keys_world(m, x2, B))) return rc;
    if (d) d->time.keys = clock_now() - t0;
    return 0;
  }
  int n = key_rows(&m->cfg, B);
  size_t dim = (size_t)m->dim;
  /* MoCo's shuffle BN: the key encoder's BatchNorm statistics come from groups of a random
   * permutation of the batch, so a query and its key never share statistics and the model cannot
   * cheat through them (He et al. 2020, §3.3). With one group the permutation changes nothing. */
  for (int r = 0; r < n; r++) m->perm[r] = (uint32_t)r;
  if (m->key.bn_groups > 1) rng_shuffle_u32(&m->rng, m->perm, (uint32_t)n);
  key_gather g = {m, x1, x2, B, n};
  par_run(par_parts((long)n * m->in_len, PAR_MIN_FLOATS), key_gather_part, &g);
  const float *out = net_forward(&m->key, m->xk, n);
  if (!out) return moco_error_wrap(MOCO_ERANGE, "key encoder");
  for (int r = 0; r < n; r++)
    memcpy(m->k + (size_t)m->perm[r] * dim, out + (size_t)r * dim, dim * sizeof(float));
  if (d) d->time.keys = clock_now() - t0;
  return 0;
}

/* ---- loss -------------------------------------------------------------------------------------- */

typedef struct {
  double t_similarity, t_mining, t_loss;
  mine_stats st;
  int halves;
} loss_parts;

/* Combines the statistics of the two halves of a symmetric step (equal row counts). */
static void merge_stats(mine_stats *a, const mine_stats *b) {
  a->negatives_per_query = 0.5 * (a->negatives_per_query + b->negatives_per_query);
  a->neg_sim_mean = 0.5f * (a->neg_sim_mean + b->neg_sim_mean);
  a->hardest_sim_mean = 0.5f * (a->hardest_sim_mean + b->hardest_sim_mean);
  a->hardest_sim_max = fmaxf(a->hardest_sim_max, b->hardest_sim_max);
  a->instance_accuracy = 0.5f * (a->instance_accuracy + b->instance_accuracy);
  a->filtered += b->filtered;
  a->extra_positives += b->extra_positives;
  a->same_id += b->same_id;
  a->label_known += b->label_known;
  a->label_same += b->label_same;
}

/* S = Q·[queue | in-batch keys | bank]ᵀ, one sgemm per block into its columns; the in-batch block
 * of each half is against that half's keys. Queue columns past the filled prefix are left as they
 * are: mining never selects them. */
static void similarities(moco_model *m, const mine_layout *l, const float *q, int B, int halves) {
  int R = B * halves, C = l->cols, d = m->dim;
  if (l->queue_size > 0 && m->queue.filled > 0)
    mat_mul_ld(m->S, C, q, d, m->queue.keys, d, R, m->queue.filled, d, 0, 1, 1.0f, 0.0f);
  for (int h = 0; h < halves && l->batch_size > 0; h++)
    mat_mul_ld(m->S + (size_t)h * B * C + l->batch_off, C, q + (size_t)h * B * d, d,
               own_keys(m, B) + (size_t)h * B * d, d, B, B, d, 0, 1, 1.0f, 0.0f);
  if (l->bank_size > 0)
    mat_mul_ld(m->S + l->bank_off, C, q, d, m->bank.w, d, R, l->bank_size, d, 0, 1, 1.0f, 0.0f);
}

/* dq = dS·candidates + dpos·k + dself·q: the transpose of `similarities`, plus the positive and
 * MoCHi's query-mix terms, half by half (each half's in-batch keys, and its rows packed or not).
 * Synthetic columns were folded into the real ones by mine_synth_fold. A symmetric step's loss is the
 * mean of its halves, so each half's gradient counts 1/halves. */
static void query_gradient(moco_model *m, const mine_layout *l, const float *q, int B, int halves) {
  int R = B * halves, C = l->cols, d = m->dim, K = l->queue_size > 0 ? m->queue.filled : 0;
  float a = 1.0f / (float)halves;
  vec_fill(m->dq, 0.0f, (size_t)R * d);
  for (int h = 0; h < halves; h++) {
    size_t row0 = (size_t)h * B;
    float *dq = m->dq + row0 * d;
    const float *dS = m->dS + row0 * C, *k = own_keys(m, B) + row0 * d;
    if (m->packs[h].R) {
      packed_dq(&m->packs[h], a, m->queue.keys, K, k, l->batch_off, d, dq);
      continue;
    }
    if (K > 0) mat_mul_ld(dq, d, dS, C, m->queue.keys, d, B, d, K, 0, 0, a, 1.0f);
    if (l->batch_size > 0) mat_mul_ld(dq, d, dS + l->batch_off, C, k, d, B, d, B, 0, 0, a, 1.0f);
    if (l->bank_size > 0)
      mat_mul_ld(dq, d, dS + l->bank_off, C, m->bank.w, d, B, d, l->bank_size, 0, 0, a, 1.0f);
  }
  for (int r = 0; r < R; r++) {
    vec_axpy(m->dq + (size_t)r * d, a * m->dpos[r], own_keys(m, B) + (size_t)r * d, (size_t)d);
    vec_axpy(m->dq + (size_t)r * d, a * m->dself[r], q + (size_t)r * d, (size_t)d);
  }
}

/* Mining and loss, half by half (a symmetric step's halves have different in-batch keys, and MoCHi's
 * recipes of one half must be folded before the next select overwrites them). Returns the loss, the
 * mean over all rows. */
static int mine_and_loss(moco_model *m, const mine_layout *l, const float *q, const int64_t *ids,
                         const int32_t *labels, int B, int halves, int backward, float hardness,
                         int warmup, double *loss, loss_parts *lp) {
  int C = l->cols;
  *loss = 0.0;
  for (int h = 0; h < halves; h++) {
    size_t row0 = (size_t)h * B;
    float *S = m->S + row0 * C, *dS = m->dS + row0 * C;
    uint8_t *mask = m->mask + row0 * C;
    mine_input in = {
        .batch_size = B,
        .s_pos = m->s_pos + row0,
        .hardness = hardness,
        .warmup = warmup,
        .queue_filled = l->queue_size > 0 ? m->queue.filled : 0,
        .queue_ids = l->queue_size > 0 ? m->queue.ids : NULL,
        .queue_labels = l->queue_size > 0 && labels ? m->queue.labels : NULL,
        .ids = ids,
        .labels = labels,
        .dim = m->dim,
        .q = q + row0 * m->dim,
        .queue_keys = l->queue_size > 0 ? m->queue.keys : NULL,
        .batch_keys = own_keys(m, B) + row0 * m->dim,
        .row_offset = (int64_t)m->rank * B,
    };
    mine_stats st;
    double t0 = clock_now();
    int rc = mine_select(&m->mine, l, &in, S, mask, &m->rng, &st);
    if (rc) return moco_error_wrap(rc, "mining");
    double t1 = clock_now();
    float beta = st.hcl_beta;
    packed_rows *pr = &m->packs[h];
    if (!m->pack.rows || packed_gather(&m->pack, S, mask, (int)row0, B, C, pr))
      *pr = (packed_rows){0}; /* dense: some row uses more columns than packing pays for */
    const float *Sl = pr->R ? pr->S : S;
    const uint8_t *ml = pr->R ? pr->mask : mask;
    float *dSl = pr->R ? pr->dS : dS;
    int Cl = pr->R ? pr->W : C;
    if (backward) {
      *loss += loss_backward(&m->cfg.loss, beta, dSl, m->dpos + row0, Sl, ml, in.s_pos, B, Cl);
      if (l->synth_size > 0)
        mine_synth_fold(&m->mine, l, B, dS, m->dself + row0);
      else
        vec_fill(m->dself + row0, 0.0f, (size_t)B);
    } else {
      *loss += loss_forward(&m->cfg.loss, beta, Sl, ml, in.s_pos, B, Cl);
    }
    lp->t_mining += t1 - t0;
    lp->t_loss += clock_now() - t1;
    if (h == 0)
      lp->st = st;
    else
      merge_stats(&lp->st, &st);
  }
  *loss /= halves;
  return 0;
}

static void fill_diag(moco_diag *d, const mine_stats *st, double loss, const float *s_pos, int R,
                      float hardness) {
  double sp = 0.0;
  for (int r = 0; r < R; r++) sp += s_pos[r];
  d->loss = loss;
  d->pos_sim_mean = (float)(sp / R);
  d->neg_sim_mean = st->neg_sim_mean;
  d->hardest_sim_mean = st->hardest_sim_mean;
  d->hardest_sim_max = st->hardest_sim_max;
  d->instance_accuracy = st->instance_accuracy;
  d->negatives_per_query = st->negatives_per_query;
  d->filtered = st->filtered;
  d->extra_positives = st->extra_positives;
  d->false_negative_rate =
      st->label_known > 0 ? (float)((double)st->label_same / (double)st->label_known) : -1.0f;
  d->hardness = hardness;
}

/* Statistics of a contract-form problem where every used column is a negative (NT-Xent). */
static void view_stats(const loss_view *v, mine_stats *st) {
  memset(st, 0, sizeof *st);
  double neg = 0.0, hard = 0.0;
  long n_neg = 0, correct = 0;
  st->hardest_sim_max = -INFINITY;
  for (int r = 0; r < v->rows; r++) {
    const float *s = v->S + (size_t)r * v->cols;
    const uint8_t *mk = v->mask + (size_t)r * v->cols;
    float top = -INFINITY;
    for (int j = 0; j < v->cols; j++)
      if (mk[j] == MINE_NEG) {
        neg += s[j];
        n_neg++;
        top = fmaxf(top, s[j]);
      }
    hard += top;
    st->hardest_sim_max = fmaxf(st->hardest_sim_max, top);
    correct += v->s_pos[r] > top;
  }
  st->negatives_per_query = (double)n_neg / v->rows;
  st->neg_sim_mean = n_neg ? (float)(neg / n_neg) : 0.0f;
  st->hardest_sim_mean = (float)(hard / v->rows);
  st->instance_accuracy = (float)correct / (float)v->rows;
}

/* SimCLR: both views through the query encoder as one 2B batch, NT-Xent over them plus the valid
 * queue. */
static int ntxent_loss(moco_model *m, const float *x1, const float *x2, int B, int backward,
                       moco_diag *d, float hardness) {
  size_t in = (size_t)m->in_len;
  int K = m->queue.keys ? m->queue.filled : 0, dim = m->dim;
  double t0 = clock_now();
  memcpy(m->xq, x1, (size_t)B * in * sizeof(float));
  memcpy(m->xq + (size_t)B * in, x2, (size_t)B * in * sizeof(float));
  const float *z = m->q = net_forward(&m->query, m->xq, 2 * B);
  if (!z) return moco_error_wrap(MOCO_ERANGE, "query encoder");
  double t1 = clock_now();
  const float *negs = K > 0 ? m->queue.keys : NULL;
  double loss = backward ? loss_ntxent_backward(m->dq, z, B, dim, negs, K, m->cfg.loss.temperature,
                                                m->ntxent_work)
                         : loss_ntxent_forward(z, B, dim, negs, K, m->cfg.loss.temperature,
                                               m->ntxent_work);
  double t2 = clock_now();
  if (backward) {
    net_zero_grad(&m->query);
    int rc = net_backward(&m->query, m->dq, NULL, 2 * B);
    if (rc) return moco_error_wrap(rc, "query encoder backward");
  }
  if (d) {
    loss_view v = loss_ntxent_view(m->ntxent_work, B, K);
    mine_stats st;
    view_stats(&v, &st);
    fill_diag(d, &st, loss, v.s_pos, v.rows, hardness);
    d->time.queries = t1 - t0;
    d->time.similarity = 0.0;
    d->time.mining = 0.0;
    d->time.loss = t2 - t1;
    d->time.backward = clock_now() - t2;
  }
  return 0;
}

int moco_loss(moco_model *m, const float *x1, const float *x2, const int64_t *ids,
              const int32_t *labels, int B, int backward, moco_diag *d) {
  int rc = check_batch(m, B);
  if (rc) return rc;
  int warmup = 0;
  float hardness = hardness_at(&m->hard, progress(m), &warmup);
  if (m->cfg.loss.loss == LOSS_NTXENT) return ntxent_loss(m, x1, x2, B, backward, d, hardness);

  int halves = m->cfg.symmetric ? 2 : 1, R = halves * B, dim = m->dim;
  size_t in = (size_t)m->in_len;
  double t0 = clock_now();
  const float *xq = x1;
  if (halves == 2) {
    memcpy(m->xq, x1, (size_t)B * in * sizeof(float));
    memcpy(m->xq + (size_t)B * in, x2, (size_t)B * in * sizeof(float));
    xq = m->xq;
  }
  const float *q = m->q = net_forward(&m->query, xq, R);
  if (!q) return moco_error_wrap(MOCO_ERANGE, "query encoder");
  for (int r = 0; r < R; r++)
    m->s_pos[r] = vec_dot(q + (size_t)r * dim, own_keys(m, B) + (size_t)r * dim, (size_t)dim);
  double t1 = clock_now();

  mine_layout l;
  layout_for(m, B, &l);
  similarities(m, &l, q, B, halves);
  loss_parts lp = {.t_similarity = clock_now() - t1};
  double loss;
  rc = mine_and_loss(m, &l, q, ids, labels, B, halves, backward, hardness, warmup, &loss, &lp);
  if (rc) return rc;

  double t2 = clock_now();
  if (backward) {
    query_gradient(m, &l, q, B, halves);
    net_zero_grad(&m->query);
    if ((rc = net_backward(&m->query, m->dq, NULL, R))) return moco_error_wrap(rc, "query backward");
  }
  if (d) {
    fill_diag(d, &lp.st, loss, m->s_pos, R, lp.st.hardness);
    d->time.queries = t1 - t0;
    d->time.similarity = lp.t_similarity;
    d->time.mining = lp.t_mining;
    d->time.loss = lp.t_loss;
    d->time.backward = clock_now() - t2;
  }
  return 0;
}

/* ---- the step ----------------------------------------------------------------------------------- */

/* AdCo's bank ascends the same loss at its own temperature: the bank columns' gradient is recomputed
 * at that temperature (into dS, no longer needed) and handed to advbank_update. Uses the queries of
 * the step's forward. */
static int update_bank(moco_model *m, int B, float hardness) {
  int halves = m->cfg.symmetric ? 2 : 1, R = halves * B;
  mine_layout l;
  layout_for(m, B, &l);
  loss_config bank_loss = m->cfg.loss;
  bank_loss.temperature = m->cfg.advbank.temperature;
  float beta = mine_hcl_beta(&m->cfg.mine, hardness);
  loss_backward(&bank_loss, beta, m->dS, m->dpos, m->S, m->mask, m->s_pos, R, l.cols);
  return advbank_update(&m->bank, m->dS + l.bank_off, l.cols, m->q, R);
}

/* ---- a world of several ranks ---------------------------------------------------------------- */

/* The step's figures over the world: means of the per-rank means (equal shares, so the world batch's
 * means), sums of counts, the maximum of maxima. The hardness controller then sees the same signal on
 * every rank. */
static void world_diag(moco_diag *d) {
  double mean[8] = {d->loss, d->pos_sim_mean, d->neg_sim_mean, d->hardest_sim_mean,
                    d->instance_accuracy, d->negatives_per_query, (double)d->filtered,
                    (double)d->extra_positives};
  double fn[2] = {d->false_negative_rate >= 0 ? d->false_negative_rate : 0.0,
                  d->false_negative_rate >= 0 ? 1.0 : 0.0};
  double mx = d->hardest_sim_max;
  dist_sum_f64(mean, 8);
  dist_sum_f64(fn, 2);
  dist_max_f64(&mx, 1);
  double w = 1.0 / dist_size();
  d->loss = mean[0] * w;
  d->pos_sim_mean = (float)(mean[1] * w);
  d->neg_sim_mean = (float)(mean[2] * w);
  d->hardest_sim_mean = (float)(mean[3] * w);
  d->instance_accuracy = (float)(mean[4] * w);
  d->negatives_per_query = mean[5] * w;
  d->filtered = (long)mean[6];
  d->extra_positives = (long)mean[7];
  d->false_negative_rate = fn[1] > 0 ? (float)(fn[0] / fn[1]) : -1.0f;
  d->hardest_sim_max = (float)mx;
}

/* Each rank's gradient is of the mean over its rows; their average is the world batch's mean. */
static void world_gradients(moco_model *m) {
  dist_sum_f32(m->query.grads, m->query.n_params);
  vec_scale(m->query.grads, 1.0f / (float)m->world, m->query.n_params);
}

/* Running BatchNorm statistics: each rank's moved towards its own groups; their average is what one
 * process's split BN over all the groups gives. SyncBN's query statistics are already the world's. */
static void world_buffers(moco_model *m) {
  float w = 1.0f / (float)m->world;
  dist_sum_f32(m->key.buffers, m->key.n_buffers);
  vec_scale(m->key.buffers, w, m->key.n_buffers);
  if (m->cfg.sync_bn) return;
  dist_sum_f32(m->query.buffers, m->query.n_buffers);
  vec_scale(m->query.buffers, w, m->query.n_buffers);
}

/* The world batch's ids and labels in rank order, beside its keys, for the queue. */
static void world_ids(moco_model *m, const int64_t **ids, const int32_t **labels, int B) {
  if (*ids) {
    dist_allgather(*ids, m->ids_world, (size_t)B * sizeof **ids);
    *ids = m->ids_world;
  }
  if (*labels) {
    dist_allgather(*labels, m->labels_world, (size_t)B * sizeof **labels);
    *labels = m->labels_world;
  }
}

/* What the hardness controller holds at its target (contrast/hardness.h). */
static float controller_signal(const hardness_config *c, const moco_diag *d) {
  switch (c->signal) {
  case HARDNESS_SIGNAL_HARDEST_SIM: return d->hardest_sim_mean;
  case HARDNESS_SIGNAL_NEG_SIM: return d->neg_sim_mean;
  default: return d->instance_accuracy;
  }
}

int moco_step(moco_model *m, const float *x1, const float *x2, const int64_t *ids,
              const int32_t *labels, int B, moco_diag *d) {
  double t0 = clock_now(), c0 = dist_comm_seconds();
  moco_diag local;
  if (!d) d = &local;
  memset(d, 0, sizeof *d);
  float lr = sched_lr(&m->cfg.sched, m->step, m->cfg.total_steps);
  float mom = momentum_at(&m->cfg.momentum, m->step, m->cfg.total_steps);
  int rc;
  /* SimCLR without a queue has no use for keys. */
  int need_keys = m->cfg.loss.loss != LOSS_NTXENT || m->queue.keys;
  if ((need_keys && (rc = moco_keys(m, x1, x2, B, d))) ||
      (rc = moco_loss(m, x1, x2, ids, labels, B, 1, d)))
    return rc;

  double t1 = clock_now();
  if (m->world > 1) {
    world_diag(d);
    world_gradients(m);
    world_ids(m, &ids, &labels, B);
  }
  if ((rc = momentum_step_nets(&m->key, &m->query, &m->opt, lr, mom))) return rc;
  if (adversarial(&m->cfg) && (rc = update_bank(m, B, d->hardness))) return rc;
  if (m->queue.keys) {
    int was_full = m->queue.filled == m->queue.queue_size;
    queue_enqueue(&m->queue, m->k, ids, labels, B * m->world, m->step);
    /* AdCo option: once the queue first fills, the bank restarts from real keys. */
    if (adversarial(&m->cfg) && m->cfg.advbank.init_from_queue && !was_full &&
        m->queue.filled == m->queue.queue_size)
      advbank_seed(&m->bank, m->queue.keys, m->queue.filled, &m->rng);
  }
  hardness_observe(&m->hard, progress(m), controller_signal(&m->cfg.hardness, d));
  d->step = m->step;
  d->lr = lr;
  d->momentum = mom;
  if (m->world > 1) world_buffers(m);
  m->step++;
  double t2 = clock_now();
  d->time.update = t2 - t1;
  d->time.total = t2 - t0;
  d->time.comm = dist_comm_seconds() - c0;
  return 0;
}

/* ---- persistence ------------------------------------------------------------------------------- */

enum { MOCO_STATE_VERSION = 1 };

void moco_save(const moco_model *m, blob_writer *w) {
  blob_section_begin(w, "MOCO");
  blob_put_u32(w, MOCO_STATE_VERSION);
  blob_put_u64(w, (uint64_t)m->step);
  blob_put_u64(w, m->rng.state);
  blob_put_u64(w, m->rng.inc);
  blob_put_u32(w, (uint32_t)m->dim);
  blob_put_u32(w, (uint32_t)m->cfg.queue_size);
  blob_put_u32(w, m->bank.w ? (uint32_t)m->bank.size : 0u);
  blob_section_end(w);
  net_save(&m->query, w);
  net_save(&m->key, w);
  optim_save(&m->opt, w);
  if (m->queue.keys) queue_save(&m->queue, w);
  hardness_save(&m->hard, w);
  if (m->bank.w) advbank_save(&m->bank, w);
}

/* On failure the model may be partly loaded: the caller discards it (moco_free, moco_init). */
int moco_load(moco_model *m, blob_reader *r) {
  blob_reader s;
  uint32_t version, dim, K, M;
  uint64_t step, state, inc;
  int rc;
  if ((rc = blob_section(r, "MOCO", &s))) return moco_error_wrap(rc, "training state");
  if ((rc = blob_get_u32(&s, &version)) || (rc = blob_get_u64(&s, &step)) ||
      (rc = blob_get_u64(&s, &state)) || (rc = blob_get_u64(&s, &inc)) ||
      (rc = blob_get_u32(&s, &dim)) || (rc = blob_get_u32(&s, &K)) || (rc = blob_get_u32(&s, &M)))
    return moco_error_wrap(rc, "training state");
  if (version != MOCO_STATE_VERSION)
    return moco_error(MOCO_EFORMAT, "training state: %s: version %u, this build reads %d", s.name,
                      version, MOCO_STATE_VERSION);
  uint32_t my_M = m->bank.w ? (uint32_t)m->bank.size : 0u;
  if (dim != (uint32_t)m->dim || K != (uint32_t)m->cfg.queue_size || M != my_M)
    return moco_error(MOCO_ESHAPE,
                      "training state: %s: saved dim %u, queue_size %u, bank %u; this model has "
                      "%d, %d, %u",
                      s.name, dim, K, M, m->dim, m->cfg.queue_size, my_M);
  if ((rc = net_load(&m->query, r))) return moco_error_wrap(rc, "query encoder");
  if ((rc = net_load(&m->key, r))) return moco_error_wrap(rc, "key encoder");
  if ((rc = optim_load(&m->opt, r))) return moco_error_wrap(rc, "optimizer");
  if (m->queue.keys && (rc = queue_load(&m->queue, r))) return rc;
  if ((rc = hardness_load(&m->hard, r))) return moco_error_wrap(rc, "hardness");
  if (m->bank.w && (rc = advbank_load(&m->bank, r))) return moco_error_wrap(rc, "adversarial bank");
  m->step = (int64_t)step;
  m->rng.state = state;
  m->rng.inc = inc;
  return 0;
}

/* FNV-1a over the bytes of a float array, continuing from h. */
static uint64_t hash_floats(uint64_t h, const float *x, size_t n) {
  const unsigned char *p = (const unsigned char *)x;
  for (size_t i = 0; i < n * sizeof *x; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
  return h;
}

int moco_check_world(const moco_model *m) {
  if (m->world == 1) return 0;
  uint64_t h = 0xcbf29ce484222325ULL;
  h = hash_floats(h, m->query.params, m->query.n_params);
  h = hash_floats(h, m->query.buffers, m->query.n_buffers);
  h = hash_floats(h, m->key.params, m->key.n_params);
  h = hash_floats(h, m->key.buffers, m->key.n_buffers);
  if (m->queue.keys) h = hash_floats(h, m->queue.keys, (size_t)m->queue.filled * m->dim);
  uint64_t *all = malloc((size_t)m->world * sizeof *all);
  if (!all) return moco_error(MOCO_ENOMEM, "moco_check_world: %d hashes", m->world);
  dist_allgather(&h, all, sizeof h);
  int bad = 0;
  for (int r = 1; r < m->world && !bad; r++)
    if (all[r] != all[0]) bad = r;
  int rc = bad ? moco_error(MOCO_ESTATE, "step %lld: the model on rank %d differs from rank 0's "
                            "(hash %016llx, rank 0 %016llx)", (long long)m->step, bad,
                            (unsigned long long)all[bad], (unsigned long long)all[0])
               : 0;
  free(all);
  return rc;
}
