/* Internals shared by negative selection's three files: mine.c (the strategies, the step), rank.c (the
 * rank-selection kernels a strategy calls on one row) and mix.c (MoCHi's synthetic negatives). Private to
 * src/contrast/; the public face is include/contrast/mine.h. */
#ifndef MOCO_CONTRAST_MINE_INTERNAL_H
#define MOCO_CONTRAST_MINE_INTERNAL_H

#include <stdint.h>

#include "contrast/mine.h"
#include "core/rng.h"

/* Internal mask value of a candidate not yet decided; never left in a mask mine_select returns. */
enum { CAND = 4 };

/* A row's selected negatives, summed over rows in row order at the end of the step. */
typedef struct {
  double sum;
  long count;
  float max;
} rowacc_t;

/* Lanes of the vector passes (see "vector lanes" in rank.c); mine_init sizes the row workspaces by it,
 * since rank.c appends whole vectors. */
#if defined(__AVX512F__)
enum { VL = 16 };
#elif defined(__AVX__)
enum { VL = 8 };
#else
enum { VL = 4 };
#endif

static inline void rowacc_add(rowacc_t *ra, float x) {
  ra->sum += x;
  ra->count++;
  if (x > ra->max) ra->max = x;
}

/* ---- random numbers ---------------------------------------------------------------------------- */

/* Uniform in [0, n) by Lemire's multiply-shift with rejection (unbiased); the division of
 * rng_below happens only on the rare rejection path, which matters at ~10^5 draws per step. */
static inline uint32_t draw_below(rng_t *r, uint32_t n) {
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
static inline float draw_open01(rng_t *r) { return ((float)(rng_u32(r) >> 8) + 0.5f) * (1.0f / 16777216.0f); }

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

/* What a row wants from mine_top(): the top `eps` fraction turned into suspects, then ranks [a, b) of the
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

/* What mine_top() does with the window of ranks: mark it NEG and the rest OFF (hardest, band), list it
 * in idx and leave every candidate CAND (mixing's pool under guards), list it and mark every
 * candidate NEG in the same pass (mixing's pool without guards: no finish pass), or nothing (guards
 * only). */
typedef enum { TOP_MARK, TOP_POOL, TOP_POOL_ALL, TOP_GUARD } top_mode;

/* n(h): geometric interpolation from the easy count (0 = every candidate) to num_negatives. */
int mine_knob_n(const mine_config *c, float h, int n_cand);

/* Applies the guards of `w` to the row (ceiling and eps suspects marked) and selects ranks [a, b) of
 * the candidates left, per mode; returns the window's size (pool modes: the pool, in idx[0..n)). */
int mine_top(const mine *m, mine_ws *ws, row_t *r, const want_t *w, top_mode mode, rowacc_t *ra);

/* Final pass: every remaining candidate becomes `to`; when to is MINE_NEG, those above u are
 * suspects instead and the negatives are counted. */
void mine_finish(row_t *r, uint8_t to, float u, int suspect, rowacc_t *ra);

/* n uniform candidates without replacement. */
void mine_pick_random(mine_ws *ws, row_t *r, int n, rng_t *rng, rowacc_t *ra);

/* FaceNet's semi-hard negatives: s_pos - margin < s < s_pos, n of them at random; when the band holds
 * fewer, the hardest below it fill up to n. */
void mine_pick_semi_hard(const mine *m, mine_ws *ws, row_t *r, int n, float s_pos, rng_t *rng,
                         rowacc_t *ra);

/* MoCHi's synthetic columns for row `row` from its hard pool P[0..np) (mix.c). */
void mine_synthesize(const mine *m, mine_ws *ws, const mine_layout *l, const mine_input *in, int row,
                     const int32_t *P, int np, float *srow, uint8_t *mrow, rng_t *rng, rowacc_t *ra);

#endif
