/* A data set: a list of files (IDX, NumPy .npy, CIFAR binary batches or shards, told apart by their magic,
 * CIFAR by its .bin name) given as comma-separated paths
 * or globs, checked at open from the headers alone, then read record by record, file by file.
 *
 * Opening reads only headers and file sizes, so it is cheap for any size; it refuses, naming the file:
 * a missing file, a glob that matches nothing, a bad magic, a truncated or overlong file, a labels file
 * whose count disagrees with its images, files whose sample shape or type disagree, an empty set.
 * What only reading finds (a bad block checksum, a gzip stream cut short, a label out of range, a
 * non-finite float) is reported by dataset_reader_next, which says how many records the fault covers
 * so a caller can skip them. */
#ifndef MOCO_DATA_DATASET_H
#define MOCO_DATA_DATASET_H

#include <stdint.h>

#include "data/cifar.h"
#include "data/idx.h"
#include "data/npy.h"
#include "data/record.h"
#include "data/shard.h"

typedef enum { DATA_IDX = 1, DATA_SHARD = 2, DATA_NPY = 3, DATA_CIFAR = 4 } data_format;

typedef struct {
  char *path;
  char *labels_path;    /* IDX, NPY: the labels file (given, or found by name), NULL when none */
  data_format format;
  uint64_t count;
  uint64_t first;       /* global index of the file's first record */
  idx_info idx;         /* DATA_IDX */
  shard_header shard;   /* DATA_SHARD */
  npy_info npy;         /* DATA_NPY */
  cifar_info cifar;     /* DATA_CIFAR */
} dataset_file;

typedef struct {
  char name[32];        /* "train", "eval": starts every message */
  dataset_file *files;
  int n_files;
  uint64_t count;       /* records in all files */
  data_shape shape;
  data_dtype dtype;
  int has_labels;       /* some file has labels (records of the others read as -1) */
  int has_pair;         /* every record holds two samples */
  int num_classes;      /* labels lie in [0, num_classes) or are -1; 0 = not known, only >= -1 checked.
                           From the config when given, else the shard headers' and the IDX labels' */
  int idx_classes;      /* largest IDX label + 1 (IDX states no class count) */
  size_t sample_bytes;  /* one stored sample */
} dataset;

/* spec: "a.shard,dir/train-*.shard", an IDX images file, .npy files, CIFAR batches. An IDX or .npy file's
 * labels come from `labels` (only with a single such file) or from the file named like it with
 * "images-idx3" -> "labels-idx1" ("images" -> "labels"; "x.npy" -> "x.labels.npy", the name mocod's own
 * exports use) when that exists; a 1-dimensional IDX or .npy file matched by a glob is taken as such a
 * labels file. IDX samples take IDX labels, .npy samples .npy labels. num_classes > 0 overrides what
 * shard headers and CIFAR state. */
int dataset_open(dataset *ds, const char *name, const char *spec, const char *labels, int num_classes);
void dataset_close(dataset *ds);

typedef struct {
  const dataset *ds;
  int file;
  idx_reader idx;
  shard_reader shard;
  npy_reader npy;
  cifar_reader cifar;
  uint64_t bad; /* records the last error covers */
} dataset_reader;

/* Reads file `file` of ds from record `start` (an index within that file). */
int dataset_reader_open(dataset_reader *r, const dataset *ds, int file, uint64_t start);
/* 1 when any record of every file can be read without those before it (plain IDX, .npy, CIFAR); 0 when
 * a file is a gzip IDX (a stream) or a shard (a checksum covers a block of records). */
int dataset_seekable(const dataset *ds);
/* Opens file `file` of a seekable data set for records read out of order: dataset_reader_seek, then
 * dataset_reader_next. Nothing is read ahead: a read fetches that record's bytes alone. */
int dataset_reader_open_seekable(dataset_reader *r, const dataset *ds, int file);
int dataset_reader_seek(dataset_reader *r, uint64_t index);
/* 1: a record (ids of IDX, .npy and CIFAR records are global indices: file.first + index); 0: end of the file;
 * < 0: bad data covering r->bad records, after which reading may go on. */
int dataset_reader_next(dataset_reader *r, data_record *rec);
void dataset_reader_close(dataset_reader *r);

/* Mean and standard deviation per channel (per feature for vectors) of the decoded values (u8 / 255)
 * over the whole data set, for the loader's normalisation: mean and std hold shape.c floats. A bad
 * record stops it with its error, or, with skip_bad, is left out and counted in *skipped (may be NULL;
 * moco_errmsg then holds the last such error). */
int dataset_stats(const dataset *ds, int skip_bad, float *mean, float *std, uint64_t *skipped);
/* dataset_stats in parts (one rank's contiguous range of a data-parallel world): adds the decoded
 * values of records [first, end) (file order, bad ones included in the count of positions) to
 * sums[c] and their squares to sums[C + c] (2 shape.c doubles), the records summed to *count and the
 * bad ones skipped to *skipped; the parts' sums added together give dataset_stats_finish the statistics
 * of the whole set. */
int dataset_stats_sums(const dataset *ds, uint64_t first, uint64_t end, int skip_bad, double *sums,
                       uint64_t *count, uint64_t *skipped);
int dataset_stats_finish(const dataset *ds, const double *sums, uint64_t count, float *mean, float *std);

#endif
