/* The loader: minibatches streamed from disk, two views per sample, prepared ahead on worker threads.
 *
 *   loader_config c = config_defaults()->trainer.loader;  // configured values (service/config.h)
 *   c.train = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz";
 *   loader l;
 *   if ((rc = loader_open(&l, &c))) ... moco_errmsg() ...
 *   for (loader_batch b; !(rc = loader_next(&l, &b)) && b.size; )
 *     step(b.view1, b.view2, b.size);          // [size, C, H, W] each, l.shape = (C, H, W)
 *   loader_close(&l);
 *
 * Order. Each epoch visits the files in an order shuffled from (seed, epoch) and reads them in
 * sequence into a shuffle buffer of shuffle_buffer records; the buffer is permuted and handed out, then
 * refilled from where reading stopped. So every record of an epoch is delivered exactly once (the last
 * short batch is dropped when drop_last), a buffer as large as the data set is a full shuffle, and
 * memory is bounded by the buffer, whatever the data size. Batches never span two epochs.
 *
 * Threads. One reader thread fills batches of stored records in order; `workers` threads decode,
 * augment and normalise them (views.h); up to `prefetch` batches wait ready. The order of records is
 * fixed by the single reader and each view's randomness by (seed, epoch, id, view), so the stream is the
 * same for any number of workers and any thread timing.
 *
 * Resume. loader_position is the position of the NEXT batch loader_next will return (not of the
 * prefetched ones): epoch, file and record where its shuffle window starts, records of the window
 * already handed out, and the shuffle stream's state. loader_save / loader_load put it in a checkpoint;
 * after loader_load the stream continues exactly as it would have; restarting costs re-reading at most
 * one window.
 *
 * Shares. With share_count N > 1 (the ranks of a data-parallel world, core/dist.h), every process follows
 * the same stream of records, so the order, the epochs and the saved position are those of one
 * process whatever N is, and makes the views of rows [size i / N, size (i + 1) / N) of each batch only
 * (i = share_index). loader_next then returns that share (size, views, ids, labels); epoch, index and
 * samples stay the whole batch's. Where the files allow it, a share also READS only the records of its
 * rows (disjoint shares, loader_reads_share): a shuffle window's length, and so its permutation, follow
 * from the record counts alone, which tells each share which of the window's records land in its rows
 * before anything is read; it reads those, each alone (no read-ahead), in file order. That needs files
 * that seek (plain IDX, .npy, CIFAR: dataset_seekable), data.bad_record stop (a skipped record would
 * change the windows, and only the share that read it would know) and drop_last. Otherwise (a gzip
 * IDX is a stream; a shard's checksum covers a block of records) every share reads the whole stream
 * and keeps its rows: the same batches either way.
 *
 * Bad input. loader_open refuses what headers show (dataset.h). A bad record found while streaming
 * either stops the stream (LOADER_BAD_STOP: loader_next returns the error, after every complete batch
 * before it) or is skipped and counted (LOADER_BAD_SKIP). No batch is ever partly read. */
#ifndef MOCO_DATA_LOADER_H
#define MOCO_DATA_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "core/blob.h"
#include "core/enum.h"
#include "core/rng.h"
#include "data/dataset.h"
#include "data/views.h"

typedef enum { LOADER_BAD_STOP = 0, LOADER_BAD_SKIP = 1 } loader_bad_policy;
typedef enum { LOADER_TRAIN = 0, LOADER_EVAL = 1 } loader_split;

typedef struct {
  const char *train;        /* required: paths or globs, comma-separated (dataset.h); format by magic */
  const char *train_labels; /* NULL: IDX labels found by name */
  const char *eval;         /* NULL: no evaluation split */
  const char *eval_labels;  /* NULL */
  int batch_size;
  int shuffle_buffer;       /* records; 0: no shuffling at all (files and records in order) */
  uint64_t seed;
  int prefetch;             /* batches prepared ahead */
  int workers;              /* threads making views */
  int drop_last;            /* 1: an epoch's last short batch is dropped (MoCo's queue wants full ones) */
  int epochs;               /* 0: endless; else loader_next ends (size 0) after this many */
  int num_classes;          /* 0: from shard headers; > 0: labels must be below it */
  loader_bad_policy bad_record;
  view_mode view_mode;      /* VIEW_PAIR needs pair records */
  view_config augment;
  int norm_len;             /* 0: none; 1 or C values of mean/std (per channel, per feature) */
  const float *mean, *std;  /* copied at open */
  int share_index, share_count; /* 0, 1: this process's share of every batch (see "Shares") */
} loader_config;

/* data.bad_record: "stop", "skip". The configured fields' defaults and ranges are the config's
 * (data.*, src/service/config.c); the trainer sets the rest (paths, batch, seed, length, statistics). */
extern const enum_name loader_bad_policy_names[];

typedef struct {
  uint64_t epoch;     /* epoch of the next batch, from 0 */
  uint64_t batch;     /* batches already delivered in that epoch */
  uint64_t samples;   /* samples delivered since the start */
  uint64_t skipped;   /* bad records skipped before the current window */
  uint32_t file;      /* index in the epoch's file order where the current window starts */
  uint64_t offset;    /* record in that file where it starts */
  uint64_t in_window; /* records of that window already delivered */
  rng_t rng;          /* shuffle stream before the window's permutation was drawn */
} loader_pos;

typedef struct {
  int size;              /* samples; 0 when the stream has ended (epochs reached) */
  const float *view1;    /* [size, C, H, W], normalised */
  const float *view2;    /* [size, C, H, W]; NULL from a scan without pairs */
  const int64_t *ids;    /* [size] sample ids (global index for IDX, stored id for shards) */
  const int32_t *labels; /* [size] labels, -1 when unlabelled */
  uint64_t epoch;        /* epoch of this batch, from 0 */
  uint64_t index;        /* batch index within the epoch */
  uint64_t samples;      /* samples delivered before this batch */
  uint64_t skipped;      /* bad records skipped so far (as far as the reader has read) */
} loader_batch;

typedef struct {
  data_shape shape;      /* of one sample: build the network for it */
  data_dtype dtype;      /* of the stored samples */
  uint64_t num_samples;  /* records in the training split */
  uint64_t eval_samples; /* records in the evaluation split (0 when none) */
  int num_classes;       /* known number of classes, 0 when not known */
  int has_labels, has_eval;
  struct loader_impl *impl;
} loader;

/* Checks the config and both splits' headers; allocates every buffer. Threads start at the first
 * loader_next. On failure nothing is left allocated and moco_errmsg says what and where. */
int loader_open(loader *l, const loader_config *c);
/* Blocks until the next batch is ready. The batch's arrays stay valid until the next loader_next,
 * loader_seek/loader_load or loader_close. Returns 0 (size 0 at the end) or the error that stopped the
 * stream, again on every later call. */
int loader_next(loader *l, loader_batch *b);
void loader_position(const loader *l, loader_pos *p);
/* Discards prefetched batches and continues from p (which must come from this data set and config). */
int loader_seek(loader *l, const loader_pos *p);
/* One blob section "LDRS": the position plus what it is only valid for (seed, data set size and shape,
 * batch_size, shuffle_buffer, drop_last); loading refuses a mismatch with MOCO_ESTATE, naming it. */
void loader_save(const loader *l, blob_writer *w);
int loader_load(loader *l, blob_reader *r);
/* Bad records skipped so far and, when why != NULL, the message of the last one. */
uint64_t loader_skipped(const loader *l, char *why, size_t n);
/* Records this process has read from the training files since open (bad ones included): about
 * 1/share_count of those of the batches delivered when loader_reads_share, all of them otherwise. */
uint64_t loader_records_read(const loader *l);
/* 1 when this share reads only its own records (see "Shares"). */
int loader_reads_share(const loader *l);
/* Seconds loader_next spent waiting for a batch: non-zero means training outran the data. */
double loader_wait_seconds(const loader *l);
void loader_close(loader *l);

/* A split read once, in file order, without augmentation: view1 is each sample normalised, view2 the
 * second sample of pair data (NULL otherwise), in chunks of up to `chunk`; for evaluation (kNN
 * monitor) and feature extraction. Independent of the training stream; runs on the calling thread. */
typedef struct {
  const loader *l;
  const dataset *ds;
  int chunk, file, reading;
  dataset_reader rd;
  float *view1, *view2;
  int64_t *ids;
  int32_t *labels;
  uint64_t samples, skipped, index;
  uint64_t at, end; /* records [at, end) of the split are still to read (bad ones included) */
  uint64_t start;   /* record of `file` where its reader opens next */
} loader_scan;

int loader_scan_open(loader_scan *s, const loader *l, loader_split split, int chunk);
/* Narrows the scan to records [first, end) of the split, counted in file order with bad records
 * included (one rank's shard of an evaluation, so that shards are disjoint and, taken in rank order,
 * are the scan of one process); call before the first loader_scan_next. MOCO_EINVAL when the range
 * is not within the split. */
int loader_scan_range(loader_scan *s, uint64_t first, uint64_t end);
/* 0 with b->size > 0: a chunk; 0 with b->size == 0: done; < 0: a bad record under LOADER_BAD_STOP. */
int loader_scan_next(loader_scan *s, loader_batch *b);
void loader_scan_close(loader_scan *s);

#endif
