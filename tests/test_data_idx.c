/* IDX files: the Fashion-MNIST sample, plain and gzip, element types, and every bad-input case. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "data/dataset.h"
#include "data/idx.h"
#include "data_fixtures.h"
#include "testutil.h"

/* n images of h x w, pixel (i, k) = (i + k) % 256, and labels i % 10. */
static void write_images(const char *images, const char *labels, uint32_t n, uint32_t h, uint32_t w, int gz) {
  uint8_t *px = malloc((size_t)n * h * w), *lb = malloc(n);
  for (uint32_t i = 0; i < n; i++) {
    for (uint32_t k = 0; k < h * w; k++) px[(size_t)i * h * w + k] = (uint8_t)(i + k);
    lb[i] = (uint8_t)(i % 10);
  }
  uint32_t d[3] = {n, h, w}, dl[1] = {n};
  ck_assert_int_eq(idx_write(images, gz, IDX_U8, 3, d, px), 0);
  if (labels) ck_assert_int_eq(idx_write(labels, gz, IDX_U8, 1, dl, lb), 0);
  free(px);
  free(lb);
}

/* Reads every record of a one-file data set, checking ids count up; returns how many were read or the
 * error code. */
static long read_all(const char *spec, int num_classes, uint64_t *label_sum) {
  dataset ds;
  int rc = dataset_open(&ds, "t", spec, NULL, num_classes);
  if (rc) return rc;
  dataset_reader r;
  data_record rec;
  long n = 0;
  if (label_sum) *label_sum = 0;
  for (int f = 0; f < ds.n_files && rc >= 0; f++) {
    if ((rc = dataset_reader_open(&r, &ds, f, 0))) break;
    while ((rc = dataset_reader_next(&r, &rec)) == 1) {
      ck_assert_int_eq(rec.id, n);
      if (label_sum) *label_sum += (uint64_t)rec.label;
      n++;
    }
    dataset_reader_close(&r);
  }
  dataset_close(&ds);
  return rc < 0 ? rc : n;
}

START_TEST(sample_gzip_reads_with_its_labels_found_by_name) {
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "train", data_path("fmnist-train-images-idx3-ubyte.gz"), NULL, 0), 0);
  ck_assert_int_eq(ds.count, 2000);
  ck_assert_int_eq(ds.num_classes, 10); /* from the labels, since IDX states no class count */
  ck_assert_int_eq(ds.shape.c, 1);
  ck_assert_int_eq(ds.shape.h, 28);
  ck_assert_int_eq(ds.shape.w, 28);
  ck_assert_int_eq(ds.dtype, DATA_U8);
  ck_assert(ds.has_labels);
  ck_assert_ptr_nonnull(strstr(ds.files[0].labels_path, "fmnist-train-labels-idx1-ubyte.gz"));
  int counts[10] = {0};
  dataset_reader r;
  data_record rec;
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 0), 0);
  int n = 0, rc;
  while ((rc = dataset_reader_next(&r, &rec)) == 1) {
    ck_assert(rec.label >= 0 && rec.label < 10);
    counts[rec.label]++;
    n++;
  }
  ck_assert_int_eq(rc, 0);
  ck_assert_int_eq(n, 2000);
  for (int k = 0; k < 10; k++) ck_assert_int_gt(counts[k], 100); /* Fashion-MNIST is balanced */
  dataset_reader_close(&r);
  dataset_close(&ds);
}
END_TEST

START_TEST(plain_and_gzip_give_the_same_records_from_any_start) {
  write_images(test_scratch_path(0, "a-images-idx3-ubyte"), test_scratch_path(1, "a-labels-idx1-ubyte"), 50, 4, 3, 0);
  write_images(test_scratch_path(2, "b-images-idx3-ubyte.gz"), test_scratch_path(3, "b-labels-idx1-ubyte.gz"), 50, 4, 3, 1);
  dataset a, b;
  ck_assert_int_eq(dataset_open(&a, "a", test_scratch_slot(0), NULL, 0), 0);
  ck_assert_int_eq(dataset_open(&b, "b", test_scratch_slot(2), NULL, 0), 0);
  ck_assert(!a.files[0].idx.gz && b.files[0].idx.gz);
  for (uint64_t start = 0; start <= 50; start += 17) {
    dataset_reader ra, rb;
    data_record x, y;
    ck_assert_int_eq(dataset_reader_open(&ra, &a, 0, start), 0);
    ck_assert_int_eq(dataset_reader_open(&rb, &b, 0, start), 0);
    uint64_t i = start;
    int ka, kb;
    while ((ka = dataset_reader_next(&ra, &x)) == 1) {
      kb = dataset_reader_next(&rb, &y);
      ck_assert_int_eq(kb, 1);
      ck_assert_int_eq(x.id, (int64_t)i);
      ck_assert_int_eq(y.id, (int64_t)i);
      ck_assert_int_eq(x.label, (int)(i % 10));
      ck_assert_int_eq(y.label, x.label);
      ck_assert_int_eq(x.sample[5], (uint8_t)(i + 5));
      ck_assert_mem_eq(x.sample, y.sample, 12);
      i++;
    }
    ck_assert_int_eq(ka, 0);
    ck_assert_int_eq(dataset_reader_next(&rb, &y), 0);
    ck_assert_int_eq(i, 50);
    dataset_reader_close(&ra);
    dataset_reader_close(&rb);
  }
  dataset_close(&a);
  dataset_close(&b);
}
END_TEST

START_TEST(other_element_types_become_float32) {
  int16_t s16[6] = {-3, 0, 7, 300, -32768, 32767};
  float f32[6] = {0.5f, -1.25f, 3e9f, 0.0f, 1.0f, -2.0f};
  double f64[6] = {1.5, -0.25, 100.0, 2.0, 3.0, 4.0};
  uint32_t d[2] = {2, 3};
  ck_assert_int_eq(idx_write(test_scratch_path(0, "s16.idx"), 0, IDX_I16, 2, d, s16), 0);
  ck_assert_int_eq(idx_write(test_scratch_path(1, "f32.idx.gz"), 1, IDX_F32, 2, d, f32), 0);
  ck_assert_int_eq(idx_write(test_scratch_path(2, "f64.idx"), 0, IDX_F64, 2, d, f64), 0);
  for (int t = 0; t < 3; t++) {
    dataset ds;
    ck_assert_int_eq(dataset_open(&ds, "t", test_scratch_slot(t), NULL, 0), 0);
    ck_assert_int_eq(ds.dtype, DATA_F32);
    ck_assert_int_eq(ds.shape.c, 3); /* 2 dims: vectors of 3 features */
    ck_assert_int_eq(ds.shape.h * ds.shape.w, 1);
    dataset_reader r;
    data_record rec;
    ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 0), 0);
    for (int i = 0; i < 2; i++) {
      ck_assert_int_eq(dataset_reader_next(&r, &rec), 1);
      ck_assert_int_eq(rec.label, -1);
      for (int k = 0; k < 3; k++) {
        float got = data_decode_at(DATA_F32, rec.sample, (size_t)k);
        float exp = t == 0 ? s16[3 * i + k] : t == 1 ? f32[3 * i + k] : (float)f64[3 * i + k];
        ck_assert_float_eq(got, exp);
      }
    }
    dataset_reader_close(&r);
    dataset_close(&ds);
  }
}
END_TEST

/* Each bad input is refused with the right code and a message naming the file and the place. */
static void expect_open_error(const char *spec, int code, const char *name_in_msg, const char *detail) {
  dataset ds;
  int rc = dataset_open(&ds, "train", spec, NULL, 0);
  ck_assert_msg(rc == code, "%s: got %s (%s), expected %s", spec, moco_strerror(rc), moco_errmsg(),
                moco_strerror(code));
  ck_assert_msg(strstr(moco_errmsg(), name_in_msg), "message '%s' lacks '%s'", moco_errmsg(), name_in_msg);
  ck_assert_msg(strstr(moco_errmsg(), detail), "message '%s' lacks '%s'", moco_errmsg(), detail);
}

START_TEST(missing_file_and_empty_glob_are_refused) {
  expect_open_error(test_scratch_path(0, "nope-images-idx3-ubyte.gz"), MOCO_ENOENT, "nope-images-idx3-ubyte.gz", "cannot open");
  expect_open_error(test_scratch_path(1, "none-*.gz"), MOCO_ENOENT, "none-*.gz", "no file matches");
  expect_open_error("", MOCO_ECONFIG, "train", "no data set");
}
END_TEST

START_TEST(bad_magic_is_refused_at_offset_0) {
  write_images(test_scratch_path(0, "x-images-idx3-ubyte"), NULL, 4, 2, 2, 0);
  uint8_t bad[4] = {0, 0, 0x42, 3};
  ck_assert_int_eq(fx_write(test_scratch_slot(0), 0, bad, 4), 0);
  expect_open_error(test_scratch_slot(0), MOCO_EFORMAT, "x-images-idx3-ubyte: offset 0", "bad magic 0x00004203");
  /* not .bin: that name is taken as a CIFAR batch (data/cifar.h) */
  FILE *f = fopen(test_scratch_path(1, "junk.dat"), "wb");
  fputs("PK\x03\x04 not a data file", f);
  fclose(f);
  expect_open_error(test_scratch_slot(1), MOCO_EFORMAT, "junk.dat", "unknown format");
}
END_TEST

START_TEST(truncated_plain_file_is_refused_naming_the_record) {
  write_images(test_scratch_path(0, "t-images-idx3-ubyte"), NULL, 10, 2, 2, 0);
  ck_assert_int_eq(fx_truncate(test_scratch_slot(0), 16 + 4 * 7 + 2), 0);
  expect_open_error(test_scratch_slot(0), MOCO_EEOF, "t-images-idx3-ubyte", "record 7 is incomplete");
  write_images(test_scratch_path(1, "long-images-idx3-ubyte"), NULL, 10, 2, 2, 0);
  FILE *f = fopen(test_scratch_slot(1), "ab");
  fputs("extra", f);
  fclose(f);
  expect_open_error(test_scratch_slot(1), MOCO_EFORMAT, "long-images-idx3-ubyte: offset 56", "5 bytes after the 10 records");
}
END_TEST

START_TEST(truncated_gzip_is_found_while_reading_and_names_the_record) {
  write_images(test_scratch_path(0, "g-images-idx3-ubyte.gz"), NULL, 400, 28, 28, 1);
  long size = fx_file_size(test_scratch_slot(0));
  ck_assert_int_eq(fx_truncate(test_scratch_slot(0), size / 2), 0);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "train", test_scratch_slot(0), NULL, 0), 0); /* the header is intact */
  dataset_reader r;
  data_record rec;
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 0), 0);
  int rc, n = 0;
  while ((rc = dataset_reader_next(&r, &rec)) == 1) n++;
  ck_assert_int_lt(rc, 0);
  ck_assert_int_gt(n, 10);
  ck_assert_int_lt(n, 400);
  ck_assert_int_eq(r.bad, 400 - n); /* the rest of the stream is lost, and says so */
  char want[64];
  snprintf(want, sizeof want, "record %d of 400", n);
  ck_assert_msg(strstr(moco_errmsg(), want) && strstr(moco_errmsg(), "g-images-idx3-ubyte.gz"), "%s",
                moco_errmsg());
  ck_assert_int_eq(dataset_reader_next(&r, &rec), 0); /* then the file is at its end, not stuck */
  dataset_reader_close(&r);
  dataset_close(&ds);
}
END_TEST

START_TEST(labels_count_that_disagrees_is_refused) {
  write_images(test_scratch_path(0, "c-images-idx3-ubyte"), NULL, 10, 2, 2, 0);
  uint8_t lb[9] = {0};
  uint32_t d = 9;
  ck_assert_int_eq(idx_write(test_scratch_path(1, "c-labels-idx1-ubyte"), 0, IDX_U8, 1, &d, lb), 0);
  expect_open_error(test_scratch_slot(0), MOCO_ESHAPE, "c-labels-idx1-ubyte", "9 labels, but");
  /* a labels file matched by a glob goes with its images, not into the samples */
  ck_assert_int_eq(idx_write(test_scratch_slot(1), 0, IDX_U8, 1, (uint32_t[]){10}, (uint8_t[10]){0}), 0);
  uint64_t sum;
  ck_assert_int_eq(read_all(test_scratch_path(2, "c-*"), 0, &sum), 10);
}
END_TEST

START_TEST(truncated_labels_are_found_at_open) {
  write_images(test_scratch_path(0, "u-images-idx3-ubyte.gz"), test_scratch_path(1, "u-labels-idx1-ubyte.gz"), 3000, 2, 2, 1);
  ck_assert_int_eq(fx_truncate(test_scratch_slot(1), fx_file_size(test_scratch_slot(1)) - 20), 0);
  expect_open_error(test_scratch_slot(0), MOCO_EEOF, "u-labels-idx1-ubyte.gz: offset", "truncated in the labels");
}
END_TEST

START_TEST(label_out_of_range_names_the_record) {
  write_images(test_scratch_path(0, "r-images-idx3-ubyte.gz"), test_scratch_path(1, "r-labels-idx1-ubyte.gz"), 30, 2, 2, 1);
  uint64_t sum;
  ck_assert_int_eq(read_all(test_scratch_slot(0), 10, &sum), 30);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "train", test_scratch_slot(0), NULL, 9), 0);
  dataset_reader r;
  data_record rec;
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 0), 0);
  int rc, n = 0, bad = 0;
  while ((rc = dataset_reader_next(&r, &rec)) != 0) {
    if (rc == 1) {
      n++;
      continue;
    }
    ck_assert_int_eq(rc, MOCO_ERANGE);
    ck_assert_int_eq(r.bad, 1); /* one record, and reading goes on */
    ck_assert_msg(strstr(moco_errmsg(), "r-images-idx3-ubyte.gz: record 9: label 9 out of range [0, 9)") ||
                      bad > 0, "%s", moco_errmsg());
    bad++;
  }
  ck_assert_int_eq(bad, 3); /* records 9, 19, 29 */
  ck_assert_int_eq(n, 27);
  dataset_reader_close(&r);
  dataset_close(&ds);
}
END_TEST

START_TEST(empty_data_set_is_refused) {
  uint32_t d[3] = {0, 2, 2};
  ck_assert_int_eq(idx_write(test_scratch_path(0, "e-images-idx3-ubyte"), 0, IDX_U8, 3, d, ""), 0);
  expect_open_error(test_scratch_slot(0), MOCO_EEOF, "train", "empty data set");
}
END_TEST

START_TEST(shapes_that_disagree_across_files_are_refused) {
  write_images(test_scratch_path(0, "p-images-idx3-ubyte"), NULL, 3, 2, 2, 0);
  write_images(test_scratch_path(1, "q-images-idx3-ubyte"), NULL, 3, 2, 3, 0);
  char spec[1100];
  snprintf(spec, sizeof spec, "%s,%s", test_scratch_slot(0), test_scratch_slot(1));
  expect_open_error(spec, MOCO_ESHAPE, "q-images-idx3-ubyte", "1x2x3 u8 disagree with 1x2x2 u8");
  ck_assert_int_eq(read_all(test_scratch_path(2, "p-images-idx3-ubyte, ,"), 0, NULL), 3); /* empty list items are ignored */
}
END_TEST

/* The real mocopack binary packs the sample into shards that read back record for record. */
START_TEST(idx_round_trip_through_mocopack) {
  char cmd[2048], out[4096];
  snprintf(cmd, sizeof cmd, "%s idx --shard-records 700 --block-size 10K -o %s/fm %s", bin_path("mocopack"), test_scratch_dir(),
           data_path("fmnist-train-images-idx3-ubyte.gz"));
  int st = run_capture(cmd, out, sizeof out);
  ck_assert_msg(st == 0, "%s -> %d: %s", cmd, st, out);
  ck_assert_msg(strstr(out, "2000 records (1x28x28 u8, labels, 10 classes) in 3 shard(s)"), "%s", out);
  dataset a, b;
  ck_assert_int_eq(dataset_open(&a, "idx", data_path("fmnist-train-images-idx3-ubyte.gz"), NULL, 0), 0);
  ck_assert_int_eq(dataset_open(&b, "shards", test_scratch_path(0, "fm-*.shard"), NULL, 0), 0);
  ck_assert_int_eq(b.n_files, 3);
  ck_assert_int_eq(b.count, 2000);
  ck_assert_int_eq(b.num_classes, 10);
  ck_assert_int_eq(b.files[0].shard.block_records, 10240 / (8 + 4 + 784));
  dataset_reader ra, rb;
  data_record x, y;
  ck_assert_int_eq(dataset_reader_open(&ra, &a, 0, 0), 0);
  int64_t n = 0;
  for (int f = 0; f < b.n_files; f++) {
    ck_assert_int_eq(dataset_reader_open(&rb, &b, f, 0), 0);
    while (dataset_reader_next(&rb, &y) == 1) {
      ck_assert_int_eq(dataset_reader_next(&ra, &x), 1);
      ck_assert_int_eq(y.id, n);
      ck_assert_int_eq(x.id, n);
      ck_assert_int_eq(y.label, x.label);
      ck_assert_mem_eq(x.sample, y.sample, 784);
      n++;
    }
    dataset_reader_close(&rb);
  }
  ck_assert_int_eq(n, 2000);
  dataset_reader_close(&ra);
  dataset_close(&a);
  dataset_close(&b);
  /* info agrees, and its statistics are those of Fashion-MNIST's first images */
  snprintf(cmd, sizeof cmd, "%s info --verify --stats '%s/fm-*.shard'", bin_path("mocopack"), test_scratch_dir());
  ck_assert_int_eq(run_capture(cmd, out, sizeof out), 0);
  ck_assert_msg(strstr(out, "total: 2000 records of 1x28x28 u8 in 3 file(s), labelled, 10 classes"), "%s", out);
  ck_assert_msg(strstr(out, "verify: 0 bad record(s)") && strstr(out, "mean: [0.2"), "%s", out);
}
END_TEST

START_TEST(mocopack_reports_bad_input_and_writes_nothing) {
  write_images(test_scratch_path(0, "m-images-idx3-ubyte.gz"), test_scratch_path(1, "m-labels-idx1-ubyte.gz"), 300, 28, 28, 1);
  ck_assert_int_eq(fx_truncate(test_scratch_slot(0), fx_file_size(test_scratch_slot(0)) / 2), 0);
  char cmd[2048], out[4096];
  snprintf(cmd, sizeof cmd, "%s idx --shard-records 50 -o %s/out %s", bin_path("mocopack"), test_scratch_dir(), test_scratch_slot(0));
  int st = run_capture(cmd, out, sizeof out);
  ck_assert_int_eq(st, 1);
  ck_assert_msg(strstr(out, "m-images-idx3-ubyte.gz") && strstr(out, "record "), "%s", out);
  snprintf(cmd, sizeof cmd, "ls %s | grep -c shard", test_scratch_dir());
  run_capture(cmd, out, sizeof out);
  ck_assert_str_eq(out, "0\n");
  snprintf(cmd, sizeof cmd, "%s bogus", bin_path("mocopack"));
  ck_assert_int_eq(run_capture(cmd, out, sizeof out), 2);
}
END_TEST

Suite *data_idx_suite(void) {
  Suite *s = suite_create("data_idx");
  TCase *tc = tcase_create("idx");
  tcase_add_checked_fixture(tc, test_scratch_setup, test_scratch_teardown);
  tcase_set_timeout(tc, 30);
  tcase_add_test(tc, sample_gzip_reads_with_its_labels_found_by_name);
  tcase_add_test(tc, plain_and_gzip_give_the_same_records_from_any_start);
  tcase_add_test(tc, other_element_types_become_float32);
  tcase_add_test(tc, missing_file_and_empty_glob_are_refused);
  tcase_add_test(tc, bad_magic_is_refused_at_offset_0);
  tcase_add_test(tc, truncated_plain_file_is_refused_naming_the_record);
  tcase_add_test(tc, truncated_gzip_is_found_while_reading_and_names_the_record);
  tcase_add_test(tc, labels_count_that_disagrees_is_refused);
  tcase_add_test(tc, truncated_labels_are_found_at_open);
  tcase_add_test(tc, label_out_of_range_names_the_record);
  tcase_add_test(tc, empty_data_set_is_refused);
  tcase_add_test(tc, shapes_that_disagree_across_files_are_refused);
  tcase_add_test(tc, idx_round_trip_through_mocopack);
  tcase_add_test(tc, mocopack_reports_bad_input_and_writes_nothing);
  suite_add_tcase(s, tc);
  return s;
}
