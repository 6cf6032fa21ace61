/* Hardness control: one value in [0, 1] that the mining strategy maps onto its knob (mine.h explains
 * the mapping per strategy) and that the diagnostics report. It comes from one of
 *   fixed       a constant;
 *   curriculum  a schedule over training progress (0..1): random negatives during a warm-up fraction,
 *               then from `start` (easy) to `end` (hard), linearly or along a half cosine;
 *   dynamic     a controller that holds a measured signal near a target: instance accuracy (share of
 *               queries whose positive beats every negative), the mean hardest-negative similarity,
 *               or the mean similarity of the selected negatives. Each step the signal's EMA is
 *               compared with the target and the hardness moves by gain * error, clamped to
 *               +-max_step, within [min, max] (integral control: it settles where the signal meets
 *               the target). Too easy (accuracy above target, a similarity below it) raises hardness;
 *               too hard lowers it.
 *
 * A controller only works on a signal its hardness moves. The hardest strategy keeps the hardest
 * candidate at every hardness (n(h) of the most similar), so neither the instance accuracy nor the
 * hardest similarity depends on h there: the loop has no gain and the integrator runs to a bound.
 * The mean selected similarity (neg_sim) rises with h for hardest, semi-hard, band and mixing;
 * the accuracy falls with h for random. hardness_signal_moves says which pairs are refused. */
#ifndef MOCO_CONTRAST_HARDNESS_H
#define MOCO_CONTRAST_HARDNESS_H

#include <stdint.h>

#include "contrast/mine.h"
#include "core/blob.h"
#include "core/enum.h"

typedef enum { HARDNESS_FIXED, HARDNESS_CURRICULUM, HARDNESS_DYNAMIC } hardness_mode;
typedef enum { HARDNESS_LINEAR, HARDNESS_COSINE } hardness_shape;
typedef enum { HARDNESS_SIGNAL_ACCURACY, HARDNESS_SIGNAL_HARDEST_SIM, HARDNESS_SIGNAL_NEG_SIM } hardness_signal;

typedef struct {
  hardness_mode mode;
  float value;            /* fixed: the hardness; dynamic: the starting hardness */
  float warmup;           /* curriculum and dynamic: fraction of training on random negatives */
  /* curriculum */
  hardness_shape shape;
  float start, end;       /* hardness right after the warm-up and at progress 1 */
  /* dynamic */
  hardness_signal signal;
  float target;           /* level of the signal to hold */
  float gain;             /* hardness change per unit of signal error */
  float max_step;         /* largest change of one update */
  float ema;              /* EMA decay of the signal, in [0, 1) */
  float min, max;         /* the controller's range, within [0, 1] */
} hardness_config;

/* The values are the config's (contrast.hardness.*, defaults and ranges in src/service/config.c). */
extern const enum_name hardness_mode_names[];   /* "fixed", "curriculum", "dynamic" */
extern const enum_name hardness_shape_names[];  /* "linear", "cosine" */
extern const enum_name hardness_signal_names[]; /* "accuracy", "hardest_sim", "neg_sim" */

/* 0 when a dynamic controller's signal can move under the strategy's knob; MOCO_ECONFIG naming the
 * pair when it cannot (hardest with accuracy or hardest_sim, see above). */
int hardness_signal_moves(const hardness_config *c, mine_strategy strategy);

/* The curriculum alone: hardness at progress in [0, 1]; *warmup (when not NULL) is set to 1 inside the
 * warm-up fraction, where the hardness is 0. */
float hardness_curriculum(const hardness_config *c, double progress, int *warmup);

typedef struct {
  const hardness_config *cfg; /* the owner's, read at every call (hardness_init keeps the pointer) */
  float hardness;   /* the controller's current value (dynamic) */
  float signal_ema; /* EMA of the observed signal */
  int64_t updates;  /* observations taken; the first seeds the EMA */
} hardness_ctl;

void hardness_init(hardness_ctl *h, const hardness_config *c);
/* The hardness for a step at this progress, and whether it is a warm-up step (random negatives). */
float hardness_at(const hardness_ctl *h, double progress, int *warmup);
/* After a step: feeds the measured signal to the controller (dynamic mode, outside the warm-up;
 * otherwise nothing changes). Returns the hardness for the next step. A NaN signal is ignored. */
float hardness_observe(hardness_ctl *h, double progress, float signal);

/* One blob section "HARD": hardness, signal EMA, update count. */
void hardness_save(const hardness_ctl *h, blob_writer *w);
int hardness_load(hardness_ctl *h, blob_reader *r);

#endif
