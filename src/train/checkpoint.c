#include "train/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/err.h"
#include "core/file.h"

/* Trailer: tag (4) | length (8) | crc (4) + covered length (8) | section crc (4). */
enum { TRAILER_PAYLOAD = 12, TRAILER_SIZE = 4 + 8 + TRAILER_PAYLOAD + 4 };

static double unix_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void checkpoint_begin(blob_writer *w, int64_t step) {
  double t = unix_now();
  blob_section_begin(w, "MCKP");
  blob_put_u32(w, CHECKPOINT_VERSION);
  blob_put_u64(w, (uint64_t)step);
  blob_put(w, &t, sizeof t);
  blob_section_end(w);
}

/* Writes the finished blob under its final name. */
static int write_file(const blob_writer *w, const char *dir, int64_t step, char *path, size_t path_len) {
  char tmp[FILE_PATH_MAX + CHECKPOINT_NAME_ROOM], final[FILE_PATH_MAX + CHECKPOINT_NAME_ROOM];
  snprintf(final, sizeof final, "%s/ckpt-%012lld.mcp", dir, (long long)step);
  snprintf(tmp, sizeof tmp, "%s/.ckpt-%012lld.mcp.tmp", dir, (long long)step);
  file_part part = {w->data, w->len};
  int rc = file_write_atomic(final, tmp, &part, 1, 0600);
  if (rc) return moco_error_wrap(rc, "checkpoint of step %lld", (long long)step);
  if (path) snprintf(path, path_len, "%s", final);
  return 0;
}

int checkpoint_commit(blob_writer *w, const char *dir, int64_t step, char *path, size_t path_len,
                      int *pruned) {
  if (pruned) *pruned = 0;
  int rc = file_path_check("checkpoint.dir", dir, CHECKPOINT_NAME_ROOM);
  if (rc) return rc;
  uint64_t covered = w->len;
  uint32_t crc = blob_crc32(w->data, w->len);
  blob_section_begin(w, "CSUM");
  blob_put_u32(w, crc);
  blob_put_u64(w, covered);
  blob_section_end(w);
  if (w->err) return moco_error(w->err, "checkpoint of step %lld: out of memory", (long long)step);
  rc = write_file(w, dir, step, path, path_len);
  if (rc != MOCO_ENOSPC) return rc;
  /* Full: pruning after a successful write would never run again. The older checkpoints are what
   * fills the disk; keep the newest (the one a restart would use) and try once more. */
  int n = checkpoint_prune(dir, 1);
  if (n <= 0) return moco_error(MOCO_ENOSPC, "%s; no older checkpoint to delete", moco_errmsg());
  if (pruned) *pruned = n;
  return write_file(w, dir, step, path, path_len);
}

/* ---- listing ---- */

typedef struct {
  long long step;
  int regular; /* a FIFO or a directory under a checkpoint's name is reported, never opened */
  char name[64];
} entry;

static int entry_newest_first(const void *a, const void *b) {
  long long x = ((const entry *)a)->step, y = ((const entry *)b)->step;
  return x < y ? 1 : x > y ? -1 : 0;
}

/* The checkpoint files of dir, newest first (malloc'd in *out). Returns the count or a negative code;
 * a directory that does not exist holds none. Stray temporary files are deleted when clean_tmp. */
static int list_dir(const char *dir, entry **out, int clean_tmp) {
  *out = NULL;
  DIR *d = opendir(dir);
  if (!d) {
    if (errno == ENOENT) return 0;
    return moco_error(MOCO_EIO, "checkpoint dir %s: %s", dir, strerror(errno));
  }
  int n = 0, cap = 0;
  entry *v = NULL;
  struct dirent *de;
  while ((de = readdir(d))) {
    long long step;
    char tail[8];
    size_t len = strlen(de->d_name);
    if (clean_tmp && len > 4 && !strncmp(de->d_name, ".ckpt-", 6) &&
        !strcmp(de->d_name + len - 4, ".tmp")) {
      unlinkat(dirfd(d), de->d_name, 0);
      continue;
    }
    if (len >= sizeof v->name || sscanf(de->d_name, "ckpt-%lld.%4s", &step, tail) != 2 ||
        strcmp(tail, "mcp"))
      continue;
    if (n == cap) {
      cap = cap ? cap * 2 : 16;
      entry *nv = realloc(v, (size_t)cap * sizeof *v);
      if (!nv) {
        free(v);
        closedir(d);
        return MOCO_ENOMEM;
      }
      v = nv;
    }
    struct stat st;
    v[n].step = step;
    v[n].regular = fstatat(dirfd(d), de->d_name, &st, 0) == 0 && S_ISREG(st.st_mode);
    memcpy(v[n].name, de->d_name, len + 1);
    n++;
  }
  closedir(d);
  if (n > 1) qsort(v, (size_t)n, sizeof *v, entry_newest_first);
  *out = v;
  return n;
}

int checkpoint_prune(const char *dir, int keep) {
  entry *v;
  int n = list_dir(dir, &v, 1);
  if (n < 0) return n;
  int deleted = 0, kept = 0;
  for (int i = 0; i < n; i++) {
    if (!v[i].regular) continue; /* not ours to delete, and no checkpoint to count */
    if (kept < keep) {
      kept++;
      continue;
    }
    char p[FILE_PATH_MAX + CHECKPOINT_NAME_ROOM];
    snprintf(p, sizeof p, "%s/%s", dir, v[i].name);
    if (unlink(p) == 0) deleted++;
  }
  free(v);
  return deleted;
}

/* ---- reading ---- */

static int read_whole(const char *path, uint8_t **data, size_t *len) {
  *data = NULL;
  *len = 0;
  /* O_NONBLOCK: opening a FIFO for reading would wait for a writer forever. */
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0)
    return moco_error(errno == ENOENT ? MOCO_ENOENT : MOCO_EIO, "%s: %s", path, strerror(errno));
  struct stat st;
  if (fstat(fd, &st)) {
    close(fd);
    return moco_error(MOCO_EIO, "%s: %s", path, strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return moco_error(MOCO_EFORMAT, "%s: not a regular file", path);
  }
  size_t n = (size_t)st.st_size;
  uint8_t *p = malloc(n ? n : 1);
  if (!p) {
    close(fd);
    return moco_error(MOCO_ENOMEM, "%s: %zu bytes", path, n);
  }
  size_t got = 0;
  while (got < n) {
    ssize_t k = read(fd, p + got, n - got);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) break;
    got += (size_t)k;
  }
  close(fd);
  *data = p;
  *len = got;
  return 0;
}

int checkpoint_read(checkpoint_file *f, const char *path) {
  memset(f, 0, sizeof *f);
  int rc = file_path_check("checkpoint", path, 0);
  if (rc) return rc;
  snprintf(f->path, sizeof f->path, "%s", path);
  rc = read_whole(path, &f->data, &f->len);
  if (rc) return rc;
  if (f->len < TRAILER_SIZE)
    return moco_error(MOCO_EEOF, "%s: %zu bytes, too short for a checkpoint (truncated?)", path, f->len);

  /* The trailer first: it covers everything, so nothing below reads damaged bytes. */
  blob_reader all, tr, sub;
  size_t body_end = f->len - TRAILER_SIZE;
  blob_reader_init(&all, f->data, f->len, f->path);
  all.pos = body_end;
  uint32_t crc = 0;
  uint64_t covered = 0;
  if (blob_section(&all, "CSUM", &tr) || blob_get_u32(&tr, &crc) || blob_get_u64(&tr, &covered))
    return moco_error(MOCO_EEOF, "%s: no valid checksum trailer at offset %zu (truncated?)", path,
                      body_end);
  if (covered != body_end)
    return moco_error(MOCO_EEOF, "%s: trailer covers %llu bytes but %zu precede it (truncated?)", path,
                      (unsigned long long)covered, body_end);
  if (blob_crc_mismatch(crc, blob_crc32(f->data, body_end)))
    return moco_error(MOCO_ECHECKSUM, "%s: whole-file checksum mismatch (damaged)", path);

  blob_reader_init(&f->body, f->data, body_end, f->path);
  uint32_t version = 0;
  uint64_t step = 0;
  if ((rc = blob_section(&f->body, "MCKP", &sub))) return moco_error_wrap(rc, "checkpoint header");
  if ((rc = blob_get_u32(&sub, &version)) || (rc = blob_get_u64(&sub, &step)) ||
      (rc = blob_get(&sub, &f->time, sizeof f->time)))
    return rc;
  if (version != CHECKPOINT_VERSION)
    return moco_error(MOCO_EFORMAT, "%s: checkpoint format version %u, this mocod reads %u", path,
                      version, CHECKPOINT_VERSION);
  f->step = (int64_t)step;
  return 0;
}

void checkpoint_file_free(checkpoint_file *f) {
  free(f->data);
  memset(f, 0, sizeof *f);
}

int checkpoint_read_latest(checkpoint_file *f, const char *dir, checkpoint_skip_fn skip, void *ctx) {
  memset(f, 0, sizeof *f);
  int rc = file_path_check("checkpoint.dir", dir, CHECKPOINT_NAME_ROOM);
  if (rc) return rc;
  entry *v;
  int n = list_dir(dir, &v, 0), tried = 0;
  if (n < 0) return n;
  for (int i = 0; i < n; i++) {
    char p[FILE_PATH_MAX + CHECKPOINT_NAME_ROOM];
    snprintf(p, sizeof p, "%s/%s", dir, v[i].name);
    if (!v[i].regular) {
      if (skip) skip(ctx, p, "not a regular file");
      continue;
    }
    tried++;
    rc = checkpoint_read(f, p);
    if (rc == 0) {
      free(v);
      return 0;
    }
    if (rc == MOCO_ENOMEM) {
      free(v);
      checkpoint_file_free(f);
      return rc;
    }
    if (skip) skip(ctx, p, moco_errmsg());
    checkpoint_file_free(f);
  }
  free(v);
  if (tried == 0) return moco_error(MOCO_ENOENT, "%s: no checkpoint", dir);
  return moco_error(MOCO_ECHECKSUM, "%s: all %d checkpoints are damaged", dir, tried);
}

/* ---- a whole checkpoint of a trainer ---- */

static void put_json_section(blob_writer *w, const char tag[4], const char *text) {
  blob_section_begin(w, tag);
  blob_put_str(w, text);
  blob_section_end(w);
}

int checkpoint_save(const trainer *t, const char *config_text, const char *sets_text, const char *dir, int keep,
                    checkpoint_info *info) {
  memset(info, 0, sizeof *info);
  blob_writer w;
  blob_writer_init(&w);
  info->step = trainer_step_count(t);
  checkpoint_begin(&w, info->step);
  trainer_save(t, &w);
  /* The effective config rides along, for the record and for warnings on resume; the `set` values so
   * that a resumed run keeps them. */
  put_json_section(&w, "CONF", config_text);
  put_json_section(&w, "SETV", sets_text);
  int rc = checkpoint_commit(&w, dir, info->step, info->path, sizeof info->path, &info->pruned);
  info->bytes = (int64_t)w.len;
  blob_writer_free(&w);
  if (rc) return rc;
  info->time = unix_now();
  int pruned = checkpoint_prune(dir, keep);
  return pruned < 0 ? pruned : 0;
}

json_t *checkpoint_json(blob_reader *body, const char tag[4]) {
  blob_reader sub;
  uint32_t n = 0;
  if (blob_section(body, tag, &sub) || blob_get_u32(&sub, &n) || n > sub.len - sub.pos) return NULL;
  return json_loadb((const char *)sub.data + sub.pos, n, 0, NULL);
}
