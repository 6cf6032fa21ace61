/* The trainer: everything one training run holds (data stream and views, query and key encoders,
 * queue, optimizer and schedules, mining and hardness, evaluation sets, random streams), built from a
 * trainer_config, advanced one step at a time, evaluated, exported, saved and restored.
 *
 * The trainer knows no thread, socket or log: the service calls it from one thread at a time. Every
 * function returns 0 or a negative MOCO_E* code with the context in moco_errmsg. */
#ifndef MOCO_TRAIN_TRAINER_H
#define MOCO_TRAIN_TRAINER_H

#include <stdint.h>

#include "core/blob.h"

/* The run's settings as module config structs; the service fills it from the JSON config
 * (service/config.h, config_to_trainer). Fields marked runtime may change between steps. */
typedef struct {
  /* filled in as the modules land */
  int64_t steps;
  int batch_size;
  int queue_size;
  float lr;          /* runtime */
  float temperature; /* runtime */
  uint64_t seed;
  int threads;
} trainer_config;

typedef struct trainer trainer;

/* What one step did. Similarities are cosines; label figures are -1 when the data has no labels. */
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
  float filtered;         /* candidates removed as suspected false negatives, per query */
  float fn_rate;          /* share of selected negatives with the query's label (-1: no labels) */
  int queue_filled, queue_size;
  int batch_size;
  double seconds;         /* wall time of the step, data included */
} trainer_stats;

typedef enum { TRAINER_QUERY = 0, TRAINER_KEY = 1 } trainer_encoder;

typedef struct {
  trainer_encoder encoder; /* whose backbone features are evaluated */
  int knn;                 /* run the kNN monitor and alignment/uniformity */
  int probe;               /* train and test a linear probe */
} trainer_eval_request;

typedef struct {
  int64_t step;
  int has_knn;
  float knn_acc;          /* weighted kNN top-1 accuracy on the evaluation split */
  int k;
  float t;
  float alignment;        /* Wang & Isola 2020, lower is better */
  float uniformity;       /* Wang & Isola 2020, lower is better */
  int has_probe;
  float probe_acc;        /* linear probe top-1 accuracy on the evaluation split */
  float probe_train_acc;
  int n_train, n_eval;    /* samples in the feature bank / evaluated */
  double seconds;
} trainer_eval_result;

/* Builds everything (reads the data, builds the networks, allocates for the largest batch).
 * On failure nothing is left allocated and *out is NULL. */
int trainer_create(trainer **out, const trainer_config *cfg);
void trainer_destroy(trainer *t);

/* One training step (forward, loss, backward, update, momentum update, enqueue). Allocates nothing. */
int trainer_step(trainer *t, trainer_stats *st);
int64_t trainer_step_count(const trainer *t);
int64_t trainer_total_steps(const trainer *t);
/* Queue and dataset sizes, for status before the first step. */
void trainer_describe(const trainer *t, trainer_stats *st);

/* Checks that the runtime-changeable fields of cfg can be applied to this trainer (for instance that a
 * new negative strategy fits the workspaces built at start), without changing anything. */
int trainer_check_runtime(const trainer *t, const trainer_config *cfg);
/* Applies them (learning rate, temperature, negative strategy and its parameters, hardness, eval
 * settings). Call between steps. */
int trainer_apply_runtime(trainer *t, const trainer_config *cfg);

int trainer_evaluate(trainer *t, const trainer_eval_request *req, trainer_eval_result *res);
/* Writes the backbone features (or, with embeddings set, the L2-normalised embeddings) of a split
 * ("train" or "eval") to path in the embedding-export format of include/train/eval.h. *rows and *dim
 * receive the array's shape. */
int trainer_export(trainer *t, const char *split, trainer_encoder enc, int embeddings, const char *path,
                   int64_t *rows, int *dim);

/* Every stateful part, one blob section each, in a fixed order; trainer_load validates each and refuses
 * a mismatch (another architecture, queue size, data set) with a message naming it. */
void trainer_save(const trainer *t, blob_writer *w);
int trainer_load(trainer *t, blob_reader *r);

#endif
