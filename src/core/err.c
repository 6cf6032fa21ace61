#include "core/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* One message per thread: worker threads (data loading) report their own failures without locks. */
static _Thread_local char errmsg[1024];

const char *moco_strerror(int code) {
  switch (code) {
  case MOCO_OK: return "OK";
#define X(name, c, text) case c: return #name;
    MOCO_ERRNO_MAP(X)
#undef X
  default: return "EUNKNOWN";
  }
}

int moco_error(int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(errmsg, sizeof errmsg, fmt, ap);
  va_end(ap);
  return code;
}

int moco_error_wrap(int code, const char *fmt, ...) {
  char prefix[512], old[sizeof errmsg];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(prefix, sizeof prefix, fmt, ap);
  va_end(ap);
  memcpy(old, errmsg, sizeof old);
  /* A message longer than the buffer is cut: the innermost context goes first. */
  int n = snprintf(errmsg, sizeof errmsg, "%s: %s", prefix, old[0] ? old : moco_strerror(code));
  if (n >= (int)sizeof errmsg) errmsg[sizeof errmsg - 2] = '~';
  return code;
}

const char *moco_errmsg(void) { return errmsg; }
void moco_error_clear(void) { errmsg[0] = '\0'; }
