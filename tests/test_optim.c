/* Optimizers and schedules against hand-computed values (the SGD and AdamW figures were checked with
 * torch.optim in float64; LARS by You et al.'s formula by hand), and the optimizer's save/load. */
#include <check.h>
#include <math.h>
#include <string.h>

#include "core/err.h"
#include "core/optim.h"
#include "core/par.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "core/sched.h"
#include "service/config.h"

#define NEAR(a, b) ck_assert_msg(fabs((double)(a) - (double)(b)) < 1e-5, "%.9g vs %.9g", (double)(a), (double)(b))

static optim_config cfg_with(optim_kind kind, float mu, int nesterov, float wd) {
  optim_config c;
  c = config_defaults()->trainer.moco.optim;
  c.optimizer = kind;
  c.momentum = mu;
  c.nesterov = nesterov;
  c.weight_decay = wd;
  return c;
}

/* Runs `steps` updates with the gradients in g (steps × n) on one decayed segment. */
static void run(optim_config c, float *p, const float *g, size_t n, int steps, float lr) {
  optim o;
  ck_assert_int_eq(optim_init(&o, &c, n, NULL, 0), 0);
  for (int t = 0; t < steps; t++) optim_step(&o, p, g + t * n, lr);
  optim_free(&o);
}

START_TEST(sgd_plain_step) {
  float p[2] = {1.0f, 2.0f}, g[2] = {0.5f, -1.0f};
  run(cfg_with(OPTIM_SGD, 0.0f, 0, 0.0f), p, g, 2, 1, 0.1f);
  NEAR(p[0], 0.95);
  NEAR(p[1], 2.1);
}
END_TEST

START_TEST(sgd_momentum_and_nesterov) {
  float g[2] = {1.0f, 1.0f};
  float p = 1.0f; /* v1 = 1, θ = 0.9; v2 = 1.9, θ = 0.71 */
  run(cfg_with(OPTIM_SGD, 0.9f, 0, 0.0f), &p, g, 1, 2, 0.1f);
  NEAR(p, 0.71);
  p = 1.0f; /* θ −= 0.1·(1 + 0.9·1) → 0.81; θ −= 0.1·(1 + 0.9·1.9) → 0.539 */
  run(cfg_with(OPTIM_SGD, 0.9f, 1, 0.0f), &p, g, 1, 2, 0.1f);
  NEAR(p, 0.539);
}
END_TEST

START_TEST(sgd_weight_decay_matches_torch) {
  const float g[6] = {0.5f, 0.25f, -1.0f, 0.5f, 0.2f, 0.1f};
  float p[2] = {1.0f, -2.0f};
  run(cfg_with(OPTIM_SGD, 0.9f, 0, 0.1f), p, g, 2, 3, 0.1f);
  NEAR(p[0], 0.979774);
  NEAR(p[1], -2.0600605);
  float q[2] = {1.0f, -2.0f};
  run(cfg_with(OPTIM_SGD, 0.9f, 1, 0.1f), q, g, 2, 3, 0.1f);
  NEAR(q[0], 0.983448646);
  NEAR(q[1], -2.0779005295);
}
END_TEST

START_TEST(weight_decay_skips_no_decay_segments) {
  const net_segment seg[2] = {{0, 2, 0, 0}, {2, 1, 0, 1}};
  const float g[3] = {0, 0, 0};
  for (int all = 0; all < 2; all++) {
    optim_config c = cfg_with(OPTIM_SGD, 0.0f, 0, 0.1f);
    c.decay_all = all;
    optim o;
    float p[3] = {1.0f, -2.0f, 3.0f};
    ck_assert_int_eq(optim_init(&o, &c, 3, seg, 2), 0);
    optim_step(&o, p, g, 1.0f);
    NEAR(p[0], 0.9);
    NEAR(p[1], -1.8);
    NEAR(p[2], all ? 2.7 : 3.0);
    optim_free(&o);
  }
}
END_TEST

START_TEST(lars_trust_ratio_per_segment) {
  /* Segment 0: ‖θ‖ = 5, ‖g‖ = 1, λ = 0.01·5/(1 + 0.1·5) = 1/30; g' = λ(g + 0.1θ) = (0.03, 0.04).
   * Step 2: ‖θ‖ = 4.95, λ = 0.0495/1.495, v = 0.9·v1 + λ(g + 0.1θ) → θ = (2.9133, 3.8844).
   * Segment 1 is no_decay: no ratio, no decay, plain momentum: 2 − 1 = 1, then 1 − 1.9 = −0.9. */
  const net_segment seg[2] = {{0, 2, 0, 0}, {2, 1, 0, 1}};
  optim_config c = cfg_with(OPTIM_LARS, 0.9f, 0, 0.1f);
  c.lars_eta = 0.01f;
  optim o;
  float p[3] = {3.0f, 4.0f, 2.0f};
  const float g[3] = {0.6f, 0.8f, 1.0f};
  ck_assert_int_eq(optim_init(&o, &c, 3, seg, 2), 0);
  optim_step(&o, p, g, 1.0f);
  NEAR(p[0], 2.97);
  NEAR(p[1], 3.96);
  NEAR(p[2], 1.0);
  optim_step(&o, p, g, 1.0f);
  NEAR(p[0], 2.9133);
  NEAR(p[1], 3.8844);
  NEAR(p[2], -0.9);
  optim_free(&o);
}
END_TEST

START_TEST(lars_zero_weights_fall_back_to_ratio_one) {
  optim_config c = cfg_with(OPTIM_LARS, 0.0f, 0, 0.0f);
  float p[2] = {0.0f, 0.0f}, g[2] = {1.0f, -1.0f};
  run(c, p, g, 2, 1, 0.5f);
  NEAR(p[0], -0.5);
  NEAR(p[1], 0.5);
}
END_TEST

START_TEST(adamw_matches_torch) {
  const float g[6] = {0.5f, 0.25f, -0.25f, 0.5f, 0.2f, -0.1f};
  float p[2] = {1.0f, -2.0f};
  run(cfg_with(OPTIM_ADAMW, 0.0f, 0, 0.1f), p, g, 2, 3, 0.1f);
  NEAR(p[0], 0.805002654662675);
  NEAR(p[1], -2.19634723497799);
}
END_TEST

START_TEST(bad_configs_and_segments_are_refused) {
  optim o;
  optim_config c = cfg_with(OPTIM_SGD, 0.9f, 0, 0.0f);
  const net_segment gap[2] = {{0, 2, 0, 0}, {3, 1, 1, 1}};
  ck_assert_int_eq(optim_init(&o, &c, 4, gap, 2), MOCO_EINVAL);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "segments[1]"));
  const net_segment shortfall[1] = {{0, 3, 0, 0}};
  ck_assert_int_eq(optim_init(&o, &c, 4, shortfall, 1), MOCO_EINVAL);
  const net_segment over[1] = {{0, 5, 0, 0}};
  ck_assert_int_eq(optim_init(&o, &c, 4, over, 1), MOCO_EINVAL);
  int k = -1;
  ck_assert_int_eq(enum_value_of(optim_kind_names, "lars", &k), 0);
  ck_assert_int_eq(k, OPTIM_LARS);
  ck_assert_int_eq(enum_value_of(optim_kind_names, "adam", &k), MOCO_ENOENT);
  ck_assert_str_eq(enum_name_of(optim_kind_names, (int)OPTIM_ADAMW), "adamw");
}
END_TEST

/* The optimizer reads its owner's settings at every step: a change between steps applies to the next
 * one and the velocity is kept. */
START_TEST(changed_config_applies_at_the_next_step_and_keeps_state) {
  optim o;
  optim_config c = cfg_with(OPTIM_SGD, 0.9f, 0, 0.0f);
  float p = 1.0f, g = 1.0f;
  ck_assert_int_eq(optim_init(&o, &c, 1, NULL, 0), 0);
  optim_step(&o, &p, &g, 0.1f); /* v = 1, θ = 0.9 */
  c.momentum = 0.5f;
  optim_step(&o, &p, &g, 0.1f); /* v = 1.5, θ = 0.75 */
  NEAR(p, 0.75);
  optim_free(&o);
}
END_TEST

static void step_pair(optim *a, optim *b, float *pa, float *pb, const float *g, size_t n) {
  optim_step(a, pa, g, 0.05f);
  optim_step(b, pb, g, 0.05f);
  ck_assert_int_eq(memcmp(pa, pb, n * sizeof(float)), 0);
}

START_TEST(save_load_round_trip_is_exact) {
  enum { N = 7 };
  const net_segment seg[2] = {{0, 5, 0, 0}, {5, 2, 0, 1}};
  float g[N] = {0.3f, -0.1f, 0.7f, 0.2f, -0.5f, 0.05f, 1.0f};
  for (int kind = 0; kind < 3; kind++) {
    optim_config c = cfg_with((optim_kind)kind, 0.9f, 0, 0.01f);
    optim a, b;
    float pa[N] = {1, 2, 3, 4, 5, 6, 7}, pb[N];
    ck_assert_int_eq(optim_init(&a, &c, N, seg, 2), 0);
    ck_assert_int_eq(optim_init(&b, &c, N, seg, 2), 0);
    optim_step(&a, pa, g, 0.05f);
    optim_step(&a, pa, g, 0.05f);
    memcpy(pb, pa, sizeof pa);
    blob_writer w;
    blob_writer_init(&w);
    optim_save(&a, &w);
    ck_assert_int_eq(w.err, 0);
    blob_reader r;
    blob_reader_init(&r, w.data, w.len, "opt.bin");
    ck_assert_int_eq(optim_load(&b, &r), 0);
    ck_assert_int_eq(b.steps, 2);
    step_pair(&a, &b, pa, pb, g, N);
    step_pair(&a, &b, pa, pb, g, N);

    /* Another parameter count, segment layout or kind is refused and leaves the target untouched. */
    optim other;
    const net_segment seg2[2] = {{0, 4, 0, 0}, {4, 3, 0, 1}};
    ck_assert_int_eq(optim_init(&other, &c, N, seg2, 2), 0);
    blob_reader_init(&r, w.data, w.len, "opt.bin");
    ck_assert_int_eq(optim_load(&other, &r), MOCO_ESHAPE);
    ck_assert_ptr_nonnull(strstr(moco_errmsg(), "segment 1"));
    ck_assert_int_eq(other.steps, 0);
    optim_free(&other);
    ck_assert_int_eq(optim_init(&other, &c, N + 1, NULL, 0), 0);
    blob_reader_init(&r, w.data, w.len, "opt.bin");
    ck_assert_int_eq(optim_load(&other, &r), MOCO_ESHAPE);
    ck_assert_ptr_nonnull(strstr(moco_errmsg(), "opt.bin"));
    optim_free(&other);
    optim_config c2 = cfg_with((optim_kind)((kind + 1) % 3), 0.9f, 0, 0.01f);
    ck_assert_int_eq(optim_init(&other, &c2, N, seg, 2), 0);
    blob_reader_init(&r, w.data, w.len, "opt.bin");
    ck_assert_int_eq(optim_load(&other, &r), MOCO_ESHAPE);
    optim_free(&other);

    w.data[w.len - 9] ^= 0x10; /* inside the state: the checksum catches it */
    blob_reader_init(&r, w.data, w.len, "opt.bin");
    ck_assert_int_eq(optim_load(&b, &r), MOCO_ECHECKSUM);
    blob_reader_init(&r, w.data, w.len - 4, "opt.bin");
    ck_assert_int_eq(optim_load(&b, &r), MOCO_EEOF);
    blob_writer_free(&w);
    optim_free(&a);
    optim_free(&b);
  }
}
END_TEST

/* ---- schedules ---------------------------------------------------------------------------------- */

START_TEST(sched_constant_and_warmup) {
  sched_config c;
  c = config_defaults()->trainer.moco.sched;
  c.lr_schedule = SCHED_CONSTANT;
  c.lr = 0.5f;
  NEAR(sched_lr(&c, 0, 100), 0.5);
  NEAR(sched_lr(&c, 99, 100), 0.5);
  c.warmup_steps = 4; /* 0.5·(s+1)/4 */
  NEAR(sched_lr(&c, 0, 100), 0.125);
  NEAR(sched_lr(&c, 2, 100), 0.375);
  NEAR(sched_lr(&c, 3, 100), 0.5);
  NEAR(sched_lr(&c, 50, 100), 0.5);
}
END_TEST

START_TEST(sched_step_milestones) {
  sched_config c;
  c = config_defaults()->trainer.moco.sched;
  c.lr_schedule = SCHED_STEP;
  c.lr = 1.0f;
  c.gamma = 0.1f;
  c.n_milestones = 2;
  c.milestones[0] = 10;
  c.milestones[1] = 20;
  NEAR(sched_lr(&c, 0, 30), 1.0);
  NEAR(sched_lr(&c, 9, 30), 1.0);
  NEAR(sched_lr(&c, 10, 30), 0.1);
  NEAR(sched_lr(&c, 19, 30), 0.1);
  NEAR(sched_lr(&c, 20, 30), 0.01);
  NEAR(sched_lr(&c, 29, 30), 0.01);
}
END_TEST

START_TEST(sched_warmup_then_cosine) {
  sched_config c;
  c = config_defaults()->trainer.moco.sched;
  c.lr_schedule = SCHED_COSINE;
  c.lr = 1.0f;
  c.final_lr = 0.0f;
  c.warmup_steps = 5; /* then cosine over the 100 remaining steps */
  NEAR(sched_lr(&c, 0, 105), 0.2);
  NEAR(sched_lr(&c, 4, 105), 1.0);
  NEAR(sched_lr(&c, 5, 105), 1.0);
  NEAR(sched_lr(&c, 30, 105), 0.5 * (1.0 + cos(M_PI / 4))); /* 0.853553 */
  NEAR(sched_lr(&c, 55, 105), 0.5);
  NEAR(sched_lr(&c, 80, 105), 0.5 * (1.0 - cos(M_PI / 4))); /* 0.146447 */
  NEAR(sched_lr(&c, 105, 105), 0.0);
  NEAR(sched_lr(&c, 500, 105), 0.0);
  c.final_lr = 0.2f;
  NEAR(sched_lr(&c, 55, 105), 0.6);
}
END_TEST

START_TEST(sched_cosine_ramp_for_momentum) {
  /* BYOL / MoCo's momentum ramp m = 1 − (1 − m0)(cos(πk/K) + 1)/2 is cosine from m0 to 1. */
  NEAR(sched_cosine(0.99f, 1.0f, 0, 100), 0.99);
  NEAR(sched_cosine(0.99f, 1.0f, 50, 100), 0.995);
  NEAR(sched_cosine(0.99f, 1.0f, 25, 100), 1.0 - 0.01 * (cos(M_PI / 4) + 1.0) / 2.0);
  NEAR(sched_cosine(0.99f, 1.0f, 100, 100), 1.0);
  NEAR(sched_cosine(0.0f, 2.0f, 7, 0), 2.0); /* an empty ramp is at its end */
  int k = -1;
  ck_assert_int_eq(enum_value_of(sched_kind_names, "cosine", &k), 0);
  ck_assert_int_eq(k, SCHED_COSINE);
  ck_assert_int_eq(enum_value_of(sched_kind_names, "linear", &k), MOCO_ENOENT);
  ck_assert_str_eq(enum_name_of(sched_kind_names, (int)SCHED_STEP), "step");
}
END_TEST

/* The fused update (optim_step_ema on the compute team) against optim_step on one thread followed by
 * the average written out here: bit for bit, for every optimizer, over segments of odd lengths (some
 * without decay) that the parts cut in the middle. */
enum { FUSED_N = 3 * PAR_MIN_FLOATS + 77, FUSED_SEGS = 5, FUSED_STEPS = 3 };

static void fused_case(optim_kind kind, int nesterov) {
  const size_t len[FUSED_SEGS] = {1000, 77, 2 * PAR_MIN_FLOATS + 3, 9, PAR_MIN_FLOATS - 1012};
  net_segment seg[FUSED_SEGS];
  size_t off = 0;
  for (int s = 0; s < FUSED_SEGS; s++) seg[s] = (net_segment){off, len[s], s, s % 2}, off += len[s];
  ck_assert_uint_eq(off, FUSED_N);
  optim_config c = cfg_with(kind, kind == OPTIM_ADAMW ? 0.0f : 0.9f, nesterov, 1e-2f);
  float *p[2], *k[2], *g = tensor_alloc(FUSED_N);
  rng_t r;
  rng_init(&r, 5, 1);
  for (int v = 0; v < 2; v++) p[v] = tensor_alloc(FUSED_N), k[v] = tensor_alloc(FUSED_N);
  for (size_t i = 0; i < FUSED_N; i++) p[0][i] = p[1][i] = rng_normal(&r), k[0][i] = k[1][i] = rng_normal(&r);
  optim o[2];
  for (int v = 0; v < 2; v++) ck_assert_int_eq(optim_init(&o[v], &c, FUSED_N, seg, FUSED_SEGS), 0);
  for (int t = 0; t < FUSED_STEPS; t++) {
    for (size_t i = 0; i < FUSED_N; i++) g[i] = rng_normal(&r);
    ck_assert_int_eq(par_set_threads(1), 0);
    optim_step(&o[0], p[0], g, 0.1f);
    for (size_t i = 0; i < FUSED_N; i++) k[0][i] = 0.99f * k[0][i] + (1.0f - 0.99f) * p[0][i];
    ck_assert_int_eq(par_set_threads(4), 0);
    optim_step_ema(&o[1], p[1], g, 0.1f, k[1], 0.99f);
    ck_assert_int_eq(memcmp(p[0], p[1], FUSED_N * sizeof(float)), 0);
    ck_assert_int_eq(memcmp(k[0], k[1], FUSED_N * sizeof(float)), 0);
    ck_assert_int_eq(memcmp(o[0].m, o[1].m, FUSED_N * sizeof(float)), 0);
  }
  ck_assert_int_eq(par_set_threads(1), 0);
  for (int v = 0; v < 2; v++) optim_free(&o[v]), tensor_free(p[v]), tensor_free(k[v]);
  tensor_free(g);
}

START_TEST(fused_parallel_update_matches_serial_update_and_average) {
  fused_case(OPTIM_SGD, 0);
  fused_case(OPTIM_SGD, 1);
  fused_case(OPTIM_LARS, 0);
  fused_case(OPTIM_ADAMW, 0);
}
END_TEST

Suite *optim_suite(void) {
  Suite *s = suite_create("optim");
  TCase *tc = tcase_create("optim");
  tcase_add_test(tc, sgd_plain_step);
  tcase_add_test(tc, sgd_momentum_and_nesterov);
  tcase_add_test(tc, sgd_weight_decay_matches_torch);
  tcase_add_test(tc, weight_decay_skips_no_decay_segments);
  tcase_add_test(tc, lars_trust_ratio_per_segment);
  tcase_add_test(tc, lars_zero_weights_fall_back_to_ratio_one);
  tcase_add_test(tc, adamw_matches_torch);
  tcase_add_test(tc, bad_configs_and_segments_are_refused);
  tcase_add_test(tc, changed_config_applies_at_the_next_step_and_keeps_state);
  tcase_add_test(tc, save_load_round_trip_is_exact);
  tcase_add_test(tc, fused_parallel_update_matches_serial_update_and_average);
  suite_add_tcase(s, tc);
  TCase *ts = tcase_create("sched");
  tcase_add_test(ts, sched_constant_and_warmup);
  tcase_add_test(ts, sched_step_milestones);
  tcase_add_test(ts, sched_warmup_then_cosine);
  tcase_add_test(ts, sched_cosine_ramp_for_momentum);
  suite_add_tcase(s, ts);
  return s;
}
