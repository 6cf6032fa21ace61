/* The control protocol: a Unix-socket server on the caller's libuv loop speaking one JSON object per line.
 *
 *   request   {"id": <any JSON, echoed>, "cmd": "name", "args": {...}}
 *   response  {"id": ..., "ok": true,  "result": {...}}
 *             {"id": ..., "ok": false, "error": {"code": "bad_args", "message": "args.lr: ..."}}
 *   event     {"event": "progress", ...}          (only to connections that subscribed)
 *
 * ctl knows no command: the caller supplies a command table (Redis style: name, handler, flags, argument
 * spec) and ctl does the framing, validation, bounds and client bookkeeping. Everything here runs on the
 * loop thread, handlers and replies included; work done off the loop (eval, checkpoint) must hop back to
 * the loop (uv_async) before calling ctl_reply.
 *
 * Error codes ctl itself answers with: bad_json, line_too_long, bad_request, unknown_command, bad_args,
 * busy (too many clients), internal. Handlers add their own (busy, state, ...). */
#ifndef MOCO_SERVICE_CTL_H
#define MOCO_SERVICE_CTL_H

#include <jansson.h>
#include <stddef.h>
#include <uv.h>

/* The socket path mocod and mococtl use when the config / command line name none. */
#define CTL_DEFAULT_SOCKET "run/mocod.sock"

/* Redis's query-buffer idea: a request line (without its newline) may be at most this long. */
#define CTL_MAX_LINE (64 * 1024)
/* A client whose unsent output exceeds this (it does not read) is disconnected. */
#define CTL_MAX_OUTPUT (4 * 1024 * 1024)
/* An idle connection costs a libuv handle and a file descriptor, no buffer: thousands are cheap. mocod
 * raises its descriptor limit to fit (see mocod.c). */
#define CTL_MAX_CLIENTS 4096

typedef struct ctl_server ctl_server;
typedef struct ctl_call ctl_call;     /* one request in flight; the deferred-reply handle */
typedef struct ctl_client ctl_client; /* private */

/* Argument types; CTL_T_NUMBER accepts integers and reals. */
typedef enum {
  CTL_T_ANY = 0,
  CTL_T_STRING,
  CTL_T_INT,
  CTL_T_NUMBER,
  CTL_T_BOOL,
  CTL_T_OBJECT,
  CTL_T_ARRAY,
} ctl_type;

enum { CTL_ARG_REQUIRED = 1u << 0 };

/* One allowed key of a command's "args"; a list ends with a row whose name is NULL. */
typedef struct ctl_arg {
  const char *name;
  ctl_type type;
  unsigned flags;  /* CTL_ARG_* */
  double min, max; /* inclusive bounds for CTL_T_INT / CTL_T_NUMBER, checked when min < max */
} ctl_arg;

/* Command flags. ctl itself reads only CTL_ANY_ARGS; the others are for the gate (ctl_config.gate),
 * which is where the service refuses, say, state changes while it is stopping. */
enum {
  CTL_SAFE_WHILE_RUNNING = 1u << 0, /* answers from loop state without waiting for the trainer */
  CTL_CHANGES_STATE = 1u << 1,      /* changes training state or settings (applied between steps) */
  CTL_ANY_ARGS = 1u << 2,           /* args is free-form (e.g. set); the handler validates it */
};

/* Called on the loop thread with the request's args (an object; {} when the request had none), which
 * stay valid until the call is answered. Either answer now (ctl_reply / ctl_reply_error) and return 0,
 * or keep `call` and answer later (deferred) and return 0, or return a negative MOCO_E* code without
 * answering: ctl then answers with moco_errmsg() under the code ctl_errcode_name(rc). While a call is
 * unanswered, that connection's further requests wait (answers stay in request order). */
typedef int (*ctl_handler)(ctl_call *call, json_t *args, void *data);

typedef struct ctl_command {
  const char *name;
  ctl_handler handler;
  unsigned flags;      /* CTL_SAFE_WHILE_RUNNING | CTL_CHANGES_STATE | CTL_ANY_ARGS */
  const ctl_arg *args; /* allowed args, NULL-name terminated; NULL: the command takes none */
  const char *help;    /* one line, for listings */
} ctl_command;

/* Runs after validation, before the handler. Return 0 to run the handler, or answer the call with
 * ctl_reply_error and return non-zero (e.g. "state": "mocod is stopping"). */
typedef int (*ctl_gate)(ctl_call *call, const ctl_command *cmd, void *data);

typedef struct ctl_config {
  const char *path;  /* socket path (copied); default CTL_DEFAULT_SOCKET */
  size_t max_line;   /* CTL_MAX_LINE */
  size_t max_output; /* CTL_MAX_OUTPUT */
  int max_clients;   /* CTL_MAX_CLIENTS; one more is answered "busy" and closed */
  ctl_gate gate;     /* optional */
} ctl_config;

void ctl_config_default(ctl_config *cfg);

/* Public fields are read-only for the caller except data. */
struct ctl_server {
  void *data; /* passed to handlers and the gate */
  uv_loop_t *loop;
  int clients, subscribers;  /* connected now */
  unsigned long dropped;     /* clients disconnected for unread output (slow subscribers) */
  unsigned long rejected;    /* connections refused over max_clients */
  int replaced_stale;        /* ctl_init removed a stale socket left by a crashed run (for the log) */
  /* private */
  uv_pipe_t listener;
  uv_idle_t resume; /* runs requests queued behind a deferred call on the next loop turn */
  ctl_config cfg;
  char *path;
  const ctl_command *table;
  ctl_client *head; /* all open clients */
  int handles;      /* open libuv handles (listener + clients), for ctl_close */
  int closing;
  unsigned long long ino, dev; /* of the socket we bound, so close unlinks only ours */
  void (*close_cb)(ctl_server *);
};

/* Creates the socket at cfg->path with mode 0600 (and its parent directory, one level, mode 0700, when
 * missing) and listens. table is a NULL-name-terminated array that must outlive the server. Refuses with
 * MOCO_EBUSY ("socket X is in use by a running mocod") when something accepts connections there; a stale
 * socket file (connect refused) is removed and replaced; any other kind of file there is refused
 * (MOCO_EINVAL). On failure nothing needs closing, except in the one case where libuv refuses the
 * bound socket (MOCO_EIO "listening"): srv must then stay valid until the loop has run once.
 * Ignores SIGPIPE when it has its default action: a client that went away must not kill the daemon. */
int ctl_init(ctl_server *srv, uv_loop_t *loop, const ctl_config *cfg, const ctl_command *table,
             void *data);

/* Closes every connection and the listener, unlinks the socket, then calls cb (may be NULL) from the
 * loop. Calls still unanswered stay valid: answering them later is harmless (the answer is dropped). */
void ctl_close(ctl_server *srv, void (*cb)(ctl_server *));

/* Sends one event line (a JSON object, with or without its newline) to every subscriber. Returns how
 * many subscribers it was queued for; subscribers over max_output are disconnected. */
int ctl_broadcast(ctl_server *srv, const char *event_json_line);

/* Answers with {"ok":true,"result":result}; takes the reference to result (NULL: {}). Ends the call. */
void ctl_reply(ctl_call *call, json_t *result);
/* Answers with {"ok":false,"error":{"code":code,"message":...}}. Ends the call. */
void ctl_reply_error(ctl_call *call, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Answers a negative MOCO_E* code with ctl_errcode_name(rc) and moco_errmsg(). Ends the call. */
void ctl_reply_errno(ctl_call *call, int rc);

/* The protocol's code for a MOCO_E* code: EBUSY "busy", ESTATE "state", EINVAL/ERANGE/ECONFIG
 * "bad_args", ENOENT "not_found", anything else "internal". */
const char *ctl_errcode_name(int rc);

/* The server's command table as JSON, for a `commands` command (Redis's COMMAND): [{"name", "args": [{"name",
 * "type", "required"}], "any_args", "changes_state", "help"}, ...]. Clients learn from it what they may
 * send, so a new command reaches them as a new row of the table. */
json_t *ctl_describe(const ctl_server *srv);

/* Makes the call's connection a subscriber: it receives every ctl_broadcast line from now on. */
void ctl_call_subscribe(ctl_call *call);
const ctl_command *ctl_call_command(const ctl_call *call);
/* The server, or NULL once the connection has gone away (a deferred answer is then dropped). */
ctl_server *ctl_call_server(const ctl_call *call);

#endif
