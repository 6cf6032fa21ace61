/* The compute team: every part runs once, whatever the team size; concurrent runs stay correct. */
#include <check.h>
#include <pthread.h>

#include "core/err.h"
#include "core/par.h"

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

Suite *par_suite(void) {
  Suite *s = suite_create("par");
  TCase *tc = tcase_create("par");
  tcase_add_test(tc, par_run_does_every_part_once);
  tcase_add_test(tc, concurrent_runs_each_do_their_own_parts);
  tcase_add_test(tc, par_set_threads_rejects_out_of_range);
  tcase_add_test(tc, par_range_and_parts_cover_the_items);
  suite_add_tcase(s, tc);
  return s;
}
