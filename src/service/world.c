#include "service/world.h"

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/dist.h"
#include "core/err.h"
#include "service/config.h"
#include "service/log.h"
#include "train/trainer.h"

/* What travels first, alone: small and fixed, so a step costs one broadcast of 16 bytes. */
typedef struct {
  int32_t kind;
  int32_t pad;
  uint64_t len;
} world_msg;

void world_send(world_kind kind, const void *payload, size_t len) {
  if (!dist_active()) return;
  world_msg m = {.kind = (int32_t)kind, .len = len};
  dist_bcast_idle(&m, sizeof m); /* the followers' side is nonblocking, and MPI matches like with like */
  if (len) dist_bcast((void *)payload, len, 0);
}

/* Each rank's host and pid, as gathered at start. */
typedef struct {
  char host[64];
  int32_t pid;
} peer;

static peer *peers;

void world_peers_init(void) {
  if (!dist_active()) return;
  peer me = {.pid = (int32_t)getpid()};
  gethostname(me.host, sizeof me.host - 1);
  if (!(peers = calloc((size_t)dist_size(), sizeof *peers))) {
    log_msg(LL_WARNING, "rank %d: no memory for %d pids; ending the job", dist_rank(), dist_size());
    dist_abort(1);
    return;
  }
  dist_allgather(&me, peers, sizeof me);
}

/* A process that has exited is either reaped (no such pid) or a zombie until its parent reaps it. */
static int process_gone(int pid) {
  if (kill(pid, 0) != 0) return errno == ESRCH;
  char path[64], buf[256];
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  FILE *f = fopen(path, "r");
  if (!f) return 0;
  size_t k = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[k] = '\0';
  const char *close_paren = strrchr(buf, ')'); /* the state follows the command name */
  return close_paren && close_paren[1] == ' ' && (close_paren[2] == 'Z' || close_paren[2] == 'X');
}

int world_lost_rank(char *buf, size_t n) {
  if (!peers) return 0;
  char host[64] = "";
  gethostname(host, sizeof host - 1);
  for (int r = 1; r < dist_size(); r++)
    if (!strcmp(peers[r].host, host) && process_gone(peers[r].pid)) {
      snprintf(buf, n, "rank %d (pid %d on %s) is gone", r, (int)peers[r].pid, host);
      return 1;
    }
  return 0;
}

/* A follower's state: its trainer and the config that trainer's settings point into. */
typedef struct {
  trainer *tr;
  json_t *config;
} follower;

static int follow_set(follower *f, const char *text, size_t len) {
  json_error_t je;
  json_t *next = json_loadb(text, len, 0, &je);
  if (!next) return moco_error(MOCO_EFORMAT, "set from rank 0: %s", je.text);
  trainer_config tc;
  int rc = config_to_trainer(next, &tc);
  if (!rc) rc = trainer_apply_runtime(f->tr, &tc);
  if (rc) {
    json_decref(next);
    return rc;
  }
  json_decref(f->config);
  f->config = next;
  return 0;
}

static int follow_start(follower *f, const void *bytes, size_t len) {
  if (!len) return 0;
  blob_reader r;
  blob_reader_init(&r, bytes, len, "checkpoint from rank 0");
  return trainer_load(f->tr, &r);
}

static void follow_warn(const char *what) {
  log_msg(LL_WARNING, "rank %d of %d: %s: %s", dist_rank(), dist_size(), what,
          moco_errmsg()[0] ? moco_errmsg() : "failed");
}

/* One message from rank 0; 1 when it was the stop. */
static int follow_one(follower *f, int *rc) {
  world_msg m;
  dist_bcast_idle(&m, sizeof m);
  char *payload = NULL;
  if (m.len) {
    if (!(payload = malloc(m.len))) {
      *rc = moco_error(MOCO_ENOMEM, "a message of %llu bytes from rank 0", (unsigned long long)m.len);
      return 0;
    }
    dist_bcast(payload, m.len, 0);
  }
  trainer_stats st;
  trainer_eval_result res;
  world_export ex;
  int64_t rows;
  int dim;
  switch ((world_kind)m.kind) {
  case WORLD_START: *rc = follow_start(f, payload, m.len); break;
  case WORLD_STEP: *rc = trainer_step(f->tr, &st); break;
  case WORLD_SET: *rc = follow_set(f, payload, m.len); break;
  case WORLD_STOP: break;
  /* An evaluation or export that fails is rank 0's to report (it fails there too: the ranks agree on
   * failure before gathering); training goes on. */
  case WORLD_EVAL:
    if (m.len == sizeof(trainer_eval_request) && trainer_evaluate(f->tr, (const trainer_eval_request *)payload, &res))
      follow_warn("evaluation");
    break;
  case WORLD_EXPORT:
    if (m.len == sizeof ex) {
      memcpy(&ex, payload, sizeof ex);
      if (trainer_export(f->tr, ex.train ? "train" : "eval", (trainer_encoder)ex.encoder, ex.embeddings, NULL,
                         &rows, &dim))
        follow_warn("export");
    }
    break;
  default: *rc = moco_error(MOCO_EFORMAT, "unknown message %d from rank 0", (int)m.kind);
  }
  free(payload);
  return m.kind == WORLD_STOP;
}

int world_follow(json_t *config) {
  follower f = {NULL, json_incref(config)};
  trainer_config tc;
  int rc = config_to_trainer(config, &tc);
  if (!rc) rc = trainer_create(&f.tr, &tc);
  while (!rc && !follow_one(&f, &rc)) {
  }
  if (rc) {
    log_msg(LL_WARNING, "rank %d of %d: %s; ending the job", dist_rank(), dist_size(),
            moco_errmsg()[0] ? moco_errmsg() : moco_strerror(rc));
    dist_abort(1);
  }
  if (f.tr) trainer_destroy(f.tr);
  json_decref(f.config);
  return rc ? 1 : 0;
}
