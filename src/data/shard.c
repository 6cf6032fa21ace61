#include "data/shard.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/blob.h"
#include "core/err.h"

/* Same bound as IDX: a corrupt header must not size an allocation. */
#define SHARD_MAX_SAMPLE_ELEMS (1u << 28)

size_t shard_sample_bytes(const shard_header *h) {
  return data_shape_size(h->shape) * data_dtype_size(h->dtype);
}

size_t shard_record_bytes(const shard_header *h) {
  return 8 + (h->flags & SHARD_LABELS ? 4 : 0) + shard_sample_bytes(h) * (h->flags & SHARD_PAIR ? 2 : 1);
}

uint64_t shard_file_bytes(const shard_header *h) {
  uint64_t blocks = (h->count + h->block_records - 1) / h->block_records;
  return SHARD_HEADER_BYTES + h->count * shard_record_bytes(h) + 4 * blocks;
}

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static uint32_t get32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

static void encode_header(const shard_header *h, uint8_t b[SHARD_HEADER_BYTES]) {
  memset(b, 0, SHARD_HEADER_BYTES);
  memcpy(b, SHARD_MAGIC, 8);
  put32(b + 8, h->version);
  put32(b + 12, h->flags);
  put32(b + 16, (uint32_t)h->dtype);
  put32(b + 20, (uint32_t)h->shape.c);
  put32(b + 24, (uint32_t)h->shape.h);
  put32(b + 28, (uint32_t)h->shape.w);
  put32(b + 32, h->num_classes);
  put32(b + 36, h->block_records);
  memcpy(b + 40, &h->count, 8);
  put32(b + 60, blob_crc32(b, 60));
}

/* Field checks shared by reader and writer; `path` and `at` name where the header came from. */
static int check_header(const shard_header *h, const char *path) {
  if (h->version != SHARD_VERSION)
    return moco_error(MOCO_EFORMAT, "%s: offset 8: version %u, expected %u", path, h->version, SHARD_VERSION);
  if (h->flags & ~(uint32_t)(SHARD_LABELS | SHARD_PAIR))
    return moco_error(MOCO_EFORMAT, "%s: offset 12: flags 0x%x, expected bits of 0x3", path, h->flags);
  if (h->dtype != DATA_U8 && h->dtype != DATA_F32)
    return moco_error(MOCO_EFORMAT, "%s: offset 16: dtype %u, expected 1 (u8) or 2 (f32)", path,
                      (unsigned)h->dtype);
  if (h->shape.c < 1 || h->shape.h < 1 || h->shape.w < 1 ||
      (uint64_t)h->shape.c * h->shape.h * h->shape.w > SHARD_MAX_SAMPLE_ELEMS)
    return moco_error(MOCO_EFORMAT, "%s: offset 20: sample shape %dx%dx%d, expected positive and at most "
                      "%u elements", path, h->shape.c, h->shape.h, h->shape.w, SHARD_MAX_SAMPLE_ELEMS);
  if (h->num_classes > INT32_MAX)
    return moco_error(MOCO_EFORMAT, "%s: offset 32: num_classes %u", path, h->num_classes);
  if (h->block_records < 1)
    return moco_error(MOCO_EFORMAT, "%s: offset 36: block_records 0, expected >= 1", path);
  if (h->count > ((uint64_t)1 << 60) / shard_record_bytes(h))
    return moco_error(MOCO_EFORMAT, "%s: offset 40: record count %llu cannot fit in a file", path,
                      (unsigned long long)h->count);
  if ((uint64_t)h->block_records * shard_record_bytes(h) > (1u << 30))
    return moco_error(MOCO_EFORMAT, "%s: offset 36: blocks of %u records (%zu bytes each) exceed 1 GiB", path,
                      h->block_records, shard_record_bytes(h));
  return 0;
}

static int decode_header(const uint8_t b[SHARD_HEADER_BYTES], shard_header *h, const char *path) {
  if (memcmp(b, SHARD_MAGIC, 8))
    return moco_error(MOCO_EFORMAT, "%s: offset 0: bad magic, expected \"" SHARD_MAGIC "\"", path);
  uint32_t stored = get32(b + 60), crc = blob_crc32(b, 60);
  if (blob_crc_mismatch(stored, crc))
    return moco_error(MOCO_ECHECKSUM, "%s: offset 0: header checksum mismatch: stored 0x%08x, computed 0x%08x",
                      path, stored, crc);
  h->version = get32(b + 8);
  h->flags = get32(b + 12);
  h->dtype = (data_dtype)get32(b + 16);
  h->shape = (data_shape){(int)get32(b + 20), (int)get32(b + 24), (int)get32(b + 28)};
  h->num_classes = get32(b + 32);
  h->block_records = get32(b + 36);
  memcpy(&h->count, b + 40, 8);
  return check_header(h, path);
}

static int open_file(const char *path, int *fd) {
  if ((*fd = open(path, O_RDONLY | O_CLOEXEC)) >= 0) return 0;
  return moco_error(errno == ENOENT ? MOCO_ENOENT : MOCO_EIO, "%s: cannot open: %s", path, strerror(errno));
}

static int read_at(int fd, void *p, size_t n, uint64_t off, size_t *got) {
  size_t done = 0;
  while (done < n) {
    ssize_t k = pread(fd, (uint8_t *)p + done, n - done, (off_t)(off + done));
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) return -errno;
    if (k == 0) break;
    done += (size_t)k;
  }
  *got = done;
  return 0;
}

int shard_probe(const char *path, shard_header *h) {
  int fd, rc = open_file(path, &fd);
  if (rc) return rc;
  uint8_t b[SHARD_HEADER_BYTES];
  size_t got = 0;
  struct stat st;
  rc = read_at(fd, b, sizeof b, 0, &got);
  if (rc || fstat(fd, &st)) {
    close(fd);
    return moco_error(MOCO_EIO, "%s: reading the header: %s", path, strerror(rc ? -rc : errno));
  }
  close(fd);
  if (got < SHARD_HEADER_BYTES)
    return moco_error(MOCO_EEOF, "%s: offset %zu: truncated header: need %d bytes, found %zu", path, got,
                      SHARD_HEADER_BYTES, got);
  if ((rc = decode_header(b, h, path))) return rc;
  uint64_t want = shard_file_bytes(h), have = (uint64_t)st.st_size;
  if (have < want) {
    uint64_t blk = (uint64_t)h->block_records * shard_record_bytes(h) + 4;
    uint64_t b_at = (have - SHARD_HEADER_BYTES) / blk;
    return moco_error(MOCO_EEOF, "%s: offset %llu: truncated: the header promises %llu records (%llu bytes), "
                      "the file holds %llu bytes (block %llu, from record %llu, is incomplete)", path,
                      (unsigned long long)have, (unsigned long long)h->count, (unsigned long long)want,
                      (unsigned long long)have, (unsigned long long)b_at,
                      (unsigned long long)(b_at * h->block_records));
  }
  if (have > want)
    return moco_error(MOCO_EFORMAT, "%s: offset %llu: %llu bytes after the %llu records the header promises",
                      path, (unsigned long long)want, (unsigned long long)(have - want),
                      (unsigned long long)h->count);
  return 0;
}

int shard_writer_open(shard_writer *w, const char *path, const shard_header *h) {
  memset(w, 0, sizeof *w);
  w->h = *h;
  w->h.version = SHARD_VERSION;
  w->h.count = 0;
  w->rec_bytes = shard_record_bytes(&w->h);
  if (!w->h.block_records) {
    size_t n = SHARD_BLOCK_BYTES / w->rec_bytes;
    w->h.block_records = n ? (uint32_t)n : 1;
  }
  int rc = check_header(&w->h, path);
  if (rc) return rc;
  size_t len = strlen(path);
  w->path = malloc(len + 1);
  w->tmp_path = malloc(len + 5);
  w->block = malloc((size_t)w->h.block_records * w->rec_bytes);
  if (!w->path || !w->tmp_path || !w->block) {
    shard_writer_abort(w);
    return moco_error(MOCO_ENOMEM, "%s: writer buffers", path);
  }
  memcpy(w->path, path, len + 1);
  memcpy(w->tmp_path, path, len);
  memcpy(w->tmp_path + len, ".tmp", 5);
  if (!(w->f = fopen(w->tmp_path, "wb"))) {
    /* A missing directory is the common cause: say so, under the code that means it. */
    rc = errno == ENOENT ? moco_error(MOCO_ENOENT, "%s: cannot create: its directory does not exist", w->tmp_path)
                         : moco_error(MOCO_EIO, "%s: cannot create: %s", w->tmp_path, strerror(errno));
    free(w->path);
    free(w->tmp_path);
    free(w->block);
    memset(w, 0, sizeof *w);
    return rc;
  }
  uint8_t b[SHARD_HEADER_BYTES];
  encode_header(&w->h, b);
  if (fwrite(b, 1, sizeof b, w->f) != sizeof b) {
    rc = moco_error(MOCO_EIO, "%s: write: %s", w->tmp_path, strerror(errno));
    shard_writer_abort(w);
    return rc;
  }
  return 0;
}

static int flush_block(shard_writer *w) {
  if (!w->in_block) return 0;
  size_t n = w->in_block * w->rec_bytes;
  uint32_t crc = blob_crc32(w->block, n);
  if (fwrite(w->block, 1, n, w->f) != n || fwrite(&crc, 1, 4, w->f) != 4)
    return moco_error(MOCO_EIO, "%s: write: %s", w->tmp_path, strerror(errno));
  w->in_block = 0;
  return 0;
}

static int check_values(const shard_writer *w, const void *sample) {
  if (w->h.dtype != DATA_F32) return 0;
  size_t n = data_shape_size(w->h.shape);
  for (size_t i = 0; i < n; i++) {
    float v;
    memcpy(&v, (const uint8_t *)sample + 4 * i, 4);
    if (!isfinite(v))
      return moco_error(MOCO_ERANGE, "%s: record %llu: element %zu is %g, expected a finite value", w->path,
                        (unsigned long long)w->h.count, i, v);
  }
  return 0;
}

int shard_writer_add(shard_writer *w, int64_t id, int32_t label, const void *sample, const void *pair) {
  int labels = w->h.flags & SHARD_LABELS, paired = w->h.flags & SHARD_PAIR;
  if (!sample || !pair != !paired)
    return moco_error(MOCO_EINVAL, "%s: record %llu: %s", w->path, (unsigned long long)w->h.count,
                      !sample ? "no sample" : paired ? "a pair shard needs a second sample"
                                                     : "a second sample for a shard without pairs");
  if (labels && (label < -1 || (w->h.num_classes && label >= (int64_t)w->h.num_classes)))
    return moco_error(MOCO_ERANGE, "%s: record %llu: label %d out of range [-1, %u)", w->path,
                      (unsigned long long)w->h.count, label, w->h.num_classes);
  int rc = check_values(w, sample);
  if (!rc && pair) rc = check_values(w, pair);
  if (rc) return rc;
  size_t sb = shard_sample_bytes(&w->h);
  uint8_t *p = w->block + (size_t)w->in_block * w->rec_bytes;
  memcpy(p, &id, 8);
  p += 8;
  if (labels) {
    memcpy(p, &label, 4);
    p += 4;
  }
  memcpy(p, sample, sb);
  if (pair) memcpy(p + sb, pair, sb);
  w->h.count++;
  if (++w->in_block == w->h.block_records) return flush_block(w);
  return 0;
}

static void writer_free(shard_writer *w) {
  if (w->f) fclose(w->f);
  free(w->path);
  free(w->tmp_path);
  free(w->block);
  memset(w, 0, sizeof *w);
}

int shard_writer_close(shard_writer *w) {
  uint8_t b[SHARD_HEADER_BYTES];
  int rc = flush_block(w);
  if (rc) goto fail;
  encode_header(&w->h, b);
  if (fseek(w->f, 0, SEEK_SET) || fwrite(b, 1, sizeof b, w->f) != sizeof b || fflush(w->f) ||
      fsync(fileno(w->f))) {
    rc = moco_error(MOCO_EIO, "%s: finishing: %s", w->tmp_path, strerror(errno));
    goto fail;
  }
  fclose(w->f);
  w->f = NULL;
  if (rename(w->tmp_path, w->path)) {
    rc = moco_error(MOCO_EIO, "%s: rename to %s: %s", w->tmp_path, w->path, strerror(errno));
    goto fail;
  }
  writer_free(w);
  return 0;
fail:
  shard_writer_abort(w);
  return rc;
}

void shard_writer_abort(shard_writer *w) {
  if (w->f) fclose(w->f);
  w->f = NULL;
  if (w->tmp_path) unlink(w->tmp_path);
  writer_free(w);
}

int shard_reader_open(shard_reader *r, const char *path, const shard_header *h, uint64_t start) {
  memset(r, 0, sizeof *r);
  r->fd = -1;
  if (start > h->count)
    return moco_error(MOCO_ERANGE, "%s: start record %llu beyond the %llu records", path,
                      (unsigned long long)start, (unsigned long long)h->count);
  r->path = path;
  r->h = *h;
  r->rec_bytes = shard_record_bytes(h);
  r->block_index = UINT64_MAX;
  r->next = start;
  if (!(r->block = malloc((size_t)h->block_records * r->rec_bytes + 4)))
    return moco_error(MOCO_ENOMEM, "%s: a block of %u records", path, h->block_records);
  int rc = open_file(path, &r->fd);
  if (rc) {
    shard_reader_close(r);
    return rc;
  }
  posix_fadvise(r->fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  return 0;
}

void shard_reader_close(shard_reader *r) {
  if (r->fd >= 0) close(r->fd);
  r->fd = -1;
  free(r->block);
  r->block = NULL;
}

static int load_block(shard_reader *r, uint64_t b) {
  uint64_t first = b * r->h.block_records;
  uint64_t n = r->h.count - first < r->h.block_records ? r->h.count - first : r->h.block_records;
  uint64_t off = SHARD_HEADER_BYTES + first * r->rec_bytes + 4 * b;
  size_t len = (size_t)n * r->rec_bytes, got = 0;
  int err = read_at(r->fd, r->block, len + 4, off, &got);
  if (err || got < len + 4) {
    /* The file changed under us since it was probed: nothing after this point can be trusted. */
    r->bad = r->h.count - r->next;
    r->next = r->h.count;
    if (err) return moco_error(MOCO_EIO, "%s: offset %llu: reading block %llu: %s", r->path,
                               (unsigned long long)off, (unsigned long long)b, strerror(-err));
    return moco_error(MOCO_EEOF, "%s: offset %llu: block %llu is truncated: need %zu bytes, found %zu",
                      r->path, (unsigned long long)off, (unsigned long long)b, len + 4, got);
  }
  uint32_t stored = get32(r->block + len), crc = blob_crc32(r->block, len);
  if (blob_crc_mismatch(stored, crc)) {
    r->bad = first + n - r->next;
    int rc = moco_error(MOCO_ECHECKSUM, "%s: offset %llu: block %llu (records %llu..%llu) checksum mismatch: "
                        "stored 0x%08x, computed 0x%08x", r->path, (unsigned long long)off,
                        (unsigned long long)b, (unsigned long long)first,
                        (unsigned long long)(first + n - 1), stored, crc);
    r->next = first + n;
    return rc;
  }
  r->block_index = b;
  return 0;
}

int shard_reader_next(shard_reader *r, data_record *rec) {
  if (r->next >= r->h.count) return 0;
  uint64_t b = r->next / r->h.block_records;
  if (b != r->block_index) {
    int rc = load_block(r, b);
    if (rc) return rc;
  }
  const uint8_t *p = r->block + (size_t)(r->next - b * r->h.block_records) * r->rec_bytes;
  memcpy(&rec->id, p, 8);
  p += 8;
  rec->label = -1;
  if (r->h.flags & SHARD_LABELS) {
    memcpy(&rec->label, p, 4);
    p += 4;
  }
  rec->sample = p;
  rec->pair = r->h.flags & SHARD_PAIR ? p + shard_sample_bytes(&r->h) : NULL;
  r->next++;
  return 1;
}
