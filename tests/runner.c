/* One runner for every suite: the Makefile lists tests/test_*.c into suites.inc. Run a single suite
 * with CK_RUN_SUITE=name, a single test with CK_RUN_CASE=name (Check's own variables). */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "testutil.h"

#define SUITE(name) Suite *name##_suite(void);
#include "suites.inc"
#undef SUITE

int main(void) {
  /* Every process a test starts carries the run's id in its environment, so that whatever a failed or
   * timed-out test left running can be found and killed after the last test (testutil.h). */
  char run[32];
  snprintf(run, sizeof run, "%d", (int)getpid());
  setenv("MOCOD_TEST_RUN", run, 1);
  SRunner *sr = srunner_create(NULL);
#define SUITE(name) srunner_add_suite(sr, name##_suite());
#include "suites.inc"
#undef SUITE
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  test_reaper_sweep();
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
