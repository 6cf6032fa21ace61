/* Embedding export as NumPy .npy files (format 1.0, see train/eval.h), written atomically. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/file.h"
#include "train/eval.h"

/* NumPy aligns the data of a .npy file to 64 bytes since 1.14 (and requires 16): the whole preamble
 * (10 bytes + header) is padded to that. */
#define NPY_ALIGN 64
#define NPY_PREAMBLE 10

/* Fills buf with the preamble and header of an array of `descr` with shape (n, dim), or (n,) when
 * dim is 0; returns its length, a multiple of NPY_ALIGN. */
static size_t npy_header(char *buf, size_t cap, const char *descr, int64_t n, int dim) {
  char shape[64], dict[192];
  if (dim)
    snprintf(shape, sizeof shape, "(%" PRId64 ", %d)", n, dim);
  else
    snprintf(shape, sizeof shape, "(%" PRId64 ",)", n);
  int len = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': %s, }", descr, shape);
  size_t total = (NPY_PREAMBLE + (size_t)len + 1 + NPY_ALIGN - 1) / NPY_ALIGN * NPY_ALIGN;
  if (total > cap) return 0;
  size_t hlen = total - NPY_PREAMBLE;
  memcpy(buf, "\x93NUMPY\x01\x00", 8);
  buf[8] = (char)(hlen & 0xff);
  buf[9] = (char)(hlen >> 8);
  memset(buf + NPY_PREAMBLE, ' ', hlen);
  memcpy(buf + NPY_PREAMBLE, dict, (size_t)len);
  buf[total - 1] = '\n';
  return total;
}

/* Writes the .npy file atomically (a temporary file beside it, renamed over it). */
static int write_npy(const char *path, const char *descr, const void *data, size_t bytes, int64_t n,
                     int dim) {
  char head[256], tmp[4096];
  size_t hlen = npy_header(head, sizeof head, descr, n, dim);
  if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
    return moco_error(MOCO_ERANGE, "export: path too long: %s", path);
  file_part parts[2] = {{head, hlen}, {data, bytes}};
  int rc = file_write_atomic(path, tmp, parts, 2, 0644);
  return rc ? moco_error_wrap(rc, "export") : 0;
}

int eval_export_sibling(const char *path, const char *suffix, char *buf, size_t cap) {
  size_t len = strlen(path);
  if (len >= 4 && !strcmp(path + len - 4, ".npy")) len -= 4;
  if (snprintf(buf, cap, "%.*s%s", (int)len, path, suffix) >= (int)cap)
    return moco_error(MOCO_ERANGE, "export: name for %s%s exceeds %zu bytes", path, suffix, cap - 1);
  return 0;
}

int eval_export(const char *path, const float *x, int64_t n, int dim, const int32_t *labels,
                const int64_t *ids) {
  if (n < 0 || dim < 1)
    return moco_error(MOCO_EINVAL, "export: %s: shape (%lld, %d), need n >= 0, dim >= 1", path,
                      (long long)n, dim);
  int rc = write_npy(path, "<f4", x, (size_t)n * dim * sizeof(float), n, dim);
  char side[4096];
  if (!rc && labels && !(rc = eval_export_sibling(path, ".labels.npy", side, sizeof side)))
    rc = write_npy(side, "<i4", labels, (size_t)n * sizeof(int32_t), n, 0);
  if (!rc && ids && !(rc = eval_export_sibling(path, ".ids.npy", side, sizeof side)))
    rc = write_npy(side, "<i8", ids, (size_t)n * sizeof(int64_t), n, 0);
  return rc;
}
