/* Negative selection. Once per step, the batch's sample ids are hashed and every queue slot carrying
 * one of them is linked to its batch row (O(K + B), not O(B K)). Then each row, on some thread of the
 * compute team, goes through three phases:
 *   1. its mask is reset: candidate columns (valid queue slots, in-batch keys) to CAND, the rest to
 *      MINE_OFF;
 *   2. exclusions that do not depend on similarity: the query's own in-batch column, entries carrying
 *      the query's sample id, and in supervised mode entries with the query's label;
 *   3. the false-negative guards, then the strategy, then CAND -> MINE_OFF.
 * Selection by rank never sorts a row (see "rank selection" below): two vectorised passes over the
 * row and k-th element selection on the few entries near each boundary. Ties at a boundary go to the
 * lower column, so the result is exactly specified. Everything is O(columns) per row. */
#include "contrast/mine.h"

#include <float.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "contrast/kselect.h"
#include "core/err.h"
#include "core/par.h"
#include "core/tensor.h"

/* Internal mask value of a candidate not yet decided; never left in a mask mine_select returns. */
enum { CAND = 4 };

/* A row's selected negatives, summed over rows in row order at the end of the step. */
typedef struct {
  double sum;
  long count;
  float max;
} rowacc_t;

/* What one row's selection found, kept per row so that the step's sums run in row order whatever
 * part of the team did the row. */
struct mine_row {
  rowacc_t ra;
  long suspects, positives, same_id, sup_filtered;
  long label_known, label_same;
  int knob;
};

/* SAMPLE: strided sample that places a row's thresholds; BLOCK: columns a gather skips at once when
 * none reaches its threshold; NT: thresholds per cut. */
enum { SAMPLE = 256, BLOCK = 16, NT = 8 };

/* Lanes of the vector passes (see "vector lanes" below). */
#if defined(__AVX512F__)
enum { VL = 16 };
#elif defined(__AVX__)
enum { VL = 8 };
#else
enum { VL = 4 };
#endif

/* AVX-512 with its byte and mask instructions: the hottest loops keep their comparisons in mask
 * registers (fpclass classes for NONFINITE: QNaN, +inf, -inf, SNaN). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define MINE_AVX512 1
enum { NONFINITE = 0x01 | 0x08 | 0x10 | 0x80 };
#endif

/* Inlined into each caller, so that a literal flag argument folds its tests away. */
#define BLOCK_FN static inline __attribute__((always_inline))

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

int mine_ceiling_parse(const char *name, mine_ceiling *out) {
  static const char *const names[] = {"none", "absolute", "relative"};
  for (int i = 0; i < 3; i++)
    if (!strcmp(name, names[i])) {
      *out = (mine_ceiling)i;
      return 0;
    }
  return moco_error(MOCO_ECONFIG, "mine.ceiling: \"%s\": expected none, absolute or relative", name);
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

int mine_selects_few(const mine_config *c) {
  mine_strategy s = c->strategy;
  return s == MINE_RANDOM || s == MINE_HARDEST || s == MINE_SEMI_HARD || s == MINE_BAND;
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
  const float *next; /* the similarities of the row this thread does next, or NULL */
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

/* Gathers into vals/idx (column order) the candidates with t <= s <= u. NaN similarities compare
 * false and are never gathered. */
static int gather(mine_ws *ws, const row_t *r, float t, float u) {
  const float *s = r->s;
  const uint8_t *mk = r->mk;
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
        if (!(x >= t) || x > u || mk[c] != CAND) continue;
        ws->vals[n] = x;
        ws->idx[n] = c;
        n++;
      }
    }
  }
  return n;
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

static inline void rowacc_add(rowacc_t *ra, float x) {
  ra->sum += x;
  ra->count++;
  if (x > ra->max) ra->max = x;
}

/* ---- vector lanes ------------------------------------------------------------------------------
 * The passes over a row take VL columns at a time in GCC's generic vectors, as wide as the target's
 * registers (a wider vector than the ISA has would be passed in memory, and GCC warns that the ABI
 * changes). Comparisons give all-ones / all-zero int lanes, which combine with & | ~ since C has no ?:
 * on vectors. Sums, counts and maxima stay in lanes until the row ends, so a pass has no horizontal
 * reduction in its loop; a row is one thread's work, so the lane order, and with it every rounding, is
 * fixed. */
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
typedef uint8_t vb __attribute__((vector_size(VL)));

static inline vf vsplat(float x) { return (vf){0} + x; }
static inline vi isplat(int32_t k) { return (vi){0} + k; }
static inline vf vsel(vi c, vf a, vf b) { return (vf)((c & (vi)a) | (~c & (vi)b)); }

/* VL similarities and their mask bytes from column j of a range ending at hi; lanes past hi read
 * as MINE_OFF, which no pass acts on. */
typedef struct {
  vf x;
  vi m;
  int n; /* real lanes */
} lanes;

/* Mask bytes as int lanes. GCC 12 scalarises __builtin_convertvector from bytes to ints (sixteen
 * shifts and inserts), where AVX-512 has one instruction for it. */
static inline vi widen(const uint8_t *p) {
#ifdef __AVX512F__
  return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#else
  int32_t t[VL];
  for (int k = 0; k < VL; k++) t[k] = p[k];
  vi v;
  memcpy(&v, t, sizeof v);
  return v;
#endif
}

static inline lanes load_lanes(const float *s, const uint8_t *mk, int j, int hi) {
  lanes l = {.n = hi - j < VL ? hi - j : VL};
  if (l.n == VL) {
    memcpy(&l.x, s + j, sizeof l.x);
    l.m = widen(mk + j);
    return l;
  }
  float xs[VL] = {0};
  uint8_t b[VL] = {0};
  memcpy(xs, s + j, (size_t)l.n * sizeof *xs);
  memcpy(b, mk + j, (size_t)l.n);
  memcpy(&l.x, xs, sizeof l.x);
  l.m = widen(b);
  return l;
}

static inline void store_mask(uint8_t *mk, int j, const lanes *l, vi m) {
  vb b = __builtin_convertvector(m, vb);
  if (l->n == VL)
    memcpy(mk + j, &b, sizeof b);
  else
    memcpy(mk + j, &b, (size_t)l->n);
}

/* Finite lanes: |x| <= FLT_MAX, which NaN fails. */
static inline vi finite_v(vf x) {
  return (vf)((vi)x & isplat(INT32_MAX)) <= vsplat(FLT_MAX);
}

/* Valid for ranking: a candidate at or below the ceiling with a finite similarity. */
static inline vi rankable_v(vi cand, vf x, vf u) { return cand & (x <= u) & finite_v(x); }

/* The set lanes of a comparison result as bits, lane k at bit k. */
static inline uint32_t lane_bits(vi m) {
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask((__m512i)m, (__m512i)m);
#elif defined(__AVX__)
  return (uint32_t)_mm256_movemask_ps((__m256)m);
#elif defined(__SSE2__)
  return (uint32_t)_mm_movemask_ps((__m128)m);
#else
  uint32_t b = 0;
  for (int k = 0; k < VL; k++) b |= (uint32_t)(m[k] != 0) << k;
  return b;
#endif
}

/* A pass's selected negatives, per lane: the sum (finite values), the largest, minus the count. */
typedef struct {
  vf sum, max;
  vi ncount;
} vstats;

static inline vstats vstats_new(void) { return (vstats){vsplat(0.0f), vsplat(-INFINITY), (vi){0}}; }

/* By value: the lanes then stay in registers across the byte stores of a pass, which may alias
 * anything in memory. */
static inline vstats vstats_add(vstats a, vi take, vf x) {
  vi finite = finite_v(x);
  a.sum += vsel(take & finite, x, vsplat(0.0f));
  vf mx = vsel(take, x, vsplat(-INFINITY));
  a.max = vsel(mx > a.max, mx, a.max);
  a.ncount += take;
  return a;
}

/* Lanes into the row's accumulator; returns the count. */
static int rowacc_merge(rowacc_t *ra, const vstats *a) {
  int count = 0;
  for (int k = 0; k < VL; k++) {
    ra->sum += a->sum[k];
    count -= a->ncount[k];
    if (a->max[k] > ra->max) ra->max = a->max[k];
  }
  ra->count += count;
  return count;
}

static inline int lanes_sum(vi v) {
  int n = 0;
  for (int k = 0; k < VL; k++) n += v[k];
  return n;
}

/* ---- rank selection ----------------------------------------------------------------------------
 * A cut is "the top R candidates" of a row (ties to the lower column). Without sorting, a row's cuts
 * are found in two passes of vectorised block loops:
 *   1. a strided sample places, for each cut, NT thresholds around where its boundary should lie
 *      (three binomial standard deviations either side); one pass counts the valid candidates at or
 *      above every threshold. The two thresholds whose counts straddle R bracket the boundary:
 *      everything at or above `hi` is in, everything below `lo` is out.
 *   2. a second pass writes the decided columns straight into the mask and gathers the few inside a
 *      bracket; k-th element selection among those settles the exact boundary.
 * A bad sample only widens a bracket (at worst to the whole row), so the result is always exact. */

typedef struct {
  int R;        /* rank: the top R; 0 = inactive */
  float lo, hi; /* in: x >= hi; bracket: lo <= x < hi; out: x < lo */
  int need;     /* how many of the bracket are in */
  int t0;       /* its thresholds in the counting pass: t[t0 .. t0 + NT) */
} cut;

enum { MAX_CUTS = 3 };

/* What top() does with the window of ranks: mark it NEG and the rest OFF (hardest, band), list it
 * in idx and leave every candidate CAND (mixing's pool under guards), list it and mark every
 * candidate NEG in the same pass (mixing's pool without guards: no finish pass), or nothing (guards
 * only). */
typedef enum { TOP_MARK, TOP_POOL, TOP_POOL_ALL, TOP_GUARD } top_mode;

static int lists_pool(top_mode m) { return m == TOP_POOL || m == TOP_POOL_ALL; }

/* A row's cuts: suspects are the top E (cut 0), the window is top(E + b) (cut 2) minus top(E + a)
 * (cut 1). */
typedef struct {
  float u;
  int suspect; /* mark for suspects, -1: entries above u are ignored (left to the caller) */
  top_mode mode;
  cut c[MAX_CUTS];
  float t[MAX_CUTS * NT];
  int32_t count[MAX_CUTS * NT];
  int nt;
} cuts;

#if defined(__AVX512F__)
/* c + step in the lanes of k. */
static inline vi count_masked(vi c, __mmask16 k, int step) {
  return (vi)_mm512_mask_add_epi32((__m512i)c, k, (__m512i)c, _mm512_set1_epi32(step));
}
#endif

/* c + 1 in the lanes where x >= t: one masked addition with AVX-512, where GCC would first turn the
 * comparison's mask into a vector and then add it. */
static inline vi count_ge(vi c, vf x, vf t) {
#if defined(__AVX512F__)
  return count_masked(c, _mm512_cmp_ps_mask((__m512)x, (__m512)t, _CMP_GE_OQ), 1);
#else
  return c - (x >= t);
#endif
}

/* Pass one for NT thresholds t[]: how many rankable candidates are at or above each, into count[];
 * returns the rankable count. The counters are named, not an array: GCC keeps an array of vectors
 * in memory and stores every counter on every block. */
_Static_assert(NT == 8, "count_group has eight counters");

static int count_group(const row_t *r, float u, const float *t, int32_t *count) {
  const float *s = r->s;
  const uint8_t *mk = r->mk;
  vi c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0}, c4 = {0}, c5 = {0}, c6 = {0}, c7 = {0}, valid = {0};
  const vf t0 = vsplat(t[0]), t1 = vsplat(t[1]), t2 = vsplat(t[2]), t3 = vsplat(t[3]);
  const vf t4 = vsplat(t[4]), t5 = vsplat(t[5]), t6 = vsplat(t[6]), t7 = vsplat(t[7]);
  const vf uv = vsplat(u);
  for (int k = 0; k < r->nr; k++) {
    int j = r->lo[k];
    const int hi = r->hi[k];
#ifdef MINE_AVX512
    /* Full vectors in mask registers: the candidate test on the mask bytes themselves, and every
     * count masked by the rankable lanes instead of first blending x with -inf. */
    for (; j + VL <= hi; j += VL) {
      const __m512 x = _mm512_loadu_ps(s + j);
      const __mmask16 ok = _mm512_mask_cmp_ps_mask(
          _mm_cmpeq_epi8_mask(_mm_loadu_si128((const __m128i *)(mk + j)), _mm_set1_epi8(CAND)) &
              ~_mm512_fpclass_ps_mask(x, NONFINITE),
          x, (__m512)uv, _CMP_LE_OQ);
      valid = count_masked(valid, ok, -1); /* as valid += ok */
      c0 = count_masked(c0, _mm512_mask_cmp_ps_mask(ok, x, (__m512)t0, _CMP_GE_OQ), 1);
      c1 = count_masked(c1, _mm512_mask_cmp_ps_mask(ok, x, (__m512)t1, _CMP_GE_OQ), 1);
      c2 = count_masked(c2, _mm512_mask_cmp_ps_mask(ok, x, (__m512)t2, _CMP_GE_OQ), 1);
      c3 = count_masked(c3, _mm512_mask_cmp_ps_mask(ok, x, (__m512)t3, _CMP_GE_OQ), 1);
      c4 = count_masked(c4, _mm512_mask_cmp_ps_mask(ok, x, (__m512)t4, _CMP_GE_OQ), 1);
      c5 = count_masked(c5, _mm512_mask_cmp_ps_mask(ok, x, (__m512)t5, _CMP_GE_OQ), 1);
      c6 = count_masked(c6, _mm512_mask_cmp_ps_mask(ok, x, (__m512)t6, _CMP_GE_OQ), 1);
      c7 = count_masked(c7, _mm512_mask_cmp_ps_mask(ok, x, (__m512)t7, _CMP_GE_OQ), 1);
    }
#endif
    for (; j < hi; j += VL) {
      lanes l = load_lanes(s, mk, j, hi);
      vi ok = rankable_v(l.m == CAND, l.x, uv);
      valid += ok;
      vf x = vsel(ok, l.x, vsplat(-INFINITY)); /* below every threshold */
      c0 = count_ge(c0, x, t0), c1 = count_ge(c1, x, t1), c2 = count_ge(c2, x, t2), c3 = count_ge(c3, x, t3);
      c4 = count_ge(c4, x, t4), c5 = count_ge(c5, x, t5), c6 = count_ge(c6, x, t6), c7 = count_ge(c7, x, t7);
    }
  }
  const vi c[NT] = {c0, c1, c2, c3, c4, c5, c6, c7};
  for (int q = 0; q < NT; q++) count[q] = lanes_sum(c[q]);
  return -lanes_sum(valid);
}

/* Pass one over every cut's thresholds, a group of NT per cut that has them (a row whose cuts have
 * none still gets its rankable count). */
static int count_pass(const row_t *r, cuts *ct) {
  if (ct->nt == 0) {
    float t[NT];
    int32_t count[NT];
    for (int q = 0; q < NT; q++) t[q] = INFINITY;
    return count_group(r, ct->u, t, count);
  }
  int V = 0;
  for (int t0 = 0; t0 < ct->nt; t0 += NT) V = count_group(r, ct->u, ct->t + t0, ct->count + t0);
  return V;
}

/* A strided sample of the row's rankable values into sample[]; *cands counts the candidates seen.
 * No branch per point: this is the row's first touch, and waits on memory enough as it is. */
static int take_sample(const row_t *r, float u, float *sample, int *cands) {
  int n = 0, seen = 0, taken = 0, step = r->width / SAMPLE;
  for (int k = 0, i = step / 2, base = 0; step > 0 && k < r->nr; k++) {
    const int len = r->hi[k] - r->lo[k];
    for (; i - base < len && taken < SAMPLE; i += step, taken++) {
      const int c = r->lo[k] + i - base;
      const float x = r->s[c];
      const int cand = r->mk[c] == CAND;
      seen += cand;
      sample[n] = x;
      n += cand & (x <= u) & (x >= -FLT_MAX) & (x <= FLT_MAX); /* rankable */
    }
    base += len;
  }
  *cands = seen;
  return n;
}

/* NT thresholds for a boundary expected at rank R_est of n_est: evenly spaced in value over the
 * sample's plausible range for it. Short rows or samples get none, and their cut brackets the row. */
static void place_thresholds(cuts *ct, cut *c, float *sample, int m, double R_est, double n_est) {
  c->t0 = ct->nt;
  if (m < SAMPLE / 2 || n_est <= 0) return;
  double p = R_est / n_est;
  if (p <= 0.0 || p >= 1.0) return;
  double mid = p * m, sd = sqrt(m * p * (1.0 - p));
  int r_hi = (int)floor(mid - 3.0 * sd - 2.0), r_lo = (int)ceil(mid + 3.0 * sd + 2.0);
  r_hi = r_hi < 0 ? 0 : r_hi;
  r_lo = r_lo > m - 1 ? m - 1 : r_lo;
  float part[SAMPLE + KSELECT_SLACK];
  float lo = kselect_largest(sample, m, r_lo + 1, part);
  float hi = kselect_largest(sample, r_lo + 1, r_hi + 1, part); /* within the top r_lo + 1 */
  for (int j = 0; j < NT; j++) ct->t[ct->nt++] = hi - (hi - lo) * (float)j / (NT - 1);
}

/* From the counts, the bracket of cut c (rank R among V rankable candidates). */
static void bracket(cuts *ct, cut *c, int V) {
  if (c->R <= 0) {
    *c = (cut){0, INFINITY, INFINITY, 0, c->t0};
    return;
  }
  if (c->R >= V) { /* all of them */
    *c = (cut){c->R, -INFINITY, -INFINITY, 0, c->t0};
    return;
  }
  float hi = INFINITY, lo = -INFINITY;
  int above = 0;
  int n = ct->nt - c->t0 < NT ? ct->nt - c->t0 : NT; /* 0 when it got no thresholds */
  for (int j = 0; j < n; j++) {
    int cj = ct->count[c->t0 + j];
    if (cj >= c->R) {
      lo = ct->t[c->t0 + j];
      break;
    }
    hi = ct->t[c->t0 + j];
    above = cj;
  }
  c->lo = lo;
  c->hi = hi;
  c->need = c->R - above;
}

/* Pass two's constants, as lanes: built once per row, held in registers through the loop (the mask
 * stores may alias anything in memory, so values read through pointers would be reloaded). */
typedef struct {
  vf u, loE, hiE, loA, hiA, loB, hiB;
  vi smark;
  int suspect;
} pass2;

static pass2 pass2_of(const cuts *ct) {
  return (pass2){vsplat(ct->u),       vsplat(ct->c[0].lo), vsplat(ct->c[0].hi), vsplat(ct->c[1].lo),
                 vsplat(ct->c[1].hi), vsplat(ct->c[2].lo), vsplat(ct->c[2].hi),
                 isplat(ct->suspect >= 0 ? ct->suspect : CAND), ct->suspect};
}

/* Pass two over the lanes at column j: decides their candidates from the brackets, adds the new
 * suspects to *ns and, for TOP_MARK, the window entries it marks MINE_NEG to st (TOP_POOL_ALL: every
 * candidate); returns the bracketed lanes and, for the pool modes, the window's. The flags are
 * literals at each call, so that each shape of row gets a loop without the tests it cannot need:
 * window_only: cuts E and A are inactive; guarded: the row has a ceiling or suspects. */
typedef struct {
  vf x;
  vi edge, list;
} classified;

BLOCK_FN classified classify(const float *s, uint8_t *mk, int j, int hi, const pass2 *c, vi *ns,
                             vstats *st, int window_only, int guarded, top_mode mode) {
  const lanes l = load_lanes(s, mk, j, hi);
  const vf x = l.x;
  const vi m = l.m, cand = m == CAND;
  const vi ok = guarded ? rankable_v(cand, x, c->u) : cand & finite_v(x);
  vi edge = ok & (x >= c->loB) & (x < c->hiB), w = ok & (x >= c->hiB), sus = {0};
  if (!window_only) {
    edge |= ok & (((x >= c->loE) & (x < c->hiE)) | ((x >= c->loA) & (x < c->hiA)));
    w &= (x < c->loA) & ~edge;
    sus = ok & (x >= c->hiE);
  }
  if (guarded && c->suspect >= 0) sus |= cand & (x > c->u);
  if (mode == TOP_GUARD) w = (vi){0};
  /* TOP_MARK decides: bracketed stays CAND, window NEG, the rest OFF (0); TOP_POOL_ALL makes every
   * candidate NEG; the other modes keep CAND */
  vi rest = mode == TOP_MARK ? (edge & CAND) | (w & MINE_NEG) : isplat(mode == TOP_POOL_ALL ? MINE_NEG : CAND);
  if (guarded) rest = (sus & c->smark) | (~sus & rest);
  store_mask(mk, j, &l, (cand & rest) | (~cand & m));
  if (guarded) *ns += sus;
  if (mode == TOP_MARK) *st = vstats_add(*st, w, x);
  if (mode == TOP_POOL_ALL) *st = vstats_add(*st, cand, x);
  return (classified){x, edge, lists_pool(mode) ? w : (vi){0}};
}

/* The value at descending rank R (1-based) of v[0..n) and how many entries equal to it belong to the
 * top R (the rest of the tie lies below the boundary). Reorders v. */
typedef struct {
  float v;
  int ties;
} boundary;

static boundary find_boundary(float *v, int n, int R, float *part) {
  boundary bd = {INFINITY, 0};
  if (R <= 0 || n <= 0) return bd;
  if (R > n) R = n;
  bd.v = kselect_largest(v, n, R, part);
  int above = 0;
  for (int i = 0; i < R; i++) above += v[i] > bd.v; /* v[0..R) holds the top R */
  bd.ties = R - above;
  return bd;
}

/* Whether x, met in column order, is within the top of its bracket; consumes a tie. */
static inline int in_top(boundary *bd, float x) {
  if (x > bd->v) return 1;
  if (x == bd->v && bd->ties > 0) {
    bd->ties--;
    return 1;
  }
  return 0;
}

/* The exact boundary of cut c among the gathered entries vals[0..g). */
static boundary cut_boundary(mine_ws *ws, const cut *c, int g) {
  if (c->need <= 0) return (boundary){INFINITY, 0};
  int n = 0;
  for (int i = 0; i < g; i++) {
    float x = ws->vals[i];
    ws->tmp[n] = x;
    n += (x >= c->lo) & (x < c->hi);
  }
  return find_boundary(ws->tmp, n, c->need, ws->part);
}

static inline int cut_in(const cut *c, boundary *bd, float x) {
  return x >= c->hi || (x >= c->lo && in_top(bd, x));
}

/* Settles the gathered entries (vals, bidx; column order) against the exact boundaries; returns the
 * number of window entries, appended to idx[n_win..] (pool modes) or marked (TOP_MARK). */
static int settle(mine_ws *ws, row_t *r, const cuts *ct, int g, int n_win, rowacc_t *ra) {
  boundary b[MAX_CUTS];
  for (int k = 0; k < MAX_CUTS; k++) b[k] = cut_boundary(ws, &ct->c[k], g);
  int added = 0;
  for (int i = 0; i < g; i++) {
    float x = ws->vals[i];
    int col = ws->bidx[i];
    int tE = cut_in(&ct->c[0], &b[0], x), tA = cut_in(&ct->c[1], &b[1], x);
    int tB = cut_in(&ct->c[2], &b[2], x);
    if (tE) {
      r->mk[col] = ct->suspect >= 0 ? (uint8_t)ct->suspect : MINE_OFF;
      r->suspects++;
      r->positives += ct->suspect == MINE_POS;
    } else if (tB && !tA && ct->mode != TOP_GUARD) {
      if (ct->mode == TOP_MARK) {
        r->mk[col] = MINE_NEG;
        rowacc_add(ra, x);
      } else {
        ws->idx[n_win++] = col;
      }
      added++;
    } else if (ct->mode == TOP_MARK) {
      r->mk[col] = MINE_OFF;
    }
  }
  return added;
}

/* in ? a : b without a branch, which GCC would otherwise emit for floats. */
static inline float select_f(int in, float a, float b) {
  uint32_t ua, ub, m = -(uint32_t)(in != 0);
  memcpy(&ua, &a, sizeof ua);
  memcpy(&ub, &b, sizeof ub);
  ua = (ua & m) | (ub & ~m);
  memcpy(&a, &ua, sizeof a);
  return a;
}

/* settle for a row whose only active cut is the window's (c): the bracketed entries within its
 * exact top become MINE_NEG (TOP_MARK, the rest MINE_OFF) or join the pool (TOP_POOL_ALL).
 * Branch-free: about half of a bracket is in, in no order a predictor could learn. */
static int settle_window(mine_ws *ws, row_t *r, const cut *c, int g, int n_win, top_mode mode,
                         rowacc_t *ra) {
  boundary b = cut_boundary(ws, c, g);
  const float *vals = ws->vals;
  const int32_t *bidx = ws->bidx;
  int32_t *pool = ws->idx + n_win;
  uint8_t *mk = r->mk;
  float sum = 0.0f, max = ra->max; /* locals: the mask stores would force them through memory */
  int added = 0;
  for (int i = 0; i < g; i++) {
    const float x = vals[i];
    const int col = bidx[i], tie = (x == b.v) & (b.ties > 0), in = (x > b.v) | tie;
    b.ties -= tie;
    if (mode == TOP_MARK) {
      mk[col] = (uint8_t)(in * MINE_NEG);
      sum += x * (float)in; /* gathered entries are finite */
      max = select_f(in & (x > max), x, max);
    } else {
      pool[added] = col;
    }
    added += in;
  }
  if (mode == TOP_MARK) {
    ra->sum += sum;
    ra->count += added;
    ra->max = max;
  }
  return added;
}

/* Appends the columns j + i of the lanes set in sel (and their similarities x, when vals is not NULL)
 * at position g; returns the new count. With AVX-512 it compresses the lanes and stores all VL of
 * them, without a branch: a row's bracket is scattered thinly, so a branch on "any lane set" would
 * mispredict on most of its entries. The arrays have VL entries of slack for it. */
static inline int append_lanes(vf x, int j, vi sel, float *restrict vals, int32_t *restrict cols, int g) {
#if defined(__AVX512F__)
  const __mmask16 k = (__mmask16)lane_bits(sel);
  const __m512i col = _mm512_add_epi32(_mm512_set1_epi32(j), _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
  if (vals) _mm512_storeu_ps(vals + g, _mm512_maskz_compress_ps(k, (__m512)x));
  _mm512_storeu_si512(cols + g, _mm512_maskz_compress_epi32(k, col));
  return g + __builtin_popcount(k);
#else
  for (uint32_t bits = lane_bits(sel); bits; bits &= bits - 1) {
    int i = __builtin_ctz(bits);
    if (vals) vals[g] = x[i];
    cols[g++] = j + i;
  }
  return g;
#endif
}

/* What the classifying pass leaves for the settling step. */
typedef struct {
  vstats st;
  vi ns;
  int g;     /* bracketed entries in vals, bidx */
  int n_win; /* pool modes: window entries in idx */
} pass2_out;

#ifdef MINE_AVX512
/* classify over the full vectors of [j, hi) for the usual rows of hardest (TOP_MARK) and of mixing's
 * pool (TOP_POOL_ALL), with the comparisons in mask registers and the mask bytes blended as bytes;
 * returns the column where it stopped. GCC's generic vectors turn each comparison into a vector of
 * all-ones lanes and back, and widen and narrow the mask bytes: twice this loop's instructions, and at
 * K 65,536 this pass (from L2) is compute-bound. Same decisions, the same lane sums in the same
 * order. */
BLOCK_FN int classify_avx512(const row_t *r, const pass2 *c, int j, int hi, top_mode mode,
                             vstats *st, float *vals, int32_t *bidx, int *g, int32_t *idx,
                             int *n_win) {
  const __m512 loB = (__m512)c->loB, hiB = (__m512)c->hiB;
  const __m128i cand8 = _mm_set1_epi8(CAND), neg8 = _mm_set1_epi8(MINE_NEG);
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  /* the state in locals: the vector stores below may alias anything, so state behind the pointers
   * would be reloaded after each of them */
  vstats t = *st;
  int ng = *g, nw = *n_win;
  for (; j + VL <= hi; j += VL) {
    if (r->next) __builtin_prefetch(r->next + j);
    const __m512 x = _mm512_loadu_ps(r->s + j);
    const __m128i m = _mm_loadu_si128((const __m128i *)(r->mk + j));
    const __m512i col = _mm512_add_epi32(_mm512_set1_epi32(j), iota);
    const __mmask16 cand = _mm_cmpeq_epi8_mask(m, cand8);
    const __mmask16 ok = cand & ~_mm512_fpclass_ps_mask(x, NONFINITE);
    const __mmask16 w = _mm512_mask_cmp_ps_mask(ok, x, hiB, _CMP_GE_OQ);
    const __mmask16 edge = _mm512_mask_cmp_ps_mask(ok & ~w, x, loB, _CMP_GE_OQ);
    /* TOP_MARK: decided OFF, bracketed CAND, in NEG, with the stats of those in; TOP_POOL_ALL: every
     * candidate NEG and in the stats, the window listed in idx */
    const __mmask16 take = mode == TOP_MARK ? w : cand;
    __m128i out = _mm_mask_mov_epi8(m, cand, mode == TOP_MARK ? _mm_setzero_si128() : neg8);
    if (mode == TOP_MARK) out = _mm_mask_mov_epi8(_mm_mask_mov_epi8(out, edge, cand8), w, neg8);
    _mm_storeu_si128((__m128i *)(r->mk + j), out);
    /* vstats_add: the sum over the finite lanes taken, the largest (x > max ? x : max), the count */
    t.sum = (vf)_mm512_mask_add_ps((__m512)t.sum, take & ok, (__m512)t.sum, x);
    t.max = (vf)_mm512_mask_max_ps((__m512)t.max, take, x, (__m512)t.max);
    t.ncount = count_masked(t.ncount, take, -1);
    _mm512_storeu_ps(vals + ng, _mm512_maskz_compress_ps(edge, x));
    _mm512_storeu_si512(bidx + ng, _mm512_maskz_compress_epi32(edge, col));
    ng += __builtin_popcount(edge);
    if (mode == TOP_POOL_ALL) {
      _mm512_storeu_si512(idx + nw, _mm512_maskz_compress_epi32(w, col));
      nw += __builtin_popcount(w);
    }
  }
  *st = t;
  *g = ng;
  *n_win = nw;
  return j;
}
#endif

/* The classifying pass over a row with the literal flags of classify. Its state is in locals, so
 * that it stays in registers. */
BLOCK_FN pass2_out classify_row(const row_t *r, const cuts *ct, mine_ws *ws, int window_only,
                                int guarded, top_mode mode) {
  const pass2 c = pass2_of(ct);
  const float *s = r->s;
  uint8_t *mk = r->mk;
  float *vals = ws->vals;
  int32_t *bidx = ws->bidx, *idx = ws->idx;
  vstats st = vstats_new();
  vi ns = {0};
  int g = 0, n_win = 0;
  for (int k = 0; k < r->nr; k++) {
    int j = r->lo[k];
    const int hi = r->hi[k];
#ifdef MINE_AVX512
    if (window_only && !guarded && (mode == TOP_MARK || mode == TOP_POOL_ALL))
      j = classify_avx512(r, &c, j, hi, mode, &st, vals, bidx, &g, idx, &n_win);
#endif
    for (; j < hi; j += VL) {
      if (r->next) __builtin_prefetch(r->next + j);
      classified cl = classify(s, mk, j, hi, &c, &ns, &st, window_only, guarded, mode);
      g = append_lanes(cl.x, j, cl.edge, vals, bidx, g);
      if (lists_pool(mode)) n_win = append_lanes(cl.x, j, cl.list, NULL, idx, n_win);
    }
  }
  return (pass2_out){st, ns, g, n_win};
}

/* Applies the guards of `w` to the row (ceiling and eps suspects marked) and selects ranks [a, b) of
 * the candidates left, per mode; returns the window's size (pool modes: the pool, in idx[0..n)). */
static int top(const mine *m, mine_ws *ws, row_t *r, const want_t *w, top_mode mode, rowacc_t *ra) {
  const mine_config *c = &m->cfg;
  cuts ct = {.u = w->u, .suspect = w->suspect, .mode = mode};
  float sample[SAMPLE];
  int cands, ms = take_sample(r, w->u, sample, &cands);
  /* rankable candidates as the sample sees them, for placing the thresholds */
  double V_est = cands > 0 ? (double)r->n_cand * ms / cands : 0.0;
  int a, b, E = frac_count(w->eps, (int)V_est);
  want_window(c, w, (int)V_est - E, &a, &b);
  if (mode == TOP_GUARD) a = b = 0;
  double R_est[MAX_CUTS] = {E, E + a, E + b};
  for (int k = 0; k < MAX_CUTS; k++) place_thresholds(&ct, &ct.c[k], sample, ms, R_est[k], V_est);
  int V = count_pass(r, &ct);
  /* the exact ranks */
  E = frac_count(w->eps, V);
  want_window(c, w, V - E, &a, &b);
  if (mode == TOP_GUARD) a = b = 0;
  int R[MAX_CUTS] = {E, E + a, E + b};
  for (int k = 0; k < MAX_CUTS; k++) {
    ct.c[k].R = R[k];
    bracket(&ct, &ct.c[k], V);
  }
  /* hardest and mixing's pool without guards, the usual rows, get loops of their own */
  const int fast = ct.c[0].R == 0 && ct.c[1].R == 0 && !(w->u < INFINITY);
  pass2_out o;
  if (fast && mode == TOP_MARK)
    o = classify_row(r, &ct, ws, 1, 0, TOP_MARK);
  else if (fast && mode == TOP_POOL_ALL)
    o = classify_row(r, &ct, ws, 1, 0, TOP_POOL_ALL);
  else
    o = classify_row(r, &ct, ws, 0, 1, mode);
  int marked = rowacc_merge(ra, &o.st), ns = -lanes_sum(o.ns), g = o.g, n_win = o.n_win;
  r->suspects += ns;
  if (ct.suspect == MINE_POS) r->positives += ns;
  r->n_cand = V - E;
  int settled = fast ? settle_window(ws, r, &ct.c[2], g, n_win, mode, ra) : settle(ws, r, &ct, g, n_win, ra);
  return (mode == TOP_MARK ? marked : n_win) + settled;
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
  vstats st = vstats_new();
  vi nsv = {0};
  const vf uv = vsplat(u);
  for (int k = 0; k < r->nr; k++)
    for (int j = r->lo[k]; j < r->hi[k]; j += VL) {
      lanes l = load_lanes(r->s, r->mk, j, r->hi[k]);
      vi cand = l.m == CAND;
      if (to == MINE_OFF) {
        store_mask(r->mk, j, &l, l.m & ~cand);
        continue;
      }
      vi sus = cand & (l.x > uv), neg = cand & ~sus;
      store_mask(r->mk, j, &l, (sus & suspect) | (neg & MINE_NEG) | (~cand & l.m));
      nsv += sus;
      st = vstats_add(st, neg, l.x);
    }
  if (to == MINE_OFF) return;
  rowacc_merge(ra, &st);
  int ns = -lanes_sum(nsv);
  r->suspects += ns;
  r->positives += suspect == MINE_POS ? ns : 0;
  r->n_cand -= ns;
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
static void pick_random(mine_ws *ws, row_t *r, int n, rng_t *rng, rowacc_t *ra) {
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
  int g = gather(ws, r, -INFINITY, INFINITY);
  shuffle_prefix(ws->idx, g, n, rng);
  mark_list(r, ws->idx, n < g ? n : g, ra);
  finish(r, MINE_OFF, INFINITY, MINE_OFF, ra);
}

/* FaceNet's semi-hard negatives (Schroff et al. 2015): s_pos - margin < s < s_pos, n of them at
 * random; when the band holds fewer, the hardest below it fill up to n. */
static void pick_semi_hard(const mine *m, mine_ws *ws, row_t *r, int n, float s_pos, rng_t *rng,
                           rowacc_t *ra) {
  float low = s_pos - m->cfg.margin;
  int g = gather(ws, r, nextafterf(low, INFINITY), nextafterf(s_pos, -INFINITY));
  if (g >= n) {
    shuffle_prefix(ws->idx, g, n, rng);
    mark_list(r, ws->idx, n, ra);
  } else {
    mark_list(r, ws->idx, g, ra);
    r->n_cand -= g;
    want_t w = {.mode = WANT_FIXED, .n = n - g, .u = low, .suspect = -1};
    top(m, ws, r, &w, TOP_MARK, ra);
  }
  finish(r, MINE_OFF, INFINITY, MINE_OFF, ra);
}

/* ---- mixing (MoCHi) ---------------------------------------------------------------------------- */

static const float *key_of(const mine_layout *l, const mine_input *in, int col) {
  if (col < l->queue_size) return in->queue_keys + (size_t)col * in->dim;
  return in->batch_keys + (size_t)(col - l->batch_off) * in->dim;
}

/* A dot product of two keys, d floats, in eight-lane vectors of GCC's vector extension: left to
 * itself, the compiler re-rolls any set of scalar partial sums into an accumulator array in memory,
 * which made this loop the whole cost of mixing. */
typedef float v8f __attribute__((vector_size(32)));

static float dot(const float *restrict x, const float *restrict y, int n) {
  v8f acc0 = {0}, acc1 = {0};
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    v8f x0, y0, x1, y1;
    memcpy(&x0, x + i, sizeof x0);
    memcpy(&y0, y + i, sizeof y0);
    memcpy(&x1, x + i + 8, sizeof x1);
    memcpy(&y1, y + i + 8, sizeof y1);
    acc0 += x0 * y0;
    acc1 += x1 * y1;
  }
  acc0 += acc1;
  float s = ((acc0[0] + acc0[1]) + (acc0[2] + acc0[3])) + ((acc0[4] + acc0[5]) + (acc0[6] + acc0[7]));
  for (; i < n; i++) s += x[i] * y[i];
  return s;
}

/* The pair mixes read two random keys each: with the keys of the next few pairs on their way
 * (prefetch_floats), the dot products stop waiting on memory. */
enum { PREFETCH_AHEAD = 4 };

/* MoCHi (Kalantidis et al. 2020, eqs. 3-4): from the hard pool P of a row, h = normalise(a n_i +
 * (1-a) n_j) with a ~ U(0,1) for the first mix_pairs columns, and h' = normalise(b q + (1-b) n_j)
 * with b ~ U(0, 0.5) for the next mix_query (the query never dominates its mix). The similarity q.h
 * follows from the real columns' similarities and one key-key dot product, so no point is built.
 * Three passes: the draws (recipes holding the raw weight), the dot products (keys prefetched a few
 * pairs ahead), and the normalisation, over plain arrays so that it vectorises. */
static void synthesize(const mine *m, mine_ws *ws, const mine_layout *l, const mine_input *in,
                       int row, const int32_t *P, int np, float *srow, uint8_t *mrow, rng_t *rng,
                       rowacc_t *ra) {
  const mine_config *c = &m->cfg;
  const int d = in->dim, X = l->synth_size, pairs = np >= 2 ? c->mix_pairs : 0;
  mine_synth *rec = m->synth + (size_t)row * X;
  float *wt = ws->vals, *xy = ws->tmp; /* [X] each: raw weight, then the mix's x.y */
  for (int x = 0; x < X; x++) {
    rec[x] = (mine_synth){-2, -2, 0.0f, 0.0f};
    wt[x] = 0.0f;
    if (x < c->mix_pairs && np >= 2) {
      int i = (int)draw_below(rng, (uint32_t)np);
      int j = (int)draw_below(rng, (uint32_t)(np - 1));
      j += j >= i; /* two distinct pool members */
      rec[x].a = P[i];
      rec[x].b = P[j];
      wt[x] = draw_open01(rng);
    } else if (x >= c->mix_pairs && np >= 1) {
      rec[x].a = -1;
      rec[x].b = P[draw_below(rng, (uint32_t)np)];
      wt[x] = 0.5f * draw_open01(rng);
    }
  }
  for (int x = 0; x < PREFETCH_AHEAD && x < pairs; x++) {
    prefetch_floats(key_of(l, in, rec[x].a), (size_t)d);
    prefetch_floats(key_of(l, in, rec[x].b), (size_t)d);
  }
  for (int x = 0; x < X; x++) {
    if (x + PREFETCH_AHEAD < pairs) {
      prefetch_floats(key_of(l, in, rec[x + PREFETCH_AHEAD].a), (size_t)d);
      prefetch_floats(key_of(l, in, rec[x + PREFETCH_AHEAD].b), (size_t)d);
    }
    /* x.y: the two keys' dot product, or for a query mix the query's similarity to its key */
    const mine_synth *sy = &rec[x];
    xy[x] = sy->b < 0 ? 0.0f : sy->a >= 0 ? dot(key_of(l, in, sy->a), key_of(l, in, sy->b), d) : srow[sy->b];
  }
  for (int x = 0; x < X; x++) { /* |w x + (1-w) y|^2 -> 1 / norm, in place of xy */
    float n2 = wt[x] * wt[x] + (1 - wt[x]) * (1 - wt[x]) + 2 * wt[x] * (1 - wt[x]) * xy[x];
    xy[x] = n2 > 1e-12f ? 1.0f / sqrtf(n2) : 0.0f;
  }
  for (int x = 0; x < X; x++) {
    mine_synth *sy = &rec[x];
    int col = l->synth_off + x;
    if (sy->b < 0 || xy[x] == 0.0f) {
      *sy = (mine_synth){-2, -2, 0.0f, 0.0f};
      srow[col] = 0.0f;
      mrow[col] = MINE_OFF;
      continue;
    }
    sy->wa = wt[x] * xy[x];
    sy->wb = (1 - wt[x]) * xy[x];
    srow[col] = sy->wa * (sy->a >= 0 ? srow[sy->a] : 1.0f) + sy->wb * srow[sy->b]; /* q.q = 1 */
    mrow[col] = MINE_NEG;
    rowacc_add(ra, srow[col]);
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
  if (m->cfg.supervised && in->labels[i] >= 0) {
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
  const mine_config *c = &m->cfg;
  float u = INFINITY;
  if (c->ceiling == MINE_CEILING_ABSOLUTE) u = c->ceiling_value;
  if (c->ceiling == MINE_CEILING_RELATIVE) u = in->s_pos[i] - c->ceiling_delta;
  want_t w = {.mode = WANT_FIXED, .n = 0, .h = p->h, .eps = c->skip_hardest, .u = u, .suspect = p->suspect};
  int n = 0;
  switch (p->strat) {
  case MINE_ALL:
  case MINE_ADVERSARIAL:
    if (c->skip_hardest > 0.0f) top(m, ws, r, &w, TOP_GUARD, ra);
    finish(r, MINE_NEG, u, p->suspect, ra);
    return 0;
  case MINE_RANDOM:
  case MINE_SEMI_HARD:
    if (p->guards) top(m, ws, r, &w, TOP_GUARD, ra);
    n = p->warm ? c->num_negatives : knob_n(c, p->h, r->n_cand);
    if (n > r->n_cand) n = r->n_cand;
    if (p->strat == MINE_RANDOM)
      pick_random(ws, r, n, rng, ra);
    else
      pick_semi_hard(m, ws, r, n, in->s_pos[i], rng, ra);
    return n;
  case MINE_HARDEST:
  case MINE_BAND:
    w.mode = p->strat == MINE_HARDEST ? WANT_KNOB : WANT_BAND;
    n = top(m, ws, r, &w, TOP_MARK, ra);
    return p->strat == MINE_HARDEST ? n : 0;
  case MINE_MIXING:
    w.mode = WANT_KNOB;
    /* the hard pool stays in idx[0..n) */
    if (p->guards) {
      n = top(m, ws, r, &w, TOP_POOL, ra);
      finish(r, MINE_NEG, u, p->suspect, ra);
    } else {
      n = top(m, ws, r, &w, TOP_POOL_ALL, ra);
    }
    synthesize(m, ws, l, in, i, ws->idx, n, r->s, r->mk, rng, ra);
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
    rng_init(&rng, j->seed, (uint64_t)i);
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
  const mine_config *c = &m->cfg;
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
