/* Checkpoint files: atomic write, whole-file checksum, keep-last-N, falling back past damaged ones. */
#include <check.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/err.h"
#include "testutil.h"
#include "train/checkpoint.h"

static void write_ckpt(const char *dir, int64_t step, uint32_t value, char *path, size_t n) {
  blob_writer w;
  blob_writer_init(&w);
  checkpoint_begin(&w, step);
  blob_section_begin(&w, "TEST");
  blob_put_u32(&w, value);
  for (int i = 0; i < 1000; i++) blob_put_f32(&w, (float)i);
  blob_section_end(&w);
  ck_assert_int_eq(checkpoint_commit(&w, dir, step, path, n, NULL), 0);
  blob_writer_free(&w);
}

static uint32_t read_value(checkpoint_file *f) {
  blob_reader s;
  uint32_t v = 0;
  ck_assert_int_eq(blob_section(&f->body, "TEST", &s), 0);
  ck_assert_int_eq(blob_get_u32(&s, &v), 0);
  return v;
}

static int skipped;
static char skipped_why[512];
static void on_skip(void *ctx, const char *path, const char *why) {
  (void)ctx;
  (void)path;
  skipped++;
  snprintf(skipped_why, sizeof skipped_why, "%s", why);
}

static int count_files(const char *dir) {
  char cmd[256];
  snprintf(cmd, sizeof cmd, "ls -A '%s' | wc -l", dir);
  FILE *p = popen(cmd, "r");
  int n = -1;
  ck_assert(fscanf(p, "%d", &n) == 1);
  pclose(p);
  return n;
}

START_TEST(round_trip_prune_and_newest_first) {
  char *dir = strdup(test_tmpdir());
  checkpoint_file f;
  ck_assert_int_eq(checkpoint_read_latest(&f, dir, NULL, NULL), MOCO_ENOENT);
  char path[1100];
  for (int s = 1; s <= 4; s++) write_ckpt(dir, s * 10, (uint32_t)s, path, sizeof path);
  ck_assert_ptr_nonnull(strstr(path, "ckpt-000000000040.mcp"));
  struct stat st;
  ck_assert_int_eq(stat(path, &st), 0);
  ck_assert_int_eq(st.st_mode & 0777, 0600);
  ck_assert_int_eq(checkpoint_prune(dir, 2), 2);
  ck_assert_int_eq(count_files(dir), 2);
  ck_assert_int_eq(checkpoint_read_latest(&f, dir, NULL, NULL), 0);
  ck_assert_int_eq(f.step, 40);
  ck_assert_uint_eq(read_value(&f), 4);
  checkpoint_file_free(&f);
  rm_rf(dir);
  free(dir);
}
END_TEST

START_TEST(damaged_newest_falls_back_to_previous_with_reason) {
  char *dir = strdup(test_tmpdir());
  char p1[1100], p2[1100];
  write_ckpt(dir, 5, 55, p1, sizeof p1);
  write_ckpt(dir, 6, 66, p2, sizeof p2);
  /* Flip one byte in the middle of the newest. */
  int fd = open(p2, O_RDWR);
  unsigned char b;
  ck_assert_int_eq(pread(fd, &b, 1, 100), 1);
  b ^= 0x40;
  ck_assert_int_eq(pwrite(fd, &b, 1, 100), 1);
  close(fd);
  checkpoint_file f;
  skipped = 0;
  ck_assert_int_eq(checkpoint_read_latest(&f, dir, on_skip, NULL), 0);
  ck_assert_int_eq(skipped, 1);
  ck_assert_ptr_nonnull(strstr(skipped_why, "checksum mismatch"));
  ck_assert_int_eq(f.step, 5);
  ck_assert_uint_eq(read_value(&f), 55);
  checkpoint_file_free(&f);

  /* A truncated newest is skipped the same way. */
  ck_assert_int_eq(truncate(p2, 2000), 0);
  skipped = 0;
  ck_assert_int_eq(checkpoint_read_latest(&f, dir, on_skip, NULL), 0);
  ck_assert_int_eq(skipped, 1);
  ck_assert_ptr_nonnull(strstr(skipped_why, "truncated"));
  ck_assert_int_eq(f.step, 5);
  checkpoint_file_free(&f);

  /* Every one damaged: an error, not a silent fresh start. */
  ck_assert_int_eq(truncate(p1, 10), 0);
  ck_assert_int_eq(checkpoint_read_latest(&f, dir, NULL, NULL), MOCO_ECHECKSUM);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "all 2 checkpoints are damaged"));
  rm_rf(dir);
  free(dir);
}
END_TEST

START_TEST(stray_temporary_files_are_removed_by_prune) {
  char *dir = strdup(test_tmpdir());
  char p[1100];
  write_ckpt(dir, 1, 1, p, sizeof p);
  char tmp[1100];
  snprintf(tmp, sizeof tmp, "%s/.ckpt-000000000002.mcp.tmp", dir);
  FILE *t = fopen(tmp, "w");
  fputs("half", t);
  fclose(t);
  ck_assert_int_eq(checkpoint_prune(dir, 5), 0);
  ck_assert_int_eq(access(tmp, F_OK), -1);
  ck_assert_int_eq(count_files(dir), 1);
  rm_rf(dir);
  free(dir);
}
END_TEST

START_TEST(missing_directory_is_an_io_error_on_write) {
  blob_writer w;
  blob_writer_init(&w);
  checkpoint_begin(&w, 1);
  ck_assert_int_eq(checkpoint_commit(&w, "/nonexistent/mocod", 1, NULL, 0, NULL), MOCO_EIO);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "/nonexistent/mocod/.ckpt-000000000001.mcp.tmp"));
  blob_writer_free(&w);
}
END_TEST

Suite *checkpoint_suite(void) {
  Suite *s = suite_create("checkpoint");
  TCase *tc = tcase_create("files");
  tcase_add_test(tc, round_trip_prune_and_newest_first);
  tcase_add_test(tc, damaged_newest_falls_back_to_previous_with_reason);
  tcase_add_test(tc, stray_temporary_files_are_removed_by_prune);
  tcase_add_test(tc, missing_directory_is_an_io_error_on_write);
  suite_add_tcase(s, tc);
  return s;
}
