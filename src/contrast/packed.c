#include "contrast/packed.h"

#include <stdlib.h>
#include <string.h>

#include "contrast/mine.h"
#include "core/err.h"
#include "core/par.h"
#include "core/tensor.h"

static int round_up(int n, int a) { return (n + a - 1) / a * a; }

int packed_cap_for(int C) {
  int floor = C < 256 ? C : 256, cap = round_up((C + 15) / 16, PACKED_ALIGN);
  cap = cap > floor ? cap : floor;
  return cap < C ? cap : C;
}

int packed_init(packed *p, int rows, int cap) {
  memset(p, 0, sizeof *p);
  if (rows < 1 || cap < 1)
    return moco_error(MOCO_EINVAL, "packed_init: %d rows of %d columns, both must be >= 1", rows, cap);
  size_t cells = (size_t)rows * (size_t)cap;
  p->rows = rows;
  p->cap = cap;
  p->S = tensor_calloc(cells);
  p->dS = tensor_calloc(cells);
  p->mask = calloc(cells, 1);
  p->col = malloc(cells * sizeof *p->col);
  p->used = calloc((size_t)rows, sizeof *p->used);
  if (!p->S || !p->dS || !p->mask || !p->col || !p->used) {
    packed_free(p);
    return MOCO_ENOMEM;
  }
  return 0;
}

void packed_free(packed *p) {
  tensor_free(p->S);
  tensor_free(p->dS);
  free(p->mask);
  free(p->col);
  free(p->used);
  memset(p, 0, sizeof *p);
}

/* One row's used entries into ps/pm/pc; returns how many, or -1 past cap. The mask is read 32 bytes
 * at a time: a sparse row is mostly zero words, skipped without looking at their bytes. */
static int pack_row(const float *s, const uint8_t *mk, int C, int cap, float *ps, uint8_t *pm,
                    int32_t *pc) {
  int n = 0;
  for (int j0 = 0; j0 < C; j0 += 32) {
    int j1 = j0 + 32 < C ? j0 + 32 : C;
    if (j1 - j0 == 32) {
      uint64_t w[4];
      memcpy(w, mk + j0, sizeof w);
      if (!(w[0] | w[1] | w[2] | w[3])) continue;
    }
    for (int j = j0; j < j1; j++) {
      if (mk[j] == MINE_OFF) continue;
      if (n == cap) return -1;
      ps[n] = s[j];
      pm[n] = mk[j];
      pc[n++] = j;
    }
  }
  return n;
}

typedef struct {
  packed *p;
  const float *S;
  const uint8_t *mask;
  int r0, R, C;
  int most[PAR_MAX_THREADS]; /* per part: the most entries of its rows, -1 on overflow */
} gather_call;

static void gather_part(void *ctx, int part, int parts) {
  gather_call *g = ctx;
  packed *p = g->p;
  long lo, hi;
  par_range(g->R, part, parts, &lo, &hi);
  int most = 0;
  for (long i = lo; i < hi; i++) {
    size_t r = (size_t)(g->r0 + i), at = r * (size_t)p->cap;
    int n = pack_row(g->S + (size_t)i * g->C, g->mask + (size_t)i * g->C, g->C, p->cap, p->S + at,
                     p->mask + at, p->col + at);
    if (n < 0) {
      most = -1;
      break;
    }
    p->used[r] = n;
    most = n > most ? n : most;
  }
  g->most[part] = most;
}

/* Rows were packed at stride cap; moves them to stride W (<= cap, so ascending moves never overwrite
 * a row not yet moved) and pads each to W. */
static void restride(packed *p, packed_rows *o) {
  for (int i = 0; i < o->R; i++) {
    size_t from = (size_t)i * (size_t)p->cap, to = (size_t)i * (size_t)o->W;
    int n = o->used[i];
    if (to != from) {
      memmove(o->S + to, o->S + from, (size_t)n * sizeof *o->S);
      memmove(o->mask + to, o->mask + from, (size_t)n);
      memmove(o->col + to, o->col + from, (size_t)n * sizeof *o->col);
    }
    for (int j = n; j < o->W; j++) {
      o->S[to + j] = 0.0f;
      o->mask[to + j] = MINE_OFF;
      o->col[to + j] = -1;
    }
  }
}

int packed_gather(packed *p, const float *S, const uint8_t *mask, int r0, int R, int C,
                  packed_rows *out) {
  if (r0 < 0 || R < 0 || r0 + R > p->rows)
    return moco_error(MOCO_EINVAL, "packed_gather: rows [%d, %d) outside the %d allocated", r0, r0 + R,
                      p->rows);
  gather_call g = {.p = p, .S = S, .mask = mask, .r0 = r0, .R = R, .C = C};
  int parts = par_parts((long)R * C, PAR_MIN_FLOATS);
  par_run(parts, gather_part, &g);
  int most = 0;
  for (int k = 0; k < parts; k++) {
    if (g.most[k] < 0) return MOCO_ERANGE; /* not an error: the caller stays dense */
    most = g.most[k] > most ? g.most[k] : most;
  }
  size_t at = (size_t)r0 * (size_t)p->cap;
  int W = round_up(most > 0 ? most : 1, PACKED_ALIGN);
  *out = (packed_rows){.R = R, .W = W < p->cap ? W : p->cap, .S = p->S + at, .dS = p->dS + at,
                       .mask = p->mask + at, .col = p->col + at, .used = p->used + r0};
  restride(p, out);
  return 0;
}

typedef struct {
  const packed_rows *pr;
  float alpha;
  const float *queue_keys, *batch_keys;
  int K, batch_off, d;
  float *dq;
} dq_call;

enum { KEY_AHEAD = 4 }; /* keys are scattered over the queue: fetch a few entries ahead */

static const float *key_at(const dq_call *c, int col) {
  if (col < c->K) return c->queue_keys + (size_t)col * c->d;
  return c->batch_keys + (size_t)(col - c->batch_off) * c->d;
}

static void dq_part(void *ctx, int part, int parts) {
  const dq_call *c = ctx;
  const packed_rows *pr = c->pr;
  long lo, hi;
  par_range(pr->R, part, parts, &lo, &hi);
  for (long i = lo; i < hi; i++) {
    const float *g = pr->dS + (size_t)i * pr->W;
    const int32_t *col = pr->col + (size_t)i * pr->W;
    int n = pr->used[i];
    float *out = c->dq + (size_t)i * c->d;
    for (int j = 0; j < n && j < KEY_AHEAD; j++) prefetch_floats(key_at(c, col[j]), (size_t)c->d);
    for (int j = 0; j < n; j++) {
      if (j + KEY_AHEAD < n) prefetch_floats(key_at(c, col[j + KEY_AHEAD]), (size_t)c->d);
      if (g[j] != 0.0f) vec_axpy(out, c->alpha * g[j], key_at(c, col[j]), (size_t)c->d);
    }
  }
}

void packed_dq(const packed_rows *pr, float alpha, const float *queue_keys, int K,
               const float *batch_keys, int batch_off, int d, float *dq) {
  dq_call c = {.pr = pr, .alpha = alpha, .queue_keys = queue_keys, .batch_keys = batch_keys, .K = K,
               .batch_off = batch_off, .d = d, .dq = dq};
  long used = 0;
  for (int i = 0; i < pr->R; i++) used += pr->used[i];
  par_run(par_parts(used * d, 1L << 15), dq_part, &c);
}
