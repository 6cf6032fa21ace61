/* Durable file writes, shared by checkpoints and embedding exports. */
#ifndef MOCO_CORE_FILE_H
#define MOCO_CORE_FILE_H

#include <stddef.h>
#include <stdio.h>

/* One piece of a file's content (a header, then the data, ...). */
typedef struct {
  const void *data;
  size_t len;
} file_part;

/* Writes the parts in order to `tmp` with permissions `mode` (exactly, whatever the umask), fsyncs it,
 * renames it over `path` and fsyncs the directory holding `path`, Redis style: a crash leaves the old
 * file or the new one under `path`, never half of one. `tmp` must be in the same directory and is
 * removed on failure. Returns 0 or MOCO_EIO naming the file, the step that failed and why. */
int file_write_atomic(const char *path, const char *tmp, const file_part *parts, int n, int mode);

/* The same commit for a file written through stdio as a stream: flushes and fsyncs f, closes it, renames
 * tmp over path and fsyncs the directory. f is closed and tmp removed whatever happens. */
int file_commit_stream(FILE *f, const char *tmp, const char *path);

#endif
