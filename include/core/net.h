/* A network: an ordered list of layers built from a JSON spec, llm.c style.
 *
 *   [{"type":"conv2d","out":32,"kernel":3,"stride":1,"pad":1}, {"type":"batchnorm"}, {"type":"relu"},
 *    {"type":"maxpool","kernel":2}, {"type":"flatten"}, {"type":"linear","out":128}, {"type":"l2norm"}]
 *
 * Shapes are per sample, (C, H, W); a vector of D features is (D, 1, 1). Batches are row-major
 * [B, C, H, W]. All parameters live in one arena (`params`), their gradients in a mirror arena (`grads`),
 * BatchNorm running statistics in a third (`buffers`): a momentum encoder, an optimizer and a checkpoint
 * each treat a model as flat vectors. Activations are allocated once for `max_batch` samples at build
 * time; forward and backward allocate nothing. */
#ifndef MOCO_CORE_NET_H
#define MOCO_CORE_NET_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "core/blob.h"
#include "core/rng.h"

typedef struct {
  int c, h, w;
} net_shape;

static inline size_t net_shape_size(net_shape s) { return (size_t)s.c * s.h * s.w; }

typedef enum {
  LAYER_LINEAR,
  LAYER_BATCHNORM, /* BatchNorm1d on vectors; per-channel (BatchNorm2d) on images */
  LAYER_RELU,
  LAYER_CONV2D,
  LAYER_MAXPOOL,
  LAYER_AVGPOOL, /* global average pool: (C,H,W) -> (C,1,1) */
  LAYER_FLATTEN,
  LAYER_L2NORM,
} layer_kind;

/* A contiguous run of the parameter arena that is one tensor (a weight or a bias). The optimizer uses
 * it for per-tensor decisions: weight decay is off for biases and BatchNorm parameters by default
 * (`no_decay`), and LARS computes its trust ratio per segment. */
typedef struct {
  size_t off, len;
  int layer;
  int no_decay;
} net_segment;

typedef struct {
  layer_kind kind;
  net_shape in_shape, out_shape; /* per sample */
  /* hyperparameters */
  int out_features;    /* linear, conv2d (output channels) */
  int bias;            /* linear, conv2d */
  int kernel, stride, pad; /* conv2d, maxpool */
  float bn_momentum, bn_eps;
  /* parameter slices in net.params / net.grads, buffer slices in net.buffers */
  size_t w_off, w_len, b_off, b_len;
  size_t buf_off, buf_len;
  int chunk;               /* conv2d: samples per sgemm (see conv2d_chunk) */
  int parts;               /* conv2d: runs of chunks done side by side, par_threads() at build */
  int fused_relu;          /* batchnorm followed by a relu: the relu runs inside it (bn_dims.relu) and
                              writes the relu's output; this layer's own output is left unwritten */
  /* activation storage, sized for max_batch */
  float *out;   /* [B, out] */
  float *saved; /* per-layer state for backward: BN mean/rstd per group, row norms */
  size_t saved_len;
} layer;

typedef struct {
  int n_layers;
  layer *layers;
  net_shape in_shape, out_shape;
  int max_batch;
  int training;  /* 1: BatchNorm uses batch statistics and updates running ones; 0: running ones */
  int bn_groups; /* BatchNorm statistics per group of B/bn_groups consecutive samples (split BN, to
                    simulate MoCo's shuffled BN on one device); 1 = whole batch */
  int sync_bn;   /* 1: in training, BatchNorm statistics over every rank's batch (SyncBN, core/dist.h);
                    needs bn_groups 1 */
  float *params, *grads;
  size_t n_params;
  float *buffers;
  size_t n_buffers;
  net_segment *segments;
  int n_segments;
  float *scratch;    /* workspace (im2col, ping-pong gradients), sized at build */
  size_t scratch_len;
  uint64_t arch_hash; /* hash of layer kinds, structural hyperparameters and shapes: guards net_load */
  double *prof; /* NULL, or [2 n_layers] seconds each layer took in forward (2i) and backward (2i + 1),
                   added to by every pass: the caller's, for benchmarks that split a step by layer */
  /* internal: the arena behind input/out/saved, the last forward's input copy and batch size, the two
   * gradient buffers backward alternates between (slices of scratch) */
  float *act;
  float *input;
  double *bn_sync; /* SyncBN's per-channel sums, 2 x the widest BatchNorm */
  float *gbuf[2];
  int last_batch;
} net;

/* Builds `n` from a JSON array of layer objects for inputs of shape `in`, batches up to max_batch.
 * Layer keys: "type" (linear | batchnorm | relu | conv2d | maxpool | avgpool | flatten | l2norm),
 * "out" (linear, conv2d), "bias" (default true), "kernel" (conv2d, maxpool), "stride" (conv2d default 1,
 * maxpool default = kernel), "pad" (default 0), "momentum" (batchnorm, default 0.1, PyTorch's
 * convention), "eps" (default 1e-5). Other keys are errors. An empty array is the identity.
 * `path` names the array in error messages ("model.backbone"): a bad spec fails with MOCO_ECONFIG
 * ("model.backbone[2].out: missing field", "...: must be >= 1, got 0", unknown type or key), MOCO_ESHAPE
 * ("model.backbone[4]: linear expects a vector input, got 32x14x14 (add flatten)", a kernel that does
 * not fit) or MOCO_ERANGE (sizes beyond 2^20 per dimension). Starts in training mode, bn_groups 1.
 * Parameters are left zero; call net_init. On failure nothing is left allocated. */
int net_build(net *n, const json_t *spec, net_shape in, int max_batch, const char *path);
/* A second network with the same architecture and a copy of the parameters and buffers (the key
 * encoder is made this way). */
int net_clone(net *dst, const net *src);
void net_free(net *n);

/* PyTorch-style defaults: Kaiming-uniform weights (a = sqrt(5)), biases U(-1/sqrt(fan_in), ..),
 * BatchNorm gamma 1, beta 0, running mean 0, running var 1. */
void net_init(net *n, rng_t *r);

/* x: [B, in], 1 <= B <= max_batch. Returns the output [B, out] (owned by the network, valid until the
 * next forward), or NULL with MOCO_ERANGE recorded when B is out of range. Keeps what backward needs,
 * including a copy of x, so the caller may reuse x at once. */
const float *net_forward(net *n, const float *x, int B);
/* The output of layer i of the last forward, [B, layers[i].out]. A BatchNorm followed by a ReLU runs
 * the ReLU in its own pass and writes only the ReLU's output: call net_keep_output(n, i) after the
 * build (before net_clone) for such a layer i whose output is read. */
const float *net_layer_output(const net *n, int i);
/* Keeps layer i's output: unfuses a BatchNorm from the ReLU after it (no-op for other layers). */
void net_keep_output(net *n, int i);
/* dout: [B, out] gradient of the loss w.r.t. the last forward's output. ADDS parameter gradients into
 * `grads` (call net_zero_grad first); writes the input gradient into dx [B, in] when dx is not NULL
 * (the first layer's input gradient is skipped otherwise). Returns 0, or MOCO_ESTATE when B is not the
 * batch size of the last forward. */
int net_backward(net *n, const float *dout, float *dx, int B);
void net_zero_grad(net *n);

size_t net_num_params(const net *n);
/* The spec's name of a layer kind ("conv2d"), "?" for none. */
const char *net_kind_name(layer_kind k);
/* Multiply-adds x 2 of the matrix products (linear, conv2d) of one sample's forward pass; the
 * elementwise layers are not counted. */
double net_flops_per_sample(const net *n);

/* One line for logs: each layer with its hyperparameters and output shape, e.g.
 *   "1x28x28 | conv2d 32 k3 s1 p1 -> 32x28x28 | batchnorm | relu | maxpool k2 s2 -> 32x14x14 | ..."
 * (shapes only where they change). Truncated to fit cap; returns the length it needed. */
size_t net_describe(const net *n, char *buf, size_t cap);

/* Parameters and buffers as one blob section ("NETW") that records the architecture hash; loading into
 * a network of another architecture fails with MOCO_ESHAPE and says what differs. */
void net_save(const net *n, blob_writer *w);
int net_load(net *n, blob_reader *r);

#endif
