/* Embedding export as NumPy .npy files (format 1.0, see train/eval.h), written atomically. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/file.h"
#include "data/npy.h"
#include "train/eval.h"

/* Writes the .npy file atomically (a temporary file beside it, renamed over it). */
static int write_npy(const char *path, const char *descr, const void *data, size_t bytes, int64_t n,
                     int dim) {
  char head[256], tmp[4096];
  uint64_t dims[2] = {(uint64_t)n, (uint64_t)dim};
  size_t hlen = npy_header(head, sizeof head, descr, dim ? 2 : 1, dims);
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
