/* Negative selection ("mining"): which candidate columns of the similarity matrix S are negatives for
 * each query, every step. The step computes S [B, cols] (one sgemm per candidate source), calls
 * mine_select, and hands (S, mask, s_pos) to a loss. Columns are laid out as
 *
 *   [ queue slots 0..K-1 | in-batch keys (B) | adversarial bank rows (M) | synthetic negatives (X per row) ]
 *
 * and each query row's mask says MINE_OFF (unused), MINE_NEG (a negative) or MINE_POS (a suspected false
 * negative kept as an extra positive, for multi-positive InfoNCE). A single hardness value in [0, 1]
 * (from a curriculum or a controller, include/contrast/hardness.h) sets the strategy's knob:
 *
 *   random, hardest, semi-hard: n(h) = n_easy^(1-h) * n^h   (geometric; n_easy = 0 means every valid
 *                                candidate), n = num_negatives, n_easy = num_negatives_easy
 *   mixing:                     the pool of the N(h) hardest, N(h) as n(h) above
 *   band:                       rank window [h*band_lo, 1 - h*(1 - band_hi)]: every candidate at h = 0,
 *                                [band_lo, band_hi] at h = 1 (ranks are percentiles, 0 = hardest)
 *   all, adversarial:           no knob; the hardness is only reported
 *   HCL (a loss, not a strategy): beta(h) = h * hcl_beta, read with mine_hcl_beta
 *
 * mine_select allocates nothing and is deterministic given the rng it is passed. */
#ifndef MOCO_CONTRAST_MINE_H
#define MOCO_CONTRAST_MINE_H

#include <stdint.h>

#include "core/enum.h"
#include "core/rng.h"

/* Mask values, shared with the losses. */
enum { MINE_OFF = 0, MINE_NEG = 1, MINE_POS = 2 };

typedef enum {
  MINE_ALL,         /* every valid candidate (plain MoCo) */
  MINE_RANDOM,      /* n(h) uniformly without replacement */
  MINE_HARDEST,     /* the n(h) most similar */
  MINE_SEMI_HARD,   /* s_pos - margin < s < s_pos (FaceNet), n(h) at random from that band, topped up
                       with the hardest below the band when it holds fewer */
  MINE_BAND,        /* hardness-rank percentile window */
  MINE_MIXING,      /* every valid candidate plus MoCHi synthetic negatives (Kalantidis et al. 2020) */
  MINE_ADVERSARIAL, /* the learnable bank of include/contrast/advbank.h (AdCo, Hu et al. 2021); queue
                       columns are not used (pass queue_size 0 to mine_layout_init to omit them) */
} mine_strategy;

typedef enum {
  MINE_CEILING_NONE,
  MINE_CEILING_ABSOLUTE, /* s > ceiling is a suspected false negative */
  MINE_CEILING_RELATIVE, /* s > s_pos - ceiling_delta is a suspected false negative */
} mine_ceiling;

typedef struct {
  mine_strategy strategy;
  int in_batch_negatives;  /* also use the other samples' keys of the batch as candidates */
  int num_negatives;       /* n at hardness 1 (random, hardest, semi-hard; mixing: pool N) */
  int num_negatives_easy;  /* n at hardness 0; 0 = every valid candidate */
  float margin;            /* semi-hard band width */
  float band_lo, band_hi;  /* band window at hardness 1, 0 <= lo < hi <= 1 */
  int mix_pairs;           /* MoCHi s: mixes of two hard negatives per query */
  int mix_query;           /* MoCHi s': mixes of the query with a hard negative per query */
  int bank_size;           /* adversarial: M bank rows (columns of S) */
  float hcl_beta;          /* HCL beta at hardness 1, handed back to the step */
  /* False-negative guards (entries with the query's own sample id are always excluded). */
  mine_ceiling ceiling;
  float ceiling_value;     /* absolute ceiling */
  float ceiling_delta;     /* relative ceiling: s_pos - delta */
  float skip_hardest;      /* epsilon: the top epsilon fraction of the hardest candidates are suspects */
  int suspects_as_positives; /* 1: suspects become MINE_POS; 0: dropped (MINE_OFF) */
  int supervised;          /* 1: candidates with the query's label are never negatives (needs labels) */
} mine_config;

/* The values are the config's (contrast.negatives.*, contrast.guards.*, contrast.hcl_beta); their
 * defaults and ranges live in the schema (src/service/config.c). */
extern const enum_name mine_strategy_names[]; /* "all", "random", "hardest", "semi-hard", "band", ... */
extern const enum_name mine_ceiling_names[];  /* "none", "absolute", "relative" */

/* Where each candidate source lives in the columns of S and mask (row stride = cols). */
typedef struct {
  int queue_size;            /* K: columns [0, K) are queue slots */
  int batch_off, batch_size; /* in-batch keys: B columns, 0 when disabled */
  int bank_off, bank_size;   /* adversarial bank: M columns, 0 unless adversarial */
  int synth_off, synth_size; /* synthetic negatives: X = mix_pairs + mix_query per row, 0 unless mixing */
  int cols;                  /* C = K + B + M + X */
} mine_layout;

void mine_layout_init(mine_layout *l, const mine_config *c, int queue_size, int batch_size);

/* Whether the strategy uses n columns of a row whatever its width (random, hardest, semi-hard,
 * band), so that a step can run its loss on each row's used columns (contrast/packed.h); mixing and
 * AdCo use every candidate, or all of a bank. */
int mine_selects_few(const mine_config *c);

/* A synthetic negative as a recipe over real columns, so it costs 16 bytes instead of d floats:
 * point = wa * key(a) + wb * key(b), unit norm, where key(c) is the key of column c and a == -1 means
 * the query itself (a query mix). wa, wb include the normalisation. MoCHi stops the gradient at the
 * synthetic points: they are constants in the loss, so dL/dq = dS * point. */
typedef struct {
  int32_t a, b;
  float wa, wb;
} mine_synth;

/* What the step knows about this batch. */
typedef struct {
  int batch_size;              /* B queries, <= max_batch */
  const float *s_pos;          /* [B] each query's similarity to its own key */
  float hardness;              /* [0, 1], from the curriculum or the controller */
  int warmup;                  /* 1 during a warm-up: random negatives, n = num_negatives, no synthetic
                                  ones (adversarial ignores it) */
  int queue_filled;            /* valid queue slots are [0, queue_filled) (queue.filled) */
  const int64_t *queue_ids;    /* [K] sample id per slot, -1 unknown; NULL when none are known */
  const int32_t *queue_labels; /* [K] label per slot, -1 none; NULL when the data has none */
  const int64_t *ids;          /* [B] sample ids of the batch (queries and in-batch keys); NULL: none
                                  (the query's own in-batch column is excluded regardless) */
  const int32_t *labels;       /* [B] labels of the batch or NULL */
  int64_t row_offset;          /* index of row 0 in the world's batch (core/dist.h; 0 in one process):
                                  row i's draws come from stream row_offset + i, so a world of N mines
                                  the very rows one process would */
  /* mixing only (else NULL): the vectors behind the columns, L2-normalised rows */
  int dim;
  const float *q;              /* [B, d] queries */
  const float *queue_keys;     /* [K, d] */
  const float *batch_keys;     /* [B, d] */
} mine_input;

/* Diagnostics of one mine_select. Label figures count only rows and candidates whose labels are known;
 * they are diagnostics and never change the selection unless `supervised` is set. */
typedef struct {
  float hardness;            /* as used (0 during warm-up) */
  int knob_n;                /* largest n(h) or N(h) over rows, clipped to the candidates there; 0 when the
                                strategy has no count (all, band, adversarial) */
  float band_lo, band_hi;    /* band window used */
  float hcl_beta;            /* beta(h) for an HCL loss */
  double negatives_per_query;/* mean number of MINE_NEG columns per row (synthetic included) */
  long filtered;             /* candidates removed as suspected false negatives (ceiling, epsilon,
                                supervised), including those turned into positives */
  long extra_positives;      /* of which marked MINE_POS */
  long same_id;              /* candidates excluded for carrying the query's own sample id */
  float neg_sim_mean;        /* mean similarity over all selected negatives */
  float hardest_sim_mean;    /* mean over rows of the row's hardest selected negative */
  float hardest_sim_max;     /* the hardest selected negative of the step */
  float instance_accuracy;   /* share of rows whose s_pos exceeds every selected negative */
  long label_known;          /* selected negatives (real columns) where both they and their query have a label */
  long label_same;           /* of which share the query's label */
} mine_stats;

/* One part's workspace. mine_select splits its rows over the compute team (core/par.h), each part
 * with a workspace of its own; a row's random draws come from a stream of its own, and the statistics
 * are summed in row order, so the result does not depend on how many threads ran it. Each array has
 * a vector's worth of slack past max_cols: the gathers store whole vectors. */
typedef struct {
  float *vals;       /* [max_cols] a row's gathered similarities */
  float *tmp;        /* [max_cols] scratch copy for k-th element selection */
  float *part;       /* [max_cols + KSELECT_SLACK] the selection's partition scratch */
  int32_t *idx;      /* [max_cols] a row's gathered or selected columns (mixing: its hard pool) */
  int32_t *bidx;     /* [max_cols] a row's columns inside a rank bracket */
} mine_ws;

struct mine_row; /* a row's results, private to mine.c */

typedef struct {
  const mine_config *cfg; /* the owner's (moco_model.cfg.mine), read at every call: `set` patches one copy */
  int max_batch, max_queue, dim;
  int max_cols;      /* largest layout.cols accepted */
  /* workspaces, sized at init */
  mine_ws *ws;       /* [n_ws] one per thread of the team at init */
  int n_ws;
  struct mine_row *rows; /* [max_batch] */
  int32_t *hash;     /* [hash_cap] sample id -> first batch row holding it, open addressing */
  int32_t *chain;    /* [max_batch] next batch row with the same id, -1 at the end */
  int32_t *qhead;    /* [max_batch] first queue slot carrying the id of this (first) row, -1 none */
  int32_t *qnext;    /* [max_queue] next queue slot with the same id, -1 at the end */
  int hash_cap;      /* power of two >= 2 * max_batch */
  mine_synth *synth; /* [max_batch, X] recipes of the last select (mixing) */
} mine;

/* Allocates workspaces for batches up to max_batch, queues up to max_queue slots and keys of dimension
 * dim (dim only matters for mixing), one per thread of the compute team as it is now: set the team's
 * size (par_set_threads) first. */
int mine_init(mine *m, const mine_config *cfg, int max_batch, int max_queue, int dim); /* keeps cfg */
void mine_free(mine *m);

/* Writes mask [B, l->cols] and, for mixing, the synthetic columns of S [B, l->cols]; the other
 * columns of S are only read. Candidates are the valid queue slots [0, queue_filled) and the in-batch
 * keys other than the query's own, minus entries with the query's sample id and, by the guards,
 * suspected false negatives; the strategy picks among them. Bank columns (adversarial) are all
 * negatives, outside the guards. Fills st when it is not NULL. Errors: MOCO_ESHAPE for a batch or
 * layout beyond the init sizes or not matching the config, MOCO_ERANGE for queue_filled or hardness
 * out of range, MOCO_EINVAL for missing inputs (supervised without labels, mixing without vectors). */
int mine_select(mine *m, const mine_layout *l, const mine_input *in, float *S, uint8_t *mask,
                rng_t *rng, mine_stats *st);

/* The synthetic point of (row, x) of the last mine_select, materialised into out [d]. */
void mine_synth_point(const mine *m, const mine_layout *l, const mine_input *in, int row, int x,
                      float *out);

/* Backward through the synthetic columns with the points held constant (MoCHi): adds each synthetic
 * column's dS, times its weights, onto the dS of the real columns it was mixed from, and returns in
 * dself [B] the coefficient of each query's own vector (the step adds dself[i] * q_i to dq[i]).
 * After this, dq = dS[:, real columns] . keys + dpos * k + dself * q holds the synthetic part too. */
void mine_synth_fold(const mine *m, const mine_layout *l, int batch_size, float *dS, float *dself);

/* HCL beta at this hardness (hardness * hcl_beta). */
float mine_hcl_beta(const mine_config *c, float hardness);

#endif
