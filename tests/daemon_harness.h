/* Driving the real daemon from a test or a benchmark: a fresh directory per test, mocod started with
 * -d on config/tiny.json, a line client for its socket. The daemon runs with the directory as its
 * working directory, so its run/... paths land inside it. */
#ifndef MOCO_TESTS_DAEMON_HARNESS_H
#define MOCO_TESTS_DAEMON_HARNESS_H

#include <jansson.h>
#include <limits.h>
#include <stddef.h>

/* Set by a benchmark (outside check's runner): failures print and exit instead of failing a test. */
extern int dh_standalone;
extern char dh_bin[PATH_MAX], dh_repo[PATH_MAX], dh_dir[PATH_MAX], dh_sock[PATH_MAX + 32];

/* Fresh directory, paths, this process made the subreaper of the daemons it starts, and a reaper that
 * kills them however the test ends (test_reaper_start). */
void dh_setup(void);
void dh_teardown(void);
/* dh_dir/name, from a ring of 8 static buffers: copy it to keep it across other dh_ calls. */
char *dh_path(const char *name);
/* The whole file, NUL-terminated (malloc'd), or NULL. */
char *dh_slurp(const char *path);

/* Runs mocod -c config/tiny.json --set data.dir=... with the extra arguments (NULL-terminated) in the
 * test directory, output to dh_path("out.txt"); waits and returns the exit status. */
int dh_mocod(const char *first, ...);
/* mocod -d with --set for each override (NULL-terminated); asserts it started, returns the pid. */
int dh_start(const char *first, ...);
/* Same, with argv-style extra arguments instead of --set pairs (e.g. "--resume"); returns the exit
 * status of mocod -d, the pid through *pid when it started. */
int dh_start_argv(int *pid, const char *const *args);
/* Waits for a pid (child or, through the subreaper, grandchild) to exit: its status, 128 + signal, or
 * -1 on timeout. */
int dh_wait_exit(int pid, double timeout);
/* stop over the socket, asserts the answer and exit status 0. */
void dh_stop(int pid);

typedef struct dh_client dh_client;
/* Connects; NULL when the connection fails and must_connect is 0. */
dh_client *dh_client_open(int must_connect);
void dh_client_close(dh_client *c);
int dh_client_fd(const dh_client *c);
/* Sends the text; 0, or -1 when the peer has gone. */
int dh_client_send(dh_client *c, const char *text);
/* The next line as JSON within timeout seconds; NULL on timeout or close. */
json_t *dh_client_line(dh_client *c, double timeout);
/* The answer to one request, skipping event lines. */
json_t *dh_client_call(dh_client *c, const char *line, double timeout);
/* One request on a fresh connection; asserts ok, returns the result (owned). */
json_t *dh_call_ok(const char *line, double timeout);
/* The error code of an answer, or NULL. */
const char *dh_error_code(const json_t *answer);
long long dh_status_step(void);
void dh_wait_step(long long at_least, double timeout);

#endif
