#include "core/file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/err.h"

int file_path_check(const char *what, const char *path, size_t extra) {
  size_t n = strlen(path);
  if (n + extra < FILE_PATH_MAX) return 0;
  return moco_error(MOCO_ERANGE, "%s: path of %zu bytes, at most %zu allowed", what, n,
                    (size_t)FILE_PATH_MAX - 1 - extra);
}

static int write_all(int fd, const void *p, size_t n) {
  const char *c = p;
  while (n > 0) {
    ssize_t w = write(fd, c, n > (1u << 30) ? (1u << 30) : n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    c += w;
    n -= (size_t)w;
  }
  return 0;
}

/* A rename is durable once the directory entry is: fsync the directory that holds path. */
static int sync_dir_of(const char *path) {
  char dir[FILE_PATH_MAX];
  const char *slash = strrchr(path, '/');
  size_t len = slash ? (size_t)(slash - path) : 1;
  if (slash && len == 0) len = 1; /* "/file": the root directory */
  if (len >= sizeof dir) return -1;
  memcpy(dir, slash ? path : ".", len);
  dir[len] = '\0';
  int fd = open(dir, O_RDONLY | O_DIRECTORY);
  if (fd < 0) return -1;
  int rc = fsync(fd);
  close(fd);
  return rc;
}

static int commit(const char *tmp, const char *path) {
  if (rename(tmp, path)) {
    int e = errno;
    unlink(tmp);
    return moco_error(MOCO_EIO, "%s: rename over %s failed: %s", tmp, path, strerror(e));
  }
  if (sync_dir_of(path))
    return moco_error(MOCO_EIO, "%s: fsync of its directory failed: %s", path, strerror(errno));
  return 0;
}

int file_commit_stream(FILE *f, const char *tmp, const char *path) {
  const char *failed = NULL;
  int e = 0;
  if (fflush(f)) failed = "write", e = errno;
  if (!failed && fsync(fileno(f))) failed = "fsync", e = errno;
  if (fclose(f) && !failed) failed = "close", e = errno;
  if (failed) {
    unlink(tmp);
    return moco_error(MOCO_EIO, "%s: %s failed: %s", tmp, failed, strerror(e));
  }
  return commit(tmp, path);
}

int file_write_atomic(const char *path, const char *tmp, const file_part *parts, int n, int mode) {
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0)
    return moco_error(errno == ENOSPC || errno == EDQUOT ? MOCO_ENOSPC : MOCO_EIO,
                      "%s: cannot create: %s", tmp, strerror(errno));
  const char *failed = NULL;
  int e = 0;
  if (fchmod(fd, (mode_t)mode)) failed = "chmod", e = errno;
  for (int i = 0; i < n && !failed; i++)
    if (write_all(fd, parts[i].data, parts[i].len)) failed = "write", e = errno;
  if (!failed && fsync(fd)) failed = "fsync", e = errno;
  if (close(fd) && !failed) failed = "close", e = errno;
  if (failed) {
    unlink(tmp);
    /* Full is its own code: the caller can make room (old checkpoints) and try again. */
    return moco_error(e == ENOSPC || e == EDQUOT ? MOCO_ENOSPC : MOCO_EIO, "%s: %s failed: %s", tmp,
                      failed, strerror(e));
  }
  return commit(tmp, path);
}

int file_make_dirs(const char *path, int is_dir, int mode) {
  char buf[FILE_PATH_MAX];
  int rc = file_path_check(path, path, 0);
  if (rc) return rc;
  snprintf(buf, sizeof buf, "%s", path);
  if (!is_dir) {
    char *slash = strrchr(buf, '/');
    if (!slash) return 0;
    *slash = '\0';
  }
  if (!buf[0]) return 0;
  for (char *p = buf + 1;; p++) {
    if (*p == '/' || *p == '\0') {
      char c = *p;
      *p = '\0';
      if (buf[0] && mkdir(buf, (mode_t)mode) && errno != EEXIST)
        return moco_error(MOCO_EIO, "mkdir %s: %s", buf, strerror(errno));
      *p = c;
      if (!c) break;
    }
  }
  return 0;
}
