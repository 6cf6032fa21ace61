#include "contrast/momentum.h"

#include <string.h>

#include "core/err.h"
#include "core/sched.h"

const enum_name momentum_schedule_names[] = {
    {"constant", MOMENTUM_CONSTANT}, {"cosine", MOMENTUM_COSINE}, {NULL, 0}};

float momentum_at(const momentum_config *c, int64_t step, int64_t total_steps) {
  if (c->schedule == MOMENTUM_CONSTANT || total_steps <= 0) return c->encoder_momentum;
  return sched_cosine(c->encoder_momentum, 1.0f, step, total_steps);
}

void momentum_update(float *key, const float *query, size_t n, float m) {
  float a = 1.0f - m;
  for (size_t i = 0; i < n; i++) key[i] = m * key[i] + a * query[i];
}

static int same_arch(const net *key, const net *query) {
  if (key->n_params != query->n_params || key->n_buffers != query->n_buffers ||
      key->arch_hash != query->arch_hash)
    return moco_error(MOCO_ESHAPE,
                      "momentum update: key encoder has %zu params, %zu buffers; query %zu, %zu",
                      key->n_params, key->n_buffers, query->n_params, query->n_buffers);
  return 0;
}

int momentum_update_net(net *key, const net *query, float m) {
  int rc = same_arch(key, query);
  if (rc) return rc;
  momentum_update(key->params, query->params, key->n_params, m);
  momentum_update(key->buffers, query->buffers, key->n_buffers, m);
  return 0;
}

int momentum_step_nets(net *key, net *query, optim *o, float lr, float m) {
  int rc = same_arch(key, query);
  if (rc) return rc;
  if (o->n_params != query->n_params)
    return moco_error(MOCO_ESHAPE, "momentum update: optimizer for %zu params, query encoder has %zu",
                      o->n_params, query->n_params);
  optim_step_ema(o, query->params, query->grads, lr, key->params, m);
  momentum_update(key->buffers, query->buffers, key->n_buffers, m);
  return 0;
}
