#include "core/optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/par.h"
#include "core/tensor.h"

#include "hot.h" /* the update loops are elementwise: O3's vectoriser */

const enum_name optim_kind_names[] = {{"sgd", OPTIM_SGD}, {"lars", OPTIM_LARS}, {"adamw", OPTIM_ADAMW}, {NULL, 0}};

/* Every parameter must belong to exactly one segment, or some would silently never move. */
static int check_segments(size_t n, const net_segment *s, int count) {
  size_t off = 0;
  for (int i = 0; i < count; i++) {
    if (s[i].off != off || s[i].len == 0 || s[i].len > n - off)
      return moco_error(MOCO_EINVAL,
                        "optimizer segments[%d]: off %zu len %zu, expected off %zu and 1..%zu entries",
                        i, s[i].off, s[i].len, off, n - off);
    off += s[i].len;
  }
  if (off != n)
    return moco_error(MOCO_EINVAL, "optimizer segments: cover %zu of %zu parameters", off, n);
  return 0;
}

int optim_init(optim *o, const optim_config *cfg, size_t n_params, const net_segment *segments,
               int n_segments) {
  memset(o, 0, sizeof *o);
  int rc = 0;
  if (n_segments < 0) rc = moco_error(MOCO_EINVAL, "optimizer: %d segments", n_segments);
  if (!rc && n_segments > 0) rc = check_segments(n_params, segments, n_segments);
  if (rc) return rc;
  o->cfg = cfg;
  o->n_params = n_params;
  o->n_segments = n_segments ? n_segments : 1;
  o->segments = malloc(sizeof *o->segments * o->n_segments);
  o->scale = malloc(sizeof *o->scale * o->n_segments);
  o->m = tensor_calloc(n_params);
  if (cfg->optimizer == OPTIM_ADAMW) o->v = tensor_calloc(n_params);
  if (!o->segments || !o->scale || !o->m || (cfg->optimizer == OPTIM_ADAMW && !o->v)) {
    optim_free(o);
    return moco_error(MOCO_ENOMEM, "optimizer: state for %zu parameters", n_params);
  }
  if (n_segments)
    memcpy(o->segments, segments, sizeof *segments * n_segments);
  else
    o->segments[0] = (net_segment){0, n_params, 0, 0};
  return 0;
}

void optim_free(optim *o) {
  free(o->segments);
  free(o->scale);
  tensor_free(o->m);
  tensor_free(o->v);
  memset(o, 0, sizeof *o);
}

static double norm2(const float *x, size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
  return sqrt(s);
}

/* The LARS trust ratio of one segment, λ = η‖θ‖ / (‖g‖ + wd‖θ‖) (You et al. 2017, eq. 6). */
static float lars_ratio(const float *p, const float *g, size_t n, float eta, float wd) {
  double pn = norm2(p, n), den = norm2(g, n) + wd * pn;
  return pn > 0.0 && den > 0.0 ? (float)(eta * pn / den) : 1.0f;
}

/* SGD / LARS on a run of one segment: g' = scale·(g + wd·θ); v ← μv + g'; θ ← θ − lr·(v or g' + μv). */
static void sgd_run(const optim_config *c, float *restrict p, const float *restrict g, float *restrict m,
                    size_t n, float wd, float scale, float lr) {
  const float mu = c->momentum;
  if (c->nesterov) {
    for (size_t i = 0; i < n; i++) {
      float d = scale * (g[i] + wd * p[i]);
      m[i] = mu * m[i] + d;
      p[i] -= lr * (d + mu * m[i]);
    }
  } else {
    for (size_t i = 0; i < n; i++) {
      m[i] = mu * m[i] + scale * (g[i] + wd * p[i]);
      p[i] -= lr * m[i];
    }
  }
}

/* AdamW on a run of one segment; c1, c2 are the bias corrections 1 − β^t. */
static void adamw_run(const optim_config *c, float *restrict p, const float *restrict g,
                      float *restrict m, float *restrict v, size_t n, float wd, float lr, float c1, float c2) {
  const float b1 = c->beta1, b2 = c->beta2, step = lr / c1, rc2 = 1.0f / sqrtf(c2);
  const float keep = 1.0f - lr * wd;
  for (size_t i = 0; i < n; i++) {
    m[i] = b1 * m[i] + (1.0f - b1) * g[i];
    v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
    p[i] = keep * p[i] - step * m[i] / (sqrtf(v[i]) * rc2 + c->eps);
  }
}

/* ema ← a·ema + (1 − a)·θ */
static void ema_run(float *restrict ema, const float *restrict p, size_t n, float a) {
  const float b = 1.0f - a;
  for (size_t i = 0; i < n; i++) ema[i] = a * ema[i] + b * p[i];
}

/* Floats the update and the average take in turn: the block's θ is still in L1 (five or six 4 KB
 * streams) when the average reads it, so the two make one pass over memory. */
#define UPDATE_BLOCK 1024

/* The arguments of one update, shared by its parts. */
typedef struct {
  const optim *o;
  float *params, *ema;
  const float *grads;
  float lr, c1, c2, ema_m;
} update_call;

static float segment_decay(const optim *o, const net_segment *sg) {
  return sg->no_decay && !o->cfg->decay_all ? 0.0f : o->cfg->weight_decay;
}

/* Arena entries [lo, hi) of segment s, block by block. */
static void update_run(const update_call *a, int s, size_t lo, size_t hi) {
  const optim *o = a->o;
  const optim_config *c = o->cfg;
  float wd = segment_decay(o, &o->segments[s]);
  for (size_t b = lo; b < hi; b += UPDATE_BLOCK) {
    size_t n = hi - b < UPDATE_BLOCK ? hi - b : UPDATE_BLOCK;
    if (c->optimizer == OPTIM_ADAMW)
      adamw_run(c, a->params + b, a->grads + b, o->m + b, o->v + b, n, wd, a->lr, a->c1, a->c2);
    else
      sgd_run(c, a->params + b, a->grads + b, o->m + b, n, wd, o->scale[s], a->lr);
    if (a->ema) ema_run(a->ema + b, a->params + b, n, a->ema_m);
  }
}

/* Part `part` of the arena, through the segments it overlaps. */
static void update_part(void *ctx, int part, int parts) {
  const update_call *a = ctx;
  const optim *o = a->o;
  long lo, hi;
  par_range((long)o->n_params, part, parts, &lo, &hi);
  for (int s = 0; s < o->n_segments; s++) {
    size_t s0 = o->segments[s].off, s1 = s0 + o->segments[s].len;
    size_t r0 = s0 > (size_t)lo ? s0 : (size_t)lo, r1 = s1 < (size_t)hi ? s1 : (size_t)hi;
    if (r0 < r1) update_run(a, s, r0, r1);
  }
}

/* LARS's trust ratio needs each segment's norms before any of it moves; the other optimizers' scale
 * is 1. */
static void segment_scales(optim *o, const float *params, const float *grads) {
  for (int s = 0; s < o->n_segments; s++) {
    const net_segment *sg = &o->segments[s];
    int excluded = sg->no_decay && !o->cfg->decay_all;
    o->scale[s] = o->cfg->optimizer == OPTIM_LARS && !excluded
                      ? lars_ratio(params + sg->off, grads + sg->off, sg->len, o->cfg->lars_eta,
                                   segment_decay(o, sg))
                      : 1.0f;
  }
}

void optim_step_ema(optim *o, float *params, const float *grads, float lr, float *ema, float ema_m) {
  const optim_config *c = o->cfg;
  o->steps++;
  segment_scales(o, params, grads);
  update_call a = {.o = o, .params = params, .ema = ema, .grads = grads, .lr = lr,
                   .c1 = 1.0f - powf(c->beta1, (float)o->steps),
                   .c2 = 1.0f - powf(c->beta2, (float)o->steps), .ema_m = ema_m};
  par_run(par_parts((long)o->n_params, PAR_MIN_FLOATS), update_part, &a);
}

void optim_step(optim *o, float *params, const float *grads, float lr) {
  optim_step_ema(o, params, grads, lr, NULL, 0.0f);
}

void optim_save(const optim *o, blob_writer *w) {
  blob_section_begin(w, "OPTM");
  blob_put_u32(w, (uint32_t)o->cfg->optimizer);
  blob_put_u64(w, o->n_params);
  blob_put_u32(w, (uint32_t)o->n_segments);
  for (int s = 0; s < o->n_segments; s++) {
    blob_put_u64(w, o->segments[s].off);
    blob_put_u32(w, (uint32_t)o->segments[s].no_decay);
  }
  blob_put_u64(w, (uint64_t)o->steps);
  blob_put(w, o->m, o->n_params * sizeof(float));
  if (o->v) blob_put(w, o->v, o->n_params * sizeof(float));
  blob_section_end(w);
}

/* Reads the header into locals and compares it with `o` before anything of `o` changes, so a refused
 * blob leaves the optimizer as it was. */
static int load_header(const optim *o, blob_reader *s) {
  uint32_t kind, nseg, no_decay;
  uint64_t n, off;
  int rc;
  if ((rc = blob_get_u32(s, &kind)) || (rc = blob_get_u64(s, &n)) || (rc = blob_get_u32(s, &nseg)))
    return rc;
  if (kind != (uint32_t)o->cfg->optimizer)
    return moco_error(MOCO_ESHAPE, "%s: optimizer state is for %s, this optimizer is %s", s->name,
                      enum_name_of(optim_kind_names, (int)kind), enum_name_of(optim_kind_names, (int)o->cfg->optimizer));
  if (n != o->n_params || nseg != (uint32_t)o->n_segments)
    return moco_error(MOCO_ESHAPE,
                      "%s: optimizer state has %llu parameters in %u segments, expected %zu in %d",
                      s->name, (unsigned long long)n, nseg, o->n_params, o->n_segments);
  for (int i = 0; i < o->n_segments; i++) {
    if ((rc = blob_get_u64(s, &off)) || (rc = blob_get_u32(s, &no_decay))) return rc;
    if (off != o->segments[i].off || no_decay != (uint32_t)o->segments[i].no_decay)
      return moco_error(MOCO_ESHAPE,
                        "%s: optimizer segment %d: off %llu no_decay %u, expected off %zu no_decay %d",
                        s->name, i, (unsigned long long)off, no_decay, o->segments[i].off,
                        o->segments[i].no_decay);
  }
  size_t want = 8 + o->n_params * sizeof(float) * (o->v ? 2 : 1);
  if (s->len - s->pos != want)
    return moco_error(MOCO_ESHAPE, "%s: optimizer state: %zu bytes of state, expected %zu", s->name,
                      s->len - s->pos, want);
  return 0;
}

int optim_load(optim *o, blob_reader *r) {
  blob_reader s;
  int rc = blob_section(r, "OPTM", &s);
  if (!rc) rc = load_header(o, &s);
  if (rc) return moco_error_wrap(rc, "loading optimizer");
  uint64_t steps;
  blob_get_u64(&s, &steps);
  o->steps = (int64_t)steps;
  blob_get(&s, o->m, o->n_params * sizeof(float));
  if (o->v) blob_get(&s, o->v, o->n_params * sizeof(float));
  return 0;
}
