/* Instance retrieval and the multi-protocol kNN: a perfect encoder finds every original, a constant
 * one scores k / n (ties at their expected value), a hand-built ranking gives the recall by hand, bad
 * targets are refused; several kNN protocols voted in one pass agree with separate eval_knn calls. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/rng.h"
#include "testutil.h"
#include "train/eval.h"
#include "service/config.h"

#define NEAR(a, b, tol) \
  ck_assert_msg(fabs((double)(a) - (double)(b)) < (tol), "%.9g vs %.9g", (double)(a), (double)(b))

static const int ks[2] = {1, 10};

START_TEST(retrieval_perfect_encoder_finds_every_original) {
  /* The query is its original plus noise far below the distance between gallery rows, scaled: a
   * cosine that ignores the scale must find the original first. 600 queries: three blocks of 256. */
  enum { N = 1000, M = 600, D = 32 };
  rng_t r;
  rng_init(&r, 7, 1);
  float *gallery = malloc(sizeof(float) * N * D), *query = malloc(sizeof(float) * M * D);
  int64_t target[M];
  fill_uniform(gallery, (size_t)N * D, &r, -1.0f, 1.0f);
  for (int i = 0; i < M; i++) {
    target[i] = (int64_t)rng_below(&r, N);
    for (int j = 0; j < D; j++)
      query[i * D + j] = 3.0f * (gallery[target[i] * D + j] + 1e-3f * (rng_uniform(&r) - 0.5f));
  }
  double recall[2];
  ck_assert_int_eq(eval_retrieval(query, target, M, gallery, N, D, ks, 2, recall), 0);
  NEAR(recall[0], 1.0, 1e-12);
  NEAR(recall[1], 1.0, 1e-12);
  free(gallery);
  free(query);
}
END_TEST

START_TEST(retrieval_constant_encoder_scores_chance) {
  /* Everything maps to one point: every gallery row ties with the match, so recall@k is k / N. */
  enum { N = 500, M = 300, D = 8 };
  float *gallery = malloc(sizeof(float) * N * D), *query = malloc(sizeof(float) * M * D);
  int64_t target[M];
  for (int i = 0; i < N * D; i++) gallery[i] = 0.25f;
  for (int i = 0; i < M * D; i++) query[i] = 0.25f;
  for (int i = 0; i < M; i++) target[i] = (i * 7) % N;
  double recall[2];
  ck_assert_int_eq(eval_retrieval(query, target, M, gallery, N, D, ks, 2, recall), 0);
  NEAR(recall[0], 1.0 / N, 1e-9);
  NEAR(recall[1], 10.0 / N, 1e-9);
  free(gallery);
  free(query);
}
END_TEST

START_TEST(retrieval_ranks_by_hand) {
  /* Gallery on the unit circle at angles 0, 10, 20, ..., 350 degrees (36 rows). Query 0 sits at 2
   * degrees, matched to the row at 20 degrees (18 away): the rows at 0, 10 and 350 degrees are nearer,
   * so its rank is 4. Query 1 sits exactly on row 5 (50 degrees), its match: rank 1. Query 2 at 180
   * degrees is matched to row 0 (0 degrees), the farthest row: rank 36. */
  enum { N = 36, D = 2 };
  float gallery[N * D];
  for (int i = 0; i < N; i++) {
    double a = i * 10.0 * M_PI / 180.0;
    gallery[2 * i] = (float)cos(a), gallery[2 * i + 1] = (float)sin(a);
  }
  double a0 = 2.0 * M_PI / 180.0;
  float query[3 * D] = {(float)cos(a0), (float)sin(a0), gallery[10], gallery[11], -1.0f, 0.0f};
  int64_t target[3] = {2, 5, 0};
  const int kk[3] = {1, 3, 4};
  double recall[3];
  ck_assert_int_eq(eval_retrieval(query, target, 3, gallery, N, D, kk, 3, recall), 0);
  NEAR(recall[0], 1.0 / 3, 1e-12); /* k 1: query 1 only */
  NEAR(recall[1], 1.0 / 3, 1e-12); /* k 3: query 0 is 4th */
  NEAR(recall[2], 2.0 / 3, 1e-12); /* k 4: queries 0 and 1 */
}
END_TEST

START_TEST(retrieval_refuses_bad_input) {
  float g[4] = {1, 0, 0, 1}, q[2] = {1, 0}, nan_q[2] = {NAN, 0};
  int64_t bad = 2, ok = 0;
  double recall[2];
  ck_assert_int_eq(eval_retrieval(q, &bad, 1, g, 2, 2, ks, 2, recall), MOCO_ERANGE);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "target[0] 2"));
  ck_assert_int_eq(eval_retrieval(nan_q, &ok, 1, g, 2, 2, ks, 2, recall), MOCO_ERANGE);
  const int zero[1] = {0};
  ck_assert_int_eq(eval_retrieval(q, &ok, 1, g, 2, 2, zero, 1, recall), MOCO_EINVAL);
}
END_TEST

START_TEST(knn_protocols_agree_with_separate_calls) {
  /* Random clustered data: two protocols in one pass give the accuracies, per-class figures and
   * predictions of two eval_knn calls. */
  enum { NTR = 3000, NTE = 300, D = 12, C = 5 };
  rng_t r;
  rng_init(&r, 11, 3);
  float *train = malloc(sizeof(float) * NTR * D), *test = malloc(sizeof(float) * NTE * D), centre[C * D];
  int32_t *ytr = malloc(sizeof(int32_t) * NTR), yte[NTE];
  fill_uniform(centre, C * D, &r, -1.0f, 1.0f);
  for (int i = 0; i < NTR + NTE; i++) {
    int y = (int)rng_below(&r, C);
    float *x = i < NTR ? train + (size_t)i * D : test + (size_t)(i - NTR) * D;
    for (int j = 0; j < D; j++) x[j] = centre[y * D + j] + 0.8f * (rng_uniform(&r) - 0.5f);
    if (i < NTR)
      ytr[i] = y;
    else
      yte[i - NTR] = y;
  }
  /* the monitor's two protocols as configured (k 200 T 0.1, k 20 T 0.07) */
  eval_knn_config c[2] = {config_defaults()->trainer.knn, config_defaults()->trainer.knn_small};
  double per[2][C], per_one[C], acc_one;
  int32_t pred[2][NTE], pred_one[NTE];
  eval_knn_out out[2] = {{.class_acc = per[0], .pred = pred[0]}, {.class_acc = per[1], .pred = pred[1]}};
  ck_assert_int_eq(eval_knn_protocols(c, 2, train, ytr, NTR, test, yte, NTE, D, C, out), 0);
  for (int p = 0; p < 2; p++) {
    ck_assert_int_eq(eval_knn(&c[p], train, ytr, NTR, test, yte, NTE, D, C, &acc_one, per_one, pred_one), 0);
    NEAR(out[p].accuracy, acc_one, 1e-12);
    for (int y = 0; y < C; y++) NEAR(per[p][y], per_one[y], 1e-12);
    ck_assert_int_eq(memcmp(pred[p], pred_one, sizeof pred_one), 0);
  }
  free(train);
  free(test);
  free(ytr);
}
END_TEST

Suite *retrieval_suite(void) {
  Suite *s = suite_create("retrieval");
  TCase *tr = tcase_create("retrieval");
  tcase_add_test(tr, retrieval_perfect_encoder_finds_every_original);
  tcase_add_test(tr, retrieval_constant_encoder_scores_chance);
  tcase_add_test(tr, retrieval_ranks_by_hand);
  tcase_add_test(tr, retrieval_refuses_bad_input);
  suite_add_tcase(s, tr);
  TCase *tk = tcase_create("knn_protocols");
  tcase_add_test(tk, knn_protocols_agree_with_separate_calls);
  suite_add_tcase(s, tk);
  return s;
}
