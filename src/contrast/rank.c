/* Rank selection on one row of negative selection (see mine.c for the step around it): the guards,
 * the top ranks a strategy wants, uniform and semi-hard picks, and the final pass that settles every
 * candidate left. Selection by rank never sorts a row (see "rank selection" below): two vectorised
 * passes over the row and k-th element selection on the few entries near each boundary. Ties at a
 * boundary go to the lower column, so the result is exactly specified. Everything is O(columns) per
 * row. */
#include <float.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <math.h>
#include <string.h>

#include "contrast/kselect.h"
#include "mine_internal.h"

/* SAMPLE: strided sample that places a row's thresholds; BLOCK: columns a gather skips at once when
 * none reaches its threshold; NT: thresholds per cut. */
enum { SAMPLE = 256, BLOCK = 16, NT = 8 };

/* AVX-512 with its byte and mask instructions: the hottest loops keep their comparisons in mask
 * registers (fpclass classes for NONFINITE: QNaN, +inf, -inf, SNaN). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define MINE_AVX512 1
enum { NONFINITE = 0x01 | 0x08 | 0x10 | 0x80 };
#endif

/* Inlined into each caller, so that a literal flag argument folds its tests away. */
#define BLOCK_FN static inline __attribute__((always_inline))

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

int mine_knob_n(const mine_config *c, float h, int n_cand) {
  double easy = c->num_negatives_easy > 0 ? c->num_negatives_easy : (n_cand > 0 ? n_cand : 1);
  double n = exp((1.0 - h) * log(easy) + h * log((double)c->num_negatives));
  return (int)lround(n);
}

/* Rank windows are fractions of a count; the small epsilon keeps 0.7 * 10 at 7 despite float. */
static int frac_count(double f, int n) { return (int)floor(f * n + 1e-4); }

static void want_window(const mine_config *c, const want_t *w, int n_left, int *a, int *b) {
  *a = 0;
  if (w->mode == WANT_FIXED) {
    *b = w->n;
  } else if (w->mode == WANT_KNOB) {
    *b = mine_knob_n(c, w->h, n_left);
  } else {
    *a = frac_count(w->h * c->band_lo, n_left);
    *b = frac_count(1.0 - w->h * (1.0 - c->band_hi), n_left);
    if (*b <= *a && *a < n_left) *b = *a + 1;
  }
  if (*b > n_left) *b = n_left;
  if (*a > *b) *a = *b;
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

static int lists_pool(top_mode m) { return m == TOP_POOL || m == TOP_POOL_ALL; }

/* A row's cuts: suspects are the top E (cut 0), the window is mine_top(E + b) (cut 2) minus mine_top(E + a)
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

int mine_top(const mine *m, mine_ws *ws, row_t *r, const want_t *w, top_mode mode, rowacc_t *ra) {
  const mine_config *c = m->cfg;
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

void mine_finish(row_t *r, uint8_t to, float u, int suspect, rowacc_t *ra) {
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
void mine_pick_random(mine_ws *ws, row_t *r, int n, rng_t *rng, rowacc_t *ra) {
  if (n >= r->n_cand) {
    mine_finish(r, MINE_NEG, INFINITY, MINE_OFF, ra);
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
    mine_finish(r, drop ? MINE_NEG : MINE_OFF, INFINITY, MINE_OFF, ra);
    return;
  }
  int g = gather(ws, r, -INFINITY, INFINITY);
  shuffle_prefix(ws->idx, g, n, rng);
  mark_list(r, ws->idx, n < g ? n : g, ra);
  mine_finish(r, MINE_OFF, INFINITY, MINE_OFF, ra);
}

/* FaceNet's semi-hard negatives (Schroff et al. 2015): s_pos - margin < s < s_pos, n of them at
 * random; when the band holds fewer, the hardest below it fill up to n. */
void mine_pick_semi_hard(const mine *m, mine_ws *ws, row_t *r, int n, float s_pos, rng_t *rng,
                         rowacc_t *ra) {
  float low = s_pos - m->cfg->margin;
  int g = gather(ws, r, nextafterf(low, INFINITY), nextafterf(s_pos, -INFINITY));
  if (g >= n) {
    shuffle_prefix(ws->idx, g, n, rng);
    mark_list(r, ws->idx, n, ra);
  } else {
    mark_list(r, ws->idx, g, ra);
    r->n_cand -= g;
    want_t w = {.mode = WANT_FIXED, .n = n - g, .u = low, .suspect = -1};
    mine_top(m, ws, r, &w, TOP_MARK, ra);
  }
  mine_finish(r, MINE_OFF, INFINITY, MINE_OFF, ra);
}
