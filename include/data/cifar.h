/* CIFAR-10 and CIFAR-100 binary batches (Krizhevsky 2009, "binary version"): headerless files of
 * fixed-size records,
 *
 *   CIFAR-10  (data_batch_1.bin .. data_batch_5.bin, test_batch.bin): label u8 | 3072 pixels
 *   CIFAR-100 (train.bin, test.bin):                  coarse label u8 | fine label u8 | 3072 pixels
 *
 * pixels are u8, 1024 red then 1024 green then 1024 blue, each plane row-major 32 x 32: a (3, 32, 32)
 * sample as mocod stores images. CIFAR-100 records give the fine label (100 classes). With no magic,
 * the variant is told from the file size (a whole number of 3073- or 3074-byte records) and, when both
 * fit, from the name (CIFAR-100 ships train.bin and test.bin). */
#ifndef MOCO_DATA_CIFAR_H
#define MOCO_DATA_CIFAR_H

#include <stdint.h>
#include <stdio.h>

#include "data/record.h"

#define CIFAR_PIXELS 3072

typedef struct {
  int classes;         /* 10 or 100 */
  size_t label_bytes;  /* 1 or 2 */
  uint64_t count;
} cifar_info;

/* A file is taken as CIFAR when its name ends in ".bin"; this checks its size and says which. */
int cifar_probe(const char *path, cifar_info *info);
int cifar_is_candidate(const char *path);
static inline data_shape cifar_shape(void) { return (data_shape){3, 32, 32}; }

typedef struct {
  FILE *f;
  const char *path;
  cifar_info info;
  uint8_t rec[2 + CIFAR_PIXELS];
  uint64_t next, bad;
} cifar_reader;

int cifar_reader_open(cifar_reader *r, const char *path, const cifar_info *info, uint64_t start);
/* A reader for records taken out of order (cifar_reader_seek, then cifar_reader_next), unbuffered, so
 * that a read fetches that record's bytes alone. */
int cifar_reader_open_seekable(cifar_reader *r, const char *path, const cifar_info *info);
int cifar_reader_seek(cifar_reader *r, uint64_t index);
/* 1: a record; 0: end; < 0: a label outside [0, classes) (that record, r->bad = 1) or a short read
 * (the rest of the file). */
int cifar_reader_next(cifar_reader *r, data_record *rec);
void cifar_reader_close(cifar_reader *r);

#endif
