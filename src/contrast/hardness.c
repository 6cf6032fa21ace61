#include "contrast/hardness.h"

#include <math.h>
#include <string.h>

#include "core/err.h"

const enum_name hardness_mode_names[] = {
    {"fixed", HARDNESS_FIXED}, {"curriculum", HARDNESS_CURRICULUM}, {"dynamic", HARDNESS_DYNAMIC}, {NULL, 0}};
const enum_name hardness_shape_names[] = {{"linear", HARDNESS_LINEAR}, {"cosine", HARDNESS_COSINE}, {NULL, 0}};
const enum_name hardness_signal_names[] = {
    {"accuracy", HARDNESS_SIGNAL_ACCURACY},
    {"hardest_sim", HARDNESS_SIGNAL_HARDEST_SIM},
    {"neg_sim", HARDNESS_SIGNAL_NEG_SIM},
    {NULL, 0}};

static int in01(float x) { return x >= 0.0f && x <= 1.0f; }

int hardness_signal_moves(const hardness_config *c, mine_strategy strategy) {
  if (c->mode == HARDNESS_DYNAMIC && strategy == MINE_HARDEST && c->signal != HARDNESS_SIGNAL_NEG_SIM)
    return moco_error(MOCO_ECONFIG,
                      "hardness.signal: %s does not depend on the hardness under the hardest strategy (the "
                      "hardest candidate is selected at every hardness): use neg_sim",
                      enum_name_of(hardness_signal_names, (int)c->signal));
  return 0;
}

static float clampf(float x, float lo, float hi) { return x < lo ? lo : x > hi ? hi : x; }

float hardness_curriculum(const hardness_config *c, double progress, int *warmup) {
  double p = progress < 0.0 ? 0.0 : progress > 1.0 ? 1.0 : progress;
  int warm = p < c->warmup;
  if (warmup) *warmup = warm;
  if (warm) return 0.0f;
  double t = (p - c->warmup) / (1.0 - c->warmup);
  /* cosine: slow start and slow finish, as the cosine schedules of learning rate and momentum */
  if (c->shape == HARDNESS_COSINE) t = 0.5 * (1.0 - cos(M_PI * t));
  return clampf((float)(c->start + (c->end - c->start) * t), 0.0f, 1.0f);
}

void hardness_init(hardness_ctl *h, const hardness_config *c) {
  memset(h, 0, sizeof *h);
  h->cfg = c;
  h->hardness = clampf(c->value, c->min, c->max);
}

float hardness_at(const hardness_ctl *h, double progress, int *warmup) {
  const hardness_config *c = h->cfg;
  if (c->mode == HARDNESS_CURRICULUM) return hardness_curriculum(c, progress, warmup);
  int warm = c->mode == HARDNESS_DYNAMIC && progress < c->warmup;
  if (warmup) *warmup = warm;
  if (warm) return 0.0f;
  return c->mode == HARDNESS_DYNAMIC ? h->hardness : c->value;
}

float hardness_observe(hardness_ctl *h, double progress, float signal) {
  const hardness_config *c = h->cfg;
  if (c->mode != HARDNESS_DYNAMIC || progress < c->warmup || signal != signal) return h->hardness;
  h->signal_ema = h->updates == 0 ? signal : c->ema * h->signal_ema + (1.0f - c->ema) * signal;
  h->updates++;
  /* positive error = the negatives are too easy for the model: accuracy above its target, a
   * similarity below it */
  float err = c->signal == HARDNESS_SIGNAL_ACCURACY ? h->signal_ema - c->target : c->target - h->signal_ema;
  float step = clampf(c->gain * err, -c->max_step, c->max_step);
  h->hardness = clampf(h->hardness + step, c->min, c->max);
  return h->hardness;
}

void hardness_save(const hardness_ctl *h, blob_writer *w) {
  blob_section_begin(w, "HARD");
  blob_put_f32(w, h->hardness);
  blob_put_f32(w, h->signal_ema);
  blob_put_u64(w, (uint64_t)h->updates);
  blob_section_end(w);
}

int hardness_load(hardness_ctl *h, blob_reader *r) {
  blob_reader s;
  int rc = blob_section(r, "HARD", &s);
  if (rc) return moco_error_wrap(rc, "hardness_load");
  if (s.len != 16)
    return moco_error(MOCO_EFORMAT, "hardness_load: %s: offset %zu: section of %zu bytes, expected 16",
                      r->name ? r->name : "blob", s.base, s.len);
  float hard, ema;
  uint64_t n;
  blob_get_f32(&s, &hard);
  blob_get_f32(&s, &ema);
  blob_get_u64(&s, &n);
  if (!in01(hard))
    return moco_error(MOCO_ERANGE, "hardness_load: %s: hardness %g outside [0, 1]",
                      r->name ? r->name : "blob", hard);
  h->hardness = clampf(hard, h->cfg->min, h->cfg->max);
  h->signal_ema = ema;
  h->updates = (int64_t)n;
  return 0;
}
