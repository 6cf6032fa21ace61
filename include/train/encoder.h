/* A trained encoder outside the training loop: one network (the query or the key encoder), the layer
 * list it was built from, where its backbone ends, and the input normalisation it was trained with.
 * Loaded from a checkpoint without the data set or a daemon, written as safetensors for PyTorch and
 * other frameworks, and run over any data set mocod reads to embed it.
 *
 * safetensors (https://github.com/huggingface/safetensors): u64 LE header length N | N bytes of JSON
 * (padded with spaces to a multiple of 8) | the tensors' bytes, back to back. Tensors, all F32, named
 * for the layer's index i in the encoder's layer list (backbone, head, linear(embed_dim), l2norm), the
 * keys of a torch nn.Sequential under `layers`:
 *     layers.i.weight  linear [out, in], conv2d [out, in, k, k], batchnorm [C] (gamma)
 *     layers.i.bias    linear, conv2d [out]; batchnorm [C] (beta)
 *     layers.i.running_mean, layers.i.running_var   batchnorm [C]
 * __metadata__ (strings, as the format requires): format "mocod-encoder", format_version "1",
 * encoder "query"|"key", step, input_shape "[C, H, W]", input "u8" (pixels / 255 first) or "f32",
 * mean / std (JSON lists, per channel, "[]" when inputs are not normalised), backbone_layers (the
 * features are the output of layer backbone_layers - 1), embed_dim, feature_dim, and layers: the
 * resolved layer list as JSON, one object per layer with type, its hyperparameters (out, kernel,
 * stride, pad, bias, eps) and in_shape / out_shape. scripts/load_encoder.py rebuilds the PyTorch module
 * from that. */
#ifndef MOCO_TRAIN_ENCODER_H
#define MOCO_TRAIN_ENCODER_H

#include <jansson.h>
#include <stdint.h>

#include "core/blob.h"
#include "core/net.h"
#include "data/record.h"
#include "train/trainer.h"

typedef struct {
  net *net;          /* the network (own when loaded from a checkpoint, else borrowed) */
  net own;
  int backbone_len;  /* layers of the backbone: features are layer backbone_len - 1's output */
  int norm_len;      /* 0 (no normalisation) or in.c values in mean, std */
  float *mean, *std;
  data_dtype input;  /* what the data held: u8 pixels are divided by 255 before normalising */
  trainer_encoder which;
  int64_t step;
} encoder;

/* The trainer's input record, a checkpoint section "NORM": the input shape and dtype, and the
 * per-channel mean and std the loader normalises with (norm_len 0: none). */
void encoder_input_save(blob_writer *w, net_shape in, data_dtype input, int norm_len, const float *mean,
                        const float *std);
/* Reads it back (r at the section). mean, std: malloc'd, norm_len values (NULL when 0). */
int encoder_input_load(blob_reader *r, net_shape *in, data_dtype *input, int *norm_len, float **mean,
                       float **std);

/* Builds `which` from a checkpoint body (checkpoint.h, positioned at the first trainer section): the
 * layers from tc (model.backbone, model.head, model.embed_dim), the input and normalisation from its
 * NORM section, the weights from the query's or the key's NETW section. For batches up to max_batch,
 * in inference mode (BatchNorm on running statistics). */
int encoder_load(encoder *e, const trainer_config *tc, const blob_reader *body, int64_t step,
                 trainer_encoder which, int max_batch);
void encoder_free(encoder *e);

/* Writes the encoder as safetensors at path, atomically (temporary file, fsync, rename). *bytes (when
 * not NULL) receives the file size. */
int encoder_write_safetensors(const encoder *e, const char *path, int64_t *bytes);

/* Embeds every record of the data set `data` (paths or globs, any format mocod reads; `labels` as
 * data.train_labels, may be NULL) in file order, chunk samples at a time: the backbone features or,
 * with embeddings set, the L2-normalised embeddings, streamed into `out` as a float32 .npy file
 * [n, dim], with the labels (when the data has them) and ids beside it (eval.h's naming: X.labels.npy,
 * X.ids.npy). All three are written atomically. bad_skip: skip and count bad records instead of
 * stopping. progress (may be NULL) is called after each chunk with the records done and the total. */
typedef void (*encoder_progress_fn)(void *ctx, uint64_t done, uint64_t total);
int encoder_embed(encoder *e, const char *data, const char *labels, int embeddings, int chunk, int bad_skip,
                  const char *out, encoder_progress_fn progress, void *ctx, uint64_t *rows, int *dim,
                  uint64_t *skipped);

#endif
