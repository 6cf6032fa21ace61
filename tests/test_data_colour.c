/* Colour views on RGB images: saturation, hue and grayscale do what torchvision's do, stay in [0, 1]
 * for pixels, and leave other channel counts (and their random streams) alone. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "data/views.h"
#include "testutil.h"
#include "service/config.h"

/* Every augmentation off: each test turns on the one it looks at. */
static view_config none(void) {
  view_config c;
  c = config_defaults()->trainer.loader.augment;
  c.crop_p = c.flip_p = c.translate_p = c.brightness_p = c.contrast_p = c.erase_p = c.noise_p = c.mask_p = 0;
  c.saturation_p = c.hue_p = c.grayscale_p = 0;
  return c;
}

/* Pixels: red, green, blue, a grey, an orange, white, black, a dark teal. */
enum { NPX = 8 };
static const float px[3][NPX] = {{1, 0, 0, 0.5f, 1.0f, 1, 0, 0.1f},
                                 {0, 1, 0, 0.5f, 0.5f, 1, 0, 0.4f},
                                 {0, 0, 1, 0.5f, 0.0f, 1, 0, 0.35f}};

static void load(float *x) {
  for (int c = 0; c < 3; c++) memcpy(x + c * NPX, px[c], sizeof px[c]);
}

static float luma(const float *x, int i) { return 0.299f * x[i] + 0.587f * x[NPX + i] + 0.114f * x[2 * NPX + i]; }

START_TEST(grayscale_sets_every_channel_to_the_luma) {
  float x[3 * NPX];
  load(x);
  view_grayscale(x, NPX);
  for (int i = 0; i < NPX; i++) {
    float g = 0.299f * px[0][i] + 0.587f * px[1][i] + 0.114f * px[2][i];
    for (int c = 0; c < 3; c++) ck_assert_float_eq_tol(x[c * NPX + i], g, 1e-6f);
  }
}
END_TEST

START_TEST(saturation_blends_with_grey_and_clamps) {
  float x[3 * NPX], y[3 * NPX];
  load(x);
  view_saturation(x, NPX, 1.0f, 0, 1);
  load(y);
  for (int k = 0; k < 3 * NPX; k++) ck_assert_float_eq_tol(x[k], y[k], 1e-6f); /* factor 1: unchanged */
  view_saturation(x, NPX, 0.0f, 0, 1);
  for (int i = 0; i < NPX; i++)
    for (int c = 0; c < 3; c++) ck_assert_float_eq_tol(x[c * NPX + i], luma(y, i), 1e-6f);
  load(x);
  view_saturation(x, NPX, 3.0f, 0, 1);
  for (int i = 0; i < NPX; i++)
    for (int c = 0; c < 3; c++) {
      float want = luma(y, i) + 3.0f * (y[c * NPX + i] - luma(y, i));
      ck_assert_float_eq_tol(x[c * NPX + i], fminf(1, fmaxf(0, want)), 1e-6f);
    }
}
END_TEST

START_TEST(hue_turns_the_colour_wheel) {
  float x[3 * NPX], y[3 * NPX];
  load(x);
  load(y);
  view_hue(x, NPX, 0.0f, 0, 1);
  for (int k = 0; k < 3 * NPX; k++) ck_assert_float_eq_tol(x[k], y[k], 1e-6f);
  view_hue(x, NPX, 1.0f / 3.0f, 0, 1); /* red -> green -> blue -> red */
  float want[3][3] = {{0, 1, 0}, {0, 0, 1}, {1, 0, 0}};
  for (int i = 0; i < 3; i++)
    for (int c = 0; c < 3; c++) ck_assert_float_eq_tol(x[c * NPX + i], want[i][c], 1e-5f);
  for (int i = 3; i < 7; i++) /* greys, white and black have no hue */
    if (i != 4)
      for (int c = 0; c < 3; c++) ck_assert_float_eq_tol(x[c * NPX + i], y[c * NPX + i], 1e-6f);
  /* orange (1, 0.5, 0) half-way round is azure (0, 0.5, 1); value and saturation are kept */
  load(x);
  view_hue(x, NPX, 0.5f, 0, 1);
  ck_assert_float_eq_tol(x[4], 0.0f, 1e-5f);
  ck_assert_float_eq_tol(x[NPX + 4], 0.5f, 1e-5f);
  ck_assert_float_eq_tol(x[2 * NPX + 4], 1.0f, 1e-5f);
  /* a turn there and back is the identity */
  load(x);
  view_hue(x, NPX, 0.17f, 0, 1);
  view_hue(x, NPX, -0.17f, 0, 1);
  for (int k = 0; k < 3 * NPX; k++) ck_assert_float_eq_tol(x[k], y[k], 1e-5f);
}
END_TEST

/* One augmented view of a random u8 image of shape s. */
static void view_of(const view_config *c, data_shape s, const uint8_t *raw, float *out) {
  view_pipeline v;
  ck_assert_int_eq(view_init(&v, c, VIEW_AUGMENT, s, DATA_U8, 0, NULL, NULL), 0);
  view_scratch sc;
  ck_assert_int_eq(view_scratch_init(&sc, &v), 0);
  int64_t id = 5;
  view_batch_in in = {raw, data_shape_size(s), 1, &id, 9, 0};
  rng_t r;
  view_rng(&r, 9, 0, id, 0);
  view_augment(&v, &in, 0, out, &r, &sc);
  view_scratch_free(&sc);
  view_free(&v);
}

START_TEST(rgb_views_stay_pixels_and_grey_images_ignore_colour_settings) {
  data_shape rgb = {3, 12, 9}, grey = {1, 12, 9}, four = {4, 6, 6};
  uint8_t raw[3 * 12 * 9];
  rng_t r;
  rng_init(&r, 1, 2);
  for (size_t k = 0; k < sizeof raw; k++) raw[k] = (uint8_t)rng_below(&r, 256);
  float a[3 * 12 * 9], b[3 * 12 * 9];
  view_config all;
  all = config_defaults()->trainer.loader.augment;
  all.saturation_p = all.hue_p = 1, all.saturation_max = 5, all.hue_max = 0.5f;
  for (int t = 0; t < 20; t++) {
    view_of(&all, rgb, raw, a);
    for (size_t k = 0; k < sizeof a / sizeof a[0]; k++) ck_assert(a[k] >= 0.0f && a[k] <= 1.0f);
  }
  /* grayscale on: every channel equal */
  view_config g = none();
  g.grayscale_p = 1;
  view_of(&g, rgb, raw, a);
  for (int i = 0; i < 108; i++) ck_assert_float_eq(a[i], a[108 + i]);
  /* on 1 and 4 channels the colour steps neither act nor draw: the same view as with them off */
  view_config off = all;
  off.saturation_p = off.hue_p = off.grayscale_p = 0;
  view_config on = all;
  on.grayscale_p = 1;
  data_shape shapes[2] = {grey, four};
  for (int k = 0; k < 2; k++) {
    view_of(&on, shapes[k], raw, a);
    view_of(&off, shapes[k], raw, b);
    ck_assert_mem_eq(a, b, data_shape_size(shapes[k]) * sizeof(float));
  }
}
END_TEST

START_TEST(colour_settings_are_checked) {
  json_t *c = config_new();
  ck_assert_int_eq(config_finalize(c, NULL), 0);
  static const struct {
    const char *path;
    double value;
  } bad[] = {{"views.hue_max", 0.6}, {"views.saturation_min", 2}, {"views.grayscale_p", 1.5}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    json_t *v = json_real(bad[i].value);
    ck_assert_int_eq(config_set(c, bad[i].path, v, 0), MOCO_ECONFIG);
    json_decref(v);
  }
  json_decref(c);
}
END_TEST

Suite *data_colour_suite(void) {
  Suite *s = suite_create("data_colour");
  TCase *tc = tcase_create("colour");
  tcase_add_test(tc, grayscale_sets_every_channel_to_the_luma);
  tcase_add_test(tc, saturation_blends_with_grey_and_clamps);
  tcase_add_test(tc, hue_turns_the_colour_wheel);
  tcase_add_test(tc, rgb_views_stay_pixels_and_grey_images_ignore_colour_settings);
  tcase_add_test(tc, colour_settings_are_checked);
  suite_add_tcase(s, tc);
  return s;
}
