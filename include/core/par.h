/* A process-wide team of compute threads for the data-parallel loops of a training step.
 *
 * OpenBLAS could thread each sgemm, but everything between the gemms (im2col, BatchNorm, ReLU, pooling)
 * would run on one core, and the convolutions' gemms are too small ([16..64, 9..288] x [.., ~1500]) for
 * OpenBLAS's threading to pay off. The layers therefore split their work into `parts` (samples, chunks
 * or channels) and par_run spreads them over the team; mat_mul splits large products the same way, and
 * OpenBLAS itself runs single-threaded.
 *
 * How work is split never depends on how many threads run it: part p is the same work whether the team
 * has one thread or eight, so results depend only on `parts`, which a layer fixes when the net is built. */
#ifndef MOCO_CORE_PAR_H
#define MOCO_CORE_PAR_H

/* Most threads (and parts) a team may have. */
#define PAR_MAX_THREADS 16

/* fn(ctx, part, parts) does part `part` of `parts`; parts run concurrently and must not overlap. */
typedef void (*par_fn)(void *ctx, int part, int parts);

/* Sets the team size (1 = the caller alone, the default), starting or stopping workers, and makes
 * OpenBLAS single-threaded. Not to be called while a run is in progress. Returns 0, MOCO_ERANGE or
 * MOCO_ENOMEM (threads not started; the team is then the caller alone). */
int par_set_threads(int threads);
int par_threads(void);

/* Runs fn for parts 0..parts-1 and returns when all are done; part p goes to thread p % threads, the
 * caller being thread 0. A run started while another is in progress (another thread's step) runs its
 * parts on the calling thread alone. */
void par_run(int parts, par_fn fn, void *ctx);

/* Parts for a loop over n items whose split does not change results (elementwise work): one per
 * thread, fewer when a part would get under min_items (a run's wake-ups would cost more than it saves),
 * and one inside a run (the work is already a part). */
int par_parts(long n, long min_items);

/* min_items for loops over floats (elementwise passes, row scans): 65,536 of them, 256 KB, tens of
 * microseconds of work, well above a run's cost. */
#define PAR_MIN_FLOATS ((long)1 << 16)

/* [*lo, *hi): part `part` of `parts` near-equal slices of n items. */
void par_range(long n, int part, int parts, long *lo, long *hi);

#endif
