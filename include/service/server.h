/* The daemon proper: the libuv loop that owns every piece of state, the control socket's command
 * table, the trainer driven one job at a time off the loop, the logs and the checkpoints.
 *
 * Threads. The loop thread owns the server, the config and the trainer. A job (one training step, an
 * evaluation, a checkpoint, an export) runs on libuv's work queue; while it runs, the loop does not
 * touch the trainer, and the job touches nothing else. Its result comes back to the loop (after_work),
 * which publishes a snapshot for `status`, writes the logs and decides the next job. Commands that change
 * the model or its settings wait in a queue and are applied between two jobs, never during one, so
 * `status` is answered from loop memory at any time, in microseconds. */
#ifndef MOCO_SERVICE_SERVER_H
#define MOCO_SERVICE_SERVER_H

#include <jansson.h>

typedef struct {
  int resume;         /* -1: resume when a checkpoint exists (default), 0: start fresh, 1: must resume */
  const char *config_path; /* for messages; may be NULL */
  /* The --set PATH=VALUE flags: on resume, values changed with `set` in earlier runs are restored
   * except for the keys these name (the command line decides those). */
  const char *const *sets;
  int n_sets;
  /* Called once: rc 0 when the control socket accepts connections, else the failure (msg says why). */
  void (*ready)(void *ctx, int rc, const char *msg);
  void *ready_ctx;
} server_options;

/* mkdir -p (mode 0700) of a directory, or of a file's directory when is_dir is 0. */
int server_make_dirs(const char *path, int is_dir);

/* Refuses (MOCO_ERANGE, naming the key) a path option too long for FILE_PATH_MAX with what mocod
 * appends to it: no path is ever cut to fit a buffer. */
int server_check_paths(const json_t *config);

/* Opens the human log named by the config (log.file, log.level), creating its directory. The process
 * does this first, so that everything after it, the pid file included, is logged. */
int server_open_log(const json_t *config);

/* Runs mocod on a finalized config until it stops (stop command, SIGTERM/SIGINT, finished with
 * service.exit_on_finish, or a failure to start). Returns the process exit status: 0 after a clean
 * stop, 1 when it could not start (opt->ready has been told why). */
int server_run(json_t *config, const server_options *opt);

#endif
