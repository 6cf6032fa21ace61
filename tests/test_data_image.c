/* Image folders: PNG and JPEG decoded, resized and centre-cropped, packed by mocopack as an ImageFolder or
 * flat, grey or RGB; images that will not decode stop the pack (nothing written) or are skipped by name. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jpeglib.h>
#include <png.h>

#include "core/err.h"
#include "data/dataset.h"
#include "data/image.h"
#include "data_fixtures.h"
#include "testutil.h"

static char dir[64];
static char buf[4][1024];

static void setup(void) { strcpy(dir, test_tmpdir()); }
static void teardown(void) { rm_rf(dir); }

static const char *at(int k, const char *name) {
  snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
  return buf[k];
}

/* A w x h image of one colour (RGB interleaved). */
static uint8_t *solid(int w, int h, const uint8_t rgb[3]) {
  uint8_t *p = malloc((size_t)w * h * 3);
  for (int i = 0; i < w * h; i++) memcpy(p + 3 * i, rgb, 3);
  return p;
}

static void write_png(const char *path, const uint8_t *rgb, int w, int h) {
  png_image img;
  memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  img.width = (png_uint_32)w, img.height = (png_uint_32)h, img.format = PNG_FORMAT_RGB;
  ck_assert_msg(png_image_write_to_file(&img, path, 0, rgb, 0, NULL), "%s: %s", path, img.message);
}

static void write_jpeg(const char *path, const uint8_t *rgb, int w, int h) {
  struct jpeg_compress_struct c;
  struct jpeg_error_mgr e;
  FILE *f = fopen(path, "wb");
  ck_assert_ptr_nonnull(f);
  c.err = jpeg_std_error(&e);
  jpeg_create_compress(&c);
  jpeg_stdio_dest(&c, f);
  c.image_width = (JDIMENSION)w, c.image_height = (JDIMENSION)h, c.input_components = 3, c.in_color_space = JCS_RGB;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 100, TRUE);
  jpeg_start_compress(&c, TRUE);
  while (c.next_scanline < c.image_height) {
    JSAMPROW row = (JSAMPROW)(rgb + (size_t)c.next_scanline * w * 3);
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  fclose(f);
}

static const uint8_t colours[3][3] = {{200, 30, 40}, {20, 180, 60}, {50, 60, 220}};

/* DIR/<class>/ with n images of each class's colour, of various sizes, PNG and JPEG, plus a text file. */
static void make_folder(const char *root, int n) {
  static const char *names[3] = {"apple", "leaf", "sky"};
  mkdir(root, 0755);
  for (int k = 0; k < 3; k++) {
    char d[1100], f[1200];
    snprintf(d, sizeof d, "%s/%s", root, names[k]);
    mkdir(d, 0755);
    for (int i = 0; i < n; i++) {
      int w = 20 + 7 * i, h = 16 + 5 * (i % 3);
      uint8_t *p = solid(w, h, colours[k]);
      snprintf(f, sizeof f, "%s/%d.%s", d, i, i % 2 ? "JPG" : "png");
      (i % 2 ? write_jpeg : write_png)(f, p, w, h);
      free(p);
    }
    snprintf(f, sizeof f, "%s/notes.txt", d);
    FILE *t = fopen(f, "w");
    fputs("not an image", t);
    fclose(t);
  }
}

static int pack(const char *args, char *out, size_t n) {
  char cmd[2048];
  snprintf(cmd, sizeof cmd, "%s images %s", bin_path("mocopack"), args);
  return run_capture(cmd, out, n);
}

START_TEST(image_folder_packs_with_class_labels_in_rgb_and_grey) {
  make_folder(at(0, "img"), 4);
  char args[1024], out[4096];
  snprintf(args, sizeof args, "--size 8 -o %s/rgb %s/img", dir, dir);
  int st = pack(args, out, sizeof out);
  ck_assert_msg(st == 0 && strstr(out, "12 records (3x8x8 u8, labels, 3 classes)"), "%d: %s", st, out);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "t", at(1, "rgb-*.shard"), NULL, 0), 0);
  dataset_reader r;
  data_record rec;
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 0), 0);
  int per_class[3] = {0}, first_labels[12], n = 0;
  while (dataset_reader_next(&r, &rec) == 1) {
    ck_assert(rec.label >= 0 && rec.label < 3);
    per_class[rec.label]++;
    first_labels[n++] = rec.label;
    /* one colour in, the same colour out (JPEG at quality 100 within a few levels) */
    for (int c = 0; c < 3; c++)
      for (int i = 0; i < 64; i++) {
        int d = (int)rec.sample[c * 64 + i] - colours[rec.label][c];
        ck_assert_msg(d >= -3 && d <= 3, "class %d channel %d: %d", rec.label, c, rec.sample[c * 64 + i]);
      }
  }
  dataset_reader_close(&r);
  dataset_close(&ds);
  ck_assert_int_eq(n, 12);
  for (int k = 0; k < 3; k++) ck_assert_int_eq(per_class[k], 4);
  int sorted = 1; /* shuffled: not class after class */
  for (int i = 1; i < 12; i++) sorted &= first_labels[i] >= first_labels[i - 1];
  ck_assert(!sorted);
  FILE *f = fopen(at(2, "rgb.classes"), "r");
  ck_assert_ptr_nonnull(f);
  char names[64] = {0};
  ck_assert_int_eq(fread(names, 1, sizeof names - 1, f), 15);
  fclose(f);
  ck_assert_str_eq(names, "apple\nleaf\nsky\n");
  /* grey: the luma of the colour */
  snprintf(args, sizeof args, "--size 5 --grey --no-shuffle -o %s/g %s/img", dir, dir);
  ck_assert_msg(pack(args, out, sizeof out) == 0, "%s", out);
  ck_assert_int_eq(dataset_open(&ds, "t", at(1, "g-*.shard"), NULL, 0), 0);
  ck_assert_int_eq(ds.shape.c, 1);
  ck_assert_int_eq(dataset_reader_open(&r, &ds, 0, 0), 0);
  ck_assert_int_eq(dataset_reader_next(&r, &rec), 1);
  ck_assert_int_eq(rec.label, 0);
  int luma = (int)(0.299 * 200 + 0.587 * 30 + 0.114 * 40 + 0.5);
  ck_assert_int_le(abs((int)rec.sample[12] - luma), 1);
  dataset_reader_close(&r);
  dataset_close(&ds);
}
END_TEST

START_TEST(flat_folder_packs_without_labels) {
  mkdir(at(0, "flat"), 0755);
  uint8_t c[3] = {1, 2, 3};
  for (int i = 0; i < 5; i++) {
    char f[64];
    snprintf(f, sizeof f, "flat/%d.png", i);
    uint8_t *p = solid(9, 9, c);
    write_png(at(1, f), p, 9, 9);
    free(p);
  }
  char args[1024], out[4096];
  snprintf(args, sizeof args, "--size 4 -o %s/fl %s/flat", dir, dir);
  ck_assert_msg(pack(args, out, sizeof out) == 0 && strstr(out, "5 records (3x4x4 u8)"), "%s", out);
  dataset ds;
  ck_assert_int_eq(dataset_open(&ds, "t", at(1, "fl-*.shard"), NULL, 0), 0);
  ck_assert(!ds.has_labels);
  dataset_close(&ds);
  ck_assert_int_eq(access(at(2, "fl.classes"), F_OK), -1);
}
END_TEST

START_TEST(resampling_averages_and_crops_the_centre) {
  /* a 4x2 image, left half black, right half white: the centre 2x2 of its 4x2 -> (shorter side 2) is
   * the middle columns, one black and one white; downscaled 2x, a column pair averages */
  uint8_t rgb[8 * 4 * 3];
  for (int y = 0; y < 4; y++)
    for (int x = 0; x < 8; x++) memset(rgb + (y * 8 + x) * 3, x < 4 ? 0 : 255, 3);
  uint8_t out[3 * 2 * 2];
  ck_assert_int_eq(image_resize_crop(rgb, 8, 4, 2, 3, out), 0);
  /* 8x4 -> 4x2 then the centre 2x2: columns 1 and 2 of 4, each averaging source columns around 2..5 */
  ck_assert_int_lt(out[0], out[1]);
  ck_assert_int_eq(out[0], out[2]);
  ck_assert_int_eq(out[1], out[3]);
  ck_assert_int_eq(out[0] + out[1], 255);
  /* a checkerboard shrunk 4x is grey: every source pixel counted, none skipped */
  uint8_t cb[16 * 16 * 3], g[3 * 4 * 4];
  for (int i = 0; i < 256; i++) memset(cb + 3 * i, ((i / 16) + (i % 16)) % 2 ? 255 : 0, 3);
  ck_assert_int_eq(image_resize_crop(cb, 16, 16, 4, 3, g), 0);
  for (int i = 0; i < 48; i++) ck_assert_int_le(abs((int)g[i] - 128), 12);
}
END_TEST

START_TEST(images_that_will_not_decode_stop_or_are_skipped_by_name) {
  make_folder(at(0, "img"), 3);
  FILE *f = fopen(at(1, "img/leaf/zz-corrupt.png"), "wb");
  fputs("\x89PNG\r\n\x1a\nthis is not a PNG stream at all", f);
  fclose(f);
  /* a JPEG cut in half: libjpeg only warns; mocod refuses it */
  uint8_t *p = solid(64, 64, colours[0]);
  write_jpeg(at(1, "img/sky/zz-cut.jpg"), p, 64, 64);
  free(p);
  ck_assert_int_eq(fx_truncate(buf[1], fx_file_size(buf[1]) / 2), 0);
  char args[1024], out[8192], cmd[1200];
  snprintf(args, sizeof args, "--size 6 --no-shuffle -o %s/x %s/img", dir, dir);
  ck_assert_int_eq(pack(args, out, sizeof out), 1);
  ck_assert_msg(strstr(out, "zz-corrupt.png") && strstr(out, "PNG does not decode"), "%s", out);
  snprintf(cmd, sizeof cmd, "ls %s | grep -c '^x'", dir);
  run_capture(cmd, out, sizeof out);
  ck_assert_str_eq(out, "0\n");
  snprintf(args, sizeof args, "--size 6 --on-error skip -o %s/x %s/img", dir, dir);
  ck_assert_int_eq(pack(args, out, sizeof out), 0);
  ck_assert_msg(strstr(out, "skipped") && strstr(out, "zz-corrupt.png") && strstr(out, "zz-cut.jpg") &&
                strstr(out, "JPEG does not decode") && strstr(out, "2 of 11 images skipped") &&
                strstr(out, "9 records"), "%s", out);
  /* a folder with no image, and a missing one */
  mkdir(at(0, "empty"), 0755);
  snprintf(args, sizeof args, "--size 6 -o %s/e %s/empty", dir, dir);
  ck_assert_int_eq(pack(args, out, sizeof out), 1);
  ck_assert_msg(strstr(out, "no .png, .jpg or .jpeg file"), "%s", out);
  snprintf(args, sizeof args, "--size 6 -o %s/e %s/nowhere", dir, dir);
  ck_assert_int_eq(pack(args, out, sizeof out), 1);
  ck_assert_msg(strstr(out, "nowhere"), "%s", out);
  snprintf(args, sizeof args, "-o %s/e %s/img", dir, dir);
  ck_assert_int_eq(pack(args, out, sizeof out), 1);
  ck_assert_msg(strstr(out, "--size"), "%s", out);
}
END_TEST

Suite *data_image_suite(void) {
  Suite *s = suite_create("data_image");
  TCase *tc = tcase_create("image");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_add_test(tc, image_folder_packs_with_class_labels_in_rgb_and_grey);
  tcase_add_test(tc, flat_folder_packs_without_labels);
  tcase_add_test(tc, resampling_averages_and_crops_the_centre);
  tcase_add_test(tc, images_that_will_not_decode_stop_or_are_skipped_by_name);
  suite_add_tcase(s, tc);
  return s;
}
