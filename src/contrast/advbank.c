#include "contrast/advbank.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/tensor.h"

static void random_unit_rows(float *w, int n, int d, rng_t *r) {
  for (int i = 0; i < n; i++) {
    float *row = w + (size_t)i * d;
    do {
      for (int k = 0; k < d; k++) row[k] = rng_normal(r);
    } while (vec_normalize(row, (size_t)d) == 0.0f);
  }
}

int advbank_init(advbank *b, const advbank_config *c, int size, int dim, int max_batch, rng_t *r) {
  memset(b, 0, sizeof *b);
  if (size < 1 || dim < 1 || max_batch < 1)
    return moco_error(MOCO_EINVAL, "advbank_init: size %d, dim %d, max_batch %d: must be >= 1", size, dim,
                      max_batch);
  b->cfg = c;
  b->size = size;
  b->dim = dim;
  b->max_batch = max_batch;
  size_t n = (size_t)b->size * dim;
  b->w = tensor_alloc(n);
  b->v = tensor_calloc(n);
  b->g = tensor_alloc(n);
  b->ds = tensor_alloc((size_t)max_batch * b->size);
  if (!b->w || !b->v || !b->g || !b->ds) {
    advbank_free(b);
    return moco_error(MOCO_ENOMEM, "advbank_init: bank of %d x %d", size, dim);
  }
  random_unit_rows(b->w, b->size, dim, r);
  return 0;
}

void advbank_free(advbank *b) {
  tensor_free(b->w);
  tensor_free(b->v);
  tensor_free(b->g);
  tensor_free(b->ds);
  memset(b, 0, sizeof *b);
}

void advbank_seed(advbank *b, const float *keys, int n, rng_t *r) {
  const int d = b->dim, M = b->size;
  /* Knuth's selection sampling: each key is taken with probability (still needed) / (still left),
   * which draws min(n, M) distinct keys in one pass without a workspace. */
  int got = 0;
  for (int i = 0; i < n && got < M; i++)
    if (rng_below(r, (uint32_t)(n - i)) < (uint32_t)(M - got < n - i ? M - got : n - i))
      memcpy(b->w + (size_t)got++ * d, keys + (size_t)i * d, (size_t)d * sizeof(float));
  /* Fewer keys than rows: the rest are jittered copies, since exact copies would receive identical
   * gradients and never separate. */
  for (; got < M; got++) {
    float *row = b->w + (size_t)got * d;
    const float *k = keys + (size_t)rng_below(r, (uint32_t)n) * d;
    for (int j = 0; j < d; j++) row[j] = k[j] + 0.05f * rng_normal(r) / sqrtf((float)d);
  }
  for (int i = 0; i < M; i++) vec_normalize(b->w + (size_t)i * d, (size_t)d);
  vec_fill(b->v, 0.0f, (size_t)M * d);
}

int advbank_grad(advbank *b, const float *dS_bank, int ld, const float *Q, int B) {
  const int M = b->size;
  if (B < 1 || B > b->max_batch || ld < M)
    return moco_error(MOCO_ESHAPE, "advbank_grad: batch %d (allowed 1..%d), row stride %d (need >= %d)", B,
                      b->max_batch, ld, M);
  const float *ds = dS_bank;
  if (ld != M) {
    for (int i = 0; i < B; i++) memcpy(b->ds + (size_t)i * M, dS_bank + (size_t)i * ld, (size_t)M * sizeof(float));
    ds = b->ds;
  }
  mat_mul(b->g, ds, Q, M, b->dim, B, 1, 0, 1.0f, 0.0f); /* [M,d] = [B,M]^T . [B,d] */
  return 0;
}

int advbank_update(advbank *b, const float *dS_bank, int ld, const float *Q, int B) {
  int rc = advbank_grad(b, dS_bank, ld, Q, B);
  if (rc) return rc;
  const advbank_config *c = b->cfg;
  const int d = b->dim;
  for (int m = 0; m < b->size; m++) {
    float *w = b->w + (size_t)m * d, *v = b->v + (size_t)m * d, *g = b->g + (size_t)m * d;
    vec_axpy(g, -vec_dot(g, w, (size_t)d), w, (size_t)d); /* tangent to the sphere at w */
    vec_scale(v, c->momentum, (size_t)d);
    vec_axpy(v, 1.0f, g, (size_t)d);
    vec_axpy(v, -c->weight_decay, w, (size_t)d);
    vec_axpy(w, c->lr, v, (size_t)d); /* ascent */
    if (vec_normalize(w, (size_t)d) == 0.0f) w[0] = 1.0f; /* cannot happen short of lr * v == -w */
  }
  return 0;
}

void advbank_save(const advbank *b, blob_writer *w) {
  size_t n = (size_t)b->size * b->dim;
  blob_section_begin(w, "ADVB");
  blob_put_u32(w, (uint32_t)b->size);
  blob_put_u32(w, (uint32_t)b->dim);
  blob_put(w, b->w, n * sizeof(float));
  blob_put(w, b->v, n * sizeof(float));
  blob_section_end(w);
}

int advbank_load(advbank *b, blob_reader *r) {
  blob_reader s;
  int rc = blob_section(r, "ADVB", &s);
  if (rc) return moco_error_wrap(rc, "advbank_load");
  uint32_t M = 0, d = 0;
  if ((rc = blob_get_u32(&s, &M)) || (rc = blob_get_u32(&s, &d))) return moco_error_wrap(rc, "advbank_load");
  if ((int)M != b->size || (int)d != b->dim)
    return moco_error(MOCO_ESHAPE, "advbank_load: %s: bank is %u x %u, this run's is %d x %d (bank_size x dim)",
                      r->name, M, d, b->size, b->dim);
  size_t n = (size_t)M * d * sizeof(float);
  if (s.len - s.pos != 2 * n)
    return moco_error(MOCO_EFORMAT, "advbank_load: %s: offset %zu: %zu payload bytes, expected %zu", r->name,
                      s.base + s.pos, s.len - s.pos, 2 * n);
  blob_get(&s, b->w, n);
  blob_get(&s, b->v, n);
  return 0;
}
