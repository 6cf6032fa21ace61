/* Synthetic data sets for the data suites. Record i has id i, label i % classes and a sample whose
 * elements are a function of i, so a test can tell any record from its bytes and check it arrived
 * whole. Header-only (static inline) because only the data suites use it. */
#ifndef MOCO_TESTS_DATA_FIXTURES_H
#define MOCO_TESTS_DATA_FIXTURES_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/blob.h"
#include "data/shard.h"

/* Element k of record i (view 0 or 1). u8 values stay away from 0 and 255 so any mix-up shows. */
static inline float fx_value(uint64_t i, size_t k, int view, data_dtype t) {
  if (t == DATA_U8) return (float)(1 + (i * 7 + k * 3 + (uint64_t)view * 101) % 253);
  return (float)i + 0.001f * (float)k + 0.5f * (float)view;
}

static inline void fx_sample(uint64_t i, int view, data_shape s, data_dtype t, uint8_t *out) {
  size_t n = data_shape_size(s);
  for (size_t k = 0; k < n; k++) {
    float v = fx_value(i, k, view, t);
    if (t == DATA_U8)
      out[k] = (uint8_t)v;
    else
      memcpy(out + 4 * k, &v, 4);
  }
}

/* Writes n_shards shards "<dir>/<prefix>-<k>.shard" of per_shard records each (ids continue across
 * shards); returns 0 or the writer's error. `glob` receives "<dir>/<prefix>-*.shard". */
static inline int fx_write_shards(const char *dir, const char *prefix, int n_shards, uint64_t per_shard,
                                  data_shape s, data_dtype t, int labels, int pair, int classes,
                                  uint32_t block_records, char *glob, size_t glob_len) {
  shard_header h = {.flags = (labels ? SHARD_LABELS : 0u) | (pair ? SHARD_PAIR : 0u), .dtype = t, .shape = s,
                    .num_classes = (uint32_t)classes, .block_records = block_records};
  size_t sb = data_shape_size(s) * data_dtype_size(t);
  uint8_t *a = malloc(sb), *b = malloc(sb);
  uint64_t id = 0;
  int rc = 0;
  for (int k = 0; !rc && k < n_shards; k++) {
    char path[512];
    shard_writer w;
    snprintf(path, sizeof path, "%s/%s-%d.shard", dir, prefix, k);
    if ((rc = shard_writer_open(&w, path, &h))) break;
    for (uint64_t j = 0; !rc && j < per_shard; j++, id++) {
      fx_sample(id, 0, s, t, a);
      if (pair) fx_sample(id, 1, s, t, b);
      rc = shard_writer_add(&w, (int64_t)id, classes ? (int32_t)(id % (uint64_t)classes) : 0, a, pair ? b : NULL);
    }
    if (rc)
      shard_writer_abort(&w);
    else
      rc = shard_writer_close(&w);
  }
  free(a);
  free(b);
  if (glob) snprintf(glob, glob_len, "%s/%s-*.shard", dir, prefix);
  return rc;
}

static inline long fx_file_size(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return -1;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fclose(f);
  return n;
}

static inline int fx_read(const char *path, long off, void *p, size_t n) {
  FILE *f = fopen(path, "rb");
  if (!f) return -1;
  int ok = fseek(f, off, SEEK_SET) == 0 && fread(p, 1, n, f) == n;
  fclose(f);
  return ok ? 0 : -1;
}

static inline int fx_write(const char *path, long off, const void *p, size_t n) {
  FILE *f = fopen(path, "r+b");
  if (!f) return -1;
  int ok = fseek(f, off, SEEK_SET) == 0 && fwrite(p, 1, n, f) == n;
  fclose(f);
  return ok ? 0 : -1;
}

/* Flips one bit of the byte at `off`. */
static inline int fx_flip(const char *path, long off) {
  uint8_t b;
  if (fx_read(path, off, &b, 1)) return -1;
  b ^= 0x10;
  return fx_write(path, off, &b, 1);
}

static inline int fx_truncate(const char *path, long len) {
  FILE *f = fopen(path, "r+b");
  if (!f) return -1;
  int rc = ftruncate(fileno(f), len);
  fclose(f);
  return rc;
}

/* Offset of record r in a shard, and of the checksum of the block holding it. */
static inline long fx_record_offset(const shard_header *h, uint64_t r) {
  uint64_t b = r / h->block_records;
  return (long)(SHARD_HEADER_BYTES + r * shard_record_bytes(h) + 4 * b);
}

/* Recomputes the checksum of the block holding record r, after a test edited a record on purpose (the
 * edit is then invisible to the checksum and must be caught by the content checks). */
static inline int fx_fix_block_crc(const char *path, const shard_header *h, uint64_t r) {
  uint64_t b = r / h->block_records, first = b * h->block_records;
  uint64_t n = h->count - first < h->block_records ? h->count - first : h->block_records;
  size_t len = (size_t)n * shard_record_bytes(h);
  long off = fx_record_offset(h, first);
  uint8_t *buf = malloc(len);
  int rc = buf ? fx_read(path, off, buf, len) : -1;
  if (!rc) {
    uint32_t crc = blob_crc32(buf, len);
    rc = fx_write(path, off + (long)len, &crc, 4);
  }
  free(buf);
  return rc;
}

#endif
