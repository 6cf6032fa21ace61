#include "service/log.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "core/err.h"

static struct {
  pthread_mutex_t mu;
  FILE *f; /* NULL: standard error */
  char *path;
  log_level level;
  pthread_t main;
  int main_set;
} L = {.mu = PTHREAD_MUTEX_INITIALIZER, .level = LL_NOTICE};

const enum_name log_level_names[] = {
    {"debug", LL_DEBUG}, {"verbose", LL_VERBOSE}, {"notice", LL_NOTICE}, {"warning", LL_WARNING}, {NULL, 0}};

/* Opens L.path; on failure L.f is left as it was (still the file opened before, if any). */
static int open_locked(void) {
  if (!L.path) return 0;
  FILE *f = fopen(L.path, "a");
  if (!f) return moco_error(MOCO_EIO, "log file %s: %s", L.path, strerror(errno));
  setvbuf(f, NULL, _IOLBF, 0);
  if (L.f) fclose(L.f);
  L.f = f;
  return 0;
}

int log_open(const char *path, log_level level) {
  pthread_mutex_lock(&L.mu);
  if (L.f) fclose(L.f);
  L.f = NULL;
  free(L.path);
  L.path = path && *path ? strdup(path) : NULL;
  /* open_locked keeps the old file on failure; at the first open there is none to keep */
  L.level = level;
  int rc = path && *path && !L.path ? MOCO_ENOMEM : open_locked();
  pthread_mutex_unlock(&L.mu);
  return rc;
}

int log_reopen(void) {
  pthread_mutex_lock(&L.mu);
  int rc = open_locked();
  pthread_mutex_unlock(&L.mu);
  return rc;
}

void log_close(void) {
  pthread_mutex_lock(&L.mu);
  if (L.f) fclose(L.f);
  L.f = NULL;
  free(L.path);
  L.path = NULL;
  pthread_mutex_unlock(&L.mu);
}

void log_set_level(log_level level) {
  pthread_mutex_lock(&L.mu);
  L.level = level;
  pthread_mutex_unlock(&L.mu);
}

void log_set_main_thread(void) {
  L.main = pthread_self();
  L.main_set = 1;
}

void log_msg(log_level level, const char *fmt, ...) {
  static const char marks[] = ".-*#";
  char msg[2048], stamp[64];
  if (level < L.level) return; /* a racy read is harmless: the level only filters */
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  struct timeval tv;
  struct tm tm;
  gettimeofday(&tv, NULL);
  localtime_r(&tv.tv_sec, &tm);
  size_t n = strftime(stamp, sizeof stamp, "%d %b %Y %H:%M:%S", &tm);
  snprintf(stamp + n, sizeof stamp - n, ".%03d", (int)(tv.tv_usec / 1000));
  char role = L.main_set && pthread_equal(L.main, pthread_self()) ? 'M' : 'T';
  pthread_mutex_lock(&L.mu);
  FILE *f = L.f ? L.f : stderr;
  fprintf(f, "%d:%c %s %c %s\n", (int)getpid(), role, stamp, marks[level], msg);
  fflush(f);
  pthread_mutex_unlock(&L.mu);
}

double log_unix_time(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- progress log ---- */

/* A process killed inside a write can leave the last line without its newline; the next event would
 * then extend it into one line that parses as neither. Cut the file back to its last newline. */
static long repair_torn_tail(FILE *f) {
  int fd = fileno(f);
  off_t end = lseek(fd, 0, SEEK_END), pos = end;
  char buf[4096];
  while (pos > 0) {
    size_t n = pos > (off_t)sizeof buf ? sizeof buf : (size_t)pos;
    if (pread(fd, buf, n, pos - (off_t)n) != (ssize_t)n) return 0;
    size_t i = n;
    while (i > 0 && buf[i - 1] != '\n') i--;
    if (i > 0) {
      pos -= (off_t)(n - i);
      break;
    }
    pos -= (off_t)n;
  }
  if (pos == end || ftruncate(fd, pos) != 0) return 0;
  return (long)(end - pos);
}

int progress_open(progress_log *p, const char *path) {
  p->f = NULL;
  p->path = NULL;
  p->repaired = 0;
  if (!path || !*path) return 0;
  if (!(p->path = strdup(path))) return MOCO_ENOMEM;
  int rc = progress_reopen(p);
  if (!rc) p->repaired = repair_torn_tail(p->f);
  return rc;
}

int progress_reopen(progress_log *p) {
  if (!p->path) return 0;
  FILE *f = fopen(p->path, "a");
  if (!f) return moco_error(MOCO_EIO, "progress log %s: %s", p->path, strerror(errno));
  if (p->f) fclose(p->f);
  p->f = f;
  return 0;
}

void progress_close(progress_log *p) {
  if (p->f) fclose(p->f);
  free(p->path);
  p->f = NULL;
  p->path = NULL;
}

json_t *progress_event(const char *kind) {
  /* Milliseconds are enough for ordering events and keep the lines short. */
  double t = round(log_unix_time() * 1000.0) / 1000.0;
  return json_pack("{s:s, s:f}", "event", kind, "time", t);
}

json_t *progress_f32(float x) {
  if (!isfinite(x)) return json_null(); /* JSON has no NaN or infinity */
  char buf[32];
  for (int prec = 6; prec <= 9; prec++) {
    snprintf(buf, sizeof buf, "%.*g", prec, (double)x);
    if ((float)strtod(buf, NULL) == x) break;
  }
  return json_real(strtod(buf, NULL));
}

char *progress_line(const json_t *event) {
  char *s = json_dumps(event, LOG_JSON_FLAGS);
  if (!s) return NULL;
  size_t n = strlen(s);
  char *line = realloc(s, n + 2);
  if (!line) {
    free(s);
    return NULL;
  }
  line[n] = '\n';
  line[n + 1] = '\0';
  return line;
}

int progress_write(progress_log *p, const json_t *event) {
  if (!p->f) return 0;
  char *line = progress_line(event);
  if (!line) return MOCO_ENOMEM;
  /* One write(2) of the whole line to an O_APPEND file: a kill leaves the line or nothing, short of a
   * full disk, and lines never interleave. No stdio buffer, which could split it. */
  size_t n = strlen(line), done = 0;
  while (done < n) {
    ssize_t k = write(fileno(p->f), line + done, n - done);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) break;
    done += (size_t)k;
  }
  int e = errno;
  free(line);
  if (done < n) return moco_error(MOCO_EIO, "progress log %s: %s", p->path, strerror(e));
  return 0;
}
