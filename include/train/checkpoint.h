/* Checkpoint files. A checkpoint is one blob (include/core/blob.h):
 *
 *     "MCKP" header: format version (u32), step (u64), Unix time (f64)
 *     the trainer's sections (each module's x_save, in a fixed order)
 *     "CONF" the effective config and "SETV" the values changed with `set`, JSON text (u32 length + bytes)
 *     "CSUM" trailer: crc32 of every byte before the trailer (u32), their count (u64)
 *
 * Sections carry their own checksums; the trailer adds a whole-file one, so a truncated or damaged
 * file is refused before any section is applied to a model. Files are <dir>/ckpt-<step, 12 digits>.mcp
 * (names sort by step), written atomically Redis style: a temporary file, fsync, rename over the final
 * name, fsync of the directory. A crash leaves the previous checkpoints and perhaps a stray temporary
 * file, never half a checkpoint under a final name. */
#ifndef MOCO_TRAIN_CHECKPOINT_H
#define MOCO_TRAIN_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "core/blob.h"
#include "core/file.h"
#include "train/trainer.h"

#define CHECKPOINT_VERSION 1u
/* Bytes a checkpoint's name adds to checkpoint.dir: "/.ckpt-<12 digits>.mcp.tmp" and its NUL, rounded up. */
#define CHECKPOINT_NAME_ROOM 64

/* Starts a checkpoint in w (initialised by the caller): writes the header section. */
void checkpoint_begin(blob_writer *w, int64_t step);
/* Appends the trailer and writes w->data atomically to <dir>/ckpt-<step>.mcp; the directory must exist.
 * The file's path goes to path (when not NULL). When the disk is full, deletes every checkpoint but
 * the newest and tries once more; *pruned (when not NULL) says how many were deleted for that.
 * MOCO_ERANGE when dir is too long (naming checkpoint.dir), MOCO_ENOSPC, MOCO_EIO with the file and
 * errno text on failure. */
int checkpoint_commit(blob_writer *w, const char *dir, int64_t step, char *path, size_t path_len,
                      int *pruned);

/* Deletes all but the `keep` newest checkpoints, and stray temporary files; files under a checkpoint's
 * name that are not regular files are left alone. Returns how many files were deleted or a negative
 * code. */
int checkpoint_prune(const char *dir, int keep);

/* A checkpoint read into memory and verified (header and whole-file checksum). `body` is positioned
 * at the first trainer section and ends before the trailer. */
typedef struct {
  uint8_t *data;
  size_t len;
  int64_t step;
  double time;
  char path[FILE_PATH_MAX + CHECKPOINT_NAME_ROOM];
  blob_reader body;
} checkpoint_file;

/* Reads and verifies one file. MOCO_ENOENT, MOCO_EIO, MOCO_EEOF (truncated), MOCO_ECHECKSUM,
 * MOCO_EFORMAT, each with the path and what was found. */
int checkpoint_read(checkpoint_file *f, const char *path);
void checkpoint_file_free(checkpoint_file *f);

/* Called for each damaged checkpoint skipped by checkpoint_read_latest. */
typedef void (*checkpoint_skip_fn)(void *ctx, const char *path, const char *why);

/* The newest checkpoint of dir that verifies; newer damaged ones, and anything under a checkpoint's
 * name that is not a regular file (a FIFO would block the reader), are reported through skip (may be
 * NULL) and passed over. MOCO_ENOENT when the directory holds no checkpoint (or does not exist),
 * MOCO_ECHECKSUM when it holds some and every one is damaged. */
int checkpoint_read_latest(checkpoint_file *f, const char *dir, checkpoint_skip_fn skip, void *ctx);

/* ---- a whole checkpoint of a trainer ---- */

/* Where a checkpoint went. */
typedef struct {
  char path[FILE_PATH_MAX + CHECKPOINT_NAME_ROOM];
  int64_t step;
  double time;   /* Unix seconds when it was written */
  int64_t bytes; /* file size */
  int pruned;    /* older checkpoints deleted to make room on a full disk */
} checkpoint_info;

/* Writes the whole checkpoint of t at its current step: header, trainer_save's sections, the config and
 * the `set` values (JSON texts) and the trailer, atomically into dir (checkpoint_commit), then keeps the
 * `keep` newest. Called from the thread that owns the trainer. */
int checkpoint_save(const trainer *t, const char *config_text, const char *sets_text, const char *dir, int keep,
                    checkpoint_info *info);

/* A JSON section of a checkpoint's body ("CONF", "SETV"), a new reference, or NULL when it has none
 * (older checkpoints) or it does not parse. */
json_t *checkpoint_json(blob_reader *body, const char tag[4]);

#endif
