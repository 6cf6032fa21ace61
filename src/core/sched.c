#include "core/sched.h"

#include <math.h>
#include <string.h>

#include "core/err.h"

const enum_name sched_kind_names[] = {
    {"constant", SCHED_CONSTANT}, {"step", SCHED_STEP}, {"cosine", SCHED_COSINE}, {NULL, 0}};

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
