/* Layers as plain function pairs, llm.c style: `x_forward` computes the output and whatever backward
 * needs; `x_backward` WRITES the input gradient (when its pointer is not NULL) and ADDS the parameter
 * gradients, so a caller zeroes gradients once per step and several backward passes accumulate.
 * Shapes are row-major, batch first: B samples of C channels of S = H*W pixels are [B, C, S]; a batch of
 * vectors is [B, C] (S = 1). No function allocates: callers pass saved state and workspaces sized with
 * the *_len helpers below. */
#ifndef MOCO_CORE_LAYERS_H
#define MOCO_CORE_LAYERS_H

#include <stddef.h>
#include <stdint.h>

/* ---- Linear: out = inp · weight^T + bias ------------------------------------------------------- */
/* out [B, OC], inp [B, C], weight [OC, C], bias [OC] or NULL */
void linear_forward(float *out, const float *inp, const float *weight, const float *bias, int B,
                    int C, int OC);
/* dinp [B, C] or NULL, dweight [OC, C] (+=), dbias [OC] or NULL (+=), dout [B, OC], inp [B, C] */
void linear_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                     const float *weight, int B, int C, int OC);

/* ---- ReLU ------------------------------------------------------------------------------------- */
/* out, inp [N] (out may equal inp) */
void relu_forward(float *out, const float *inp, size_t N);
/* dinp, dout, out [N]: the gradient passes where the forward output was positive (dinp may equal dout) */
void relu_backward(float *dinp, const float *dout, const float *out, size_t N);

/* ---- BatchNorm (Ioffe & Szegedy 2015) ---------------------------------------------------------------
 * Per channel c: y = gamma[c] * (x - mean[c]) * rstd[c] + beta[c], rstd = 1/sqrt(var + eps).
 * Training: mean and (biased) var over the samples of each of G groups of consecutive samples (split BN;
 * group g holds samples [g*B/G, (g+1)*B/G)), times the S pixels. The running statistics move towards the
 * groups' average with PyTorch's convention, r = (1 - momentum) * r + momentum * batch_value, using the
 * unbiased variance. Eval (training = 0): the running statistics, G is ignored.
 *
 * Synchronised BatchNorm (sync != NULL, training, one group): the statistics are those of the samples
 * of every rank of the world (core/dist.h), as if one process held the whole batch; the forward sums
 * per channel and the backward's sums of dy and dy·(x − mean) are summed across ranks. dgamma and dbeta
 * stay this rank's own part (the gradient all-reduce sums them). sync is 2 C doubles of workspace.
 *
 * BatchNorm + ReLU fused (relu = 1): the forward writes max(y, 0) in the same pass as y, and the backward
 * takes dout as the gradient at the ReLU's output and folds the ReLU's mask (where that output is
 * positive) into its own sums and dx, so the ReLU's passes over memory and its buffers are saved.
 * Results equal batchnorm_forward + relu_forward and relu_backward + batchnorm_backward bit for bit. */
typedef struct {
  int B, C, S; /* samples, channels, pixels per channel (1 for vectors) */
  int G; /* statistics groups, 1 <= G <= B (clamped) */
  float momentum, eps;
  int training;
  double *sync; /* NULL: this process's samples only */
  int relu;     /* 1: a ReLU fused after the affine map (below) */
} bn_dims;

/* Length of the saved state (mean and rstd per group and channel) for batches up to max_batch. */
size_t batchnorm_saved_len(int C, int max_batch);
/* out, inp [B, C, S]; gamma, beta, running_mean, running_var [C]; saved [batchnorm_saved_len] */
void batchnorm_forward(float *out, float *saved, float *running_mean, float *running_var,
                       const float *inp, const float *gamma, const float *beta, const bn_dims *d);
/* dinp [B, C, S] or NULL, dgamma, dbeta [C] (+=), ws [2 * C] workspace; dout, inp [B, C, S]; out
 * [B, C, S] the forward's output (read only with d->relu, may be NULL without); saved as left by the
 * forward with the same dims. */
void batchnorm_backward(float *dinp, float *dgamma, float *dbeta, float *ws, const float *dout,
                        const float *inp, const float *gamma, const float *out, const float *saved,
                        const bn_dims *d);

/* ---- Conv2d and MaxPool2d geometry -------------------------------------------------------------- */
typedef struct {
  int C, H, W; /* input channels and size */
  int K, stride, pad; /* square kernel */
  int OH, OW; /* output size: (H + 2 pad - K) / stride + 1 */
} conv_geom;

/* Fills OH and OW; returns 0, or -1 when the kernel does not fit in the padded input. */
int conv_geom_init(conv_geom *g, int C, int H, int W, int K, int stride, int pad);

/* ---- Conv2d: im2col + one sgemm per chunk of samples -------------------------------------------------
 * Columns of several samples are laid side by side so that one sgemm covers `chunk` samples; small
 * feature maps (7x7 = 49 columns) would otherwise starve the gemm. */
/* Samples per sgemm for this geometry (aims at a few thousand columns). */
int conv2d_chunk(const conv_geom *g, int OC, int max_batch);
/* Workspace floats forward and backward need for that chunk, split into `parts` near-equal shares of
 * the samples that the compute team (core/par.h) does side by side, each in near-equal chunks of at
 * most `chunk`. The output does not depend on `parts`; the weight gradients differ by float rounding
 * only (each part sums its own chunks). */
size_t conv2d_workspace_len(const conv_geom *g, int OC, int chunk, int parts);
/* out [B, OC, OH, OW], inp [B, C, H, W], weight [OC, C, K, K], bias [OC] or NULL */
void conv2d_forward(float *out, float *ws, const float *inp, const float *weight, const float *bias,
                    int B, int OC, const conv_geom *g, int chunk, int parts);
/* dinp [B, C, H, W] or NULL, dweight [OC, C, K, K] (+=), dbias [OC] or NULL (+=), dout [B, OC, OH, OW] */
void conv2d_backward(float *dinp, float *dweight, float *dbias, float *ws, const float *dout,
                     const float *inp, const float *weight, int B, int OC, const conv_geom *g,
                     int chunk, int parts);

/* ---- MaxPool2d (implicit -inf padding, as PyTorch) ----------------------------------------------
 * Comparisons are strict `>`, so the first maximum of a window wins; the forward stores each winner's
 * offset in its input plane and backward sends the window's gradient there. A NaN propagates only where
 * it is the first element of its window (as in most SIMD max kernels); a non-finite loss is the
 * trainer's to catch. */
/* out, idx [B, C, OH, OW], inp [B, C, H, W] */
void maxpool_forward(float *out, int32_t *idx, const float *inp, int B, const conv_geom *g);
/* dinp [B, C, H, W] (written), dout [B, C, OH, OW], idx as the forward left it */
void maxpool_backward(float *dinp, const float *dout, const int32_t *idx, int B, const conv_geom *g);

/* ---- Global average pool: (C, H, W) -> (C) ------------------------------------------------------- */
/* out [B, C], inp [B, C, S] */
void avgpool_forward(float *out, const float *inp, int B, int C, int S);
/* dinp [B, C, S], dout [B, C] */
void avgpool_backward(float *dinp, const float *dout, int B, int C, int S);

/* ---- Flatten: (C, H, W) -> (C*H*W); the memory layout is already flat ---------------------------- */
/* out, inp [N] */
void flatten_forward(float *out, const float *inp, size_t N);
void flatten_backward(float *dinp, const float *dout, size_t N);

/* ---- Row-wise L2 normalisation: y = x / max(||x||, L2NORM_EPS), as torch.nn.functional.normalize ---- */
#define L2NORM_EPS 1e-12f
/* out, inp [B, D], norm [B] (saved for backward) */
void l2norm_forward(float *out, float *norm, const float *inp, int B, int D);
/* dinp, dout, out [B, D]; exact: dx = (dy - y (y · dy)) / ||x|| (dx = dy / eps below the clamp) */
void l2norm_backward(float *dinp, const float *dout, const float *out, const float *norm, int B,
                     int D);

#endif
