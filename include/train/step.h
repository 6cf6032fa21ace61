/* One MoCo training step (He et al. 2020, Algorithm 1), read top to bottom:
 *
 *   keys      k = f_k(view 2), no gradient, on a shuffled batch with split BatchNorm (MoCo's shuffle BN,
 *             simulated on one device: permute, forward with bn_groups > 1, un-permute)
 *   queries   q = f_q(view 1), training mode; both encoders end in l2norm, so dots are cosines
 *   similar.  s_pos = q·k row-wise; S = q·[queue | in-batch keys | adversarial bank]ᵀ, one sgemm per
 *             block into its columns of S
 *   mining    mask = mine_select(S, ...)       (include/contrast/mine.h)
 *   loss      the configured loss and its dS, dpos (include/contrast/loss.h), on the rows packed to
 *             their used columns when the strategy selects few of them (include/contrast/packed.h)
 *   backward  dq = dS·candidates + dpos·k (+ MoCHi's folded synthetic part), through f_q; from packed
 *             rows, a sum over each row's used keys instead of the product with every candidate
 *   update    optimizer step at the scheduled lr, θk ← m·θk + (1−m)·θq, enqueue k, adversarial bank
 *             ascent, hardness controller
 *
 * Symmetric variant: both views are queries, each against the other view's key (view 1 → key of view
 * 2 and view 2 → key of view 1); the query encoder sees both views as one batch of 2B (BatchNorm over
 * both), the loss is the mean of the two directions and only view 2's keys are enqueued, so the queue
 * advances by B per step either way.
 *
 * NT-Xent (loss "ntxent") is SimCLR's loss and runs as such: both views through the query encoder in
 * one 2B batch, every other view in the batch plus the valid queue as negatives, no mining. The key
 * encoder still runs on view 2 and fills the queue.
 *
 * Everything the step touches is allocated by moco_init for the largest batch and queue; the step
 * allocates nothing. */
#ifndef MOCO_TRAIN_STEP_H
#define MOCO_TRAIN_STEP_H

#include <jansson.h>
#include <stdint.h>

#include "contrast/advbank.h"
#include "contrast/hardness.h"
#include "contrast/loss.h"
#include "contrast/mine.h"
#include "contrast/packed.h"
#include "contrast/momentum.h"
#include "contrast/queue.h"
#include "core/blob.h"
#include "core/net.h"
#include "core/optim.h"
#include "core/rng.h"
#include "core/sched.h"

typedef struct {
  int batch_size;        /* largest B a step takes */
  int queue_size;        /* K; ignored (no queue) with the adversarial strategy */
  int symmetric;
  int shuffle_bn_groups; /* key encoder BatchNorm groups over a shuffled batch; 1 = no shuffle BN */
  int sync_bn;           /* query encoder BatchNorm over the world's batch (SyncBN); 0: each rank's */
  int64_t total_steps;   /* training length the schedules (lr, momentum, curriculum) run over */
  uint64_t seed;         /* initialisation, shuffle-BN permutations and mining draws */
  loss_config loss;
  mine_config mine;
  hardness_config hardness;
  advbank_config advbank;  /* adversarial strategy only; its size is mine.bank_size */
  momentum_config momentum;
  optim_config optim;
  sched_config sched;
} moco_config;

/* Every field but total_steps is a config value (defaults, ranges and the rules tying them together in
 * src/service/config.c; tests take them from config_defaults). */

/* Wall-clock seconds of each phase of the last step. */
typedef struct {
  double keys, queries, similarity, mining, loss, backward, update, total;
  double comm; /* of the above, inside collectives (core/dist.h); 0 in a world of one */
} moco_timing;

/* What one step reports (the daemon logs it). Similarities are cosines. */
typedef struct {
  int64_t step;              /* the step this was (0-based) */
  double loss;
  float lr, momentum;        /* as used by this step */
  float pos_sim_mean;        /* mean q·k+ */
  float neg_sim_mean;        /* mean similarity over every negative used */
  float hardest_sim_mean;    /* mean over queries of the hardest negative used */
  float hardest_sim_max;     /* the hardest negative of the step */
  float instance_accuracy;   /* share of queries whose positive outranks every negative used */
  double negatives_per_query;
  long filtered;             /* candidates removed (or kept as positives) as suspected false negatives */
  long extra_positives;      /* of which kept as extra positives */
  float false_negative_rate; /* share of mined negatives with the query's label; −1 without labels */
  float hardness;            /* the hardness the step ran at */
  moco_timing time;
} moco_diag;

typedef struct {
  moco_config cfg;
  net query, key;
  optim opt;
  queue queue;             /* queue_size 0 when the strategy is adversarial */
  mine mine;
  hardness_ctl hard;
  advbank bank;            /* adversarial strategy only */
  rng_t rng;               /* shuffle-BN permutations and mining draws: every rank draws the same
                              (mine_select takes one seed a call; rows draw by their world index) */
  int world, rank;         /* core/dist.h at init: the step's batch is split across `world` ranks */
  int64_t step;            /* steps done */
  int dim, in_len;         /* embedding dimension, floats per input sample */
  /* work buffers for the largest batch (rows R = B, or 2B when symmetric or ntxent) */
  float *xq, *xk;          /* [R, in] query and (permuted) key inputs */
  uint32_t *perm;          /* [world R] */
  float *x_world;          /* world of several: [world B, in] every rank's key inputs */
  float *k_world;          /* world of several: [world B, d] keys in permuted order, as gathered */
  int64_t *ids_world;      /* [world B] the world batch's ids and labels, for the queue */
  int32_t *labels_world;
  const float *q;          /* [R, d] queries of the last forward (the query encoder's output) */
  float *k;                /* [world R, d] keys of the world's batch in batch order: row rank B + r
                              is the positive of this rank's query row r */
  float *s_pos, *dpos, *dself; /* [R] */
  float *S, *dS;           /* [R, cols] */
  uint8_t *mask;           /* [R, cols] */
  packed pack;             /* rows 0 when the strategy never selects few columns (all, mixing, AdCo) */
  packed_rows packs[2];    /* each half's packed block of the last loss; R = 0: that half ran dense */
  float *dq;               /* [R, d] */
  float *ntxent_work;      /* loss_ntxent_work_len(B, K), ntxent only */
} moco_model;

/* Builds the query encoder from `spec` (a layer list ending in l2norm) for inputs of shape `in`,
 * initialises it from cfg->seed, clones the key encoder from it and allocates every other part and
 * work buffer. `path` names spec in error messages. On failure nothing is left allocated. */
int moco_init(moco_model *m, const moco_config *cfg, const json_t *spec, net_shape in,
              const char *path);
void moco_free(moco_model *m);

/* One full step on B <= batch_size samples: x1, x2 [B, in] the two views, ids [B] sample ids (NULL:
 * unknown, no same-id exclusion), labels [B] or NULL (diagnostics only unless mining is supervised).
 * Fills d when not NULL.
 *
 * World of several ranks (core/dist.h; every rank calls it with its own B = batch_size / world rows of
 * the world's batch, in rank order): the key inputs are gathered and shuffled across ranks with one
 * permutation (MoCo's _batch_shuffle_ddp), each rank encodes its slice of it with shuffle_bn_groups /
 * world BatchNorm groups, and the keys are gathered back, so every rank holds the world's keys in batch
 * order; each rank's queries run against them; the gradients are averaged across ranks (each rank's loss
 * is the mean over its rows, so the average is the world batch's mean); the world's keys are enqueued on
 * every rank, and the step's figures are averaged (maxima: the maximum), so parameters, queue, hardness
 * and schedules stay the same on every rank. With sync_bn the query encoder's BatchNorm uses the world's
 * statistics, and the step equals one process's on the whole batch up to float rounding (test_dist.c);
 * without it each rank's statistics, as MoCo v1/v2's DDP. Running BatchNorm statistics are averaged
 * across ranks after the step. Not available across ranks (moco_init says so): symmetric, NT-Xent,
 * in-batch negatives and the adversarial strategy. */
int moco_step(moco_model *m, const float *x1, const float *x2, const int64_t *ids,
              const int32_t *labels, int B, moco_diag *d);

/* The step's phases on their own, for gradient checks and evaluation: moco_keys computes the keys of
 * view 2 (and view 1 when symmetric) with the key encoder; moco_loss then computes the queries of
 * view 1 (and 2), similarities, mining and the loss against those keys, and with `backward` set also
 * the query encoder's gradients (zeroed first). Neither updates parameters, queue or hardness.
 * moco_step = moco_keys + moco_loss(backward) + the updates. */
int moco_keys(moco_model *m, const float *x1, const float *x2, int B, moco_diag *d);
int moco_loss(moco_model *m, const float *x1, const float *x2, const int64_t *ids,
              const int32_t *labels, int B, int backward, moco_diag *d);

/* The whole training state, each part in its own blob section: "MOCO" (step, rng, sizes), the query
 * and key networks, the optimizer, the queue (when there is one), the hardness controller and the
 * adversarial bank. moco_load refuses a state of another architecture or size. */
void moco_save(const moco_model *m, blob_writer *w);
int moco_load(moco_model *m, blob_reader *r);

/* A hash of the parameters, running statistics and queue of both encoders, compared across ranks:
 * MOCO_ESTATE naming the first rank whose model differs from rank 0's. 0 in a world of one. */
int moco_check_world(const moco_model *m);

#endif
