#include "core/blob.h"

#include "core/err.h"

#include <stdlib.h>
#include <string.h>
#include <zlib.h>

void blob_writer_init(blob_writer *w) { memset(w, 0, sizeof *w); }

void blob_writer_free(blob_writer *w) {
  free(w->data);
  memset(w, 0, sizeof *w);
}

static int reserve(blob_writer *w, size_t n) {
  if (w->err) return w->err;
  if (w->len + n <= w->cap) return 0;
  size_t cap = w->cap ? w->cap : 4096;
  while (cap < w->len + n) cap *= 2;
  uint8_t *p = realloc(w->data, cap);
  if (!p) return w->err = MOCO_ENOMEM;
  w->data = p;
  w->cap = cap;
  return 0;
}

void blob_put(blob_writer *w, const void *p, size_t n) {
  if (reserve(w, n)) return;
  if (n) memcpy(w->data + w->len, p, n);
  w->len += n;
}

void blob_put_u32(blob_writer *w, uint32_t v) { blob_put(w, &v, 4); }
void blob_put_u64(blob_writer *w, uint64_t v) { blob_put(w, &v, 8); }
void blob_put_f32(blob_writer *w, float v) { blob_put(w, &v, 4); }

void blob_put_str(blob_writer *w, const char *s) {
  uint32_t n = (uint32_t)strlen(s);
  blob_put_u32(w, n);
  blob_put(w, s, n);
}

void blob_section_begin(blob_writer *w, const char tag[4]) {
  blob_put(w, tag, 4);
  w->section_start = w->len;
  blob_put_u64(w, 0);
}

void blob_section_end(blob_writer *w) {
  if (w->err) return;
  size_t payload = w->section_start + 8;
  uint64_t n = w->len - payload;
  memcpy(w->data + w->section_start, &n, 8);
  blob_put_u32(w, blob_crc32(w->data + payload, n));
  w->section_start = 0;
}

void blob_reader_init(blob_reader *r, const void *data, size_t len, const char *name) {
  r->data = data;
  r->len = len;
  r->pos = 0;
  r->base = 0;
  r->name = name ? name : "blob";
}

int blob_get(blob_reader *r, void *p, size_t n) {
  if (r->len - r->pos < n)
    return moco_error(MOCO_EEOF, "%s: offset %zu: need %zu bytes, %zu left", r->name,
                      r->base + r->pos, n, r->len - r->pos);
  if (n) memcpy(p, r->data + r->pos, n);
  r->pos += n;
  return 0;
}

int blob_get_u32(blob_reader *r, uint32_t *v) { return blob_get(r, v, 4); }
int blob_get_u64(blob_reader *r, uint64_t *v) { return blob_get(r, v, 8); }
int blob_get_f32(blob_reader *r, float *v) { return blob_get(r, v, 4); }

int blob_get_str(blob_reader *r, char *buf, size_t cap) {
  uint32_t n = 0;
  int rc = blob_get_u32(r, &n);
  if (rc) return rc;
  if (n >= cap)
    return moco_error(MOCO_EFORMAT, "%s: offset %zu: string of %u bytes exceeds %zu", r->name,
                      r->base + r->pos, n, cap - 1);
  if ((rc = blob_get(r, buf, n))) return rc;
  buf[n] = '\0';
  return 0;
}

int blob_peek_tag(const blob_reader *r, char tag[4]) {
  if (r->len - r->pos < 4) return 0;
  memcpy(tag, r->data + r->pos, 4);
  return 1;
}

int blob_find(const blob_reader *r, const char tag[4], int nth, blob_reader *at) {
  blob_reader cur = *r, sub;
  char t[4];
  while (blob_peek_tag(&cur, t)) {
    if (!memcmp(t, tag, 4) && nth-- == 0) {
      *at = cur;
      return 0;
    }
    int rc = blob_section(&cur, t, &sub);
    if (rc) return rc;
  }
  return moco_error(MOCO_ENOENT, "%s: no %.4s section", r->name ? r->name : "blob", tag);
}

int blob_section(blob_reader *r, const char tag[4], blob_reader *sub) {
  size_t at = r->base + r->pos;
  char got[4];
  uint64_t n = 0;
  uint32_t crc = 0;
  int rc;
  if ((rc = blob_get(r, got, 4))) return rc;
  if (memcmp(got, tag, 4))
    return moco_error(MOCO_EFORMAT, "%s: offset %zu: expected section '%.4s', found '%.4s'", r->name,
                      at, tag, got);
  if ((rc = blob_get_u64(r, &n))) return rc;
  if (n > r->len - r->pos || r->len - r->pos - n < 4)
    return moco_error(MOCO_EEOF, "%s: offset %zu: section '%.4s' of %llu bytes is truncated", r->name,
                      at, tag, (unsigned long long)n);
  blob_reader_init(sub, r->data + r->pos, n, r->name);
  sub->base = r->base + r->pos;
  r->pos += n;
  blob_get_u32(r, &crc);
  if (blob_crc_mismatch(crc, blob_crc32(sub->data, n)))
    return moco_error(MOCO_ECHECKSUM, "%s: offset %zu: section '%.4s' checksum mismatch", r->name, at,
                      tag);
  return 0;
}

uint32_t blob_crc32(const void *p, size_t n) {
  uLong c = crc32(0L, Z_NULL, 0);
  const uint8_t *b = p;
  while (n > 0) { /* zlib's length is a uInt: feed large buffers in pieces */
    uInt k = n > (1u << 30) ? (1u << 30) : (uInt)n;
    c = crc32(c, b, k);
    b += k;
    n -= k;
  }
  return (uint32_t)c;
}
