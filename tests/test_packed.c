/* Packed rows: the capacity rule, gathering a selection's used columns in order (word-skipping and
 * tail included), the refusal of a row over capacity, and the gathered gradient against the dense sum,
 * with one thread and two. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "contrast/mine.h"
#include "contrast/packed.h"
#include "core/err.h"
#include "core/par.h"
#include "testutil.h"

START_TEST(capacity_packs_small_rows_whole_and_large_ones_to_a_sixteenth) {
  ck_assert_int_eq(packed_cap_for(100), 100);
  ck_assert_int_eq(packed_cap_for(256), 256);
  ck_assert_int_eq(packed_cap_for(4096), 256);
  ck_assert_int_eq(packed_cap_for(65536), 4096);
  ck_assert_int_eq(packed_cap_for(65536 + 256 + 8), 4128); /* 65800 / 16 = 4112.5, rounded up to 16 */
}
END_TEST

enum { C = 70 }; /* two 32-byte words and a tail of 6 */

/* Row 0: columns 1, 33 (NEG), 40 (POS), 69 (NEG, in the tail); row 1: nothing; row 2: 17 columns. */
static void selection(float *S, uint8_t *mask) {
  for (int i = 0; i < 3 * C; i++) S[i] = 0.01f * (float)i;
  memset(mask, MINE_OFF, 3 * C);
  mask[1] = mask[33] = mask[69] = MINE_NEG;
  mask[40] = MINE_POS;
  for (int j = 0; j < 17; j++) mask[2 * C + 4 * j] = MINE_NEG;
}

START_TEST(gather_keeps_column_order_and_pads_to_the_widest_row) {
  float S[3 * C];
  uint8_t mask[3 * C];
  selection(S, mask);
  packed p;
  ck_assert_int_eq(packed_init(&p, 5, 64), 0);
  packed_rows pr;
  ck_assert_int_eq(packed_gather(&p, S, mask, 2, 3, C, &pr), 0);
  ck_assert_int_eq(pr.R, 3);
  ck_assert_int_eq(pr.W, 32); /* 17 used, rounded up to PACKED_ALIGN */
  ck_assert_ptr_eq(pr.S, p.S + 2 * 64);
  ck_assert_int_eq(pr.used[0], 4);
  ck_assert_int_eq(pr.used[1], 0);
  ck_assert_int_eq(pr.used[2], 17);
  const int cols[4] = {1, 33, 40, 69};
  for (int j = 0; j < 4; j++) {
    ck_assert_int_eq(pr.col[j], cols[j]);
    ck_assert_float_eq(pr.S[j], S[cols[j]]);
    ck_assert_int_eq(pr.mask[j], mask[cols[j]]);
  }
  for (int j = 0; j < 17; j++) ck_assert_int_eq(pr.col[2 * pr.W + j], 4 * j);
  for (int i = 0; i < 3; i++)
    for (int j = pr.used[i]; j < pr.W; j++) {
      ck_assert_int_eq(pr.mask[i * pr.W + j], MINE_OFF);
      ck_assert_float_eq(pr.S[i * pr.W + j], 0.0f);
      ck_assert_int_eq(pr.col[i * pr.W + j], -1);
    }
  packed_free(&p);
}
END_TEST

START_TEST(gather_refuses_a_row_over_capacity) {
  float S[3 * C];
  uint8_t mask[3 * C];
  selection(S, mask);
  packed p;
  ck_assert_int_eq(packed_init(&p, 3, 16), 0);
  packed_rows pr;
  ck_assert_int_eq(packed_gather(&p, S, mask, 0, 2, C, &pr), 0); /* rows 0 and 1 fit */
  ck_assert_int_eq(pr.W, 16);
  ck_assert_int_eq(packed_gather(&p, S, mask, 0, 3, C, &pr), MOCO_ERANGE);
  ck_assert_int_eq(packed_gather(&p, S, mask, 1, 3, C, &pr), MOCO_EINVAL); /* past the storage */
  packed_free(&p);
  ck_assert_int_eq(packed_init(&p, 0, 16), MOCO_EINVAL);
}
END_TEST

enum { R = 40, K = 300, B = 40, D = 20, CC = K + B, N = 12 };

/* dq from packed rows equals Σ_c dS[i, c]·key(c) over the dense row, queue and in-batch columns. */
static void check_dq(int threads, float *dq) {
  float *S = calloc(R * CC, sizeof *S), *dS = calloc(R * CC, sizeof *dS);
  float *qk = malloc(K * D * sizeof *qk), *bk = malloc(B * D * sizeof *bk);
  float *want = calloc(R * D, sizeof *want);
  uint8_t *mask = calloc(R * CC, 1);
  rng_t r;
  rng_init(&r, 3, 7);
  fill_uniform(qk, K * D, &r, -1, 1);
  fill_uniform(bk, B * D, &r, -1, 1);
  for (int i = 0; i < R; i++)
    for (int n = 0; n < N; n++) {
      int c = (int)(rng_u32(&r) % CC);
      mask[i * CC + c] = MINE_NEG;
      S[i * CC + c] = rng_normal(&r);
    }
  packed p;
  ck_assert_int_eq(packed_init(&p, R, packed_cap_for(CC)), 0);
  packed_rows pr;
  ck_assert_int_eq(packed_gather(&p, S, mask, 0, R, CC, &pr), 0);
  for (int i = 0; i < R; i++)
    for (int j = 0; j < pr.used[i]; j++) { /* a gradient with a zero among the used entries */
      float g = j == 0 ? 0.0f : pr.S[i * pr.W + j];
      pr.dS[i * pr.W + j] = g;
      dS[i * CC + pr.col[i * pr.W + j]] = g;
    }
  ck_assert_int_eq(par_set_threads(threads), 0);
  packed_dq(&pr, 0.5f, qk, K, bk, K, D, dq);
  ck_assert_int_eq(par_set_threads(1), 0);
  for (int i = 0; i < R; i++)
    for (int c = 0; c < CC; c++) {
      const float *key = c < K ? qk + c * D : bk + (c - K) * D;
      for (int t = 0; t < D; t++) want[i * D + t] += 0.5f * dS[i * CC + c] * key[t];
    }
  for (int i = 0; i < R * D; i++) ck_assert_float_eq_tol(dq[i], want[i], 1e-5f);
  packed_free(&p);
  free(S), free(dS), free(qk), free(bk), free(want), free(mask);
}

START_TEST(gradient_sums_the_used_keys_alike_on_one_and_two_threads) {
  float *one = calloc(R * D, sizeof *one), *two = calloc(R * D, sizeof *two);
  check_dq(1, one);
  check_dq(2, two);
  ck_assert_mem_eq(one, two, R * D * sizeof *one);
  free(one), free(two);
}
END_TEST

Suite *packed_suite(void) {
  Suite *s = suite_create("packed");
  TCase *tc = tcase_create("core");
  tcase_add_test(tc, capacity_packs_small_rows_whole_and_large_ones_to_a_sixteenth);
  tcase_add_test(tc, gather_keeps_column_order_and_pads_to_the_widest_row);
  tcase_add_test(tc, gather_refuses_a_row_over_capacity);
  tcase_add_test(tc, gradient_sums_the_used_keys_alike_on_one_and_two_threads);
  suite_add_tcase(s, tc);
  return s;
}
