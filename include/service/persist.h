/* What outlives one mocod process, for the server (service/server.h): checkpoints written and resumed,
 * exported encoders and features, and the values changed with `set`, which every checkpoint carries so that a resume does not undo
 * them. Resuming loads the newest checkpoint into the trainer (and forwards it to the other ranks);
 * `set` changes the config and the trainer between two steps. Every function runs on the loop thread
 * with no job in flight. The server's state is internal to src/service (server_int.h). */
#ifndef MOCO_SERVICE_PERSIST_H
#define MOCO_SERVICE_PERSIST_H

#include <jansson.h>
#include <stddef.h>

#include "service/ctl.h"
#include "service/server.h"

struct server;
struct job;

/* Resumes per opt->resume from the newest readable checkpoint in checkpoint.dir (damaged ones are
 * skipped with a warning): loads the trainer, sends the state to the other ranks, keeps the file's
 * `set` values to restore (less those the command line names) and warns about options that differ.
 * from gets the file's path, "" when starting fresh. */
int persist_resume(struct server *s, const server_options *opt, char *from, size_t from_len);

/* Applies the checkpoint's `set` values kept by persist_resume; a refused one is warned about. */
void persist_restore_sets(struct server *s);

/* Applies {dotted key: value} (validated) to the config and the trainer together, or to neither;
 * logs and emits a config_change event per key and forwards the config to the other ranks. applied
 * gets the keys set. */
int persist_apply_set(struct server *s, json_t *changes, json_t **applied);

/* The set command's args as {dotted key: value}: {"key": K, "value": V} or nested sections. */
int persist_set_changes(json_t *args, json_t **out);

/* The error for a refused key: bad_args naming args.KEY (out of memory stays itself). */
int persist_set_refused(int rc);

/* Starts the checkpoint job (the config and the set values serialised into it); why is a job_reason,
 * call (may be NULL) is answered when it ends. */
void persist_checkpoint_start(struct server *s, int why, ctl_call *call);

/* The checkpoint job ended: status, events, logs and the answer, whether it was written or not. */
void persist_checkpoint_done(struct server *s, struct job *j);

/* Checks an export or export_model request's args (call's command says which) and fills the export job
 * from them; a bad argument is refused naming args.FIELD. */
int persist_export_prepare(struct server *s, ctl_call *call, json_t *args);

/* The export job ended: the log line and the answer. */
void persist_export_done(struct server *s, struct job *j);

#endif
