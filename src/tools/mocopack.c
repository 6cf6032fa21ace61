/* mocopack: writes mocod shards (data/shard.h) from IDX, NumPy or CIFAR files, raw little-endian arrays or CSV, and
 * describes or verifies a data set. `mocopack --help` for the usage. */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/err.h"
#include "core/rng.h"
#include "core/file.h"
#include "data/dataset.h"
#include "data/image.h"
#include "data/shard.h"

static const char usage[] =
    "usage: mocopack idx  [pack options] -o PREFIX IMAGES[,MORE] [LABELS]\n"
    "       mocopack npy  [pack options] -o PREFIX SAMPLES.npy[,MORE] [LABELS.npy]\n"
    "       mocopack cifar [pack options] -o PREFIX data_batch_1.bin[,MORE]\n"
    "       mocopack images [pack options] -o PREFIX --size S [--grey] [--flat] [--on-error stop|skip]\n"
    "                     [--no-shuffle] [--seed N] DIR\n"
    "       mocopack raw  [pack options] -o PREFIX --shape C,H,W --dtype u8|f32 [--labels FILE]\n"
    "                     [--labels-dtype i32|u8] [--pair FILE] DATA\n"
    "       mocopack csv  [pack options] -o PREFIX [--label COL] [--header|--no-header]\n"
    "                     [--delimiter C] FILE\n"
    "       mocopack info [--verify] [--stats] FILES_OR_GLOBS\n"
    "\n"
    "Writes PREFIX-00000.shard, PREFIX-00001.shard, ... (a data set the loader takes as \"PREFIX-*.shard\").\n"
    "  idx    IDX images (plain or .gz) with their labels (named like the images, or given), or any data set\n"
    "         mocod reads (shards too: re-splits them)\n"
    "  npy    NumPy arrays: u1 or f4, (N,D), (N,H,W) or (N,C,H,W), C order; labels: an integer (N,) array\n"
    "         given, or named X.labels.npy beside X.npy (or images -> labels)\n"
    "  cifar  CIFAR-10 (data_batch_N.bin, test_batch.bin) or CIFAR-100 (train.bin, test.bin) binary batches\n"
    "  raw    DATA holds N samples of --shape as little-endian u8 or f32; --labels holds N labels (i32 or u8),\n"
    "         --pair N second samples (pair records, for data.mode pair)\n"
    "  csv    numeric columns are the features of a vector sample; --label names the label column (index\n"
    "         from 0, or its header name); a header line is detected when a field is not a number\n"
    "  images PNG and JPEG files (libpng, libjpeg-turbo): DIR/<class>/*.png|jpg (ImageFolder: classes are the\n"
    "         subfolders in name order, listed in PREFIX.classes) or, with --flat or no subfolder, DIR/* without\n"
    "         labels; each resized so the shorter side is S and centre-cropped to SxS, RGB (or --grey); an image\n"
    "         that will not decode stops the pack (default) or, with --on-error skip, is reported and skipped;\n"
    "         records are shuffled (seed --seed, default 0) unless --no-shuffle\n"
    "  info   per file: format, records, shape, labels; --verify reads every record (checksums, labels,\n"
    "         finite values); --stats prints the per-channel mean and std that data.normalize standardises\n"
    "         with (mocod computes them itself at start-up; no config key takes them)\n"
    "pack options:\n"
    "  --shard-size SIZE     bytes per shard (K, M, G suffixes; default 64M)\n"
    "  --shard-records N     records per shard (instead of --shard-size)\n"
    "  --block-size SIZE     bytes per checksummed block (default 256K)\n"
    "  --classes K           number of classes (default: largest label + 1)\n"
    "  --id-start N          id of the first record (default 0; ids then count up)\n";

enum {
  OPT_SHARD_SIZE = 256, OPT_SHARD_RECORDS, OPT_BLOCK_SIZE, OPT_CLASSES, OPT_ID_START, OPT_SHAPE, OPT_DTYPE,
  OPT_LABELS, OPT_LABELS_DTYPE, OPT_PAIR, OPT_LABEL, OPT_HEADER, OPT_NO_HEADER, OPT_DELIM, OPT_VERIFY, OPT_STATS,
  OPT_HELP, OPT_SIZE, OPT_GREY, OPT_FLAT, OPT_ON_ERROR, OPT_NO_SHUFFLE, OPT_SEED,
};

static const struct option options[] = {
    {"output", required_argument, 0, 'o'},
    {"shard-size", required_argument, 0, OPT_SHARD_SIZE},
    {"shard-records", required_argument, 0, OPT_SHARD_RECORDS},
    {"block-size", required_argument, 0, OPT_BLOCK_SIZE},
    {"classes", required_argument, 0, OPT_CLASSES},
    {"id-start", required_argument, 0, OPT_ID_START},
    {"shape", required_argument, 0, OPT_SHAPE},
    {"dtype", required_argument, 0, OPT_DTYPE},
    {"labels", required_argument, 0, OPT_LABELS},
    {"labels-dtype", required_argument, 0, OPT_LABELS_DTYPE},
    {"pair", required_argument, 0, OPT_PAIR},
    {"label", required_argument, 0, OPT_LABEL},
    {"header", no_argument, 0, OPT_HEADER},
    {"no-header", no_argument, 0, OPT_NO_HEADER},
    {"delimiter", required_argument, 0, OPT_DELIM},
    {"verify", no_argument, 0, OPT_VERIFY},
    {"stats", no_argument, 0, OPT_STATS},
    {"size", required_argument, 0, OPT_SIZE},
    {"grey", no_argument, 0, OPT_GREY},
    {"gray", no_argument, 0, OPT_GREY},
    {"flat", no_argument, 0, OPT_FLAT},
    {"on-error", required_argument, 0, OPT_ON_ERROR},
    {"no-shuffle", no_argument, 0, OPT_NO_SHUFFLE},
    {"seed", required_argument, 0, OPT_SEED},
    {"help", no_argument, 0, OPT_HELP},
    {0, 0, 0, 0},
};

typedef struct {
  const char *out;
  uint64_t shard_size, shard_records, block_size;
  int classes;
  int64_t id_start;
  const char *shape, *dtype, *labels, *labels_dtype, *pair, *label_col;
  int header; /* -1 detect, 0 no, 1 yes */
  char delim;
  int verify, stats;
  int size, grey, flat, skip_bad, no_shuffle; /* images */
  uint64_t seed;
} opts;

/* ---- writing shards ---- */

typedef struct {
  const opts *o;
  shard_header h;
  shard_writer w;
  int open;
  uint64_t per_shard, in_shard, total;
  char **paths;
  int n_paths;
} packer;

static int pack_begin(packer *p, const opts *o, data_shape shape, data_dtype dtype, int labels, int pair,
                      int classes) {
  memset(p, 0, sizeof *p);
  p->o = o;
  p->h = (shard_header){.flags = (labels ? SHARD_LABELS : 0u) | (pair ? SHARD_PAIR : 0u), .dtype = dtype,
                        .shape = shape, .num_classes = (uint32_t)(labels && classes > 0 ? classes : 0)};
  size_t rec = shard_record_bytes(&p->h);
  p->h.block_records = (uint32_t)(o->block_size / rec ? o->block_size / rec : 1);
  p->per_shard = o->shard_records ? o->shard_records : (o->shard_size / rec ? o->shard_size / rec : 1);
  if (!o->out) return moco_error(MOCO_EINVAL, "no output prefix (-o PREFIX)");
  /* -o data/fmnist/train: the directory is part of the name asked for, so make it. */
  int rc = file_make_dirs(o->out, 0, 0777);
  return rc ? moco_error_wrap(rc, "-o %s", o->out) : 0;
}

static int pack_add(packer *p, int32_t label, const void *sample, const void *pair) {
  int rc;
  if (!p->open) {
    char **v = realloc(p->paths, (size_t)(p->n_paths + 1) * sizeof *v);
    if (!v) return moco_error(MOCO_ENOMEM, "shard list");
    p->paths = v;
    size_t n = strlen(p->o->out) + 16;
    if (!(v[p->n_paths] = malloc(n))) return moco_error(MOCO_ENOMEM, "shard name");
    snprintf(v[p->n_paths], n, "%s-%05d.shard", p->o->out, p->n_paths);
    if ((rc = shard_writer_open(&p->w, v[p->n_paths], &p->h))) {
      free(v[p->n_paths]);
      return rc;
    }
    p->n_paths++;
    p->open = 1;
    p->in_shard = 0;
  }
  if ((rc = shard_writer_add(&p->w, p->o->id_start + (int64_t)p->total, label, sample, pair))) return rc;
  p->total++;
  if (++p->in_shard == p->per_shard) {
    p->open = 0;
    return shard_writer_close(&p->w);
  }
  return 0;
}

static void pack_free(packer *p) {
  for (int i = 0; i < p->n_paths; i++) free(p->paths[i]);
  free(p->paths);
}

static int pack_end(packer *p) {
  int rc = p->open ? shard_writer_close(&p->w) : 0;
  p->open = 0;
  if (!rc && p->total == 0) rc = moco_error(MOCO_EEOF, "%s: no record to write", p->o->out);
  if (!rc) {
    data_shape s = p->h.shape;
    printf("mocopack: %llu records (%dx%dx%d %s%s%s", (unsigned long long)p->total, s.c, s.h, s.w,
           data_dtype_name(p->h.dtype), p->h.flags & SHARD_PAIR ? ", pairs" : "",
           p->h.flags & SHARD_LABELS ? ", labels" : "");
    if (p->h.num_classes) printf(", %u classes", p->h.num_classes);
    printf(") in %d shard(s): %s", p->n_paths, p->paths[0]);
    if (p->n_paths > 1) printf(" .. %s", p->paths[p->n_paths - 1]);
    printf("\n");
  }
  pack_free(p);
  return rc;
}

/* A failed pack leaves nothing behind: a partial data set would look whole to a glob. */
static void pack_abort(packer *p) {
  if (p->open) shard_writer_abort(&p->w);
  for (int i = 0; i < p->n_paths - p->open; i++) unlink(p->paths[i]);
  pack_free(p);
}

/* ---- parsing helpers ---- */

static int parse_size(const char *s, const char *what, uint64_t *out) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  uint64_t mul = 1;
  if (*end == 'k' || *end == 'K') mul = 1ull << 10, end++;
  else if (*end == 'm' || *end == 'M') mul = 1ull << 20, end++;
  else if (*end == 'g' || *end == 'G') mul = 1ull << 30, end++;
  if (end == s || *end || errno || !(v >= 1) || v * mul > 1e18)
    return moco_error(MOCO_EINVAL, "%s: '%s', expected a positive size (e.g. 64M)", what, s);
  *out = (uint64_t)(v * mul);
  return 0;
}

static int parse_int(const char *s, const char *what, long long lo, long long *out) {
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (end == s || *end || errno || v < lo)
    return moco_error(MOCO_EINVAL, "%s: '%s', expected an integer >= %lld", what, s, lo);
  *out = v;
  return 0;
}

/* "784" -> (784,1,1), "28,28" -> (1,28,28), "3,32,32" -> (3,32,32); 'x' also separates. */
static int parse_shape(const char *s, data_shape *out) {
  long v[3];
  int n = 0;
  const char *p = s;
  while (n < 3) {
    char *end;
    errno = 0;
    v[n] = strtol(p, &end, 10);
    if (end == p || errno || v[n] < 1 || v[n] > (1 << 24)) break;
    n++;
    if (!*end) {
      p = end;
      break;
    }
    if (*end != ',' && *end != 'x') break;
    p = end + 1;
  }
  if (n == 0 || *p)
    return moco_error(MOCO_EINVAL, "--shape '%s': expected D, H,W or C,H,W (positive integers)", s);
  *out = n == 1 ? (data_shape){(int)v[0], 1, 1}
       : n == 2 ? (data_shape){1, (int)v[0], (int)v[1]}
                : (data_shape){(int)v[0], (int)v[1], (int)v[2]};
  return 0;
}

static int file_size(const char *path, uint64_t *n) {
  struct stat st;
  if (stat(path, &st))
    return moco_error(errno == ENOENT ? MOCO_ENOENT : MOCO_EIO, "%s: %s", path, strerror(errno));
  *n = (uint64_t)st.st_size;
  return 0;
}

static int open_input(const char *path, FILE **f) {
  if ((*f = fopen(path, "rb"))) return 0;
  return moco_error(errno == ENOENT ? MOCO_ENOENT : MOCO_EIO, "%s: cannot open: %s", path, strerror(errno));
}

/* ---- idx: any data set mocod reads, repacked ---- */

static int max_label(const dataset *ds, int *classes) {
  int top = -1, rc = 0;
  for (int f = 0; !rc && f < ds->n_files; f++) {
    dataset_reader r;
    data_record rec;
    if ((rc = dataset_reader_open(&r, ds, f, 0))) break;
    while ((rc = dataset_reader_next(&r, &rec)) == 1)
      if (rec.label > top) top = rec.label;
    dataset_reader_close(&r);
  }
  *classes = top + 1;
  return rc;
}

static int cmd_idx(const opts *o, int argc, char **argv) {
  if (argc < 1 || argc > 2) return moco_error(MOCO_EINVAL, "idx: expected IMAGES [LABELS]");
  dataset ds;
  int rc = dataset_open(&ds, "input", argv[0], argc > 1 ? argv[1] : NULL, o->classes);
  if (rc) return rc;
  int classes = ds.num_classes;
  if (ds.has_labels && !classes) rc = max_label(&ds, &classes);
  if (!rc && !ds.has_labels)
    fprintf(stderr, "mocopack: notice: %s has no labels (none given, no labels file named like it): the "
                    "shards hold none, so the kNN monitor and the probe cannot use them\n", argv[0]);
  packer p;
  if (!rc) rc = pack_begin(&p, o, ds.shape, ds.dtype, ds.has_labels, ds.has_pair, classes);
  if (rc) {
    dataset_close(&ds);
    return rc;
  }
  for (int f = 0; !rc && f < ds.n_files; f++) {
    dataset_reader r;
    data_record rec;
    if ((rc = dataset_reader_open(&r, &ds, f, 0))) break;
    while ((rc = dataset_reader_next(&r, &rec)) == 1)
      if ((rc = pack_add(&p, rec.label, rec.sample, rec.pair))) break;
    dataset_reader_close(&r);
  }
  dataset_close(&ds);
  if (rc) {
    pack_abort(&p);
    return rc;
  }
  return pack_end(&p);
}

/* ---- raw arrays ---- */

typedef struct {
  FILE *f;
  const char *path;
  size_t size; /* bytes per label */
} label_file;

static int read_label(label_file *lf, uint64_t i, int32_t *label) {
  uint8_t b[4];
  if (fread(b, 1, lf->size, lf->f) != lf->size)
    return moco_error(MOCO_EEOF, "%s: offset %llu: label %llu is missing", lf->path,
                      (unsigned long long)(i * lf->size), (unsigned long long)i);
  if (lf->size == 1) {
    *label = b[0];
  } else {
    memcpy(label, b, 4);
  }
  if (*label < -1)
    return moco_error(MOCO_ERANGE, "%s: offset %llu: label %d, expected >= 0 (or -1: none)", lf->path,
                      (unsigned long long)(i * lf->size), *label);
  return 0;
}

static int raw_classes(label_file *lf, uint64_t n, int *classes) {
  int32_t top = -1, v;
  for (uint64_t i = 0; i < n; i++) {
    int rc = read_label(lf, i, &v);
    if (rc) return rc;
    if (v > top) top = v;
  }
  *classes = top + 1;
  rewind(lf->f);
  return 0;
}

static int cmd_raw(const opts *o, int argc, char **argv) {
  if (argc != 1) return moco_error(MOCO_EINVAL, "raw: expected one DATA file");
  if (!o->shape || !o->dtype) return moco_error(MOCO_EINVAL, "raw: --shape and --dtype are required");
  data_shape shape;
  int rc = parse_shape(o->shape, &shape);
  if (rc) return rc;
  data_dtype dt;
  if (!strcmp(o->dtype, "u8")) dt = DATA_U8;
  else if (!strcmp(o->dtype, "f32")) dt = DATA_F32;
  else return moco_error(MOCO_EINVAL, "--dtype '%s': expected u8 or f32", o->dtype);
  size_t sb = data_shape_size(shape) * data_dtype_size(dt);
  uint64_t bytes, n;
  if ((rc = file_size(argv[0], &bytes))) return rc;
  if (bytes % sb)
    return moco_error(MOCO_ESHAPE, "%s: %llu bytes are not a whole number of %zu-byte samples (%dx%dx%d %s): "
                      "%llu bytes left over", argv[0], (unsigned long long)bytes, sb, shape.c, shape.h, shape.w,
                      o->dtype, (unsigned long long)(bytes % sb));
  n = bytes / sb;
  label_file lf = {NULL, o->labels, 4};
  if (o->labels_dtype && !strcmp(o->labels_dtype, "u8")) lf.size = 1;
  else if (o->labels_dtype && strcmp(o->labels_dtype, "i32"))
    return moco_error(MOCO_EINVAL, "--labels-dtype '%s': expected i32 or u8", o->labels_dtype);
  uint64_t other;
  if (o->labels && !(rc = file_size(o->labels, &other)) && other != n * lf.size)
    rc = moco_error(MOCO_ESHAPE, "%s: %llu bytes, expected %llu (%llu labels of %zu bytes, one per sample of %s)",
                    o->labels, (unsigned long long)other, (unsigned long long)(n * lf.size),
                    (unsigned long long)n, lf.size, argv[0]);
  if (!rc && o->pair && !(rc = file_size(o->pair, &other)) && other != bytes)
    rc = moco_error(MOCO_ESHAPE, "%s: %llu bytes, expected %llu like %s (one second sample per sample)", o->pair,
                    (unsigned long long)other, (unsigned long long)bytes, argv[0]);
  if (rc) return rc;
  FILE *f = NULL, *pf = NULL;
  uint8_t *buf = malloc(2 * sb);
  int classes = o->classes;
  packer p;
  int begun = 0;
  rc = buf ? 0 : moco_error(MOCO_ENOMEM, "sample buffer");
  if (!rc) rc = open_input(argv[0], &f);
  if (!rc && o->pair) rc = open_input(o->pair, &pf);
  if (!rc && o->labels) rc = open_input(o->labels, &lf.f);
  if (!rc && lf.f && !classes) rc = raw_classes(&lf, n, &classes);
  if (!rc && !(rc = pack_begin(&p, o, shape, dt, o->labels != NULL, o->pair != NULL, classes))) begun = 1;
  for (uint64_t i = 0; !rc && i < n; i++) {
    int32_t label = -1;
    if (fread(buf, 1, sb, f) != sb || (pf && fread(buf + sb, 1, sb, pf) != sb))
      rc = moco_error(MOCO_EIO, "%s: offset %llu: short read", argv[0], (unsigned long long)(i * sb));
    if (!rc && lf.f) rc = read_label(&lf, i, &label);
    if (!rc) rc = pack_add(&p, label, buf, pf ? buf + sb : NULL);
    if (rc) moco_error_wrap(rc, "%s: sample %llu", argv[0], (unsigned long long)i);
  }
  if (f) fclose(f);
  if (pf) fclose(pf);
  if (lf.f) fclose(lf.f);
  free(buf);
  if (rc) {
    if (begun) pack_abort(&p);
    return rc;
  }
  return pack_end(&p);
}

/* ---- CSV ---- */

typedef struct {
  FILE *f;
  const char *path;
  char delim;
  char *line;
  size_t cap;
  char **fields;
  int max_fields;
  uint64_t lineno;
} csv_reader;

static int csv_open(csv_reader *c, const char *path, char delim) {
  memset(c, 0, sizeof *c);
  c->path = path;
  c->delim = delim;
  return open_input(path, &c->f);
}

static void csv_close(csv_reader *c) {
  if (c->f) fclose(c->f);
  free(c->line);
  free(c->fields);
}

/* Splits `line` in place into fields (a field may be "quoted"); returns the count, -1 on a bad quote. */
static int split_fields(char *line, char delim, char **fields) {
  int n = 0;
  char *p = line;
  for (;;) {
    while (*p == ' ' || *p == '\t') p++;
    if (*p == '"') {
      char *end = strchr(p + 1, '"');
      if (!end) return -1;
      *end = '\0';
      fields[n++] = p + 1;
      p = end + 1;
      while (*p == ' ' || *p == '\t') p++;
      if (*p && *p != delim) return -1;
    } else {
      fields[n++] = p;
      while (*p && *p != delim) p++;
      for (char *e = p; e > fields[n - 1] && (e[-1] == ' ' || e[-1] == '\t');) *--e = '\0';
    }
    if (!*p) return n;
    *p++ = '\0';
  }
}

/* The next non-empty line, split: 1, with *n fields; 0 at the end of the file. */
static int csv_next(csv_reader *c, int *n) {
  ssize_t len;
  while ((len = getline(&c->line, &c->cap, c->f)) >= 0) {
    c->lineno++;
    while (len && (c->line[len - 1] == '\n' || c->line[len - 1] == '\r')) c->line[--len] = '\0';
    if (!len) continue;
    int need = 1;
    for (const char *p = c->line; *p; p++) need += *p == c->delim;
    if (need > c->max_fields) {
      char **v = realloc(c->fields, (size_t)need * sizeof *v);
      if (!v) return moco_error(MOCO_ENOMEM, "%s: line %llu", c->path, (unsigned long long)c->lineno);
      c->fields = v;
      c->max_fields = need;
    }
    if ((*n = split_fields(c->line, c->delim, c->fields)) < 0)
      return moco_error(MOCO_EFORMAT, "%s: line %llu: unbalanced quote", c->path, (unsigned long long)c->lineno);
    return 1;
  }
  if (ferror(c->f)) return moco_error(MOCO_EIO, "%s: read error", c->path);
  return 0;
}

static int is_number(const char *s, float *v) {
  char *end;
  errno = 0;
  *v = strtof(s, &end);
  while (*end == ' ' || *end == '\t') end++;
  return end != s && !*end && !errno && isfinite(*v);
}

/* What the first line says: whether it is a header, how many columns, which one is the label. */
typedef struct {
  int header, ncols, label_col;
} csv_layout;

static int csv_layout_of(const opts *o, csv_reader *c, csv_layout *L) {
  int n, rc = csv_next(c, &n);
  if (rc <= 0) return rc ? rc : moco_error(MOCO_EEOF, "%s: no data", c->path);
  float v;
  if (n == 1 && !is_number(c->fields[0], &v)) { /* one column that is no number: another delimiter? */
    for (const char *d = ";\t|"; *d; d++) {
      char shown[3] = {*d, 0, 0};
      if (*d == '\t') memcpy(shown, "\\t", 3);
      if (*d != c->delim && strchr(c->fields[0], *d))
        return moco_error(MOCO_EFORMAT, "%s: line %llu: one column with delimiter '%c', but the line holds "
                          "'%s': try --delimiter '%s'", c->path, (unsigned long long)c->lineno, c->delim, shown, shown);
    }
  }
  L->ncols = n;
  L->header = o->header;
  if (L->header < 0) {
    L->header = 0;
    for (int i = 0; i < n; i++) L->header |= !is_number(c->fields[i], &v);
  }
  L->label_col = -1;
  if (o->label_col) {
    long long k;
    char *end;
    k = strtoll(o->label_col, &end, 10);
    if (end != o->label_col && !*end) {
      if (k < 0 || k >= n)
        return moco_error(MOCO_EINVAL, "--label %s: %s has columns 0..%d", o->label_col, c->path, n - 1);
      L->label_col = (int)k;
    } else {
      for (int i = 0; L->header && i < n; i++)
        if (!strcmp(c->fields[i], o->label_col)) L->label_col = i;
      if (L->label_col < 0)
        return moco_error(MOCO_EINVAL, "--label %s: no such column in the header of %s%s", o->label_col, c->path,
                          L->header ? "" : " (it has no header line)");
    }
  }
  if (L->ncols - (L->label_col >= 0) < 1)
    return moco_error(MOCO_ESHAPE, "%s: no feature column besides the label", c->path);
  if (!L->header) { /* the first line is data: read it again */
    rewind(c->f);
    c->lineno = 0;
  }
  return 0;
}

/* One data line to a feature vector and label. */
static int csv_row(const csv_reader *c, const csv_layout *L, int n, float *x, int32_t *label) {
  if (n != L->ncols)
    return moco_error(MOCO_ESHAPE, "%s: line %llu: %d columns, expected %d", c->path, (unsigned long long)c->lineno,
                      n, L->ncols);
  int d = 0;
  *label = -1;
  for (int i = 0; i < n; i++) {
    const char *s = c->fields[i];
    if (i == L->label_col) {
      float k; /* "3" and "3.0" (as pandas writes integer columns with gaps) are both class 3 */
      if (!is_number(s, &k) || k != floorf(k) || k < -1 || k > (float)(1 << 24))
        return moco_error(MOCO_ERANGE, "%s: line %llu, column %d (label): '%s' is not a class index; labels are "
                          "integers 0..K-1 (-1: none), so map class names to numbers first",
                          c->path, (unsigned long long)c->lineno, i, s);
      *label = (int32_t)k;
    } else if (!is_number(s, &x[d++])) {
      return moco_error(MOCO_EFORMAT, "%s: line %llu, column %d: '%s' is not a finite number", c->path,
                        (unsigned long long)c->lineno, i, s);
    }
  }
  return 0;
}

/* Two passes: the first checks every line and finds the classes, so a bad line costs no output. */
static int csv_pass(const opts *o, const char *path, packer *p, int *classes, uint64_t *rows) {
  csv_reader c;
  csv_layout L = {0};
  int rc = csv_open(&c, path, o->delim), n;
  if (!rc) rc = csv_layout_of(o, &c, &L);
  int d = rc ? 0 : L.ncols - (L.label_col >= 0);
  float *x = rc ? NULL : malloc((size_t)d * sizeof *x);
  if (!rc && !x) rc = moco_error(MOCO_ENOMEM, "csv row");
  if (!rc && p && (rc = pack_begin(p, o, (data_shape){d, 1, 1}, DATA_F32, L.label_col >= 0, 0, *classes)))
    p = NULL;
  int32_t top = -1, label = -1;
  *rows = 0;
  while (!rc && (rc = csv_next(&c, &n)) == 1) {
    if ((rc = csv_row(&c, &L, n, x, &label))) break;
    if (label > top) top = label;
    if (p && (rc = pack_add(p, label, x, NULL))) moco_error_wrap(rc, "%s: line %llu", path, (unsigned long long)c.lineno);
    ++*rows;
  }
  if (!p) *classes = top + 1;
  free(x);
  csv_close(&c);
  return rc;
}

static int cmd_csv(const opts *o, int argc, char **argv) {
  if (argc != 1) return moco_error(MOCO_EINVAL, "csv: expected one FILE");
  int classes = o->classes;
  uint64_t rows;
  packer p = {0};
  int rc = csv_pass(o, argv[0], NULL, &classes, &rows);
  if (rc) return rc;
  if (o->classes) classes = o->classes;
  if ((rc = csv_pass(o, argv[0], &p, &classes, &rows))) {
    if (p.o) pack_abort(&p);
    return rc;
  }
  return pack_end(&p);
}

/* ---- image folders ---- */

typedef struct {
  char **path;
  int32_t *label;
  uint32_t n, cap;
  char **classes;
  int n_classes;
} image_list;

static void images_free(image_list *l) {
  for (uint32_t i = 0; i < l->n; i++) free(l->path[i]);
  for (int i = 0; i < l->n_classes; i++) free(l->classes[i]);
  free(l->path), free(l->label), free(l->classes);
  memset(l, 0, sizeof *l);
}

static int images_add(image_list *l, const char *dir, const char *name, int32_t label) {
  if (l->n == l->cap) {
    uint32_t cap = l->cap ? 2 * l->cap : 256;
    char **p = realloc(l->path, cap * sizeof *p);
    if (p) l->path = p;
    int32_t *lb = realloc(l->label, cap * sizeof *lb);
    if (lb) l->label = lb;
    if (!p || !lb) return moco_error(MOCO_ENOMEM, "image list");
    l->cap = cap;
  }
  size_t len = strlen(dir) + strlen(name) + 2;
  if (!(l->path[l->n] = malloc(len))) return moco_error(MOCO_ENOMEM, "image list");
  snprintf(l->path[l->n], len, "%s/%s", dir, name);
  l->label[l->n++] = label;
  return 0;
}

static int is_dir(const char *dir, const char *name) {
  char p[FILENAME_MAX * 2];
  struct stat st;
  snprintf(p, sizeof p, "%s/%s", dir, name);
  return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static int visible(const struct dirent *d) { return d->d_name[0] != '.'; }

/* The image files of dir (name order) with one label; subfolders are ignored. */
static int list_images(image_list *l, const char *dir, int32_t label) {
  struct dirent **e;
  int n = scandir(dir, &e, visible, alphasort), rc = 0;
  if (n < 0) return moco_error(errno == ENOENT ? MOCO_ENOENT : MOCO_EIO, "%s: cannot list: %s", dir, strerror(errno));
  for (int i = 0; i < n; i++) {
    if (!rc && image_is_candidate(e[i]->d_name) && !is_dir(dir, e[i]->d_name)) rc = images_add(l, dir, e[i]->d_name, label);
    free(e[i]);
  }
  free(e);
  return rc;
}

/* ImageFolder: each subfolder (name order) is a class; flat (or no subfolder): the files of dir. */
static int collect_images(const opts *o, const char *dir, image_list *l) {
  struct dirent **e;
  int n = scandir(dir, &e, visible, alphasort), rc = 0;
  if (n < 0) return moco_error(errno == ENOENT ? MOCO_ENOENT : MOCO_EIO, "%s: cannot list: %s", dir, strerror(errno));
  for (int i = 0; i < n; i++) {
    if (!rc && !o->flat && is_dir(dir, e[i]->d_name)) {
      char **c = realloc(l->classes, (size_t)(l->n_classes + 1) * sizeof *c);
      if (!c || !(c[l->n_classes] = strdup(e[i]->d_name))) rc = moco_error(MOCO_ENOMEM, "class list");
      if (c) l->classes = c;
      if (!rc) l->n_classes++;
    }
    free(e[i]);
  }
  free(e);
  for (int k = 0; !rc && k < l->n_classes; k++) {
    char sub[FILENAME_MAX * 2];
    snprintf(sub, sizeof sub, "%s/%s", dir, l->classes[k]);
    rc = list_images(l, sub, k);
  }
  if (!rc && !l->n_classes) rc = list_images(l, dir, -1);
  if (!rc && !l->n)
    rc = moco_error(MOCO_EEOF, "%s: no .png, .jpg or .jpeg file%s", dir, l->n_classes ? " in its subfolders" : "");
  return rc;
}

/* PREFIX.classes: the class names, one a line, line k for label k; written like a shard (temporary
 * file, renamed) once the shards are in place. */
static int write_classes(const opts *o, const image_list *l) {
  char path[FILENAME_MAX], tmp[FILENAME_MAX + 8];
  snprintf(path, sizeof path, "%s.classes", o->out);
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  FILE *f = fopen(tmp, "w");
  if (!f) return moco_error(MOCO_EIO, "%s: cannot create: %s", tmp, strerror(errno));
  for (int k = 0; k < l->n_classes; k++) fprintf(f, "%s\n", l->classes[k]);
  if (fclose(f) || rename(tmp, path)) {
    unlink(tmp);
    return moco_error(MOCO_EIO, "%s: write failed: %s", path, strerror(errno));
  }
  return 0;
}

static int cmd_images(const opts *o, int argc, char **argv) {
  if (argc != 1) return moco_error(MOCO_EINVAL, "images: expected one DIR");
  if (o->size < 1) return moco_error(MOCO_EINVAL, "images: --size S is required (the side of the square)");
  image_list l = {0};
  int rc = collect_images(o, argv[0], &l);
  int C = o->grey ? 1 : 3;
  uint32_t *order = rc ? NULL : malloc(l.n * sizeof *order);
  uint8_t *px = rc ? NULL : malloc((size_t)C * o->size * o->size);
  if (!rc && (!order || !px)) rc = moco_error(MOCO_ENOMEM, "%u images of %d pixels", l.n, o->size);
  packer p = {0};
  if (!rc) rc = pack_begin(&p, o, (data_shape){C, o->size, o->size}, DATA_U8, l.n_classes > 0, 0,
                           o->classes ? o->classes : l.n_classes);
  uint64_t skipped = 0;
  if (!rc) {
    rng_t r;
    for (uint32_t i = 0; i < l.n; i++) order[i] = i;
    rng_init(&r, o->seed, RNG_STREAM_SHUFFLE);
    if (!o->no_shuffle) rng_shuffle_u32(&r, order, l.n);
    for (uint32_t i = 0; !rc && i < l.n; i++) {
      uint32_t k = order[i];
      if ((rc = image_load(l.path[k], o->size, C, px))) {
        if (!o->skip_bad || rc == MOCO_ENOMEM) break;
        fprintf(stderr, "mocopack: skipped %s (%s)\n", moco_errmsg(), moco_strerror(rc));
        skipped++;
        rc = 0;
        continue;
      }
      rc = pack_add(&p, l.label[k], px, NULL);
    }
  }
  if (!rc && skipped) printf("mocopack: %llu of %u images skipped (they do not decode)\n", (unsigned long long)skipped, l.n);
  if (rc) {
    if (p.o) pack_abort(&p);
  } else if (!(rc = pack_end(&p)) && l.n_classes) {
    rc = write_classes(o, &l);
  }
  free(order);
  free(px);
  images_free(&l);
  return rc;
}

/* ---- info ---- */

static int cmd_info(const opts *o, int argc, char **argv) {
  if (argc < 1) return moco_error(MOCO_EINVAL, "info: expected files or globs");
  size_t len = 0;
  for (int i = 0; i < argc; i++) len += strlen(argv[i]) + 1;
  char *spec = malloc(len + 1);
  if (!spec) return moco_error(MOCO_ENOMEM, "spec");
  spec[0] = '\0';
  for (int i = 0; i < argc; i++) {
    if (i) strcat(spec, ",");
    strcat(spec, argv[i]);
  }
  dataset ds;
  int rc = dataset_open(&ds, "info", spec, NULL, 0);
  free(spec);
  if (rc) return rc;
  for (int i = 0; i < ds.n_files; i++) {
    const dataset_file *f = &ds.files[i];
    if (f->format == DATA_SHARD)
      printf("%s: shard v%u, %llu records in blocks of %u, %s%s, %u classes\n", f->path, f->shard.version,
             (unsigned long long)f->count, f->shard.block_records,
             f->shard.flags & SHARD_LABELS ? "labels" : "no labels", f->shard.flags & SHARD_PAIR ? ", pairs" : "",
             f->shard.num_classes);
    else if (f->format == DATA_NPY)
      printf("%s: NumPy v%d '%s', %llu records, labels: %s\n", f->path, f->npy.major, f->npy.descr,
             (unsigned long long)f->count, f->labels_path ? f->labels_path : "none");
    else if (f->format == DATA_CIFAR)
      printf("%s: CIFAR-%d binary batch, %llu records\n", f->path, f->cifar.classes, (unsigned long long)f->count);
    else
      printf("%s: IDX%s type 0x%02x, %llu records, labels: %s\n", f->path, f->idx.gz ? " (gzip)" : "",
             f->idx.type, (unsigned long long)f->count, f->labels_path ? f->labels_path : "none");
  }
  printf("total: %llu records of %dx%dx%d %s%s in %d file(s)%s", (unsigned long long)ds.count, ds.shape.c,
         ds.shape.h, ds.shape.w, data_dtype_name(ds.dtype), ds.has_pair ? " pairs" : "", ds.n_files,
         ds.has_labels ? ", labelled" : "");
  if (ds.num_classes) printf(", %d classes", ds.num_classes);
  printf("\n");
  uint64_t bad = 0;
  if (o->verify) {
    for (int f = 0; !rc && f < ds.n_files; f++) {
      dataset_reader r;
      data_record rec;
      int k;
      if ((rc = dataset_reader_open(&r, &ds, f, 0))) break;
      while ((k = dataset_reader_next(&r, &rec)) != 0)
        if (k < 0) {
          bad += r.bad;
          fprintf(stderr, "mocopack: %s\n", moco_errmsg());
        }
      dataset_reader_close(&r);
    }
    if (!rc) printf("verify: %llu bad record(s)\n", (unsigned long long)bad);
  }
  if (!rc && o->stats) {
    float *m = malloc(2 * (size_t)ds.shape.c * sizeof *m);
    rc = m ? dataset_stats(&ds, 0, m, m + ds.shape.c, NULL) : moco_error(MOCO_ENOMEM, "stats");
    for (int k = 0; !rc && k < 2; k++) {
      printf("%s: [", k ? "std" : "mean");
      for (int c = 0; c < ds.shape.c; c++) printf("%s%.6g", c ? ", " : "", m[k * ds.shape.c + c]);
      printf("]\n");
    }
    free(m);
  }
  dataset_close(&ds);
  if (!rc && bad) rc = moco_error(MOCO_ECHECKSUM, "%llu bad record(s)", (unsigned long long)bad);
  return rc;
}

int main(int argc, char **argv) {
  if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
    fputs(usage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const char *cmd = argv[1];
  opts o = {.shard_size = 64ull << 20, .block_size = SHARD_BLOCK_BYTES, .header = -1, .delim = ','};
  int c, rc = 0;
  long long v;
  optind = 2;
  while (!rc && (c = getopt_long(argc, argv, "o:", options, NULL)) != -1) {
    switch (c) {
    case 'o': o.out = optarg; break;
    case OPT_SHARD_SIZE: rc = parse_size(optarg, "--shard-size", &o.shard_size); break;
    case OPT_SHARD_RECORDS:
      if (!(rc = parse_int(optarg, "--shard-records", 1, &v))) o.shard_records = (uint64_t)v;
      break;
    case OPT_BLOCK_SIZE: rc = parse_size(optarg, "--block-size", &o.block_size); break;
    case OPT_CLASSES:
      if (!(rc = parse_int(optarg, "--classes", 1, &v)) && v > INT32_MAX)
        rc = moco_error(MOCO_EINVAL, "--classes: %lld is too large", v);
      o.classes = (int)v;
      break;
    case OPT_ID_START:
      if (!(rc = parse_int(optarg, "--id-start", 0, &v))) o.id_start = v;
      break;
    case OPT_SHAPE: o.shape = optarg; break;
    case OPT_DTYPE: o.dtype = optarg; break;
    case OPT_LABELS: o.labels = optarg; break;
    case OPT_LABELS_DTYPE: o.labels_dtype = optarg; break;
    case OPT_PAIR: o.pair = optarg; break;
    case OPT_LABEL: o.label_col = optarg; break;
    case OPT_HEADER: o.header = 1; break;
    case OPT_NO_HEADER: o.header = 0; break;
    case OPT_DELIM:
      if (!strcmp(optarg, "\\t")) optarg = "\t"; /* --delimiter '\t' as typed in a shell */
      if (strlen(optarg) != 1) rc = moco_error(MOCO_EINVAL, "--delimiter '%s': expected one character", optarg);
      o.delim = optarg[0];
      break;
    case OPT_VERIFY: o.verify = 1; break;
    case OPT_STATS: o.stats = 1; break;
    case OPT_SIZE:
      if (!(rc = parse_int(optarg, "--size", 1, &v)) && v > 4096) rc = moco_error(MOCO_EINVAL, "--size: %lld, at most 4096", v);
      o.size = (int)v;
      break;
    case OPT_GREY: o.grey = 1; break;
    case OPT_FLAT: o.flat = 1; break;
    case OPT_ON_ERROR:
      if (strcmp(optarg, "stop") && strcmp(optarg, "skip"))
        rc = moco_error(MOCO_EINVAL, "--on-error '%s': expected stop or skip", optarg);
      o.skip_bad = !strcmp(optarg, "skip");
      break;
    case OPT_NO_SHUFFLE: o.no_shuffle = 1; break;
    case OPT_SEED:
      if (!(rc = parse_int(optarg, "--seed", 0, &v))) o.seed = (uint64_t)v;
      break;
    case OPT_HELP: fputs(usage, stdout); return 0;
    default: fputs(usage, stderr); return 2;
    }
  }
  if (!rc) {
    int n = argc - optind;
    char **rest = argv + optind;
    if (!strcmp(cmd, "idx") || !strcmp(cmd, "npy") || !strcmp(cmd, "cifar")) rc = cmd_idx(&o, n, rest);
    else if (!strcmp(cmd, "raw")) rc = cmd_raw(&o, n, rest);
    else if (!strcmp(cmd, "csv")) rc = cmd_csv(&o, n, rest);
    else if (!strcmp(cmd, "info")) rc = cmd_info(&o, n, rest);
    else if (!strcmp(cmd, "images")) rc = cmd_images(&o, n, rest);
    else {
      fprintf(stderr, "mocopack: unknown command '%s'\n%s", cmd, usage);
      return 2;
    }
  }
  if (rc) {
    fprintf(stderr, "mocopack: %s (%s)\n", moco_errmsg(), moco_strerror(rc));
    return 1;
  }
  return 0;
}
