/* Negative selection. Once per step, the batch's sample ids are hashed and every queue slot carrying
 * one of them is linked to its batch row (O(K + B), not O(B K)). Then each row, on some thread of the
 * compute team, goes through three phases:
 *   1. its mask is reset: candidate columns (valid queue slots, in-batch keys) to CAND, the rest to
 *      MINE_OFF;
 *   2. exclusions that do not depend on similarity: the query's own in-batch column, entries carrying
 *      the query's sample id, and in supervised mode entries with the query's label;
 *   3. the false-negative guards, then the strategy, then CAND -> MINE_OFF.
 * The strategies pick by rank with the kernels of rank.c; mixing's synthetic negatives are mix.c's. */
#include "contrast/mine.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "contrast/kselect.h"
#include "core/err.h"
#include "core/par.h"
#include "mine_internal.h"

/* What one row's selection found, kept per row so that the step's sums run in row order whatever
 * part of the team did the row. */
struct mine_row {
  rowacc_t ra;
  long suspects, positives, same_id, sup_filtered;
  long label_known, label_same;
  int knob;
};

const enum_name mine_strategy_names[] = {
    {"all", MINE_ALL},   {"random", MINE_RANDOM}, {"hardest", MINE_HARDEST},         {"semi-hard", MINE_SEMI_HARD},
    {"band", MINE_BAND}, {"mixing", MINE_MIXING}, {"adversarial", MINE_ADVERSARIAL}, {NULL, 0}};
const enum_name mine_ceiling_names[] = {{"none", MINE_CEILING_NONE},
                                        {"absolute", MINE_CEILING_ABSOLUTE},
                                        {"relative", MINE_CEILING_RELATIVE},
                                        {NULL, 0}};

void mine_layout_init(mine_layout *l, const mine_config *c, int queue_size, int batch_size) {
  l->queue_size = queue_size;
  l->batch_off = queue_size;
  l->batch_size = c->in_batch_negatives ? batch_size : 0;
  l->bank_off = l->batch_off + l->batch_size;
  l->bank_size = c->strategy == MINE_ADVERSARIAL ? c->bank_size : 0;
  l->synth_off = l->bank_off + l->bank_size;
  l->synth_size = c->strategy == MINE_MIXING ? c->mix_pairs + c->mix_query : 0;
  l->cols = l->synth_off + l->synth_size;
}

int mine_selects_few(const mine_config *c) {
  mine_strategy s = c->strategy;
  return s == MINE_RANDOM || s == MINE_HARDEST || s == MINE_SEMI_HARD || s == MINE_BAND;
}

float mine_hcl_beta(const mine_config *c, float hardness) { return hardness * c->hcl_beta; }

int mine_init(mine *m, const mine_config *cfg, int max_batch, int max_queue, int dim) {
  memset(m, 0, sizeof *m);
  if (max_batch < 1 || max_queue < 0 || dim < 0)
    return moco_error(MOCO_EINVAL, "mine_init: max_batch %d, max_queue %d, dim %d: need >= 1, >= 0, >= 0",
                      max_batch, max_queue, dim);
  if (cfg->strategy == MINE_MIXING && dim < 1)
    return moco_error(MOCO_EINVAL, "mine_init: mixing needs the key dimension, got %d", dim);
  m->cfg = cfg;
  m->max_batch = max_batch;
  m->max_queue = max_queue;
  m->dim = dim;
  mine_layout l;
  mine_layout_init(&l, cfg, max_queue, max_batch);
  m->max_cols = l.cols;
  m->hash_cap = 16;
  while (m->hash_cap < 2 * max_batch) m->hash_cap *= 2;
  size_t cols = (size_t)l.cols + VL; /* + VL: append_lanes stores whole vectors */
  m->n_ws = par_threads();
  m->ws = calloc((size_t)m->n_ws, sizeof *m->ws);
  m->rows = malloc((size_t)max_batch * sizeof *m->rows);
  m->hash = malloc((size_t)m->hash_cap * sizeof *m->hash);
  m->chain = malloc((size_t)max_batch * sizeof *m->chain);
  m->qhead = malloc((size_t)max_batch * sizeof *m->qhead);
  m->qnext = malloc(((size_t)max_queue + 1) * sizeof *m->qnext);
  m->synth = malloc(((size_t)max_batch * l.synth_size + 1) * sizeof *m->synth);
  int ok = m->ws && m->rows && m->hash && m->chain && m->qhead && m->qnext && m->synth;
  for (int t = 0; ok && t < m->n_ws; t++) {
    mine_ws *w = &m->ws[t];
    w->vals = malloc(cols * sizeof *w->vals);
    w->tmp = malloc(cols * sizeof *w->tmp);
    w->part = malloc(((size_t)l.cols + KSELECT_SLACK) * sizeof *w->part);
    w->idx = malloc(cols * sizeof *w->idx);
    w->bidx = malloc(cols * sizeof *w->bidx);
    ok = w->vals && w->tmp && w->part && w->idx && w->bidx;
  }
  if (!ok) {
    mine_free(m);
    return moco_error(MOCO_ENOMEM, "mine_init: workspaces for %d columns x %d rows", l.cols, max_batch);
  }
  return 0;
}

void mine_free(mine *m) {
  for (int t = 0; m->ws && t < m->n_ws; t++) {
    free(m->ws[t].vals);
    free(m->ws[t].tmp);
    free(m->ws[t].part);
    free(m->ws[t].idx);
    free(m->ws[t].bidx);
  }
  free(m->ws);
  free(m->rows);
  free(m->hash);
  free(m->chain);
  free(m->qhead);
  free(m->qnext);
  free(m->synth);
  memset(m, 0, sizeof *m);
}

static inline int imax(int a, int b) { return a > b ? a : b; }

typedef struct {
  double sum;
  long count;
  double hardest_sum;
  long hardest_rows;
  float hardest_max;
  long correct;
  long label_known, label_same;
} acc_t;

/* ---- the step -------------------------------------------------------------------------------- */

static uint32_t id_hash(int64_t id, int cap) {
  return (uint32_t)(((uint64_t)id * 0x9e3779b97f4a7c15ULL) >> 32) & (uint32_t)(cap - 1);
}

/* hash: id -> first batch row with that id; chain links the rest. Unknown ids (< 0) stay out. */
static void build_id_hash(mine *m, const int64_t *ids, int B) {
  for (int i = 0; i < m->hash_cap; i++) m->hash[i] = -1;
  for (int r = 0; r < B; r++) {
    m->chain[r] = -1;
    if (ids[r] < 0) continue;
    uint32_t h = id_hash(ids[r], m->hash_cap);
    while (m->hash[h] >= 0 && ids[m->hash[h]] != ids[r]) h = (h + 1) & (uint32_t)(m->hash_cap - 1);
    if (m->hash[h] < 0) {
      m->hash[h] = r;
    } else {
      m->chain[r] = m->chain[m->hash[h]];
      m->chain[m->hash[h]] = r;
    }
  }
}

static int id_first_row(const mine *m, const int64_t *ids, int64_t id) {
  uint32_t h = id_hash(id, m->hash_cap);
  while (m->hash[h] >= 0) {
    if (ids[m->hash[h]] == id) return m->hash[h];
    h = (h + 1) & (uint32_t)(m->hash_cap - 1);
  }
  return -1;
}

/* Links every queue slot whose sample id is in the batch into the list of the first batch row with
 * that id (qhead/qnext, in slot order), so that a row finds its same-id slots without a scan. */
static void link_queue_ids(mine *m, const mine_input *in, int B) {
  for (int r = 0; r < B; r++) m->qhead[r] = -1;
  for (int j = in->queue_filled - 1; j >= 0; j--) {
    int f = in->queue_ids[j] >= 0 ? id_first_row(m, in->ids, in->queue_ids[j]) : -1;
    if (f < 0) continue;
    m->qnext[j] = m->qhead[f];
    m->qhead[f] = j;
  }
}

static int check_input(const mine *m, const mine_layout *l, const mine_input *in) {
  const mine_config *c = m->cfg;
  int B = in->batch_size;
  if (B < 1 || B > m->max_batch)
    return moco_error(MOCO_ESHAPE, "mine_select: batch_size %d: allowed 1..%d", B, m->max_batch);
  mine_layout want;
  mine_layout_init(&want, c, l->queue_size, B);
  if (memcmp(&want, l, sizeof want) != 0 || l->cols > m->max_cols || l->queue_size > m->max_queue)
    return moco_error(MOCO_ESHAPE,
                      "mine_select: layout (K %d, batch %d, bank %d, synth %d, cols %d) does not match "
                      "the config for batch %d, or exceeds the init sizes (queue %d, cols %d)",
                      l->queue_size, l->batch_size, l->bank_size, l->synth_size, l->cols, B,
                      m->max_queue, m->max_cols);
  if (in->queue_filled < 0 || in->queue_filled > l->queue_size)
    return moco_error(MOCO_ERANGE, "mine_select: queue_filled %d: allowed 0..%d", in->queue_filled,
                      l->queue_size);
  if (!in->s_pos) return moco_error(MOCO_EINVAL, "mine_select: s_pos is NULL");
  if (!(in->hardness >= 0.0f && in->hardness <= 1.0f))
    return moco_error(MOCO_ERANGE, "mine_select: hardness %g: allowed [0, 1]", in->hardness);
  if (c->supervised && (!in->labels || (l->queue_size > 0 && !in->queue_labels)))
    return moco_error(MOCO_EINVAL, "mine_select: supervised mode needs labels for the batch and queue");
  if (c->strategy == MINE_MIXING && !in->warmup &&
      (in->dim != m->dim || !in->q || (l->queue_size > 0 && !in->queue_keys) ||
       (l->batch_size > 0 && !in->batch_keys)))
    return moco_error(MOCO_EINVAL, "mine_select: mixing needs q, queue_keys, batch_keys of dim %d (got %d)",
                      m->dim, in->dim);
  return 0;
}

/* What the whole step does, fixed before the rows. */
typedef struct {
  mine_strategy strat; /* random during warm-up */
  float h;
  int warm, use_queue, guards, suspect;
} plan_t;

/* Phases 1 and 2 for row i: the candidates, then the exclusions that do not depend on similarity.
 * Returns how many candidates the exclusions removed. */
static int prepare_row(const mine *m, const mine_layout *l, const mine_input *in, const plan_t *p,
                       uint8_t *mk, int i, struct mine_row *o) {
  const int B = in->batch_size;
  /* each byte set once: at K = 65536 a row's mask is 64 KB */
  const int filled = p->use_queue ? in->queue_filled : 0;
  memset(mk, CAND, (size_t)filled);
  memset(mk + filled, MINE_OFF, (size_t)(l->cols - filled));
  int32_t excl = 0;
  if (l->batch_size) {
    memset(mk + l->batch_off, CAND, (size_t)B);
    mk[l->batch_off + i] = MINE_OFF; /* the query's own key is its positive */
    excl++;
  }
  int f = in->ids && in->ids[i] >= 0 ? id_first_row(m, in->ids, in->ids[i]) : -1;
  if (f >= 0 && p->use_queue && in->queue_ids)
    for (int j = m->qhead[f]; j >= 0; j = m->qnext[j]) {
      o->same_id += mk[j] == CAND;
      mk[j] = MINE_OFF;
    }
  if (f >= 0 && l->batch_size)
    for (int r = f; r >= 0; r = m->chain[r]) {
      uint8_t *c = mk + l->batch_off + r;
      o->same_id += r != i && *c == CAND;
      if (r != i) *c = MINE_OFF;
    }
  excl += (int32_t)o->same_id;
  if (m->cfg->supervised && in->labels[i] >= 0) {
    int32_t y = in->labels[i];
    if (p->use_queue)
      for (int j = 0; j < in->queue_filled; j++)
        if (in->queue_labels[j] == y && mk[j] == CAND) mk[j] = MINE_OFF, o->sup_filtered++;
    for (int j = 0; j < l->batch_size; j++)
      if (in->labels[j] == y && mk[l->batch_off + j] == CAND) mk[l->batch_off + j] = MINE_OFF, o->sup_filtered++;
    excl += (int32_t)o->sup_filtered;
  }
  return excl;
}

/* Label diagnostics over a finished row's negatives among the real columns. */
static void count_labels(const mine_layout *l, const mine_input *in, int i, const uint8_t *mk,
                         int use_queue, struct mine_row *o) {
  int32_t y = in->labels[i];
  if (y < 0) return;
  if (use_queue && in->queue_labels)
    for (int j = 0; j < in->queue_filled; j++)
      if (mk[j] == MINE_NEG && in->queue_labels[j] >= 0) {
        o->label_known++;
        o->label_same += in->queue_labels[j] == y;
      }
  for (int j = 0; j < l->batch_size; j++)
    if (mk[l->batch_off + j] == MINE_NEG && in->labels[j] >= 0) {
      o->label_known++;
      o->label_same += in->labels[j] == y;
    }
}

/* The candidate ranges of a row and their count after the `excluded` of prepare_row. */
static row_t row_view(const mine_layout *l, const mine_input *in, const plan_t *p, float *srow,
                      uint8_t *mk, int excluded) {
  row_t r = {.s = srow, .mk = mk};
  if (p->use_queue && in->queue_filled > 0) {
    r.lo[r.nr] = 0;
    r.hi[r.nr++] = in->queue_filled;
  }
  if (l->batch_size) {
    r.lo[r.nr] = l->batch_off;
    r.hi[r.nr++] = l->batch_off + in->batch_size;
  }
  for (int k = 0; k < r.nr; k++) r.width += r.hi[k] - r.lo[k];
  r.n_cand = r.width - excluded;
  return r;
}

/* Guards, then the strategy, for one row; returns the count behind the knob (0 when none). */
static int select_row(const mine *m, mine_ws *ws, const mine_layout *l, const mine_input *in,
                      const plan_t *p, int i, row_t *r, rng_t *rng, rowacc_t *ra) {
  const mine_config *c = m->cfg;
  float u = INFINITY;
  if (c->ceiling == MINE_CEILING_ABSOLUTE) u = c->ceiling_value;
  if (c->ceiling == MINE_CEILING_RELATIVE) u = in->s_pos[i] - c->ceiling_delta;
  want_t w = {.mode = WANT_FIXED, .n = 0, .h = p->h, .eps = c->skip_hardest, .u = u, .suspect = p->suspect};
  int n = 0;
  switch (p->strat) {
  case MINE_ALL:
  case MINE_ADVERSARIAL:
    if (c->skip_hardest > 0.0f) mine_top(m, ws, r, &w, TOP_GUARD, ra);
    mine_finish(r, MINE_NEG, u, p->suspect, ra);
    return 0;
  case MINE_RANDOM:
  case MINE_SEMI_HARD:
    if (p->guards) mine_top(m, ws, r, &w, TOP_GUARD, ra);
    n = p->warm ? c->num_negatives : mine_knob_n(c, p->h, r->n_cand);
    if (n > r->n_cand) n = r->n_cand;
    if (p->strat == MINE_RANDOM)
      mine_pick_random(ws, r, n, rng, ra);
    else
      mine_pick_semi_hard(m, ws, r, n, in->s_pos[i], rng, ra);
    return n;
  case MINE_HARDEST:
  case MINE_BAND:
    w.mode = p->strat == MINE_HARDEST ? WANT_KNOB : WANT_BAND;
    n = mine_top(m, ws, r, &w, TOP_MARK, ra);
    return p->strat == MINE_HARDEST ? n : 0;
  case MINE_MIXING:
    w.mode = WANT_KNOB;
    /* the hard pool stays in idx[0..n) */
    if (p->guards) {
      n = mine_top(m, ws, r, &w, TOP_POOL, ra);
      mine_finish(r, MINE_NEG, u, p->suspect, ra);
    } else {
      n = mine_top(m, ws, r, &w, TOP_POOL_ALL, ra);
    }
    mine_synthesize(m, ws, l, in, i, ws->idx, n, r->s, r->mk, rng, ra);
    return n;
  }
  return 0;
}

/* Columns after the candidates: synthetic ones unused outside mixing, every bank row a negative (AdCo
 * contrasts each query with the whole bank). */
static void other_columns(const mine *m, const mine_layout *l, const plan_t *p, int i, float *srow,
                          uint8_t *mk, rowacc_t *ra) {
  if (p->strat != MINE_MIXING)
    for (int x = 0; x < l->synth_size; x++) {
      m->synth[(size_t)i * l->synth_size + x] = (mine_synth){-2, -2, 0.0f, 0.0f};
      mk[l->synth_off + x] = MINE_OFF;
    }
  for (int j = l->bank_off; j < l->bank_off + l->bank_size; j++) {
    mk[j] = MINE_NEG;
    rowacc_add(ra, srow[j]);
  }
}

static void row_done(acc_t *acc, const rowacc_t *ra, float s_pos) {
  acc->sum += ra->sum;
  acc->count += ra->count;
  if (ra->count > 0) {
    acc->hardest_sum += ra->max;
    acc->hardest_rows++;
    if (ra->max > acc->hardest_max) acc->hardest_max = ra->max;
  }
  acc->correct += !(ra->count > 0 && ra->max >= s_pos); /* vacuously right without negatives */
}

static void fill_stats(mine_stats *st, const mine_config *c, const mine_input *in, const plan_t *p,
                       const acc_t *acc) {
  int B = in->batch_size;
  memset(st, 0, sizeof *st);
  st->hardness = p->warm ? 0.0f : in->hardness;
  st->band_lo = p->strat == MINE_BAND ? p->h * c->band_lo : 0.0f;
  st->band_hi = p->strat == MINE_BAND ? 1.0f - p->h * (1.0f - c->band_hi) : 1.0f;
  st->hcl_beta = mine_hcl_beta(c, st->hardness);
  st->negatives_per_query = (double)acc->count / B;
  st->neg_sim_mean = acc->count ? (float)(acc->sum / acc->count) : 0.0f;
  st->hardest_sim_mean = acc->hardest_rows ? (float)(acc->hardest_sum / acc->hardest_rows) : 0.0f;
  st->hardest_sim_max = acc->hardest_rows ? acc->hardest_max : 0.0f;
  st->instance_accuracy = (float)acc->correct / B;
  st->label_known = acc->label_known;
  st->label_same = acc->label_same;
}

/* One part of mine_select's rows. */
typedef struct {
  mine *m;
  const mine_layout *l;
  const mine_input *in;
  const plan_t *p;
  float *S;
  uint8_t *mask;
  uint64_t seed; /* row i draws from stream i of this seed */
} job_t;

static void select_part(void *ctx, int part, int parts) {
  const job_t *j = ctx;
  mine *m = j->m;
  const mine_layout *l = j->l;
  long lo, hi;
  par_range(j->in->batch_size, part, parts, &lo, &hi);
  for (int i = (int)lo; i < (int)hi; i++) {
    float *srow = j->S + (size_t)i * l->cols;
    uint8_t *mk = j->mask + (size_t)i * l->cols;
    struct mine_row *o = &m->rows[i];
    *o = (struct mine_row){.ra = {0, 0, -INFINITY}};
    int excluded = prepare_row(m, l, j->in, j->p, mk, i, o);
    row_t r = row_view(l, j->in, j->p, srow, mk, excluded);
    r.next = i + 1 < (int)hi ? srow + l->cols : NULL;
    rng_t rng;
    rng_init(&rng, j->seed, (uint64_t)(j->in->row_offset + i));
    o->knob = select_row(m, &m->ws[part], l, j->in, j->p, i, &r, &rng, &o->ra);
    other_columns(m, l, j->p, i, srow, mk, &o->ra);
    o->suspects = r.suspects;
    o->positives = r.positives;
    if (j->in->labels) count_labels(l, j->in, i, mk, j->p->use_queue, o);
  }
}

int mine_select(mine *m, const mine_layout *l, const mine_input *in, float *S, uint8_t *mask,
                rng_t *rng, mine_stats *st) {
  int rc = check_input(m, l, in);
  if (rc) return rc;
  const mine_config *c = m->cfg;
  plan_t p = {.strat = c->strategy, .h = in->hardness};
  p.warm = in->warmup && c->strategy != MINE_ADVERSARIAL;
  if (p.warm) p.strat = MINE_RANDOM;
  p.use_queue = c->strategy != MINE_ADVERSARIAL;
  p.guards = c->ceiling != MINE_CEILING_NONE || c->skip_hardest > 0.0f;
  p.suspect = c->suspects_as_positives ? MINE_POS : MINE_OFF;

  const int B = in->batch_size;
  if (in->ids) {
    build_id_hash(m, in->ids, B);
    if (p.use_queue && in->queue_ids) link_queue_ids(m, in, B);
  }
  job_t job = {m, l, in, &p, S, mask, rng_u64(rng)};
  int parts = par_parts((long)B * l->cols, PAR_MIN_FLOATS);
  if (parts > B) parts = B;
  if (parts > m->n_ws) parts = m->n_ws;
  par_run(parts, select_part, &job);

  acc_t acc = {.hardest_max = -INFINITY};
  long suspects = 0, positives = 0, same = 0, sup_filtered = 0;
  int knob = 0;
  for (int i = 0; i < B; i++) { /* in row order: the sums do not depend on the split */
    const struct mine_row *o = &m->rows[i];
    knob = imax(knob, o->knob);
    suspects += o->suspects;
    positives += o->positives;
    same += o->same_id;
    sup_filtered += o->sup_filtered;
    acc.label_known += o->label_known;
    acc.label_same += o->label_same;
    row_done(&acc, &o->ra, in->s_pos[i]);
  }
  if (st) {
    fill_stats(st, c, in, &p, &acc);
    st->knob_n = knob;
    st->filtered = suspects + sup_filtered;
    st->extra_positives = positives;
    st->same_id = same;
  }
  return 0;
}

