/* What every data format hands to the rest of the pipeline: one record, as stored, plus the two element
 * types a stored sample can have. Samples are row-major (C, H, W) (a vector of D features is (D, 1, 1));
 * multi-byte values are little-endian in memory, whatever the file said. */
#ifndef MOCO_DATA_RECORD_H
#define MOCO_DATA_RECORD_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
  DATA_U8 = 1,  /* pixels 0..255; decoded to [0, 1] (divided by 255, as torchvision's ToTensor) */
  DATA_F32 = 2, /* float32, decoded as is */
} data_dtype;

/* Per-sample shape. The same three numbers as core/net.h's net_shape (the trainer passes them straight to
 * net_build); kept here so the data layer does not depend on the network's header. */
typedef struct {
  int c, h, w;
} data_shape;

static inline size_t data_shape_size(data_shape s) { return (size_t)s.c * s.h * s.w; }

static inline size_t data_dtype_size(data_dtype t) { return t == DATA_U8 ? 1 : 4; }
static inline const char *data_dtype_name(data_dtype t) { return t == DATA_U8 ? "u8" : "f32"; }

typedef struct {
  int64_t id;            /* global sample index (IDX) or the id stored in the shard */
  int32_t label;         /* -1 when the data set has no label for it */
  const uint8_t *sample; /* one sample in the data set's dtype; valid until the reader's next call */
  const uint8_t *pair;   /* the second view of a pair record, NULL otherwise */
} data_record;

/* Stored elements to floats: the one place that fixes what a u8 pixel means. */
static inline void data_decode(data_dtype t, const uint8_t *restrict raw, float *restrict out, size_t n) {
  if (t == DATA_U8) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) /* blocks of eight: vectorised at -O2 (see views.c's affine) */
      for (int k = 0; k < 8; k++) out[i + k] = raw[i + k] * (1.0f / 255.0f);
    for (; i < n; i++) out[i] = raw[i] * (1.0f / 255.0f);
  } else {
    for (size_t i = 0; i < n; i++) __builtin_memcpy(&out[i], raw + 4 * i, 4);
  }
}

/* One element, for code that picks single features out of a stored sample (SCARF masking). */
static inline float data_decode_at(data_dtype t, const uint8_t *raw, size_t i) {
  if (t == DATA_U8) return raw[i] * (1.0f / 255.0f);
  float v;
  __builtin_memcpy(&v, raw + 4 * i, 4);
  return v;
}

#endif
