/* NumPy .npy input: round trips (u8 and f32, versions 1.0 and 2.0, labels beside or given, the loader,
 * mocopack) and every bad-input case, each refused naming the file and the header field. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "data/dataset.h"
#include "data/loader.h"
#include "data/npy.h"
#include "data_fixtures.h"
#include "testutil.h"
#include "service/config.h"

/* n records of shape s from data_fixtures (record i identifiable from its bytes), labels i % 7 as i64. */
static void write_set(const char *path, const char *labels, uint64_t n, data_shape s, data_dtype t) {
  size_t sb = data_shape_size(s) * data_dtype_size(t);
  uint8_t *x = malloc(n * sb);
  int64_t *y = malloc(n * sizeof *y);
  for (uint64_t i = 0; i < n; i++) {
    fx_sample(i, 0, s, t, x + i * sb);
    y[i] = (int64_t)(i % 7);
  }
  uint64_t dims[4] = {n, (uint64_t)s.c, (uint64_t)s.h, (uint64_t)s.w};
  int ndim = s.h * s.w == 1 ? 2 : s.c == 1 ? 3 : 4;
  if (ndim == 3) dims[1] = (uint64_t)s.h, dims[2] = (uint64_t)s.w;
  ck_assert_int_eq(npy_write(path, t == DATA_U8 ? "|u1" : "<f4", ndim, dims, x), 0);
  if (labels) ck_assert_int_eq(npy_write(labels, "<i8", 1, dims, y), 0);
  free(x);
  free(y);
}

/* Writes a file with a hand-made header (and `body` bytes of zeros), version 1.0 or 2.0. */
static void write_raw(const char *path, int major, const char *dict, size_t body) {
  FILE *f = fopen(path, "wb");
  ck_assert_ptr_nonnull(f);
  size_t len = strlen(dict);
  fwrite("\x93NUMPY", 1, 6, f);
  uint8_t v[2] = {(uint8_t)major, 0};
  fwrite(v, 1, 2, f);
  uint8_t l[4] = {(uint8_t)len, (uint8_t)(len >> 8), (uint8_t)(len >> 16), (uint8_t)(len >> 24)};
  fwrite(l, 1, major == 1 ? 2 : 4, f);
  fwrite(dict, 1, len, f);
  for (size_t i = 0; i < body; i++) fputc(0, f);
  fclose(f);
}

/* Reads every record of spec checking each against the fixture; returns the count or the error. */
static long read_check(const char *spec, const char *labels, data_shape s, data_dtype t) {
  dataset ds;
  int rc = dataset_open(&ds, "t", spec, labels, 0);
  if (rc) return rc;
  ck_assert_int_eq(ds.shape.c, s.c);
  ck_assert_int_eq(ds.shape.h, s.h);
  ck_assert_int_eq(ds.shape.w, s.w);
  ck_assert_int_eq(ds.dtype, t);
  size_t sb = data_shape_size(s) * data_dtype_size(t);
  uint8_t *want = malloc(sb);
  long n = 0;
  for (int f = 0; f < ds.n_files && rc >= 0; f++) {
    dataset_reader r;
    data_record rec;
    if ((rc = dataset_reader_open(&r, &ds, f, 0))) break;
    while ((rc = dataset_reader_next(&r, &rec)) == 1) {
      ck_assert_int_eq(rec.id, n);
      ck_assert_int_eq(rec.label, ds.has_labels ? n % 7 : -1);
      fx_sample((uint64_t)n, 0, s, t, want);
      ck_assert_mem_eq(rec.sample, want, sb);
      n++;
    }
    dataset_reader_close(&r);
  }
  free(want);
  dataset_close(&ds);
  return rc < 0 ? rc : n;
}

START_TEST(u8_images_and_f32_vectors_round_trip_with_labels_beside) {
  data_shape img = {3, 5, 4}, grey = {1, 6, 6}, vec = {9, 1, 1};
  write_set(test_scratch_path(0, "rgb.npy"), test_scratch_path(1, "rgb.labels.npy"), 23, img, DATA_U8);
  ck_assert_int_eq(read_check(test_scratch_slot(0), NULL, img, DATA_U8), 23);
  write_set(test_scratch_path(0, "grey.npy"), NULL, 11, grey, DATA_U8);
  ck_assert_int_eq(read_check(test_scratch_slot(0), NULL, grey, DATA_U8), 11);
  write_set(test_scratch_path(0, "vec.npy"), test_scratch_path(1, "y.npy"), 17, vec, DATA_F32);
  ck_assert_int_eq(read_check(test_scratch_slot(0), test_scratch_slot(1), vec, DATA_F32), 17);
  /* numpy's "images" -> "labels" naming is found too, and the class count is the largest label + 1 */
  write_set(test_scratch_path(0, "train_images.npy"), test_scratch_path(1, "train_labels.npy"), 30, img, DATA_U8);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "t", test_scratch_slot(0), NULL, 0), 0);
  ck_assert(ds.has_labels);
  ck_assert_int_eq(ds.num_classes, 7);
  dataset_close(&ds);
}
END_TEST

START_TEST(version_2_header_and_any_start_record) {
  data_shape s = {2, 3, 3};
  write_set(test_scratch_path(0, "a.npy"), NULL, 9, s, DATA_U8);
  /* the same array with a 2.0 preamble (u32 header length) */
  npy_info in;
  ck_assert_int_eq(npy_probe(test_scratch_slot(0), &in), 0);
  ck_assert_int_eq(in.major, 1);
  FILE *f = fopen(test_scratch_slot(0), "rb");
  uint8_t *all = malloc(in.data_off + 9 * 18);
  ck_assert_int_eq(fread(all, 1, in.data_off + 9 * 18, f), in.data_off + 9 * 18);
  fclose(f);
  char dict[256];
  snprintf(dict, sizeof dict, "%.*s", (int)(in.data_off - 10), (char *)all + 10);
  write_raw(test_scratch_path(1, "v2.npy"), 2, dict, 0);
  f = fopen(test_scratch_slot(1), "ab");
  fwrite(all + in.data_off, 1, 9 * 18, f);
  fclose(f);
  free(all);
  ck_assert_int_eq(read_check(test_scratch_slot(1), NULL, s, DATA_U8), 9);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "t", test_scratch_slot(1), NULL, 0), 0);
  dataset_reader r;
  data_record rec;
  uint8_t want[18];
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 6), 0);
  ck_assert_int_eq(dataset_reader_next(&r, &rec), 1);
  ck_assert_int_eq(rec.id, 6);
  fx_sample(6, 0, s, DATA_U8, want);
  ck_assert_mem_eq(rec.sample, want, 18);
  dataset_reader_close(&r);
  dataset_close(&ds);
}
END_TEST

START_TEST(loader_streams_every_record_once_per_epoch) {
  data_shape s = {3, 4, 4};
  write_set(test_scratch_path(0, "x.npy"), test_scratch_path(1, "x.labels.npy"), 50, s, DATA_U8);
  loader_config c = config_defaults()->trainer.loader;
  c.train = test_scratch_slot(0);
  c.batch_size = 10;
  c.shuffle_buffer = 16;
  c.epochs = 1;
  loader l;
  ck_assert_int_eq(loader_open(&l, &c), 0);
  ck_assert_int_eq(l.num_classes, 7);
  int seen[50] = {0}, batches = 0;
  loader_batch b;
  while (loader_next(&l, &b) == 0 && b.size) {
    for (int i = 0; i < b.size; i++) {
      ck_assert_int_eq(b.labels[i], b.ids[i] % 7);
      seen[b.ids[i]]++;
    }
    batches++;
  }
  loader_close(&l);
  ck_assert_int_eq(batches, 5);
  for (int i = 0; i < 50; i++) ck_assert_int_eq(seen[i], 1);
}
END_TEST

/* The error names the file and the header field. */
static void refused(const char *path, int code, const char *field) {
  dataset ds;
  int rc = dataset_open(&ds, "t", path, NULL, 0);
  ck_assert_msg(rc == code, "%s: %d (%s), expected %d", path, rc, moco_errmsg(), code);
  ck_assert_msg(strstr(moco_errmsg(), path) && strstr(moco_errmsg(), field), "%s", moco_errmsg());
}

START_TEST(fortran_big_endian_object_and_other_dtypes_are_refused_naming_the_field) {
  write_raw(test_scratch_path(0, "fortran.npy"), 1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }\n", 24);
  refused(test_scratch_slot(0), MOCO_EFORMAT, "'fortran_order'");
  write_raw(test_scratch_path(0, "big.npy"), 1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }\n", 24);
  refused(test_scratch_slot(0), MOCO_EFORMAT, "'descr': '>f4' is big-endian");
  write_raw(test_scratch_path(0, "obj.npy"), 1, "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }\n", 16);
  refused(test_scratch_slot(0), MOCO_EFORMAT, "object array");
  write_raw(test_scratch_path(0, "f8.npy"), 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }\n", 48);
  refused(test_scratch_slot(0), MOCO_EFORMAT, "'descr': '<f8'");
  write_raw(test_scratch_path(0, "i4.npy"), 1, "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }\n", 24);
  refused(test_scratch_slot(0), MOCO_EFORMAT, "'descr'");
  write_raw(test_scratch_path(0, "nokey.npy"), 1, "{'descr': '<f4', 'shape': (2, 3), }\n", 24);
  refused(test_scratch_slot(0), MOCO_EFORMAT, "'fortran_order': missing");
  write_raw(test_scratch_path(0, "extra.npy"), 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}\n", 24);
  refused(test_scratch_slot(0), MOCO_EFORMAT, "'x': unknown key");
  write_raw(test_scratch_path(0, "v9.npy"), 9, "{}", 0);
  refused(test_scratch_slot(0), MOCO_EFORMAT, "format version 9");
  write_raw(test_scratch_path(0, "5d.npy"), 1, "{'descr': '|u1', 'fortran_order': False, 'shape': (1, 1, 1, 1, 1), }\n", 1);
  refused(test_scratch_slot(0), MOCO_EFORMAT, "'shape': more than 4");
}
END_TEST

START_TEST(truncated_and_overlong_files_are_refused_from_their_size) {
  write_set(test_scratch_path(0, "t.npy"), NULL, 10, (data_shape){4, 1, 1}, DATA_F32);
  long size = fx_file_size(test_scratch_slot(0));
  ck_assert_int_eq(fx_truncate(test_scratch_slot(0), size - 3), 0);
  refused(test_scratch_slot(0), MOCO_EEOF, "truncated");
  ck_assert_msg(strstr(moco_errmsg(), "record 9 is incomplete"), "%s", moco_errmsg());
  ck_assert_int_eq(fx_truncate(test_scratch_slot(0), 40), 0); /* inside the header */
  refused(test_scratch_slot(0), MOCO_EEOF, "header");
  write_raw(test_scratch_path(1, "long.npy"), 1, "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3), }\n", 7);
  refused(test_scratch_slot(1), MOCO_EFORMAT, "1 bytes after the 2 records");
}
END_TEST

START_TEST(bad_labels_are_refused_naming_file_and_index) {
  data_shape s = {4, 1, 1};
  write_set(test_scratch_path(0, "x.npy"), NULL, 10, s, DATA_F32);
  uint64_t d9[1] = {9}, d10[1] = {10};
  int32_t y[10] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  ck_assert_int_eq(npy_write(test_scratch_path(1, "short.npy"), "<i4", 1, d9, y), 0);
  ck_assert_int_eq(dataset_open(&(dataset){0}, "t", test_scratch_slot(0), test_scratch_slot(1), 0), MOCO_ESHAPE);
  ck_assert_msg(strstr(moco_errmsg(), "9 labels"), "%s", moco_errmsg());
  y[4] = -5;
  ck_assert_int_eq(npy_write(test_scratch_path(1, "neg.npy"), "<i4", 1, d10, y), 0);
  ck_assert_int_eq(dataset_open(&(dataset){0}, "t", test_scratch_slot(0), test_scratch_slot(1), 0), MOCO_ERANGE);
  ck_assert_msg(strstr(moco_errmsg(), "neg.npy") && strstr(moco_errmsg(), "label 4 is -5"), "%s", moco_errmsg());
  float fy[10] = {0};
  ck_assert_int_eq(npy_write(test_scratch_path(1, "float.npy"), "<f4", 1, d10, fy), 0);
  ck_assert_int_eq(dataset_open(&(dataset){0}, "t", test_scratch_slot(0), test_scratch_slot(1), 0), MOCO_EFORMAT);
  ck_assert_msg(strstr(moco_errmsg(), "float.npy") && strstr(moco_errmsg(), "'descr'"), "%s", moco_errmsg());
}
END_TEST

START_TEST(writer_leaves_nothing_half_written) {
  uint64_t dims[2] = {0, 3};
  npy_writer w;
  ck_assert_int_eq(npy_writer_open(&w, test_scratch_path(0, "w.npy"), "<f4", 2, dims), 0);
  float row[6] = {1, 2, 3, 4, 5, 6};
  ck_assert_int_eq(npy_writer_add(&w, row, 2), 0);
  ck_assert_int_eq(access(test_scratch_slot(0), F_OK), -1); /* only the .tmp exists while writing */
  npy_writer_abort(&w);
  char cmd[600], out[256];
  snprintf(cmd, sizeof cmd, "ls -A %s | wc -l", test_scratch_dir());
  run_capture(cmd, out, sizeof out);
  ck_assert_str_eq(out, "0\n");
  ck_assert_int_eq(npy_writer_open(&w, test_scratch_slot(0), "<f4", 2, dims), 0);
  ck_assert_int_eq(npy_writer_add(&w, row, 2), 0);
  ck_assert_int_eq(npy_writer_close(&w), 0);
  npy_info in;
  ck_assert_int_eq(npy_probe(test_scratch_slot(0), &in), 0);
  ck_assert_int_eq(in.count, 2);
  ck_assert_int_eq(in.dims[1], 3);
  ck_assert_int_eq(in.data_off % 64, 0);
}
END_TEST

START_TEST(npy_round_trip_through_mocopack_and_bad_input_writes_nothing) {
  data_shape s = {3, 4, 4};
  write_set(test_scratch_path(0, "p.npy"), test_scratch_path(1, "p.labels.npy"), 40, s, DATA_U8);
  char cmd[2048], out[4096];
  snprintf(cmd, sizeof cmd, "%s npy --shard-records 15 -o %s/sh %s", bin_path("mocopack"), test_scratch_dir(), test_scratch_slot(0));
  int st = run_capture(cmd, out, sizeof out);
  ck_assert_msg(st == 0, "%s -> %d: %s", cmd, st, out);
  ck_assert_msg(strstr(out, "40 records (3x4x4 u8, labels, 7 classes) in 3 shard(s)"), "%s", out);
  ck_assert_int_eq(read_check(test_scratch_path(2, "sh-*.shard"), NULL, s, DATA_U8), 40);
  snprintf(cmd, sizeof cmd, "%s info %s", bin_path("mocopack"), test_scratch_slot(0));
  ck_assert_int_eq(run_capture(cmd, out, sizeof out), 0);
  ck_assert_msg(strstr(out, "NumPy v1 '|u1', 40 records"), "%s", out);
  write_raw(test_scratch_path(0, "bad.npy"), 1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }\n", 24);
  snprintf(cmd, sizeof cmd, "%s npy -o %s/bad %s", bin_path("mocopack"), test_scratch_dir(), test_scratch_slot(0));
  ck_assert_int_eq(run_capture(cmd, out, sizeof out), 1);
  ck_assert_msg(strstr(out, "bad.npy") && strstr(out, "fortran_order"), "%s", out);
  snprintf(cmd, sizeof cmd, "ls %s | grep -c bad-", test_scratch_dir());
  run_capture(cmd, out, sizeof out);
  ck_assert_str_eq(out, "0\n");
}
END_TEST

Suite *data_npy_suite(void) {
  Suite *s = suite_create("data_npy");
  TCase *tc = tcase_create("npy");
  tcase_add_checked_fixture(tc, test_scratch_setup, test_scratch_teardown);
  tcase_add_test(tc, u8_images_and_f32_vectors_round_trip_with_labels_beside);
  tcase_add_test(tc, version_2_header_and_any_start_record);
  tcase_add_test(tc, loader_streams_every_record_once_per_epoch);
  tcase_add_test(tc, fortran_big_endian_object_and_other_dtypes_are_refused_naming_the_field);
  tcase_add_test(tc, truncated_and_overlong_files_are_refused_from_their_size);
  tcase_add_test(tc, bad_labels_are_refused_naming_file_and_index);
  tcase_add_test(tc, writer_leaves_nothing_half_written);
  tcase_add_test(tc, npy_round_trip_through_mocopack_and_bad_input_writes_nothing);
  suite_add_tcase(s, tc);
  return s;
}
