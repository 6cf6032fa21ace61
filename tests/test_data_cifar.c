/* CIFAR-10 / CIFAR-100 binary batches: round trips (reader, any start, mocopack) and bad input. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "data/dataset.h"
#include "data_fixtures.h"
#include "testutil.h"

/* Pixel k of record i: a function of both, so a shifted record shows. */
static uint8_t px(uint64_t i, size_t k) { return (uint8_t)(i * 31 + k * 7); }

/* n records; CIFAR-10 labels i % 10, CIFAR-100 coarse i % 20 and fine i % 100. */
static void write_batch(const char *path, uint64_t n, int classes) {
  FILE *f = fopen(path, "wb");
  ck_assert_ptr_nonnull(f);
  for (uint64_t i = 0; i < n; i++) {
    if (classes == 100) fputc((int)(i % 20), f);
    fputc((int)(i % (uint64_t)classes), f);
    for (size_t k = 0; k < 3072; k++) fputc(px(i, k), f);
  }
  fclose(f);
}

/* Records count per file in CIFAR batches (each file starts at record 0), across files in repacked shards. */
static long read_check(const char *spec, int classes, int global) {
  dataset ds;
  int rc = dataset_open(&ds, "t", spec, NULL, 0);
  if (rc) return rc;
  ck_assert_int_eq(ds.shape.c, 3);
  ck_assert_int_eq(ds.shape.h, 32);
  ck_assert_int_eq(ds.shape.w, 32);
  ck_assert_int_eq(ds.dtype, DATA_U8);
  ck_assert_int_eq(ds.num_classes, classes);
  long n = 0;
  for (int f = 0; f < ds.n_files && rc >= 0; f++) {
    dataset_reader r;
    data_record rec;
    if ((rc = dataset_reader_open(&r, &ds, f, 0))) break;
    uint64_t j = global ? (uint64_t)n : 0;
    while ((rc = dataset_reader_next(&r, &rec)) == 1) {
      ck_assert_int_eq(rec.id, n);
      ck_assert_int_eq(rec.label, (int)(j % (uint64_t)classes));
      for (size_t k = 0; k < 3072; k += 97) ck_assert_int_eq(rec.sample[k], px(j, k));
      n++, j++;
    }
    dataset_reader_close(&r);
  }
  dataset_close(&ds);
  return rc < 0 ? rc : n;
}

START_TEST(cifar10_and_cifar100_batches_read_with_their_labels) {
  write_batch(test_scratch_path(0, "data_batch_1.bin"), 12, 10);
  write_batch(test_scratch_path(0, "data_batch_2.bin"), 12, 10);
  ck_assert_int_eq(read_check(test_scratch_path(1, "data_batch_*.bin"), 10, 0), 24);
  write_batch(test_scratch_path(0, "train.bin"), 9, 100);
  ck_assert_int_eq(read_check(test_scratch_slot(0), 100, 0), 9);
}
END_TEST

START_TEST(reading_from_any_record) {
  write_batch(test_scratch_path(0, "test_batch.bin"), 20, 10);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "t", test_scratch_slot(0), NULL, 0), 0);
  dataset_reader r;
  data_record rec;
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 13), 0);
  ck_assert_int_eq(dataset_reader_next(&r, &rec), 1);
  ck_assert_int_eq(rec.id, 13);
  ck_assert_int_eq(rec.label, 3);
  ck_assert_int_eq(rec.sample[5], px(13, 5));
  dataset_reader_close(&r);
  dataset_close(&ds);
}
END_TEST

START_TEST(truncated_batch_is_refused_from_its_size) {
  write_batch(test_scratch_path(0, "data_batch_1.bin"), 5, 10);
  ck_assert_int_eq(fx_truncate(test_scratch_slot(0), 5 * 3073 - 10), 0);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "t", test_scratch_slot(0), NULL, 0), MOCO_EFORMAT);
  ck_assert_msg(strstr(moco_errmsg(), "data_batch_1.bin") && strstr(moco_errmsg(), "truncated?"), "%s",
                moco_errmsg());
}
END_TEST

START_TEST(label_outside_the_classes_names_the_record_and_can_be_skipped) {
  write_batch(test_scratch_path(0, "data_batch_1.bin"), 6, 10);
  FILE *f = fopen(test_scratch_slot(0), "r+b");
  fseek(f, 2 * 3073, SEEK_SET);
  fputc(10, f);
  fclose(f);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "t", test_scratch_slot(0), NULL, 0), 0);
  dataset_reader r;
  data_record rec;
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 0), 0);
  int ok = 0, bad = 0, k;
  while ((k = dataset_reader_next(&r, &rec)) != 0) {
    if (k < 0) {
      ck_assert_msg(strstr(moco_errmsg(), "record 2: label 10, expected 0..9"), "%s", moco_errmsg());
      bad += (int)r.bad;
    } else {
      ok++;
    }
  }
  ck_assert_int_eq(ok, 5);
  ck_assert_int_eq(bad, 1);
  dataset_reader_close(&r);
  dataset_close(&ds);
}
END_TEST

START_TEST(cifar_round_trip_through_mocopack) {
  write_batch(test_scratch_path(0, "data_batch_1.bin"), 30, 10);
  char cmd[2048], out[4096];
  snprintf(cmd, sizeof cmd, "%s cifar --shard-records 16 -o %s/c %s", bin_path("mocopack"), test_scratch_dir(), test_scratch_slot(0));
  int st = run_capture(cmd, out, sizeof out);
  ck_assert_msg(st == 0, "%s -> %d: %s", cmd, st, out);
  ck_assert_msg(strstr(out, "30 records (3x32x32 u8, labels, 10 classes) in 2 shard(s)"), "%s", out);
  ck_assert_int_eq(read_check(test_scratch_path(1, "c-*.shard"), 10, 1), 30);
}
END_TEST

Suite *data_cifar_suite(void) {
  Suite *s = suite_create("data_cifar");
  TCase *tc = tcase_create("cifar");
  tcase_add_checked_fixture(tc, test_scratch_setup, test_scratch_teardown);
  tcase_add_test(tc, cifar10_and_cifar100_batches_read_with_their_labels);
  tcase_add_test(tc, reading_from_any_record);
  tcase_add_test(tc, truncated_batch_is_refused_from_its_size);
  tcase_add_test(tc, label_outside_the_classes_names_the_record_and_can_be_skipped);
  tcase_add_test(tc, cifar_round_trip_through_mocopack);
  suite_add_tcase(s, tc);
  return s;
}
