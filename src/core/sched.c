#include "core/sched.h"

#include <math.h>
#include <string.h>

#include "core/err.h"

static const char *const kind_names[] = {"constant", "step", "cosine"};
#define N_KINDS (int)(sizeof kind_names / sizeof kind_names[0])

void sched_config_default(sched_config *c) {
  memset(c, 0, sizeof *c);
  c->lr_schedule = SCHED_COSINE;
  c->lr = 0.06f;
  c->final_lr = 0.0f;
  c->gamma = 0.1f;
}

const char *sched_kind_name(sched_kind k) {
  return (int)k >= 0 && (int)k < N_KINDS ? kind_names[k] : "?";
}

int sched_kind_parse(const char *name, sched_kind *k) {
  for (int i = 0; i < N_KINDS; i++)
    if (!strcmp(name, kind_names[i])) return *k = (sched_kind)i, 0;
  return moco_error(MOCO_ECONFIG, "lr_schedule: \"%s\" is not one of constant, step, cosine", name);
}

int sched_validate(const sched_config *c) {
  if ((int)c->lr_schedule < 0 || (int)c->lr_schedule >= N_KINDS)
    return moco_error(MOCO_ECONFIG, "lr_schedule: kind %d, allowed 0..%d", (int)c->lr_schedule,
                      N_KINDS - 1);
  if (!(c->lr >= 0.0f && isfinite(c->lr))) return moco_error(MOCO_ECONFIG, "lr: %g, allowed >= 0", c->lr);
  if (!(c->final_lr >= 0.0f && isfinite(c->final_lr)))
    return moco_error(MOCO_ECONFIG, "final_lr: %g, allowed >= 0", c->final_lr);
  if (c->warmup_steps < 0)
    return moco_error(MOCO_ECONFIG, "warmup_steps: %lld, allowed >= 0", (long long)c->warmup_steps);
  if (c->lr_schedule != SCHED_STEP) return 0;
  if (!(c->gamma > 0.0f && isfinite(c->gamma)))
    return moco_error(MOCO_ECONFIG, "gamma: %g, allowed > 0", c->gamma);
  if (c->n_milestones < 0 || c->n_milestones > SCHED_MAX_MILESTONES)
    return moco_error(MOCO_ECONFIG, "milestones: %d of them, allowed 0..%d", c->n_milestones,
                      SCHED_MAX_MILESTONES);
  for (int i = 0; i < c->n_milestones; i++)
    if (c->milestones[i] < 0 || (i > 0 && c->milestones[i] <= c->milestones[i - 1]))
      return moco_error(MOCO_ECONFIG, "milestones[%d]: %lld, must be >= 0 and above the one before", i,
                        (long long)c->milestones[i]);
  return 0;
}

float sched_cosine(float a, float b, int64_t step, int64_t total) {
  if (step <= 0) return a;
  if (step >= total) return b;
  double t = (double)step / (double)total;
  return (float)(a + (b - a) * 0.5 * (1.0 - cos(M_PI * t)));
}

float sched_lr(const sched_config *c, int64_t step, int64_t total_steps) {
  if (step < c->warmup_steps) return (float)((double)c->lr * (double)(step + 1) / (double)c->warmup_steps);
  switch (c->lr_schedule) {
  case SCHED_STEP: {
    double lr = c->lr;
    for (int i = 0; i < c->n_milestones && c->milestones[i] <= step; i++) lr *= c->gamma;
    return (float)lr;
  }
  case SCHED_COSINE:
    return sched_cosine(c->lr, c->final_lr, step - c->warmup_steps, total_steps - c->warmup_steps);
  case SCHED_CONSTANT:
  default:
    return c->lr;
  }
}
