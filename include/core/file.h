/* Durable file writes, shared by checkpoints and embedding exports. */
#ifndef MOCO_CORE_FILE_H
#define MOCO_CORE_FILE_H

#include <stddef.h>
#include <stdio.h>

/* The longest path mocod opens or builds a name from: Linux's PATH_MAX. Paths from the config and the
 * protocol are checked against it (file_path_check) where they are accepted, so that no buffer below
 * ever cuts one: a cut path would write somewhere else than asked. */
#define FILE_PATH_MAX 4096

/* 0 when `path` plus `extra` bytes that will be appended (a file name under a directory) fits in
 * FILE_PATH_MAX with its NUL, else MOCO_ERANGE "what: path of N bytes, at most M allowed". */
int file_path_check(const char *what, const char *path, size_t extra);

/* One piece of a file's content (a header, then the data, ...). */
typedef struct {
  const void *data;
  size_t len;
} file_part;

/* Writes the parts in order to `tmp` with permissions `mode` (exactly, whatever the umask), fsyncs it,
 * renames it over `path` and fsyncs the directory holding `path`, Redis style: a crash leaves the old
 * file or the new one under `path`, never half of one. `tmp` must be in the same directory and is
 * removed on failure. Returns 0, MOCO_ENOSPC when the file system (or quota) is full, or MOCO_EIO,
 * each naming the file, the step that failed and why. */
int file_write_atomic(const char *path, const char *tmp, const file_part *parts, int n, int mode);

/* The same commit for a file written through stdio as a stream: flushes and fsyncs f, closes it, renames
 * tmp over path and fsyncs the directory. f is closed and tmp removed whatever happens. */
int file_commit_stream(FILE *f, const char *tmp, const char *path);

/* mkdir -p of `path` (is_dir) or of the directory holding the file `path` (!is_dir), creating what is
 * missing with `mode` (less the umask). Returns 0, MOCO_ERANGE for a path over FILE_PATH_MAX, or MOCO_EIO
 * naming the directory that could not be made and why. */
int file_make_dirs(const char *path, int is_dir, int mode);

#endif
