#include "data/idx.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/err.h"

/* Bound on one sample (2^28 elements, 1 GiB as f32): a corrupt header must not make us allocate the
 * machine, and no sample a network here can take is larger. */
#define IDX_MAX_SAMPLE_ELEMS (1u << 28)

static size_t type_size(int type) {
  switch (type) {
  case IDX_U8: case IDX_I8: return 1;
  case IDX_I16: return 2;
  case IDX_I32: case IDX_F32: return 4;
  case IDX_F64: return 8;
  default: return 0;
  }
}

static uint32_t be32(const uint8_t *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int open_gz(gzFile *f, const char *path) {
  errno = 0;
  if ((*f = gzopen(path, "rb"))) return 0;
  return moco_error(errno == ENOENT ? MOCO_ENOENT : MOCO_EIO, "%s: cannot open: %s", path,
                    errno ? strerror(errno) : "zlib failure");
}

/* Reads exactly n bytes; a short read names the offset in the uncompressed stream. */
static int read_exact(gzFile f, const char *path, void *p, size_t n, const char *what) {
  z_off_t at = gztell(f);
  int got = gzread(f, p, (unsigned)n);
  if (got == (int)n) return 0;
  int zerr = 0;
  const char *zmsg = gzerror(f, &zerr);
  if (got < 0 || (zerr != Z_OK && zerr != Z_BUF_ERROR))
    return moco_error(MOCO_EIO, "%s: offset %lld: reading %s: %s", path, (long long)at, what, zmsg);
  return moco_error(MOCO_EEOF, "%s: offset %lld: truncated in %s: need %zu bytes, found %d", path,
                    (long long)at, what, n, got < 0 ? 0 : got);
}

static int parse_header(gzFile f, const char *path, idx_info *in) {
  uint8_t m[4], d[16];
  int rc = read_exact(f, path, m, 4, "the header");
  if (rc) return rc;
  uint32_t magic = be32(m);
  if (m[0] || m[1] || !type_size(m[2]) || m[3] < 1 || m[3] > 4)
    return moco_error(MOCO_EFORMAT,
                      "%s: offset 0: bad magic 0x%08x, expected 0x0000TTNN (IDX: type 08/09/0B/0C/0D/0E, "
                      "1..4 dimensions)", path, magic);
  memset(in, 0, sizeof *in);
  in->type = m[2];
  in->ndim = m[3];
  in->elem_size = type_size(in->type);
  in->header_bytes = 4 + 4 * (size_t)in->ndim;
  if ((rc = read_exact(f, path, d, 4 * (size_t)in->ndim, "the dimensions"))) return rc;
  uint64_t elems = 1;
  for (int i = 0; i < in->ndim; i++) {
    in->dims[i] = be32(d + 4 * i);
    if (i == 0) continue;
    if (in->dims[i] == 0)
      return moco_error(MOCO_EFORMAT, "%s: offset %d: dimension %d is 0, expected >= 1", path, 4 + 4 * i, i);
    elems *= in->dims[i];
    if (elems > IDX_MAX_SAMPLE_ELEMS)
      return moco_error(MOCO_EFORMAT, "%s: offset %d: a sample of more than %u elements", path, 4 + 4 * i,
                        IDX_MAX_SAMPLE_ELEMS);
  }
  in->count = in->dims[0];
  in->sample_elems = (size_t)elems;
  if (in->ndim == 1 && in->type != IDX_U8 && in->type != IDX_I32)
    return moco_error(MOCO_EFORMAT, "%s: a 1-dimensional IDX file holds labels: type 0x%02x, expected 0x08 "
                      "(u8) or 0x0C (i32)", path, in->type);
  return 0;
}

int idx_probe(const char *path, idx_info *info) {
  gzFile f;
  int rc = open_gz(&f, path);
  if (rc) return rc;
  rc = parse_header(f, path, info);
  info->gz = !gzdirect(f);
  gzclose(f);
  if (rc) return rc;
  if (info->gz) return 0;
  struct stat st;
  if (stat(path, &st)) return moco_error(MOCO_EIO, "%s: stat: %s", path, strerror(errno));
  uint64_t rec = (uint64_t)info->sample_elems * info->elem_size;
  uint64_t want = info->header_bytes + info->count * rec, have = (uint64_t)st.st_size;
  if (have < want)
    return moco_error(MOCO_EEOF, "%s: offset %llu: truncated: the header promises %llu records (%llu bytes), "
                      "the file holds %llu bytes (record %llu is incomplete)", path, (unsigned long long)have,
                      (unsigned long long)info->count, (unsigned long long)want, (unsigned long long)have,
                      (unsigned long long)((have - info->header_bytes) / rec));
  if (have > want)
    return moco_error(MOCO_EFORMAT, "%s: offset %llu: %llu bytes after the %llu records the header promises",
                      path, (unsigned long long)want, (unsigned long long)(have - want),
                      (unsigned long long)info->count);
  return 0;
}

int idx_max_label(const char *path, const idx_info *info, int32_t *max) {
  gzFile f;
  idx_info in;
  uint8_t buf[4096];
  int rc = open_gz(&f, path);
  if (rc) return rc;
  gzbuffer(f, 1 << 16);
  rc = parse_header(f, path, &in);
  *max = -1;
  for (uint64_t i = 0; !rc && i < info->count;) {
    uint64_t k = (sizeof buf / info->elem_size < info->count - i) ? sizeof buf / info->elem_size : info->count - i;
    if ((rc = read_exact(f, path, buf, (size_t)k * info->elem_size, "the labels"))) break;
    for (uint64_t j = 0; j < k; j++) {
      int32_t v = info->type == IDX_U8 ? buf[j] : (int32_t)be32(buf + 4 * j);
      if (v > *max) *max = v;
    }
    i += k;
  }
  gzclose(f);
  return rc;
}

/* buf: zlib's buffer; a seekable reader's is one record, so that a read fetches that record alone. */
static int open_at(gzFile *f, const char *path, idx_info *in, uint64_t start, unsigned buf) {
  int rc = open_gz(f, path);
  if (rc) return rc;
  gzbuffer(*f, buf);
  rc = parse_header(*f, path, in);
  if (rc) return rc;
  if (start > in->count)
    return moco_error(MOCO_ERANGE, "%s: start record %llu beyond the %llu records", path,
                      (unsigned long long)start, (unsigned long long)in->count);
  /* zlib emulates a forward seek in a gzip stream by decompressing: resuming costs one pass. */
  z_off_t to = (z_off_t)(in->header_bytes + start * in->sample_elems * in->elem_size);
  if (start && gzseek(*f, to, SEEK_SET) != to)
    return moco_error(MOCO_EEOF, "%s: cannot seek to record %llu (offset %lld): the file ends early", path,
                      (unsigned long long)start, (long long)to);
  return 0;
}

static int open_reader(idx_reader *r, const char *path, const char *labels_path, uint64_t start, int seekable) {
  memset(r, 0, sizeof *r);
  r->path = path;
  r->labels_path = labels_path;
  r->next = start;
  /* zlib reads a request at least as large as its buffer straight into the caller's memory: with 64
   * bytes, a seekable reader's read of a sample fetches that sample alone. */
  unsigned buf = seekable ? 64 : 1u << 17;
  int rc = open_at(&r->f, path, &r->info, start, buf);
  if (!rc && seekable && !gzdirect(r->f))
    rc = moco_error(MOCO_ESTATE, "%s: gzip-compressed: a stream, its records cannot be read out of order", path);
  if (!rc && labels_path) rc = open_at(&r->lf, labels_path, &r->linfo, start, buf);
  if (rc) {
    idx_reader_close(r);
    return rc;
  }
  r->dtype = r->info.type == IDX_U8 ? DATA_U8 : DATA_F32;
  size_t n = r->info.sample_elems;
  r->raw = malloc(n * r->info.elem_size);
  r->out = r->dtype == DATA_U8 ? r->raw : malloc(n * 4);
  if (!r->raw || !r->out) {
    idx_reader_close(r);
    return moco_error(MOCO_ENOMEM, "%s: reader buffers for %zu elements", path, n);
  }
  return 0;
}

int idx_reader_open(idx_reader *r, const char *path, const char *labels_path, uint64_t start) {
  return open_reader(r, path, labels_path, start, 0);
}

int idx_reader_open_seekable(idx_reader *r, const char *path, const char *labels_path) {
  return open_reader(r, path, labels_path, 0, 1);
}

static int seek_to(gzFile f, const char *path, const idx_info *in, uint64_t index) {
  z_off_t to = (z_off_t)(in->header_bytes + index * in->sample_elems * in->elem_size);
  if (gzseek(f, to, SEEK_SET) != to)
    return moco_error(MOCO_EIO, "%s: cannot seek to record %llu (offset %lld)", path, (unsigned long long)index,
                      (long long)to);
  return 0;
}

int idx_reader_seek(idx_reader *r, uint64_t index) {
  if (index > r->info.count)
    return moco_error(MOCO_ERANGE, "%s: record %llu beyond the %llu records", r->path, (unsigned long long)index,
                      (unsigned long long)r->info.count);
  if (index == r->next) return 0;
  int rc = seek_to(r->f, r->path, &r->info, index);
  if (!rc && r->lf) rc = seek_to(r->lf, r->labels_path, &r->linfo, index);
  if (!rc) r->next = index;
  return rc;
}

void idx_reader_close(idx_reader *r) {
  if (r->f) gzclose(r->f);
  if (r->lf) gzclose(r->lf);
  if (r->out != r->raw) free(r->out);
  free(r->raw);
  r->f = r->lf = NULL;
  r->raw = r->out = NULL;
}

/* Big-endian stored elements to float32 (the loader's one float type). */
static void convert(int type, const uint8_t *p, float *out, size_t n) {
  for (size_t i = 0; i < n; i++) {
    switch (type) {
    case IDX_I8: out[i] = (int8_t)p[i]; break;
    case IDX_I16: out[i] = (int16_t)((uint16_t)p[2 * i] << 8 | p[2 * i + 1]); break;
    case IDX_I32: out[i] = (float)(int32_t)be32(p + 4 * i); break;
    case IDX_F32: {
      uint32_t u = be32(p + 4 * i);
      memcpy(&out[i], &u, 4);
      break;
    }
    default: { /* IDX_F64 */
      uint64_t u = (uint64_t)be32(p + 8 * i) << 32 | be32(p + 8 * i + 4);
      double d;
      memcpy(&d, &u, 8);
      out[i] = (float)d;
    }
    }
  }
}

int idx_reader_next(idx_reader *r, data_record *rec) {
  if (r->next >= r->info.count) return 0;
  size_t n = r->info.sample_elems;
  int rc = read_exact(r->f, r->path, r->raw, n * r->info.elem_size, "a sample");
  int32_t label = -1;
  if (!rc && r->lf) {
    uint8_t b[4];
    if (!(rc = read_exact(r->lf, r->labels_path, b, r->linfo.elem_size, "a label")))
      label = r->linfo.type == IDX_U8 ? b[0] : (int32_t)be32(b);
  }
  if (rc) {
    /* A gzip stream cannot be resynchronised: everything from here on is lost. */
    r->bad = r->info.count - r->next;
    moco_error_wrap(rc, "record %llu of %llu", (unsigned long long)r->next,
                    (unsigned long long)r->info.count);
    r->next = r->info.count;
    return rc;
  }
  if (r->dtype == DATA_F32) convert(r->info.type, r->raw, (float *)r->out, n);
  rec->id = (int64_t)r->next++;
  rec->label = label;
  rec->sample = r->out;
  rec->pair = NULL;
  return 1;
}

static void put_be(uint8_t *p, int type, const void *data, size_t i) {
  uint64_t u = 0;
  size_t k = type_size(type);
  if (type == IDX_F64) {
    double d = ((const double *)data)[i];
    memcpy(&u, &d, 8);
  } else if (k == 4) {
    uint32_t v;
    memcpy(&v, (const uint8_t *)data + 4 * i, 4);
    u = v;
  } else if (k == 2) {
    u = ((const uint16_t *)data)[i];
  } else {
    u = ((const uint8_t *)data)[i];
  }
  for (size_t b = 0; b < k; b++) p[b] = (uint8_t)(u >> (8 * (k - 1 - b)));
}

int idx_write(const char *path, int gz, int type, int ndim, const uint32_t *dims, const void *data) {
  if (!type_size(type) || ndim < 1 || ndim > 4)
    return moco_error(MOCO_EINVAL, "idx_write %s: type 0x%02x, %d dims", path, type, ndim);
  gzFile f = gzopen(path, gz ? "wb6" : "wbT");
  if (!f) return moco_error(MOCO_EIO, "%s: cannot create: %s", path, strerror(errno));
  uint8_t hdr[20] = {0, 0, (uint8_t)type, (uint8_t)ndim};
  size_t n = 1;
  for (int i = 0; i < ndim; i++) {
    for (int b = 0; b < 4; b++) hdr[4 + 4 * i + b] = (uint8_t)(dims[i] >> (8 * (3 - b)));
    n *= dims[i];
  }
  int ok = gzwrite(f, hdr, 4 + 4 * ndim) == 4 + 4 * ndim;
  uint8_t buf[4096];
  size_t k = type_size(type), per = sizeof buf / k;
  for (size_t i = 0; ok && i < n; i += per) {
    size_t m = n - i < per ? n - i : per;
    for (size_t j = 0; j < m; j++) put_be(buf + j * k, type, data, i + j);
    ok = gzwrite(f, buf, (unsigned)(m * k)) == (int)(m * k);
  }
  if (gzclose(f) != Z_OK || !ok) return moco_error(MOCO_EIO, "%s: write failed", path);
  return 0;
}
