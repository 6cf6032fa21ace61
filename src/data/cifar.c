#include "data/cifar.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "core/err.h"

int cifar_is_candidate(const char *path) {
  size_t n = strlen(path);
  return n > 4 && !strcmp(path + n - 4, ".bin");
}

/* CIFAR-100's files are train.bin and test.bin; CIFAR-10's data_batch_N.bin and test_batch.bin. */
static int named_like_100(const char *path) {
  const char *base = strrchr(path, '/');
  base = base ? base + 1 : path;
  return !strcmp(base, "train.bin") || !strcmp(base, "test.bin");
}

int cifar_probe(const char *path, cifar_info *info) {
  struct stat st;
  if (stat(path, &st))
    return moco_error(errno == ENOENT ? MOCO_ENOENT : MOCO_EIO, "%s: %s", path, strerror(errno));
  uint64_t size = (uint64_t)st.st_size;
  int fits10 = size % (1 + CIFAR_PIXELS) == 0, fits100 = size % (2 + CIFAR_PIXELS) == 0;
  if (size == 0 || (!fits10 && !fits100))
    return moco_error(MOCO_EFORMAT, "%s: %llu bytes: a CIFAR binary batch (a .bin file) holds whole records of "
                      "3073 bytes (CIFAR-10: label, 3072 pixels) or 3074 (CIFAR-100: coarse and fine label, 3072 "
                      "pixels); truncated? (%llu bytes over a CIFAR-10 record, %llu over a CIFAR-100 one)", path,
                      (unsigned long long)size, (unsigned long long)(size % (1 + CIFAR_PIXELS)),
                      (unsigned long long)(size % (2 + CIFAR_PIXELS)));
  int is100 = fits100 && (!fits10 || named_like_100(path));
  info->classes = is100 ? 100 : 10;
  info->label_bytes = is100 ? 2 : 1;
  info->count = size / (info->label_bytes + CIFAR_PIXELS);
  return 0;
}

static int open_reader(cifar_reader *r, const char *path, const cifar_info *info, uint64_t start, int seekable) {
  memset(r, 0, sizeof *r);
  r->path = path;
  r->info = *info;
  r->next = start;
  if (start > info->count)
    return moco_error(MOCO_ERANGE, "%s: start record %llu beyond the %llu records", path, (unsigned long long)start,
                      (unsigned long long)info->count);
  if (!(r->f = fopen(path, "rb")))
    return moco_error(errno == ENOENT ? MOCO_ENOENT : MOCO_EIO, "%s: cannot open: %s", path, strerror(errno));
  setvbuf(r->f, NULL, seekable ? _IONBF : _IOFBF, seekable ? 0 : 1 << 17);
  off_t to = (off_t)(start * (info->label_bytes + CIFAR_PIXELS));
  if (fseeko(r->f, to, SEEK_SET)) {
    int e = errno;
    cifar_reader_close(r);
    return moco_error(MOCO_EIO, "%s: seek to offset %lld: %s", path, (long long)to, strerror(e));
  }
  return 0;
}

int cifar_reader_open(cifar_reader *r, const char *path, const cifar_info *info, uint64_t start) {
  return open_reader(r, path, info, start, 0);
}

int cifar_reader_open_seekable(cifar_reader *r, const char *path, const cifar_info *info) {
  return open_reader(r, path, info, 0, 1);
}

int cifar_reader_seek(cifar_reader *r, uint64_t index) {
  if (index > r->info.count)
    return moco_error(MOCO_ERANGE, "%s: record %llu beyond the %llu records", r->path, (unsigned long long)index,
                      (unsigned long long)r->info.count);
  if (index == r->next) return 0;
  off_t to = (off_t)(index * (r->info.label_bytes + CIFAR_PIXELS));
  if (fseeko(r->f, to, SEEK_SET))
    return moco_error(MOCO_EIO, "%s: seek to offset %lld: %s", r->path, (long long)to, strerror(errno));
  r->next = index;
  return 0;
}

void cifar_reader_close(cifar_reader *r) {
  if (r->f) fclose(r->f);
  r->f = NULL;
}

int cifar_reader_next(cifar_reader *r, data_record *rec) {
  if (r->next >= r->info.count) return 0;
  size_t lb = r->info.label_bytes, bytes = lb + CIFAR_PIXELS;
  uint64_t off = r->next * bytes;
  if (fread(r->rec, 1, bytes, r->f) != bytes) {
    r->bad = r->info.count - r->next;
    uint64_t at = r->next;
    r->next = r->info.count;
    return moco_error(MOCO_EEOF, "%s: offset %llu: record %llu is cut short (the file changed after it was opened?)",
                      r->path, (unsigned long long)off, (unsigned long long)at);
  }
  int label = r->rec[lb - 1];
  if (label >= r->info.classes) {
    r->bad = 1;
    r->next++;
    return moco_error(MOCO_ERANGE, "%s: offset %llu: record %llu: label %d, expected 0..%d (CIFAR-%d)", r->path,
                      (unsigned long long)(off + lb - 1), (unsigned long long)(r->next - 1), label,
                      r->info.classes - 1, r->info.classes);
  }
  rec->id = (int64_t)r->next++;
  rec->label = label;
  rec->sample = r->rec + lb;
  rec->pair = NULL;
  return 1;
}
