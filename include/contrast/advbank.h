/* AdCo's adversarial negatives (Hu et al. 2021, "AdCo: Adversarial Contrast for Efficient Learning of
 * Unsupervised Representations"): a bank of M learnable unit vectors used as the negatives of every
 * query (the bank columns of the mining layout, mine.h). While the encoder descends the contrastive
 * loss, the bank ASCENDS the same loss, computed at the bank's own temperature, so its rows chase the
 * queries and stay hard:
 *     G = dL/dW = dS_bank^T . Q                       (S_bank = Q . W^T)
 *     G_m <- G_m - (G_m . w_m) w_m                    (the gradient through w/|w| at |w| = 1)
 *     v <- momentum * v + G - weight_decay * W ;  W <- normalise_rows(W + lr * v)
 * The step computes dS_bank with its loss at `temperature` (the bank's, not the encoder's). */
#ifndef MOCO_CONTRAST_ADVBANK_H
#define MOCO_CONTRAST_ADVBANK_H

#include "core/blob.h"
#include "core/rng.h"

typedef struct {
  float lr;           /* AdCo: 3 (ImageNet) */
  float temperature;  /* the bank's temperature in its loss (AdCo: 0.02, the encoder's 0.12) */
  float momentum;     /* AdCo: 0.9 */
  float weight_decay; /* AdCo: 5e-4 */
  int init_from_queue;/* 1: advbank_seed from queue keys when the queue is full; 0: random vectors */
} advbank_config;

typedef struct {
  const advbank_config *cfg; /* the owner's, read at every update (advbank_init keeps the pointer) */
  int size, dim;
  float *w; /* [M, d] unit rows */
  float *v; /* [M, d] velocity */
  float *g; /* [M, d] gradient workspace */
  float *ds; /* [max_batch, M] contiguous copy of a strided dS_bank, for mat_mul */
  int max_batch;
} advbank;

/* Allocates a bank of `size` rows (mine_config.bank_size, the columns of S it fills) for batches up to
 * max_batch and fills it with random unit vectors (Gaussian rows, normalised). The settings' defaults and
 * ranges are the config's (contrast.adversarial.*, src/service/config.c). */
int advbank_init(advbank *b, const advbank_config *c, int size, int dim, int max_batch, rng_t *r);
void advbank_free(advbank *b);
/* Rows from keys [n, d] (e.g. the queue's valid keys), drawn without replacement while they last
 * (with replacement beyond), normalised; the velocity is reset. n >= 1. */
void advbank_seed(advbank *b, const float *keys, int n, rng_t *r);

/* G = dS_bank^T . Q, the gradient of the loss w.r.t. the bank rows, into b->g [M, d].
 * dS_bank: [B, M] with row stride ld >= M (e.g. &dS[layout.bank_off], ld = layout.cols); Q: [B, d];
 * B <= max_batch. */
int advbank_grad(advbank *b, const float *dS_bank, int ld, const float *Q, int B);
/* One ascent step (the formula above) from dS_bank and Q; allocates nothing. */
int advbank_update(advbank *b, const float *dS_bank, int ld, const float *Q, int B);

/* One blob section "ADVB": M, d, bank rows and velocity. A bank of another size fails (MOCO_ESHAPE). */
void advbank_save(const advbank *b, blob_writer *w);
int advbank_load(advbank *b, blob_reader *r);

#endif
