/* Contrastive losses on the negative-selection contract (brief, "Shared contracts"):
 *
 *   S      [B, C]  similarity of each query to each candidate column (cosine: rows are L2-normalised)
 *   mask   [B, C]  per entry MINE_OFF = 0 (not used), MINE_NEG = 1 (a negative), MINE_POS = 2 (an extra
 *                  positive: a suspected false negative kept as a positive)
 *   s_pos  [B]     each query's similarity to its own key
 *
 * Each loss returns the mean over the B rows. Its gradient is dS [B, C] (exactly 0 where OFF) and
 * dpos [B], w.r.t. S and s_pos. A row in which every candidate is OFF is well defined: its loss is 0 and
 * its gradient 0 for every loss here (the softmax over the positive alone is 1; HCL's negative term and
 * the triplet hinge have nothing to sum), and it still counts in the mean over B.
 *
 * Pairs: `loss_x_forward` returns the loss; `loss_x_backward` writes the gradient and returns the same
 * loss. A loss ends the graph, so its backward needs only its own row statistics: it recomputes them in
 * one pass over each row (in cache) instead of keeping [B, C] intermediates, and a training step calls
 * only the backward. Arithmetic: similarities and exponentials in float (one vectorisable exp per entry),
 * row sums in double, exponentials always of (logit − row max) so nothing overflows for any τ > 0. */
#ifndef MOCO_CONTRAST_LOSS_H
#define MOCO_CONTRAST_LOSS_H

#include <stddef.h>
#include <stdint.h>

#include "core/enum.h"

typedef enum {
  LOSS_INFONCE, /* MoCo's InfoNCE, multi-positive when the mask holds MINE_POS entries */
  LOSS_HCL,     /* Robinson et al. 2021 hard-negative loss; hcl_beta = 0 is DCL (Chuang et al. 2020) */
  LOSS_TRIPLET, /* margin loss on cosine distance */
  LOSS_NTXENT,  /* SimCLR's symmetric loss over 2B views (loss_ntxent_*; not an (S, mask) loss) */
} loss_kind;

typedef enum {
  TRIPLET_HARDEST, /* per row, the most similar selected negative (batch-hard, Hermans et al. 2017) */
  TRIPLET_MEAN,    /* per row, the mean of the hinge over every selected negative */
} triplet_negative;

typedef struct {
  loss_kind loss;
  float temperature;  /* τ > 0 */
  float tau_plus;     /* τ⁺ in [0, 1): HCL/DCL class prior; 0 = no debiasing */
  float margin;       /* triplet margin on cosine distance, >= 0 */
  triplet_negative triplet_negative;
} loss_config;

/* The values are the config's (contrast.loss, contrast.temperature, ...; src/service/config.c holds
 * their defaults and ranges). HCL's β is not here: it is the hardness knob of the HCL loss, set per step
 * from mine_config.hcl_beta and the hardness (mine_hcl_beta), and passed to the functions below
 * explicitly. */
extern const enum_name loss_kind_names[];        /* "infonce", "hcl", "triplet", "ntxent" */
extern const enum_name triplet_negative_names[]; /* "hardest", "mean" */

/* InfoNCE (Oord et al. 2018; MoCo eq. 1) with temperature τ. Row i's positive set P is its own key
 * plus the MINE_POS columns; the used set is P plus the MINE_NEG columns, and
 *     L_i = −log( Σ_{p∈P} exp(s_p/τ) / Σ_{j∈used} exp(s_j/τ) )
 * — the "sum inside the log" multi-positive form (Khosla et al. 2020's L_in without its constant
 * 1/|P|), which is plain InfoNCE when there are no MINE_POS entries and lets a kept false negative
 * pull instead of push.
 * S, mask: [B, C]; s_pos, dpos: [B]; dS: [B, C]. */
double loss_infonce_forward(const float *S, const uint8_t *mask, const float *s_pos, int B, int C,
                            float tau);
double loss_infonce_backward(float *dS, float *dpos, const float *S, const uint8_t *mask,
                             const float *s_pos, int B, int C, float tau);

/* HCL (Robinson et al. 2021, eq. 5 and their reference code joshr17/HCL). With e_j = exp(s_j/τ),
 * importance weights w_j = exp(β·s_j/τ) over the N MINE_NEG columns,
 *     R   = N · Σ_j w_j e_j / Σ_j w_j                      (reweighted negative mass)
 *     P̄   = Σ_p v_p e_p / Σ_p v_p, v_p = exp(β·s_p/τ)     (positive estimate over the positive set P)
 *     Ng  = max( (R − τ⁺·N·P̄) / (1 − τ⁺),  N·e^{−1/τ} )   (debiased, with the paper's lower clamp)
 *     L_i = −log( e_pos / (e_pos + Ng) )
 * Gradients flow through the importance weights, as in the reference code (which does not detach
 * `imp`); the clamp passes gradient where its input is >= the bound (torch.clamp's convention) and none
 * below. MINE_POS columns join the positive estimate P̄ (DCL's estimator with M positives, Chuang et al.
 * 2020 eq. 6; with one positive P̄ = e_pos as in the reference code), not the numerator; with τ⁺ = 0
 * they have no effect. β = 0 gives DCL, τ⁺ = 0 reweighting alone. */
double loss_hcl_forward(const float *S, const uint8_t *mask, const float *s_pos, int B, int C,
                        float tau, float beta, float tau_plus);
double loss_hcl_backward(float *dS, float *dpos, const float *S, const uint8_t *mask,
                         const float *s_pos, int B, int C, float tau, float beta, float tau_plus);

/* Triplet margin loss on cosine distance d = 1 − s (Schroff et al. 2015), anchor = query, positive =
 * its own key: per selected negative n, max(0, d(a,p) − d(a,n) + margin) = max(0, s_n − s_pos + margin).
 * TRIPLET_HARDEST takes the most similar MINE_NEG column of the row (first on ties); TRIPLET_MEAN the
 * mean of the hinge over all MINE_NEG columns (inactive ones count as 0). MINE_POS columns take no
 * part: a suspected false negative kept as a positive is simply not pushed away. */
double loss_triplet_forward(const float *S, const uint8_t *mask, const float *s_pos, int B, int C,
                            float margin, triplet_negative mode);
double loss_triplet_backward(float *dS, float *dpos, const float *S, const uint8_t *mask,
                             const float *s_pos, int B, int C, float margin, triplet_negative mode);

/* Dispatch on c->loss for the three (S, mask) losses above, with HCL's β (ignored by the others).
 * c->loss must not be LOSS_NTXENT. */
double loss_forward(const loss_config *c, float beta, const float *S, const uint8_t *mask,
                    const float *s_pos, int B, int C);
double loss_backward(const loss_config *c, float beta, float *dS, float *dpos, const float *S,
                     const uint8_t *mask, const float *s_pos, int B, int C);

/* NT-Xent (Chen et al. 2020, SimCLR eq. 1) over 2B views Z [2B, d]: rows i and i + B are the two views
 * of sample i; each row's positive is its partner, its negatives the other 2B − 2 rows plus, when
 * K > 0, the K rows of `negatives` [K, d] (e.g. the queue's valid prefix; no gradient flows to them).
 * L = mean over the 2B rows of −log( exp(z_i·z_p/τ) / Σ_{k≠i} exp(z_i·z_k/τ) ). dZ: [2B, d].
 * `work` holds loss_ntxent_work_len(B, K) floats (similarities and their mask); nothing is allocated. */
size_t loss_ntxent_work_len(int B, int K);
double loss_ntxent_forward(const float *Z, int B, int d, const float *negatives, int K, float tau,
                           float *work);
double loss_ntxent_backward(float *dZ, const float *Z, int B, int d, const float *negatives, int K,
                            float tau, float *work);

/* The NT-Xent problem of the last loss_ntxent_* call on `work`, in the contract's form: 2B rows,
 * 2B + K columns (the other views, then the negatives), each row's partner as s_pos and masked off
 * with the row itself. For diagnostics. */
typedef struct {
  const float *S;
  const uint8_t *mask;
  const float *s_pos;
  int rows, cols;
} loss_view;
loss_view loss_ntxent_view(const float *work, int B, int K);

#endif
