/* The dynamic hardness controller against synthetic plants: a signal that the hardness moves (the mean
 * selected-negative similarity rising with h, an instance accuracy falling with h), with noise and a
 * plant that shifts part-way. The controller must move the hardness up and then down and settle
 * where the plant meets the target; a pair whose signal the hardness cannot move is refused. */
#include <check.h>
#include <math.h>
#include <string.h>

#include "contrast/hardness.h"
#include "core/err.h"
#include "core/rng.h"
#include "service/config.h"

/* The configuration config/dynamic.json uses. */
static hardness_config controller(hardness_signal signal, float target) {
  hardness_config c = config_defaults()->trainer.moco.hardness;
  c.mode = HARDNESS_DYNAMIC;
  c.signal = signal;
  c.target = target;
  c.value = 0.5f;
  c.gain = 0.1f;
  c.max_step = 0.01f;
  c.ema = 0.9f;
  return c;
}

/* Runs `steps` observations of the plant signal = base + slope·h + noise·U(-1/2, 1/2); returns the
 * smallest and largest hardness of the last `tail` steps in lo, hi and counts in *up / *down the steps
 * that raised / lowered it. */
static void drive(hardness_ctl *h, rng_t *r, float base, float slope, float noise, int steps, int tail,
                  float *lo, float *hi, int *up, int *down) {
  *lo = 1.0f, *hi = 0.0f;
  for (int i = 0; i < steps; i++) {
    float before = hardness_at(h, 0.5, NULL);
    float signal = base + slope * before + noise * (rng_uniform(r) - 0.5f);
    float after = hardness_observe(h, 0.5, signal);
    *up += after > before;
    *down += after < before;
    if (i >= steps - tail) *lo = fminf(*lo, after), *hi = fmaxf(*hi, after);
  }
}

START_TEST(controller_on_neg_sim_moves_both_ways_and_settles) {
  /* neg_sim = base + 0.4 h: with target 0.35 the plant meets it at h* = (0.35 - base) / 0.4. Base 0.1
   * (a spread embedding) puts h* at 0.625, above the start 0.5; then base 0.25 (the embedding
   * contracts) puts it at 0.25. */
  hardness_config c = controller(HARDNESS_SIGNAL_NEG_SIM, 0.35f);
  hardness_ctl h;
  hardness_init(&h, &c);
  rng_t r;
  rng_init(&r, 5, 0);
  float lo, hi;
  int up = 0, down = 0;
  drive(&h, &r, 0.1f, 0.4f, 0.02f, 400, 100, &lo, &hi, &up, &down);
  ck_assert_msg(up > 10, "rose on %d steps", up);
  ck_assert_msg(fabsf(lo - 0.625f) < 0.03f && fabsf(hi - 0.625f) < 0.03f, "settled in [%g, %g], want 0.625",
                lo, hi);
  up = down = 0;
  drive(&h, &r, 0.25f, 0.4f, 0.02f, 400, 100, &lo, &hi, &up, &down);
  ck_assert_msg(down > 10, "fell on %d steps", down);
  ck_assert_msg(fabsf(lo - 0.25f) < 0.03f && fabsf(hi - 0.25f) < 0.03f, "settled in [%g, %g], want 0.25",
                lo, hi);
}
END_TEST

START_TEST(controller_on_accuracy_follows_a_falling_plant) {
  /* Random negatives: accuracy = 0.9 - 0.5 h falls as the hardness rises; target 0.6 at h* = 0.6. */
  hardness_config c = controller(HARDNESS_SIGNAL_ACCURACY, 0.6f);
  c.value = 0.1f;
  hardness_ctl h;
  hardness_init(&h, &c);
  rng_t r;
  rng_init(&r, 9, 0);
  float lo, hi;
  int up = 0, down = 0;
  drive(&h, &r, 0.9f, -0.5f, 0.05f, 600, 100, &lo, &hi, &up, &down);
  ck_assert_msg(fabsf(lo - 0.6f) < 0.04f && fabsf(hi - 0.6f) < 0.04f, "settled in [%g, %g], want 0.6", lo, hi);
  /* The model improves (base 1.0): the same target needs harder negatives, h* = 0.8. */
  drive(&h, &r, 1.0f, -0.5f, 0.05f, 600, 100, &lo, &hi, &up, &down);
  ck_assert_msg(fabsf(lo - 0.8f) < 0.04f && fabsf(hi - 0.8f) < 0.04f, "settled in [%g, %g], want 0.8", lo, hi);
}
END_TEST

START_TEST(controller_at_an_unreachable_target_rests_at_its_bound) {
  /* The plant cannot reach 0.9 (at most 0.1 + 0.4): the hardness rests at max, not beyond. */
  hardness_config c = controller(HARDNESS_SIGNAL_NEG_SIM, 0.9f);
  c.max = 0.8f;
  hardness_ctl h;
  hardness_init(&h, &c);
  rng_t r;
  rng_init(&r, 3, 0);
  float lo, hi;
  int up = 0, down = 0;
  drive(&h, &r, 0.1f, 0.4f, 0.0f, 200, 50, &lo, &hi, &up, &down);
  ck_assert_float_eq(lo, 0.8f);
  ck_assert_float_eq(hi, 0.8f);
}
END_TEST

START_TEST(signals_the_hardness_cannot_move_are_refused) {
  hardness_config c = controller(HARDNESS_SIGNAL_ACCURACY, 0.6f);
  ck_assert_int_eq(hardness_signal_moves(&c, MINE_HARDEST), MOCO_ECONFIG);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "use neg_sim"));
  c.signal = HARDNESS_SIGNAL_HARDEST_SIM;
  ck_assert_int_eq(hardness_signal_moves(&c, MINE_HARDEST), MOCO_ECONFIG);
  c.signal = HARDNESS_SIGNAL_NEG_SIM;
  ck_assert_int_eq(hardness_signal_moves(&c, MINE_HARDEST), 0);
  c.signal = HARDNESS_SIGNAL_ACCURACY;
  ck_assert_int_eq(hardness_signal_moves(&c, MINE_RANDOM), 0);
  c.mode = HARDNESS_FIXED;
  ck_assert_int_eq(hardness_signal_moves(&c, MINE_HARDEST), 0);
  int s = -1;
  ck_assert_int_eq(enum_value_of(hardness_signal_names, "neg_sim", &s), 0);
  ck_assert_int_eq(s, HARDNESS_SIGNAL_NEG_SIM);
}
END_TEST

Suite *hardness_suite(void) {
  Suite *s = suite_create("hardness");
  TCase *tc = tcase_create("controller");
  tcase_add_test(tc, controller_on_neg_sim_moves_both_ways_and_settles);
  tcase_add_test(tc, controller_on_accuracy_follows_a_falling_plant);
  tcase_add_test(tc, controller_at_an_unreachable_target_rests_at_its_bound);
  tcase_add_test(tc, signals_the_hardness_cannot_move_are_refused);
  suite_add_tcase(s, tc);
  return s;
}
