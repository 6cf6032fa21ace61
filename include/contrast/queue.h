/* The memory bank (MoCo's queue): a ring buffer of the last queue_size keys, each with the sample id it
 * came from, its label (diagnostics only; -1 when the data has none) and the step at which it was
 * enqueued. Every step enqueues the batch's keys over the oldest entries (He et al. 2020, Alg. 1).
 *
 * Invariant: slots are written in order from slot 0, so until the queue is full the valid entries are
 * exactly the prefix [0, filled) and `ptr == filled`; once full, every slot is valid and `ptr` is the
 * oldest entry. Only valid entries may be used as negatives: callers read `filled` columns. */
#ifndef MOCO_CONTRAST_QUEUE_H
#define MOCO_CONTRAST_QUEUE_H

#include <stdint.h>

#include "core/blob.h"

typedef struct {
  int queue_size; /* K, number of slots */
  int dim;        /* d, key dimension */
  float *keys;    /* [K, d], L2-normalised rows */
  int64_t *ids;   /* [K] sample id of each slot, -1 when unknown */
  int32_t *labels; /* [K] class label, -1 when none */
  int64_t *steps; /* [K] training step at which the slot was written */
  int ptr;        /* next slot to write */
  int filled;     /* number of valid slots, <= K */
} queue;

/* Allocates an empty queue of K slots of dimension d (both > 0). */
int queue_init(queue *q, int queue_size, int dim);
void queue_free(queue *q);
/* Forgets every entry (filled = ptr = 0); the storage is kept. */
void queue_reset(queue *q);

/* Writes B keys [B, d] (with ids [B] and labels [B]; either may be NULL for "unknown") as entries
 * enqueued at `step`. A batch that reaches the end of the ring is split over its end and its start;
 * a batch larger than the queue keeps only its last K keys. The result is the same as enqueuing the
 * rows one at a time. */
void queue_enqueue(queue *q, const float *keys, const int64_t *ids, const int32_t *labels, int B,
                   int64_t step);

/* One blob section "QUEU": sizes, ptr, filled, then keys, ids, labels, steps of all K slots.
 * Loading into a queue of another size or dimension fails with MOCO_ESHAPE. */
void queue_save(const queue *q, blob_writer *w);
int queue_load(queue *q, blob_reader *r);

#endif
