/* mocod's native data format: one shard file holds a run of fixed-size records, grouped in blocks, each
 * block followed by its CRC-32 so a reader finds corruption and says which block and records it hit.
 *
 *   header (64 bytes, little-endian):
 *     0 magic "MOCOSHRD" | 8 version u32 (1) | 12 flags u32 (1 labels, 2 pair) | 16 dtype u32 (1 u8, 2 f32)
 *     20 c u32 | 24 h u32 | 28 w u32 | 32 num_classes u32 (0 unknown) | 36 block_records u32
 *     40 count u64 | 48 reserved (12 zero bytes) | 60 crc32 of bytes 0..59 u32
 *   blocks: block_records records (the last block may hold fewer) | crc32 of those record bytes u32
 *   record: id i64 | label i32 (when flags has labels; -1 = unlabelled) | sample | second sample (pair)
 *
 * Records have one size, so record i is found without reading the ones before it, and the file size
 * follows from the header: a short or long file is caught before any record is read. A data set is a
 * list of shard files (or a glob); mocopack writes them. */
#ifndef MOCO_DATA_SHARD_H
#define MOCO_DATA_SHARD_H

#include <stdint.h>
#include <stdio.h>

#include "data/record.h"

#define SHARD_MAGIC "MOCOSHRD"
#define SHARD_VERSION 1
#define SHARD_HEADER_BYTES 64
/* Default block: about 256 KiB of records, large enough for sequential reads, small enough that a bad
 * block costs few records. */
#define SHARD_BLOCK_BYTES (256u << 10)

enum { SHARD_LABELS = 1, SHARD_PAIR = 2 };

typedef struct {
  uint32_t version, flags;
  data_dtype dtype;
  data_shape shape;
  uint32_t num_classes;   /* labels lie in [0, num_classes) (or are -1); 0 = not stated */
  uint32_t block_records; /* 0 in shard_writer_open: choose from SHARD_BLOCK_BYTES */
  uint64_t count;
} shard_header;

/* Bytes of one stored sample, of one record, and of the whole file the header describes. */
size_t shard_sample_bytes(const shard_header *h);
size_t shard_record_bytes(const shard_header *h);
uint64_t shard_file_bytes(const shard_header *h);

/* Reads and checks a shard's header and that the file size is the one it implies. */
int shard_probe(const char *path, shard_header *h);

typedef struct {
  FILE *f;
  char *path, *tmp_path;
  shard_header h;
  size_t rec_bytes;
  uint8_t *block;
  uint32_t in_block;
} shard_writer;

/* Starts a shard at `path`, written to "<path>.tmp" and renamed into place by shard_writer_close, so a
 * crash never leaves half a shard under the real name. h->count is ignored (counted as records come). */
int shard_writer_open(shard_writer *w, const char *path, const shard_header *h);
/* label is ignored without SHARD_LABELS; pair must be given exactly when SHARD_PAIR is set. A label
 * outside [-1, num_classes) or a non-finite f32 value is refused (MOCO_ERANGE). */
int shard_writer_add(shard_writer *w, int64_t id, int32_t label, const void *sample, const void *pair);
/* Writes the last block and the final header, fsyncs, renames. The writer is freed either way. */
int shard_writer_close(shard_writer *w);
/* Drops the shard: removes the temporary file. */
void shard_writer_abort(shard_writer *w);

typedef struct {
  int fd;
  const char *path;
  shard_header h;
  size_t rec_bytes;
  uint8_t *block;
  uint64_t block_index; /* block held in `block`, UINT64_MAX when none */
  uint64_t next;        /* index of the next record */
  uint64_t bad;         /* records the last error covers */
} shard_reader;

/* Opens a shard whose header shard_probe returned, positioned at record `start`; `path` must stay valid. */
int shard_reader_open(shard_reader *r, const char *path, const shard_header *h, uint64_t start);
/* 1: a record; 0: end; < 0: a bad block (checksum, short read): r->bad records from the current one
 * to the end of the block are lost and the reader continues after them. */
int shard_reader_next(shard_reader *r, data_record *rec);
void shard_reader_close(shard_reader *r);

#endif
