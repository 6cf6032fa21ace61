/* The momentum (key) encoder: an exponential moving average of the query encoder,
 *     θk ← m·θk + (1 − m)·θq        (He et al. 2020, eq. 2)
 * applied to the whole parameter arena and the whole BatchNorm buffer arena, one pass each. m is
 * constant or follows BYOL's cosine schedule from m0 to 1 (Grill et al. 2020, §3.2):
 *     m(t) = 1 − (1 − m0)·(cos(π·t/T) + 1)/2. */
#ifndef MOCO_CONTRAST_MOMENTUM_H
#define MOCO_CONTRAST_MOMENTUM_H

#include <stddef.h>
#include <stdint.h>

#include "core/enum.h"
#include "core/net.h"
#include "core/optim.h"

typedef enum {
  MOMENTUM_CONSTANT,
  MOMENTUM_COSINE,
} momentum_schedule;

typedef struct {
  float encoder_momentum;     /* m, or m0 for the cosine schedule; in [0, 1] */
  momentum_schedule schedule;
} momentum_config;

/* contrast.momentum_schedule: "constant", "cosine" (the values and defaults are the config's). */
extern const enum_name momentum_schedule_names[];

/* m at step `step` of `total_steps` (sched_cosine(m0, 1, step, total_steps), clamped at both ends;
 * total_steps <= 0 means m0). */
float momentum_at(const momentum_config *c, int64_t step, int64_t total_steps);

/* key[i] ← m·key[i] + (1 − m)·query[i], i < n. */
void momentum_update(float *key, const float *query, size_t n, float m);
/* The EMA over the parameter and buffer arenas of two networks of the same architecture; MOCO_ESHAPE
 * when they differ. */
int momentum_update_net(net *key, const net *query, float m);

/* A training step's update of both encoders: the optimizer's update of the query encoder from its
 * gradients, then the key encoder's average of the result (momentum_update_net), the two fused into
 * one parallel pass over the parameter arenas (optim_step_ema). MOCO_ESHAPE when the networks or the
 * optimizer do not match. */
int momentum_step_nets(net *key, net *query, optim *o, float lr, float m);

#endif
