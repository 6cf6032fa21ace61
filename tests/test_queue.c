/* The memory bank: ring order, wrap-around with K not a multiple of B, K smaller than B, the valid
 * prefix while filling, and save/load. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "contrast/queue.h"
#include "core/err.h"

enum { D = 3 };

/* Key rows that carry their own identity: row of sample id x is (x, x + 0.5, −x). */
static void make_batch(float *keys, int64_t *ids, int32_t *labels, int B, int64_t first_id) {
  for (int b = 0; b < B; b++) {
    int64_t id = first_id + b;
    keys[b * D + 0] = (float)id;
    keys[b * D + 1] = (float)id + 0.5f;
    keys[b * D + 2] = -(float)id;
    ids[b] = id;
    labels[b] = (int32_t)(id % 7);
  }
}

/* The queue must hold what enqueuing the rows one at a time would: compare with that model. */
static void check_against_model(const queue *q, const int64_t *model_ids, const int64_t *model_steps,
                                int model_ptr, int model_filled) {
  ck_assert_int_eq(q->ptr, model_ptr);
  ck_assert_int_eq(q->filled, model_filled);
  for (int s = 0; s < q->queue_size; s++) {
    ck_assert_int_eq(q->ids[s], model_ids[s]);
    ck_assert_int_eq(q->steps[s], model_steps[s]);
    if (model_ids[s] >= 0) {
      ck_assert(q->keys[s * D + 0] == (float)model_ids[s]);
      ck_assert(q->keys[s * D + 2] == -(float)model_ids[s]);
      ck_assert_int_eq(q->labels[s], (int32_t)(model_ids[s] % 7));
    } else {
      ck_assert_int_eq(q->labels[s], -1);
    }
  }
}

static void run_sequence(int K, const int *batch_sizes, int n_batches) {
  queue q;
  ck_assert_int_eq(queue_init(&q, K, D), 0);
  int64_t *mids = malloc(K * sizeof *mids), *msteps = malloc(K * sizeof *msteps);
  for (int s = 0; s < K; s++) mids[s] = msteps[s] = -1;
  int mptr = 0, mfilled = 0;
  int64_t next_id = 100;
  for (int t = 0; t < n_batches; t++) {
    int B = batch_sizes[t];
    float keys[64 * D];
    int64_t ids[64];
    int32_t labels[64];
    make_batch(keys, ids, labels, B, next_id);
    queue_enqueue(&q, keys, ids, labels, B, t);
    for (int b = 0; b < B; b++) { /* the one-row-at-a-time model */
      mids[mptr] = next_id + b;
      msteps[mptr] = t;
      mptr = (mptr + 1) % K;
      if (mfilled < K) mfilled++;
    }
    next_id += B;
    check_against_model(&q, mids, msteps, mptr, mfilled);
    /* While filling, the valid entries are exactly the prefix [0, filled). */
    if (q.filled < K) ck_assert_int_eq(q.ptr, q.filled);
  }
  free(mids);
  free(msteps);
  queue_free(&q);
}

START_TEST(enqueue_wraps_when_k_is_not_a_multiple_of_b) {
  int sizes[] = {4, 4, 4, 4, 4, 4, 4};
  run_sequence(10, sizes, 7);
}
END_TEST

START_TEST(enqueue_keeps_last_k_when_k_is_smaller_than_b) {
  int sizes[] = {5, 7, 2, 9, 1, 5};
  run_sequence(3, sizes, 6);
  int one[] = {1, 1, 1, 1};
  run_sequence(1, one, 4);
}
END_TEST

START_TEST(enqueue_matches_row_by_row_model_for_random_batches) {
  int sizes[40];
  for (int K = 1; K <= 17; K += 4) {
    srand(K);
    for (int t = 0; t < 40; t++) sizes[t] = 1 + rand() % 23;
    run_sequence(K, sizes, 40);
  }
}
END_TEST

START_TEST(queue_starts_empty_and_fills_a_prefix) {
  queue q;
  ck_assert_int_eq(queue_init(&q, 8, D), 0);
  ck_assert_int_eq(q.filled, 0);
  ck_assert_int_eq(q.ptr, 0);
  float keys[3 * D];
  int64_t ids[3];
  int32_t labels[3];
  make_batch(keys, ids, labels, 3, 0);
  queue_enqueue(&q, keys, NULL, NULL, 3, 5);
  ck_assert_int_eq(q.filled, 3);
  ck_assert_int_eq(q.ids[0], -1); /* no ids given: unknown */
  ck_assert_int_eq(q.labels[2], -1);
  ck_assert_int_eq(q.steps[2], 5);
  ck_assert_int_eq(q.steps[3], -1);
  queue_reset(&q);
  ck_assert_int_eq(q.filled, 0);
  queue_free(&q);
  ck_assert_int_eq(queue_init(&q, 0, D), MOCO_EINVAL);
}
END_TEST

START_TEST(queue_save_load_round_trip_and_refusals) {
  queue a, b, c;
  ck_assert_int_eq(queue_init(&a, 7, D), 0);
  ck_assert_int_eq(queue_init(&b, 7, D), 0);
  ck_assert_int_eq(queue_init(&c, 8, D), 0);
  float keys[5 * D];
  int64_t ids[5];
  int32_t labels[5];
  for (int t = 0; t < 3; t++) {
    make_batch(keys, ids, labels, 5, 10 * t);
    queue_enqueue(&a, keys, ids, labels, 5, t);
  }
  blob_writer w;
  blob_writer_init(&w);
  queue_save(&a, &w);
  ck_assert_int_eq(w.err, 0);
  blob_reader r;
  blob_reader_init(&r, w.data, w.len, "q.bin");
  ck_assert_int_eq(queue_load(&b, &r), 0);
  ck_assert_int_eq(b.ptr, a.ptr);
  ck_assert_int_eq(b.filled, a.filled);
  ck_assert_mem_eq(b.keys, a.keys, 7 * D * sizeof(float));
  ck_assert_mem_eq(b.ids, a.ids, 7 * sizeof(int64_t));
  ck_assert_mem_eq(b.labels, a.labels, 7 * sizeof(int32_t));
  ck_assert_mem_eq(b.steps, a.steps, 7 * sizeof(int64_t));

  blob_reader_init(&r, w.data, w.len, "q.bin");
  ck_assert_int_eq(queue_load(&c, &r), MOCO_ESHAPE);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "queue_size"));

  w.data[20] ^= 0x40; /* inside the payload */
  blob_reader_init(&r, w.data, w.len, "q.bin");
  ck_assert_int_eq(queue_load(&b, &r), MOCO_ECHECKSUM);
  blob_writer_free(&w);
  queue_free(&a);
  queue_free(&b);
  queue_free(&c);
}
END_TEST

Suite *queue_suite(void) {
  Suite *s = suite_create("queue");
  TCase *tc = tcase_create("queue");
  tcase_add_test(tc, enqueue_wraps_when_k_is_not_a_multiple_of_b);
  tcase_add_test(tc, enqueue_keeps_last_k_when_k_is_smaller_than_b);
  tcase_add_test(tc, enqueue_matches_row_by_row_model_for_random_batches);
  tcase_add_test(tc, queue_starts_empty_and_fills_a_prefix);
  tcase_add_test(tc, queue_save_load_round_trip_and_refusals);
  suite_add_tcase(s, tc);
  return s;
}
