/* The trainer: everything one training run holds (the data stream and its views, the MoCo model of
 * include/train/step.h with both encoders, queue, optimizer, mining and hardness, the evaluation
 * settings), built from a trainer_config, advanced one step at a time, evaluated, exported, saved and
 * restored.
 *
 * The trainer knows no thread, socket or log: the service calls it from one thread at a time. Every
 * function returns 0 or a negative MOCO_E* code with the context in moco_errmsg. */
#ifndef MOCO_TRAIN_TRAINER_H
#define MOCO_TRAIN_TRAINER_H

#include <jansson.h>
#include <stdint.h>

#include "core/blob.h"
#include "data/loader.h"
#include "train/eval.h"
#include "train/step.h"

typedef enum { TRAINER_QUERY = 0, TRAINER_KEY = 1 } trainer_encoder;
/* eval.encoder: "query", "key". */
extern const enum_name trainer_encoder_names[];

/* Classes whose accuracy an evaluation reports one by one (and the largest confusable group). */
#define TRAINER_MAX_CLASSES 64

/* The run's settings as the modules' config structs; every field is bound to a row of the config
 * schema (service/config.h: config_read fills it, config_defaults gives the defaults). Fields
 * marked runtime may change between steps through trainer_apply_runtime. */
typedef struct {
  /* data: file specs with data.dir already applied to relative entries; "" for none */
  char train[4096], train_labels[4096], eval[4096], eval_labels[4096];
  loader_config loader; /* its path fields are pointed at the strings above by trainer_create */
  int normalize;        /* standardise with the training set's per-channel mean and std */
  /* model: borrowed from the JSON config and read only by trainer_create */
  const json_t *backbone, *head;
  int embed_dim;
  /* training: batch, queue, loss, mining, hardness, momentum, optimizer and lr schedule (runtime:
   * temperature, HCL/triplet parameters, mining strategy and parameters, guards, hardness, lr and
   * its schedule's parameters, weight decay) */
  moco_config moco;
  int64_t steps; /* 0: epochs x full batches per epoch */
  int epochs;
  /* evaluation (runtime) */
  eval_knn_config knn;       /* the monitor's protocol (k 200, T 0.1) */
  eval_knn_config knn_small; /* the small-k protocol (k 20, T 0.07), voted in the same pass */
  int64_t groups[TRAINER_MAX_CLASSES]; /* the confusable group: classes whose joint accuracy is reported */
  int n_groups;              /* classes in groups; 0: no group figure */
  int retrieval_queries;     /* instance retrieval queries (augmented test images); 0: none */
  eval_probe_config probe;
  trainer_encoder eval_encoder;
  int eval_pairs;           /* augmented pairs for alignment (and rows for uniformity) */
  int threads;              /* compute threads (core/par.h) */
} trainer_config;

typedef struct trainer trainer;

/* What one step did. Similarities are cosines; fn_rate is -1 when the data has no labels. */
typedef struct {
  int64_t step;           /* steps done, this one included */
  int64_t total_steps;
  double epoch;           /* passes over the training data so far (fractional) */
  float loss, lr, temperature, momentum, hardness;
  float pos_sim;          /* mean similarity of each query to its own key */
  float neg_sim;          /* mean similarity to the selected negatives */
  float hardest_neg_sim;  /* mean over queries of the hardest selected negative */
  float inst_acc;         /* share of queries whose own key beats every selected negative */
  float negatives;        /* mean negatives per query */
  float filtered;         /* candidates removed (or kept as positives) as suspected false negatives */
  float fn_rate;          /* share of selected negatives with the query's label (-1: no labels) */
  int queue_filled, queue_size;
  int batch_size;
  double seconds;         /* wall time of the step, data included */
  double data_wait;       /* of which spent waiting for the data loader */
  uint64_t skipped;       /* damaged records skipped by the stream so far (data.bad_record skip) */
} trainer_stats;

typedef struct {
  trainer_encoder encoder; /* whose backbone features are evaluated */
  int knn;                 /* kNN monitor, alignment and uniformity */
  int probe;               /* linear probe */
  int64_t train_limit;     /* training samples in the kNN bank and the probe's training set; 0 all */
  int64_t eval_limit;      /* evaluation samples; 0 all */
} trainer_eval_request;

/* The kNN figures of one protocol. */
typedef struct {
  float acc;              /* weighted kNN top-1 accuracy on the evaluation split */
  int k;
  float t;
  float group_acc;        /* accuracy over the evaluation samples of the confusable group's classes */
  float class_acc[TRAINER_MAX_CLASSES]; /* per true class, -1 for a class absent from the split */
} trainer_knn_figures;

typedef struct {
  int64_t step;
  int has_knn;
  trainer_knn_figures knn, knn_small; /* the monitor's protocol and the small-k one */
  int num_classes;        /* classes of class_acc: min(the data's classes, TRAINER_MAX_CLASSES) */
  int has_group;
  int has_retrieval;
  int retrieval_queries;  /* queries whose original was in the gallery */
  int64_t retrieval_gallery;
  float recall1, recall10;         /* instance retrieval on backbone features */
  float recall1_emb, recall10_emb; /* on the embeddings */
  float alignment;        /* Wang & Isola 2020 (alpha 2) on augmented pairs; lower is better */
  float uniformity;       /* Wang & Isola 2020 (t 2) on evaluation embeddings; lower is better */
  int has_probe;
  float probe_acc;        /* linear probe top-1 accuracy on the evaluation split */
  float probe_train_acc;
  int64_t n_train, n_eval; /* samples in the feature bank / evaluated */
  double seconds;
} trainer_eval_result;

/* The layer list of the encoder the step trains: backbone + head + linear(embed_dim) + l2norm (the
 * step wants unit embeddings). A new reference; the layers are shared with cfg's lists. */
json_t *trainer_encoder_spec(const trainer_config *c);

/* Opens the data, builds the networks, allocates for the largest batch. On failure nothing is left
 * allocated and *out is NULL. */
int trainer_create(trainer **out, const trainer_config *cfg);
void trainer_destroy(trainer *t);

/* One training step: the next batch from the loader, then moco_step. Allocates nothing. A non-finite
 * loss is an error (MOCO_ERANGE), the model is not used further. */
int trainer_step(trainer *t, trainer_stats *st);
int64_t trainer_step_count(const trainer *t);
int64_t trainer_total_steps(const trainer *t);
/* The current settings (lr, temperature, momentum, hardness at this step), queue fill, epoch. */
void trainer_describe(const trainer *t, trainer_stats *st);
/* Damaged records the stream has skipped so far; why (when not NULL) gets the last one's error. */
uint64_t trainer_skipped(const trainer *t, char *why, size_t n);

/* One line for the log: data sizes, the encoder (net_describe), parameter count, steps. */
void trainer_summary(const trainer *t, char *buf, size_t cap);

/* Checks that the runtime fields of cfg can be applied to this trainer (a new negative strategy must
 * fit the similarity layout built at start: mixing and adversarial add columns), changing nothing. */
int trainer_check_runtime(const trainer *t, const trainer_config *cfg);
/* Applies them. Call between steps. */
int trainer_apply_runtime(trainer *t, const trainer_config *cfg);

/* Asks a running trainer_evaluate / trainer_export to give up (MOCO_ESTATE "interrupted") at its next
 * chunk of samples; on = 0 clears the request. The one function that may be called from another thread
 * while the trainer works (a daemon that is stopping does not wait for a long evaluation). */
void trainer_interrupt(trainer *t, int on);

/* Features of both splits in inference mode, then kNN, alignment, uniformity and / or the probe.
 * Changes no training state. In a world of several ranks (core/dist.h) it is collective: every rank
 * calls it with the same request, extracts its shard of each split, and rank 0 gathers the features
 * and computes every figure (res is filled on rank 0 only; the others return 0 with res empty). The
 * shards are contiguous record ranges in rank order, so rank 0 holds the rows one process would. */
int trainer_evaluate(trainer *t, const trainer_eval_request *req, trainer_eval_result *res);
/* Writes the backbone features (or, with embeddings set, the L2-normalised embeddings) of the "train"
 * or "eval" split to path as .npy (eval.h's eval_export; labels and ids beside it). Collective like
 * trainer_evaluate: rank 0 gathers the shards and writes; path, rows and dim matter on rank 0 only. */
int trainer_export(trainer *t, const char *split, trainer_encoder enc, int embeddings, const char *path,
                   int64_t *rows, int *dim);

/* Writes the query or key encoder as safetensors (train/encoder.h) at path; *bytes gets its size. */
int trainer_export_model(trainer *t, trainer_encoder which, const char *path, int64_t *bytes);

/* The model (moco_save: step, encoders, optimizer, queue, hardness, bank, rng), the data position
 * (loader_save) and the input record (encoder_input_save: shape, dtype, normalisation), in that order;
 * trainer_load refuses a mismatch naming it. */
void trainer_save(const trainer *t, blob_writer *w);
int trainer_load(trainer *t, blob_reader *r);

#endif
