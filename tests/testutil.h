/* Helpers shared by the test suites and benchmarks. */
#ifndef MOCO_TESTS_TESTUTIL_H
#define MOCO_TESTS_TESTUTIL_H

#include <stddef.h>

#include "core/clock.h"
#include "core/net.h"
#include "core/rng.h"

/* Loss as a function of whatever the test perturbs; evaluated in double where the test can. */
typedef double (*gc_loss_fn)(void *ctx);

/* Central finite differences on up to max_checks entries of x (spread over the whole vector), compared
 * with the analytic gradient `grad` (computed beforehand at the unperturbed x). Returns the largest
 * error |a - f| / max(|a| + |f|, floor) over the entries checked; x is restored. Prints the worst entry
 * when verbose is set in the environment (MOCOD_GC_VERBOSE=1). */
double gradcheck(gc_loss_fn f, void *ctx, float *x, const float *grad, size_t n, float h,
                 size_t max_checks, double floor);

/* Fills x with U(lo, hi). */
void fill_uniform(float *x, size_t n, rng_t *r, float lo, float hi);

/* Directory for test files, created fresh per call ("/tmp/mocod-test-XXXXXX"); removed by rm_rf. */
char *test_tmpdir(void);
void rm_rf(const char *path);

/* Path of a file in the repository's data/ directory (static buffer). */
const char *data_path(const char *name);

/* Path of a program the Makefile built: $MOCOD_BIN/name (build/bin when unset); static buffer. */
const char *bin_path(const char *name);

/* Runs `cmd` through the shell with stdout and stderr captured into out (NUL-terminated, cut to n - 1
 * bytes); returns its exit status, or -1 when it could not run or was killed. */
int run_capture(const char *cmd, char *out, size_t n);

/* Benchmark helpers. */

/* The median of t[0..n) (sorts t in place). */
double median_of(double *t, int n);

/* The smallest of t[0..n): a timing taken when the shared machine was quietest. */
double best_of(const double *t, int n);

/* GFLOP/s of an n x n x n sgemm through mat_mul, the median of `reps` timed runs after one untimed:
 * the machine's practical peak, against which a step's GFLOP/s is read. */
double sgemm_gflops(int n, int reps);

/* Matrix-product FLOPs per sample of one training pass as the network performs it: forward F,
 * weight gradients F and input gradients F less the first parameter layer's (nothing needs the
 * gradient of the input images, so net_backward skips it), i.e. 3F - F_first. */
double net_train_flops(const net *n);

/* A "Field:   N kB" value of /proc/self/status (VmRSS:, VmHWM:, ...) in kB, -1 when absent. */
long proc_status_kb(const char *field);

#endif
