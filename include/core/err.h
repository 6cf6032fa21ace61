/* Error codes and messages, libuv style: functions return 0 or a negative code; the code's name comes
 * from moco_strerror, and the context of the last failure on this thread from moco_errmsg. */
#ifndef MOCO_CORE_ERR_H
#define MOCO_CORE_ERR_H

#define MOCO_ERRNO_MAP(X)                                   \
  X(ENOMEM,    -1, "out of memory")                          \
  X(EINVAL,    -2, "invalid argument")                       \
  X(EIO,       -3, "i/o error")                              \
  X(EFORMAT,   -4, "bad file format")                        \
  X(ECHECKSUM, -5, "checksum mismatch")                      \
  X(ERANGE,    -6, "value out of range")                     \
  X(ESHAPE,    -7, "shape mismatch")                         \
  X(ESTATE,    -8, "operation not allowed in this state")   \
  X(EEOF,      -9, "unexpected end of data")                 \
  X(ENOENT,   -10, "not found")                              \
  X(EBUSY,    -11, "resource busy")                          \
  X(ECONFIG,  -12, "invalid configuration")                  \
  X(ENOSPC,   -13, "no space left on device")

enum {
  MOCO_OK = 0,
#define X(name, code, text) MOCO_##name = code,
  MOCO_ERRNO_MAP(X)
#undef X
};

/* Short name of a code ("EFORMAT"), never NULL. */
const char *moco_strerror(int code);

/* Records a message for the calling thread and returns `code`, so a failure reads
 *   return moco_error(MOCO_EFORMAT, "%s: offset %zu: bad magic 0x%08x", path, off, magic); */
int moco_error(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prefixes the current message with context while passing the code up: "while loading x: <msg>". */
int moco_error_wrap(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The last message recorded on this thread ("" when none). */
const char *moco_errmsg(void);
void moco_error_clear(void);

#endif
