/* NumPy .npy files (https://numpy.org/neps/nep-0001-npy-format.html), read as a stream and written.
 *
 *   "\x93NUMPY" | major u8 | minor u8 | header length (u16 LE in 1.0, u32 LE in 2.0 and 3.0)
 *   | header: a Python dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (N, ...), }
 *   | the array's elements, C order
 *
 * As samples: uint8 ('|u1') or float32 ('<f4'); shape (N, D) is N vectors (D, 1, 1), (N, H, W) N images
 * (1, H, W), (N, C, H, W) N images (C, H, W). As labels: one dimension (N,) of a little-endian integer
 * type (u1, i1, i2, u2, i4, u4, i8, u8), each value in [-1, 2^31) (-1: unlabelled). Refused, naming the
 * file and the header field: Fortran order, big-endian or object arrays, any other dtype, a missing or
 * unknown key, a file whose size disagrees with its shape. Records are found by offset, so a reader
 * starts anywhere without reading what comes before. */
#ifndef MOCO_DATA_NPY_H
#define MOCO_DATA_NPY_H

#include <stdint.h>
#include <stdio.h>

#include "data/record.h"

typedef struct {
  int major;            /* format version 1, 2 or 3 */
  char descr[8];        /* as written: "|u1", "<f4", "<i8", ... */
  int ndim;
  uint64_t dims[4];
  uint64_t count;       /* dims[0] */
  int labels;           /* 1: a labels file (one integer dimension) */
  int is_signed;        /* labels: the integer type is signed */
  data_dtype dtype;     /* samples */
  size_t elem_size;
  size_t sample_elems;  /* elements per record (1 for labels) */
  uint64_t data_off;    /* offset of the first element */
} npy_info;

/* Reads and checks the header and that the file size is the one the shape implies. */
int npy_probe(const char *path, npy_info *info);
/* Sample shape of a samples file: (D,1,1), (1,H,W) or (C,H,W). */
data_shape npy_shape(const npy_info *info);
/* Largest label of a labels file npy_probe checked (-1 when empty); reads the whole file and refuses a
 * value outside [-1, 2^31) naming its index. */
int npy_max_label(const char *path, const npy_info *info, int32_t *max);

typedef struct {
  FILE *f, *lf;         /* samples, labels (NULL when none) */
  const char *path, *labels_path;
  npy_info info, linfo;
  uint8_t *buf;
  uint64_t next;        /* index of the next record */
  uint64_t bad;         /* records the last error covers */
} npy_reader;

/* Opens the samples file (and a labels file, may be NULL) at record `start`; both paths must stay valid
 * while the reader is open and both files must have been probed. */
int npy_reader_open(npy_reader *r, const char *path, const char *labels_path, uint64_t start);
/* A reader for records taken out of order (npy_reader_seek, then npy_reader_next), unbuffered, so that
 * a read fetches that record's bytes alone. */
int npy_reader_open_seekable(npy_reader *r, const char *path, const char *labels_path);
/* The next npy_reader_next returns record `index`. */
int npy_reader_seek(npy_reader *r, uint64_t index);
/* 1: a record; 0: end; < 0: a short read (the file changed since it was probed): r->bad records, to
 * the end of the file, are lost. */
int npy_reader_next(npy_reader *r, data_record *rec);
void npy_reader_close(npy_reader *r);

/* The preamble and header of an array of `descr` and shape dims[0..ndim) (C order), padded with spaces
 * and '\n' so that the data starts at a multiple of 64 bytes (as NumPy writes it since 1.14). Returns
 * its length, or 0 when it does not fit cap. */
size_t npy_header(char *buf, size_t cap, const char *descr, int ndim, const uint64_t *dims);

/* An array written record by record when the number of records is not known in advance (a stream may
 * skip bad ones): to "<path>.tmp", the header rewritten with the final count and the file renamed into
 * place by npy_writer_close (fsync, rename, fsync of the directory), so nothing half-written is ever
 * found under `path`. dims[1..ndim) is one record's shape; dims[0] is ignored. */
typedef struct {
  FILE *f;
  char *path, *tmp;
  char descr[8];
  int ndim;
  uint64_t dims[4];
  size_t record_bytes, header_len;
} npy_writer;

int npy_writer_open(npy_writer *w, const char *path, const char *descr, int ndim, const uint64_t *dims);
int npy_writer_add(npy_writer *w, const void *records, uint64_t n);
int npy_writer_close(npy_writer *w);
void npy_writer_abort(npy_writer *w);

/* A whole array in one call (tests, tools): ndim 1..4, atomic as npy_writer. */
int npy_write(const char *path, const char *descr, int ndim, const uint64_t *dims, const void *data);

#endif
