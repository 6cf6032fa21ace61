/* Helpers shared by the test suites and benchmarks. */
#ifndef MOCO_TESTS_TESTUTIL_H
#define MOCO_TESTS_TESTUTIL_H

#include <stddef.h>
#include <stdint.h>

#include "core/clock.h"
#include "core/net.h"
#include "core/rng.h"

/* ---- gradient checks --------------------------------------------------------------------------------
 *
 * One protocol for every finite-difference check in tests/. Coordinate i passes when
 *
 *     |a_i - f_i| <= atol + rtol·|f_i|
 *
 * a_i the analytic gradient (float, computed by the code under test), f_i the central difference
 * (L(x⁺) - L(x⁻)) / (x_i⁺ - x_i⁻), x_i± = x_i ± h rounded to float, taken in double on whatever L the
 * test supplies. Dividing by the step the float coordinate really took removes the step's own
 * rounding (u·|x_i|/h relative) from the error.
 *
 * Where the error comes from (u = 2^-24 ≈ 6e-8, float's unit roundoff):
 *   - truncation of the central difference: h²/6·M3, M3 a bound on the third derivative along e_i
 *     (0 for a function linear in x_i, as a layer's loss is in its weights). Where no bound is at hand,
 *     the check estimates it per coordinate (gc_spec.richardson): D(h) = L' + h²L'''/6 + O(h^4) and
 *     D(2h) = L' + 4h²L'''/6 + O(h^4), so |D(2h) - D(h)| is three times D(h)'s truncation, and it is
 *     added to that coordinate's tolerance (it does not depend on the analytic gradient, so a wrong
 *     gradient still fails; near a kink it grows, as the difference there is no derivative);
 *   - rounding in L: when L is evaluated in float, each evaluation carries an absolute error δ and the
 *     difference divides it by h: (|δ⁺| + |δ⁻|)/(2h) ≤ δ/h, with δ = c·u·S, S the magnitudes the
 *     evaluation accumulates and c the roundings a term goes through. Where the test evaluates L in
 *     double (a double reference of the same function), δ ≈ 1e-16·S and this term vanishes;
 *   - rounding in a: the analytic gradient is float arithmetic too: relative error c·u per entry, and
 *     an absolute error c·u·gmax from the sums that build it (gmax its largest entry).
 * atol collects the absolute terms (gc_atol composes them), rtol the relative one. Each test states
 * its c, S and M3 where it sets them; no tolerance is fitted to a machine. */

/* Loss as a function of whatever the test perturbs; evaluated in double where the test can. */
typedef double (*gc_loss_fn)(void *ctx);

typedef struct {
  const char *name;  /* printed with the margin when MOCOD_GC_VERBOSE=1 */
  double h;          /* central-difference step */
  double atol, rtol;
  int richardson;    /* add |D(2h) - D(h)| to each coordinate's tolerance (see above) */
  size_t max_checks; /* coordinates checked, spread over x; the largest |a_i| is always among them */
  /* Optional: an id of the piece of a piecewise-smooth loss the last evaluation fell in (ReLU signs,
   * max-pool winners). A coordinate whose steps leave the piece of x is skipped: a difference across
   * a kink is no derivative. */
  uint64_t (*regime)(void *ctx);
} gc_spec;

typedef struct {
  double ratio;       /* worst |a_i - f_i| / tol_i over the coordinates checked: passes below 1 */
  size_t worst_i;     /* where, with a, f and tol there */
  double a, f, tol;
  size_t checked, skipped;
  double plant_ratio; /* |1.01·a_k - f_k| / tol_k at the largest |a_k|: a 1% error planted in that
                       * entry is reported when this is >= 1; among coordinates not skipped */
} gc_result;

/* Runs the check; x is restored. Prints name, ratio and planted ratio when MOCOD_GC_VERBOSE=1. */
gc_result gc_check(gc_loss_fn f, void *ctx, float *x, const float *grad, size_t n, const gc_spec *s);

/* atol = c_eval·u·scale/h + h²/6·m3 + c_grad·u·gmax: one float evaluation's rounding over the step,
 * the truncation bound and the analytic gradient's summation error (see above). */
double gc_atol(double h, double c_eval, double scale, double m3, double c_grad, double gmax);

/* Largest |g_i| over g[0..n). */
double gc_max_abs(const float *g, size_t n);

/* Check assertions: the result passed, and a 1% error planted in the largest entry would not have. */
#define gc_assert(res, what)                                                                       \
  do {                                                                                             \
    gc_result r_ = (res);                                                                          \
    ck_assert_msg(r_.ratio < 1.0, "%s: |a-f| %.3g > tol %.3g at %zu (a %.7g, f %.7g)", (what),      \
                  r_.ratio * r_.tol, r_.tol, r_.worst_i, r_.a, r_.f);                              \
    ck_assert_msg(r_.plant_ratio >= 1.0, "%s: a 1%% error would pass (ratio %.3g)", (what),        \
                  r_.plant_ratio);                                                                 \
  } while (0)

/* The older check, relative error |a - f| / max(|a| + |f|, floor), left only for the whole-step checks
 * of test_step: their loss runs float through the encoder, mining and loss, and with no double
 * evaluation of the whole step yet, a derived bound on its float noise over h is too wide to catch a 1%
 * error (gc_check's requirement). Every other difference check in tests/ uses gc_check. */
double gradcheck(gc_loss_fn f, void *ctx, float *x, const float *grad, size_t n, float h,
                 size_t max_checks, double floor);

/* Fills x with U(lo, hi). */
void fill_uniform(float *x, size_t n, rng_t *r, float lo, float hi);

/* Directory for test files, created fresh per call ("/tmp/mocod-test-RUN-XXXXXX", RUN as in
 * test_run_id); removed by rm_rf, or by test_reaper_sweep when a test ends before its teardown. */
char *test_tmpdir(void);

/* One scratch directory per test, as a checked fixture (test_scratch_setup / test_scratch_teardown).
 * test_scratch_path(k, name) names a file in it in slot k (0..3), so one call can take four paths;
 * test_scratch_slot(k) is the path slot k last named. */
void test_scratch_setup(void);
void test_scratch_teardown(void);
const char *test_scratch_dir(void);
const char *test_scratch_path(int k, const char *name);
const char *test_scratch_slot(int k);

/* ---- processes a test starts ----------------------------------------------------------------------
 *
 * A test that fails in Check's fork mode ends by _exit, before its teardown, and one that times out is
 * SIGKILLed with its process group; a daemon it started has left both (setsid, double fork), and
 * mpirun's ranks run in process groups of their own. So the processes a test started are found by
 * their environment, which every descendant inherits however it detaches:
 *   - the runner sets MOCOD_TEST_RUN=<its pid> (test_run_id) before any test runs;
 *   - test_reaper_start() (a fixture's setup) sets MOCOD_TEST_ID=<run>.<pid>.<n> and forks a reaper, a
 *     process in a session of its own that waits for the test process to end or to call
 *     test_reaper_stop() (the teardown), then SIGKILLs every process whose environment holds that id;
 *   - test_reaper_sweep() (the runner, after the last test) SIGKILLs every process of the run that is
 *     left (the suites that start no reaper) and removes the run's test directories. */
const char *test_run_id(void);
void test_reaper_start(void);
void test_reaper_stop(void);
void test_reaper_sweep(void);
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
