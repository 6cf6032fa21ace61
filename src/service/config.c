#include "service/config.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "service/log.h"
#include "config_int.h"

/* ---------------------------------------------------------------------------------------------------
 * The schema. One row per option; the order here is the order of --print-config and of the reference.
 * Rows with CONFIG_RUNTIME may be changed by `set` while training (applied between two steps).
 * ------------------------------------------------------------------------------------------------- */

#define R CONFIG_RUNTIME
/* The field a row binds: T(...) in the trainer's settings, S(...) elsewhere in mocod_config. */
#define S(f) offsetof(mocod_config, f), sizeof(((mocod_config *)0)->f)
#define T(f) S(trainer.f)
#define INT(p, d, lo, hi, f, fld, doc) {p, CONFIG_INT, #d, lo, hi, NULL, f, fld, 0, doc}
#define NUM(p, d, lo, hi, f, fld, doc) {p, CONFIG_NUM, #d, lo, hi, NULL, f, fld, 0, doc}
#define BOOL(p, d, f, fld, doc) {p, CONFIG_BOOL, #d, 0, 0, NULL, f, fld, 0, doc}
#define STR(p, d, f, fld, doc) {p, CONFIG_STR, d, 0, 0, NULL, f, fld, 0, doc}
#define ENUM(p, d, names, f, fld, doc) {p, CONFIG_ENUM, "\"" d "\"", 0, 0, names, f, fld, 0, doc}
#define LAYERS(p, d, fld, doc) {p, CONFIG_LAYERS, d, 0, 0, NULL, 0, fld, 0, doc}
/* The element count goes to the int field `count` beside the array. */
#define INTS(p, d, lo, hi, f, fld, count, doc) \
  {p, CONFIG_INTS, d, lo, hi, NULL, f, fld, offsetof(mocod_config, trainer.count), doc}

const config_option config_options[] = {
    /* ---- data ---- */
    STR("data.dir", "\"/usr/share/datasets/fashion-mnist\"", 0, S(data.dir),
        "directory that relative data.train / data.eval entries are taken from"),
    STR("data.train", "\"train-images-idx3-ubyte.gz\"", 0, S(data.train),
        "training data: IDX images file or shards, comma-separated paths or globs"),
    STR("data.train_labels", "\"\"", 0, S(data.train_labels),
        "labels of an IDX training file; \"\" finds them by name (images-idx3 -> labels-idx1)"),
    STR("data.eval", "\"t10k-images-idx3-ubyte.gz\"", 0, S(data.eval),
        "labelled evaluation split (kNN monitor, linear probe); \"\" for none"),
    STR("data.eval_labels", "\"\"", 0, S(data.eval_labels), "labels of an IDX evaluation file; \"\" finds them by name"),
    ENUM("data.mode", "augment", view_mode_names, 0, T(loader.view_mode),
         "augment: two random views per sample; pair: the record's own two samples"),
    INT("data.shuffle_buffer", 65536, 0, 1 << 24, 0, T(loader.shuffle_buffer),
        "records shuffled together; >= the data set size is a full shuffle, 0 none"),
    INT("data.workers", 2, 1, 64, 0, T(loader.workers), "threads making views (the stream is the same for any count)"),
    INT("data.prefetch", 4, 1, 64, 0, T(loader.prefetch), "batches prepared ahead of the step"),
    BOOL("data.normalize", true, 0, T(normalize), "standardise inputs with the training set's mean and std per channel"),
    INT("data.num_classes", 0, 0, 1 << 20, 0, T(loader.num_classes), "number of classes; 0 takes it from the data"),
    ENUM("data.bad_record", "stop", loader_bad_policy_names, 0, T(loader.bad_record), "a damaged record stops training, or is skipped and counted"),
    /* ---- views ---- */
    NUM("views.crop_p", 1, 0, 1, 0, T(loader.augment.crop_p), "probability of a random resized crop"),
    NUM("views.crop_scale_min", 0.2, 0, 1, CONFIG_MIN_OPEN, T(loader.augment.crop_scale_min), "smallest crop, as a fraction of the area"),
    NUM("views.crop_scale_max", 1, 0, 1, 0, T(loader.augment.crop_scale_max), "largest crop, as a fraction of the area"),
    NUM("views.crop_ratio_min", 0.75, 0.01, 100, 0, T(loader.augment.crop_ratio_min), "smallest crop aspect ratio"),
    NUM("views.crop_ratio_max", 1.3333333, 0.01, 100, 0, T(loader.augment.crop_ratio_max), "largest crop aspect ratio"),
    NUM("views.flip_p", 0.5, 0, 1, 0, T(loader.augment.flip_p), "probability of a horizontal flip"),
    NUM("views.translate_p", 0, 0, 1, 0, T(loader.augment.translate_p), "probability of a translation"),
    NUM("views.translate_max", 0.125, 0, 1, 0, T(loader.augment.translate_max), "largest translation, as a fraction of the size"),
    NUM("views.brightness_p", 0.8, 0, 1, 0, T(loader.augment.brightness_p), "probability of a brightness change"),
    NUM("views.brightness_min", 0.6, 0, 100, 0, T(loader.augment.brightness_min), "smallest brightness factor"),
    NUM("views.brightness_max", 1.4, 0, 100, 0, T(loader.augment.brightness_max), "largest brightness factor"),
    NUM("views.contrast_p", 0.8, 0, 1, 0, T(loader.augment.contrast_p), "probability of a contrast change"),
    NUM("views.contrast_min", 0.6, 0, 100, 0, T(loader.augment.contrast_min), "smallest contrast factor"),
    NUM("views.contrast_max", 1.4, 0, 100, 0, T(loader.augment.contrast_max), "largest contrast factor"),
    NUM("views.saturation_p", 0.8, 0, 1, 0, T(loader.augment.saturation_p), "RGB images: probability of a saturation change"),
    NUM("views.saturation_min", 0.6, 0, 100, 0, T(loader.augment.saturation_min), "RGB images: smallest saturation factor (0: grey)"),
    NUM("views.saturation_max", 1.4, 0, 100, 0, T(loader.augment.saturation_max), "RGB images: largest saturation factor"),
    NUM("views.hue_p", 0.8, 0, 1, 0, T(loader.augment.hue_p), "RGB images: probability of a hue shift"),
    NUM("views.hue_max", 0.1, 0, 0.5, 0, T(loader.augment.hue_max), "RGB images: largest hue shift, in turns of the colour wheel"),
    NUM("views.grayscale_p", 0.2, 0, 1, 0, T(loader.augment.grayscale_p), "RGB images: probability of turning the view grey"),
    NUM("views.erase_p", 0, 0, 1, 0, T(loader.augment.erase_p), "probability of random erasing"),
    NUM("views.erase_scale_min", 0.02, 0, 1, CONFIG_MIN_OPEN, T(loader.augment.erase_scale_min), "smallest erased area fraction"),
    NUM("views.erase_scale_max", 0.33, 0, 1, 0, T(loader.augment.erase_scale_max), "largest erased area fraction"),
    NUM("views.erase_ratio_min", 0.3, 0.01, 100, 0, T(loader.augment.erase_ratio_min), "smallest erased aspect ratio"),
    NUM("views.erase_ratio_max", 3.3, 0.01, 100, 0, T(loader.augment.erase_ratio_max), "largest erased aspect ratio"),
    NUM("views.noise_p", 0, 0, 1, 0, T(loader.augment.noise_p), "probability of Gaussian noise"),
    NUM("views.noise_std_min", 0, 0, 10, 0, T(loader.augment.noise_std_min), "smallest noise standard deviation"),
    NUM("views.noise_std_max", 0.05, 0, 10, 0, T(loader.augment.noise_std_max), "largest noise standard deviation"),
    NUM("views.mask_p", 1, 0, 1, 0, T(loader.augment.mask_p), "vectors: probability of SCARF feature masking"),
    NUM("views.mask_rate_min", 0.6, 0, 1, 0, T(loader.augment.mask_rate_min), "vectors: smallest masked fraction"),
    NUM("views.mask_rate_max", 0.6, 0, 1, 0, T(loader.augment.mask_rate_max), "vectors: largest masked fraction"),
    /* ---- model ---- */
    LAYERS("model.backbone",
           "[{\"type\":\"conv2d\",\"out\":32,\"kernel\":3,\"stride\":1,\"pad\":1},{\"type\":\"batchnorm\"},"
           "{\"type\":\"relu\"},{\"type\":\"maxpool\",\"kernel\":2},"
           "{\"type\":\"conv2d\",\"out\":64,\"kernel\":3,\"stride\":1,\"pad\":1},{\"type\":\"batchnorm\"},"
           "{\"type\":\"relu\"},{\"type\":\"maxpool\",\"kernel\":2},"
           "{\"type\":\"conv2d\",\"out\":128,\"kernel\":3,\"stride\":1,\"pad\":1},{\"type\":\"batchnorm\"},"
           "{\"type\":\"relu\"},{\"type\":\"avgpool\"},{\"type\":\"flatten\"}]", T(backbone),
           "encoder layers up to the features that evaluation uses (kNN, linear probe, export)"),
    LAYERS("model.head", "[{\"type\":\"linear\",\"out\":128},{\"type\":\"relu\"}]", T(head),
           "projection head after the backbone; mocod appends linear(embed_dim) and l2norm"),
    INT("model.embed_dim", 64, 2, 4096, 0, T(embed_dim), "dimension of the L2-normalised embedding (queue keys)"),
    BOOL("model.sync_bn", false, 0, T(moco.sync_bn),
         "query-encoder BatchNorm over every rank's batch (SyncBN) under mpirun; off: each rank's own"),
    /* ---- contrast ---- */
    INT("contrast.queue_size", 4096, 1, 1 << 22, 0, T(moco.queue_size), "K: keys kept in the queue as negatives"),
    NUM("contrast.momentum", 0.99, 0, 1, 0, T(moco.momentum.encoder_momentum), "m of the key encoder: key <- m*key + (1-m)*query"),
    ENUM("contrast.momentum_schedule", "constant", momentum_schedule_names, 0, T(moco.momentum.schedule),
         "constant m, or BYOL's cosine ramp from m to 1 over training"),
    NUM("contrast.temperature", 0.2, 0.001, 10, R, T(moco.loss.temperature), "softmax temperature of the contrastive loss"),
    ENUM("contrast.loss", "infonce", loss_kind_names, 0, T(moco.loss.loss),
         "InfoNCE (multi-positive with kept suspects), HCL/DCL, triplet margin, or SimCLR's NT-Xent"),
    BOOL("contrast.symmetric", false, 0, T(moco.symmetric), "both views act as queries against the other's key"),
    INT("contrast.shuffle_bn_groups", 8, 1, 1024, 0, T(moco.shuffle_bn_groups),
        "key-encoder BatchNorm groups over a shuffled batch (MoCo's shuffle BN); 1 turns it off"),
    NUM("contrast.hcl_beta", 1, 0, 100, R, T(moco.mine.hcl_beta), "HCL concentration on hard negatives at hardness 1 (0: DCL)"),
    NUM("contrast.tau_plus", 0.1, 0, 0.999, R, T(moco.loss.tau_plus), "HCL/DCL class prior tau+; 0: no debiasing"),
    NUM("contrast.triplet_margin", 0.2, 0, 4, R, T(moco.loss.margin), "triplet loss margin on cosine distance"),
    ENUM("contrast.triplet_negative", "hardest", triplet_negative_names, R, T(moco.loss.triplet_negative),
         "triplet loss on each query's hardest negative or the mean over all"),
    ENUM("contrast.negatives.strategy", "hardest", mine_strategy_names,
         R, T(moco.mine.strategy), "which candidates are negatives (mixing and adversarial only if started with them)"),
    BOOL("contrast.negatives.in_batch", false, 0, T(moco.mine.in_batch_negatives), "also use the batch's other keys as candidates"),
    INT("contrast.negatives.num_negatives", 1024, 1, 1 << 22, R, T(moco.mine.num_negatives),
        "negatives per query at hardness 1 (random, hardest, semi-hard; mixing: hard pool)"),
    INT("contrast.negatives.num_negatives_easy", 0, 0, 1 << 22, R, T(moco.mine.num_negatives_easy),
        "negatives per query at hardness 0; 0 means every valid candidate"),
    NUM("contrast.negatives.margin", 0.2, 0, 2, R, T(moco.mine.margin), "semi-hard: band width below the positive"),
    NUM("contrast.negatives.band_lo", 0.05, 0, 1, R, T(moco.mine.band_lo), "band: hardest rank percentile kept at hardness 1"),
    NUM("contrast.negatives.band_hi", 0.3, 0, 1, R, T(moco.mine.band_hi), "band: easiest rank percentile kept at hardness 1"),
    INT("contrast.negatives.mix_pairs", 512, 0, 65536, 0, T(moco.mine.mix_pairs), "mixing: synthetic mixes of two hard negatives per query"),
    INT("contrast.negatives.mix_query", 256, 0, 65536, 0, T(moco.mine.mix_query), "mixing: mixes of the query with a hard negative per query"),
    INT("contrast.negatives.bank_size", 16384, 1, 1 << 22, 0, T(moco.mine.bank_size), "adversarial: learnable negatives in the bank"),
    NUM("contrast.adversarial.lr", 3, 0, 1000, R, T(moco.advbank.lr), "adversarial: learning rate of the bank's ascent"),
    NUM("contrast.adversarial.temperature", 0.02, 0.001, 10, R, T(moco.advbank.temperature), "adversarial: temperature of the bank's loss"),
    NUM("contrast.adversarial.momentum", 0.9, 0, 0.9999, R, T(moco.advbank.momentum), "adversarial: momentum of the bank's ascent"),
    NUM("contrast.adversarial.weight_decay", 5e-4, 0, 1, R, T(moco.advbank.weight_decay), "adversarial: weight decay of the bank"),
    BOOL("contrast.adversarial.init_from_queue", true, 0, T(moco.advbank.init_from_queue),
         "adversarial: seed the bank from the queue's keys once the queue is full"),
    ENUM("contrast.guards.ceiling", "none", mine_ceiling_names, R, T(moco.mine.ceiling),
         "suspected false negatives: similarity above a value, or above s_pos - delta"),
    NUM("contrast.guards.ceiling_value", 0.95, -1, 1, R, T(moco.mine.ceiling_value), "absolute ceiling"),
    NUM("contrast.guards.ceiling_delta", 0, -2, 2, R, T(moco.mine.ceiling_delta), "relative ceiling: s_pos - delta"),
    NUM("contrast.guards.skip_hardest", 0, 0, 0.999, R, T(moco.mine.skip_hardest), "the hardest fraction of candidates is suspect"),
    BOOL("contrast.guards.as_positives", false, R, T(moco.mine.suspects_as_positives), "suspects become extra positives instead of being dropped"),
    BOOL("contrast.guards.supervised", false, R, T(moco.mine.supervised), "never use a candidate with the query's label (needs labels)"),
    ENUM("contrast.hardness.mode", "fixed", hardness_mode_names, R, T(moco.hardness.mode),
         "where the hardness in [0, 1] comes from: a constant, a schedule, or a controller"),
    NUM("contrast.hardness.value", 1, 0, 1, R, T(moco.hardness.value), "fixed: the hardness; dynamic: its starting value"),
    NUM("contrast.hardness.warmup", 0, 0, 1, R | CONFIG_MAX_OPEN, T(moco.hardness.warmup), "fraction of training on random negatives first"),
    ENUM("contrast.hardness.shape", "linear", hardness_shape_names, R, T(moco.hardness.shape), "curriculum: shape of the ramp"),
    NUM("contrast.hardness.start", 0, 0, 1, R, T(moco.hardness.start), "curriculum: hardness right after the warm-up"),
    NUM("contrast.hardness.end", 1, 0, 1, R, T(moco.hardness.end), "curriculum: hardness at the end of training"),
    ENUM("contrast.hardness.signal", "accuracy", hardness_signal_names, R, T(moco.hardness.signal),
         "dynamic: the signal held at the target (instance accuracy, hardest-negative similarity or mean "
         "selected-negative similarity; hardest needs neg_sim)"),
    NUM("contrast.hardness.target", 0.5, -1, 1, R, T(moco.hardness.target), "dynamic: level of the signal to hold"),
    NUM("contrast.hardness.gain", 0.05, 0, 10, R, T(moco.hardness.gain), "dynamic: hardness change per unit of error"),
    NUM("contrast.hardness.max_step", 0.01, 0, 1, R, T(moco.hardness.max_step), "dynamic: largest change per step"),
    NUM("contrast.hardness.ema", 0.9, 0, 0.9999, R, T(moco.hardness.ema), "dynamic: EMA decay of the signal"),
    NUM("contrast.hardness.min", 0, 0, 1, R, T(moco.hardness.min), "dynamic: lowest hardness"),
    NUM("contrast.hardness.max", 1, 0, 1, R, T(moco.hardness.max), "dynamic: highest hardness"),
    /* ---- optim ---- */
    ENUM("optim.optimizer", "sgd", optim_kind_names, 0, T(moco.optim.optimizer), "update rule"),
    INT("optim.batch_size", 256, 2, 65536, 0, T(moco.batch_size), "samples per step (B)"),
    INT("optim.epochs", 10, 0, 100000, 0, T(epochs), "training length in passes over the data (when optim.steps is 0)"),
    INT("optim.steps", 0, 0, 1e12, 0, T(steps), "training length in steps; 0 derives it from optim.epochs"),
    NUM("optim.lr", 0.06, 0, 100, R, T(moco.sched.lr), "base learning rate (peak of the schedule)"),
    ENUM("optim.lr_schedule", "cosine", sched_kind_names, 0, T(moco.sched.lr_schedule), "learning-rate schedule over the training length"),
    NUM("optim.final_lr", 0, 0, 100, R, T(moco.sched.final_lr), "cosine: learning rate after the last step"),
    INT("optim.warmup_steps", 0, 0, 1e9, R, T(moco.sched.warmup_steps), "linear warm-up to optim.lr over this many steps"),
    INTS("optim.milestones", "[]", 0, 1e12, 0, T(moco.sched.milestones), moco.sched.n_milestones, "step: steps at which the rate is multiplied by gamma (at most 16)"),
    NUM("optim.gamma", 0.1, 1e-6, 1, R, T(moco.sched.gamma), "step: factor at each milestone"),
    NUM("optim.weight_decay", 5e-4, 0, 1, R, T(moco.optim.weight_decay), "weight decay (not on biases and BatchNorm unless decay_all)"),
    BOOL("optim.decay_all", false, 0, T(moco.optim.decay_all), "also decay biases and BatchNorm parameters"),
    NUM("optim.momentum", 0.9, 0, 0.9999, 0, T(moco.optim.momentum), "SGD / LARS momentum"),
    BOOL("optim.nesterov", false, 0, T(moco.optim.nesterov), "Nesterov momentum (SGD, LARS)"),
    NUM("optim.lars_eta", 0.001, 1e-6, 1, 0, T(moco.optim.lars_eta), "LARS trust coefficient"),
    NUM("optim.beta1", 0.9, 0, 0.9999, 0, T(moco.optim.beta1), "AdamW first-moment decay"),
    NUM("optim.beta2", 0.999, 0, 0.999999, 0, T(moco.optim.beta2), "AdamW second-moment decay"),
    NUM("optim.eps", 1e-8, 1e-12, 1, 0, T(moco.optim.eps), "AdamW denominator guard"),
    /* ---- eval ---- */
    INT("eval.every_steps", 0, 0, 1e12, R, S(eval.every_steps), "kNN monitor every N steps; 0: only at the end and on `eval`"),
    INT("eval.k", 200, 1, 10000, R, T(knn.k), "neighbours of the weighted kNN monitor"),
    NUM("eval.temperature", 0.1, 0.001, 10, R, T(knn.temperature), "kNN weight temperature T: weight exp(s/T)"),
    INT("eval.small_k", 20, 1, 10000, R, T(knn_small.k), "neighbours of the second, small-k kNN protocol (same pass)"),
    NUM("eval.small_temperature", 0.07, 0.001, 10, R, T(knn_small.temperature),
        "weight temperature of the small-k kNN protocol"),
    INTS("eval.groups", "[0, 2, 4, 6]", 0, 63, R, T(groups), n_groups,
         "confusable group: classes whose joint kNN accuracy is reported (Fashion-MNIST T-shirt/top, "
         "Pullover, Coat, Shirt); [] for none"),
    INT("eval.retrieval_queries", 2000, 0, 1 << 20, R, T(retrieval_queries),
        "instance retrieval: augmented copies of the first N evaluation samples, searched among the "
        "originals; 0: none"),
    ENUM("eval.encoder", "query", trainer_encoder_names, R, T(eval_encoder), "encoder whose backbone features are evaluated"),
    BOOL("eval.probe_at_end", true, R, S(eval.probe_at_end), "train a linear probe on frozen features when training ends"),
    INT("eval.probe_max_iter", 100, 1, 100000, R, T(probe.max_iter), "linear probe: L-BFGS iterations"),
    NUM("eval.probe_weight_decay", 1e-4, 0, 10, R, T(probe.weight_decay), "linear probe: L2 penalty on standardised features"),
    INT("eval.train_limit", 0, 0, 1e12, R, S(eval.train_limit),
        "periodic monitor: training samples in its kNN bank; 0: all (the final evaluation uses all)"),
    INT("eval.limit", 0, 0, 1e12, R, S(eval.limit), "periodic monitor: evaluation samples; 0: all (the final one uses all)"),
    INT("eval.pairs", 1024, 2, 1 << 20, R, T(eval_pairs), "augmented pairs for alignment, rows for uniformity"),
    /* ---- checkpoint ---- */
    STR("checkpoint.dir", "\"run/checkpoints\"", 0, S(checkpoint.dir), "directory of checkpoint files"),
    INT("checkpoint.every_steps", 1000, 0, 1e12, R, S(checkpoint.every_steps), "checkpoint every N steps; 0: not by steps"),
    INT("checkpoint.every_seconds", 600, 0, 1e9, R, S(checkpoint.every_seconds), "checkpoint every N seconds; 0: not by time"),
    INT("checkpoint.keep", 3, 1, 1000, R, S(checkpoint.keep), "checkpoints kept; older ones are deleted"),
    /* ---- log ---- */
    STR("log.progress", "\"run/progress.jsonl\"", 0, S(log.progress), "JSON-lines progress file; \"\" for none"),
    STR("log.file", "\"run/mocod.log\"", 0, S(log.file), "human-readable log; \"\" for standard error"),
    ENUM("log.level", "notice", log_level_names, R, S(log.level), "lowest level written to log.file"),
    INT("log.every_steps", 10, 1, 1e9, R, S(log.every_steps), "a progress event every N steps"),
    /* ---- service ---- */
    STR("service.socket", "\"run/mocod.sock\"", 0, S(service.socket), "control socket (Unix domain, mode 0600)"),
    STR("service.metrics_listen", "\"\"", 0, S(service.metrics_listen),
        "HOST:PORT serving Prometheus /metrics over HTTP (e.g. 127.0.0.1:9464); \"\" for none"),
    STR("service.pid_file", "\"run/mocod.pid\"", 0, S(service.pid_file), "pid file, locked while mocod runs"),
    BOOL("service.exit_on_finish", false, 0, S(service.exit_on_finish),
         "exit once training has finished (status 0) or failed (status 1); otherwise keep answering until stopped"),
    /* ---- top level ---- */
    INT("seed", 1, 0, 1e15, 0, T(moco.seed), "seed of every random stream (initialisation, shuffling, views, sampling)"),
    INT("threads", 1, 1, 256, 0, T(threads), "compute threads of the step (layers and matrix products, at most 16); results are reproducible for a fixed value"),
};
const size_t config_n_options = sizeof config_options / sizeof config_options[0];

#undef R
#undef S
#undef T
#undef INT
#undef NUM
#undef BOOL
#undef STR
#undef ENUM
#undef LAYERS
#undef INTS

/* ---------------------------------------------------------------------------------------------------
 * A growing text buffer for reports.
 * ------------------------------------------------------------------------------------------------- */

typedef struct {
  char *s;
  size_t len, cap;
  int count; /* problems recorded */
  char first[512];
} report_buf;

static void report_add(report_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report_add(report_buf *b, const char *fmt, ...) {
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  size_t n = strlen(line);
  if (b->count++ == 0) {
    size_t k = n < sizeof b->first - 1 ? n : sizeof b->first - 1;
    memcpy(b->first, line, k);
    b->first[k] = '\0';
  }
  if (b->len + n + 2 > b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 1024;
    while (cap < b->len + n + 2) cap *= 2;
    char *p = realloc(b->s, cap);
    if (!p) return; /* the count and the first line still say what failed */
    b->s = p;
    b->cap = cap;
  }
  memcpy(b->s + b->len, line, n);
  b->len += n;
  b->s[b->len++] = '\n';
  b->s[b->len] = '\0';
}

/* ---------------------------------------------------------------------------------------------------
 * Paths and lookups.
 * ------------------------------------------------------------------------------------------------- */

const config_option *config_option_find(const char *path) {
  for (size_t i = 0; i < config_n_options; i++)
    if (!strcmp(config_options[i].path, path)) return &config_options[i];
  return NULL;
}

/* 1 when `path` names an object holding options ("contrast", "contrast.negatives"). */
static int is_section(const char *path) {
  size_t n = strlen(path);
  for (size_t i = 0; i < config_n_options; i++)
    if (!strncmp(config_options[i].path, path, n) && config_options[i].path[n] == '.') return 1;
  return 0;
}

json_t *config_get(const json_t *root, const char *path) {
  char key[256];
  const json_t *node = root;
  while (node && *path) {
    const char *dot = strchr(path, '.');
    size_t n = dot ? (size_t)(dot - path) : strlen(path);
    if (n >= sizeof key || !json_is_object(node)) return NULL;
    memcpy(key, path, n);
    key[n] = '\0';
    node = json_object_get(node, key);
    path += n + (dot ? 1 : 0);
  }
  return (json_t *)node;
}

/* Sets the value at a dotted path, creating intermediate objects; steals `v`. */
static int set_path(json_t *root, const char *path, json_t *v) {
  char key[256];
  json_t *node = root;
  for (;;) {
    const char *dot = strchr(path, '.');
    size_t n = dot ? (size_t)(dot - path) : strlen(path);
    if (n == 0 || n >= sizeof key) {
      json_decref(v);
      return moco_error(MOCO_EINVAL, "config path '%s': empty or overlong component", path);
    }
    memcpy(key, path, n);
    key[n] = '\0';
    if (!dot) return json_object_set_new(node, key, v) ? MOCO_ENOMEM : 0;
    json_t *child = json_object_get(node, key);
    if (!child) {
      child = json_object();
      if (!child || json_object_set_new(node, key, child)) {
        json_decref(v);
        return MOCO_ENOMEM;
      }
    } else if (!json_is_object(child)) {
      json_decref(v);
      return moco_error(MOCO_EINVAL, "config path '%s': '%s' is not an object", path, key);
    }
    node = child;
    path = dot + 1;
  }
}

long long config_int(const json_t *root, const char *path) {
  json_t *v = config_get(root, path);
  return json_is_integer(v) ? json_integer_value(v) : json_is_real(v) ? (long long)json_real_value(v)
                                                                       : 0;
}

double config_num(const json_t *root, const char *path) {
  json_t *v = config_get(root, path);
  return json_is_number(v) ? json_number_value(v) : 0.0;
}

int config_bool(const json_t *root, const char *path) { return json_is_true(config_get(root, path)); }

const char *config_str(const json_t *root, const char *path) {
  json_t *v = config_get(root, path);
  return json_is_string(v) ? json_string_value(v) : "";
}

/* ---------------------------------------------------------------------------------------------------
 * Value checks.
 * ------------------------------------------------------------------------------------------------- */

const char *config_type_name(config_type t) {
  switch (t) {
  case CONFIG_INT: return "integer";
  case CONFIG_NUM: return "number";
  case CONFIG_BOOL: return "boolean";
  case CONFIG_STR: return "string";
  case CONFIG_ENUM: return "string";
  case CONFIG_LAYERS: return "layer list";
  case CONFIG_INTS: return "integer list";
  }
  return "?";
}

/* "a|b|c": the names of an enum row, for messages. */
void config_names_text(const enum_name *t, const char *sep, char *buf, size_t n) {
  size_t k = 0;
  buf[0] = '\0';
  for (; t->name; t++) {
    int w = snprintf(buf + k, n - k, "%s%s", k ? sep : "", t->name);
    if (w < 0 || (size_t)w >= n - k) return;
    k += (size_t)w;
  }
}

static int enum_has(const enum_name *t, const char *word) {
  for (; t->name; t++)
    if (!strcmp(t->name, word)) return 1;
  return 0;
}

/* The value as it appeared, for messages: compact JSON, cut at a reasonable length. */
static void show_value(const json_t *v, char *buf, size_t n) {
  char *s = json_dumps(v, LOG_JSON_FLAGS);
  if (!s) {
    snprintf(buf, n, "?");
    return;
  }
  if (strlen(s) > 60) snprintf(buf, n, "%.57s...", s);
  else snprintf(buf, n, "%s", s);
  free(s);
}

static void fmt_bound(char *buf, size_t n, double v) {
  if (v == (long long)v && fabs(v) < 1e15) snprintf(buf, n, "%lld", (long long)v);
  else snprintf(buf, n, "%g", v);
}

/* "[0, 1]", "(0, 1]", "[0, 1)": the row's bounds as an interval. */
void config_range_text(const config_option *o, char *buf, size_t n) {
  char lo[32], hi[32];
  fmt_bound(lo, sizeof lo, o->min);
  fmt_bound(hi, sizeof hi, o->max);
  snprintf(buf, n, "%c%s, %s%c", o->flags & CONFIG_MIN_OPEN ? '(' : '[', lo, hi,
           o->flags & CONFIG_MAX_OPEN ? ')' : ']');
}

static int check_layers(const json_t *v, char *why, size_t n) {
  if (!json_is_array(v)) return snprintf(why, n, "expected a layer list (JSON array)"), MOCO_ECONFIG;
  size_t i;
  json_t *l;
  json_array_foreach(v, i, l) {
    if (!json_is_object(l) || !json_is_string(json_object_get(l, "type")))
      return snprintf(why, n, "element %zu: expected an object with a \"type\" string", i),
             MOCO_ECONFIG;
  }
  return 0;
}

int config_check_value(const config_option *o, const json_t *v, char *why, size_t n) {
  char found[96], lo[80], hi[32];
  show_value(v, found, sizeof found);
  switch (o->type) {
  case CONFIG_INT:
  case CONFIG_NUM: {
    double x;
    if (json_is_integer(v)) x = (double)json_integer_value(v);
    else if (json_is_real(v)) x = json_real_value(v);
    else return snprintf(why, n, "expected %s, found %s", config_type_name(o->type), found), MOCO_ECONFIG;
    if (o->type == CONFIG_INT && x != floor(x))
      return snprintf(why, n, "expected an integer, found %s", found), MOCO_ECONFIG;
    int lo_ok = o->flags & CONFIG_MIN_OPEN ? x > o->min : x >= o->min;
    int hi_ok = o->flags & CONFIG_MAX_OPEN ? x < o->max : x <= o->max;
    if (!lo_ok || !hi_ok) {
      config_range_text(o, lo, sizeof lo);
      return snprintf(why, n, "value %s out of range, allowed %s", found, lo), MOCO_ECONFIG;
    }
    return 0;
  }
  case CONFIG_BOOL:
    if (!json_is_boolean(v))
      return snprintf(why, n, "expected true or false, found %s", found), MOCO_ECONFIG;
    return 0;
  case CONFIG_STR:
    if (!json_is_string(v)) return snprintf(why, n, "expected a string, found %s", found), MOCO_ECONFIG;
    return 0;
  case CONFIG_ENUM:
    if (!json_is_string(v) || !enum_has(o->names, json_string_value(v))) {
      char names[256];
      config_names_text(o->names, "|", names, sizeof names);
      return snprintf(why, n, "value %s not allowed, expected one of %s", found, names), MOCO_ECONFIG;
    }
    return 0;
  case CONFIG_LAYERS: return check_layers(v, why, n);
  case CONFIG_INTS: {
    if (!json_is_array(v)) return snprintf(why, n, "expected a list of integers, found %s", found), MOCO_ECONFIG;
    size_t i;
    json_t *x;
    json_array_foreach(v, i, x) {
      double d = json_is_number(x) ? json_number_value(x) : NAN;
      if (!json_is_number(x) || d != floor(d) || d < o->min || d > o->max) {
        fmt_bound(lo, sizeof lo, o->min);
        fmt_bound(hi, sizeof hi, o->max);
        return snprintf(why, n, "element %zu: expected an integer in [%s, %s], found %s", i, lo, hi, found),
               MOCO_ECONFIG;
      }
    }
    return 0;
  }
  }
  return 0;
}

/* ---------------------------------------------------------------------------------------------------
 * Rules that tie options together: each returns 0 or writes the problem (path first) to why.
 * ------------------------------------------------------------------------------------------------- */

typedef int (*config_rule)(const json_t *root, char *why, size_t n);

static int rule_length(const json_t *root, char *why, size_t n) {
  if (config_int(root, "optim.steps") == 0 && config_int(root, "optim.epochs") == 0)
    return snprintf(why, n, "optim.steps: 0 with optim.epochs 0: set one of them to the training "
                            "length"), 1;
  return 0;
}

static int rule_queue_batch(const json_t *root, char *why, size_t n) {
  long long K = config_int(root, "contrast.queue_size"), B = config_int(root, "optim.batch_size");
  if (K < B)
    return snprintf(why, n, "contrast.queue_size: value %lld smaller than optim.batch_size %lld: the "
                            "queue must hold at least one batch of keys", K, B), 1;
  return 0;
}

static int rule_ranges(const json_t *root, char *why, size_t n) {
  const char *pairs[][2] = {
      {"views.crop_scale_min", "views.crop_scale_max"},
      {"views.crop_ratio_min", "views.crop_ratio_max"},
      {"views.brightness_min", "views.brightness_max"},
      {"views.contrast_min", "views.contrast_max"},
      {"views.saturation_min", "views.saturation_max"},
      {"views.erase_scale_min", "views.erase_scale_max"},
      {"views.erase_ratio_min", "views.erase_ratio_max"},
      {"views.noise_std_min", "views.noise_std_max"},
      {"views.mask_rate_min", "views.mask_rate_max"},
      {"contrast.hardness.min", "contrast.hardness.max"},
  };
  for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
    double a = config_num(root, pairs[i][0]), b = config_num(root, pairs[i][1]);
    if (a > b)
      return snprintf(why, n, "%s: value %g greater than %s %g", pairs[i][0], a, pairs[i][1], b), 1;
  }
  return 0;
}

static int rule_milestones(const json_t *root, char *why, size_t n) {
  json_t *m = config_get(root, "optim.milestones");
  if (json_array_size(m) > 16)
    return snprintf(why, n, "optim.milestones: %zu milestones, at most 16", json_array_size(m)), 1;
  for (size_t i = 1; i < json_array_size(m); i++)
    if (json_integer_value(json_array_get(m, i)) <= json_integer_value(json_array_get(m, i - 1)))
      return snprintf(why, n, "optim.milestones: element %zu not above the one before: they must ascend", i), 1;
  return 0;
}

static int rule_groups(const json_t *root, char *why, size_t n) {
  json_t *g = config_get(root, "eval.groups");
  for (size_t i = 0; i < json_array_size(g); i++)
    for (size_t j = 0; j < i; j++)
      if (json_integer_value(json_array_get(g, i)) == json_integer_value(json_array_get(g, j)))
        return snprintf(why, n, "eval.groups: element %zu repeats class %lld: name each class once", i,
                        (long long)json_integer_value(json_array_get(g, i))), 1;
  return 0;
}

static int rule_band(const json_t *root, char *why, size_t n) {
  double lo = config_num(root, "contrast.negatives.band_lo"), hi = config_num(root, "contrast.negatives.band_hi");
  if (!(lo < hi))
    return snprintf(why, n, "contrast.negatives.band_lo: value %g not below band_hi %g", lo, hi), 1;
  return 0;
}

static int rule_bn_groups(const json_t *root, char *why, size_t n) {
  long long g = config_int(root, "contrast.shuffle_bn_groups"), B = config_int(root, "optim.batch_size");
  if (g > B)
    return snprintf(why, n, "contrast.shuffle_bn_groups: value %lld above optim.batch_size %lld", g, B), 1;
  return 0;
}

/* Nesterov's look-ahead is a momentum step: without momentum it would silently be plain SGD. */
static int rule_nesterov(const json_t *root, char *why, size_t n) {
  if (config_bool(root, "optim.nesterov") && !(config_num(root, "optim.momentum") > 0))
    return snprintf(why, n, "optim.nesterov: true needs optim.momentum above 0, found %g",
                    config_num(root, "optim.momentum")), 1;
  return 0;
}

/* A dynamic controller needs a signal that the strategy's knob moves (contrast/hardness.h). */
static int rule_signal(const json_t *root, char *why, size_t n) {
  int mode = 0, signal = 0, strategy = 0;
  enum_value_of(hardness_mode_names, config_str(root, "contrast.hardness.mode"), &mode);
  enum_value_of(hardness_signal_names, config_str(root, "contrast.hardness.signal"), &signal);
  enum_value_of(mine_strategy_names, config_str(root, "contrast.negatives.strategy"), &strategy);
  hardness_config h = {.mode = (hardness_mode)mode, .signal = (hardness_signal)signal};
  if (hardness_signal_moves(&h, (mine_strategy)strategy))
    return snprintf(why, n, "contrast.%s", moco_errmsg()), 1;
  return 0;
}

static const config_rule config_rules[] = {rule_length, rule_queue_batch, rule_ranges, rule_milestones,
                                           rule_band, rule_bn_groups, rule_groups, rule_nesterov, rule_signal};

static void check_rules(const json_t *root, report_buf *rep) {
  char why[512];
  for (size_t i = 0; i < sizeof config_rules / sizeof config_rules[0]; i++)
    if (config_rules[i](root, why, sizeof why)) report_add(rep, "%s", why);
}

static void walk(json_t *obj, const char *prefix, report_buf *rep) {
  const char *key;
  json_t *v;
  char path[512];
  json_object_foreach(obj, key, v) {
    if (!strncmp(key, "//", 2)) continue; /* a comment */
    if (*prefix) snprintf(path, sizeof path, "%s.%s", prefix, key);
    else snprintf(path, sizeof path, "%s", key);
    const config_option *o = config_option_find(path);
    if (o) {
      char why[512];
      if (config_check_value(o, v, why, sizeof why)) report_add(rep, "%s: %s", path, why);
    } else if (is_section(path)) {
      if (json_is_object(v)) walk(v, path, rep);
      else report_add(rep, "%s: expected an object (a section), found %s", path,
                      json_is_array(v) ? "an array" : "a value");
    } else {
      char s[256];
      if (config_suggest(path, s, sizeof s)) report_add(rep, "%s: unknown key (did you mean '%s'?)", path, s);
      else report_add(rep, "%s: unknown key", path);
    }
  }
}

/* ---------------------------------------------------------------------------------------------------
 * Loading, overriding, finalizing, setting.
 * ------------------------------------------------------------------------------------------------- */

json_t *config_new(void) { return json_object(); }

/* Lays `over` onto `base`: objects merge key by key, anything else (numbers, strings, layer lists)
 * replaces what base had. */
static int merge_into(json_t *base, json_t *over) {
  const char *key;
  json_t *v;
  json_object_foreach(over, key, v) {
    json_t *b = json_object_get(base, key);
    if (json_is_object(b) && json_is_object(v)) {
      int rc = merge_into(b, v);
      if (rc) return rc;
    } else if (json_object_set(base, key, v)) {
      return MOCO_ENOMEM;
    }
  }
  return 0;
}

static int load_file(json_t **root, const char *path, int depth) {
  json_error_t e;
  *root = NULL;
  if (depth > 8) return moco_error(MOCO_EFORMAT, "%s: \"extends\" nested more than 8 deep (a cycle?)", path);
  FILE *f = fopen(path, "rb");
  if (!f) return moco_error(MOCO_ENOENT, "%s: %s", path, strerror(errno));
  json_t *j = json_loadf(f, JSON_REJECT_DUPLICATES, &e);
  fclose(f);
  if (!j) return moco_error(MOCO_EFORMAT, "%s:%d:%d: %s", path, e.line, e.column, e.text);
  if (!json_is_object(j)) {
    json_decref(j);
    return moco_error(MOCO_EFORMAT, "%s: the top level must be a JSON object", path);
  }
  json_t *ext = json_object_get(j, "extends");
  if (ext) {
    if (!json_is_string(ext)) {
      json_decref(j);
      return moco_error(MOCO_EFORMAT, "%s: extends: expected a file name", path);
    }
    /* Relative to the directory of the file that names it. */
    char base_path[4096];
    const char *name = json_string_value(ext);
    const char *slash = strrchr(path, '/');
    if (name[0] == '/' || !slash) snprintf(base_path, sizeof base_path, "%s", name);
    else snprintf(base_path, sizeof base_path, "%.*s/%s", (int)(slash - path), path, name);
    json_t *base;
    int rc = load_file(&base, base_path, depth + 1);
    if (rc) {
      json_decref(j);
      return moco_error_wrap(rc, "%s: extends", path);
    }
    json_object_del(j, "extends");
    rc = merge_into(base, j);
    json_decref(j);
    if (rc) {
      json_decref(base);
      return rc;
    }
    j = base;
  }
  *root = j;
  return 0;
}

int config_load_file(json_t **root, const char *path) { return load_file(root, path, 0); }

int config_override(json_t *root, const char *assignment) {
  const char *eq = strchr(assignment, '=');
  if (!eq || eq == assignment)
    return moco_error(MOCO_EINVAL, "--set '%s': expected PATH=VALUE", assignment);
  char path[256];
  size_t n = (size_t)(eq - assignment);
  if (n >= sizeof path) return moco_error(MOCO_EINVAL, "--set: path of %zu bytes is too long", n);
  memcpy(path, assignment, n);
  path[n] = '\0';
  json_error_t e;
  json_t *v = json_loads(eq + 1, JSON_DECODE_ANY, &e);
  if (!v) v = json_string(eq + 1); /* `--set data.dir=/tmp/x`: a bare word is a string */
  if (!v) return moco_error(MOCO_EINVAL, "--set %s: value is neither JSON nor UTF-8 text", path);
  int rc = set_path(root, path, v);
  return rc ? moco_error_wrap(rc, "--set %s", path) : 0;
}

static int fill_defaults(json_t *root) {
  for (size_t i = 0; i < config_n_options; i++) {
    const config_option *o = &config_options[i];
    if (config_get(root, o->path)) continue;
    json_error_t e;
    json_t *v = json_loads(o->def, JSON_DECODE_ANY, &e);
    if (!v) return moco_error(MOCO_EINVAL, "schema: default of %s does not parse: %s", o->path, e.text);
    int rc = set_path(root, o->path, v);
    if (rc) return rc;
  }
  return 0;
}

int config_finalize(json_t *root, char **report) {
  report_buf rep = {0};
  if (report) *report = NULL;
  if (!json_is_object(root)) return moco_error(MOCO_ECONFIG, "config: the top level must be an object");
  walk(root, "", &rep);
  if (rep.count == 0) {
    int rc = fill_defaults(root);
    if (rc) {
      free(rep.s);
      return rc;
    }
    check_rules(root, &rep);
  }
  if (rep.count == 0) {
    free(rep.s);
    return 0;
  }
  int count = rep.count;
  if (report) *report = rep.s;
  else free(rep.s);
  if (count == 1) return moco_error(MOCO_ECONFIG, "%s", rep.first);
  return moco_error(MOCO_ECONFIG, "%s (and %d more problems)", rep.first, count - 1);
}

int config_set(json_t *root, const char *path, const json_t *value, int runtime) {
  const config_option *o = config_option_find(path);
  if (!o) {
    char s[256];
    if (config_suggest(path, s, sizeof s)) return moco_error(MOCO_ENOENT, "%s: unknown key (did you mean '%s'?)", path, s);
    return moco_error(MOCO_ENOENT, "%s: unknown key", path);
  }
  if (runtime && !(o->flags & CONFIG_RUNTIME))
    return moco_error(MOCO_ESTATE, "%s: cannot change while training (it fixes the model, data or "
                                   "memory layout); change it in the config file and restart",
                      path);
  char why[512];
  if (config_check_value(o, value, why, sizeof why))
    return moco_error(MOCO_ECONFIG, "%s: %s", path, why);
  /* Try the change on a copy so that a rule it breaks leaves the config as it was. */
  json_t *copy = json_deep_copy(root);
  if (!copy) return MOCO_ENOMEM;
  int rc = set_path(copy, path, json_deep_copy(value));
  if (rc) {
    json_decref(copy);
    return rc;
  }
  report_buf rep = {0};
  check_rules(copy, &rep);
  json_decref(copy);
  free(rep.s);
  if (rep.count) return moco_error(MOCO_ECONFIG, "%s", rep.first);
  return set_path(root, path, json_deep_copy(value));
}

/* ---------------------------------------------------------------------------------------------------
 * The config as the modules' structs.
 * ------------------------------------------------------------------------------------------------- */

/* Writes one row's value into its field. The schema has validated the value; what is checked here is
 * what the row cannot say: a string longer than its field, a field of a size the type does not bind. */
static int bind(const config_option *o, const json_t *v, mocod_config *c) {
  char *f = (char *)c + o->off;
  switch (o->type) {
  case CONFIG_INT: {
    int64_t x = json_is_integer(v) ? json_integer_value(v) : (int64_t)json_number_value(v);
    int32_t x32 = (int32_t)x;
    if (o->size == sizeof x) memcpy(f, &x, sizeof x);
    else if (o->size == sizeof x32) memcpy(f, &x32, sizeof x32);
    else break;
    return 0;
  }
  case CONFIG_NUM: {
    double x = json_number_value(v);
    float x32 = (float)x;
    if (o->size == sizeof x) memcpy(f, &x, sizeof x);
    else if (o->size == sizeof x32) memcpy(f, &x32, sizeof x32);
    else break;
    return 0;
  }
  case CONFIG_BOOL:
  case CONFIG_ENUM: {
    int x = json_is_true(v);
    if (o->type == CONFIG_ENUM && enum_value_of(o->names, json_string_value(v), &x))
      return moco_error_wrap(MOCO_ECONFIG, "%s", o->path);
    if (o->size != sizeof x) break;
    memcpy(f, &x, sizeof x);
    return 0;
  }
  case CONFIG_STR: {
    const char *x = json_string_value(v);
    size_t len = strlen(x);
    if (len >= o->size) return moco_error(MOCO_ECONFIG, "%s: %zu bytes, at most %zu", o->path, len, o->size - 1);
    memcpy(f, x, len + 1);
    return 0;
  }
  case CONFIG_LAYERS: {
    const json_t *x = v;
    if (o->size != sizeof x) break;
    memcpy(f, &x, sizeof x);
    return 0;
  }
  case CONFIG_INTS: {
    int count = 0;
    for (size_t i = 0; i < json_array_size(v); i++, count++) {
      int64_t x = json_integer_value(json_array_get(v, i));
      if ((i + 1) * sizeof x > o->size)
        return moco_error(MOCO_ECONFIG, "%s: %zu elements, at most %zu", o->path, json_array_size(v),
                          o->size / sizeof x);
      memcpy(f + i * sizeof x, &x, sizeof x);
    }
    memcpy((char *)c + o->count_off, &count, sizeof count);
    return 0;
  }
  }
  return moco_error(MOCO_EINVAL, "schema: %s binds a field of %zu bytes, which its type cannot", o->path,
                    o->size);
}

/* A data spec with data.dir applied: each comma-separated entry that is not absolute is taken from
 * the directory. */
static int data_spec(const char *dir, const char *spec, const char *key, char *out, size_t n) {
  size_t k = 0;
  out[0] = '\0';
  while (*spec) {
    const char *comma = strchr(spec, ',');
    size_t len = comma ? (size_t)(comma - spec) : strlen(spec);
    int w = snprintf(out + k, n - k, "%s%s%s%.*s", k ? "," : "", spec[0] == '/' || !*dir ? "" : dir,
                     spec[0] == '/' || !*dir ? "" : "/", (int)len, spec);
    if (w < 0 || (size_t)w >= n - k) return moco_error(MOCO_ECONFIG, "%s: path longer than %zu bytes", key, n);
    k += (size_t)w;
    spec += len + (comma ? 1 : 0);
  }
  return 0;
}

int config_read(const json_t *root, mocod_config *c) {
  memset(c, 0, sizeof *c);
  for (size_t i = 0; i < config_n_options; i++) {
    const config_option *o = &config_options[i];
    const json_t *v = config_get(root, o->path);
    if (!v) return moco_error(MOCO_ECONFIG, "%s: missing (the config is not finalized)", o->path);
    int rc = bind(o, v, c);
    if (rc) return rc;
  }
  trainer_config *t = &c->trainer;
  int rc = data_spec(c->data.dir, c->data.train, "data.train", t->train, sizeof t->train);
  if (!rc) rc = data_spec(c->data.dir, c->data.train_labels, "data.train_labels", t->train_labels,
                          sizeof t->train_labels);
  if (!rc) rc = data_spec(c->data.dir, c->data.eval, "data.eval", t->eval, sizeof t->eval);
  if (!rc) rc = data_spec(c->data.dir, c->data.eval_labels, "data.eval_labels", t->eval_labels,
                          sizeof t->eval_labels);
  return rc;
}

int config_to_trainer(const json_t *root, trainer_config *tc) {
  mocod_config *c = malloc(sizeof *c);
  if (!c) return moco_error(MOCO_ENOMEM, "config: %zu bytes", sizeof *c);
  int rc = config_read(root, c);
  if (!rc) *tc = c->trainer;
  free(c);
  return rc;
}

/* Built once: the tree stays alive because the struct's layer lists borrow from it. */
static struct {
  pthread_once_t once;
  json_t *root;
  mocod_config cfg;
  int ok;
} defaults = {.once = PTHREAD_ONCE_INIT};

static void build_defaults(void) {
  defaults.root = config_new();
  defaults.ok = defaults.root && !config_finalize(defaults.root, NULL) && !config_read(defaults.root, &defaults.cfg);
}

const mocod_config *config_defaults(void) {
  pthread_once(&defaults.once, build_defaults);
  return defaults.ok ? &defaults.cfg : NULL;
}
