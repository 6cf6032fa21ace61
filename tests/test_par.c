/* The compute team: every part runs once, whatever the team size; concurrent runs stay correct. */
#include <check.h>
#include <pthread.h>

#include <math.h>
#include <stdlib.h>

#include "core/err.h"
#include "core/par.h"
#include "core/rng.h"
#include "core/tensor.h"

enum { MAX_PARTS = 40 };

typedef struct {
  int runs[MAX_PARTS];
  int parts_seen[MAX_PARTS];
} tally;

/* Each part writes only its own slots. */
static void count_part(void *ctx, int part, int parts) {
  tally *t = ctx;
  t->runs[part]++;
  t->parts_seen[part] = parts;
}

static void run_and_check(int parts) {
  tally t = {0};
  par_run(parts, count_part, &t);
  for (int p = 0; p < MAX_PARTS; p++) {
    ck_assert_int_eq(t.runs[p], p < parts);
    if (p < parts) ck_assert_int_eq(t.parts_seen[p], parts);
  }
}

START_TEST(par_run_does_every_part_once) {
  for (int threads = 1; threads <= 4; threads++) {
    ck_assert_int_eq(par_set_threads(threads), 0);
    ck_assert_int_eq(par_threads(), threads);
    for (int parts = 1; parts <= MAX_PARTS; parts += 3)
      for (int rep = 0; rep < 20; rep++) run_and_check(parts);
  }
  ck_assert_int_eq(par_set_threads(1), 0);
}
END_TEST

static void *runner(void *arg) {
  (void)arg;
  for (int rep = 0; rep < 200; rep++) run_and_check(7);
  return NULL;
}

/* A run started while another is in progress does its parts alone, never someone else's. */
START_TEST(concurrent_runs_each_do_their_own_parts) {
  ck_assert_int_eq(par_set_threads(3), 0);
  pthread_t a, b;
  ck_assert_int_eq(pthread_create(&a, NULL, runner, NULL), 0);
  ck_assert_int_eq(pthread_create(&b, NULL, runner, NULL), 0);
  pthread_join(a, NULL);
  pthread_join(b, NULL);
  ck_assert_int_eq(par_set_threads(1), 0);
}
END_TEST

START_TEST(par_set_threads_rejects_out_of_range) {
  ck_assert_int_eq(par_set_threads(0), MOCO_ERANGE);
  ck_assert_int_eq(par_set_threads(PAR_MAX_THREADS + 1), MOCO_ERANGE);
  ck_assert_int_eq(par_threads(), 1);
}
END_TEST

START_TEST(par_range_and_parts_cover_the_items) {
  for (long n = 0; n < 50; n++)
    for (int parts = 1; parts <= 9; parts++) {
      long next = 0;
      for (int p = 0; p < parts; p++) {
        long lo, hi;
        par_range(n, p, parts, &lo, &hi);
        ck_assert_int_eq(lo, next);
        ck_assert(hi >= lo && hi - lo <= n / parts + 1);
        next = hi;
      }
      ck_assert_int_eq(next, n);
    }
  ck_assert_int_eq(par_set_threads(4), 0);
  ck_assert_int_eq(par_parts(1000, 100), 4);
  ck_assert_int_eq(par_parts(250, 100), 2);
  ck_assert_int_eq(par_parts(50, 100), 1);
  ck_assert_int_eq(par_set_threads(1), 0);
  ck_assert_int_eq(par_parts(1000, 100), 1);
}
END_TEST

/* C = 0.5 op(A) op(B) + 0.5 C on a team of two, split by rows (M >= N) and by columns, every
 * transpose, against a double-precision loop. Sizes give two parts of GEMM_MIN_PART or more. */
static void check_split_product(int M, int N, int K, rng_t *r) {
  float *A = malloc(sizeof(float) * M * K), *B = malloc(sizeof(float) * K * N);
  float *C = malloc(sizeof(float) * M * N), *C0 = malloc(sizeof(float) * M * N);
  for (int i = 0; i < M * K; i++) A[i] = rng_normal(r);
  for (int i = 0; i < K * N; i++) B[i] = rng_normal(r);
  for (int i = 0; i < M * N; i++) C0[i] = rng_normal(r);
  for (int ta = 0; ta < 2; ta++)
    for (int tb = 0; tb < 2; tb++) {
      for (int i = 0; i < M * N; i++) C[i] = C0[i];
      mat_mul(C, A, B, M, N, K, ta, tb, 0.5f, 0.5f);
      for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
          double s = 0.0;
          for (int k = 0; k < K; k++)
            s += (double)(ta ? A[k * M + i] : A[i * K + k]) * (tb ? B[j * K + k] : B[k * N + j]);
          double want = 0.5 * s + 0.5 * C0[i * N + j];
          ck_assert_msg(fabs(C[i * N + j] - want) < 1e-3, "%dx%dx%d ta %d tb %d at (%d, %d)", M, N, K,
                        ta, tb, i, j);
        }
    }
  free(A), free(B), free(C), free(C0);
}

START_TEST(mat_mul_split_across_threads_matches_naive) {
  rng_t r;
  rng_init(&r, 4, 1);
  ck_assert_int_eq(par_set_threads(2), 0);
  check_split_product(301, 100, 150, &r);
  check_split_product(50, 403, 220, &r);
  ck_assert_int_eq(par_set_threads(1), 0);
}
END_TEST

Suite *par_suite(void) {
  Suite *s = suite_create("par");
  TCase *tc = tcase_create("par");
  tcase_add_test(tc, par_run_does_every_part_once);
  tcase_add_test(tc, concurrent_runs_each_do_their_own_parts);
  tcase_add_test(tc, par_set_threads_rejects_out_of_range);
  tcase_add_test(tc, par_range_and_parts_cover_the_items);
  tcase_add_test(tc, mat_mul_split_across_threads_matches_naive);
  suite_add_tcase(s, tc);
  return s;
}
