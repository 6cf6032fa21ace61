/* Views: every augmentation held to its bounds, SCARF masking, pair mode, normalisation, determinism. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "data/views.h"
#include "data_fixtures.h"
#include "testutil.h"
#include "service/config.h"

/* Every augmentation off: each test turns on the one it looks at. */
static view_config none(void) {
  view_config c;
  c = config_defaults()->trainer.loader.augment;
  c.crop_p = c.flip_p = c.translate_p = c.brightness_p = c.contrast_p = c.erase_p = c.noise_p = c.mask_p = 0;
  return c;
}

START_TEST(crop_box_stays_inside_the_image) {
  int sizes[][2] = {{28, 28}, {32, 16}, {5, 40}, {1, 1}, {2, 3}, {224, 224}};
  view_config cfgs[4];
  for (int k = 0; k < 4; k++) cfgs[k] = config_defaults()->trainer.loader.augment;
  cfgs[1].crop_scale_min = 0.001f, cfgs[1].crop_scale_max = 0.01f;
  cfgs[2].crop_ratio_min = 0.05f, cfgs[2].crop_ratio_max = 20.0f;
  cfgs[3].crop_scale_min = 1.0f, cfgs[3].crop_ratio_min = 5.0f, cfgs[3].crop_ratio_max = 6.0f; /* fallback */
  rng_t r;
  rng_init(&r, 3, 77);
  for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
    for (int k = 0; k < 4; k++)
      for (int t = 0; t < 3000; t++) {
        int H = sizes[s][0], W = sizes[s][1];
        view_box b = view_crop_box(&cfgs[k], H, W, &r);
        ck_assert_msg(b.w >= 1 && b.h >= 1 && b.x >= 0 && b.y >= 0 && b.x + b.w <= W && b.y + b.h <= H,
                      "box %d,%d %dx%d in %dx%d (config %d)", b.x, b.y, b.w, b.h, H, W, k);
      }
}
END_TEST

START_TEST(resize_reads_only_inside_the_crop) {
  enum { C = 2, H = 9, W = 7 };
  float x[C * H * W], out[C * H * W];
  view_box b = {2, 3, 4, 5};
  for (int c = 0; c < C; c++)
    for (int y = 0; y < H; y++)
      for (int i = 0; i < W; i++) {
        int in = i >= b.x && i < b.x + b.w && y >= b.y && y < b.y + b.h;
        x[(c * H + y) * W + i] = in ? (float)(c * 10 + y + i) : NAN;
      }
  view_pipeline v;
  view_config cfg;
  cfg = config_defaults()->trainer.loader.augment;
  ck_assert_int_eq(view_init(&v, &cfg, VIEW_AUGMENT, (data_shape){C, H, W}, DATA_F32, 0, NULL, NULL), 0);
  view_scratch s;
  ck_assert_int_eq(view_scratch_init(&s, &v), 0);
  view_resize_crop(x, C, H, W, b, out, &s);
  for (int k = 0; k < C * H * W; k++) {
    ck_assert_msg(isfinite(out[k]), "pixel %d read outside the crop", k);
    int c = k / (H * W);
    ck_assert(out[k] >= c * 10 + b.y + b.x - 1e-4f && out[k] <= c * 10 + b.y + b.h - 1 + b.x + b.w - 1 + 1e-4f);
  }
  /* the whole image as the box is the identity */
  for (int k = 0; k < C * H * W; k++) x[k] = (float)k;
  view_resize_crop(x, C, H, W, (view_box){0, 0, W, H}, out, &s);
  ck_assert_mem_eq(out, x, sizeof x);
  view_scratch_free(&s);
  view_free(&v);
}
END_TEST

static void one_view(const view_pipeline *v, const uint8_t *raw, size_t stride, int n, int i, float *out,
                     uint64_t seed) {
  view_scratch s;
  ck_assert_int_eq(view_scratch_init(&s, v), 0);
  int64_t ids[64];
  for (int k = 0; k < n; k++) ids[k] = k;
  view_batch_in in = {raw, stride, n, ids, seed, 0};
  rng_t r;
  view_rng(&r, seed, 0, i, 0);
  view_augment(v, &in, i, out, &r, &s);
  view_scratch_free(&s);
}

START_TEST(augmented_images_stay_in_the_normalised_range) {
  view_config c;
  c = config_defaults()->trainer.loader.augment;
  c.crop_p = c.flip_p = c.translate_p = c.brightness_p = c.contrast_p = c.erase_p = c.noise_p = 1;
  c.translate_max = 0.5f;
  c.brightness_min = 0, c.brightness_max = 3;
  c.contrast_min = 0, c.contrast_max = 3;
  c.noise_std_min = 0, c.noise_std_max = 0.5f;
  data_shape s = {3, 12, 10};
  float mean[3] = {0.3f, 0.5f, 0.1f}, std[3] = {0.4f, 0.2f, 0.3f};
  view_pipeline v;
  ck_assert_int_eq(view_init(&v, &c, VIEW_AUGMENT, s, DATA_U8, 3, mean, std), 0);
  uint8_t raw[360];
  float out[360];
  for (uint64_t t = 0; t < 400; t++) {
    fx_sample(t, 0, s, DATA_U8, raw);
    if (t % 3 == 0) memset(raw, 255, 100); /* saturated regions must stay at the top of the range */
    one_view(&v, raw, sizeof raw, 1, 0, out, t);
    for (int k = 0; k < 360; k++) {
      int ch = k / 120;
      float lo = (0 - mean[ch]) / std[ch], hi = (1 - mean[ch]) / std[ch];
      ck_assert_msg(isfinite(out[k]) && out[k] >= lo - 1e-5f && out[k] <= hi + 1e-5f, "value %g outside [%g, %g]",
                    out[k], lo, hi);
    }
  }
  view_free(&v);
}
END_TEST

START_TEST(flip_translate_brightness_contrast_do_what_they_say) {
  data_shape s = {1, 4, 5};
  uint8_t raw[20];
  for (int k = 0; k < 20; k++) raw[k] = (uint8_t)(10 * k + 5);
  float out[20];
  view_pipeline v;
  view_config c = none();
  c.flip_p = 1;
  ck_assert_int_eq(view_init(&v, &c, VIEW_AUGMENT, s, DATA_U8, 0, NULL, NULL), 0);
  one_view(&v, raw, 20, 1, 0, out, 1);
  for (int y = 0; y < 4; y++)
    for (int x = 0; x < 5; x++) ck_assert_float_eq_tol(out[y * 5 + x], raw[y * 5 + 4 - x] / 255.0f, 1e-6f);
  view_free(&v);

  c = none();
  c.translate_p = 1;
  c.translate_max = 0.4f;
  ck_assert_int_eq(view_init(&v, &c, VIEW_AUGMENT, s, DATA_U8, 0, NULL, NULL), 0);
  int moved = 0;
  for (uint64_t seed = 0; seed < 50; seed++) {
    one_view(&v, raw, 20, 1, 0, out, seed);
    /* find the shift: some (dx, dy) with |dx| <= 2, |dy| <= 2 explains every pixel, zeros outside */
    int found = 0;
    for (int dy = -2; dy <= 2 && !found; dy++)
      for (int dx = -2; dx <= 2 && !found; dx++) {
        int ok = 1;
        for (int y = 0; y < 4; y++)
          for (int x = 0; x < 5; x++) {
            int sy = y - dy, sx = x - dx;
            float want = sy >= 0 && sy < 4 && sx >= 0 && sx < 5 ? raw[sy * 5 + sx] / 255.0f : 0.0f;
            ok &= fabsf(out[y * 5 + x] - want) < 1e-6f;
          }
        found = ok;
        moved += ok && (dx || dy);
      }
    ck_assert(found);
  }
  ck_assert_int_gt(moved, 25);
  view_free(&v);

  c = none();
  c.brightness_p = 1;
  c.brightness_min = c.brightness_max = 0.5f;
  ck_assert_int_eq(view_init(&v, &c, VIEW_AUGMENT, s, DATA_U8, 0, NULL, NULL), 0);
  one_view(&v, raw, 20, 1, 0, out, 2);
  for (int k = 0; k < 20; k++) ck_assert_float_eq_tol(out[k], 0.5f * raw[k] / 255.0f, 1e-6f);
  view_free(&v);

  c = none();
  c.contrast_p = 1;
  c.contrast_min = c.contrast_max = 0.0f; /* no contrast left: every pixel becomes the mean */
  ck_assert_int_eq(view_init(&v, &c, VIEW_AUGMENT, s, DATA_U8, 0, NULL, NULL), 0);
  one_view(&v, raw, 20, 1, 0, out, 3);
  for (int k = 0; k < 20; k++) ck_assert_float_eq_tol(out[k], 100.0f / 255.0f, 1e-5f);
  view_free(&v);
}
END_TEST

START_TEST(erasing_blanks_one_rectangle_within_the_area_range) {
  data_shape s = {1, 20, 20};
  uint8_t raw[400];
  memset(raw, 200, sizeof raw);
  float out[400];
  view_config c = none();
  c.erase_p = 1;
  view_pipeline v;
  ck_assert_int_eq(view_init(&v, &c, VIEW_AUGMENT, s, DATA_U8, 0, NULL, NULL), 0);
  int erased = 0;
  for (uint64_t seed = 0; seed < 100; seed++) {
    one_view(&v, raw, 400, 1, 0, out, seed);
    int zeros = 0, x0 = 99, y0 = 99, x1 = -1, y1 = -1;
    for (int k = 0; k < 400; k++)
      if (out[k] == 0.0f) {
        zeros++;
        int y = k / 20, x = k % 20;
        x0 = x < x0 ? x : x0, x1 = x > x1 ? x : x1, y0 = y < y0 ? y : y0, y1 = y > y1 ? y : y1;
      }
    if (!zeros) continue; /* ten tries can all miss; then nothing is erased */
    erased++;
    ck_assert_int_eq(zeros, (x1 - x0 + 1) * (y1 - y0 + 1)); /* a rectangle */
    ck_assert(zeros >= 0.02f * 400 * 0.5f && zeros <= 0.33f * 400 * 1.5f);
  }
  ck_assert_int_gt(erased, 90);
  view_free(&v);
}
END_TEST

START_TEST(scarf_masking_takes_exactly_the_rate_from_other_samples) {
  enum { N = 8, D = 50 };
  data_shape s = {D, 1, 1};
  uint8_t raw[N * D * 4];
  for (int i = 0; i < N; i++) fx_sample((uint64_t)i, 0, s, DATA_F32, raw + i * D * 4);
  view_config c = none();
  c.mask_p = 1;
  c.mask_rate_min = c.mask_rate_max = 0.4f;
  view_pipeline v;
  ck_assert_int_eq(view_init(&v, &c, VIEW_AUGMENT, s, DATA_F32, 0, NULL, NULL), 0);
  float out[D];
  for (int i = 0; i < N; i++) {
    one_view(&v, raw, D * 4, N, i, out, 11);
    int changed = 0;
    for (int k = 0; k < D; k++) {
      float own = fx_value((uint64_t)i, (size_t)k, 0, DATA_F32);
      if (out[k] == own) continue;
      changed++;
      int from_other = 0; /* the same feature of another sample: a draw from its marginal */
      for (int j = 0; j < N; j++) from_other |= j != i && out[k] == fx_value((uint64_t)j, (size_t)k, 0, DATA_F32);
      ck_assert(from_other);
    }
    ck_assert_int_eq(changed, 20);
  }
  view_free(&v);
  c.mask_rate_min = c.mask_rate_max = 0.0f;
  ck_assert_int_eq(view_init(&v, &c, VIEW_AUGMENT, s, DATA_F32, 0, NULL, NULL), 0);
  one_view(&v, raw, D * 4, N, 3, out, 11);
  ck_assert_mem_eq(out, raw + 3 * D * 4, D * 4);
  view_free(&v);
}
END_TEST

START_TEST(views_depend_only_on_seed_epoch_id_and_view) {
  enum { N = 6 };
  data_shape s = {1, 10, 10};
  view_config c;
  c = config_defaults()->trainer.loader.augment;
  c.noise_p = 0.5f;
  view_pipeline v;
  ck_assert_int_eq(view_init(&v, &c, VIEW_AUGMENT, s, DATA_U8, 1, (float[]){0.5f}, (float[]){0.25f}), 0);
  view_scratch sc;
  ck_assert_int_eq(view_scratch_init(&sc, &v), 0);
  uint8_t raw[N * 100], rev[N * 100];
  int64_t ids[N], rids[N];
  for (int i = 0; i < N; i++) {
    fx_sample((uint64_t)(40 + i), 0, s, DATA_U8, raw + i * 100);
    ids[i] = 40 + i;
    memcpy(rev + (N - 1 - i) * 100, raw + i * 100, 100);
    rids[N - 1 - i] = ids[i];
  }
  float a1[N * 100], a2[N * 100], b1[N * 100], b2[N * 100];
  view_batch_in in = {raw, 100, N, ids, 5, 2};
  view_batch(&v, &in, a1, a2, &sc);
  view_batch(&v, &in, b1, b2, &sc);
  ck_assert_mem_eq(a1, b1, sizeof a1);
  ck_assert_mem_eq(a2, b2, sizeof a2);
  ck_assert(memcmp(a1, a2, sizeof a1)); /* two different views */
  view_batch_in r = {rev, 100, N, rids, 5, 2}; /* same samples, other positions in the batch */
  view_batch(&v, &r, b1, b2, &sc);
  for (int i = 0; i < N; i++) ck_assert_mem_eq(a1 + i * 100, b1 + (N - 1 - i) * 100, 400);
  in.epoch = 3;
  view_batch(&v, &in, b1, b2, &sc);
  ck_assert(memcmp(a1, b1, sizeof a1));
  in.epoch = 2, in.seed = 6;
  view_batch(&v, &in, b1, b2, &sc);
  ck_assert(memcmp(a1, b1, sizeof a1));
  view_scratch_free(&sc);
  view_free(&v);
}
END_TEST

START_TEST(pair_mode_and_plain_views_only_normalise_per_channel) {
  data_shape s = {3, 2, 2};
  float mean[3] = {0.1f, 0.2f, 0.3f}, std[3] = {0.5f, 0.25f, 2.0f};
  view_config c;
  c = config_defaults()->trainer.loader.augment;
  view_pipeline v;
  ck_assert_int_eq(view_init(&v, &c, VIEW_PAIR, s, DATA_U8, 3, mean, std), 0);
  view_scratch sc;
  ck_assert_int_eq(view_scratch_init(&sc, &v), 0);
  uint8_t raw[2 * 24];
  fx_sample(9, 0, s, DATA_U8, raw);
  fx_sample(9, 1, s, DATA_U8, raw + 12);
  fx_sample(10, 0, s, DATA_U8, raw + 24);
  fx_sample(10, 1, s, DATA_U8, raw + 36);
  int64_t ids[2] = {9, 10};
  float v1[24], v2[24];
  view_batch_in in = {raw, 24, 2, ids, 1, 0};
  view_batch(&v, &in, v1, v2, &sc);
  for (int i = 0; i < 2; i++)
    for (int k = 0; k < 12; k++) {
      int ch = k / 4;
      ck_assert_float_eq_tol(v1[i * 12 + k], (raw[i * 24 + k] / 255.0f - mean[ch]) / std[ch], 1e-5f);
      ck_assert_float_eq_tol(v2[i * 12 + k], (raw[i * 24 + 12 + k] / 255.0f - mean[ch]) / std[ch], 1e-5f);
    }
  view_scratch_free(&sc);
  view_free(&v);
}
END_TEST

START_TEST(bad_parameters_are_refused_by_name) {
  view_config c = config_defaults()->trainer.loader.augment;
  view_pipeline v;
  float m[2] = {0, 0}, sd[2] = {1, 0};
  ck_assert_int_eq(view_init(&v, &c, VIEW_AUGMENT, (data_shape){3, 4, 4}, DATA_U8, 2, m, sd), MOCO_ECONFIG);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "2 mean/std values, expected 1 or 3 (one per channel)"));
  ck_assert_int_eq(view_init(&v, &c, VIEW_AUGMENT, (data_shape){2, 1, 1}, DATA_F32, 2, m, sd), MOCO_ECONFIG);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "normalisation[1]: mean 0 std 0"));
}
END_TEST

Suite *data_views_suite(void) {
  Suite *s = suite_create("data_views");
  TCase *tc = tcase_create("views");
  tcase_add_test(tc, crop_box_stays_inside_the_image);
  tcase_add_test(tc, resize_reads_only_inside_the_crop);
  tcase_add_test(tc, augmented_images_stay_in_the_normalised_range);
  tcase_add_test(tc, flip_translate_brightness_contrast_do_what_they_say);
  tcase_add_test(tc, erasing_blanks_one_rectangle_within_the_area_range);
  tcase_add_test(tc, scarf_masking_takes_exactly_the_rate_from_other_samples);
  tcase_add_test(tc, views_depend_only_on_seed_epoch_id_and_view);
  tcase_add_test(tc, pair_mode_and_plain_views_only_normalise_per_channel);
  tcase_add_test(tc, bad_parameters_are_refused_by_name);
  suite_add_tcase(s, tc);
  return s;
}
