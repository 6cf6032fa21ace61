#include "core/dist.h"

#include <mpi.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/clock.h"
#include "core/err.h"

static int joined, world_size = 1, world_rank;
static double comm_seconds;

/* MPI counts are ints: larger arrays go in pieces of at most this many elements. */
#define DIST_CHUNK (1 << 28)

static int launched(void) {
  return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMIX_RANK") || getenv("PMI_RANK");
}

int dist_init(int *argc, char ***argv) {
  if (joined || !launched()) return 0;
  int provided = 0;
  if (MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS)
    return moco_error(MOCO_ESTATE, "MPI_Init_thread failed");
  if (provided < MPI_THREAD_SERIALIZED) {
    MPI_Finalize();
    return moco_error(MOCO_ESTATE, "MPI provides thread level %d, mocod needs MPI_THREAD_SERIALIZED "
                      "(steps run on a worker thread)", provided);
  }
  joined = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  return 0;
}

void dist_finalize(void) {
  if (!joined) return;
  MPI_Finalize();
  joined = 0;
}

void dist_abort(int code) {
  if (joined && world_size > 1) MPI_Abort(MPI_COMM_WORLD, code ? code : 1);
}

int dist_size(void) { return world_size; }
int dist_rank(void) { return world_rank; }
int dist_active(void) { return world_size > 1; }

static void reduce(void *x, size_t n, size_t elem, MPI_Datatype t, MPI_Op op) {
  if (world_size == 1) return;
  double t0 = clock_now();
  for (size_t i = 0; i < n; i += DIST_CHUNK) {
    size_t k = n - i < DIST_CHUNK ? n - i : DIST_CHUNK;
    MPI_Allreduce(MPI_IN_PLACE, (char *)x + i * elem, (int)k, t, op, MPI_COMM_WORLD);
  }
  comm_seconds += clock_now() - t0;
}

void dist_sum_f32(float *x, size_t n) { reduce(x, n, sizeof *x, MPI_FLOAT, MPI_SUM); }
void dist_sum_f64(double *x, size_t n) { reduce(x, n, sizeof *x, MPI_DOUBLE, MPI_SUM); }
void dist_max_f64(double *x, size_t n) { reduce(x, n, sizeof *x, MPI_DOUBLE, MPI_MAX); }

void dist_allgather(const void *send, void *recv, size_t bytes) {
  if (world_size == 1) {
    if (recv != send) memmove(recv, send, bytes);
    return;
  }
  double t0 = clock_now();
  /* A contribution is one rank's share of a batch (inputs or keys), far below INT_MAX bytes; moco_init
   * refuses batches that are not. */
  MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, MPI_COMM_WORLD);
  comm_seconds += clock_now() - t0;
}

void dist_bcast(void *buf, size_t bytes, int root) {
  if (world_size == 1) return;
  double t0 = clock_now();
  for (size_t i = 0; i < bytes; i += DIST_CHUNK) {
    size_t k = bytes - i < DIST_CHUNK ? bytes - i : DIST_CHUNK;
    MPI_Bcast((char *)buf + i, (int)k, MPI_BYTE, root, MPI_COMM_WORLD);
  }
  comm_seconds += clock_now() - t0;
}

void dist_bcast_idle(void *buf, size_t bytes) {
  if (world_size == 1) return;
  MPI_Request req;
  MPI_Ibcast(buf, (int)bytes, MPI_BYTE, 0, MPI_COMM_WORLD, &req);
  /* Spin briefly (a step's control arrives within microseconds of the last one), then back off to
   * sleeps of up to a millisecond. */
  long ns = 0;
  for (int done = 0;;) {
    MPI_Test(&req, &done, MPI_STATUS_IGNORE);
    if (done) return;
    if (ns < 1000000) ns = ns ? ns * 2 : 1000;
    struct timespec ts = {0, ns};
    nanosleep(&ts, NULL);
  }
}

void dist_barrier(void) {
  if (world_size > 1) MPI_Barrier(MPI_COMM_WORLD);
}

int dist_any(int flag) {
  int any = flag != 0;
  if (world_size > 1) MPI_Allreduce(MPI_IN_PLACE, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any;
}

void dist_gather_rows(void *buf, size_t row_bytes, const int64_t *counts) {
  if (world_size == 1 || row_bytes == 0) return;
  double t0 = clock_now();
  int *cnt = malloc((size_t)world_size * sizeof *cnt), *at = malloc((size_t)world_size * sizeof *at);
  if (!cnt || !at) {
    /* Nothing can be sent without them and every rank is inside the gather: end the job. */
    MPI_Abort(MPI_COMM_WORLD, 1);
    return;
  }
  /* A split's rows are counted in int64 elsewhere; a gather of more than INT_MAX rows would need
   * another datatype, far beyond any split mocod can hold in memory. */
  for (int r = 0, off = 0; r < world_size; r++) {
    cnt[r] = (int)counts[r];
    at[r] = off;
    off += cnt[r];
  }
  MPI_Datatype row;
  MPI_Type_contiguous((int)row_bytes, MPI_BYTE, &row);
  MPI_Type_commit(&row);
  if (world_rank == 0)
    MPI_Gatherv(MPI_IN_PLACE, 0, row, buf, cnt, at, row, 0, MPI_COMM_WORLD);
  else
    MPI_Gatherv(buf, cnt[world_rank], row, NULL, NULL, NULL, row, 0, MPI_COMM_WORLD);
  MPI_Type_free(&row);
  free(cnt);
  free(at);
  comm_seconds += clock_now() - t0;
}

double dist_comm_seconds(void) { return comm_seconds; }
