/* One runner for every suite: the Makefile lists tests/test_*.c into suites.inc. Run a single suite
 * with CK_RUN_SUITE=name, a single test with CK_RUN_CASE=name (Check's own variables).
 *
 * MOCOD_TEST_JOBS=N runs the suites in N worker processes at once (`make test` sets it): most of the
 * suite time is spent waiting on daemons, mpirun and child programs, and every test works in its own
 * directory on its own socket, so suites do not interfere. Each worker takes the next suite from a
 * shared queue; its output is held in a file and printed whole, in the order suites finish, so the
 * lines of two suites never interleave. Check's log files (CK_XML_LOG_FILE_NAME and the like) would be
 * overwritten by each worker's runner, so with one of them set the suites run in this process. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

#define SUITE(name) Suite *name##_suite(void);
#include "suites.inc"
#undef SUITE

static Suite *(*const suite_make[])(void) = {
#define SUITE(name) name##_suite,
#include "suites.inc"
#undef SUITE
};
static const char *const suite_name[] = {
#define SUITE(name) #name,
#include "suites.inc"
#undef SUITE
};
enum { N_SUITES = sizeof suite_make / sizeof suite_make[0] };

/* What a worker reports per suite: small enough that one write() is atomic on a pipe. */
typedef struct {
  int suite, run, failed;
} suite_result;

static int run_serial(void) {
  SRunner *sr = srunner_create(NULL);
  for (int i = 0; i < N_SUITES; i++) srunner_add_suite(sr, suite_make[i]());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed;
}

static void out_path(char *buf, size_t len, const char *dir, int suite) {
  snprintf(buf, len, "%s/%s.out", dir, suite_name[suite]);
}

/* A worker: suites from the queue until it is empty, each with stdout and stderr in its own file. */
static void worker(int queue, int results, const char *dir) {
  int suite;
  while (read(queue, &suite, sizeof suite) == (ssize_t)sizeof suite) {
    char path[512];
    out_path(path, sizeof path, dir, suite);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0) _exit(2);
    close(fd);
    SRunner *sr = srunner_create(suite_make[suite]());
    srunner_run_all(sr, CK_NORMAL);
    fflush(stdout);
    suite_result r = {suite, srunner_ntests_run(sr), srunner_ntests_failed(sr)};
    srunner_free(sr);
    if (write(results, &r, sizeof r) != (ssize_t)sizeof r) _exit(2);
  }
}

static void print_file(const char *path) {
  FILE *f = fopen(path, "r");
  if (!f) return;
  char buf[8192];
  size_t k;
  while ((k = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, k, stdout);
  fclose(f);
  fflush(stdout);
}

/* Returns the number of failed tests; a suite whose worker died before reporting counts as one. */
static int run_parallel(int jobs) {
  char dir[96];
  snprintf(dir, sizeof dir, "%s", test_tmpdir()); /* removed by test_reaper_sweep */
  int queue[2], results[2];
  if (!dir[0] || pipe2(queue, O_CLOEXEC) || pipe2(results, O_CLOEXEC)) {
    perror("runner: setting up the workers");
    return 1;
  }
  for (int i = 0; i < N_SUITES; i++) /* 34 ints: far below the pipe's capacity */
    if (write(queue[1], &i, sizeof i) != (ssize_t)sizeof i) return perror("runner: queue"), 1;
  close(queue[1]);
  fflush(stdout);
  for (int j = 0; j < jobs; j++) {
    pid_t pid = fork();
    if (pid < 0) return perror("runner: fork"), 1;
    if (pid == 0) {
      close(results[0]);
      worker(queue[0], results[1], dir);
      exit(0);
    }
  }
  close(queue[0]);
  close(results[1]);
  int run = 0, failed = 0, done[N_SUITES] = {0};
  suite_result r;
  ssize_t k;
  while ((k = read(results[0], &r, sizeof r)) == (ssize_t)sizeof r || (k < 0 && errno == EINTR)) {
    if (k < 0) continue;
    char path[512];
    out_path(path, sizeof path, dir, r.suite);
    print_file(path);
    done[r.suite] = 1;
    run += r.run;
    failed += r.failed;
  }
  close(results[0]);
  while (wait(NULL) > 0 || errno == EINTR) {
  }
  for (int i = 0; i < N_SUITES; i++)
    if (!done[i]) {
      char path[512];
      out_path(path, sizeof path, dir, i);
      printf("runner: suite %s did not finish (its worker died); its output:\n", suite_name[i]);
      print_file(path);
      failed++;
    }
  printf("%d suites in %d workers: Checks: %d, Failed: %d\n", N_SUITES, jobs, run, failed);
  return failed;
}

static int jobs_wanted(void) {
  const char *j = getenv("MOCOD_TEST_JOBS"), *suite = getenv("CK_RUN_SUITE");
  static const char *const logs[] = {"CK_XML_LOG_FILE_NAME", "CK_LOG_FILE_NAME", "CK_TAP_LOG_FILE_NAME"};
  if (!j || (suite && *suite)) return 1;
  for (size_t i = 0; i < sizeof logs / sizeof logs[0]; i++)
    if (getenv(logs[i])) return 1;
  int n = atoi(j);
  return n < 1 ? 1 : n > N_SUITES ? N_SUITES : n;
}

int main(void) {
  /* Every process a test starts carries the run's id in its environment, so that whatever a failed or
   * timed-out test left running can be found and killed after the last test (testutil.h). */
  char run[32];
  snprintf(run, sizeof run, "%d", (int)getpid());
  setenv("MOCOD_TEST_RUN", run, 1);
  int jobs = jobs_wanted();
  int failed = jobs > 1 ? run_parallel(jobs) : run_serial();
  test_reaper_sweep(); /* only here, once every worker is done: it kills whatever carries the run's id */
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
