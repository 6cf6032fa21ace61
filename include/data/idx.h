/* IDX, the MNIST / Fashion-MNIST format (LeCun et al.), plain or gzip-compressed, read as a stream.
 *
 *   magic: 0x00 0x00 <type> <ndim> | ndim dimensions (u32 big-endian) | elements, big-endian, row-major
 *
 * type 0x08 u8, 0x09 i8, 0x0B i16, 0x0C i32, 0x0D f32, 0x0E f64. dims[0] is the record count; the rest
 * is one sample: 2 dims are a vector (D,1,1), 3 are an image (1,H,W), 4 are (C,H,W). A 1-dimensional
 * u8 or i32 file holds labels. u8 samples stay u8; every other type is converted to float32. zlib reads
 * plain files transparently, so one code path serves both. */
#ifndef MOCO_DATA_IDX_H
#define MOCO_DATA_IDX_H

#include <stdint.h>
#include <zlib.h>

#include "data/record.h"

enum {
  IDX_U8 = 0x08,
  IDX_I8 = 0x09,
  IDX_I16 = 0x0B,
  IDX_I32 = 0x0C,
  IDX_F32 = 0x0D,
  IDX_F64 = 0x0E,
};

typedef struct {
  int type, ndim;
  uint32_t dims[4];
  uint64_t count;      /* dims[0] */
  size_t elem_size;    /* bytes per stored element */
  size_t sample_elems; /* elements per record: product of dims[1..] (1 for labels) */
  size_t header_bytes; /* 4 + 4 * ndim */
  int gz;              /* 1 when the file is gzip-compressed */
} idx_info;

/* Reads and checks the header. A plain file's size must match the header exactly (a short file is
 * truncated, a long one disagrees with its record count); a gzip file is checked while it is read. */
int idx_probe(const char *path, idx_info *info);

/* Largest label of a labels file (1-dimensional IDX) that idx_probe checked, -1 when it is empty; reads
 * the whole file (one byte or four per record), so a truncated one is found here. */
int idx_max_label(const char *path, const idx_info *info, int32_t *max);

typedef struct {
  gzFile f, lf;            /* samples, labels (NULL when none) */
  const char *path, *labels_path;
  idx_info info, linfo;
  data_dtype dtype;        /* DATA_U8 for u8 files, DATA_F32 otherwise */
  uint8_t *raw, *out;      /* one record as stored / converted (out == raw for u8) */
  uint64_t next;           /* index of the next record */
  uint64_t bad;            /* records the last error covers (a bad-record policy of "skip" skips them) */
} idx_reader;

/* Opens the samples file (and labels file, may be NULL) positioned at record `start`. Both paths must
 * stay valid while the reader is open. The headers are the ones idx_probe checked. */
int idx_reader_open(idx_reader *r, const char *path, const char *labels_path, uint64_t start);
/* A reader for records taken out of order (idx_reader_seek, then idx_reader_next): it reads ahead
 * nothing, so a read fetches that record's bytes alone. Plain files only: MOCO_ESTATE for gzip, a
 * stream that is read from its start. */
int idx_reader_open_seekable(idx_reader *r, const char *path, const char *labels_path);
/* The next idx_reader_next returns record `index` (of a seekable reader). */
int idx_reader_seek(idx_reader *r, uint64_t index);
/* 1: a record in *rec; 0: end of file; < 0: bad data (a truncated stream): r->bad records are lost and
 * the reader is at the end. */
int idx_reader_next(idx_reader *r, data_record *rec);
void idx_reader_close(idx_reader *r);

/* Writes an IDX file (gzip-compressed when gz) from host-order elements of `type`: for tests and tools. */
int idx_write(const char *path, int gz, int type, int ndim, const uint32_t *dims, const void *data);

#endif
