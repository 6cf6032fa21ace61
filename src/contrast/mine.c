/* Negative selection. One mine_select runs in three phases:
 *   1. every row's mask is reset: candidate columns (valid queue slots, in-batch keys) to CAND, the
 *      rest to MINE_OFF;
 *   2. exclusions that do not depend on similarity: the query's own in-batch column, entries carrying
 *      the query's sample id (found through a hash of the batch ids, O(K + B) per step rather than
 *      O(B K)), and in supervised mode entries with the query's label;
 *   3. per row: the false-negative guards, then the strategy, then CAND -> MINE_OFF.
 * Selection by rank never sorts a row: a threshold estimated from a strided sample of the row lets a
 * single pass gather only the few entries that can be among the wanted ranks (blocks of 16 columns
 * with no entry above it are skipped with one vectorised compare), and k-th element selection on that
 * small set (kselect.h) finds the exact boundary. Ties at a boundary go to the lower column, so the
 * result is exactly specified. */
#include "contrast/mine.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "contrast/kselect.h"
#include "core/err.h"

/* Internal mask value of a candidate not yet decided; never left in a mask mine_select returns. */
enum { CAND = 4 };

/* Size of the strided sample a threshold is estimated from, and the row length below which a row is
 * simply gathered whole (the sample would cost as much as it saves). */
enum { SAMPLE = 256, SAMPLE_MIN_ROW = 4 * SAMPLE, BLOCK = 16 };

void mine_config_default(mine_config *c) {
  memset(c, 0, sizeof *c);
  c->strategy = MINE_ALL;
  c->in_batch_negatives = 0;
  c->num_negatives = 1024;
  c->num_negatives_easy = 0;
  c->margin = 0.2f;
  c->band_lo = 0.05f;
  c->band_hi = 0.3f;
  c->mix_pairs = 512; /* MoCHi (N, s, s') = (1024, 512, 256), the paper's ImageNet-100 setting */
  c->mix_query = 256;
  c->bank_size = 16384; /* AdCo's ImageNet bank is 65536; 16384 suits the small datasets mocod trains */
  c->hcl_beta = 1.0f;
  c->ceiling = MINE_CEILING_NONE;
  c->ceiling_value = 0.95f;
  c->ceiling_delta = 0.0f;
  c->skip_hardest = 0.0f;
  c->suspects_as_positives = 0;
  c->supervised = 0;
}

static const char *const strategy_names[] = {"all",  "random", "hardest",    "semi-hard",
                                             "band", "mixing", "adversarial"};

const char *mine_strategy_name(mine_strategy s) {
  return (unsigned)s < sizeof strategy_names / sizeof *strategy_names ? strategy_names[s] : "?";
}

int mine_strategy_parse(const char *name, mine_strategy *out) {
  for (size_t i = 0; i < sizeof strategy_names / sizeof *strategy_names; i++)
    if (!strcmp(name, strategy_names[i])) {
      *out = (mine_strategy)i;
      return 0;
    }
  return moco_error(MOCO_ECONFIG,
                    "mine.strategy: \"%s\": expected all, random, hardest, semi-hard, band, mixing "
                    "or adversarial",
                    name);
}

int mine_config_check(const mine_config *c) {
  if ((unsigned)c->strategy > MINE_ADVERSARIAL)
    return moco_error(MOCO_ECONFIG, "mine.strategy: %d: unknown strategy", (int)c->strategy);
  if (c->num_negatives < 1)
    return moco_error(MOCO_ECONFIG, "mine.num_negatives: %d: must be >= 1", c->num_negatives);
  if (c->num_negatives_easy < 0)
    return moco_error(MOCO_ECONFIG, "mine.num_negatives_easy: %d: must be >= 0 (0 = all)",
                      c->num_negatives_easy);
  if (!(c->margin >= 0.0f && c->margin <= 2.0f))
    return moco_error(MOCO_ECONFIG, "mine.margin: %g: allowed range [0, 2]", c->margin);
  if (!(c->band_lo >= 0.0f && c->band_lo < c->band_hi && c->band_hi <= 1.0f))
    return moco_error(MOCO_ECONFIG, "mine.band: [%g, %g]: need 0 <= lo < hi <= 1", c->band_lo,
                      c->band_hi);
  if (c->mix_pairs < 0 || c->mix_query < 0)
    return moco_error(MOCO_ECONFIG, "mine.mix_pairs/mix_query: %d/%d: must be >= 0", c->mix_pairs,
                      c->mix_query);
  if (c->strategy == MINE_ADVERSARIAL && c->bank_size < 1)
    return moco_error(MOCO_ECONFIG, "mine.bank_size: %d: must be >= 1", c->bank_size);
  if (!(c->hcl_beta >= 0.0f))
    return moco_error(MOCO_ECONFIG, "mine.hcl_beta: %g: must be >= 0", c->hcl_beta);
  if ((unsigned)c->ceiling > MINE_CEILING_RELATIVE)
    return moco_error(MOCO_ECONFIG, "mine.ceiling: %d: unknown mode", (int)c->ceiling);
  if (c->ceiling == MINE_CEILING_ABSOLUTE && !(c->ceiling_value >= -1.0f && c->ceiling_value <= 1.0f))
    return moco_error(MOCO_ECONFIG, "mine.ceiling_value: %g: allowed range [-1, 1]", c->ceiling_value);
  if (c->ceiling == MINE_CEILING_RELATIVE && !(c->ceiling_delta >= -2.0f && c->ceiling_delta <= 2.0f))
    return moco_error(MOCO_ECONFIG, "mine.ceiling_delta: %g: allowed range [-2, 2]", c->ceiling_delta);
  if (!(c->skip_hardest >= 0.0f && c->skip_hardest < 1.0f))
    return moco_error(MOCO_ECONFIG, "mine.skip_hardest: %g: allowed range [0, 1)", c->skip_hardest);
  return 0;
}

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

float mine_hcl_beta(const mine_config *c, float hardness) { return hardness * c->hcl_beta; }

int mine_init(mine *m, const mine_config *cfg, int max_batch, int max_queue, int dim) {
  memset(m, 0, sizeof *m);
  int rc = mine_config_check(cfg);
  if (rc) return rc;
  if (max_batch < 1 || max_queue < 0 || dim < 0)
    return moco_error(MOCO_EINVAL, "mine_init: max_batch %d, max_queue %d, dim %d: need >= 1, >= 0, >= 0",
                      max_batch, max_queue, dim);
  if (cfg->strategy == MINE_MIXING && dim < 1)
    return moco_error(MOCO_EINVAL, "mine_init: mixing needs the key dimension, got %d", dim);
  m->cfg = *cfg;
  m->max_batch = max_batch;
  m->max_queue = max_queue;
  m->dim = dim;
  mine_layout l;
  mine_layout_init(&l, cfg, max_queue, max_batch);
  m->max_cols = l.cols;
  m->hash_cap = 16;
  while (m->hash_cap < 2 * max_batch) m->hash_cap *= 2;
  size_t cols = (size_t)l.cols + 1;
  m->vals = malloc(cols * sizeof *m->vals);
  m->tmp = malloc(cols * sizeof *m->tmp);
  m->idx = malloc(cols * sizeof *m->idx);
  m->n_excl = malloc((size_t)max_batch * sizeof *m->n_excl);
  m->hash = malloc((size_t)m->hash_cap * sizeof *m->hash);
  m->chain = malloc((size_t)max_batch * sizeof *m->chain);
  m->synth = malloc(((size_t)max_batch * l.synth_size + 1) * sizeof *m->synth);
  if (!m->vals || !m->tmp || !m->idx || !m->n_excl || !m->hash || !m->chain || !m->synth) {
    mine_free(m);
    return moco_error(MOCO_ENOMEM, "mine_init: workspaces for %d columns x %d rows", l.cols, max_batch);
  }
  return 0;
}

void mine_free(mine *m) {
  free(m->vals);
  free(m->tmp);
  free(m->idx);
  free(m->n_excl);
  free(m->hash);
  free(m->chain);
  free(m->synth);
  memset(m, 0, sizeof *m);
}

static inline int imax(int a, int b) { return a > b ? a : b; }

/* ---- random numbers ---------------------------------------------------------------------------- */

/* Uniform in [0, n) by Lemire's multiply-shift with rejection (unbiased); the division of
 * rng_below happens only on the rare rejection path, which matters at ~10^5 draws per step. */
static uint32_t draw_below(rng_t *r, uint32_t n) {
  uint64_t x = (uint64_t)rng_u32(r) * n;
  uint32_t low = (uint32_t)x;
  if (low < n) {
    uint32_t t = (uint32_t)(-n) % n;
    while (low < t) {
      x = (uint64_t)rng_u32(r) * n;
      low = (uint32_t)x;
    }
  }
  return (uint32_t)(x >> 32);
}

/* Uniform in the open interval (0, 1). */
static float draw_open01(rng_t *r) { return ((float)(rng_u32(r) >> 8) + 0.5f) * (1.0f / 16777216.0f); }

/* ---- one row --------------------------------------------------------------------------------- */

/* A query row: its similarities, its mask, and the column ranges that hold candidates. */
typedef struct {
  float *s; /* the synthetic columns of mixing are written through it */
  uint8_t *mk;
  int nr;
  int lo[2], hi[2];
  int width;   /* columns in the ranges */
  int n_cand;  /* candidates left (width minus exclusions and suspects so far) */
  long suspects, positives;
} row_t;

/* Maps i in [0, width) to a column of the ranges. */
static inline int row_col(const row_t *r, int i) {
  int first = r->hi[0] - r->lo[0];
  return i < first ? r->lo[0] + i : r->lo[1] + (i - first);
}

/* Gathers into vals/idx (column order) the candidates with t <= s <= u. Candidates with s > u are
 * suspects: with suspect >= 0 they are marked so and counted, with suspect < 0 they are only skipped.
 * NaN similarities compare false and are never gathered. */
static int gather(mine *m, row_t *r, float t, float u, int suspect) {
  const float *s = r->s;
  uint8_t *mk = r->mk;
  int n = 0;
  for (int k = 0; k < r->nr; k++) {
    for (int j = r->lo[k]; j < r->hi[k]; j += BLOCK) {
      int end = j + BLOCK <= r->hi[k] ? j + BLOCK : r->hi[k];
      if (end - j == BLOCK) {
        int hit = 0;
        for (int b = 0; b < BLOCK; b++) hit |= s[j + b] >= t;
        if (!hit) continue;
      }
      for (int c = j; c < end; c++) {
        float x = s[c];
        if (!(x >= t) || mk[c] != CAND) continue;
        if (x > u) {
          if (suspect >= 0) {
            mk[c] = (uint8_t)suspect;
            r->suspects++;
            r->positives += suspect == MINE_POS;
            r->n_cand--;
          }
          continue;
        }
        m->vals[n] = x;
        m->idx[n] = c;
        n++;
      }
    }
  }
  return n;
}

/* A threshold with about `want` (and very likely at least `want`) candidates s <= u at or above it:
 * the matching quantile of a strided sample, lowered by three binomial standard deviations plus four
 * places. -INFINITY when the row is short or the sample cannot tell; the caller then gathers all. */
static float estimate_threshold(const row_t *r, int want, float u) {
  if (want <= 0) return u;
  if (r->width < SAMPLE_MIN_ROW || want >= r->n_cand) return -INFINITY;
  float sample[SAMPLE];
  int n = 0, seen = 0;
  int step = r->width / SAMPLE;
  for (int i = step / 2; i < r->width && seen < SAMPLE; i += step) {
    int c = row_col(r, i);
    float x = r->s[c];
    if (r->mk[c] != CAND) continue;
    seen++;
    if (x <= u) sample[n++] = x;
  }
  if (n < SAMPLE / 8) return -INFINITY;
  /* the candidates at or below u, as the sample sees them */
  double p = (double)want / ((double)r->n_cand * n / seen);
  if (p >= 1.0) return -INFINITY;
  double mean = p * n;
  int rank = (int)ceil(mean + 3.0 * sqrt(mean * (1.0 - p)) + 4.0);
  if (rank >= n) return -INFINITY;
  return kselect_largest(sample, n, rank);
}

/* n(h): geometric interpolation from the easy count (0 = every candidate) to num_negatives. */
static int knob_n(const mine_config *c, float h, int n_cand) {
  double easy = c->num_negatives_easy > 0 ? c->num_negatives_easy : (n_cand > 0 ? n_cand : 1);
  double n = exp((1.0 - h) * log(easy) + h * log((double)c->num_negatives));
  return (int)lround(n);
}

/* Rank windows are fractions of a count; the small epsilon keeps 0.7 * 10 at 7 despite float. */
static int frac_count(double f, int n) { return (int)floor(f * n + 1e-4); }

/* What a row wants from top(): the top `eps` fraction turned into suspects, then ranks [a, b) of the
 * candidates left, where [a, b) follows from their count by one of the modes. */
typedef enum { WANT_FIXED, WANT_KNOB, WANT_BAND } want_mode;
typedef struct {
  want_mode mode;
  int n;          /* WANT_FIXED */
  float h;        /* WANT_KNOB, WANT_BAND */
  float eps;
  float u;        /* candidates above u are suspects (suspect >= 0) or ignored (suspect < 0) */
  int suspect;
} want_t;

static void want_window(const mine_config *c, const want_t *w, int n_left, int *a, int *b) {
  *a = 0;
  if (w->mode == WANT_FIXED) {
    *b = w->n;
  } else if (w->mode == WANT_KNOB) {
    *b = knob_n(c, w->h, n_left);
  } else {
    *a = frac_count(w->h * c->band_lo, n_left);
    *b = frac_count(1.0 - w->h * (1.0 - c->band_hi), n_left);
    if (*b <= *a && *a < n_left) *b = *a + 1;
  }
  if (*b > n_left) *b = n_left;
  if (*a > *b) *a = *b;
}

/* The value at descending rank R (1-based) of v[0..n) and how many entries equal to it belong to the
 * top R (the rest of the tie lies below the boundary). R == 0: +inf, none. Reorders tmp[0..n). */
typedef struct {
  float v;
  int ties;
} boundary;

static boundary find_boundary(float *tmp, int n, int R) {
  boundary bd = {INFINITY, 0};
  if (R <= 0) return bd;
  bd.v = kselect_largest(tmp, n, R);
  int above = 0;
  for (int i = 0; i < R; i++) above += tmp[i] > bd.v; /* tmp[0..R) holds the top R */
  bd.ties = R - above;
  return bd;
}

/* Whether x at this point of a column-order scan is inside the top of a boundary; consumes a tie. */
static inline int in_top(boundary *bd, float x) {
  if (x > bd->v) return 1;
  if (x == bd->v && bd->ties > 0) {
    bd->ties--;
    return 1;
  }
  return 0;
}

/* Applies the guards of `w` to the row and leaves the columns of ranks [a, b) of what remains in
 * idx[0..return), column order. The eps suspects are marked like ceiling suspects. */
static int top(mine *m, row_t *r, const want_t *w) {
  const mine_config *c = &m->cfg;
  int a, b, E = frac_count(w->eps, r->n_cand);
  want_window(c, w, r->n_cand - E, &a, &b);
  float t = estimate_threshold(r, E + b, w->u);
  int g = gather(m, r, t, w->u, w->suspect);
  /* ceiling suspects are known now: the exact window */
  E = frac_count(w->eps, r->n_cand);
  want_window(c, w, r->n_cand - E, &a, &b);
  if (g < E + b && t > -INFINITY) g = gather(m, r, -INFINITY, w->u, w->suspect);
  if (g < E + b) { /* fewer than counted: NaN similarities; take what exists */
    if (E > g) E = g;
    if (b > g - E) b = g - E;
    if (a > b) a = b;
  }
  if (E + b == 0) return 0;
  memcpy(m->tmp, m->vals, (size_t)g * sizeof *m->tmp);
  boundary bB = find_boundary(m->tmp, g, E + b);
  boundary bA = find_boundary(m->tmp, E + b, E + a);
  boundary bE = find_boundary(m->tmp, E + a, E);
  int n = 0;
  for (int i = 0; i < g; i++) {
    float x = m->vals[i];
    int tE = in_top(&bE, x), tA = in_top(&bA, x), tB = in_top(&bB, x);
    if (tE) {
      int col = m->idx[i];
      r->mk[col] = w->suspect >= 0 ? (uint8_t)w->suspect : MINE_OFF;
      r->suspects++;
      r->positives += w->suspect == MINE_POS;
      r->n_cand--;
    } else if (tB && !tA) {
      m->idx[n++] = m->idx[i];
    }
  }
  return n;
}

/* Per-step accumulators of the statistics. */
typedef struct {
  double sum;
  long count;
  double hardest_sum;
  long hardest_rows;
  float hardest_max;
  long correct;
  long label_known, label_same;
} acc_t;

/* A row's selected negatives, folded into acc_t at the end of the row. */
typedef struct {
  double sum;
  long count;
  float max;
} rowacc_t;

static inline void rowacc_add(rowacc_t *ra, float x) {
  ra->sum += x;
  ra->count++;
  if (x > ra->max) ra->max = x;
}

static void mark_list(row_t *r, const int32_t *cols, int n, rowacc_t *ra) {
  for (int i = 0; i < n; i++) {
    r->mk[cols[i]] = MINE_NEG;
    rowacc_add(ra, r->s[cols[i]]);
  }
}

/* Final pass: every remaining candidate becomes `to`; when to is MINE_NEG, those above u are
 * suspects instead and the negatives are counted. */
static void finish(row_t *r, uint8_t to, float u, int suspect, rowacc_t *ra) {
  for (int k = 0; k < r->nr; k++) {
    const float *s = r->s;
    uint8_t *mk = r->mk;
    if (to == MINE_OFF) {
      for (int j = r->lo[k]; j < r->hi[k]; j++) mk[j] = mk[j] == CAND ? MINE_OFF : mk[j];
      continue;
    }
    double sum = 0;
    long cnt = 0;
    float mx = ra->max;
    for (int j = r->lo[k]; j < r->hi[k]; j++) {
      if (mk[j] != CAND) continue;
      float x = s[j];
      if (x > u) {
        mk[j] = (uint8_t)suspect;
        r->suspects++;
        r->positives += suspect == MINE_POS;
        r->n_cand--;
        continue;
      }
      mk[j] = MINE_NEG;
      sum += x;
      cnt++;
      mx = x > mx ? x : mx;
    }
    ra->sum += sum;
    ra->count += cnt;
    ra->max = mx;
  }
}

/* Partial Fisher-Yates: idx[0..n) become a uniform sample without replacement of idx[0..g). */
static void shuffle_prefix(int32_t *idx, int g, int n, rng_t *rng) {
  for (int i = 0; i < n && i < g; i++) {
    int j = i + (int)draw_below(rng, (uint32_t)(g - i));
    int32_t t = idx[i];
    idx[i] = idx[j];
    idx[j] = t;
  }
}

/* n uniform candidates without replacement. Dense rows: rejection draws over the ranges (each
 * accepted draw is uniform over the candidates not yet drawn), or drawing the complement when more
 * than half are wanted; sparse rows: gather and a partial Fisher-Yates shuffle. */
static void pick_random(mine *m, row_t *r, int n, rng_t *rng, rowacc_t *ra) {
  if (n >= r->n_cand) {
    finish(r, MINE_NEG, INFINITY, MINE_OFF, ra);
    return;
  }
  if (2 * r->n_cand >= r->width) {
    int drop = 2 * n > r->n_cand;
    int want = drop ? r->n_cand - n : n;
    uint8_t mark = drop ? MINE_OFF : MINE_NEG;
    for (int got = 0; got < want;) {
      int col = row_col(r, (int)draw_below(rng, (uint32_t)r->width));
      if (r->mk[col] != CAND) continue;
      r->mk[col] = mark;
      if (!drop) rowacc_add(ra, r->s[col]);
      got++;
    }
    finish(r, drop ? MINE_NEG : MINE_OFF, INFINITY, MINE_OFF, ra);
    return;
  }
  int g = gather(m, r, -INFINITY, INFINITY, -1);
  shuffle_prefix(m->idx, g, n, rng);
  mark_list(r, m->idx, n < g ? n : g, ra);
  finish(r, MINE_OFF, INFINITY, MINE_OFF, ra);
}

/* FaceNet's semi-hard negatives (Schroff et al. 2015): s_pos - margin < s < s_pos, n of them at
 * random; when the band holds fewer, the hardest below it fill up to n. */
static void pick_semi_hard(mine *m, row_t *r, int n, float s_pos, rng_t *rng, rowacc_t *ra) {
  float low = s_pos - m->cfg.margin;
  int g = gather(m, r, nextafterf(low, INFINITY), nextafterf(s_pos, -INFINITY), -1);
  if (g >= n) {
    shuffle_prefix(m->idx, g, n, rng);
    mark_list(r, m->idx, n, ra);
  } else {
    mark_list(r, m->idx, g, ra);
    r->n_cand -= g;
    want_t w = {.mode = WANT_FIXED, .n = n - g, .u = low, .suspect = -1};
    int k = top(m, r, &w);
    mark_list(r, m->idx, k, ra);
  }
  finish(r, MINE_OFF, INFINITY, MINE_OFF, ra);
}

/* ---- mixing (MoCHi) ---------------------------------------------------------------------------- */

static const float *key_of(const mine_layout *l, const mine_input *in, int col) {
  if (col < l->queue_size) return in->queue_keys + (size_t)col * in->dim;
  return in->batch_keys + (size_t)(col - l->batch_off) * in->dim;
}

/* Eight partial sums so the compiler can keep them in one vector register. */
static float dot(const float *x, const float *y, int n) {
  float acc[8] = {0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; k++) acc[k] += x[i + k] * y[i + k];
  float s = 0;
  for (; i < n; i++) s += x[i] * y[i];
  for (int k = 0; k < 8; k++) s += acc[k];
  return s;
}

/* MoCHi (Kalantidis et al. 2020, eqs. 3-4): from the hard pool P of a row, h = normalise(a n_i +
 * (1-a) n_j) with a ~ U(0,1) for the first mix_pairs columns, and h' = normalise(b q + (1-b) n_j)
 * with b ~ U(0, 0.5) for the next mix_query (the query never dominates its mix). The similarity q.h
 * follows from the real columns' similarities and one key-key dot product, so no point is built. */
static void synthesize(mine *m, const mine_layout *l, const mine_input *in, int row, const int32_t *P,
                       int np, float *srow, uint8_t *mrow, rng_t *rng, rowacc_t *ra) {
  const mine_config *c = &m->cfg;
  mine_synth *rec = m->synth + (size_t)row * l->synth_size;
  for (int x = 0; x < l->synth_size; x++) {
    int col = l->synth_off + x;
    mine_synth sy = {-2, -2, 0.0f, 0.0f};
    float sim = 0.0f;
    if (x < c->mix_pairs && np >= 2) {
      int i = (int)draw_below(rng, (uint32_t)np);
      int j = (int)draw_below(rng, (uint32_t)(np - 1));
      j += j >= i; /* two distinct pool members */
      float a = draw_open01(rng);
      float kk = dot(key_of(l, in, P[i]), key_of(l, in, P[j]), in->dim);
      float n2 = a * a + (1 - a) * (1 - a) + 2 * a * (1 - a) * kk;
      if (n2 > 1e-12f) {
        float inv = 1.0f / sqrtf(n2);
        sy = (mine_synth){P[i], P[j], a * inv, (1 - a) * inv};
        sim = sy.wa * srow[P[i]] + sy.wb * srow[P[j]];
      }
    } else if (x >= c->mix_pairs && np >= 1) {
      int j = (int)draw_below(rng, (uint32_t)np);
      float b = 0.5f * draw_open01(rng);
      float sj = srow[P[j]];
      float n2 = b * b + (1 - b) * (1 - b) + 2 * b * (1 - b) * sj;
      if (n2 > 1e-12f) {
        float inv = 1.0f / sqrtf(n2);
        sy = (mine_synth){-1, P[j], b * inv, (1 - b) * inv};
        sim = sy.wa + sy.wb * sj; /* q.q = 1 */
      }
    }
    rec[x] = sy;
    if (sy.b >= 0) {
      srow[col] = sim;
      mrow[col] = MINE_NEG;
      rowacc_add(ra, sim);
    } else {
      srow[col] = 0.0f;
      mrow[col] = MINE_OFF;
    }
  }
}

void mine_synth_point(const mine *m, const mine_layout *l, const mine_input *in, int row, int x,
                      float *out) {
  const mine_synth *sy = m->synth + (size_t)row * l->synth_size + x;
  const float *a = sy->a == -1 ? in->q + (size_t)row * in->dim : key_of(l, in, sy->a);
  for (int k = 0; k < in->dim; k++) out[k] = 0.0f;
  if (sy->b < 0) return;
  const float *b = key_of(l, in, sy->b);
  for (int k = 0; k < in->dim; k++) out[k] = sy->wa * a[k] + sy->wb * b[k];
}

void mine_synth_fold(const mine *m, const mine_layout *l, int batch_size, float *dS, float *dself) {
  for (int i = 0; i < batch_size; i++) {
    float *drow = dS + (size_t)i * l->cols;
    const mine_synth *rec = m->synth + (size_t)i * l->synth_size;
    dself[i] = 0.0f;
    for (int x = 0; x < l->synth_size; x++) {
      float g = drow[l->synth_off + x];
      if (rec[x].b < 0 || g == 0.0f) continue;
      if (rec[x].a == -1)
        dself[i] += g * rec[x].wa;
      else
        drow[rec[x].a] += g * rec[x].wa;
      drow[rec[x].b] += g * rec[x].wb;
    }
  }
}

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

/* Column col of every row with sample id `id` (except skip_row) stops being a candidate. */
static long exclude_id(mine *m, const mine_input *in, const mine_layout *l, uint8_t *mask, int64_t id,
                       int col, int skip_row) {
  long n = 0;
  for (int r = id_first_row(m, in->ids, id); r >= 0; r = m->chain[r]) {
    uint8_t *p = mask + (size_t)r * l->cols + col;
    if (r == skip_row || *p != CAND) continue;
    *p = MINE_OFF;
    m->n_excl[r]++;
    n++;
  }
  return n;
}

static int check_input(const mine *m, const mine_layout *l, const mine_input *in) {
  const mine_config *c = &m->cfg;
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

/* Phases 1 and 2 for all rows; returns the same-id exclusions. */
static long prepare_masks(mine *m, const mine_layout *l, const mine_input *in, uint8_t *mask,
                          int use_queue, long *supervised_filtered) {
  const int B = in->batch_size;
  for (int i = 0; i < B; i++) {
    uint8_t *mk = mask + (size_t)i * l->cols;
    memset(mk, MINE_OFF, (size_t)l->cols);
    if (use_queue) memset(mk, CAND, (size_t)in->queue_filled);
    m->n_excl[i] = 0;
    if (l->batch_size) {
      memset(mk + l->batch_off, CAND, (size_t)B);
      mk[l->batch_off + i] = MINE_OFF; /* the query's own key is its positive */
      m->n_excl[i]++;
    }
  }
  long same = 0;
  if (in->ids) {
    build_id_hash(m, in->ids, B);
    if (use_queue && in->queue_ids)
      for (int j = 0; j < in->queue_filled; j++)
        if (in->queue_ids[j] >= 0) same += exclude_id(m, in, l, mask, in->queue_ids[j], j, -1);
    if (l->batch_size)
      for (int j = 0; j < B; j++)
        if (in->ids[j] >= 0) same += exclude_id(m, in, l, mask, in->ids[j], l->batch_off + j, j);
  }
  *supervised_filtered = 0;
  if (m->cfg.supervised) {
    for (int i = 0; i < B; i++) {
      int32_t y = in->labels[i];
      if (y < 0) continue;
      uint8_t *mk = mask + (size_t)i * l->cols;
      long n = 0;
      if (use_queue)
        for (int j = 0; j < in->queue_filled; j++)
          if (in->queue_labels[j] == y && mk[j] == CAND) mk[j] = MINE_OFF, n++;
      for (int j = 0; j < l->batch_size; j++)
        if (in->labels[j] == y && mk[l->batch_off + j] == CAND) mk[l->batch_off + j] = MINE_OFF, n++;
      m->n_excl[i] += (int32_t)n;
      *supervised_filtered += n;
    }
  }
  return same;
}

/* Label diagnostics over a finished row's negatives among the real columns. */
static void count_labels(const mine_layout *l, const mine_input *in, int i, const uint8_t *mk,
                         int use_queue, acc_t *acc) {
  int32_t y = in->labels[i];
  if (y < 0) return;
  if (use_queue && in->queue_labels)
    for (int j = 0; j < in->queue_filled; j++)
      if (mk[j] == MINE_NEG && in->queue_labels[j] >= 0) {
        acc->label_known++;
        acc->label_same += in->queue_labels[j] == y;
      }
  for (int j = 0; j < l->batch_size; j++)
    if (mk[l->batch_off + j] == MINE_NEG && in->labels[j] >= 0) {
      acc->label_known++;
      acc->label_same += in->labels[j] == y;
    }
}

/* What the whole step does, fixed before the rows. */
typedef struct {
  mine_strategy strat; /* random during warm-up */
  float h;
  int warm, use_queue, guards, suspect;
} plan_t;

/* The candidate ranges of row i and their count after the exclusions of prepare_masks. */
static row_t row_view(const mine *m, const mine_layout *l, const mine_input *in, const plan_t *p,
                      float *srow, uint8_t *mk, int i) {
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
  r.n_cand = r.width - m->n_excl[i];
  return r;
}

/* Guards, then the strategy, for one row; returns the count behind the knob (0 when none). */
static int select_row(mine *m, const mine_layout *l, const mine_input *in, const plan_t *p, int i,
                      row_t *r, rng_t *rng, rowacc_t *ra) {
  const mine_config *c = &m->cfg;
  float u = INFINITY;
  if (c->ceiling == MINE_CEILING_ABSOLUTE) u = c->ceiling_value;
  if (c->ceiling == MINE_CEILING_RELATIVE) u = in->s_pos[i] - c->ceiling_delta;
  want_t w = {.mode = WANT_FIXED, .n = 0, .h = p->h, .eps = c->skip_hardest, .u = u, .suspect = p->suspect};
  int n = 0;
  switch (p->strat) {
  case MINE_ALL:
  case MINE_ADVERSARIAL:
    if (c->skip_hardest > 0.0f) top(m, r, &w);
    finish(r, MINE_NEG, u, p->suspect, ra);
    return 0;
  case MINE_RANDOM:
  case MINE_SEMI_HARD:
    if (p->guards) top(m, r, &w);
    n = p->warm ? c->num_negatives : knob_n(c, p->h, r->n_cand);
    if (n > r->n_cand) n = r->n_cand;
    if (p->strat == MINE_RANDOM)
      pick_random(m, r, n, rng, ra);
    else
      pick_semi_hard(m, r, n, in->s_pos[i], rng, ra);
    return n;
  case MINE_HARDEST:
  case MINE_BAND:
    w.mode = p->strat == MINE_HARDEST ? WANT_KNOB : WANT_BAND;
    n = top(m, r, &w);
    mark_list(r, m->idx, n, ra);
    finish(r, MINE_OFF, INFINITY, MINE_OFF, ra);
    return p->strat == MINE_HARDEST ? n : 0;
  case MINE_MIXING:
    w.mode = WANT_KNOB;
    n = top(m, r, &w); /* the hard pool stays in idx[0..n) */
    finish(r, MINE_NEG, u, p->suspect, ra);
    synthesize(m, l, in, i, m->idx, n, r->s, r->mk, rng, ra);
    return n;
  }
  return 0;
}

/* Columns after the candidates: synthetic ones unused outside mixing, every bank row a negative (AdCo
 * contrasts each query with the whole bank). */
static void other_columns(mine *m, const mine_layout *l, const plan_t *p, int i, float *srow,
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

int mine_select(mine *m, const mine_layout *l, const mine_input *in, float *S, uint8_t *mask,
                rng_t *rng, mine_stats *st) {
  int rc = check_input(m, l, in);
  if (rc) return rc;
  const mine_config *c = &m->cfg;
  plan_t p = {.strat = c->strategy, .h = in->hardness};
  p.warm = in->warmup && c->strategy != MINE_ADVERSARIAL;
  if (p.warm) p.strat = MINE_RANDOM;
  p.use_queue = c->strategy != MINE_ADVERSARIAL;
  p.guards = c->ceiling != MINE_CEILING_NONE || c->skip_hardest > 0.0f;
  p.suspect = c->suspects_as_positives ? MINE_POS : MINE_OFF;

  long sup_filtered;
  long same = prepare_masks(m, l, in, mask, p.use_queue, &sup_filtered);
  acc_t acc = {.hardest_max = -INFINITY};
  long suspects = 0, positives = 0;
  int knob = 0;
  for (int i = 0; i < in->batch_size; i++) {
    float *srow = S + (size_t)i * l->cols;
    uint8_t *mk = mask + (size_t)i * l->cols;
    row_t r = row_view(m, l, in, &p, srow, mk, i);
    rowacc_t ra = {0, 0, -INFINITY};
    knob = imax(knob, select_row(m, l, in, &p, i, &r, rng, &ra));
    other_columns(m, l, &p, i, srow, mk, &ra);
    suspects += r.suspects;
    positives += r.positives;
    row_done(&acc, &ra, in->s_pos[i]);
    if (in->labels) count_labels(l, in, i, mk, p.use_queue, &acc);
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
