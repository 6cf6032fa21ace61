/* Shards: writer and reader round trips, mocopack raw and csv, and every way a shard can be bad. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "data/dataset.h"
#include "data/idx.h"
#include "data/shard.h"
#include "data_fixtures.h"
#include "testutil.h"

static char dir[64];
static char spec[600];

static void setup(void) { strcpy(dir, test_tmpdir()); }
static void teardown(void) { rm_rf(dir); }

static const char *shard0(void) {
  static char p[600];
  snprintf(p, sizeof p, "%s/s-0.shard", dir);
  return p;
}

static void expect_open_error(int code, const char *detail) {
  dataset ds;
  int rc = dataset_open(&ds, "train", spec, NULL, 0);
  ck_assert_msg(rc == code, "got %s (%s), expected %s", moco_strerror(rc), moco_errmsg(), moco_strerror(code));
  ck_assert_msg(strstr(moco_errmsg(), "s-0.shard"), "message '%s' does not name the file", moco_errmsg());
  ck_assert_msg(strstr(moco_errmsg(), detail), "message '%s' lacks '%s'", moco_errmsg(), detail);
}

/* Reads file 0 from `start`, checking each record against the fixture; returns records read. */
static uint64_t check_records(const dataset *ds, int file, uint64_t start) {
  dataset_reader r;
  data_record rec;
  size_t sb = ds->sample_bytes;
  uint8_t *want = malloc(sb);
  ck_assert_int_eq(dataset_reader_open(&r, ds, file, start), 0);
  uint64_t i = ds->files[file].first + start, n = 0;
  int rc;
  while ((rc = dataset_reader_next(&r, &rec)) == 1) {
    ck_assert_int_eq(rec.id, (int64_t)i);
    if (ds->has_labels) ck_assert_int_eq(rec.label, (int)(i % (uint64_t)ds->num_classes));
    fx_sample(i, 0, ds->shape, ds->dtype, want);
    ck_assert_mem_eq(rec.sample, want, sb);
    if (ds->has_pair) {
      fx_sample(i, 1, ds->shape, ds->dtype, want);
      ck_assert_mem_eq(rec.pair, want, sb);
    } else {
      ck_assert_ptr_null(rec.pair);
    }
    i++;
    n++;
  }
  ck_assert_int_eq(rc, 0);
  dataset_reader_close(&r);
  free(want);
  return n;
}

START_TEST(writer_and_reader_round_trip_across_blocks_and_starts) {
  data_shape s = {3, 4, 5};
  ck_assert_int_eq(fx_write_shards(dir, "s", 2, 37, s, DATA_F32, 1, 1, 5, 8, spec, sizeof spec), 0);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "train", spec, NULL, 0), 0);
  ck_assert_int_eq(ds.n_files, 2);
  ck_assert_int_eq(ds.count, 74);
  ck_assert(ds.has_labels && ds.has_pair);
  ck_assert_int_eq(ds.num_classes, 5);
  ck_assert_int_eq(ds.files[1].first, 37);
  ck_assert_int_eq(fx_file_size(shard0()), (long)shard_file_bytes(&ds.files[0].shard));
  for (uint64_t start = 0; start <= 37; start += 5) ck_assert_int_eq(check_records(&ds, 0, start), 37 - start);
  ck_assert_int_eq(check_records(&ds, 1, 0), 37);
  dataset_close(&ds);
}
END_TEST

START_TEST(u8_shard_without_labels_reads_minus_one) {
  ck_assert_int_eq(fx_write_shards(dir, "s", 1, 10, (data_shape){1, 6, 6}, DATA_U8, 0, 0, 0, 0, spec, sizeof spec), 0);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "train", spec, NULL, 0), 0);
  ck_assert(!ds.has_labels && !ds.has_pair);
  dataset_reader r;
  data_record rec;
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 0), 0);
  ck_assert_int_eq(dataset_reader_next(&r, &rec), 1);
  ck_assert_int_eq(rec.label, -1);
  dataset_reader_close(&r);
  ck_assert_int_eq(check_records(&ds, 0, 0), 10);
  dataset_close(&ds);
}
END_TEST

START_TEST(writer_refuses_bad_records_and_abort_leaves_nothing) {
  shard_header h = {.flags = SHARD_LABELS, .dtype = DATA_F32, .shape = {2, 1, 1}, .num_classes = 3};
  shard_writer w;
  float ok[2] = {1, 2}, nan2[2] = {1, NAN};
  ck_assert_int_eq(shard_writer_open(&w, shard0(), &h), 0);
  ck_assert_int_eq(shard_writer_add(&w, 0, 2, ok, NULL), 0);
  ck_assert_int_eq(shard_writer_add(&w, 1, 3, ok, NULL), MOCO_ERANGE);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "label 3 out of range"));
  ck_assert_int_eq(shard_writer_add(&w, 1, 0, nan2, NULL), MOCO_ERANGE);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "element 1 is nan"));
  ck_assert_int_eq(shard_writer_add(&w, 1, 0, ok, ok), MOCO_EINVAL);
  shard_writer_abort(&w);
  ck_assert_int_eq(fx_file_size(shard0()), -1);
  char tmp[700];
  snprintf(tmp, sizeof tmp, "%s.tmp", shard0());
  ck_assert_int_eq(fx_file_size(tmp), -1);
}
END_TEST

START_TEST(truncated_shard_is_refused_naming_the_block) {
  ck_assert_int_eq(fx_write_shards(dir, "s", 1, 100, (data_shape){1, 4, 4}, DATA_U8, 1, 0, 10, 16, spec, sizeof spec), 0);
  shard_header h;
  ck_assert_int_eq(shard_probe(shard0(), &h), 0);
  ck_assert_int_eq(fx_truncate(shard0(), fx_record_offset(&h, 50) + 3), 0);
  expect_open_error(MOCO_EEOF, "block 3, from record 48, is incomplete");
  ck_assert_int_eq(fx_truncate(shard0(), 20), 0);
  expect_open_error(MOCO_EEOF, "truncated header: need 64 bytes, found 20");
}
END_TEST

START_TEST(trailing_bytes_disagree_with_the_record_count) {
  ck_assert_int_eq(fx_write_shards(dir, "s", 1, 10, (data_shape){4, 1, 1}, DATA_F32, 0, 0, 0, 0, spec, sizeof spec), 0);
  long size = fx_file_size(shard0());
  FILE *f = fopen(shard0(), "ab");
  fwrite("12345678", 1, 8, f);
  fclose(f);
  char want[64];
  snprintf(want, sizeof want, "offset %ld: 8 bytes after the 10 records", size);
  expect_open_error(MOCO_EFORMAT, want);
}
END_TEST

START_TEST(bad_magic_version_and_header_checksum_are_refused) {
  ck_assert_int_eq(fx_write_shards(dir, "s", 1, 10, (data_shape){4, 1, 1}, DATA_F32, 0, 0, 0, 0, spec, sizeof spec), 0);
  ck_assert_int_eq(fx_flip(shard0(), 40), 0); /* the record count */
  expect_open_error(MOCO_ECHECKSUM, "offset 0: header checksum mismatch");
  ck_assert_int_eq(fx_flip(shard0(), 40), 0);
  uint8_t hdr[64];
  ck_assert_int_eq(fx_read(shard0(), 0, hdr, 64), 0);
  hdr[8] = 7; /* version 7, checksum made right: the version check must catch it */
  uint32_t crc = blob_crc32(hdr, 60);
  memcpy(hdr + 60, &crc, 4);
  ck_assert_int_eq(fx_write(shard0(), 0, hdr, 64), 0);
  expect_open_error(MOCO_EFORMAT, "offset 8: version 7, expected 1");
  ck_assert_int_eq(fx_write(shard0(), 0, "MOCOSHRX", 8), 0);
  expect_open_error(MOCO_EFORMAT, "offset 0: unknown format");
}
END_TEST

START_TEST(block_checksum_mismatch_names_block_and_records_and_reading_goes_on) {
  ck_assert_int_eq(fx_write_shards(dir, "s", 1, 100, (data_shape){1, 4, 4}, DATA_U8, 1, 0, 10, 16, spec, sizeof spec), 0);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "train", spec, NULL, 0), 0);
  ck_assert_int_eq(fx_flip(shard0(), fx_record_offset(&ds.files[0].shard, 37) + 20), 0);
  dataset_reader r;
  data_record rec;
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 0), 0);
  int rc, n = 0, errors = 0;
  while ((rc = dataset_reader_next(&r, &rec)) != 0) {
    if (rc == 1) {
      ck_assert(rec.id < 32 || rec.id >= 48);
      n++;
      continue;
    }
    errors++;
    ck_assert_int_eq(rc, MOCO_ECHECKSUM);
    ck_assert_int_eq(r.bad, 16);
    char want[128];
    snprintf(want, sizeof want, "s-0.shard: offset %ld: block 2 (records 32..47) checksum mismatch",
             fx_record_offset(&ds.files[0].shard, 32));
    ck_assert_msg(strstr(moco_errmsg(), want), "%s", moco_errmsg());
  }
  ck_assert_int_eq(errors, 1);
  ck_assert_int_eq(n, 84);
  dataset_reader_close(&r);
  /* a reader started inside the bad block loses only the rest of it */
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 40), 0);
  ck_assert_int_eq(dataset_reader_next(&r, &rec), MOCO_ECHECKSUM);
  ck_assert_int_eq(r.bad, 8);
  ck_assert_int_eq(dataset_reader_next(&r, &rec), 1);
  ck_assert_int_eq(rec.id, 48);
  dataset_reader_close(&r);
  dataset_close(&ds);
}
END_TEST

START_TEST(label_out_of_range_and_non_finite_values_are_bad_records) {
  ck_assert_int_eq(fx_write_shards(dir, "s", 1, 20, (data_shape){3, 1, 1}, DATA_F32, 1, 0, 4, 8, spec, sizeof spec), 0);
  shard_header h;
  ck_assert_int_eq(shard_probe(shard0(), &h), 0);
  int32_t bad_label = 4;
  float inf = INFINITY;
  ck_assert_int_eq(fx_write(shard0(), fx_record_offset(&h, 5) + 8, &bad_label, 4), 0);
  ck_assert_int_eq(fx_write(shard0(), fx_record_offset(&h, 13) + 12 + 4, &inf, 4), 0);
  ck_assert_int_eq(fx_fix_block_crc(shard0(), &h, 5), 0);
  ck_assert_int_eq(fx_fix_block_crc(shard0(), &h, 13), 0);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "train", spec, NULL, 0), 0);
  dataset_reader r;
  data_record rec;
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 0), 0);
  int rc, n = 0;
  const char *want[2] = {"s-0.shard: record 5: label 4 out of range [0, 4)",
                         "s-0.shard: record 13: element 1 is inf, expected a finite value"};
  int k = 0;
  while ((rc = dataset_reader_next(&r, &rec)) != 0) {
    if (rc == 1) {
      n++;
      continue;
    }
    ck_assert_int_eq(rc, MOCO_ERANGE);
    ck_assert_int_eq(r.bad, 1);
    ck_assert_int_lt(k, 2);
    ck_assert_msg(strstr(moco_errmsg(), want[k]), "%s", moco_errmsg());
    k++;
  }
  ck_assert_int_eq(k, 2);
  ck_assert_int_eq(n, 18);
  dataset_reader_close(&r);
  dataset_close(&ds);
}
END_TEST

START_TEST(shards_that_disagree_are_refused) {
  ck_assert_int_eq(fx_write_shards(dir, "s", 1, 5, (data_shape){4, 1, 1}, DATA_F32, 0, 0, 0, 0, NULL, 0), 0);
  ck_assert_int_eq(fx_write_shards(dir, "t", 1, 5, (data_shape){4, 1, 1}, DATA_F32, 0, 1, 0, 0, NULL, 0), 0);
  snprintf(spec, sizeof spec, "%s/s-0.shard,%s/t-0.shard", dir, dir);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "train", spec, NULL, 0), MOCO_ESHAPE);
  ck_assert_msg(strstr(moco_errmsg(), "t-0.shard: samples 4x1x1 f32 pairs disagree with 4x1x1 f32 of"), "%s",
                moco_errmsg());
}
END_TEST

static void write_file(const char *path, const void *p, size_t n) {
  FILE *f = fopen(path, "wb");
  ck_assert_ptr_nonnull(f);
  ck_assert_int_eq(fwrite(p, 1, n, f), n);
  fclose(f);
}

START_TEST(raw_arrays_round_trip_through_mocopack) {
  enum { N = 500, D = 6 };
  float *x = malloc(N * D * sizeof *x), *y = malloc(N * D * sizeof *y);
  int32_t lab[N];
  for (int i = 0; i < N; i++) {
    for (int k = 0; k < D; k++) {
      x[i * D + k] = (float)i + 0.125f * k;
      y[i * D + k] = -(float)i - 0.25f * k;
    }
    lab[i] = i % 7;
  }
  char a[600], b[600], l[600], cmd[4096], out[4096];
  snprintf(a, sizeof a, "%s/x.f32", dir);
  snprintf(b, sizeof b, "%s/y.f32", dir);
  snprintf(l, sizeof l, "%s/l.i32", dir);
  write_file(a, x, N * D * sizeof *x);
  write_file(b, y, N * D * sizeof *y);
  write_file(l, lab, sizeof lab);
  snprintf(cmd, sizeof cmd, "%s raw --shape 2,3 --dtype f32 --labels %s --pair %s --shard-size 10K --id-start 1000 -o %s/r %s",
           bin_path("mocopack"), l, b, dir, a);
  ck_assert_msg(run_capture(cmd, out, sizeof out) == 0, "%s", out);
  ck_assert_msg(strstr(out, "500 records (1x2x3 f32, pairs, labels, 7 classes)"), "%s", out);
  snprintf(spec, sizeof spec, "%s/r-*.shard", dir);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "train", spec, NULL, 0), 0);
  ck_assert_int_eq(ds.count, N);
  ck_assert_int_eq(ds.n_files, 3); /* 10 KiB shards hold 170 records of 60 bytes */
  int i = 0;
  for (int f = 0; f < ds.n_files; f++) {
    dataset_reader r;
    data_record rec;
    ck_assert_int_eq(dataset_reader_open(&r, &ds, f, 0), 0);
    while (dataset_reader_next(&r, &rec) == 1) {
      ck_assert_int_eq(rec.id, 1000 + i);
      ck_assert_int_eq(rec.label, i % 7);
      ck_assert_mem_eq(rec.sample, x + i * D, D * 4);
      ck_assert_mem_eq(rec.pair, y + i * D, D * 4);
      i++;
    }
    dataset_reader_close(&r);
  }
  ck_assert_int_eq(i, N);
  dataset_close(&ds);
  /* a data file that is not a whole number of samples is refused, naming both sizes */
  write_file(a, x, N * D * sizeof *x - 4);
  ck_assert_int_eq(run_capture(cmd, out, sizeof out), 1);
  ck_assert_msg(strstr(out, "11996 bytes are not a whole number of 24-byte samples"), "%s", out);
  free(x);
  free(y);
}
END_TEST

START_TEST(csv_round_trips_through_mocopack_and_bad_fields_are_located) {
  char csv[600], cmd[4096], out[4096];
  snprintf(csv, sizeof csv, "%s/t.csv", dir);
  FILE *f = fopen(csv, "w");
  fprintf(f, "f1,class,\"f 2\",f3\r\n");
  for (int i = 0; i < 40; i++) fprintf(f, "%d.5, %d ,%g,\"%d\"\n", i, i % 3, -0.25 * i, 2 * i);
  fclose(f);
  snprintf(cmd, sizeof cmd, "%s csv --label class -o %s/c %s", bin_path("mocopack"), dir, csv);
  ck_assert_msg(run_capture(cmd, out, sizeof out) == 0, "%s", out);
  ck_assert_msg(strstr(out, "40 records (3x1x1 f32, labels, 3 classes)"), "%s", out);
  snprintf(spec, sizeof spec, "%s/c-*.shard", dir);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "train", spec, NULL, 0), 0);
  dataset_reader r;
  data_record rec;
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 0), 0);
  for (int i = 0; i < 40; i++) {
    ck_assert_int_eq(dataset_reader_next(&r, &rec), 1);
    ck_assert_int_eq(rec.label, i % 3);
    ck_assert_float_eq(data_decode_at(DATA_F32, rec.sample, 0), i + 0.5f);
    ck_assert_float_eq(data_decode_at(DATA_F32, rec.sample, 1), -0.25f * i);
    ck_assert_float_eq(data_decode_at(DATA_F32, rec.sample, 2), 2.0f * i);
  }
  ck_assert_int_eq(dataset_reader_next(&r, &rec), 0);
  dataset_reader_close(&r);
  dataset_close(&ds);

  f = fopen(csv, "w");
  fprintf(f, "1,2,0\n3,x4,1\n");
  fclose(f);
  snprintf(cmd, sizeof cmd, "%s csv --label 2 -o %s/d %s", bin_path("mocopack"), dir, csv);
  ck_assert_int_eq(run_capture(cmd, out, sizeof out), 1);
  ck_assert_msg(strstr(out, "t.csv: line 2, column 1: 'x4' is not a finite number"), "%s", out);
  f = fopen(csv, "w");
  fprintf(f, "1,2,0\n3,4\n");
  fclose(f);
  ck_assert_int_eq(run_capture(cmd, out, sizeof out), 1);
  ck_assert_msg(strstr(out, "t.csv: line 2: 2 columns, expected 3"), "%s", out);
  snprintf(cmd, sizeof cmd, "ls %s | grep -c shard", dir);
  run_capture(cmd, out, sizeof out);
  ck_assert_str_eq(out, "1\n"); /* only c-00000.shard from the good run */
}
END_TEST

/* Opens and reads a data set to the end, going on after bad records as the skip policy does; returns
 * the number of reads. Corrupt input may fail anywhere, but only with an error code. */
static int read_through(const char *path) {
  dataset ds;
  int rc = dataset_open(&ds, "fuzz", path, NULL, 0), reads = 0;
  if (rc) {
    ck_assert_int_lt(rc, 0);
    ck_assert(moco_errmsg()[0]);
    return 0;
  }
  for (int f = 0; f < ds.n_files; f++) {
    dataset_reader r;
    data_record rec;
    if (dataset_reader_open(&r, &ds, f, 0)) continue;
    while ((rc = dataset_reader_next(&r, &rec)) != 0) {
      ck_assert(rc == 1 || (rc < 0 && r.bad >= 1));
      ck_assert_int_lt(++reads, (int)ds.count + 5); /* every call makes progress */
    }
    dataset_reader_close(&r);
  }
  dataset_close(&ds);
  return reads;
}

/* Random damage to each format: under ASan/UBSan this proves no input crashes or hangs a reader. */
START_TEST(no_corruption_crashes_or_hangs_a_reader) {
  char paths[3][600];
  ck_assert_int_eq(fx_write_shards(dir, "s", 1, 60, (data_shape){2, 3, 3}, DATA_F32, 1, 1, 4, 7, NULL, 0), 0);
  snprintf(paths[0], sizeof paths[0], "%s/s-0.shard", dir);
  uint8_t px[40 * 9];
  for (int i = 0; i < 40 * 9; i++) px[i] = (uint8_t)(i * 37);
  snprintf(paths[1], sizeof paths[1], "%s/z-images-idx3-ubyte.gz", dir);
  snprintf(paths[2], sizeof paths[2], "%s/p-images-idx3-ubyte", dir);
  ck_assert_int_eq(idx_write(paths[1], 1, IDX_U8, 3, (uint32_t[]){40, 3, 3}, px), 0);
  ck_assert_int_eq(idx_write(paths[2], 0, IDX_U8, 3, (uint32_t[]){40, 3, 3}, px), 0);
  rng_t g;
  rng_init(&g, 5, 5);
  for (int k = 0; k < 3; k++) {
    long size = fx_file_size(paths[k]);
    uint8_t *orig = malloc((size_t)size);
    ck_assert_int_eq(fx_read(paths[k], 0, orig, (size_t)size), 0);
    ck_assert_int_gt(read_through(paths[k]), 39);
    for (int t = 0; t < 150; t++) {
      long at = t < 40 ? t % (k ? 16 : 64) : (long)rng_below(&g, (uint32_t)size); /* headers first */
      uint8_t b = (uint8_t)rng_u32(&g);
      ck_assert_int_eq(fx_write(paths[k], at, &b, 1), 0);
      if (t % 7 == 0) ck_assert_int_eq(fx_truncate(paths[k], (long)rng_below(&g, (uint32_t)size)), 0);
      read_through(paths[k]);
      ck_assert_int_eq(fx_truncate(paths[k], 0), 0);
      ck_assert_int_eq(fx_write(paths[k], 0, orig, (size_t)size), 0);
    }
    free(orig);
  }
}
END_TEST

Suite *data_shard_suite(void) {
  Suite *s = suite_create("data_shard");
  TCase *tc = tcase_create("shard");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, 30);
  tcase_add_test(tc, writer_and_reader_round_trip_across_blocks_and_starts);
  tcase_add_test(tc, u8_shard_without_labels_reads_minus_one);
  tcase_add_test(tc, writer_refuses_bad_records_and_abort_leaves_nothing);
  tcase_add_test(tc, truncated_shard_is_refused_naming_the_block);
  tcase_add_test(tc, trailing_bytes_disagree_with_the_record_count);
  tcase_add_test(tc, bad_magic_version_and_header_checksum_are_refused);
  tcase_add_test(tc, block_checksum_mismatch_names_block_and_records_and_reading_goes_on);
  tcase_add_test(tc, label_out_of_range_and_non_finite_values_are_bad_records);
  tcase_add_test(tc, shards_that_disagree_are_refused);
  tcase_add_test(tc, raw_arrays_round_trip_through_mocopack);
  tcase_add_test(tc, csv_round_trips_through_mocopack_and_bad_fields_are_located);
  tcase_add_test(tc, no_corruption_crashes_or_hangs_a_reader);
  suite_add_tcase(s, tc);
  return s;
}
