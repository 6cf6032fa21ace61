#include "data/dataset.h"

#include <errno.h>
#include <glob.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/err.h"

/* A list of paths that grows; the data set owns the strings. */
typedef struct {
  char **v;
  int n, cap;
} path_list;

static int list_add(path_list *l, const char *p) {
  if (l->n == l->cap) {
    int cap = l->cap ? 2 * l->cap : 8;
    char **v = realloc(l->v, (size_t)cap * sizeof *v);
    if (!v) return MOCO_ENOMEM;
    l->v = v;
    l->cap = cap;
  }
  if (!(l->v[l->n] = strdup(p))) return MOCO_ENOMEM;
  l->n++;
  return 0;
}

static void list_free(path_list *l) {
  for (int i = 0; i < l->n; i++) free(l->v[i]);
  free(l->v);
  memset(l, 0, sizeof *l);
}

/* Expands "a,b*,c" into paths: globs sorted (glob's order), plain names kept as given. */
static int expand_spec(const char *name, const char *spec, path_list *out) {
  char *copy = strdup(spec), *save = NULL;
  if (!copy) return moco_error(MOCO_ENOMEM, "%s: spec", name);
  int rc = 0;
  for (char *tok = strtok_r(copy, ",", &save); tok && !rc; tok = strtok_r(NULL, ",", &save)) {
    while (*tok == ' ') tok++;
    for (char *e = tok + strlen(tok); e > tok && e[-1] == ' ';) *--e = '\0';
    if (!*tok) continue;
    if (!strpbrk(tok, "*?[")) {
      rc = list_add(out, tok);
      continue;
    }
    glob_t g;
    int grc = glob(tok, 0, NULL, &g);
    if (grc == GLOB_NOMATCH)
      rc = moco_error(MOCO_ENOENT, "%s: no file matches '%s'", name, tok);
    else if (grc)
      rc = moco_error(MOCO_EIO, "%s: glob '%s' failed", name, tok);
    for (size_t i = 0; !grc && !rc && i < g.gl_pathc; i++) rc = list_add(out, g.gl_pathv[i]);
    if (!grc) globfree(&g);
  }
  free(copy);
  if (rc == MOCO_ENOMEM) moco_error(rc, "%s: file list", name);
  if (!rc && out->n == 0) rc = moco_error(MOCO_ENOENT, "%s: no file given ('%s')", name, spec);
  return rc;
}

/* Tells the format from the first bytes: a shard's magic, gzip's 1f 8b (then IDX inside) or IDX's 00 00. */
static int sniff(const char *path, data_format *fmt) {
  struct stat st;
  if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
    return moco_error(MOCO_EINVAL, "%s: is a directory; name its files or a glob (\"%s/*.shard\")", path, path);
  FILE *f = fopen(path, "rb");
  if (!f)
    return moco_error(errno == ENOENT ? MOCO_ENOENT : MOCO_EIO, "%s: cannot open: %s", path, strerror(errno));
  uint8_t b[8] = {0};
  size_t n = fread(b, 1, sizeof b, f);
  fclose(f);
  if (n == 8 && !memcmp(b, SHARD_MAGIC, 8)) {
    *fmt = DATA_SHARD;
    return 0;
  }
  if (n >= 6 && !memcmp(b, "\x93NUMPY", 6)) {
    *fmt = DATA_NPY;
    return 0;
  }
  /* CIFAR batches have no magic (their first byte is a label): the name tells them, before IDX's 00 00. */
  if (cifar_is_candidate(path)) {
    *fmt = DATA_CIFAR;
    return 0;
  }
  if (n >= 2 && ((b[0] == 0x1f && b[1] == 0x8b) || (b[0] == 0 && b[1] == 0))) {
    *fmt = DATA_IDX;
    return 0;
  }
  if (n < 4) return moco_error(MOCO_EEOF, "%s: offset %zu: file too short for any magic", path, n);
  return moco_error(MOCO_EFORMAT, "%s: offset 0: unknown format: magic %02x %02x %02x %02x is neither IDX "
                    "(00 00 type ndim), gzip (1f 8b), NumPy (93 'NUMPY') nor a shard (\"" SHARD_MAGIC "\"); "
                    "CIFAR batches are named *.bin", path, b[0], b[1],
                    b[2], b[3]);
}

/* "x.npy" -> "x.labels.npy" (the name eval_export gives labels), when that exists. */
static char *npy_sibling_labels(const char *path) {
  size_t n = strlen(path);
  if (n < 4 || strcmp(path + n - 4, ".npy")) return NULL;
  char *c = malloc(n + 8);
  if (!c) return NULL;
  snprintf(c, n + 8, "%.*s.labels.npy", (int)(n - 4), path);
  if (access(c, R_OK) == 0) return c;
  free(c);
  return NULL;
}

/* "dir/train-images-idx3-ubyte.gz" -> "dir/train-labels-idx1-ubyte.gz" (also plain "images" ->
 * "labels"), when such a file exists. */
static char *companion_labels(const char *path) {
  char *npy = npy_sibling_labels(path);
  if (npy) return npy;
  static const char *pats[][2] = {{"images-idx3", "labels-idx1"}, {"images", "labels"}};
  const char *base = strrchr(path, '/');
  base = base ? base + 1 : path;
  for (size_t k = 0; k < sizeof pats / sizeof pats[0]; k++) {
    const char *hit = NULL;
    for (const char *p = strstr(base, pats[k][0]); p; p = strstr(p + 1, pats[k][0])) hit = p;
    if (!hit) continue;
    size_t pre = (size_t)(hit - path), la = strlen(pats[k][0]), lb = strlen(pats[k][1]);
    char *c = malloc(strlen(path) - la + lb + 1);
    if (!c) return NULL;
    memcpy(c, path, pre);
    memcpy(c + pre, pats[k][1], lb);
    strcpy(c + pre + lb, hit + la);
    if (access(c, R_OK) == 0) return c;
    free(c);
  }
  return NULL;
}

static data_shape idx_shape(const idx_info *in) {
  switch (in->ndim) {
  case 2: return (data_shape){(int)in->dims[1], 1, 1};
  case 3: return (data_shape){1, (int)in->dims[1], (int)in->dims[2]};
  default: return (data_shape){(int)in->dims[1], (int)in->dims[2], (int)in->dims[3]};
  }
}

/* The labels of an IDX or .npy file are read once at open (a few bytes per record): their count must
 * match, and their largest value tells the number of classes, which neither format states. */
static int attach_labels(dataset_file *f, const char *labels, int *classes) {
  int32_t top;
  uint64_t count;
  int rc;
  if (f->format == DATA_NPY) {
    npy_info li;
    if ((rc = npy_probe(labels, &li))) return rc;
    if (!li.labels)
      return moco_error(MOCO_EFORMAT, "%s: labels for %s: header field 'shape' has %d dimensions, expected (N,)",
                        labels, f->path, li.ndim);
    count = li.count;
    if (count == f->count && (rc = npy_max_label(labels, &li, &top))) return rc;
  } else {
    idx_info li;
    if ((rc = idx_probe(labels, &li))) return rc;
    if (li.ndim != 1)
      return moco_error(MOCO_EFORMAT, "%s: labels for %s: %d dimensions, expected 1", labels, f->path, li.ndim);
    count = li.count;
    if (count == f->count && (rc = idx_max_label(labels, &li, &top))) return rc;
  }
  if (count != f->count)
    return moco_error(MOCO_ESHAPE, "%s: %llu labels, but %s holds %llu records", labels,
                      (unsigned long long)count, f->path, (unsigned long long)f->count);
  if (top >= *classes) *classes = top + 1;
  if (!(f->labels_path = strdup(labels))) return moco_error(MOCO_ENOMEM, "%s", labels);
  return 0;
}

/* Probes one sample file into ds->files[ds->n_files]; 1-dimensional IDX files go to `label_files`. */
static int probe_file(dataset *ds, const char *path, path_list *label_files) {
  data_format fmt = DATA_IDX;
  int rc = sniff(path, &fmt);
  if (rc) return rc;
  dataset_file *f = &ds->files[ds->n_files];
  memset(f, 0, sizeof *f);
  f->format = fmt;
  if (fmt == DATA_SHARD) {
    if ((rc = shard_probe(path, &f->shard))) return rc;
    f->count = f->shard.count;
  } else if (fmt == DATA_NPY) {
    if ((rc = npy_probe(path, &f->npy))) return rc;
    if (f->npy.labels) return list_add(label_files, path);
    f->count = f->npy.count;
  } else if (fmt == DATA_CIFAR) {
    if ((rc = cifar_probe(path, &f->cifar))) return rc;
    f->count = f->cifar.count;
  } else {
    if ((rc = idx_probe(path, &f->idx))) return rc;
    if (f->idx.ndim == 1) return list_add(label_files, path);
    f->count = f->idx.count;
  }
  if (!(f->path = strdup(path))) return MOCO_ENOMEM;
  ds->n_files++;
  return 0;
}

static void file_traits(const dataset_file *f, data_shape *s, data_dtype *t, int *pair, int *labels) {
  if (f->format == DATA_SHARD) {
    *s = f->shard.shape;
    *t = f->shard.dtype;
    *pair = !!(f->shard.flags & SHARD_PAIR);
    *labels = !!(f->shard.flags & SHARD_LABELS);
  } else if (f->format == DATA_CIFAR) {
    *s = cifar_shape();
    *t = DATA_U8;
    *pair = 0;
    *labels = 1;
  } else {
    *s = f->format == DATA_NPY ? npy_shape(&f->npy) : idx_shape(&f->idx);
    *t = f->format == DATA_NPY ? f->npy.dtype : f->idx.type == IDX_U8 ? DATA_U8 : DATA_F32;
    *pair = 0;
    *labels = f->labels_path != NULL;
  }
}

/* Every file must agree with the first on what a sample is. */
static int check_agreement(dataset *ds) {
  for (int i = 0; i < ds->n_files; i++) {
    data_shape s;
    data_dtype t;
    int pair, labels;
    file_traits(&ds->files[i], &s, &t, &pair, &labels);
    if (i == 0) {
      ds->shape = s;
      ds->dtype = t;
      ds->has_pair = pair;
    } else if (s.c != ds->shape.c || s.h != ds->shape.h || s.w != ds->shape.w || t != ds->dtype ||
               pair != ds->has_pair) {
      return moco_error(MOCO_ESHAPE, "%s: %s: samples %dx%dx%d %s%s disagree with %dx%dx%d %s%s of %s (the "
                        "first file)", ds->name, ds->files[i].path, s.c, s.h, s.w, data_dtype_name(t),
                        pair ? " pairs" : "", ds->shape.c, ds->shape.h, ds->shape.w,
                        data_dtype_name(ds->dtype), ds->has_pair ? " pairs" : "", ds->files[0].path);
    }
    ds->has_labels |= labels;
    if (ds->files[i].format == DATA_SHARD && (int)ds->files[i].shard.num_classes > ds->num_classes)
      ds->num_classes = (int)ds->files[i].shard.num_classes;
    if (ds->files[i].format == DATA_CIFAR && ds->files[i].cifar.classes > ds->num_classes)
      ds->num_classes = ds->files[i].cifar.classes;
  }
  if (ds->idx_classes > ds->num_classes) ds->num_classes = ds->idx_classes;
  return 0;
}

static int pair_labels(dataset *ds, const char *labels, path_list *label_files) {
  int n_idx = 0, rc;
  for (int i = 0; i < ds->n_files; i++) n_idx += ds->files[i].format == DATA_IDX || ds->files[i].format == DATA_NPY;
  if (labels && n_idx != 1)
    return moco_error(MOCO_ECONFIG, "%s: a labels file (%s) goes with exactly one IDX or .npy samples file, found "
                      "%d; name them <x>-images-idx3... / <x>-labels-idx1... (<x>.npy / <x>.labels.npy) instead",
                      ds->name, labels, n_idx);
  for (int i = 0; i < ds->n_files; i++) {
    dataset_file *f = &ds->files[i];
    if (f->format != DATA_IDX && f->format != DATA_NPY) continue;
    char *found = labels ? NULL : companion_labels(f->path);
    rc = labels || found ? attach_labels(f, labels ? labels : found, &ds->idx_classes) : 0;
    free(found);
    if (rc) return rc;
  }
  for (int k = 0; k < label_files->n; k++) {
    int used = 0;
    for (int i = 0; i < ds->n_files; i++)
      used |= ds->files[i].labels_path && !strcmp(ds->files[i].labels_path, label_files->v[k]);
    if (!used)
      return moco_error(MOCO_EINVAL, "%s: %s is a labels file (1 dimension) but no samples file in the "
                        "set is named like it", ds->name, label_files->v[k]);
  }
  return 0;
}

int dataset_open(dataset *ds, const char *name, const char *spec, const char *labels, int num_classes) {
  memset(ds, 0, sizeof *ds);
  snprintf(ds->name, sizeof ds->name, "%s", name);
  if (!spec || !*spec) return moco_error(MOCO_ECONFIG, "%s: no data set given", name);
  path_list paths = {0}, label_files = {0};
  int rc = expand_spec(name, spec, &paths);
  if (!rc && !(ds->files = calloc((size_t)paths.n, sizeof *ds->files)))
    rc = moco_error(MOCO_ENOMEM, "%s: %d files", name, paths.n);
  for (int i = 0; !rc && i < paths.n; i++) rc = probe_file(ds, paths.v[i], &label_files);
  if (!rc && ds->n_files == 0)
    rc = moco_error(MOCO_EINVAL, "%s: '%s' names only labels files, no samples", name, spec);
  if (!rc) rc = pair_labels(ds, labels, &label_files);
  if (!rc) rc = check_agreement(ds);
  list_free(&paths);
  list_free(&label_files);
  if (rc) {
    if (rc == MOCO_ENOMEM) moco_error(rc, "%s: opening '%s'", name, spec);
    dataset_close(ds);
    return rc;
  }
  for (int i = 0; i < ds->n_files; i++) {
    ds->files[i].first = ds->count;
    ds->count += ds->files[i].count;
  }
  if (num_classes > 0) ds->num_classes = num_classes;
  ds->sample_bytes = data_shape_size(ds->shape) * data_dtype_size(ds->dtype);
  if (ds->count == 0) {
    rc = moco_error(MOCO_EEOF, "%s: empty data set: %d file(s) of '%s' hold no record", name, ds->n_files,
                    spec);
    dataset_close(ds);
    return rc;
  }
  return 0;
}

void dataset_close(dataset *ds) {
  for (int i = 0; i < ds->n_files; i++) {
    free(ds->files[i].path);
    free(ds->files[i].labels_path);
  }
  free(ds->files);
  ds->files = NULL;
  ds->n_files = 0;
}

int dataset_reader_open(dataset_reader *r, const dataset *ds, int file, uint64_t start) {
  memset(r, 0, sizeof *r);
  r->ds = ds;
  r->file = file;
  r->shard.fd = -1;
  const dataset_file *f = &ds->files[file];
  switch (f->format) {
  case DATA_SHARD: return shard_reader_open(&r->shard, f->path, &f->shard, start);
  case DATA_NPY: return npy_reader_open(&r->npy, f->path, f->labels_path, start);
  case DATA_CIFAR: return cifar_reader_open(&r->cifar, f->path, &f->cifar, start);
  default: return idx_reader_open(&r->idx, f->path, f->labels_path, start);
  }
}

int dataset_seekable(const dataset *ds) {
  for (int i = 0; i < ds->n_files; i++) {
    const dataset_file *f = &ds->files[i];
    if (f->format == DATA_SHARD || (f->format == DATA_IDX && f->idx.gz)) return 0;
  }
  return 1;
}

int dataset_reader_open_seekable(dataset_reader *r, const dataset *ds, int file) {
  memset(r, 0, sizeof *r);
  r->ds = ds;
  r->file = file;
  r->shard.fd = -1;
  const dataset_file *f = &ds->files[file];
  int rc;
  switch (f->format) {
  case DATA_NPY: rc = npy_reader_open_seekable(&r->npy, f->path, f->labels_path); break;
  case DATA_CIFAR: rc = cifar_reader_open_seekable(&r->cifar, f->path, &f->cifar); break;
  case DATA_IDX: rc = idx_reader_open_seekable(&r->idx, f->path, f->labels_path); break;
  default: rc = moco_error(MOCO_ESTATE, "%s: a shard's checksum covers a block: records are read in order", f->path);
  }
  if (rc) r->ds = NULL;
  return rc;
}

int dataset_reader_seek(dataset_reader *r, uint64_t index) {
  switch (r->ds->files[r->file].format) {
  case DATA_NPY: return npy_reader_seek(&r->npy, index);
  case DATA_CIFAR: return cifar_reader_seek(&r->cifar, index);
  case DATA_IDX: return idx_reader_seek(&r->idx, index);
  default: return moco_error(MOCO_ESTATE, "%s: not opened for seeking", r->ds->files[r->file].path);
  }
}

void dataset_reader_close(dataset_reader *r) {
  if (!r->ds) return;
  switch (r->ds->files[r->file].format) {
  case DATA_SHARD: shard_reader_close(&r->shard); break;
  case DATA_NPY: npy_reader_close(&r->npy); break;
  case DATA_CIFAR: cifar_reader_close(&r->cifar); break;
  default: idx_reader_close(&r->idx);
  }
  r->ds = NULL;
}

/* The format's reader: a record (1), the end (0) or an error covering *bad records; *index is the
 * record's index in its file. */
static int format_next(dataset_reader *r, data_format fmt, data_record *rec, uint64_t *index) {
  int rc;
  switch (fmt) {
  case DATA_SHARD:
    rc = shard_reader_next(&r->shard, rec);
    r->bad = r->shard.bad, *index = r->shard.next - 1;
    break;
  case DATA_NPY:
    rc = npy_reader_next(&r->npy, rec);
    r->bad = r->npy.bad, *index = r->npy.next - 1;
    break;
  case DATA_CIFAR:
    rc = cifar_reader_next(&r->cifar, rec);
    r->bad = r->cifar.bad, *index = r->cifar.next - 1;
    break;
  default:
    rc = idx_reader_next(&r->idx, rec);
    r->bad = r->idx.bad, *index = r->idx.next - 1;
  }
  return rc;
}

static int check_finite(const dataset_reader *r, const uint8_t *s, uint64_t index) {
  size_t n = data_shape_size(r->ds->shape);
  for (size_t i = 0; i < n; i++) {
    float v = data_decode_at(DATA_F32, s, i);
    if (!isfinite(v))
      return moco_error(MOCO_ERANGE, "%s: record %llu: element %zu is %g, expected a finite value",
                        r->ds->files[r->file].path, (unsigned long long)index, i, v);
  }
  return 0;
}

int dataset_reader_next(dataset_reader *r, data_record *rec) {
  const dataset_file *f = &r->ds->files[r->file];
  uint64_t index;
  int rc = format_next(r, f->format, rec, &index);
  if (rc <= 0) return rc;
  if (f->format != DATA_SHARD) rec->id += (int64_t)f->first;
  int k = r->ds->num_classes;
  r->bad = 1;
  if (rec->label < -1 || (k > 0 && rec->label >= k))
    return moco_error(MOCO_ERANGE, "%s: record %llu: label %d out of range [0, %d)", f->path,
                      (unsigned long long)index, rec->label, k > 0 ? k : INT32_MAX);
  if (r->ds->dtype == DATA_F32) {
    if ((rc = check_finite(r, rec->sample, index))) return rc;
    if (rec->pair && (rc = check_finite(r, rec->pair, index))) return rc;
  }
  r->bad = 0;
  return 1;
}

int dataset_stats_sums(const dataset *ds, uint64_t first, uint64_t end, int skip_bad, double *sums,
                       uint64_t *count, uint64_t *skipped) {
  int C = ds->shape.c;
  size_t hw = (size_t)ds->shape.h * ds->shape.w, n = (size_t)C * hw;
  float *x = malloc(n * sizeof *x);
  int rc = x ? 0 : moco_error(MOCO_ENOMEM, "%s: stats buffers", ds->name);
  uint64_t at = 0; /* records of the files before fi */
  for (int fi = 0; !rc && fi < ds->n_files && at < end; at += ds->files[fi++].count) {
    uint64_t lo = first > at ? first - at : 0, hi = end - at < ds->files[fi].count ? end - at : ds->files[fi].count;
    if (lo >= hi) continue;
    dataset_reader r;
    data_record rec;
    if ((rc = dataset_reader_open(&r, ds, fi, lo))) break;
    for (uint64_t pos = lo; pos < hi && (rc = dataset_reader_next(&r, &rec)) != 0;) {
      if (rc < 0) {
        if (!skip_bad) break;
        *skipped += r.bad; /* the reader goes on after the records the fault covers */
        pos += r.bad;
        rc = 0;
        continue;
      }
      data_decode(ds->dtype, rec.sample, x, n);
      for (int c = 0; c < C; c++)
        for (size_t i = 0; i < hw; i++) {
          double v = x[c * hw + i];
          sums[c] += v;
          sums[C + c] += v * v;
        }
      ++*count;
      pos++;
      rc = 0;
    }
    dataset_reader_close(&r);
  }
  free(x);
  return rc;
}

int dataset_stats_finish(const dataset *ds, const double *sums, uint64_t count, float *mean, float *std) {
  int C = ds->shape.c;
  size_t hw = (size_t)ds->shape.h * ds->shape.w;
  if (count == 0) return moco_error(MOCO_EEOF, "%s: no readable record for the statistics", ds->name);
  for (int c = 0; c < C; c++) {
    double m = sums[c] / ((double)count * hw), var = sums[C + c] / ((double)count * hw) - m * m;
    mean[c] = (float)m;
    std[c] = (float)sqrt(var > 0 ? var : 0);
  }
  return 0;
}

int dataset_stats(const dataset *ds, int skip_bad, float *mean, float *std, uint64_t *skipped) {
  double *sums = calloc(2 * (size_t)ds->shape.c, sizeof *sums);
  uint64_t count = 0, bad = 0;
  int rc = sums ? dataset_stats_sums(ds, 0, ds->count, skip_bad, sums, &count, &bad)
                : moco_error(MOCO_ENOMEM, "%s: stats buffers", ds->name);
  if (skipped) *skipped = bad;
  if (!rc) rc = dataset_stats_finish(ds, sums, count, mean, std);
  free(sums);
  return rc;
}
