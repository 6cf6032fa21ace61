/* MoCHi (Kalantidis et al. 2020): synthetic hard negatives mixed from a row's hard pool, their
 * similarities derived without building the points, and the backward fold that hands a synthetic
 * column's gradient to the real columns it was mixed from. */
#include <math.h>
#include <string.h>

#include "core/tensor.h"
#include "mine_internal.h"

static const float *key_of(const mine_layout *l, const mine_input *in, int col) {
  if (col < l->queue_size) return in->queue_keys + (size_t)col * in->dim;
  return in->batch_keys + (size_t)(col - l->batch_off) * in->dim;
}

/* A dot product of two keys, d floats, in eight-lane vectors of GCC's vector extension: left to
 * itself, the compiler re-rolls any set of scalar partial sums into an accumulator array in memory,
 * which made this loop the whole cost of mixing. */
typedef float v8f __attribute__((vector_size(32)));

static float dot(const float *restrict x, const float *restrict y, int n) {
  v8f acc0 = {0}, acc1 = {0};
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    v8f x0, y0, x1, y1;
    memcpy(&x0, x + i, sizeof x0);
    memcpy(&y0, y + i, sizeof y0);
    memcpy(&x1, x + i + 8, sizeof x1);
    memcpy(&y1, y + i + 8, sizeof y1);
    acc0 += x0 * y0;
    acc1 += x1 * y1;
  }
  acc0 += acc1;
  float s = ((acc0[0] + acc0[1]) + (acc0[2] + acc0[3])) + ((acc0[4] + acc0[5]) + (acc0[6] + acc0[7]));
  for (; i < n; i++) s += x[i] * y[i];
  return s;
}

/* The pair mixes read two random keys each: with the keys of the next few pairs on their way
 * (prefetch_floats), the dot products stop waiting on memory. */
enum { PREFETCH_AHEAD = 4 };

/* MoCHi (Kalantidis et al. 2020, eqs. 3-4): from the hard pool P of a row, h = normalise(a n_i +
 * (1-a) n_j) with a ~ U(0,1) for the first mix_pairs columns, and h' = normalise(b q + (1-b) n_j)
 * with b ~ U(0, 0.5) for the next mix_query (the query never dominates its mix). The similarity q.h
 * follows from the real columns' similarities and one key-key dot product, so no point is built.
 * Three passes: the draws (recipes holding the raw weight), the dot products (keys prefetched a few
 * pairs ahead), and the normalisation, over plain arrays so that it vectorises. */
void mine_synthesize(const mine *m, mine_ws *ws, const mine_layout *l, const mine_input *in,
                     int row, const int32_t *P, int np, float *srow, uint8_t *mrow, rng_t *rng,
                       rowacc_t *ra) {
  const mine_config *c = m->cfg;
  const int d = in->dim, X = l->synth_size, pairs = np >= 2 ? c->mix_pairs : 0;
  mine_synth *rec = m->synth + (size_t)row * X;
  float *wt = ws->vals, *xy = ws->tmp; /* [X] each: raw weight, then the mix's x.y */
  for (int x = 0; x < X; x++) {
    rec[x] = (mine_synth){-2, -2, 0.0f, 0.0f};
    wt[x] = 0.0f;
    if (x < c->mix_pairs && np >= 2) {
      int i = (int)draw_below(rng, (uint32_t)np);
      int j = (int)draw_below(rng, (uint32_t)(np - 1));
      j += j >= i; /* two distinct pool members */
      rec[x].a = P[i];
      rec[x].b = P[j];
      wt[x] = draw_open01(rng);
    } else if (x >= c->mix_pairs && np >= 1) {
      rec[x].a = -1;
      rec[x].b = P[draw_below(rng, (uint32_t)np)];
      wt[x] = 0.5f * draw_open01(rng);
    }
  }
  for (int x = 0; x < PREFETCH_AHEAD && x < pairs; x++) {
    prefetch_floats(key_of(l, in, rec[x].a), (size_t)d);
    prefetch_floats(key_of(l, in, rec[x].b), (size_t)d);
  }
  for (int x = 0; x < X; x++) {
    if (x + PREFETCH_AHEAD < pairs) {
      prefetch_floats(key_of(l, in, rec[x + PREFETCH_AHEAD].a), (size_t)d);
      prefetch_floats(key_of(l, in, rec[x + PREFETCH_AHEAD].b), (size_t)d);
    }
    /* x.y: the two keys' dot product, or for a query mix the query's similarity to its key */
    const mine_synth *sy = &rec[x];
    xy[x] = sy->b < 0 ? 0.0f : sy->a >= 0 ? dot(key_of(l, in, sy->a), key_of(l, in, sy->b), d) : srow[sy->b];
  }
  for (int x = 0; x < X; x++) { /* |w x + (1-w) y|^2 -> 1 / norm, in place of xy */
    float n2 = wt[x] * wt[x] + (1 - wt[x]) * (1 - wt[x]) + 2 * wt[x] * (1 - wt[x]) * xy[x];
    xy[x] = n2 > 1e-12f ? 1.0f / sqrtf(n2) : 0.0f;
  }
  for (int x = 0; x < X; x++) {
    mine_synth *sy = &rec[x];
    int col = l->synth_off + x;
    if (sy->b < 0 || xy[x] == 0.0f) {
      *sy = (mine_synth){-2, -2, 0.0f, 0.0f};
      srow[col] = 0.0f;
      mrow[col] = MINE_OFF;
      continue;
    }
    sy->wa = wt[x] * xy[x];
    sy->wb = (1 - wt[x]) * xy[x];
    srow[col] = sy->wa * (sy->a >= 0 ? srow[sy->a] : 1.0f) + sy->wb * srow[sy->b]; /* q.q = 1 */
    mrow[col] = MINE_NEG;
    rowacc_add(ra, srow[col]);
  }
}

void mine_synth_point(const mine *m, const mine_layout *l, const mine_input *in, int row, int x,
                      float *out) {
  const mine_synth *sy = m->synth + (size_t)row * l->synth_size + x;
  const float *a = sy->a == -1 ? in->q + (size_t)row * in->dim : key_of(l, in, sy->a);
  for (int k = 0; k < in->dim; k++) out[k] = 0.0f;
  if (sy->b < 0) return;
  const float *b = key_of(l, in, sy->b);
  for (int k = 0; k < in->dim; k++) out[k] = sy->wa * a[k] + sy->wb * b[k];
}

void mine_synth_fold(const mine *m, const mine_layout *l, int batch_size, float *dS, float *dself) {
  for (int i = 0; i < batch_size; i++) {
    float *drow = dS + (size_t)i * l->cols;
    const mine_synth *rec = m->synth + (size_t)i * l->synth_size;
    dself[i] = 0.0f;
    for (int x = 0; x < l->synth_size; x++) {
      float g = drow[l->synth_off + x];
      if (rec[x].b < 0 || g == 0.0f) continue;
      if (rec[x].a == -1)
        dself[i] += g * rec[x].wa;
      else
        drow[rec[x].a] += g * rec[x].wa;
      drow[rec[x].b] += g * rec[x].wb;
    }
  }
}
