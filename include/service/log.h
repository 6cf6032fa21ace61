/* mocod's two logs.
 *
 * The human log, Redis style: one line per event,
 *     <pid>:<role> <day> <mon> <year> <hh:mm:ss.mmm> <level char> <message>
 * with level chars '.' debug, '-' verbose, '*' notice, '#' warning, and the role 'M' for the loop
 * thread and 'T' for any other (the trainer). One process-wide log, guarded by a mutex, because the
 * loop and the trainer both write to it; log_reopen (SIGHUP) closes and reopens the file so that
 * logrotate can move it away.
 *
 * The progress log: JSON lines, one event object per line, written whole and flushed, so `tail -f`
 * and `jq` never see half an object. Every event carries "event" (its kind) and "time" (Unix seconds
 * with milliseconds). Written by the loop thread only. */
#ifndef MOCO_SERVICE_LOG_H
#define MOCO_SERVICE_LOG_H

#include <jansson.h>
#include <stdio.h>

#include "core/enum.h"

/* How mocod prints JSON for people and logs: 15 significant digits, so 0.06 reads "0.06" and not
 * "0.059999999999999998" (jansson's default is 17). */
#define LOG_JSON_FLAGS (JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(15))

typedef enum { LL_DEBUG, LL_VERBOSE, LL_NOTICE, LL_WARNING } log_level;

/* log.level: "debug", "verbose", "notice", "warning". */
extern const enum_name log_level_names[];

/* Opens the human log for appending; path "" (or NULL) writes to standard error. */
int log_open(const char *path, log_level level);
/* Reopens the file by its name (after logrotate moved it). When that fails (its directory is gone or
 * unwritable), the file opened before stays in use and the error is returned. */
int log_reopen(void);
void log_close(void);
void log_set_level(log_level level);
/* Marks the calling thread as the loop thread (role 'M' in lines it writes). */
void log_set_main_thread(void);

void log_msg(log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The progress log. */
typedef struct {
  FILE *f;
  char *path;    /* NULL when disabled */
  long repaired; /* bytes of a torn last line removed by progress_open (a kill mid-write) */
} progress_log;

/* path "" disables the log (writes become no-ops). Appends to an existing file, after cutting off a
 * last line left without its newline. */
int progress_open(progress_log *p, const char *path);
/* Like log_reopen: the old file stays in use when the name cannot be opened. */
int progress_reopen(progress_log *p);
void progress_close(progress_log *p);

/* A new event object {"event": kind, "time": now}; the caller adds fields. NULL on allocation failure. */
json_t *progress_event(const char *kind);
/* A float32 figure as the shortest decimal that reads back as the same float ("0.123", not
 * "0.12300000339746475"); NaN and infinity become null. */
json_t *progress_f32(float x);
/* Writes one event as a line and flushes it. Does not take the reference. */
int progress_write(progress_log *p, const json_t *event);
/* The event as one line of text with its newline (malloc'd), the same bytes progress_write writes;
 * subscribers of the control socket receive these. */
char *progress_line(const json_t *event);

/* Unix time in seconds, with sub-second precision. */
double log_unix_time(void);

#endif
