/* The world of processes training one model together (data parallel), over Open MPI.
 *
 * Every rank holds the same model; a step's batch is split across ranks, gradients are summed with
 * dist_allreduce, keys gathered with dist_allgather, and the service's per-step control travels by
 * dist_bcast from rank 0 (docs/scale.md, README "Several processes").
 *
 * dist_init joins the world only when the process was started by an MPI launcher (mpirun sets
 * OMPI_COMM_WORLD_SIZE / PMIX_RANK); otherwise, and before dist_init, the world is this process alone
 * (size 1, rank 0) and every collective is a local copy or nothing, so `mocod` without mpirun, the tests
 * and the tools never touch MPI. Collectives are called from one thread at a time (the trainer's):
 * MPI_THREAD_SERIALIZED.
 *
 * Errors: MPI's default handler (errors are fatal) stays on the world: a collective that cannot
 * complete because a peer died aborts this process, and mpirun then ends the whole job; nothing waits
 * forever on a dead rank. Time spent inside collectives is summed for the step's figures. */
#ifndef MOCO_CORE_DIST_H
#define MOCO_CORE_DIST_H

#include <stddef.h>
#include <stdint.h>

/* Joins the world when started by a launcher; returns 0 or MOCO_ESTATE naming the MPI failure. */
int dist_init(int *argc, char ***argv);
/* Leaves the world (MPI_Finalize) when dist_init joined it. */
void dist_finalize(void);
/* Ends every rank of the job at once (MPI_Abort) after a fatal error on this one; in a world of one,
 * returns and the caller exits as it would have. */
void dist_abort(int code);

int dist_size(void);
int dist_rank(void);
int dist_active(void); /* 1 when more than one rank trains */

/* x[n] = the sum over ranks of x[n], in place; the same result on every rank. */
void dist_sum_f32(float *x, size_t n);
void dist_sum_f64(double *x, size_t n);
void dist_max_f64(double *x, size_t n);
/* recv[size * bytes] = every rank's send[bytes], in rank order (equal contributions). */
void dist_allgather(const void *send, void *recv, size_t bytes);
/* buf[bytes] of `root` on every rank. */
void dist_bcast(void *buf, size_t bytes, int root);
/* Like dist_bcast from rank 0, but a rank waiting for it sleeps between tests instead of spinning, so
 * ranks idle while rank 0 is paused or evaluating cost no CPU. Nonblocking underneath (MPI_Ibcast),
 * and MPI matches a nonblocking collective only with nonblocking ones: every rank, rank 0 too, calls
 * this one for a given broadcast. */
void dist_bcast_idle(void *buf, size_t bytes);
void dist_barrier(void);
/* 1 on every rank when flag is non-zero on any rank: a step of work done by each rank alone (a shard
 * of an evaluation) agrees on failure before the collectives that follow it, so no rank waits in one
 * that another has skipped. */
int dist_any(int flag);
/* Rows of row_bytes gathered on rank 0 in rank order (MPI_Gatherv): rank r holds counts[r] rows, every
 * rank knows all counts (size entries). On rank 0 buf has room for the sum and holds its own rows first
 * (they stay in place); on the others buf holds the rows to send. Rows are one MPI datatype, so a count
 * is rows, not bytes, and a gather is not limited to 2 GiB. */
void dist_gather_rows(void *buf, size_t row_bytes, const int64_t *counts);

/* Seconds spent inside collectives since the process started (for the step's figures). */
double dist_comm_seconds(void);

#endif
