#include "data/npy.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/err.h"
#include "core/file.h"

#define NPY_MAGIC "\x93NUMPY"
#define NPY_ALIGN 64
/* A header longer than this is no array mocod can take (NumPy's own limit for 1.0 is 65535). */
#define NPY_MAX_HEADER (1u << 20)
/* Bound on one sample, as IDX's: a corrupt header must not make us allocate the machine. */
#define NPY_MAX_SAMPLE_ELEMS (1u << 28)

/* ---- the header: a Python dict literal with three keys ---- */

typedef struct {
  const char *p, *end, *path;
  const char *start;
  uint64_t base; /* file offset of start */
} hparse;

static int herr(const hparse *h, const char *field, const char *fmt, const char *what) {
  char msg[256];
  snprintf(msg, sizeof msg, fmt, what);
  return moco_error(MOCO_EFORMAT, "%s: offset %llu: header field '%s': %s", h->path,
                    (unsigned long long)(h->base + (uint64_t)(h->p - h->start)), field, msg);
}

static void skip_ws(hparse *h) {
  while (h->p < h->end && isspace((unsigned char)*h->p)) h->p++;
}

static int take(hparse *h, char c) {
  skip_ws(h);
  if (h->p < h->end && *h->p == c) {
    h->p++;
    return 1;
  }
  return 0;
}

/* A quoted string ('...' or "...") into out. */
static int quoted(hparse *h, char *out, size_t cap) {
  skip_ws(h);
  if (h->p >= h->end || (*h->p != '\'' && *h->p != '"')) return -1;
  char q = *h->p++;
  size_t n = 0;
  while (h->p < h->end && *h->p != q) {
    if (n + 1 < cap) out[n++] = *h->p;
    h->p++;
  }
  if (h->p >= h->end) return -1;
  h->p++;
  out[n] = '\0';
  return 0;
}

static int parse_shape(hparse *h, npy_info *in) {
  if (!take(h, '(')) return herr(h, "shape", "%s", "expected a tuple of integers");
  in->ndim = 0;
  for (;;) {
    if (take(h, ')')) break;
    skip_ws(h);
    /* Digits within [p, end): the header is not NUL-terminated, so no strtoull (found by fuzz_npy). */
    unsigned long long v = 0;
    const char *start = h->p;
    for (; h->p < h->end && *h->p >= '0' && *h->p <= '9'; h->p++) {
      if (v > (ULLONG_MAX - (unsigned)(*h->p - '0')) / 10)
        return herr(h, "shape", "%s", "a dimension does not fit in 64 bits");
      v = v * 10 + (unsigned)(*h->p - '0');
    }
    if (h->p == start) return herr(h, "shape", "%s", "expected a non-negative integer");
    if (in->ndim == 4)
      return herr(h, "shape", "%s", "more than 4 dimensions (expected (N, D), (N, H, W) or (N, C, H, W))");
    in->dims[in->ndim++] = v;
    if (take(h, ')')) break;
    if (!take(h, ',')) return herr(h, "shape", "%s", "expected ',' or ')'");
  }
  return 0;
}

/* Sample and label dtypes: little-endian (or byte-sized, '|'), as the NEP describes them. */
static int parse_descr(hparse *h, npy_info *in) {
  if (quoted(h, in->descr, sizeof in->descr))
    return herr(h, "descr", "%s", "expected a quoted dtype string such as '<f4' (structured dtypes are not taken)");
  const char *d = in->descr;
  if (d[0] == '>' && strcmp(d + 1, "u1") && strcmp(d + 1, "i1"))
    return herr(h, "descr", "'%s' is big-endian; save it as little-endian (a.astype(a.dtype.newbyteorder('<')))", d);
  if (d[0] == 'O' || d[1] == 'O')
    return herr(h, "descr", "'%s' is an object array; save a numeric array (uint8 or float32)", d);
  static const struct {
    const char *name;
    size_t size;
    int sample, is_signed;
  } types[] = {{"u1", 1, 1, 0}, {"f4", 4, 1, 0}, {"i1", 1, 0, 1}, {"i2", 2, 0, 1}, {"u2", 2, 0, 0},
               {"i4", 4, 0, 1}, {"u4", 4, 0, 0}, {"i8", 8, 0, 1}, {"u8", 8, 0, 0}};
  const char *t = (d[0] == '<' || d[0] == '|' || d[0] == '>') ? d + 1 : d;
  for (size_t k = 0; k < sizeof types / sizeof types[0]; k++)
    if (!strcmp(t, types[k].name)) {
      in->elem_size = types[k].size;
      in->is_signed = types[k].is_signed;
      in->dtype = types[k].sample ? (types[k].size == 1 ? DATA_U8 : DATA_F32) : 0;
      return 0;
    }
  return herr(h, "descr", "'%s': expected '|u1' (uint8) or '<f4' (float32) samples, or an integer type for labels "
              "(convert with a.astype(np.float32))", d);
}

static int parse_dict(hparse *h, npy_info *in) {
  int seen_descr = 0, seen_order = 0, seen_shape = 0, rc;
  if (!take(h, '{')) return herr(h, "{", "%s", "expected a dict literal");
  for (;;) {
    if (take(h, '}')) break;
    char key[32];
    if (quoted(h, key, sizeof key)) return herr(h, "{", "%s", "expected a quoted key");
    if (!take(h, ':')) return herr(h, key, "%s", "expected ':'");
    skip_ws(h);
    if (!strcmp(key, "descr")) {
      if ((rc = parse_descr(h, in))) return rc;
      seen_descr = 1;
    } else if (!strcmp(key, "fortran_order")) {
      if ((size_t)(h->end - h->p) >= 4 && !strncmp(h->p, "True", 4))
        return herr(h, "fortran_order", "%s", "True: Fortran-order arrays are not read; save "
                    "np.ascontiguousarray(a)");
      if ((size_t)(h->end - h->p) < 5 || strncmp(h->p, "False", 5))
        return herr(h, "fortran_order", "%s", "expected False");
      h->p += 5;
      seen_order = 1;
    } else if (!strcmp(key, "shape")) {
      if ((rc = parse_shape(h, in))) return rc;
      seen_shape = 1;
    } else {
      return herr(h, key, "%s", "unknown key (expected descr, fortran_order, shape)");
    }
    if (take(h, '}')) break;
    if (!take(h, ',')) return herr(h, key, "%s", "expected ',' or '}' after the value");
  }
  const char *missing = !seen_descr ? "descr" : !seen_order ? "fortran_order" : !seen_shape ? "shape" : NULL;
  if (missing) return herr(h, missing, "%s", "missing");
  return 0;
}

/* What the header's dtype and shape make of the file: samples or labels. */
static int check_layout(const char *path, npy_info *in) {
  if (in->ndim == 0)
    return moco_error(MOCO_EFORMAT, "%s: header field 'shape': (): a scalar, expected (N, ...)", path);
  in->count = in->dims[0];
  if (in->ndim == 1) {
    if (in->dtype == DATA_F32)
      return moco_error(MOCO_EFORMAT, "%s: header field 'descr': '%s' with shape (%llu,): a 1-dimensional file "
                        "holds labels, expected an integer type", path, in->descr, (unsigned long long)in->count);
    in->labels = 1;
    in->sample_elems = 1;
    return 0;
  }
  if (!in->dtype)
    return moco_error(MOCO_EFORMAT, "%s: header field 'descr': '%s': samples must be '|u1' (uint8) or '<f4' "
                      "(float32); integer arrays are labels only when 1-dimensional", path, in->descr);
  uint64_t elems = 1;
  for (int i = 1; i < in->ndim; i++) {
    if (in->dims[i] == 0 || in->dims[i] > (1u << 24))
      return moco_error(MOCO_EFORMAT, "%s: header field 'shape': dimension %d is %llu, expected 1..%u", path, i,
                        (unsigned long long)in->dims[i], 1u << 24);
    elems *= in->dims[i];
    if (elems > NPY_MAX_SAMPLE_ELEMS)
      return moco_error(MOCO_EFORMAT, "%s: header field 'shape': a sample of more than %u elements", path,
                        NPY_MAX_SAMPLE_ELEMS);
  }
  in->sample_elems = (size_t)elems;
  return 0;
}

static int open_file(const char *path, FILE **f) {
  if ((*f = fopen(path, "rb"))) return 0;
  return moco_error(errno == ENOENT ? MOCO_ENOENT : MOCO_EIO, "%s: cannot open: %s", path, strerror(errno));
}

static int read_header(FILE *f, const char *path, npy_info *in) {
  uint8_t pre[12];
  size_t got = fread(pre, 1, 10, f);
  memset(in, 0, sizeof *in);
  if (got < 10)
    return moco_error(MOCO_EEOF, "%s: offset %zu: truncated in the preamble (need 10 bytes)", path, got);
  if (memcmp(pre, NPY_MAGIC, 6))
    return moco_error(MOCO_EFORMAT, "%s: offset 0: bad magic, expected \"\\x93NUMPY\"", path);
  in->major = pre[6];
  uint64_t hlen, off;
  if (in->major == 1) {
    hlen = pre[8] | (uint32_t)pre[9] << 8;
    off = 10;
  } else if (in->major == 2 || in->major == 3) {
    if (fread(pre + 10, 1, 2, f) != 2) return moco_error(MOCO_EEOF, "%s: offset 10: truncated in the preamble", path);
    hlen = pre[8] | (uint32_t)pre[9] << 8 | (uint32_t)pre[10] << 16 | (uint32_t)pre[11] << 24;
    off = 12;
  } else {
    return moco_error(MOCO_EFORMAT, "%s: offset 6: format version %u.%u, expected 1.0, 2.0 or 3.0", path, pre[6],
                      pre[7]);
  }
  if (hlen == 0 || hlen > NPY_MAX_HEADER)
    return moco_error(MOCO_EFORMAT, "%s: offset 8: header length %llu, expected 1..%u", path,
                      (unsigned long long)hlen, NPY_MAX_HEADER);
  char *text = malloc(hlen);
  if (!text) return moco_error(MOCO_ENOMEM, "%s: header of %llu bytes", path, (unsigned long long)hlen);
  int rc = 0;
  if (fread(text, 1, hlen, f) != hlen)
    rc = moco_error(MOCO_EEOF, "%s: offset %llu: truncated in the header (%llu bytes promised)", path,
                    (unsigned long long)off, (unsigned long long)hlen);
  hparse h = {text, text + hlen, path, text, off};
  if (!rc) rc = parse_dict(&h, in);
  free(text);
  in->major = pre[6];
  in->data_off = off + hlen;
  return rc ? rc : check_layout(path, in);
}

int npy_probe(const char *path, npy_info *info) {
  FILE *f;
  int rc = open_file(path, &f);
  if (rc) return rc;
  rc = read_header(f, path, info);
  fclose(f);
  if (rc) return rc;
  struct stat st;
  if (stat(path, &st)) return moco_error(MOCO_EIO, "%s: stat: %s", path, strerror(errno));
  uint64_t rec = (uint64_t)info->sample_elems * info->elem_size;
  uint64_t have = (uint64_t)st.st_size, body = have - info->data_off;
  if (have < info->data_off || body / rec < info->count)
    return moco_error(MOCO_EEOF, "%s: offset %llu: truncated: header field 'shape' promises %llu records of %llu "
                      "bytes, the file holds %llu (record %llu is incomplete)", path, (unsigned long long)have,
                      (unsigned long long)info->count, (unsigned long long)rec, (unsigned long long)have,
                      (unsigned long long)(have < info->data_off ? 0 : body / rec));
  if (body != info->count * rec)
    return moco_error(MOCO_EFORMAT, "%s: offset %llu: %llu bytes after the %llu records header field 'shape' "
                      "promises", path, (unsigned long long)(info->data_off + info->count * rec),
                      (unsigned long long)(body - info->count * rec), (unsigned long long)info->count);
  return 0;
}

data_shape npy_shape(const npy_info *in) {
  switch (in->ndim) {
  case 2: return (data_shape){(int)in->dims[1], 1, 1};
  case 3: return (data_shape){1, (int)in->dims[1], (int)in->dims[2]};
  default: return (data_shape){(int)in->dims[1], (int)in->dims[2], (int)in->dims[3]};
  }
}

/* One little-endian integer label of `in`'s type; -1 .. INT32_MAX, else MOCO_ERANGE naming index i. */
static int decode_label(const char *path, const npy_info *in, const uint8_t *b, uint64_t i, int32_t *out) {
  uint64_t u = 0;
  for (size_t k = 0; k < in->elem_size; k++) u |= (uint64_t)b[k] << (8 * k);
  int64_t v = (int64_t)u;
  if (in->is_signed && in->elem_size < 8) {
    uint64_t sign = 1ull << (8 * in->elem_size - 1);
    v = (int64_t)((u ^ sign) - sign);
  }
  if ((!in->is_signed && u > INT32_MAX) || v < -1 || v > INT32_MAX)
    return moco_error(MOCO_ERANGE, "%s: offset %llu: label %llu is %lld, expected -1 (none) .. %d", path,
                      (unsigned long long)(in->data_off + i * in->elem_size), (unsigned long long)i,
                      in->is_signed ? (long long)v : (long long)u, INT32_MAX);
  *out = (int32_t)v;
  return 0;
}

int npy_max_label(const char *path, const npy_info *info, int32_t *max) {
  FILE *f;
  uint8_t buf[4096];
  int rc = open_file(path, &f);
  if (rc) return rc;
  *max = -1;
  if (fseeko(f, (off_t)info->data_off, SEEK_SET)) rc = moco_error(MOCO_EIO, "%s: seek: %s", path, strerror(errno));
  size_t per = sizeof buf / info->elem_size;
  for (uint64_t i = 0; !rc && i < info->count;) {
    size_t k = info->count - i < per ? (size_t)(info->count - i) : per;
    if (fread(buf, info->elem_size, k, f) != k) {
      rc = moco_error(MOCO_EEOF, "%s: label %llu: the file ends early", path, (unsigned long long)i);
      break;
    }
    for (size_t j = 0; !rc && j < k; j++) {
      int32_t v;
      if (!(rc = decode_label(path, info, buf + j * info->elem_size, i + j, &v)) && v > *max) *max = v;
    }
    i += k;
  }
  fclose(f);
  return rc;
}

/* ---- reading ---- */

/* unbuffered: a seekable reader's reads fetch the record they ask for and nothing ahead of it. */
static int open_at(FILE **f, const char *path, npy_info *in, uint64_t start, int unbuffered) {
  int rc = open_file(path, f);
  if (!rc) rc = read_header(*f, path, in);
  if (rc) return rc;
  if (start > in->count)
    return moco_error(MOCO_ERANGE, "%s: start record %llu beyond the %llu records", path, (unsigned long long)start,
                      (unsigned long long)in->count);
  setvbuf(*f, NULL, unbuffered ? _IONBF : _IOFBF, unbuffered ? 0 : 1 << 17);
  off_t to = (off_t)(in->data_off + start * in->sample_elems * in->elem_size);
  if (fseeko(*f, to, SEEK_SET)) return moco_error(MOCO_EIO, "%s: seek to offset %lld: %s", path, (long long)to, strerror(errno));
  return 0;
}

static int open_reader(npy_reader *r, const char *path, const char *labels_path, uint64_t start, int seekable) {
  memset(r, 0, sizeof *r);
  r->path = path;
  r->labels_path = labels_path;
  r->next = start;
  int rc = open_at(&r->f, path, &r->info, start, seekable);
  if (!rc && labels_path) rc = open_at(&r->lf, labels_path, &r->linfo, start, seekable);
  if (!rc && !(r->buf = malloc(r->info.sample_elems * r->info.elem_size)))
    rc = moco_error(MOCO_ENOMEM, "%s: a record of %zu elements", path, r->info.sample_elems);
  if (rc) npy_reader_close(r);
  return rc;
}

int npy_reader_open(npy_reader *r, const char *path, const char *labels_path, uint64_t start) {
  return open_reader(r, path, labels_path, start, 0);
}

int npy_reader_open_seekable(npy_reader *r, const char *path, const char *labels_path) {
  return open_reader(r, path, labels_path, 0, 1);
}

static int seek_to(FILE *f, const char *path, const npy_info *in, uint64_t index) {
  off_t to = (off_t)(in->data_off + index * in->sample_elems * in->elem_size);
  if (fseeko(f, to, SEEK_SET)) return moco_error(MOCO_EIO, "%s: seek to offset %lld: %s", path, (long long)to, strerror(errno));
  return 0;
}

int npy_reader_seek(npy_reader *r, uint64_t index) {
  if (index > r->info.count)
    return moco_error(MOCO_ERANGE, "%s: record %llu beyond the %llu records", r->path, (unsigned long long)index,
                      (unsigned long long)r->info.count);
  if (index == r->next) return 0;
  int rc = seek_to(r->f, r->path, &r->info, index);
  if (!rc && r->lf) rc = seek_to(r->lf, r->labels_path, &r->linfo, index);
  if (!rc) r->next = index;
  return rc;
}

void npy_reader_close(npy_reader *r) {
  if (r->f) fclose(r->f);
  if (r->lf) fclose(r->lf);
  free(r->buf);
  r->f = r->lf = NULL;
  r->buf = NULL;
}

int npy_reader_next(npy_reader *r, data_record *rec) {
  if (r->next >= r->info.count) return 0;
  size_t bytes = r->info.sample_elems * r->info.elem_size;
  int32_t label = -1;
  int rc = 0;
  if (fread(r->buf, 1, bytes, r->f) != bytes)
    rc = moco_error(MOCO_EEOF, "%s: offset %llu: record %llu is cut short (the file changed after it was opened?)",
                    r->path, (unsigned long long)(r->info.data_off + r->next * bytes), (unsigned long long)r->next);
  uint8_t b[8];
  if (!rc && r->lf) {
    if (fread(b, 1, r->linfo.elem_size, r->lf) != r->linfo.elem_size)
      rc = moco_error(MOCO_EEOF, "%s: label %llu is missing (the file changed after it was opened?)", r->labels_path,
                      (unsigned long long)r->next);
    else if ((rc = decode_label(r->labels_path, &r->linfo, b, r->next, &label))) {
      r->bad = 1; /* one bad label: the streams stay in step, reading may go on */
      r->next++;
      return rc;
    }
  }
  if (rc) {
    r->bad = r->info.count - r->next;
    r->next = r->info.count;
    return rc;
  }
  rec->id = (int64_t)r->next++;
  rec->label = label;
  rec->sample = r->buf;
  rec->pair = NULL;
  return 1;
}

/* ---- writing ---- */

/* The header of an array, padded to at least `min_total` bytes (and a multiple of NPY_ALIGN). */
static size_t header_fill(char *buf, size_t cap, const char *descr, int ndim, const uint64_t *dims, size_t min_total) {
  char shape[128];
  int n = 0;
  for (int i = 0; i < ndim; i++)
    n += snprintf(shape + n, sizeof shape - (size_t)n, "%s%" PRIu64, i ? ", " : "", dims[i]);
  if (ndim == 1) snprintf(shape + n, sizeof shape - (size_t)n, ",");
  char dict[256];
  int len = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }", descr, shape);
  size_t total = (10 + (size_t)len + 1 + NPY_ALIGN - 1) / NPY_ALIGN * NPY_ALIGN;
  if (total < min_total) total = min_total;
  if (total > cap || total - 10 > 65535) return 0;
  size_t hlen = total - 10;
  memcpy(buf, NPY_MAGIC "\x01\x00", 8);
  buf[8] = (char)(hlen & 0xff);
  buf[9] = (char)(hlen >> 8);
  memset(buf + 10, ' ', hlen);
  memcpy(buf + 10, dict, (size_t)len);
  buf[total - 1] = '\n';
  return total;
}

size_t npy_header(char *buf, size_t cap, const char *descr, int ndim, const uint64_t *dims) {
  return header_fill(buf, cap, descr, ndim, dims, 0);
}

static size_t descr_size(const char *descr) {
  size_t n = strlen(descr);
  return n >= 2 ? (size_t)atoi(descr + n - 1) : 0;
}

int npy_writer_open(npy_writer *w, const char *path, const char *descr, int ndim, const uint64_t *dims) {
  memset(w, 0, sizeof *w);
  size_t es = descr_size(descr);
  if (ndim < 1 || ndim > 4 || strlen(descr) >= sizeof w->descr || !es)
    return moco_error(MOCO_EINVAL, "%s: npy writer: descr '%s', %d dimensions", path, descr, ndim);
  snprintf(w->descr, sizeof w->descr, "%s", descr);
  w->ndim = ndim;
  w->record_bytes = es;
  for (int i = 1; i < ndim; i++) {
    w->dims[i] = dims[i];
    w->record_bytes *= dims[i];
  }
  /* Room for any count: the header is written with the largest, and rewritten padded to this length. */
  char head[512];
  w->dims[0] = UINT64_MAX;
  w->header_len = header_fill(head, sizeof head, descr, ndim, w->dims, 0);
  w->dims[0] = 0;
  size_t n = strlen(path) + 5;
  w->path = strdup(path);
  w->tmp = malloc(n);
  if (!w->path || !w->tmp || !w->header_len) {
    npy_writer_abort(w);
    return moco_error(MOCO_ENOMEM, "%s: npy writer", path);
  }
  snprintf(w->tmp, n, "%s.tmp", path);
  if (!(w->f = fopen(w->tmp, "wb"))) {
    int e = errno;
    npy_writer_abort(w);
    return moco_error(MOCO_EIO, "%s.tmp: cannot create: %s", path, strerror(e));
  }
  if (fwrite(head, 1, w->header_len, w->f) != w->header_len) {
    npy_writer_abort(w);
    return moco_error(MOCO_EIO, "%s.tmp: write failed", path);
  }
  return 0;
}

int npy_writer_add(npy_writer *w, const void *records, uint64_t n) {
  if (n && fwrite(records, w->record_bytes, (size_t)n, w->f) != n)
    return moco_error(MOCO_EIO, "%s: write failed: %s", w->tmp, strerror(errno));
  w->dims[0] += n;
  return 0;
}

int npy_writer_close(npy_writer *w) {
  char head[512];
  size_t len = header_fill(head, sizeof head, w->descr, w->ndim, w->dims, w->header_len);
  int rc = 0;
  if (len != w->header_len || fseeko(w->f, 0, SEEK_SET) || fwrite(head, 1, len, w->f) != len)
    rc = moco_error(MOCO_EIO, "%s: rewriting the header failed", w->tmp);
  if (!rc) {
    rc = file_commit_stream(w->f, w->tmp, w->path);
    w->f = NULL;
  }
  if (rc) npy_writer_abort(w);
  free(w->path);
  free(w->tmp);
  memset(w, 0, sizeof *w);
  return rc;
}

void npy_writer_abort(npy_writer *w) {
  if (w->f) {
    fclose(w->f);
    unlink(w->tmp);
  }
  free(w->path);
  free(w->tmp);
  memset(w, 0, sizeof *w);
}

int npy_write(const char *path, const char *descr, int ndim, const uint64_t *dims, const void *data) {
  npy_writer w;
  int rc = npy_writer_open(&w, path, descr, ndim, dims);
  if (!rc) rc = npy_writer_add(&w, data, dims[0]);
  if (rc) {
    npy_writer_abort(&w);
    return rc;
  }
  return npy_writer_close(&w);
}
