#include "data/loader.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/err.h"
#include "core/tensor.h"

#define LOADER_MAX_WORKERS 64
#define LOADER_STATE_VERSION 1

const enum_name loader_bad_policy_names[] = {{"stop", LOADER_BAD_STOP}, {"skip", LOADER_BAD_SKIP}, {NULL, 0}};

/* A batch travels FREE -> (reader fills the stored records) RAW -> (a worker makes the views) WORK ->
 * READY -> (delivered; the consumer holds it until its next call) FREE. An error or the end of the
 * stream is a READY slot with `err` or `end` set and nothing in it. */
enum { SLOT_FREE, SLOT_RAW, SLOT_WORK, SLOT_READY };

typedef struct {
  int state;
  uint64_t seq;
  int size, err, end;
  char errmsg[1024];
  uint8_t *raw;
  int64_t *ids;
  int32_t *labels;
  float *view1, *view2;
  uint64_t epoch, index, samples, skipped;
  loader_pos next; /* position after this batch */
} slot;

/* Everything only the reader thread touches while the pipeline runs. */
typedef struct {
  uint64_t epoch, batch, samples, skipped, seq;
  uint32_t *order;                /* this epoch's file order */
  uint32_t cur_file;              /* reading position: index into order, record in that file */
  uint64_t cur_off;
  dataset_reader rd;
  int rd_open;
  rng_t rng;                      /* the epoch's shuffle stream */
  /* the shuffle window */
  uint8_t *wraw;
  int64_t *wid;
  int32_t *wlabel;
  uint32_t *perm;
  size_t cap, len, next;
  uint32_t win_file;              /* where the window's reading started, and the state before it */
  uint64_t win_off, win_skipped;
  rng_t win_rng;
  uint64_t pending;               /* records of the next window already delivered (after a seek) */
  /* disjoint shares (loader.h "Shares") */
  uint8_t *need;                  /* [cap] window slots that land in this share's rows */
  uint32_t rd_file;               /* index into order of the file rd has open */
  uint64_t records_read;          /* records read from the files since open */
} reader_state;

typedef struct {
  struct loader_impl *I;
  int index;
} worker_arg;

struct loader_impl {
  loader_config cfg;
  char *strings[4];
  float *norm;                    /* mean then std, norm_len each */
  dataset train, eval;
  int has_eval;
  int disjoint;                   /* this share reads only the records of its rows */
  view_pipeline views;
  size_t stride;                  /* stored bytes of one record: sample, then the pair's second */
  int n_slots;
  slot *slots;
  view_scratch *scratch;
  worker_arg *wargs;

  pthread_mutex_t mu;
  pthread_cond_t cv_reader, cv_worker, cv_consumer;
  pthread_t reader;
  pthread_t *workers;
  int running, stop;
  uint64_t skipped_seen;          /* under mu: the reader's count, for loader_skipped */
  uint64_t read_seen;             /* under mu: the reader's records_read, for loader_records_read */
  char last_skip[512];            /* under mu */

  reader_state rs;

  /* the consumer's side */
  uint64_t consume_seq;
  int held, ended, err;
  char errmsg[1024];
  loader_pos pos;                 /* of the next batch loader_next returns */
  double wait;
};

/* ---- the order of records: epochs, file order, shuffle windows (reader thread) ---- */

/* The shuffle stream of an epoch, after it has drawn the epoch's file order into `order`. */
static void epoch_order(const struct loader_impl *I, uint64_t epoch, uint32_t *order, rng_t *rng) {
  rng_init(rng, I->cfg.seed + 0xd1b54a32d192ed03ULL * (epoch + 1), RNG_STREAM_SHUFFLE);
  for (int i = 0; i < I->train.n_files; i++) order[i] = (uint32_t)i;
  if (I->cfg.shuffle_buffer > 0) rng_shuffle_u32(rng, order, (uint32_t)I->train.n_files);
}

static void close_reader(reader_state *rs) {
  if (rs->rd_open) dataset_reader_close(&rs->rd);
  rs->rd_open = 0;
}

static void epoch_begin(struct loader_impl *I, uint64_t epoch) {
  reader_state *rs = &I->rs;
  close_reader(rs);
  rs->epoch = epoch;
  rs->batch = 0;
  epoch_order(I, epoch, rs->order, &rs->rng);
  rs->cur_file = 0;
  rs->cur_off = 0;
  rs->len = rs->next = 0;
  rs->pending = 0;
}

static int epoch_done(const struct loader_impl *I) { return I->rs.cur_file >= (uint32_t)I->train.n_files; }

static void note_skip(struct loader_impl *I, uint64_t n) {
  I->rs.skipped += n;
  pthread_mutex_lock(&I->mu);
  I->skipped_seen = I->rs.skipped;
  snprintf(I->last_skip, sizeof I->last_skip, "%s", moco_errmsg());
  pthread_mutex_unlock(&I->mu);
}

/* Rows [lo, hi) of a batch of `size` that this process makes views of and hands out. */
static void share_rows(const loader_config *c, int size, int *lo, int *hi) {
  int n = c->share_count > 1 ? c->share_count : 1;
  *lo = (int)((long)size * c->share_index / n);
  *hi = (int)((long)size * (c->share_index + 1) / n);
}

/* A new window starts at the reading position; what is kept to rebuild it on resume. */
static void window_begin(reader_state *rs) {
  rs->win_file = rs->cur_file;
  rs->win_off = rs->cur_off;
  rs->win_skipped = rs->skipped;
  rs->win_rng = rs->rng;
  rs->len = rs->next = 0;
}

/* The window's permutation (identity without shuffling); records already delivered from it (a resumed
 * window) are passed over. */
static int window_order(struct loader_impl *I) {
  reader_state *rs = &I->rs;
  for (size_t i = 0; i < rs->len; i++) rs->perm[i] = (uint32_t)i;
  if (I->cfg.shuffle_buffer > 0) rng_shuffle_u32(&rs->rng, rs->perm, (uint32_t)rs->len);
  if (rs->pending > rs->len)
    return moco_error(MOCO_ESTATE, "%s: the saved position is record %llu of a shuffle window that now holds "
                      "%zu: the data set changed since it was saved", I->train.name,
                      (unsigned long long)rs->pending, rs->len);
  rs->next = rs->pending;
  rs->pending = 0;
  return 0;
}

/* Slot i of the window gets the record. */
static void window_store(struct loader_impl *I, size_t i, const data_record *rec) {
  reader_state *rs = &I->rs;
  size_t sb = I->train.sample_bytes;
  uint8_t *dst = rs->wraw + i * I->stride;
  memcpy(dst, rec->sample, sb);
  if (I->train.has_pair) memcpy(dst + sb, rec->pair, sb);
  rs->wid[i] = rec->id;
  rs->wlabel[i] = rec->label;
}

static void publish_reads(struct loader_impl *I) {
  pthread_mutex_lock(&I->mu);
  I->read_seen = I->rs.records_read;
  pthread_mutex_unlock(&I->mu);
}

/* Past files with no records left, so that the reading position names a record (or the epoch's end). */
static void skip_spent_files(struct loader_impl *I) {
  reader_state *rs = &I->rs;
  while (!epoch_done(I) && rs->cur_off >= I->train.files[rs->order[rs->cur_file]].count) {
    if (rs->rd_open && rs->rd_file == rs->cur_file) close_reader(rs);
    rs->cur_file++;
    rs->cur_off = 0;
  }
}

/* Reads the record at the reading position into slot i, through a reader that seeks. */
static int read_slot(struct loader_impl *I, size_t i) {
  reader_state *rs = &I->rs;
  const dataset *ds = &I->train;
  int rc = 0;
  if (rs->rd_open && rs->rd_file != rs->cur_file) close_reader(rs);
  if (!rs->rd_open) {
    if ((rc = dataset_reader_open_seekable(&rs->rd, ds, (int)rs->order[rs->cur_file])))
      return moco_error_wrap(rc, "%s", ds->name);
    rs->rd_open = 1;
    rs->rd_file = rs->cur_file;
  }
  data_record rec;
  if (!(rc = dataset_reader_seek(&rs->rd, rs->cur_off)) && (rc = dataset_reader_next(&rs->rd, &rec)) == 0)
    rc = moco_error(MOCO_EEOF, "record %llu of file %d is missing", (unsigned long long)rs->cur_off,
                    (int)rs->order[rs->cur_file]);
  if (rc < 0) return moco_error_wrap(rc, "%s", ds->name);
  rs->records_read++;
  window_store(I, i, &rec);
  return 0;
}

/* The window of a disjoint share (loader.h "Shares"). No record is bad (disjoint reading is for
 * data.bad_record stop: a bad one ends the stream), so the window's length, and with it the
 * permutation, follow from the files' record counts before anything is read; slot perm[j] goes to row
 * (row + j - next) mod B of the batches being filled (`row`: rows of the current one already filled),
 * and this share reads the slots of its rows only, in file order. */
static int refill_share(struct loader_impl *I, int row) {
  reader_state *rs = &I->rs;
  const dataset *ds = &I->train;
  window_begin(rs);
  for (uint32_t f = rs->cur_file; f < (uint32_t)ds->n_files && rs->len < rs->cap; f++) {
    uint64_t left = ds->files[rs->order[f]].count - (f == rs->cur_file ? rs->cur_off : 0);
    rs->len += left < rs->cap - rs->len ? (size_t)left : rs->cap - rs->len;
  }
  int rc = window_order(I);
  if (rc) return rc;
  int B = I->cfg.batch_size, lo, hi;
  share_rows(&I->cfg, B, &lo, &hi);
  memset(rs->need, 0, rs->len);
  for (size_t j = rs->next; j < rs->len; j++) {
    int r = (int)(((size_t)row + j - rs->next) % (size_t)B);
    rs->need[rs->perm[j]] = r >= lo && r < hi;
  }
  for (size_t i = 0; i < rs->len; i++, rs->cur_off++) {
    skip_spent_files(I);
    if (rs->need[i] && (rc = read_slot(I, i))) return rc;
    if (!rs->need[i]) rs->wid[i] = -1, rs->wlabel[i] = -1; /* another share's record, never handed out here */
  }
  skip_spent_files(I);
  publish_reads(I);
  return 0;
}

/* Reads up to `cap` good records from the reading position into the window and draws its permutation
 * (a disjoint share: refill_share). */
static int refill(struct loader_impl *I, int row) {
  if (I->disjoint) return refill_share(I, row);
  reader_state *rs = &I->rs;
  const dataset *ds = &I->train;
  window_begin(rs);
  while (rs->len < rs->cap && !epoch_done(I)) {
    int rc;
    if (!rs->rd_open) {
      if ((rc = dataset_reader_open(&rs->rd, ds, (int)rs->order[rs->cur_file], rs->cur_off)))
        return moco_error_wrap(rc, "%s", ds->name);
      rs->rd_open = 1;
    }
    data_record rec;
    rc = dataset_reader_next(&rs->rd, &rec);
    if (rc == 0) {
      close_reader(rs);
      rs->cur_file++;
      rs->cur_off = 0;
      continue;
    }
    if (rc < 0) {
      moco_error_wrap(rc, "%s", ds->name);
      if (I->cfg.bad_record == LOADER_BAD_STOP) return rc;
      rs->cur_off += rs->rd.bad;
      rs->records_read += rs->rd.bad;
      note_skip(I, rs->rd.bad);
      continue;
    }
    rs->cur_off++;
    rs->records_read++;
    window_store(I, rs->len++, &rec);
  }
  publish_reads(I);
  return window_order(I);
}

/* The position from which the rest of the stream can be rebuilt: the current window's start when it
 * still has records, else the reading position. */
static loader_pos current_pos(const struct loader_impl *I) {
  const reader_state *rs = &I->rs;
  loader_pos p = {.epoch = rs->epoch, .batch = rs->batch, .samples = rs->samples};
  int in_window = rs->next < rs->len;
  p.skipped = in_window ? rs->win_skipped : rs->skipped;
  p.file = in_window ? rs->win_file : rs->cur_file;
  p.offset = in_window ? rs->win_off : rs->cur_off;
  p.in_window = in_window ? rs->next : 0;
  p.rng = in_window ? rs->win_rng : rs->rng;
  return p;
}

static void seek_reader(struct loader_impl *I, const loader_pos *p) {
  reader_state *rs = &I->rs;
  epoch_begin(I, p->epoch);
  rs->batch = p->batch;
  rs->samples = p->samples;
  rs->skipped = p->skipped;
  rs->cur_file = p->file;
  rs->cur_off = p->offset;
  rs->rng = p->rng;
  rs->pending = p->in_window;
}

/* Fills slot s with the next batch's stored records, moving on to the next epoch where one ends. */
static int produce(struct loader_impl *I, slot *s) {
  reader_state *rs = &I->rs;
  int B = I->cfg.batch_size;
  for (;;) {
    if (I->cfg.epochs && rs->epoch >= (uint64_t)I->cfg.epochs) {
      s->end = 1;
      return 0;
    }
    int n = 0, rc;
    while (n < B) {
      if (rs->next == rs->len) {
        if (epoch_done(I) && !rs->pending) break;
        if ((rc = refill(I, n))) return rc;
        continue;
      }
      uint32_t k = rs->perm[rs->next++];
      memcpy(s->raw + (size_t)n * I->stride, rs->wraw + k * I->stride, I->stride);
      s->ids[n] = rs->wid[k];
      s->labels[n] = rs->wlabel[k];
      n++;
    }
    if (n == B || (n > 0 && !I->cfg.drop_last)) {
      s->size = n;
      s->epoch = rs->epoch;
      s->index = rs->batch++;
      s->samples = rs->samples;
      rs->samples += (uint64_t)n;
      s->skipped = rs->skipped;
      if (rs->next == rs->len && epoch_done(I)) epoch_begin(I, rs->epoch + 1);
      s->next = current_pos(I);
      return 0;
    }
    if (rs->batch == 0)
      return moco_error(MOCO_EEOF, "%s: epoch %llu yields no batch: %d record(s) left after %llu bad ones were "
                        "skipped, batch_size %d%s", I->train.name, (unsigned long long)rs->epoch, n,
                        (unsigned long long)rs->skipped, B, I->cfg.drop_last ? " with drop_last" : "");
    epoch_begin(I, rs->epoch + 1);
  }
}

/* ---- threads ---- */

static void *reader_main(void *arg) {
  struct loader_impl *I = arg;
  reader_state *rs = &I->rs;
  for (;;) {
    pthread_mutex_lock(&I->mu);
    slot *s = &I->slots[rs->seq % (uint64_t)I->n_slots];
    while (!I->stop && s->state != SLOT_FREE) pthread_cond_wait(&I->cv_reader, &I->mu);
    if (I->stop) {
      pthread_mutex_unlock(&I->mu);
      break;
    }
    pthread_mutex_unlock(&I->mu);
    s->size = s->err = s->end = 0;
    int rc = produce(I, s);
    pthread_mutex_lock(&I->mu);
    s->seq = rs->seq++;
    if (rc) {
      s->err = rc;
      snprintf(s->errmsg, sizeof s->errmsg, "%s", moco_errmsg());
    }
    int last = rc || s->end;
    s->state = last ? SLOT_READY : SLOT_RAW;
    pthread_cond_broadcast(last ? &I->cv_consumer : &I->cv_worker);
    pthread_mutex_unlock(&I->mu);
    if (last) break;
  }
  close_reader(rs);
  return NULL;
}

static slot *oldest_raw(struct loader_impl *I) {
  slot *best = NULL;
  for (int i = 0; i < I->n_slots; i++) {
    slot *s = &I->slots[i];
    if (s->state == SLOT_RAW && (!best || s->seq < best->seq)) best = s;
  }
  return best;
}

static void *worker_main(void *arg) {
  worker_arg *wa = arg;
  struct loader_impl *I = wa->I;
  pthread_mutex_lock(&I->mu);
  for (;;) {
    slot *s = NULL;
    while (!I->stop && !(s = oldest_raw(I))) pthread_cond_wait(&I->cv_worker, &I->mu);
    if (I->stop) break;
    s->state = SLOT_WORK;
    pthread_mutex_unlock(&I->mu);
    int lo, hi;
    share_rows(&I->cfg, s->size, &lo, &hi);
    view_batch_in in = {s->raw + (size_t)lo * I->stride, I->stride, hi - lo, s->ids + lo, I->cfg.seed,
                        s->epoch};
    view_batch(&I->views, &in, s->view1, s->view2, &I->scratch[wa->index]);
    pthread_mutex_lock(&I->mu);
    s->state = SLOT_READY;
    pthread_cond_broadcast(&I->cv_consumer);
  }
  pthread_mutex_unlock(&I->mu);
  return NULL;
}

static void pipeline_stop(struct loader_impl *I) {
  if (!I->running) return;
  pthread_mutex_lock(&I->mu);
  I->stop = 1;
  pthread_cond_broadcast(&I->cv_reader);
  pthread_cond_broadcast(&I->cv_worker);
  pthread_mutex_unlock(&I->mu);
  pthread_join(I->reader, NULL);
  for (int i = 0; i < I->running - 1; i++) pthread_join(I->workers[i], NULL);
  I->running = 0;
  I->stop = 0;
  for (int i = 0; i < I->n_slots; i++) I->slots[i].state = SLOT_FREE;
  I->held = -1;
}

static int pipeline_start(struct loader_impl *I) {
  seek_reader(I, &I->pos);
  I->rs.seq = 0;
  I->consume_seq = 0;
  I->skipped_seen = I->pos.skipped;
  if (pthread_create(&I->reader, NULL, reader_main, I))
    return moco_error(MOCO_ENOMEM, "loader: cannot start the reader thread");
  I->running = 1;
  for (int i = 0; i < I->cfg.workers; i++) {
    if (pthread_create(&I->workers[i], NULL, worker_main, &I->wargs[i])) {
      pipeline_stop(I);
      return moco_error(MOCO_ENOMEM, "loader: cannot start worker thread %d", i);
    }
    I->running++;
  }
  return 0;
}

/* ---- open / close ---- */

/* What the caller sets for the run (data, batch, length, statistics) and the bound of the worker array;
 * the configured values (shuffle_buffer, prefetch, ...) were checked against the config's schema. */
static int check_config(const loader_config *c) {
  const char *f = NULL;
  if (!c->train || !*c->train) f = "train: a data set is required";
  else if (c->batch_size < 1) f = "batch_size: expected >= 1";
  else if (c->workers < 1 || c->workers > LOADER_MAX_WORKERS) f = "workers: expected 1..64";
  else if (c->epochs < 0) f = "epochs: expected >= 0 (0 = endless)";
  else if (c->norm_len < 0 || (c->norm_len > 0 && (!c->mean || !c->std))) f = "mean/std: norm_len values needed";
  else if (c->share_count < 0 || c->share_index < 0 || c->share_index >= (c->share_count > 1 ? c->share_count : 1))
    f = "share_index: expected 0 <= share_index < share_count";
  if (f) return moco_error(MOCO_ECONFIG, "loader: %s", f);
  return 0;
}

/* The config keeps pointers the caller owns; the loader keeps its own copies. */
static int copy_config(struct loader_impl *I, const loader_config *c) {
  I->cfg = *c;
  const char *src[4] = {c->train, c->train_labels, c->eval, c->eval_labels};
  const char **dst[4] = {&I->cfg.train, &I->cfg.train_labels, &I->cfg.eval, &I->cfg.eval_labels};
  for (int i = 0; i < 4; i++) {
    if (!src[i]) continue;
    if (!(I->strings[i] = strdup(src[i]))) return MOCO_ENOMEM;
    *dst[i] = I->strings[i];
  }
  if (c->norm_len) {
    if (!(I->norm = malloc(2 * (size_t)c->norm_len * sizeof *I->norm))) return MOCO_ENOMEM;
    memcpy(I->norm, c->mean, (size_t)c->norm_len * sizeof *I->norm);
    memcpy(I->norm + c->norm_len, c->std, (size_t)c->norm_len * sizeof *I->norm);
    I->cfg.mean = I->norm;
    I->cfg.std = I->norm + c->norm_len;
  }
  return 0;
}

static int open_splits(struct loader_impl *I) {
  const loader_config *c = &I->cfg;
  int rc = dataset_open(&I->train, "train", c->train, c->train_labels, c->num_classes);
  if (rc) return rc;
  if (c->eval && *c->eval) {
    if ((rc = dataset_open(&I->eval, "eval", c->eval, c->eval_labels, c->num_classes))) return rc;
    I->has_eval = 1;
    data_shape a = I->train.shape, b = I->eval.shape;
    if (a.c != b.c || a.h != b.h || a.w != b.w || I->train.dtype != I->eval.dtype)
      return moco_error(MOCO_ESHAPE, "eval: samples %dx%dx%d %s disagree with train's %dx%dx%d %s", b.c, b.h,
                        b.w, data_dtype_name(I->eval.dtype), a.c, a.h, a.w, data_dtype_name(I->train.dtype));
  }
  if (c->view_mode == VIEW_PAIR && !I->train.has_pair)
    return moco_error(MOCO_ECONFIG, "loader: data.mode pair needs pair records; train (%s) holds single "
                      "samples (mocopack raw --pair writes them)", c->train);
  if (c->drop_last && I->train.count < (uint64_t)c->batch_size)
    return moco_error(MOCO_ECONFIG, "loader: train holds %llu samples, fewer than batch_size %d with drop_last",
                      (unsigned long long)I->train.count, c->batch_size);
  return 0;
}

static int alloc_buffers(struct loader_impl *I) {
  const loader_config *c = &I->cfg;
  size_t B = (size_t)c->batch_size, n = I->views.n;
  reader_state *rs = &I->rs;
  I->stride = I->train.sample_bytes * (I->train.has_pair ? 2 : 1);
  rs->cap = c->shuffle_buffer > 0 ? (size_t)c->shuffle_buffer : B;
  rs->order = malloc((size_t)I->train.n_files * sizeof *rs->order);
  rs->wraw = malloc(rs->cap * I->stride);
  rs->wid = malloc(rs->cap * sizeof *rs->wid);
  rs->wlabel = malloc(rs->cap * sizeof *rs->wlabel);
  rs->perm = malloc(rs->cap * sizeof *rs->perm);
  rs->need = malloc(rs->cap);
  I->n_slots = c->prefetch + 1;
  I->slots = calloc((size_t)I->n_slots, sizeof *I->slots);
  I->scratch = calloc((size_t)c->workers, sizeof *I->scratch);
  I->workers = calloc((size_t)c->workers, sizeof *I->workers);
  I->wargs = calloc((size_t)c->workers, sizeof *I->wargs);
  if (!rs->order || !rs->wraw || !rs->wid || !rs->wlabel || !rs->perm || !rs->need || !I->slots || !I->scratch ||
      !I->workers || !I->wargs)
    return MOCO_ENOMEM;
  for (int i = 0; i < I->n_slots; i++) {
    slot *s = &I->slots[i];
    s->raw = malloc(B * I->stride);
    s->ids = malloc(B * sizeof *s->ids);
    s->labels = malloc(B * sizeof *s->labels);
    s->view1 = tensor_alloc(B * n);
    s->view2 = tensor_alloc(B * n);
    if (!s->raw || !s->ids || !s->labels || !s->view1 || !s->view2) return MOCO_ENOMEM;
  }
  for (int i = 0; i < c->workers; i++) {
    I->wargs[i] = (worker_arg){I, i};
    if (view_scratch_init(&I->scratch[i], &I->views)) return MOCO_ENOMEM;
  }
  return 0;
}

static void free_impl(struct loader_impl *I) {
  reader_state *rs = &I->rs;
  close_reader(rs);
  free(rs->order);
  free(rs->wraw);
  free(rs->wid);
  free(rs->wlabel);
  free(rs->perm);
  free(rs->need);
  for (int i = 0; I->slots && i < I->n_slots; i++) {
    slot *s = &I->slots[i];
    free(s->raw);
    free(s->ids);
    free(s->labels);
    tensor_free(s->view1);
    tensor_free(s->view2);
  }
  free(I->slots);
  for (int i = 0; I->scratch && i < I->cfg.workers; i++) view_scratch_free(&I->scratch[i]);
  free(I->scratch);
  free(I->workers);
  free(I->wargs);
  view_free(&I->views);
  dataset_close(&I->train);
  if (I->has_eval) dataset_close(&I->eval);
  for (int i = 0; i < 4; i++) free(I->strings[i]);
  free(I->norm);
  pthread_mutex_destroy(&I->mu);
  pthread_cond_destroy(&I->cv_reader);
  pthread_cond_destroy(&I->cv_worker);
  pthread_cond_destroy(&I->cv_consumer);
  free(I);
}

/* Before any thread runs, rs.order is free to draw into; only the stream state is kept. */
static loader_pos start_pos(struct loader_impl *I) {
  loader_pos p = {0};
  epoch_order(I, 0, I->rs.order, &p.rng);
  return p;
}

int loader_open(loader *l, const loader_config *c) {
  memset(l, 0, sizeof *l);
  int rc = check_config(c);
  if (rc) return rc;
  struct loader_impl *I = calloc(1, sizeof *I);
  if (!I) return moco_error(MOCO_ENOMEM, "loader");
  pthread_mutex_init(&I->mu, NULL);
  pthread_cond_init(&I->cv_reader, NULL);
  pthread_cond_init(&I->cv_worker, NULL);
  pthread_cond_init(&I->cv_consumer, NULL);
  I->held = -1;
  if ((rc = copy_config(I, c))) goto fail;
  if ((rc = open_splits(I))) goto fail;
  if ((rc = view_init(&I->views, &I->cfg.augment, I->cfg.view_mode, I->train.shape, I->train.dtype,
                      I->cfg.norm_len, I->cfg.mean, I->cfg.std))) {
    moco_error_wrap(rc, "loader");
    goto fail;
  }
  /* Reading only this share's records needs files that seek, windows whose length is known before
   * reading (no skipped records) and no short last batch (whose rows would be split otherwise). */
  I->disjoint = c->share_count > 1 && c->bad_record == LOADER_BAD_STOP && c->drop_last && dataset_seekable(&I->train);
  if ((rc = alloc_buffers(I))) goto fail;
  I->pos = start_pos(I);
  l->impl = I;
  l->shape = I->train.shape;
  l->dtype = I->train.dtype;
  l->num_samples = I->train.count;
  l->eval_samples = I->has_eval ? I->eval.count : 0;
  l->num_classes = I->train.num_classes;
  l->has_labels = I->train.has_labels;
  l->has_eval = I->has_eval;
  return 0;
fail:
  if (rc == MOCO_ENOMEM) moco_error(rc, "loader: buffers for batch_size %d, shuffle_buffer %d, prefetch %d",
                                    c->batch_size, c->shuffle_buffer, c->prefetch);
  free_impl(I);
  return rc;
}

void loader_close(loader *l) {
  if (!l->impl) return;
  pipeline_stop(l->impl);
  free_impl(l->impl);
  l->impl = NULL;
}

/* ---- the consumer ---- */

int loader_next(loader *l, loader_batch *b) {
  struct loader_impl *I = l->impl;
  memset(b, 0, sizeof *b);
  if (I->held >= 0) {
    pthread_mutex_lock(&I->mu);
    I->slots[I->held].state = SLOT_FREE;
    pthread_cond_signal(&I->cv_reader);
    pthread_mutex_unlock(&I->mu);
    I->held = -1;
  }
  if (I->err) return moco_error(I->err, "%s", I->errmsg);
  if (I->ended) return 0;
  int rc;
  if (!I->running && (rc = pipeline_start(I))) return rc;
  int k = (int)(I->consume_seq % (uint64_t)I->n_slots);
  slot *s = &I->slots[k];
  double t0 = clock_now();
  pthread_mutex_lock(&I->mu);
  while (s->state != SLOT_READY) pthread_cond_wait(&I->cv_consumer, &I->mu);
  pthread_mutex_unlock(&I->mu);
  I->wait += clock_now() - t0;
  if (s->err) {
    I->err = s->err;
    snprintf(I->errmsg, sizeof I->errmsg, "%s", s->errmsg);
    return moco_error(I->err, "%s", I->errmsg);
  }
  if (s->end) {
    I->ended = 1;
    return 0;
  }
  int lo, hi;
  share_rows(&I->cfg, s->size, &lo, &hi);
  *b = (loader_batch){hi - lo,     s->view1, s->view2, s->ids + lo, s->labels + lo,
                      s->epoch,    s->index, s->samples, s->skipped};
  I->held = k;
  I->consume_seq++;
  I->pos = s->next;
  return 0;
}

void loader_position(const loader *l, loader_pos *p) { *p = l->impl->pos; }

int loader_seek(loader *l, const loader_pos *p) {
  struct loader_impl *I = l->impl;
  const dataset *ds = &I->train;
  uint32_t *order = malloc((size_t)ds->n_files * sizeof *order);
  rng_t r;
  if (!order) return moco_error(MOCO_ENOMEM, "loader_seek");
  epoch_order(I, p->epoch, order, &r);
  int rc = 0;
  uint64_t cap = I->cfg.shuffle_buffer > 0 ? (uint64_t)I->cfg.shuffle_buffer : (uint64_t)I->cfg.batch_size;
  if (p->file > (uint32_t)ds->n_files ||
      (p->file < (uint32_t)ds->n_files && p->offset > ds->files[order[p->file]].count) ||
      (p->file == (uint32_t)ds->n_files && (p->offset || p->in_window)))
    rc = moco_error(MOCO_ESTATE, "loader: position file %u offset %llu lies outside %s's %d file(s)", p->file,
                    (unsigned long long)p->offset, ds->name, ds->n_files);
  else if (p->in_window > cap)
    rc = moco_error(MOCO_ESTATE, "loader: position %llu records into a window of %llu",
                    (unsigned long long)p->in_window, (unsigned long long)cap);
  else if (!(p->rng.inc & 1))
    rc = moco_error(MOCO_ESTATE, "loader: position holds an invalid shuffle stream (even increment)");
  free(order);
  if (rc) return rc;
  pipeline_stop(I);
  I->pos = *p;
  I->err = I->ended = 0;
  I->held = -1;
  return 0;
}

typedef struct {
  uint64_t seed, count;
  uint32_t n_files, c, h, w, batch_size, shuffle_buffer, drop_last;
} state_key;

static state_key key_of(const struct loader_impl *I) {
  return (state_key){I->cfg.seed, I->train.count, (uint32_t)I->train.n_files, (uint32_t)I->train.shape.c,
                     (uint32_t)I->train.shape.h, (uint32_t)I->train.shape.w, (uint32_t)I->cfg.batch_size,
                     (uint32_t)I->cfg.shuffle_buffer, (uint32_t)I->cfg.drop_last};
}

void loader_save(const loader *l, blob_writer *w) {
  const struct loader_impl *I = l->impl;
  state_key k = key_of(I);
  const loader_pos *p = &I->pos;
  blob_section_begin(w, "LDRS");
  blob_put_u32(w, LOADER_STATE_VERSION);
  blob_put_u64(w, k.seed);
  blob_put_u64(w, k.count);
  uint32_t u[] = {k.n_files, k.c, k.h, k.w, k.batch_size, k.shuffle_buffer, k.drop_last};
  for (size_t i = 0; i < sizeof u / sizeof u[0]; i++) blob_put_u32(w, u[i]);
  uint64_t v[] = {p->epoch, p->batch, p->samples, p->skipped, p->offset, p->in_window, p->rng.state, p->rng.inc};
  blob_put_u32(w, p->file);
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) blob_put_u64(w, v[i]);
  blob_section_end(w);
}

int loader_load(loader *l, blob_reader *r) {
  blob_reader s;
  int rc = blob_section(r, "LDRS", &s);
  if (rc) return moco_error_wrap(rc, "loader state");
  uint32_t version = 0, u[7] = {0}, file = 0;
  uint64_t seed = 0, count = 0, v[8] = {0};
  rc = blob_get_u32(&s, &version);
  if (!rc && version != LOADER_STATE_VERSION)
    return moco_error(MOCO_EFORMAT, "loader state: version %u, expected %u", version, LOADER_STATE_VERSION);
  if (!rc) rc = blob_get_u64(&s, &seed);
  if (!rc) rc = blob_get_u64(&s, &count);
  for (int i = 0; !rc && i < 7; i++) rc = blob_get_u32(&s, &u[i]);
  if (!rc) rc = blob_get_u32(&s, &file);
  for (int i = 0; !rc && i < 8; i++) rc = blob_get_u64(&s, &v[i]);
  if (!rc && s.pos != s.len)
    rc = moco_error(MOCO_EFORMAT, "loader state: %zu unexpected bytes at the end", s.len - s.pos);
  if (rc) return moco_error_wrap(rc, "loader state");
  state_key k = key_of(l->impl);
  uint64_t have[] = {k.seed, k.count, k.n_files, k.c, k.h, k.w, k.batch_size, k.shuffle_buffer, k.drop_last};
  uint64_t saved[] = {seed, count, u[0], u[1], u[2], u[3], u[4], u[5], u[6]};
  static const char *names[] = {"seed", "train samples", "train files", "channels", "height", "width",
                                "batch_size", "shuffle_buffer", "drop_last"};
  for (int i = 0; i < 9; i++)
    if (have[i] != saved[i])
      return moco_error(MOCO_ESTATE, "loader state: saved with %s %llu, this loader has %llu; the position "
                        "is only valid for the same data set and order settings", names[i],
                        (unsigned long long)saved[i], (unsigned long long)have[i]);
  loader_pos p = {v[0], v[1], v[2], v[3], file, v[4], v[5], {v[6], v[7]}};
  return loader_seek(l, &p);
}

uint64_t loader_skipped(const loader *l, char *why, size_t n) {
  struct loader_impl *I = l->impl;
  pthread_mutex_lock(&I->mu);
  uint64_t k = I->skipped_seen;
  if (why && n) snprintf(why, n, "%s", I->last_skip);
  pthread_mutex_unlock(&I->mu);
  return k;
}

double loader_wait_seconds(const loader *l) { return l->impl->wait; }

uint64_t loader_records_read(const loader *l) {
  struct loader_impl *I = l->impl;
  pthread_mutex_lock(&I->mu);
  uint64_t k = I->read_seen;
  pthread_mutex_unlock(&I->mu);
  return k;
}

int loader_reads_share(const loader *l) { return l->impl->disjoint; }

/* ---- sequential scans ---- */

int loader_scan_open(loader_scan *s, const loader *l, loader_split split, int chunk) {
  memset(s, 0, sizeof *s);
  const struct loader_impl *I = l->impl;
  if (split == LOADER_EVAL && !I->has_eval)
    return moco_error(MOCO_ECONFIG, "loader: no eval data set configured");
  if (chunk < 1) return moco_error(MOCO_EINVAL, "loader_scan: chunk %d, expected >= 1", chunk);
  s->l = l;
  s->ds = split == LOADER_EVAL ? &I->eval : &I->train;
  s->chunk = chunk;
  size_t n = I->views.n * (size_t)chunk;
  s->view1 = tensor_alloc(n);
  s->view2 = s->ds->has_pair ? tensor_alloc(n) : NULL;
  s->ids = malloc((size_t)chunk * sizeof *s->ids);
  s->labels = malloc((size_t)chunk * sizeof *s->labels);
  if (!s->view1 || (s->ds->has_pair && !s->view2) || !s->ids || !s->labels) {
    loader_scan_close(s);
    return moco_error(MOCO_ENOMEM, "loader_scan: chunk of %d samples", chunk);
  }
  s->end = s->ds->count;
  return 0;
}

int loader_scan_range(loader_scan *s, uint64_t first, uint64_t end) {
  if (first > end || end > s->ds->count)
    return moco_error(MOCO_EINVAL, "loader_scan: records [%llu, %llu) outside %s's %llu", (unsigned long long)first,
                      (unsigned long long)end, s->ds->name, (unsigned long long)s->ds->count);
  uint64_t before = 0;
  s->file = 0;
  while (s->file < s->ds->n_files && before + s->ds->files[s->file].count <= first)
    before += s->ds->files[s->file++].count;
  s->start = first - before;
  s->at = first;
  s->end = end;
  return 0;
}

int loader_scan_next(loader_scan *s, loader_batch *b) {
  const struct loader_impl *I = s->l->impl;
  const view_pipeline *v = &I->views;
  memset(b, 0, sizeof *b);
  int n = 0, rc;
  while (n < s->chunk && s->file < s->ds->n_files && s->at < s->end) {
    if (!s->reading) {
      if ((rc = dataset_reader_open(&s->rd, s->ds, s->file, s->start))) return moco_error_wrap(rc, "%s", s->ds->name);
      s->reading = 1;
      s->start = 0;
    }
    data_record rec;
    rc = dataset_reader_next(&s->rd, &rec);
    if (rc == 0) {
      dataset_reader_close(&s->rd);
      s->reading = 0;
      s->file++;
      continue;
    }
    if (rc < 0) {
      moco_error_wrap(rc, "%s", s->ds->name);
      if (I->cfg.bad_record == LOADER_BAD_STOP) return rc;
      s->skipped += s->rd.bad;
      s->at += s->rd.bad;
      continue;
    }
    s->at++;
    view_plain(v, rec.sample, s->view1 + (size_t)n * v->n);
    if (rec.pair) view_plain(v, rec.pair, s->view2 + (size_t)n * v->n);
    s->ids[n] = rec.id;
    s->labels[n] = rec.label;
    n++;
  }
  *b = (loader_batch){n, s->view1, n ? s->view2 : NULL, s->ids, s->labels, 0, s->index, s->samples, s->skipped};
  s->index += n > 0;
  s->samples += (uint64_t)n;
  return 0;
}

void loader_scan_close(loader_scan *s) {
  if (s->reading) dataset_reader_close(&s->rd);
  tensor_free(s->view1);
  tensor_free(s->view2);
  free(s->ids);
  free(s->labels);
  memset(s, 0, sizeof *s);
}
