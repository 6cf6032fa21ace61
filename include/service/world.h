/* The daemon across ranks (core/dist.h): one daemon to the user, however many processes train.
 *
 * Rank 0 runs the whole service (server.h): the control socket, the human and progress logs, the
 * checkpoints, the pid file. Every other rank runs world_follow: it builds the same trainer from the same
 * config and then does, at the same point of the run, what rank 0 tells it, one small broadcast per
 * event (not a poll): start (fresh, or from the checkpoint rank 0 resumed, whose bytes travel with the
 * message, so no rank but 0 needs the checkpoint directory), a step, the changed config of a `set`
 * (applied before the next step, as on rank 0), an evaluation or a feature export (each rank extracts
 * its shard of the data, rank 0 gathers them, computes the figures and writes the files: train/trainer.h),
 * and stop. Pause, status, checkpoints and the model export involve rank 0 alone; the others wait for
 * the next message asleep (dist_bcast_idle).
 *
 * Every message goes from rank 0's trainer thread, or its loop thread while no job runs, so the world
 * sees them in one order. In a world of one, world_send does nothing. */
#ifndef MOCO_SERVICE_WORLD_H
#define MOCO_SERVICE_WORLD_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

typedef enum { WORLD_START, WORLD_STEP, WORLD_SET, WORLD_STOP, WORLD_EVAL, WORLD_EXPORT } world_kind;

/* The payload of WORLD_EXPORT: what trainer_export extracts (the path is rank 0's alone). */
typedef struct {
  int32_t train; /* 1: the "train" split, 0: "eval" */
  int32_t encoder;
  int32_t embeddings;
} world_export;

/* Rank 0: the next thing every rank does; payload[len] travels with it (len 0: none). */
void world_send(world_kind kind, const void *payload, size_t len);

/* Every rank, once, right after joining: learns each rank's host and pid (an all-gather), so that rank 0
 * can later name a rank that died. */
void world_peers_init(void);
/* Rank 0: writes "rank R (pid P on HOST) is gone" for the first rank on this host whose process no
 * longer runs (or is a zombie) and returns 1; 0 when every rank on this host runs. Ranks on other hosts
 * cannot be seen from here: mpirun's own message names them. */
int world_lost_rank(char *buf, size_t n);

/* Ranks above 0: the whole life of a follower on a finalized config. Returns the process exit status:
 * 0 after rank 0's stop; on a failure of its own the rank says so on stderr, naming itself, and ends
 * the job (dist_abort), since the others cannot step without it. */
int world_follow(json_t *config);

#endif
