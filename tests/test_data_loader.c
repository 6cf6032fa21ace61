/* The loader: every sample once per epoch, determinism for any thread count, exact resume, bad-record
 * policies, pair mode, evaluation scans, and what loader_open refuses. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "data/loader.h"
#include "data_fixtures.h"
#include "testutil.h"
#include "service/config.h"

static char dir[64];
static char spec[600];

static void setup(void) { strcpy(dir, test_tmpdir()); }
static void teardown(void) { rm_rf(dir); }

/* 5 shards x 203 records of 1x6x6 u8 images, labels id % 7, blocks of 16 records. */
enum { N_SHARDS = 5, PER_SHARD = 203, N = N_SHARDS * PER_SHARD, CLASSES = 7 };

static void make_set(void) {
  ck_assert_int_eq(fx_write_shards(dir, "s", N_SHARDS, PER_SHARD, (data_shape){1, 6, 6}, DATA_U8, 1, 0, CLASSES,
                                   16, spec, sizeof spec), 0);
}

static loader_config base_config(void) {
  loader_config c;
  c = config_defaults()->trainer.loader;
  c.train = spec;
  c.batch_size = 32;
  c.shuffle_buffer = 100;
  c.seed = 7;
  c.drop_last = 0;
  return c;
}

static void open_ok(loader *l, const loader_config *c) {
  int rc = loader_open(l, c);
  ck_assert_msg(rc == 0, "loader_open: %s (%s)", moco_errmsg(), moco_strerror(rc));
}

typedef struct {
  int size;
  uint64_t epoch, index, samples, skipped, hash;
} batch_rec;

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
  const uint8_t *b = p;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ULL;
  return h;
}

static batch_rec record(const loader *l, const loader_batch *b) {
  size_t n = (size_t)b->size * data_shape_size(l->shape);
  uint64_t h = fnv(0xcbf29ce484222325ULL, b->ids, (size_t)b->size * sizeof *b->ids);
  h = fnv(h, b->labels, (size_t)b->size * sizeof *b->labels);
  h = fnv(h, b->view1, n * sizeof(float));
  h = fnv(h, b->view2, n * sizeof(float));
  return (batch_rec){b->size, b->epoch, b->index, b->samples, b->skipped, h};
}

/* Takes n batches, recording each; fails the test on an error. */
static void take(loader *l, int n, batch_rec *out) {
  loader_batch b;
  for (int i = 0; i < n; i++) {
    int rc = loader_next(l, &b);
    ck_assert_msg(rc == 0, "loader_next %d: %s", i, moco_errmsg());
    ck_assert_int_gt(b.size, 0);
    out[i] = record(l, &b);
  }
}

static void same_batches(const batch_rec *a, const batch_rec *b, int n) {
  for (int i = 0; i < n; i++) {
    ck_assert_msg(a[i].hash == b[i].hash && a[i].size == b[i].size && a[i].epoch == b[i].epoch &&
                      a[i].index == b[i].index && a[i].samples == b[i].samples && a[i].skipped == b[i].skipped,
                  "batch %d differs (epoch %llu/%llu index %llu/%llu)", i, (unsigned long long)a[i].epoch,
                  (unsigned long long)b[i].epoch, (unsigned long long)a[i].index, (unsigned long long)b[i].index);
  }
}

/* Runs whole epochs, counting how often each id is seen per epoch. */
static void check_epochs(loader_config c, int epochs, int expect_shuffled) {
  loader l;
  c.epochs = epochs;
  open_ok(&l, &c);
  ck_assert_int_eq(l.num_samples, N);
  ck_assert_int_eq(l.num_classes, CLASSES);
  int *seen = calloc(N, sizeof *seen);
  uint64_t epoch = 0, index = 0, in_order = 0, total = 0;
  int64_t prev = -1;
  loader_batch b;
  int full = N / c.batch_size, rest = N % c.batch_size;
  for (;;) {
    ck_assert_int_eq(loader_next(&l, &b), 0);
    if (b.size == 0) break;
    if (b.epoch != epoch) {
      for (int i = 0; i < N; i++) ck_assert_int_eq(seen[i], c.drop_last ? seen[i] : 1);
      ck_assert_int_eq(index, c.drop_last || !rest ? full : full + 1);
      memset(seen, 0, N * sizeof *seen);
      ck_assert_int_eq(b.epoch, epoch + 1);
      epoch = b.epoch;
      index = 0;
    }
    ck_assert_int_eq(b.index, index++);
    ck_assert_int_eq(b.samples, total);
    ck_assert(b.size == c.batch_size || (!c.drop_last && b.size == rest));
    for (int i = 0; i < b.size; i++) {
      int64_t id = b.ids[i];
      ck_assert(id >= 0 && id < N);
      ck_assert_int_eq(seen[id]++, 0);
      ck_assert_int_eq(b.labels[i], (int)(id % CLASSES));
      in_order += id == prev + 1;
      prev = id;
    }
    total += (uint64_t)b.size;
  }
  ck_assert_int_eq(epoch, epochs - 1);
  int seen_total = 0;
  for (int i = 0; i < N; i++) {
    ck_assert(seen[i] <= 1);
    seen_total += seen[i];
  }
  ck_assert_int_eq(seen_total, c.drop_last ? full * c.batch_size : N);
  if (expect_shuffled)
    ck_assert_uint_lt(in_order, total / 10);
  else
    ck_assert_uint_eq(in_order, total - (uint64_t)epochs + 1); /* 0..N-1, every epoch */
  ck_assert_int_eq(loader_next(&l, &b), 0); /* the end stays the end */
  ck_assert_int_eq(b.size, 0);
  loader_close(&l);
  free(seen);
}

START_TEST(every_sample_exactly_once_per_epoch) {
  make_set();
  loader_config c = base_config();
  check_epochs(c, 3, 1);
  c.drop_last = 1;
  check_epochs(c, 2, 1);
  c.shuffle_buffer = 5000; /* larger than the set: a full shuffle */
  check_epochs(c, 2, 1);
  c.shuffle_buffer = 0; /* no shuffling: files and records in order */
  c.drop_last = 0;
  check_epochs(c, 2, 0);
}
END_TEST

START_TEST(epochs_differ_and_files_are_visited_in_shuffled_order) {
  make_set();
  loader_config c = base_config();
  c.shuffle_buffer = 50; /* small windows: the first ids of an epoch come from its first file */
  loader l;
  open_ok(&l, &c);
  loader_batch b;
  int firsts[4];
  for (int e = 0; e < 4; e++) {
    ck_assert_int_eq(loader_next(&l, &b), 0);
    ck_assert_int_eq(b.epoch, (uint64_t)e);
    firsts[e] = (int)(b.ids[0] / PER_SHARD);
    while (b.index < (uint64_t)(N / 32)) ck_assert_int_eq(loader_next(&l, &b), 0);
  }
  int differ = 0;
  for (int e = 1; e < 4; e++) differ |= firsts[e] != firsts[0];
  ck_assert(differ);
  loader_close(&l);
}
END_TEST

START_TEST(same_seed_gives_the_same_stream_for_any_threads_and_prefetch) {
  make_set();
  enum { K = 70 }; /* two epochs and a bit */
  batch_rec a[K], b[K];
  loader_config c = base_config();
  c.workers = 1;
  c.prefetch = 1;
  loader l;
  open_ok(&l, &c);
  take(&l, K, a);
  loader_close(&l);
  c.workers = 4;
  c.prefetch = 7;
  open_ok(&l, &c);
  take(&l, K, b);
  loader_close(&l);
  same_batches(a, b, K);
  c.seed = 8;
  open_ok(&l, &c);
  take(&l, K, b);
  loader_close(&l);
  int differ = 0;
  for (int i = 0; i < K; i++) differ += a[i].hash != b[i].hash;
  ck_assert_int_eq(differ, K);
}
END_TEST

static void same_pos(const loader_pos *a, const loader_pos *b) {
  ck_assert(a->epoch == b->epoch && a->batch == b->batch && a->samples == b->samples && a->skipped == b->skipped);
  ck_assert(a->file == b->file && a->offset == b->offset && a->in_window == b->in_window);
  ck_assert(a->rng.state == b->rng.state && a->rng.inc == b->rng.inc);
}

/* Saves after `at` batches, then a fresh loader loads it: the next batches match an uninterrupted run. */
static void resume_at(const loader_config *c, const batch_rec *ref, int at, int total) {
  loader l;
  batch_rec got[128];
  open_ok(&l, c);
  take(&l, at, got);
  same_batches(got, ref, at);
  blob_writer w;
  blob_writer_init(&w);
  loader_save(&l, &w);
  ck_assert_int_eq(w.err, 0);
  loader_pos saved;
  loader_position(&l, &saved);
  take(&l, 3, got); /* consuming on, and the prefetch running further, must not matter */
  loader_close(&l);
  open_ok(&l, c);
  blob_reader r;
  blob_reader_init(&r, w.data, w.len, "state");
  int rc = loader_load(&l, &r);
  ck_assert_msg(rc == 0, "loader_load: %s", moco_errmsg());
  loader_pos p;
  loader_position(&l, &p);
  same_pos(&p, &saved);
  take(&l, total - at, got);
  same_batches(got, ref + at, total - at);
  /* and seeking back on the same loader replays it again */
  ck_assert_int_eq(loader_seek(&l, &saved), 0);
  take(&l, total - at, got);
  same_batches(got, ref + at, total - at);
  loader_close(&l);
  blob_writer_free(&w);
}

START_TEST(resume_from_a_saved_position_continues_exactly) {
  make_set();
  enum { K = 75 };
  batch_rec ref[K];
  loader_config c = base_config();
  loader l;
  open_ok(&l, &c);
  take(&l, K, ref);
  loader_close(&l);
  /* the start; inside the first shuffle window; across windows; the short last batch of epoch 0; the
   * first batches of epoch 1; deep into epoch 2 */
  int points[] = {0, 1, 3, 4, 31, 32, 33, 50, 70};
  for (size_t i = 0; i < sizeof points / sizeof points[0]; i++) resume_at(&c, ref, points[i], K);
  /* the same with drop_last and no shuffling */
  c.drop_last = 1;
  c.shuffle_buffer = 0;
  open_ok(&l, &c);
  take(&l, K, ref);
  loader_close(&l);
  resume_at(&c, ref, 30, K);
  resume_at(&c, ref, 31, K);
}
END_TEST

START_TEST(a_saved_position_is_refused_by_another_configuration) {
  make_set();
  loader_config c = base_config();
  loader l;
  open_ok(&l, &c);
  batch_rec got[5];
  take(&l, 5, got);
  blob_writer w;
  blob_writer_init(&w);
  loader_save(&l, &w);
  loader_close(&l);
  blob_reader r;
  c.seed = 99;
  open_ok(&l, &c);
  blob_reader_init(&r, w.data, w.len, "state");
  ck_assert_int_eq(loader_load(&l, &r), MOCO_ESTATE);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "saved with seed 7, this loader has 99"));
  loader_close(&l);
  c = base_config();
  c.batch_size = 64;
  open_ok(&l, &c);
  blob_reader_init(&r, w.data, w.len, "state");
  ck_assert_int_eq(loader_load(&l, &r), MOCO_ESTATE);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "batch_size 32, this loader has 64"));
  loader_close(&l);
  c = base_config();
  open_ok(&l, &c);
  w.data[30] ^= 1;
  blob_reader_init(&r, w.data, w.len, "state");
  ck_assert_int_eq(loader_load(&l, &r), MOCO_ECHECKSUM);
  loader_pos p;
  loader_position(&l, &p);
  p.file = 9;
  ck_assert_int_eq(loader_seek(&l, &p), MOCO_ESTATE);
  loader_close(&l);
  blob_writer_free(&w);
}
END_TEST

/* Corrupts the block holding record 100 of shard 2 (records 96..111 of it, ids 502..517). */
static void corrupt_block(void) {
  char p[700];
  snprintf(p, sizeof p, "%s/s-2.shard", dir);
  shard_header h;
  ck_assert_int_eq(shard_probe(p, &h), 0);
  ck_assert_int_eq(fx_flip(p, fx_record_offset(&h, 100) + 9), 0);
}

static int in_bad_block(int64_t id) { return id >= 2 * PER_SHARD + 96 && id < 2 * PER_SHARD + 112; }

START_TEST(a_bad_block_stops_the_stream_after_whole_batches) {
  make_set();
  corrupt_block();
  loader_config c = base_config();
  loader l;
  open_ok(&l, &c);
  loader_batch b;
  int rc, batches = 0;
  while ((rc = loader_next(&l, &b)) == 0) {
    ck_assert_int_eq(b.size, 32); /* every batch delivered is whole */
    for (int i = 0; i < b.size; i++) ck_assert(!in_bad_block(b.ids[i]));
    batches++;
    ck_assert_int_lt(batches, 40);
  }
  ck_assert_int_eq(rc, MOCO_ECHECKSUM);
  ck_assert_msg(strstr(moco_errmsg(), "train: ") && strstr(moco_errmsg(), "s-2.shard: offset") &&
                    strstr(moco_errmsg(), "block 6 (records 96..111) checksum mismatch"), "%s", moco_errmsg());
  ck_assert_int_eq(loader_next(&l, &b), MOCO_ECHECKSUM); /* and stays stopped */
  ck_assert_int_eq(b.size, 0);
  loader_close(&l);
}
END_TEST

START_TEST(a_bad_block_is_skipped_and_counted_under_skip) {
  make_set();
  corrupt_block();
  loader_config c = base_config();
  c.bad_record = LOADER_BAD_SKIP;
  c.epochs = 2;
  loader l;
  open_ok(&l, &c);
  loader_batch b;
  int *seen = calloc(N, sizeof *seen);
  uint64_t last_skipped = 0;
  while (loader_next(&l, &b) == 0 && b.size) {
    for (int i = 0; i < b.size; i++) seen[b.ids[i]]++;
    last_skipped = b.skipped;
  }
  for (int i = 0; i < N; i++) ck_assert_int_eq(seen[i], in_bad_block(i) ? 0 : 2);
  ck_assert_int_eq(last_skipped, 32); /* 16 records, in each of two epochs */
  char why[512];
  ck_assert_int_eq(loader_skipped(&l, why, sizeof why), 32);
  ck_assert_ptr_nonnull(strstr(why, "checksum mismatch"));
  loader_close(&l);
  free(seen);
  /* skipping is part of the stream: resuming reproduces it, counts included */
  enum { K = 40 };
  batch_rec ref[K];
  c.epochs = 0;
  open_ok(&l, &c);
  take(&l, K, ref);
  loader_close(&l);
  for (int at = 5; at < K; at += 11) resume_at(&c, ref, at, K);
}
END_TEST

START_TEST(a_truncated_gzip_never_yields_a_half_batch) {
  char img[600];
  snprintf(img, sizeof img, "%s/g-images-idx3-ubyte.gz", dir);
  enum { M = 600 };
  uint8_t *px = malloc(M * 64);
  rng_t g;
  rng_init(&g, 1, 1);
  for (int i = 0; i < M * 64; i++) px[i] = (uint8_t)rng_u32(&g); /* incompressible: the cut lands mid-file */
  ck_assert_int_eq(idx_write(img, 1, IDX_U8, 3, (uint32_t[]){M, 8, 8}, px), 0);
  free(px);
  ck_assert_int_eq(fx_truncate(img, fx_file_size(img) * 2 / 3), 0);
  loader_config c = base_config();
  c.train = img;
  c.shuffle_buffer = 0;
  c.batch_size = 50;
  loader l;
  open_ok(&l, &c);
  loader_batch b;
  int rc, n = 0;
  while ((rc = loader_next(&l, &b)) == 0) {
    ck_assert_int_eq(b.size, 50);
    for (int i = 0; i < 50; i++) ck_assert_int_eq(b.ids[i], n + i);
    n += 50;
  }
  ck_assert_int_eq(rc, MOCO_EEOF);
  ck_assert_msg(strstr(moco_errmsg(), "g-images-idx3-ubyte.gz") && strstr(moco_errmsg(), "truncated"), "%s",
                moco_errmsg());
  ck_assert_int_ge(n, 300);
  loader_close(&l);
  /* under skip, what precedes the cut is delivered and the rest is counted as skipped */
  c.bad_record = LOADER_BAD_SKIP;
  c.drop_last = 0;
  c.epochs = 1;
  open_ok(&l, &c);
  int got = 0;
  uint64_t skipped = 0;
  while (loader_next(&l, &b) == 0 && b.size) {
    got += b.size;
    skipped = b.skipped;
  }
  ck_assert_int_ge(got, n);
  ck_assert_int_eq((uint64_t)got + skipped, M);
  loader_close(&l);
}
END_TEST

START_TEST(pair_mode_views_are_the_two_stored_samples) {
  data_shape s = {5, 1, 1};
  ck_assert_int_eq(fx_write_shards(dir, "p", 2, 50, s, DATA_F32, 1, 1, 3, 0, spec, sizeof spec), 0);
  loader_config c = base_config();
  c.view_mode = VIEW_PAIR;
  float mean[1] = {2.0f}, sd[1] = {4.0f};
  c.norm_len = 1;
  c.mean = mean;
  c.std = sd;
  loader l;
  open_ok(&l, &c);
  ck_assert_int_eq(l.shape.c, 5);
  loader_batch b;
  ck_assert_int_eq(loader_next(&l, &b), 0);
  for (int i = 0; i < b.size; i++)
    for (int k = 0; k < 5; k++) {
      ck_assert_float_eq_tol(b.view1[i * 5 + k], (fx_value((uint64_t)b.ids[i], (size_t)k, 0, DATA_F32) - 2) / 4, 1e-5f);
      ck_assert_float_eq_tol(b.view2[i * 5 + k], (fx_value((uint64_t)b.ids[i], (size_t)k, 1, DATA_F32) - 2) / 4, 1e-5f);
    }
  loader_close(&l);
  /* augment mode on the same data uses the first sample: SCARF and noise on vectors */
  c.view_mode = VIEW_AUGMENT;
  open_ok(&l, &c);
  ck_assert_int_eq(loader_next(&l, &b), 0);
  ck_assert(memcmp(b.view1, b.view2, 5 * sizeof(float) * (size_t)b.size));
  loader_close(&l);
}
END_TEST

START_TEST(fashion_mnist_sample_streams_normalised_images_and_scans_eval_in_order) {
  loader_config c;
  c = config_defaults()->trainer.loader;
  c.batch_size = 256;
  c.drop_last = 1;
  char train[512], eval[512];
  snprintf(train, sizeof train, "%s", data_path("fmnist-train-images-idx3-ubyte.gz"));
  c.train = train;
  snprintf(eval, sizeof eval, "%s", data_path("fmnist-t10k-images-idx3-ubyte.gz"));
  c.eval = eval;
  c.num_classes = 10;
  float mean[1] = {0.2860f}, sd[1] = {0.3530f};
  c.norm_len = 1;
  c.mean = mean;
  c.std = sd;
  loader l;
  open_ok(&l, &c);
  ck_assert(l.shape.c == 1 && l.shape.h == 28 && l.shape.w == 28);
  ck_assert_int_eq(l.num_samples, 2000);
  ck_assert_int_eq(l.eval_samples, 1000);
  ck_assert(l.has_labels && l.has_eval);
  loader_batch b;
  float lo = (0 - mean[0]) / sd[0], hi = (1 - mean[0]) / sd[0];
  for (int k = 0; k < 3; k++) {
    ck_assert_int_eq(loader_next(&l, &b), 0);
    ck_assert_int_eq(b.size, 256);
    for (int i = 0; i < 256; i++) {
      ck_assert(b.ids[i] >= 0 && b.ids[i] < 2000);
      ck_assert(b.labels[i] >= 0 && b.labels[i] < 10);
    }
    for (int i = 0; i < 256 * 784; i++) {
      ck_assert(b.view1[i] >= lo - 1e-5f && b.view1[i] <= hi + 1e-5f);
      ck_assert(b.view2[i] >= lo - 1e-5f && b.view2[i] <= hi + 1e-5f);
    }
  }
  /* the evaluation split, in order, unaugmented, in chunks */
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "ref", eval, NULL, 10), 0);
  dataset_reader r;
  data_record rec;
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 0), 0);
  loader_scan s;
  ck_assert_int_eq(loader_scan_open(&s, &l, LOADER_EVAL, 300), 0);
  int n = 0, chunks = 0;
  while (loader_scan_next(&s, &b) == 0 && b.size) {
    ck_assert_int_eq(b.size, chunks < 3 ? 300 : 100);
    ck_assert_ptr_null(b.view2);
    for (int i = 0; i < b.size; i++, n++) {
      ck_assert_int_eq(dataset_reader_next(&r, &rec), 1);
      ck_assert_int_eq(b.ids[i], n);
      ck_assert_int_eq(b.labels[i], rec.label);
      for (int k = 0; k < 784; k += 37)
        ck_assert_float_eq_tol(b.view1[i * 784 + k], (rec.sample[k] / 255.0f - mean[0]) / sd[0], 1e-5f);
    }
    chunks++;
  }
  ck_assert_int_eq(n, 1000);
  loader_scan_close(&s);
  dataset_reader_close(&r);
  dataset_close(&ds);
  ck_assert_int_eq(loader_scan_open(&s, &l, LOADER_TRAIN, 512), 0);
  n = 0;
  while (loader_scan_next(&s, &b) == 0 && b.size) n += b.size;
  ck_assert_int_eq(n, 2000);
  loader_scan_close(&s);
  loader_close(&l);
}
END_TEST

static void expect_open_error(const loader_config *c, int code, const char *detail) {
  loader l;
  int rc = loader_open(&l, c);
  ck_assert_msg(rc == code, "got %s (%s), expected %s", moco_strerror(rc), moco_errmsg(), moco_strerror(code));
  ck_assert_msg(strstr(moco_errmsg(), detail), "message '%s' lacks '%s'", moco_errmsg(), detail);
}

START_TEST(open_refuses_bad_configurations_and_data) {
  make_set();
  loader_config c = base_config();
  c.batch_size = 0;
  expect_open_error(&c, MOCO_ECONFIG, "batch_size");
  c = base_config();
  c.workers = 0;
  expect_open_error(&c, MOCO_ECONFIG, "workers");
  c = base_config();
  c.view_mode = VIEW_PAIR;
  expect_open_error(&c, MOCO_ECONFIG, "data.mode pair needs pair records");
  c = base_config();
  c.drop_last = 1;
  c.batch_size = 2000;
  expect_open_error(&c, MOCO_ECONFIG, "fewer than batch_size 2000");
  c = base_config();
  c.norm_len = 3;
  float three[3] = {0, 0, 0};
  c.mean = c.std = three;
  expect_open_error(&c, MOCO_ECONFIG, "3 mean/std values, expected 1 or 1");
  c = base_config();
  char missing[700];
  snprintf(missing, sizeof missing, "%s,%s/gone.shard", spec, dir);
  c.train = missing;
  expect_open_error(&c, MOCO_ENOENT, "gone.shard: cannot open");
  c = base_config();
  c.eval = data_path("fmnist-t10k-images-idx3-ubyte.gz");
  expect_open_error(&c, MOCO_ESHAPE, "eval: samples 1x28x28 u8 disagree with train's 1x6x6 u8");
  c = base_config();
  c.num_classes = 3; /* labels run to 6: found while streaming, a bad record */
  loader l;
  open_ok(&l, &c);
  loader_batch b;
  int rc;
  while ((rc = loader_next(&l, &b)) == 0) {}
  ck_assert_int_eq(rc, MOCO_ERANGE);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "out of range [0, 3)"));
  loader_close(&l);
}
END_TEST

Suite *data_loader_suite(void) {
  Suite *s = suite_create("data_loader");
  TCase *tc = tcase_create("loader");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, every_sample_exactly_once_per_epoch);
  tcase_add_test(tc, epochs_differ_and_files_are_visited_in_shuffled_order);
  tcase_add_test(tc, same_seed_gives_the_same_stream_for_any_threads_and_prefetch);
  tcase_add_test(tc, resume_from_a_saved_position_continues_exactly);
  tcase_add_test(tc, a_saved_position_is_refused_by_another_configuration);
  tcase_add_test(tc, a_bad_block_stops_the_stream_after_whole_batches);
  tcase_add_test(tc, a_bad_block_is_skipped_and_counted_under_skip);
  tcase_add_test(tc, a_truncated_gzip_never_yields_a_half_batch);
  tcase_add_test(tc, pair_mode_views_are_the_two_stored_samples);
  tcase_add_test(tc, fashion_mnist_sample_streams_normalised_images_and_scans_eval_in_order);
  tcase_add_test(tc, open_refuses_bad_configurations_and_data);
  suite_add_tcase(s, tc);
  return s;
}
