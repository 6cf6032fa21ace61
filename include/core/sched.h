/* Schedules: pure functions of (config, step, total_steps), so a resumed run needs no schedule state
 * and the value at any step can be computed, logged or tested on its own. Steps count from 0 (the
 * first update) to total_steps − 1.
 *
 * Learning rate, with W = warmup_steps:
 *   step < W:   lr · (step + 1) / W                       linear warm-up (Goyal et al. 2017), never 0
 *   constant:   lr
 *   step:       lr · gamma^(number of milestones <= step)  milestones in steps, ascending
 *   cosine:     sched_cosine(lr, final_lr, step − W, total_steps − W)   (Loshchilov & Hutter 2017)
 * sched_cosine is also the momentum ramp of BYOL / MoCo (m0 → 1) and the hardness curriculum. */
#ifndef MOCO_CORE_SCHED_H
#define MOCO_CORE_SCHED_H

#include <stdint.h>

#include "core/enum.h"

typedef enum { SCHED_CONSTANT = 0, SCHED_STEP = 1, SCHED_COSINE = 2 } sched_kind;

#define SCHED_MAX_MILESTONES 16

typedef struct {
  sched_kind lr_schedule;
  float lr;               /* base (peak) learning rate */
  float final_lr;         /* cosine's value after the last step */
  int64_t warmup_steps;
  int n_milestones;       /* step: how many of milestones[] are used */
  int64_t milestones[SCHED_MAX_MILESTONES];
  float gamma;            /* step's factor at each milestone */
} sched_config;

/* "constant", "step", "cosine": the optim.lr_schedule names. The values, their defaults and ranges
 * (milestones ascending, at most SCHED_MAX_MILESTONES) are the config's (src/service/config.c). */
extern const enum_name sched_kind_names[];

/* The learning rate for update number `step` (0-based) of total_steps. */
float sched_lr(const sched_config *c, int64_t step, int64_t total_steps);

/* Half-cosine from a (step 0) to b (step >= total): a + (b − a)·(1 − cos(π·step/total))/2. */
float sched_cosine(float a, float b, int64_t step, int64_t total);

#endif
