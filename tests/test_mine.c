/* Negative selection, hardness control and the adversarial bank: every strategy picks exactly the
 * entries it specifies on hand-built similarity matrices (and, for rank selections, the same entries
 * as a full sort on large random rows), the guards exclude what they promise, MoCHi's synthetic points
 * are what the recipes say, AdCo's bank ascends its loss. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "contrast/advbank.h"
#include "contrast/hardness.h"
#include "contrast/kselect.h"
#include "contrast/mine.h"
#include "core/err.h"
#include "core/par.h"
#include "core/tensor.h"
#include "testutil.h"
#include "service/config.h"

/* Check records every passing ck_assert (a write per assertion), which in the element-wise loops
 * below would cost more than the code under test: those loops report only failures. */
#define EXPECT(cond, ...)                                                                           \
  do {                                                                                              \
    if (!(cond)) ck_abort_msg(__VA_ARGS__);                                                         \
  } while (0)

/* ---- fixture: a miner with one layout and its S / mask ---------------------------------------- */

typedef struct {
  mine m;
  mine_layout l;
  mine_input in;
  float *S;
  uint8_t *mask;
  float s_pos[64];
  rng_t rng;
  mine_stats st;
} fix;

static void fix_open(fix *f, const mine_config *c, int K, int B, int dim) {
  memset(f, 0, sizeof *f);
  ck_assert_int_eq(mine_init(&f->m, c, B, K, dim), 0);
  mine_layout_init(&f->l, c, K, B);
  f->S = calloc((size_t)B * f->l.cols, sizeof *f->S);
  f->mask = calloc((size_t)B * f->l.cols, 1);
  f->in.batch_size = B;
  f->in.s_pos = f->s_pos;
  f->in.hardness = 1.0f;
  f->in.queue_filled = K;
  f->in.dim = dim;
  for (int i = 0; i < B; i++) f->s_pos[i] = 1.0f;
  rng_init(&f->rng, 5, RNG_STREAM_SAMPLE);
}

static void fix_close(fix *f) {
  mine_free(&f->m);
  free(f->S);
  free(f->mask);
}

static void fix_run(fix *f) {
  int rc = mine_select(&f->m, &f->l, &f->in, f->S, f->mask, &f->rng, &f->st);
  ck_assert_msg(rc == 0, "mine_select: %s", moco_errmsg());
}

static void set_row(fix *f, int row, const float *v, int n) {
  memcpy(f->S + (size_t)row * f->l.cols, v, (size_t)n * sizeof *v);
}

static uint8_t mk(const fix *f, int row, int col) { return f->mask[(size_t)row * f->l.cols + col]; }

/* The mask row as a string, one character per column: '.' off, 'n' negative, 'p' positive. */
static const char *mask_str(const fix *f, int row) {
  static char buf[256];
  int n = f->l.cols < 255 ? f->l.cols : 255;
  for (int j = 0; j < n; j++) buf[j] = ".np?c"[mk(f, row, j) < 5 ? mk(f, row, j) : 3];
  buf[n] = 0;
  return buf;
}

static int count_mask(const fix *f, int row, int from, int to, uint8_t v) {
  int n = 0;
  for (int j = from; j < to; j++) n += mk(f, row, j) == v;
  return n;
}

static mine_config cfg_of(mine_strategy s, int n) {
  mine_config c;
  c = config_defaults()->trainer.moco.mine;
  c.strategy = s;
  c.num_negatives = n;
  return c;
}

/* ---- k-th element selection ------------------------------------------------------------------- */

static int cmp_desc(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x < y) - (x > y);
}

START_TEST(kselect_agrees_with_sorting_on_awkward_inputs) {
  enum { N = 1500 };
  static float v[N], sorted[N], work[N], part[N + KSELECT_SLACK];
  rng_t r;
  rng_init(&r, 1, 2);
  for (int pattern = 0; pattern < 6; pattern++) {
    for (int i = 0; i < N; i++) {
      switch (pattern) {
      case 0: v[i] = rng_uniform(&r); break;
      case 1: v[i] = (float)(rng_below(&r, 7)); break;        /* heavy ties */
      case 2: v[i] = (float)i; break;                         /* ascending */
      case 3: v[i] = (float)(N - i); break;                   /* descending */
      case 4: v[i] = (float)(i < N / 2 ? i : N - i); break;   /* organ pipe */
      default: v[i] = 3.0f; break;                            /* all equal */
      }
    }
    memcpy(sorted, v, sizeof v);
    qsort(sorted, N, sizeof *sorted, cmp_desc);
    for (int k = 1; k <= N; k += 37) {
      memcpy(work, v, sizeof v);
      float got = kselect_largest(work, N, k, part);
      ck_assert_msg(got == sorted[k - 1], "pattern %d k %d: %g vs %g", pattern, k, got, sorted[k - 1]);
      for (int i = 0; i < k; i++) EXPECT(work[i] >= got, "pattern %d k %d: top part holds %g", pattern, k, work[i]);
      for (int i = k; i < N; i++) EXPECT(work[i] <= got, "pattern %d k %d: rest holds %g", pattern, k, work[i]);
    }
  }
}
END_TEST

/* ---- all, exclusions, layout ------------------------------------------------------------------ */

START_TEST(all_uses_exactly_the_filled_queue_slots) {
  mine_config c = cfg_of(MINE_ALL, 1);
  fix f;
  fix_open(&f, &c, 8, 2, 0);
  f.in.queue_filled = 5; /* queue not yet full */
  float row[8] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.9f, 0.9f, 0.9f};
  set_row(&f, 0, row, 8);
  set_row(&f, 1, row, 8);
  f.s_pos[0] = 0.45f;
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), "nnnnn...");
  ck_assert_str_eq(mask_str(&f, 1), "nnnnn...");
  ck_assert_double_eq_tol(f.st.negatives_per_query, 5.0, 1e-9);
  ck_assert_float_eq_tol(f.st.neg_sim_mean, 0.3f, 1e-6f);
  ck_assert_float_eq_tol(f.st.hardest_sim_max, 0.5f, 1e-6f);
  ck_assert_float_eq_tol(f.st.instance_accuracy, 0.5f, 1e-6f); /* row 0: 0.5 > 0.45 */
  f.in.queue_filled = 0;
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), "........");
  ck_assert_float_eq(f.st.instance_accuracy, 1.0f);
  fix_close(&f);
}
END_TEST

START_TEST(entries_with_the_querys_sample_id_are_never_negatives) {
  mine_config c = cfg_of(MINE_HARDEST, 2);
  fix f;
  fix_open(&f, &c, 6, 2, 0);
  int64_t qids[6] = {10, 11, 12, 7, -1, 7};
  int64_t ids[2] = {7, -1}; /* row 1's id is unknown: an unknown id matches nothing */
  f.in.queue_ids = qids;
  f.in.ids = ids;
  float row[6] = {0.1f, 0.2f, 0.3f, 0.9f, 0.5f, 0.8f};
  set_row(&f, 0, row, 6);
  set_row(&f, 1, row, 6);
  fix_run(&f);
  /* row 0: slots 3 and 5 carry id 7 and are excluded; the two hardest left are 4 (0.5), 2 (0.3) */
  ck_assert_str_eq(mask_str(&f, 0), "..n.n.");
  /* row 1 keeps them: 3 (0.9) and 5 (0.8) */
  ck_assert_str_eq(mask_str(&f, 1), "...n.n");
  ck_assert_int_eq(f.st.same_id, 2);
  ck_assert_int_eq(f.st.filtered, 0);
  fix_close(&f);
}
END_TEST

START_TEST(in_batch_negatives_skip_the_own_column_even_when_k_is_smaller_than_the_batch) {
  mine_config c = cfg_of(MINE_ALL, 1);
  c.in_batch_negatives = 1;
  fix f;
  fix_open(&f, &c, 2, 4, 0); /* K = 2 < B = 4 */
  ck_assert_int_eq(f.l.cols, 6);
  ck_assert_int_eq(f.l.batch_off, 2);
  int64_t ids[4] = {1, 2, 1, 3}; /* rows 0 and 2 are the same image (two draws in one batch) */
  int64_t qids[2] = {3, 9};
  f.in.ids = ids;
  f.in.queue_ids = qids;
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), "nn.n.n");
  ck_assert_str_eq(mask_str(&f, 1), "nnn.nn");
  ck_assert_str_eq(mask_str(&f, 2), "nn.n.n");
  ck_assert_str_eq(mask_str(&f, 3), ".nnnn.");
  ck_assert_int_eq(f.st.same_id, 3); /* (0,col 4), (2,col 2), (3, slot 0) */
  ck_assert_double_eq_tol(f.st.negatives_per_query, 17.0 / 4, 1e-9);
  fix_close(&f);
}
END_TEST

/* ---- random ---------------------------------------------------------------------------------- */

START_TEST(random_draws_n_distinct_valid_entries_uniformly) {
  enum { K = 50, FILLED = 40, DRAWS = 2000 };
  int counts[K] = {0};
  for (int n = 5; n <= 45; n += 10) { /* 5, 15: rejection; 25, 35: complement; 45: all */
    mine_config c = cfg_of(MINE_RANDOM, n);
    fix f;
    fix_open(&f, &c, K, 1, 0);
    f.in.queue_filled = FILLED;
    int64_t qids[K], ids[1] = {100};
    for (int j = 0; j < K; j++) qids[j] = j == 7 ? 100 : j;
    f.in.queue_ids = qids;
    f.in.ids = ids;
    memset(counts, 0, sizeof counts);
    for (int d = 0; d < DRAWS; d++) {
      fix_run(&f);
      int want = n < FILLED - 1 ? n : FILLED - 1;
      EXPECT(count_mask(&f, 0, 0, K, MINE_NEG) == want, "n %d: %d negatives", n, count_mask(&f, 0, 0, K, MINE_NEG));
      EXPECT(mk(&f, 0, 7) == MINE_OFF, "n %d: the same-id slot was drawn", n);
      EXPECT(count_mask(&f, 0, FILLED, K, MINE_OFF) == K - FILLED, "n %d: an unfilled slot was drawn", n);
      for (int j = 0; j < K; j++) counts[j] += mk(&f, 0, j) == MINE_NEG;
    }
    double expect = (double)DRAWS * (n < FILLED - 1 ? n : FILLED - 1) / (FILLED - 1);
    for (int j = 0; j < FILLED; j++)
      if (j != 7) ck_assert_msg(fabs(counts[j] - expect) < 5 * sqrt(expect) + 1, "n %d slot %d: %d vs %g",
                                n, j, counts[j], expect);
    fix_close(&f);
  }
}
END_TEST

START_TEST(random_is_uniform_on_sparse_rows_and_deterministic_per_rng) {
  /* supervised exclusion leaves a sparse candidate set, which takes the gather-and-shuffle path */
  enum { K = 40 };
  mine_config c = cfg_of(MINE_RANDOM, 3);
  c.supervised = 1;
  fix f;
  fix_open(&f, &c, K, 1, 0);
  int32_t qlab[K], lab[1] = {0};
  for (int j = 0; j < K; j++) qlab[j] = j % 8 == 0 ? 1 : 0; /* 5 of 40 differ in label */
  f.in.queue_labels = qlab;
  f.in.labels = lab;
  int counts[K] = {0};
  for (int d = 0; d < 2000; d++) {
    fix_run(&f);
    EXPECT(count_mask(&f, 0, 0, K, MINE_NEG) == 3, "draw %d: %d negatives", d, count_mask(&f, 0, 0, K, MINE_NEG));
    for (int j = 0; j < K; j++) {
      if (j % 8) EXPECT(mk(&f, 0, j) == MINE_OFF, "draw %d: same-label slot %d drawn", d, j);
      counts[j] += mk(&f, 0, j) == MINE_NEG;
    }
  }
  for (int j = 0; j < K; j += 8) ck_assert(fabs(counts[j] - 1200.0) < 5 * sqrt(1200.0));
  ck_assert_int_eq(f.st.filtered, 35);
  ck_assert_int_eq(f.st.label_known, 3);
  ck_assert_int_eq(f.st.label_same, 0);
  /* the same rng state gives the same draw */
  rng_t keep = f.rng;
  fix_run(&f);
  char first[64];
  strcpy(first, mask_str(&f, 0));
  f.rng = keep;
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), first);
  fix_close(&f);
}
END_TEST

/* ---- hardest, band, semi-hard ---------------------------------------------------------------- */

START_TEST(hardest_takes_the_n_most_similar_with_ties_to_the_lower_column) {
  mine_config c = cfg_of(MINE_HARDEST, 3);
  fix f;
  fix_open(&f, &c, 8, 1, 0);
  float row[8] = {0.1f, 0.7f, 0.3f, 0.5f, 0.5f, 0.9f, 0.5f, -0.2f};
  set_row(&f, 0, row, 8);
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), ".n.n.n..");
  ck_assert_int_eq(f.st.knob_n, 3);
  c.num_negatives = 20; /* n > valid entries: every valid one */
  fix_close(&f);
  fix_open(&f, &c, 8, 1, 0);
  set_row(&f, 0, row, 8);
  f.in.queue_filled = 6;
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), "nnnnnn..");
  ck_assert_int_eq(f.st.knob_n, 6);
  fix_close(&f);
}
END_TEST

/* Reference: candidates sorted by (similarity desc, column asc), ranks [a, b) expected NEG. */
typedef struct {
  float s;
  int col;
} ranked;

static int cmp_ranked(const void *pa, const void *pb) {
  const ranked *a = pa, *b = pb;
  if (a->s != b->s) return a->s < b->s ? 1 : -1;
  return a->col - b->col;
}

static void check_ranks(const fix *f, int row, int width, int a, int b, const char *what) {
  static ranked rk[32768];
  const float *s = f->S + (size_t)row * f->l.cols;
  for (int j = 0; j < width; j++) rk[j] = (ranked){s[j], j};
  qsort(rk, (size_t)width, sizeof *rk, cmp_ranked);
  for (int k = 0; k < width; k++) {
    int want = k >= a && k < b ? MINE_NEG : MINE_OFF;
    EXPECT(mk(f, row, rk[k].col) == want, "%s: row %d rank %d col %d: mask %d, want %d", what, row,
                  k, rk[k].col, mk(f, row, rk[k].col), want);
  }
}

/* Rows of 6,000 and 20,000 columns: the same masks as a full sort. */
START_TEST(hardest_and_band_match_a_full_sort_on_long_rows) {
  enum { B = 6 };
  rng_t r;
  rng_init(&r, 3, 4);
  for (int pass = 0; pass < 4; pass++) {
    int strat = pass & 1, K = pass < 2 ? 6000 : 20000;
    mine_config c = cfg_of(strat ? MINE_BAND : MINE_HARDEST, 0);
    for (int t = 0; t < 4; t++) {
      c.num_negatives = (int[]){1, 37, 700, K - 1}[t];
      c.band_lo = (float[]){0.0f, 0.01f, 0.2f, 0.5f}[t];
      c.band_hi = (float[]){0.001f, 0.05f, 0.6f, 1.0f}[t];
      fix f;
      fix_open(&f, &c, K, B, 0);
      for (int i = 0; i < B; i++) {
        float *s = f.S + (size_t)i * f.l.cols;
        for (int j = 0; j < K; j++) {
          float u = rng_normal(&r) * 0.1f;
          /* rows 0-1 Gaussian, 2-3 quantised (many ties), 4-5 drifting with the column */
          s[j] = i < 2 ? u : i < 4 ? roundf(u * 20.0f) / 20.0f : u + 1e-4f * j;
        }
      }
      fix_run(&f);
      for (int i = 0; i < B; i++) {
        int a = 0, b = c.num_negatives < K ? c.num_negatives : K;
        if (strat) {
          a = (int)floor(c.band_lo * K + 1e-4);
          b = (int)floor(c.band_hi * K + 1e-4);
        }
        check_ranks(&f, i, K, a, b, strat ? "band" : "hardest");
      }
      fix_close(&f);
    }
  }
}
END_TEST

START_TEST(hardest_is_exact_when_the_sample_misleads) {
  /* the strided sample sees only the 256 planted high values, so its threshold admits too few for
   * n = 300 and the row must be gathered again without one; on a short and on a long row */
  for (int K = 4096; K <= 16384 + 4096; K += 16384) {
    mine_config c = cfg_of(MINE_HARDEST, 300);
    fix f;
    fix_open(&f, &c, K, 1, 0);
    int step = K / 256;
    for (int j = 0; j < K; j++) f.S[j] = (j % step == step / 2) ? 0.9f : 0.5f - 1e-5f * j;
    fix_run(&f);
    check_ranks(&f, 0, K, 0, 300, "misled");
    fix_close(&f);
  }
}
END_TEST

/* Reference for guards + rank strategies on one row: candidates [0, K); ceiling suspects s > u; of
 * the rest, sorted by (similarity desc, column asc), the top E = floor(eps V) are suspects and ranks
 * [E + a, E + b) the window. Returns the expected mask in want[]. */
static void reference_ranks(const float *s, int K, float u, float eps, int a_frac_mode, float lo,
                            float hi, int n, int pos, uint8_t *want) {
  static ranked rk[8192];
  int V = 0;
  for (int j = 0; j < K; j++) {
    want[j] = MINE_OFF;
    if (s[j] > u)
      want[j] = pos ? MINE_POS : MINE_OFF;
    else
      rk[V++] = (ranked){s[j], j};
  }
  qsort(rk, (size_t)V, sizeof *rk, cmp_ranked);
  int E = (int)floor(eps * V + 1e-4), left = V - E, a = 0, b = n < left ? n : left;
  if (a_frac_mode) {
    a = (int)floor(lo * left + 1e-4);
    b = (int)floor(hi * left + 1e-4);
    if (b <= a && a < left) b = a + 1;
  }
  for (int k = 0; k < V; k++) {
    if (k < E) want[rk[k].col] = pos ? MINE_POS : MINE_OFF;
    else if (k - E >= a && k - E < b) want[rk[k].col] = MINE_NEG;
  }
}

START_TEST(guards_and_rank_windows_match_a_reference_on_long_rows) {
  enum { K = 3000, B = 4 };
  static uint8_t want[K];
  rng_t r;
  rng_init(&r, 12, 1);
  for (int trial = 0; trial < 24; trial++) {
    int band = trial % 2, pos = (trial / 2) % 2, ceil_mode = (trial / 4) % 3;
    float eps = (float[]){0.0f, 0.004f, 0.1f, 0.3f}[trial % 4];
    mine_config c = cfg_of(band ? MINE_BAND : MINE_HARDEST, (int[]){1, 50, 900}[trial % 3]);
    c.band_lo = (float[]){0.0f, 0.02f, 0.4f}[trial % 3];
    c.band_hi = (float[]){0.01f, 0.3f, 0.9f}[trial % 3];
    c.skip_hardest = eps;
    c.suspects_as_positives = pos;
    c.ceiling = (mine_ceiling)ceil_mode;
    c.ceiling_value = 0.15f;
    c.ceiling_delta = 0.6f;
    fix f;
    fix_open(&f, &c, K, B, 0);
    for (int i = 0; i < B; i++) {
      float *s = f.S + (size_t)i * f.l.cols;
      f.s_pos[i] = 0.8f;
      for (int j = 0; j < K; j++) s[j] = i == 3 ? roundf(rng_normal(&r) * 10.0f) / 100.0f : rng_normal(&r) * 0.1f;
    }
    fix_run(&f);
    float u = ceil_mode == MINE_CEILING_ABSOLUTE ? 0.15f : ceil_mode == MINE_CEILING_RELATIVE ? 0.8f - 0.6f : INFINITY;
    for (int i = 0; i < B; i++) {
      reference_ranks(f.S + (size_t)i * f.l.cols, K, u, eps, band, c.band_lo, c.band_hi, c.num_negatives, pos,
                      want);
      for (int j = 0; j < K; j++)
        EXPECT(mk(&f, i, j) == want[j], "trial %d row %d col %d: mask %d, want %d (s %g)", trial, i, j,
                      mk(&f, i, j), want[j], f.S[(size_t)i * f.l.cols + j]);
    }
    fix_close(&f);
  }
}
END_TEST

START_TEST(hardest_ranks_queue_and_in_batch_columns_together) {
  enum { K = 2000, B = 8, N = 300 };
  mine_config c = cfg_of(MINE_HARDEST, N);
  c.in_batch_negatives = 1;
  fix f;
  fix_open(&f, &c, K, B, 0);
  f.in.queue_filled = 1500; /* and a partly filled queue */
  rng_t r;
  rng_init(&r, 14, 1);
  for (int i = 0; i < B; i++)
    for (int j = 0; j < f.l.cols; j++) f.S[(size_t)i * f.l.cols + j] = rng_normal(&r) * 0.1f + (j >= K ? 0.2f : 0.0f);
  fix_run(&f);
  for (int i = 0; i < B; i++) {
    static ranked rk[K + B];
    int n = 0;
    for (int j = 0; j < f.l.cols; j++)
      if (j < 1500 || (j >= K && j != K + i)) rk[n++] = (ranked){f.S[(size_t)i * f.l.cols + j], j};
    qsort(rk, (size_t)n, sizeof *rk, cmp_ranked);
    for (int k = 0; k < n; k++)
      EXPECT(mk(&f, i, rk[k].col) == (k < N ? MINE_NEG : MINE_OFF), "row %d rank %d col %d", i, k, rk[k].col);
    ck_assert_int_eq(count_mask(&f, i, 0, f.l.cols, MINE_NEG), N);
  }
  fix_close(&f);
}
END_TEST

START_TEST(semi_hard_top_up_is_exact_on_long_rows) {
  enum { K = 5000 };
  mine_config c = cfg_of(MINE_SEMI_HARD, 200);
  c.margin = 0.05f;
  fix f;
  fix_open(&f, &c, K, 1, 0);
  rng_t r;
  rng_init(&r, 13, 1);
  for (int j = 0; j < K; j++) f.S[j] = rng_normal(&r) * 0.1f;
  f.s_pos[0] = 0.3f; /* the band (0.25, 0.3) holds a few dozen of 5000 */
  fix_run(&f);
  static ranked rk[K];
  int nb = 0, nr = 0;
  for (int j = 0; j < K; j++) {
    float x = f.S[j];
    if (x > 0.25f && x < 0.3f) {
      nb++;
      EXPECT(mk(&f, 0, j) == MINE_NEG, "band column %d not taken", j);
    } else if (x <= 0.25f) {
      rk[nr++] = (ranked){x, j};
    } else {
      EXPECT(mk(&f, 0, j) == MINE_OFF, "column %d at or above s_pos taken", j);
    }
  }
  ck_assert(nb > 0 && nb < 200);
  qsort(rk, (size_t)nr, sizeof *rk, cmp_ranked);
  for (int k = 0; k < nr; k++)
    EXPECT(mk(&f, 0, rk[k].col) == (k < 200 - nb ? MINE_NEG : MINE_OFF), "rank %d below the band", k);
  fix_close(&f);
}
END_TEST

START_TEST(band_selects_its_rank_window_and_follows_hardness) {
  mine_config c = cfg_of(MINE_BAND, 1);
  c.band_lo = 0.2f;
  c.band_hi = 0.5f;
  fix f;
  fix_open(&f, &c, 10, 1, 0);
  /* column j has rank j: similarity decreasing with the column */
  float row[10];
  for (int j = 0; j < 10; j++) row[j] = 0.9f - 0.1f * j;
  set_row(&f, 0, row, 10);
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), "..nnn.....");
  ck_assert_float_eq_tol(f.st.band_lo, 0.2f, 1e-6f);
  f.in.hardness = 0.0f; /* easy end: everything */
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), "nnnnnnnnnn");
  f.in.hardness = 0.5f; /* [0.1, 0.75]: ranks 1..6 */
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), ".nnnnnn...");
  fix_close(&f);
}
END_TEST

START_TEST(semi_hard_samples_the_band_then_tops_up_from_below) {
  mine_config c = cfg_of(MINE_SEMI_HARD, 2);
  c.margin = 0.2f;
  fix f;
  fix_open(&f, &c, 8, 1, 0);
  /* s_pos 0.8: band (0.6, 0.8) = columns 1, 2, 3; 0.6 itself is outside (strict) */
  float row[8] = {0.9f, 0.79f, 0.7f, 0.65f, 0.6f, 0.5f, 0.4f, 0.8f};
  set_row(&f, 0, row, 8);
  f.s_pos[0] = 0.8f;
  int seen[8] = {0};
  for (int d = 0; d < 300; d++) {
    fix_run(&f);
    ck_assert_int_eq(count_mask(&f, 0, 1, 4, MINE_NEG), 2);
    ck_assert_int_eq(count_mask(&f, 0, 0, 8, MINE_NEG), 2);
    for (int j = 0; j < 8; j++) seen[j] += mk(&f, 0, j) == MINE_NEG;
  }
  ck_assert(seen[1] > 150 && seen[2] > 150 && seen[3] > 150); /* each 2/3 of the time */
  fix_close(&f);
  c.num_negatives = 5; /* 3 in the band + the 2 hardest below it: 0.6 and 0.5 */
  fix_open(&f, &c, 8, 1, 0);
  set_row(&f, 0, row, 8);
  f.s_pos[0] = 0.8f;
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), ".nnnnn..");
  fix_close(&f);
}
END_TEST

START_TEST(hardness_sets_n_geometrically_between_easy_and_hard) {
  mine_config c = cfg_of(MINE_HARDEST, 4);
  c.num_negatives_easy = 100;
  fix f;
  fix_open(&f, &c, 200, 1, 0);
  float row[200];
  for (int j = 0; j < 200; j++) row[j] = (float)j / 200.0f;
  set_row(&f, 0, row, 200);
  f.in.hardness = 0.5f; /* sqrt(100 * 4) = 20 */
  fix_run(&f);
  ck_assert_int_eq(f.st.knob_n, 20);
  ck_assert_int_eq(count_mask(&f, 0, 180, 200, MINE_NEG), 20);
  f.in.hardness = 0.0f;
  fix_run(&f);
  ck_assert_int_eq(count_mask(&f, 0, 0, 200, MINE_NEG), 100);
  c.num_negatives_easy = 0; /* easy end = every candidate */
  fix_close(&f);
  fix_open(&f, &c, 200, 1, 0);
  set_row(&f, 0, row, 200);
  f.in.hardness = 0.0f;
  fix_run(&f);
  ck_assert_int_eq(count_mask(&f, 0, 0, 200, MINE_NEG), 200);
  ck_assert_float_eq_tol(mine_hcl_beta(&c, 0.25f), 0.25f * c.hcl_beta, 1e-7f);
  fix_close(&f);
}
END_TEST

/* ---- false-negative guards -------------------------------------------------------------------- */

START_TEST(ceilings_drop_or_promote_suspects) {
  float row[6] = {0.95f, 0.2f, 0.85f, 0.91f, 0.5f, 0.3f};
  for (int pos = 0; pos < 2; pos++) {
    mine_config c = cfg_of(MINE_ALL, 1);
    c.ceiling = MINE_CEILING_ABSOLUTE;
    c.ceiling_value = 0.9f;
    c.suspects_as_positives = pos;
    fix f;
    fix_open(&f, &c, 6, 1, 0);
    set_row(&f, 0, row, 6);
    fix_run(&f);
    ck_assert_str_eq(mask_str(&f, 0), pos ? "pnnpnn" : ".nn.nn");
    ck_assert_int_eq(f.st.filtered, 2);
    ck_assert_int_eq(f.st.extra_positives, pos ? 2 : 0);
    fix_close(&f);
    /* relative: s > s_pos - delta with s_pos 0.7; the hardest 2 among the rest */
    c = cfg_of(MINE_HARDEST, 2);
    c.ceiling = MINE_CEILING_RELATIVE;
    c.ceiling_delta = 0.15f; /* ceiling 0.55: 0.95, 0.85, 0.91 are suspects */
    c.suspects_as_positives = pos;
    fix_open(&f, &c, 6, 1, 0);
    set_row(&f, 0, row, 6);
    f.s_pos[0] = 0.7f;
    fix_run(&f);
    ck_assert_str_eq(mask_str(&f, 0), pos ? "p.ppnn" : "....nn");
    fix_close(&f);
  }
}
END_TEST

START_TEST(skip_hardest_sets_aside_the_top_epsilon) {
  mine_config c = cfg_of(MINE_HARDEST, 3);
  c.skip_hardest = 0.2f; /* 2 of 10 */
  fix f;
  fix_open(&f, &c, 10, 1, 0);
  float row[10];
  for (int j = 0; j < 10; j++) row[j] = 0.9f - 0.1f * j;
  set_row(&f, 0, row, 10);
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), "..nnn.....");
  ck_assert_int_eq(f.st.filtered, 2);
  fix_close(&f);
  c.suspects_as_positives = 1;
  c.strategy = MINE_ALL;
  fix_open(&f, &c, 10, 1, 0);
  set_row(&f, 0, row, 10);
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), "ppnnnnnnnn");
  fix_close(&f);
}
END_TEST

START_TEST(every_candidate_filtered_leaves_no_negatives) {
  for (int s = MINE_ALL; s <= MINE_MIXING; s++) {
    mine_config c = cfg_of((mine_strategy)s, 3);
    c.ceiling = MINE_CEILING_ABSOLUTE;
    c.ceiling_value = -1.0f;
    c.mix_pairs = 2;
    c.mix_query = 1;
    fix f;
    fix_open(&f, &c, 5, 2, 4);
    float keys[5 * 4] = {0}, q[2 * 4] = {0};
    f.in.q = q;
    f.in.queue_keys = keys;
    float row[5] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f};
    set_row(&f, 0, row, 5);
    set_row(&f, 1, row, 5);
    fix_run(&f);
    for (int i = 0; i < 2; i++) ck_assert_int_eq(count_mask(&f, i, 0, f.l.cols, MINE_NEG), 0);
    ck_assert_int_eq(f.st.filtered, 10);
    ck_assert_double_eq(f.st.negatives_per_query, 0.0);
    ck_assert_float_eq(f.st.instance_accuracy, 1.0f);
    fix_close(&f);
  }
}
END_TEST

START_TEST(supervised_mode_and_label_diagnostics) {
  int32_t qlab[6] = {0, 1, 0, 2, -1, 1}, lab[1] = {0};
  float row[6] = {0.6f, 0.5f, 0.4f, 0.3f, 0.2f, 0.1f};
  mine_config c = cfg_of(MINE_ALL, 1);
  fix f;
  fix_open(&f, &c, 6, 1, 0);
  set_row(&f, 0, row, 6);
  f.in.queue_labels = qlab;
  f.in.labels = lab;
  fix_run(&f); /* labels are diagnostics only */
  ck_assert_str_eq(mask_str(&f, 0), "nnnnnn");
  ck_assert_int_eq(f.st.label_known, 5);
  ck_assert_int_eq(f.st.label_same, 2);
  fix_close(&f);
  c.supervised = 1;
  fix_open(&f, &c, 6, 1, 0);
  set_row(&f, 0, row, 6);
  f.in.queue_labels = qlab;
  f.in.labels = lab;
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), ".n.nnn");
  ck_assert_int_eq(f.st.filtered, 2);
  ck_assert_int_eq(f.st.label_same, 0);
  f.in.labels = NULL; /* supervised without labels is refused */
  ck_assert_int_eq(mine_select(&f.m, &f.l, &f.in, f.S, f.mask, &f.rng, NULL), MOCO_EINVAL);
  fix_close(&f);
}
END_TEST

START_TEST(bad_inputs_are_refused_with_context) {
  mine_config c = cfg_of(MINE_HARDEST, 3);
  fix f;
  fix_open(&f, &c, 8, 2, 0);
  f.in.hardness = 1.5f;
  ck_assert_int_eq(mine_select(&f.m, &f.l, &f.in, f.S, f.mask, &f.rng, NULL), MOCO_ERANGE);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "hardness"));
  f.in.hardness = 1.0f;
  f.in.batch_size = 3;
  ck_assert_int_eq(mine_select(&f.m, &f.l, &f.in, f.S, f.mask, &f.rng, NULL), MOCO_ESHAPE);
  f.in.batch_size = 2;
  f.in.queue_filled = 9;
  ck_assert_int_eq(mine_select(&f.m, &f.l, &f.in, f.S, f.mask, &f.rng, NULL), MOCO_ERANGE);
  fix_close(&f);
  int s = -1;
  ck_assert_int_eq(enum_value_of(mine_strategy_names, "semi-hard", &s), 0);
  ck_assert_int_eq(s, MINE_SEMI_HARD);
  ck_assert_str_eq(enum_name_of(mine_strategy_names, (int)MINE_MIXING), "mixing");
  ck_assert_int_eq(enum_value_of(mine_strategy_names, "hardest-first", &s), MOCO_ENOENT);
  ck_assert_int_eq(enum_value_of(mine_ceiling_names, "relative", &s), 0);
  ck_assert_int_eq(s, MINE_CEILING_RELATIVE);
  ck_assert_int_eq(enum_value_of(mine_ceiling_names, "soft", &s), MOCO_ENOENT);
}
END_TEST

/* ---- mixing ----------------------------------------------------------------------------------- */

static void random_unit(float *x, int d, rng_t *r) {
  for (int k = 0; k < d; k++) x[k] = rng_normal(r);
  vec_normalize(x, (size_t)d);
}

/* A MoCHi miner over random unit vectors: K queue keys, B queries and in-batch keys, pool N,
 * 5 pair mixes and 4 query mixes per row, S filled from the vectors. */
enum { MIX_K = 40, MIX_B = 3, MIX_D = 16, MIX_N = 6 };
static float mix_keys[MIX_K * MIX_D], mix_bkeys[MIX_B * MIX_D], mix_q[MIX_B * MIX_D];

static void mixing_open(mine_config *c, rng_t *r) {
  enum { K = MIX_K, B = MIX_B, D = MIX_D };
  *c = cfg_of(MINE_MIXING, MIX_N);
  c->mix_pairs = 5;
  c->mix_query = 4;
  c->in_batch_negatives = 1;
  rng_init(r, 8, 1);
  for (int j = 0; j < K; j++) random_unit(mix_keys + j * D, D, r);
  for (int i = 0; i < B; i++) {
    random_unit(mix_q + i * D, D, r);
    random_unit(mix_bkeys + i * D, D, r);
  }
}

static void mixing_fill(fix *f) {
  enum { K = MIX_K, B = MIX_B, D = MIX_D };
  f->in.q = mix_q;
  f->in.queue_keys = mix_keys;
  f->in.batch_keys = mix_bkeys;
  for (int i = 0; i < B; i++) {
    float *s = f->S + (size_t)i * f->l.cols;
    for (int j = 0; j < K; j++) s[j] = vec_dot(mix_q + i * D, mix_keys + j * D, D);
    for (int j = 0; j < B; j++) s[K + j] = vec_dot(mix_q + i * D, mix_bkeys + j * D, D);
    f->s_pos[i] = 0.9f;
  }
}

/* Whether every synthetic recipe of row i mixes members of the n hardest of rk (and the query). */
static int recipes_from_pool(const fix *f, int i, const ranked *rk, int n) {
  for (int x = 0; x < f->l.synth_size; x++) {
    const mine_synth *sy = f->m.synth + (size_t)i * f->l.synth_size + x;
    int in_a = sy->a == -1, in_b = 0;
    for (int k = 0; k < n; k++) {
      in_a |= rk[k].col == sy->a;
      in_b |= rk[k].col == sy->b;
    }
    if (!in_a || !in_b) return 0;
  }
  return 1;
}

START_TEST(mixing_builds_unit_convex_mixes_of_the_hard_pool) {
  enum { K = MIX_K, B = MIX_B, D = MIX_D, N = MIX_N };
  mine_config c;
  rng_t r;
  mixing_open(&c, &r);
  fix f;
  fix_open(&f, &c, K, B, D);
  mixing_fill(&f);
  const float *keys = mix_keys, *bkeys = mix_bkeys, *q = mix_q;
  static float point[D];
  fix_run(&f);
  ck_assert_int_eq(f.l.synth_size, 9);
  for (int i = 0; i < B; i++) {
    const float *s = f.S + (size_t)i * f.l.cols;
    /* the pool: the N hardest candidates of the row (queue and other samples' keys) */
    ranked rk[K + B];
    int nr = 0;
    for (int j = 0; j < K + B; j++)
      if (j != K + i) rk[nr++] = (ranked){s[j], j};
    qsort(rk, (size_t)nr, sizeof *rk, cmp_ranked);
    ck_assert_int_eq(count_mask(&f, i, 0, K + B, MINE_NEG), K + B - 1); /* all real ones stay */
    ck_assert(recipes_from_pool(&f, i, rk, N));
    for (int x = 0; x < 9; x++) {
      const mine_synth *sy = f.m.synth + (size_t)i * 9 + x;
      ck_assert_int_eq(mk(&f, i, f.l.synth_off + x), MINE_NEG);
      float w = sy->wa / (sy->wa + sy->wb); /* the convex weight before normalisation */
      ck_assert(sy->wa > 0 && sy->wb > 0);
      if (x < 5) {
        ck_assert(sy->a >= 0 && sy->a != sy->b);
        ck_assert(w > 0.0f && w < 1.0f);
      } else {
        ck_assert_int_eq(sy->a, -1); /* a query mix, query weight below one half */
        ck_assert(w > 0.0f && w < 0.5f);
      }
      mine_synth_point(&f.m, &f.l, &f.in, i, x, point);
      ck_assert_float_eq_tol(vec_dot(point, point, D), 1.0f, 1e-5f);
      ck_assert_float_eq_tol(s[f.l.synth_off + x], vec_dot(point, q + i * D, D), 1e-5f);
    }
  }
  /* fold: the synthetic columns' gradient, moved onto real columns and the query, equals the gradient
   * through the (constant) synthetic points */
  float *dS = calloc((size_t)B * f.l.cols, sizeof *dS), dself[B];
  for (int i = 0; i < B; i++)
    for (int x = 0; x < 9; x++) dS[(size_t)i * f.l.cols + f.l.synth_off + x] = rng_range(&r, -1, 1);
  float direct[B * D];
  memset(direct, 0, sizeof direct);
  for (int i = 0; i < B; i++)
    for (int x = 0; x < 9; x++) {
      mine_synth_point(&f.m, &f.l, &f.in, i, x, point);
      vec_axpy(direct + i * D, dS[(size_t)i * f.l.cols + f.l.synth_off + x], point, D);
    }
  mine_synth_fold(&f.m, &f.l, B, dS, dself);
  for (int i = 0; i < B; i++) {
    float folded[D];
    for (int k = 0; k < D; k++) folded[k] = dself[i] * q[i * D + k];
    for (int j = 0; j < K; j++) vec_axpy(folded, dS[(size_t)i * f.l.cols + j], keys + j * D, D);
    for (int j = 0; j < B; j++) vec_axpy(folded, dS[(size_t)i * f.l.cols + K + j], bkeys + j * D, D);
    for (int k = 0; k < D; k++) ck_assert_float_eq_tol(folded[k], direct[i * D + k], 1e-5f);
  }
  free(dS);
  /* warm-up: random negatives, no synthetic ones */
  f.in.warmup = 1;
  fix_run(&f);
  for (int i = 0; i < B; i++) {
    ck_assert_int_eq(count_mask(&f, i, 0, f.l.synth_off, MINE_NEG), N);
    ck_assert_int_eq(count_mask(&f, i, f.l.synth_off, f.l.cols, MINE_NEG), 0);
  }
  ck_assert_float_eq(f.st.hardness, 0.0f);
  fix_close(&f);
}
END_TEST

/* On a long row, with a pool of three, every pair mixes two of the three most similar columns and
 * every query mix one of them. */
START_TEST(mixing_pool_is_exact_on_long_rows) {
  enum { K = 20000, B = 2, D = 8, N = 3 };
  mine_config c = cfg_of(MINE_MIXING, N);
  c.mix_pairs = 16;
  c.mix_query = 8;
  fix f;
  fix_open(&f, &c, K, B, D);
  static float keys[K * D], q[B * D];
  rng_t r;
  rng_init(&r, 9, 1);
  for (int j = 0; j < K; j++) random_unit(keys + j * D, D, &r);
  for (int i = 0; i < B; i++) random_unit(q + i * D, D, &r);
  f.in.q = q;
  f.in.queue_keys = keys;
  static ranked rk[K];
  for (int i = 0; i < B; i++) {
    float *s = f.S + (size_t)i * f.l.cols;
    for (int j = 0; j < K; j++) s[j] = vec_dot(q + i * D, keys + j * D, D);
  }
  fix_run(&f);
  for (int i = 0; i < B; i++) {
    const float *s = f.S + (size_t)i * f.l.cols;
    for (int j = 0; j < K; j++) rk[j] = (ranked){s[j], j};
    qsort(rk, K, sizeof *rk, cmp_ranked);
    ck_assert_int_eq(count_mask(&f, i, 0, K, MINE_NEG), K);
    ck_assert(recipes_from_pool(&f, i, rk, N));
    ck_assert(!recipes_from_pool(&f, i, rk, N - 1)); /* and the third is used: the pool is not smaller */
  }
  fix_close(&f);
}
END_TEST

/* Under a ceiling the suspects leave the row and the pool: every candidate at or below it is a
 * negative, the ones above are dropped, and the mixes come from the N hardest of those left. */
START_TEST(mixing_under_a_ceiling_pools_only_what_the_guard_leaves) {
  enum { K = MIX_K, B = MIX_B };
  mine_config c;
  rng_t r;
  mixing_open(&c, &r);
  c.ceiling = MINE_CEILING_ABSOLUTE;
  c.ceiling_value = 0.2f;
  fix f;
  fix_open(&f, &c, K, B, MIX_D);
  mixing_fill(&f);
  fix_run(&f);
  long above = 0;
  for (int i = 0; i < B; i++) {
    const float *s = f.S + (size_t)i * f.l.cols;
    ranked rk[K + B];
    int nr = 0;
    for (int j = 0; j < K + B; j++) {
      if (j == K + i) continue;
      ck_assert_int_eq(mk(&f, i, j), s[j] > 0.2f ? MINE_OFF : MINE_NEG);
      above += s[j] > 0.2f;
      if (s[j] <= 0.2f) rk[nr++] = (ranked){s[j], j};
    }
    qsort(rk, (size_t)nr, sizeof *rk, cmp_ranked);
    ck_assert(recipes_from_pool(&f, i, rk, MIX_N));
  }
  ck_assert_msg(above > 0 && f.st.filtered == above, "%ld above the ceiling, %ld filtered", above,
                f.st.filtered);
  fix_close(&f);
}
END_TEST

/* ---- adversarial bank ------------------------------------------------------------------------- */

typedef struct {
  const float *q, *w;
  const float *s_pos;
  int B, M, d;
  float tau;
} nce_ctx;

/* InfoNCE over [positive | bank], in double: mean_i -log softmax_0. Writes dS [B, M] when not NULL. */
static double nce(const nce_ctx *c, float *dS) {
  double total = 0;
  for (int i = 0; i < c->B; i++) {
    double z[64], mx = c->s_pos[i] / c->tau, sum = 0;
    for (int m = 0; m < c->M; m++) {
      double dot = 0.0;
      for (int t = 0; t < c->d; t++) dot += (double)c->q[i * c->d + t] * c->w[m * c->d + t];
      z[m] = dot / c->tau;
      if (z[m] > mx) mx = z[m];
    }
    sum = exp(c->s_pos[i] / c->tau - mx);
    for (int m = 0; m < c->M; m++) sum += exp(z[m] - mx);
    total += -(c->s_pos[i] / c->tau - mx - log(sum));
    if (dS)
      for (int m = 0; m < c->M; m++) dS[i * c->M + m] = (float)(exp(z[m] - mx) / sum / c->tau / c->B);
  }
  return total / c->B;
}

static double nce_fn(void *ctx) { return nce(ctx, NULL); }

/* ---- threads ---------------------------------------------------------------------------------- */

/* One selection of every randomised or ranked strategy on the team, then alone: the masks, the
 * synthetic columns and recipes and the statistics are bit-identical. */
START_TEST(selection_does_not_depend_on_the_thread_count) {
  enum { K = 3000, B = 48, D = 16 }; /* B * cols above two parts' worth of cells */
  static const mine_strategy strategies[] = {MINE_RANDOM, MINE_HARDEST, MINE_SEMI_HARD, MINE_BAND,
                                             MINE_MIXING};
  static float keys[K * D], bkeys[B * D], q[B * D];
  static int64_t qids[K], ids[B];
  static int32_t qlab[K], lab[B];
  rng_t r;
  rng_init(&r, 21, 1);
  for (int j = 0; j < K; j++) {
    random_unit(keys + j * D, D, &r);
    qids[j] = (int64_t)rng_below(&r, 400);
    qlab[j] = (int32_t)rng_below(&r, 10);
  }
  for (int i = 0; i < B; i++) {
    random_unit(q + i * D, D, &r);
    random_unit(bkeys + i * D, D, &r);
    ids[i] = i % 20; /* some rows share an id */
    lab[i] = (int32_t)rng_below(&r, 10);
  }
  ck_assert_int_eq(par_set_threads(2), 0);
  for (size_t si = 0; si < sizeof strategies / sizeof *strategies; si++) {
    mine_config c = cfg_of(strategies[si], 300);
    c.in_batch_negatives = 1;
    c.ceiling = MINE_CEILING_RELATIVE;
    c.ceiling_delta = 0.05f;
    fix f;
    fix_open(&f, &c, K, B, D);
    f.in.q = q;
    f.in.queue_keys = keys;
    f.in.batch_keys = bkeys;
    f.in.queue_ids = qids;
    f.in.ids = ids;
    f.in.queue_labels = qlab;
    f.in.labels = lab;
    for (int i = 0; i < B; i++) {
      float *s = f.S + (size_t)i * f.l.cols;
      for (int j = 0; j < K; j++) s[j] = vec_dot(q + i * D, keys + j * D, D);
      for (int j = 0; j < B; j++) s[K + j] = vec_dot(q + i * D, bkeys + j * D, D);
      f.s_pos[i] = 0.6f;
    }
    size_t cells = (size_t)B * f.l.cols;
    float *S2 = malloc(cells * sizeof *S2);
    uint8_t *mask2 = malloc(cells);
    mine_synth *syn2 = malloc(((size_t)B * f.l.synth_size + 1) * sizeof *syn2);
    rng_t keep = f.rng;
    fix_run(&f);
    memcpy(S2, f.S, cells * sizeof *S2);
    memcpy(mask2, f.mask, cells);
    memcpy(syn2, f.m.synth, (size_t)B * f.l.synth_size * sizeof *syn2);
    mine_stats st2 = f.st;
    ck_assert_int_eq(par_set_threads(1), 0);
    f.rng = keep;
    fix_run(&f);
    ck_assert_int_eq(par_set_threads(2), 0);
    const char *name = enum_name_of(mine_strategy_names, (int)c.strategy);
    ck_assert_msg(!memcmp(mask2, f.mask, cells), "%s: masks differ", name);
    ck_assert_msg(!memcmp(S2, f.S, cells * sizeof *S2), "%s: synthetic columns differ", name);
    ck_assert_msg(!memcmp(syn2, f.m.synth, (size_t)B * f.l.synth_size * sizeof *syn2), "%s: recipes differ", name);
    ck_assert_msg(!memcmp(&st2, &f.st, sizeof st2), "%s: statistics differ", name);
    ck_assert_msg(f.st.same_id > 0 && f.st.negatives_per_query > 0, "%s: the case exercises nothing", name);
    free(S2);
    free(mask2);
    free(syn2);
    fix_close(&f);
  }
  ck_assert_int_eq(par_set_threads(1), 0);
}
END_TEST

START_TEST(adversarial_bank_ascends_its_infonce_loss) {
  enum { B = 6, M = 5, D = 8 };
  advbank_config bc;
  bc = config_defaults()->trainer.moco.advbank;
  bc.temperature = 0.2f;
  bc.lr = 0.05f;
  bc.weight_decay = 0.0f;
  rng_t r;
  rng_init(&r, 11, 1);
  advbank bank;
  ck_assert_int_eq(advbank_init(&bank, &bc, M, D, B, &r), 0);
  for (int m = 0; m < M; m++) ck_assert_float_eq_tol(vec_dot(bank.w + m * D, bank.w + m * D, D), 1.0f, 1e-5f);
  float q[B * D], s_pos[B], dS[B * M];
  for (int i = 0; i < B; i++) {
    random_unit(q + i * D, D, &r);
    s_pos[i] = 0.5f;
  }
  nce_ctx ctx = {q, bank.w, s_pos, B, M, D, bc.temperature};
  double before = nce(&ctx, dS);
  /* the gradient the bank ascends is the loss's gradient w.r.t. the bank vectors */
  ck_assert_int_eq(advbank_grad(&bank, dS, M, q, B), 0);
  /* Differences of the double formula (truncation by Richardson); the float gradient g = dSᵀ·Q sums B
   * terms of |dS|·|q| <= p/(τB) (dS rounded to float from double, q unit rows): at most (B + 2)·u/τ. */
  gc_spec spec = {.name = "advbank grad", .h = 1e-3, .atol = (B + 2) * 0x1p-24 / bc.temperature,
                  .rtol = 2 * 0x1p-24, .richardson = 1, .max_checks = 40};
  gc_assert(gc_check(nce_fn, &ctx, bank.w, bank.g, (size_t)M * D, &spec), "advbank grad");
  /* through a strided dS (the bank columns inside a wider matrix) the same */
  float wide[B * (M + 3)];
  for (int i = 0; i < B; i++) memcpy(wide + i * (M + 3) + 3, dS + i * M, M * sizeof(float));
  float g0[M * D];
  memcpy(g0, bank.g, sizeof g0);
  ck_assert_int_eq(advbank_grad(&bank, wide + 3, M + 3, q, B), 0);
  for (int k = 0; k < M * D; k++) ck_assert_float_eq_tol(bank.g[k], g0[k], 1e-6f);
  for (int step = 0; step < 5; step++) {
    nce(&ctx, dS);
    ck_assert_int_eq(advbank_update(&bank, dS, M, q, B), 0);
    double now = nce(&ctx, NULL);
    ck_assert_msg(now > before, "step %d: loss %g did not rise above %g", step, now, before);
    before = now;
  }
  for (int m = 0; m < M; m++) ck_assert_float_eq_tol(vec_dot(bank.w + m * D, bank.w + m * D, D), 1.0f, 1e-5f);
  /* save / load, and a bank of another size is refused */
  blob_writer w;
  blob_writer_init(&w);
  advbank_save(&bank, &w);
  advbank other;
  ck_assert_int_eq(advbank_init(&other, &bc, M, D, B, &r), 0);
  blob_reader br;
  blob_reader_init(&br, w.data, w.len, "bank.bin");
  ck_assert_int_eq(advbank_load(&other, &br), 0);
  ck_assert_mem_eq(other.w, bank.w, sizeof(float) * M * D);
  ck_assert_mem_eq(other.v, bank.v, sizeof(float) * M * D);
  advbank_free(&other);
  ck_assert_int_eq(advbank_init(&other, &bc, M + 1, D, B, &r), 0);
  blob_reader_init(&br, w.data, w.len, "bank.bin");
  ck_assert_int_eq(advbank_load(&other, &br), MOCO_ESHAPE);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "bank.bin"));
  /* seeding from keys takes distinct keys while they last */
  float keys[3 * D];
  for (int j = 0; j < 3; j++) random_unit(keys + j * D, D, &r);
  advbank_seed(&other, keys, 3, &r);
  for (int j = 0; j < 3; j++) {
    int found = 0;
    for (int m = 0; m < M + 1; m++) {
      float diff = 0;
      for (int k = 0; k < D; k++) diff = fmaxf(diff, fabsf(other.w[m * D + k] - keys[j * D + k]));
      found += diff < 1e-6f;
    }
    ck_assert_int_ge(found, 1);
  }
  advbank_free(&other);
  advbank_free(&bank);
  blob_writer_free(&w);
}
END_TEST

START_TEST(adversarial_strategy_uses_the_bank_columns) {
  mine_config c = cfg_of(MINE_ADVERSARIAL, 1);
  c.bank_size = 3;
  c.in_batch_negatives = 1;
  fix f;
  fix_open(&f, &c, 0, 2, 0); /* AdCo keeps no queue */
  ck_assert_int_eq(f.l.bank_off, 2);
  ck_assert_int_eq(f.l.cols, 5);
  f.in.queue_filled = 0;
  float row[5] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f};
  set_row(&f, 0, row, 5);
  fix_run(&f);
  ck_assert_str_eq(mask_str(&f, 0), ".nnnn");
  ck_assert_float_eq_tol(f.st.hardest_sim_max, 0.5f, 1e-6f);
  fix_close(&f);
}
END_TEST

/* ---- hardness: curriculum and controller ------------------------------------------------------ */

START_TEST(curriculum_values_at_chosen_progress) {
  hardness_config c;
  c = config_defaults()->trainer.moco.hardness;
  c.mode = HARDNESS_CURRICULUM;
  c.warmup = 0.2f;
  c.start = 0.2f;
  c.end = 1.0f;
  int warm;
  ck_assert_float_eq(hardness_curriculum(&c, 0.1, &warm), 0.0f);
  ck_assert_int_eq(warm, 1);
  ck_assert_float_eq_tol(hardness_curriculum(&c, 0.3, &warm), 0.3f, 1e-6f);
  ck_assert_int_eq(warm, 0);
  ck_assert_float_eq_tol(hardness_curriculum(&c, 0.6, &warm), 0.6f, 1e-6f); /* halfway */
  ck_assert_float_eq_tol(hardness_curriculum(&c, 1.0, &warm), 1.0f, 1e-6f);
  c.shape = HARDNESS_COSINE;
  ck_assert_float_eq_tol(hardness_curriculum(&c, 0.6, &warm), 0.6f, 1e-6f);
  /* a quarter of the way: 0.2 + 0.8 * (1 - cos(pi / 4)) / 2 */
  ck_assert_float_eq_tol(hardness_curriculum(&c, 0.4, &warm), 0.2f + 0.8f * 0.1464466f, 1e-5f);
  hardness_ctl h;
  hardness_init(&h, &c);
  ck_assert_float_eq_tol(hardness_at(&h, 0.4, &warm), 0.2f + 0.8f * 0.1464466f, 1e-5f);
  c.mode = HARDNESS_FIXED;
  c.value = 0.3f;
  hardness_init(&h, &c);
  ck_assert_float_eq(hardness_at(&h, 0.99, &warm), 0.3f);
  ck_assert_int_eq(warm, 0);
  int mode = -1;
  ck_assert_int_eq(enum_value_of(hardness_mode_names, "dynamic", &mode), 0);
  ck_assert_int_eq(mode, HARDNESS_DYNAMIC);
  ck_assert_int_eq(enum_value_of(hardness_mode_names, "adaptive", &mode), MOCO_ENOENT);
}
END_TEST

START_TEST(controller_moves_hardness_the_right_way_within_bounds) {
  hardness_config c;
  c = config_defaults()->trainer.moco.hardness;
  c.mode = HARDNESS_DYNAMIC;
  c.value = 0.5f;
  c.target = 0.6f;
  c.gain = 0.5f;
  c.max_step = 0.02f;
  c.min = 0.1f;
  c.max = 0.9f;
  c.warmup = 0.1f;
  hardness_ctl h;
  hardness_init(&h, &c);
  /* during the warm-up nothing moves */
  ck_assert_float_eq(hardness_observe(&h, 0.05, 1.0f), 0.5f);
  int warm;
  ck_assert_float_eq(hardness_at(&h, 0.05, &warm), 0.0f);
  ck_assert_int_eq(warm, 1);
  /* accuracy far above target: too easy, harder by at most max_step each time, capped at max */
  float prev = h.hardness;
  for (int i = 0; i < 100; i++) {
    float now = hardness_observe(&h, 0.5, 0.95f);
    ck_assert(now >= prev && now - prev <= c.max_step + 1e-6f && now <= c.max);
    prev = now;
  }
  ck_assert_float_eq_tol(h.hardness, 0.9f, 1e-6f);
  /* far below: easier, down to min */
  for (int i = 0; i < 200; i++) {
    float now = hardness_observe(&h, 0.5, 0.1f);
    ck_assert(now <= prev && prev - now <= c.max_step + 1e-6f && now >= c.min);
    prev = now;
  }
  ck_assert_float_eq_tol(h.hardness, 0.1f, 1e-6f);
  /* a small error moves proportionally: gain * (ema - target) */
  hardness_init(&h, &c);
  hardness_observe(&h, 0.5, 0.62f);
  ck_assert_float_eq_tol(h.hardness, 0.5f + 0.5f * 0.02f, 1e-6f);
  /* hardest-negative similarity below the target: too easy, harder */
  c.signal = HARDNESS_SIGNAL_HARDEST_SIM;
  hardness_init(&h, &c);
  ck_assert(hardness_observe(&h, 0.5, 0.2f) > 0.5f);
  hardness_init(&h, &c);
  ck_assert(hardness_observe(&h, 0.5, 0.99f) < 0.5f);
  /* state round trip */
  blob_writer w;
  blob_writer_init(&w);
  hardness_save(&h, &w);
  hardness_ctl g;
  hardness_init(&g, &c);
  blob_reader r;
  blob_reader_init(&r, w.data, w.len, "ctl.bin");
  ck_assert_int_eq(hardness_load(&g, &r), 0);
  ck_assert_float_eq(g.hardness, h.hardness);
  ck_assert_float_eq(g.signal_ema, h.signal_ema);
  ck_assert_int_eq(g.updates, h.updates);
  ck_assert_float_eq(hardness_at(&g, 0.7, NULL), h.hardness);
  blob_writer_free(&w);
}
END_TEST

Suite *mine_suite(void) {
  Suite *s = suite_create("mine");
  TCase *tc = tcase_create("core");
  tcase_set_timeout(tc, 30);
  tcase_add_test(tc, kselect_agrees_with_sorting_on_awkward_inputs);
  tcase_add_test(tc, all_uses_exactly_the_filled_queue_slots);
  tcase_add_test(tc, entries_with_the_querys_sample_id_are_never_negatives);
  tcase_add_test(tc, in_batch_negatives_skip_the_own_column_even_when_k_is_smaller_than_the_batch);
  tcase_add_test(tc, random_draws_n_distinct_valid_entries_uniformly);
  tcase_add_test(tc, random_is_uniform_on_sparse_rows_and_deterministic_per_rng);
  tcase_add_test(tc, hardest_takes_the_n_most_similar_with_ties_to_the_lower_column);
  tcase_add_test(tc, hardest_and_band_match_a_full_sort_on_long_rows);
  tcase_add_test(tc, hardest_is_exact_when_the_sample_misleads);
  tcase_add_test(tc, guards_and_rank_windows_match_a_reference_on_long_rows);
  tcase_add_test(tc, hardest_ranks_queue_and_in_batch_columns_together);
  tcase_add_test(tc, semi_hard_top_up_is_exact_on_long_rows);
  tcase_add_test(tc, band_selects_its_rank_window_and_follows_hardness);
  tcase_add_test(tc, semi_hard_samples_the_band_then_tops_up_from_below);
  tcase_add_test(tc, hardness_sets_n_geometrically_between_easy_and_hard);
  tcase_add_test(tc, ceilings_drop_or_promote_suspects);
  tcase_add_test(tc, skip_hardest_sets_aside_the_top_epsilon);
  tcase_add_test(tc, every_candidate_filtered_leaves_no_negatives);
  tcase_add_test(tc, supervised_mode_and_label_diagnostics);
  tcase_add_test(tc, bad_inputs_are_refused_with_context);
  tcase_add_test(tc, mixing_builds_unit_convex_mixes_of_the_hard_pool);
  tcase_add_test(tc, mixing_under_a_ceiling_pools_only_what_the_guard_leaves);
  tcase_add_test(tc, mixing_pool_is_exact_on_long_rows);
  tcase_add_test(tc, selection_does_not_depend_on_the_thread_count);
  tcase_add_test(tc, adversarial_bank_ascends_its_infonce_loss);
  tcase_add_test(tc, adversarial_strategy_uses_the_bank_columns);
  tcase_add_test(tc, curriculum_values_at_chosen_progress);
  tcase_add_test(tc, controller_moves_hardness_the_right_way_within_bounds);
  suite_add_tcase(s, tc);
  return s;
}
