/* The compute team: a run bumps a generation counter, does its own parts, and waits until the
 * workers have done theirs. Between runs a worker first spins on the counter for a short while, then
 * sleeps on a condition variable; the caller waits for the workers the same way. A step's runs follow
 * each other within microseconds, and a thread that went to sleep costs a wake-up each time (tens of
 * microseconds on a virtual machine, whose idle vCPU halts). Measured on the 2-core VM, spinning
 * against sleeping: MLP forward + backward 225 against 204 GFLOP/s, the default job 88 against 100 ms
 * per step. Spinning stops after SPIN_SECONDS, so an idle team (between steps, while the loader works)
 * costs nothing. */
#include "core/par.h"

#include <cblas.h>
#include <pthread.h>
#include <stdatomic.h>

#include "core/clock.h"
#include "core/err.h"

#define SPIN_SECONDS 100e-6

static struct {
  pthread_mutex_t mu;
  pthread_cond_t wake, done;
  pthread_mutex_t busy; /* held for a whole run; a second caller runs alone */
  pthread_t tid[PAR_MAX_THREADS];
  int threads;
  atomic_int stop, pending; /* written under mu; read without it while spinning */
  atomic_ulong gen;         /* runs started */
  unsigned long born; /* gen when the workers started: runs before are not theirs */
  par_fn fn;
  void *ctx;
  int parts;
} team = {.mu = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER,
          .done = PTHREAD_COND_INITIALIZER,
          .busy = PTHREAD_MUTEX_INITIALIZER,
          .threads = 1};

/* Set while this thread does parts of a run: work it starts there is not split again. */
static _Thread_local int in_run;

static void run_parts(int self, int threads, par_fn fn, void *ctx, int parts) {
  in_run = 1;
  for (int p = self; p < parts; p += threads) fn(ctx, p, parts);
  in_run = 0;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

/* Waits for SPIN_SECONDS at most for a run after the one seen (or a stop). */
static void spin_for_run(unsigned long seen) {
  double end = clock_now() + SPIN_SECONDS;
  while (atomic_load(&team.gen) == seen && !atomic_load(&team.stop) && clock_now() < end) cpu_relax();
}

/* Waits for SPIN_SECONDS at most for the workers to finish their parts. */
static void spin_while_pending(void) {
  double end = clock_now() + SPIN_SECONDS;
  while (atomic_load(&team.pending) && clock_now() < end) cpu_relax();
}

static void *worker(void *arg) {
  int self = (int)(long)arg;
  pthread_mutex_lock(&team.mu);
  unsigned long seen = team.born;
  for (;;) {
    if (team.gen == seen && !team.stop) {
      pthread_mutex_unlock(&team.mu);
      spin_for_run(seen);
      pthread_mutex_lock(&team.mu);
    }
    while (team.gen == seen && !team.stop) pthread_cond_wait(&team.wake, &team.mu);
    if (team.stop) break;
    seen = team.gen;
    par_fn fn = team.fn;
    void *ctx = team.ctx;
    int parts = team.parts, threads = team.threads;
    pthread_mutex_unlock(&team.mu);
    run_parts(self, threads, fn, ctx, parts);
    pthread_mutex_lock(&team.mu);
    if (--team.pending == 0) pthread_cond_signal(&team.done);
  }
  pthread_mutex_unlock(&team.mu);
  return NULL;
}

static void stop_workers(void) {
  pthread_mutex_lock(&team.mu);
  team.stop = 1;
  pthread_cond_broadcast(&team.wake);
  pthread_mutex_unlock(&team.mu);
  for (int i = 1; i < team.threads; i++) pthread_join(team.tid[i], NULL);
  team.stop = 0;
  team.threads = 1;
}

int par_set_threads(int threads) {
  if (threads < 1 || threads > PAR_MAX_THREADS)
    return moco_error(MOCO_ERANGE, "par_set_threads: %d threads, allowed 1..%d", threads,
                      PAR_MAX_THREADS);
  /* One threading system: OpenBLAS's own threads would spin between products (sched_yield, measured
   * at a tenth of the step's CPU time) and compete with the team; mat_mul splits products instead. */
  openblas_set_num_threads(1);
  if (threads == team.threads) return 0;
  stop_workers();
  team.born = team.gen;
  for (int i = 1; i < threads; i++) {
    /* Workers started before a failure see threads == 1 and stop at stop_workers' broadcast. */
    team.threads = i;
    if (pthread_create(&team.tid[i], NULL, worker, (void *)(long)i)) {
      stop_workers();
      return moco_error(MOCO_ENOMEM, "par_set_threads: starting thread %d of %d", i + 1, threads);
    }
  }
  team.threads = threads;
  return 0;
}

int par_threads(void) { return team.threads; }

void par_run(int parts, par_fn fn, void *ctx) {
  if (team.threads <= 1 || parts <= 1 || pthread_mutex_trylock(&team.busy)) {
    run_parts(0, 1, fn, ctx, parts);
    return;
  }
  pthread_mutex_lock(&team.mu);
  team.fn = fn, team.ctx = ctx, team.parts = parts;
  team.pending = team.threads - 1;
  team.gen++;
  pthread_cond_broadcast(&team.wake);
  pthread_mutex_unlock(&team.mu);
  run_parts(0, team.threads, fn, ctx, parts);
  spin_while_pending();
  pthread_mutex_lock(&team.mu);
  while (team.pending) pthread_cond_wait(&team.done, &team.mu);
  pthread_mutex_unlock(&team.mu);
  pthread_mutex_unlock(&team.busy);
}

int par_parts(long n, long min_items) {
  if (in_run) return 1;
  long parts = min_items > 0 ? n / min_items : n;
  if (parts > team.threads) parts = team.threads;
  return parts < 1 ? 1 : (int)parts;
}

void par_range(long n, int part, int parts, long *lo, long *hi) {
  *lo = n * part / parts;
  *hi = n * (part + 1) / parts;
}
