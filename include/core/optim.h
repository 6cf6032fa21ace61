/* Optimizers over a network's flat parameter arena (include/core/net.h): one update touches the whole
 * vector, segment by segment, so the per-tensor rules (no weight decay on biases and BatchNorm
 * parameters, LARS trust ratios) are decided from the segment list and nothing else.
 *
 * SGD follows torch.optim.SGD (dampening 0), with g' = g + wd·θ:
 *     v ← μ·v + g'          θ ← θ − lr·v                (plain / heavy-ball momentum)
 *     v ← μ·v + g'          θ ← θ − lr·(g' + μ·v)       (Nesterov, Sutskever et al. 2013 as in PyTorch)
 * LARS (You, Gitman & Ginsburg 2017) scales g' per segment by the trust ratio
 *     λ = η·‖θ‖ / (‖g‖ + wd·‖θ‖)     (λ = 1 when ‖θ‖ or the denominator is 0)
 * before the momentum step; lr stays outside the buffer as in the SGD form (MoCo v3's LARS does the
 * same), so a schedule that changes lr does not rescale what the buffer already holds. Segments marked
 * no_decay get neither weight decay nor the trust ratio (the usual LARS exclusion of biases and
 * BatchNorm parameters) unless decay_all is set.
 * AdamW (Loshchilov & Hutter 2019) as torch.optim.AdamW: θ ← θ − lr·wd·θ, then the bias-corrected Adam
 * step on g; decoupled decay follows the same no_decay rule. */
#ifndef MOCO_CORE_OPTIM_H
#define MOCO_CORE_OPTIM_H

#include <stddef.h>
#include <stdint.h>

#include "core/blob.h"
#include "core/enum.h"
#include "core/net.h"

typedef enum { OPTIM_SGD = 0, OPTIM_LARS = 1, OPTIM_ADAMW = 2 } optim_kind;

typedef struct {
  optim_kind optimizer;
  float momentum;       /* μ of SGD and LARS */
  int nesterov;
  float weight_decay;
  int decay_all;        /* 0: segments marked no_decay get no decay (and no LARS ratio) */
  float lars_eta;       /* η, LARS trust coefficient */
  float beta1, beta2;   /* AdamW moment decay rates */
  float eps;            /* AdamW denominator guard */
} optim_config;

/* "sgd", "lars", "adamw": the optim.optimizer names. The values, their defaults and ranges are the
 * config's (optim.*, src/service/config.c), which also holds the rule tying nesterov to momentum > 0. */
extern const enum_name optim_kind_names[];

typedef struct {
  const optim_config *cfg; /* the owner's, read at every step (optim_init keeps the pointer) */
  size_t n_params;
  net_segment *segments; /* a copy, tiling [0, n_params) */
  int n_segments;
  float *m; /* [n_params] SGD/LARS velocity, AdamW first moment */
  float *v; /* [n_params] AdamW second moment; NULL otherwise */
  float *scale; /* [n_segments] the step's gradient scale per segment (LARS's trust ratio, else 1) */
  int64_t steps; /* updates done (AdamW's bias correction) */
} optim;

/* Keeps cfg (the caller's, read at every step: a weight decay changed between steps applies to the
 * next one, the state is kept) and checks that the segments tile [0, n_params) in order; n_segments == 0 means one segment, decayed, over everything.
 * Allocates the state, zeroed. On failure nothing is left allocated. */
int optim_init(optim *o, const optim_config *cfg, size_t n_params, const net_segment *segments,
               int n_segments);
void optim_free(optim *o);

/* One update of params [n_params] from grads [n_params] with learning rate lr. Allocates nothing. The
 * arena is split over the compute team (core/par.h); every entry's arithmetic is the same whatever the
 * split, so results do not depend on the thread count. */
void optim_step(optim *o, float *params, const float *grads, float lr);

/* optim_step, and in the same pass over memory an exponential moving average of the updated
 * parameters, ema[i] ← ema_m·ema[i] + (1 − ema_m)·params[i] (MoCo's key encoder, He et al. 2020,
 * eq. 2), when ema is not NULL: bit for bit optim_step followed by that average, reading each
 * parameter once instead of twice. */
void optim_step_ema(optim *o, float *params, const float *grads, float lr, float *ema, float ema_m);


/* One blob section ("OPTM"): kind, sizes, step count, state vectors. optim_load refuses another kind,
 * parameter count or segment layout with MOCO_ESHAPE. */
void optim_save(const optim *o, blob_writer *w);
int optim_load(optim *o, blob_reader *r);

#endif
