/* The momentum encoder: the EMA against hand-computed values, over both arenas of a network, and the
 * constant and cosine schedules. */
#include <check.h>
#include <math.h>
#include <string.h>

#include "contrast/momentum.h"
#include "core/err.h"
#include "service/config.h"

START_TEST(momentum_update_matches_hand_computation) {
  float k[3] = {1.0f, 2.0f, -4.0f}, q[3] = {3.0f, 5.0f, 0.0f};
  momentum_update(k, q, 3, 0.9f);
  ck_assert(fabsf(k[0] - 1.2f) < 1e-6f); /* 0.9·1 + 0.1·3 */
  ck_assert(fabsf(k[1] - 2.3f) < 1e-6f);
  ck_assert(fabsf(k[2] + 3.6f) < 1e-6f);
  float keep[3];
  memcpy(keep, k, sizeof k);
  momentum_update(k, q, 3, 1.0f); /* m = 1 freezes the key encoder */
  ck_assert_mem_eq(k, keep, sizeof k);
  momentum_update(k, q, 3, 0.0f); /* m = 0 copies the query encoder */
  ck_assert_mem_eq(k, q, sizeof k);
}
END_TEST

START_TEST(momentum_update_net_covers_params_and_buffers) {
  float kp[4] = {0, 0, 0, 0}, qp[4] = {1, 2, 3, 4}, kb[2] = {10, 20}, qb[2] = {0, 0};
  net key, query;
  memset(&key, 0, sizeof key);
  memset(&query, 0, sizeof query);
  key.params = kp, key.n_params = 4, key.buffers = kb, key.n_buffers = 2, key.arch_hash = 7;
  query.params = qp, query.n_params = 4, query.buffers = qb, query.n_buffers = 2, query.arch_hash = 7;
  ck_assert_int_eq(momentum_update_net(&key, &query, 0.75f), 0);
  for (int i = 0; i < 4; i++) ck_assert(fabsf(kp[i] - 0.25f * qp[i]) < 1e-6f);
  ck_assert(fabsf(kb[0] - 7.5f) < 1e-6f && fabsf(kb[1] - 15.0f) < 1e-6f);
  query.arch_hash = 8;
  ck_assert_int_eq(momentum_update_net(&key, &query, 0.75f), MOCO_ESHAPE);
}
END_TEST

/* The step's fused update of both encoders is the optimizer's update followed by the average. */
START_TEST(momentum_step_nets_is_update_then_average) {
  float kp[3] = {1, 1, 1}, qp[3] = {1, 2, 3}, qg[3] = {1, -1, 0.5f}, kb[1] = {4}, qb[1] = {0};
  net key, query;
  memset(&key, 0, sizeof key);
  memset(&query, 0, sizeof query);
  key.params = kp, key.n_params = 3, key.buffers = kb, key.n_buffers = 1, key.arch_hash = 7;
  query.params = qp, query.grads = qg, query.n_params = 3, query.buffers = qb, query.n_buffers = 1;
  query.arch_hash = 7;
  optim_config c = config_defaults()->trainer.moco.optim;
  c.momentum = 0.0f, c.weight_decay = 0.0f;
  optim o;
  ck_assert_int_eq(optim_init(&o, &c, 3, NULL, 0), 0);
  ck_assert_int_eq(momentum_step_nets(&key, &query, &o, 0.5f, 0.75f), 0);
  const float want_q[3] = {0.5f, 2.5f, 2.75f}; /* θ − 0.5 g */
  for (int i = 0; i < 3; i++) {
    ck_assert(fabsf(qp[i] - want_q[i]) < 1e-6f);
    ck_assert(fabsf(kp[i] - (0.75f + 0.25f * want_q[i])) < 1e-6f);
  }
  ck_assert(fabsf(kb[0] - 3.0f) < 1e-6f);
  query.arch_hash = 8;
  ck_assert_int_eq(momentum_step_nets(&key, &query, &o, 0.5f, 0.75f), MOCO_ESHAPE);
  optim_free(&o);
}
END_TEST

START_TEST(momentum_schedules) {
  momentum_config c;
  c = config_defaults()->trainer.moco.momentum;
  ck_assert(c.schedule == MOMENTUM_CONSTANT);
  c.encoder_momentum = 0.999f;
  ck_assert(momentum_at(&c, 500, 1000) == 0.999f);
  c.encoder_momentum = 0.99f;
  int v = -1;
  ck_assert_int_eq(enum_value_of(momentum_schedule_names, "cosine", &v), 0);
  c.schedule = (momentum_schedule)v;
  ck_assert(fabsf(momentum_at(&c, 0, 1000) - 0.99f) < 1e-7f);
  ck_assert(fabsf(momentum_at(&c, 500, 1000) - 0.995f) < 1e-7f);
  ck_assert(fabsf(momentum_at(&c, 250, 1000) - (float)(1 - 0.01 * (cos(M_PI / 4) + 1) / 2)) < 1e-7f);
  ck_assert(momentum_at(&c, 1000, 1000) == 1.0f);
  ck_assert(momentum_at(&c, 5000, 1000) == 1.0f); /* past the end: clamped */
  ck_assert_int_eq(enum_value_of(momentum_schedule_names, "linear", &v), MOCO_ENOENT);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "constant, cosine"));
}
END_TEST

Suite *momentum_suite(void) {
  Suite *s = suite_create("momentum");
  TCase *tc = tcase_create("momentum");
  tcase_add_test(tc, momentum_update_matches_hand_computation);
  tcase_add_test(tc, momentum_update_net_covers_params_and_buffers);
  tcase_add_test(tc, momentum_step_nets_is_update_then_average);
  tcase_add_test(tc, momentum_schedules);
  suite_add_tcase(s, tc);
  return s;
}
