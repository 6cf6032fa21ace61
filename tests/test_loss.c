/* The losses: values against direct double-precision formulas, finite-difference gradient checks of
 * every loss (InfoNCE plain and multi-positive, HCL, DCL, triplet both ways, NT-Xent with and without
 * queue negatives), rows with every candidate masked off, and stability at small temperatures. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "contrast/loss.h"
#include "contrast/mine.h"
#include "core/tensor.h"
#include "testutil.h"
#include "service/config.h"

enum { OFF = MINE_OFF, NEG = MINE_NEG, POS = MINE_POS };
enum { B = 5, C = 37 };

typedef struct {
  loss_config cfg;
  float beta;
  float S[B * C], s_pos[B], dS[B * C], dpos[B];
  uint8_t mask[B * C];
} case_t;

/* Random similarities in [−1, 1] with a mask mixing OFF, NEG and (when with_pos) POS entries; row 3
 * has every candidate OFF. */
static void make_case(case_t *t, loss_kind kind, int with_pos, uint64_t seed) {
  memset(t, 0, sizeof *t);
  t->cfg = config_defaults()->trainer.moco.loss;
  t->cfg.loss = kind;
  t->beta = 1.0f;
  rng_t r;
  rng_init(&r, seed, 1);
  fill_uniform(t->S, B * C, &r, -1.0f, 1.0f);
  fill_uniform(t->s_pos, B, &r, -0.2f, 1.0f);
  for (int i = 0; i < B * C; i++) {
    uint32_t u = rng_below(&r, 10);
    t->mask[i] = u < 3 ? OFF : (with_pos && u == 9) ? POS : NEG;
  }
  memset(t->mask + 3 * C, OFF, C);
}

static double eval_loss(void *ctx) {
  case_t *t = ctx;
  return loss_forward(&t->cfg, t->beta, t->S, t->mask, t->s_pos, B, C);
}

/* ---- direct formulas, in double ---- */

static double ref_infonce(const case_t *t, double tau) {
  double total = 0;
  for (int i = 0; i < B; i++) {
    double num = exp(t->s_pos[i] / tau), den = num;
    for (int j = 0; j < C; j++) {
      double e = exp(t->S[i * C + j] / tau);
      if (t->mask[i * C + j] != OFF) den += e;
      if (t->mask[i * C + j] == POS) num += e;
    }
    total += -log(num / den);
  }
  return total / B;
}

/* The reference code's estimator (joshr17/HCL, image/main.py `criterion`), extended to the positive
 * set as loss.h documents. *cancel (when given) gets the largest amplification of rounding by the
 * debiasing's subtraction over the unclamped rows, (reweight + τ⁺·N·AP/WP) / (reweight − τ⁺·N·AP/WP). */
static double ref_hcl(const case_t *t, double tau, double beta, double tau_plus, double *cancel) {
  double total = 0;
  if (cancel) *cancel = 1.0;
  for (int i = 0; i < B; i++) {
    double pos = exp(t->s_pos[i] / tau);
    double A = 0, W = 0, AP = pow(pos, beta) * pos, WP = pow(pos, beta);
    int N = 0;
    for (int j = 0; j < C; j++) {
      double e = exp(t->S[i * C + j] / tau), imp = pow(e, beta);
      if (t->mask[i * C + j] == NEG) A += imp * e, W += imp, N++;
      if (t->mask[i * C + j] == POS) AP += imp * e, WP += imp;
    }
    if (N == 0) continue;
    double reweight = A / (W / N);
    double Ng = (-tau_plus * N * (AP / WP) + reweight) / (1 - tau_plus);
    if (Ng < N * exp(-1 / tau)) Ng = N * exp(-1 / tau);
    else if (cancel) *cancel = fmax(*cancel, (reweight + tau_plus * N * (AP / WP)) / ((1 - tau_plus) * Ng));
    total += -log(pos / (pos + Ng));
  }
  return total / B;
}

/* The hinge on s_neg − s_pos + margin, against the hardest negative of a row or averaged over all. */
static double ref_triplet(const case_t *t) {
  double ref = 0, m = t->cfg.margin;
  for (int i = 0; i < B; i++) {
    double hard = -INFINITY, sum = 0;
    int n = 0;
    for (int j = 0; j < C; j++)
      if (t->mask[i * C + j] == NEG) {
        double h = (double)t->S[i * C + j] - t->s_pos[i] + m;
        hard = fmax(hard, t->S[i * C + j]);
        sum += h > 0 ? h : 0;
        n++;
      }
    if (!n) continue;
    ref += t->cfg.triplet_negative == TRIPLET_MEAN ? sum / n : fmax(0.0, hard - t->s_pos[i] + m);
  }
  return ref / B;
}

static double ref_loss(const case_t *t) {
  double tau = t->cfg.temperature;
  switch (t->cfg.loss) {
  case LOSS_INFONCE: return ref_infonce(t, tau);
  case LOSS_HCL: return ref_hcl(t, tau, t->beta, t->cfg.tau_plus, NULL);
  case LOSS_TRIPLET: return ref_triplet(t);
  default: return NAN;
  }
}

static double eval_ref(void *ctx) { return ref_loss(ctx); }

/* Gradient check w.r.t. S and s_pos; also: the backward returns the forward's value, dS is 0 where
 * OFF, and the all-OFF row 3 has zero gradient. The differences are taken on the double formula of the
 * same loss (ref_loss), so their rounding (1e-16 over a step of h) is nothing next to the analytic
 * gradient's, and their truncation is estimated per entry (richardson). What is left is the float
 * arithmetic of loss_backward. An entry of dS is a softmax weight of its row, at most
 * g = (1 + β)/(τ·(1 − τ⁺)·B) (HCL's reweighting scales the weights by e^{βs/τ}, its debiasing divides
 * by 1 − τ⁺; triplet: g = 1/B), and its relative error adds up from
 *   - the exponentials: the float argument (1 + β)(s − s_max)/τ, up to 2(1 + β)/τ in size, is rounded
 *     (relative error u, so u·2(1 + β)/τ in the result) and exp_le0 itself is good to 2u;
 *   - the row's sums of C float terms, C·u each: one for InfoNCE, three for HCL (the reweighted sum, its
 *     weights' sum, and the positives' pair);
 *   - a dozen further roundings (scaling, normalising, 1/B);
 * and HCL's debiased estimate subtracts τ⁺·N·AP/WP from the reweighted sum: rounding in either grows by
 * their sum over their difference (ref_hcl's `cancel`, near 1 for small τ⁺, larger where a row is
 * close to its clamp), which scales g.
 * So atol = (k·C + 2(1 + β)/τ + 16)·u·g, k = 1 or 3. h = τ/1000 moves a logit s/τ by 0.001; triplet
 * (piecewise linear) takes h = 1e-5 so that no hinge lies within a step. */
static void check_gradients(case_t *t, const char *what) {
  double lf = eval_loss(t);
  double lb = loss_backward(&t->cfg, t->beta, t->dS, t->dpos, t->S, t->mask, t->s_pos, B, C);
  ck_assert_msg(fabs(lf - lb) <= 1e-6 * (1 + fabs(lf)), "forward %g backward %g", lf, lb);
  for (int i = 0; i < B * C; i++)
    if (t->mask[i] == OFF) ck_assert(t->dS[i] == 0.0f);
  ck_assert(t->dpos[3] == 0.0f);
  const loss_config *c = &t->cfg;
  int tri = c->loss == LOSS_TRIPLET;
  double cancel = 1.0;
  if (c->loss == LOSS_HCL) ref_hcl(t, c->temperature, t->beta, c->tau_plus, &cancel);
  double g = tri ? 1.0 / B : (1.0 + t->beta) / (c->temperature * (1.0 - c->tau_plus) * B) * cancel;
  double roundings = (c->loss == LOSS_HCL ? 3 : 1) * C + 16 + (tri ? 0 : 2 * (1.0 + t->beta) / c->temperature);
  double h = tri ? 1e-5 : c->temperature / 1000.0;
  char name[96];
  snprintf(name, sizeof name, "%s dS", what);
  gc_spec spec = {.name = name, .h = h, .atol = gc_atol(h, 0, 0, 0, roundings, g), .rtol = 8 * 0x1p-24,
                  .richardson = 1, .max_checks = B * C};
  gc_assert(gc_check(eval_ref, t, t->S, t->dS, B * C, &spec), name);
  snprintf(name, sizeof name, "%s dpos", what);
  gc_assert(gc_check(eval_ref, t, t->s_pos, t->dpos, B, &spec), name);
}

START_TEST(infonce_matches_formula_and_gradient) {
  case_t t;
  for (int with_pos = 0; with_pos <= 1; with_pos++) {
    make_case(&t, LOSS_INFONCE, with_pos, 11 + with_pos);
    t.cfg.temperature = 0.5f;
    ck_assert(fabs(eval_loss(&t) - ref_infonce(&t, 0.5)) < 1e-6);
    check_gradients(&t, with_pos ? "infonce+pos tau 0.5" : "infonce tau 0.5");
    t.cfg.temperature = 0.07f;
    ck_assert(fabs(eval_loss(&t) - ref_infonce(&t, 0.07)) < 1e-5 * ref_infonce(&t, 0.07));
    check_gradients(&t, with_pos ? "infonce+pos tau 0.07" : "infonce tau 0.07");
  }
}
END_TEST

START_TEST(hcl_and_dcl_match_reference_and_gradient) {
  case_t t;
  const float betas[] = {0.0f, 0.5f, 1.0f, 3.0f};
  const float tps[] = {0.0f, 0.1f};
  for (int with_pos = 0; with_pos <= 1; with_pos++)
    for (int b = 0; b < 4; b++)
      for (int p = 0; p < 2; p++) {
        make_case(&t, LOSS_HCL, with_pos, 20 + b);
        t.cfg.temperature = 0.5f;
        t.cfg.tau_plus = tps[p];
        t.beta = betas[b];
        double ref = ref_hcl(&t, 0.5, betas[b], tps[p], NULL);
        ck_assert_msg(fabs(eval_loss(&t) - ref) < 1e-5 * (1 + ref), "beta %g tau+ %g: %g vs %g",
                      betas[b], tps[p], eval_loss(&t), ref);
        char what[64];
        snprintf(what, sizeof what, "hcl%s beta %g tau+ %g", with_pos ? "+pos" : "", betas[b], tps[p]);
        check_gradients(&t, what);
      }
}
END_TEST

START_TEST(hcl_lower_clamp_is_applied_without_gradient) {
  /* A large τ⁺ with an easy row drives the debiased estimate below N·e^{−1/τ}: the clamp holds the
   * negative term at that bound, so only the positive's own softmax term has a gradient. */
  case_t t;
  make_case(&t, LOSS_HCL, 0, 31);
  t.cfg.temperature = 0.5f;
  t.cfg.tau_plus = 0.9f;
  t.beta = 1.0f;
  for (int j = 0; j < C; j++) t.S[j] = -0.9f;
  t.s_pos[0] = 0.95f;
  double ref = ref_hcl(&t, 0.5, 1.0, 0.9, NULL);
  ck_assert(fabs(eval_loss(&t) - ref) < 1e-5 * (1 + ref));
  loss_backward(&t.cfg, t.beta, t.dS, t.dpos, t.S, t.mask, t.s_pos, B, C);
  for (int j = 0; j < C; j++) ck_assert(t.dS[j] == 0.0f);
  int n = 0;
  for (int j = 0; j < C; j++) n += t.mask[j] == NEG;
  double e0 = exp(0.95 / 0.5), ng = n * exp(-2.0);
  ck_assert(fabs(t.dpos[0] - (e0 / (e0 + ng) - 1) / (0.5 * B)) < 1e-6);
  check_gradients(&t, "hcl clamped");
}
END_TEST

START_TEST(triplet_matches_hand_values_and_gradient) {
  case_t t;
  make_case(&t, LOSS_TRIPLET, 1, 41);
  t.cfg.margin = 0.3f;
  for (int mode = 0; mode < 2; mode++) {
    t.cfg.triplet_negative = mode ? TRIPLET_MEAN : TRIPLET_HARDEST;
    double ref = ref_triplet(&t);
    ck_assert(fabs(eval_loss(&t) - ref) < 1e-6);
    check_gradients(&t, mode ? "triplet mean" : "triplet hardest");
  }
}
END_TEST

START_TEST(every_loss_is_zero_on_rows_with_nothing_selected) {
  case_t t;
  for (int kind = LOSS_INFONCE; kind <= LOSS_TRIPLET; kind++) {
    make_case(&t, (loss_kind)kind, 1, 50 + kind);
    memset(t.mask, OFF, sizeof t.mask);
    ck_assert(eval_loss(&t) == 0.0);
    ck_assert(loss_backward(&t.cfg, t.beta, t.dS, t.dpos, t.S, t.mask, t.s_pos, B, C) == 0.0);
    for (int i = 0; i < B * C; i++) ck_assert(t.dS[i] == 0.0f);
    for (int i = 0; i < B; i++) ck_assert(t.dpos[i] == 0.0f);
  }
  /* A row whose only candidates are extra positives is also 0 for HCL (nothing to push away). */
  make_case(&t, LOSS_HCL, 1, 60);
  for (int i = 0; i < B * C; i++) t.mask[i] = t.mask[i] == NEG ? OFF : t.mask[i];
  ck_assert(eval_loss(&t) == 0.0);
}
END_TEST

/* At τ = 0.01 logits reach 100 (e^100 overflows float without the row-maximum shift) and HCL's
 * reweighting doubles them. Value and gradient against the double formulas: the float logit s/τ is
 * rounded to u·100·(1 + β), which moves the loss by as much, hence the value's tolerance of
 * 4·u·(1 + β)/τ. */
START_TEST(losses_match_reference_at_small_temperature) {
  case_t t;
  for (int kind = LOSS_INFONCE; kind <= LOSS_HCL; kind++) {
    make_case(&t, (loss_kind)kind, 1, 70);
    t.cfg.temperature = 0.01f;
    for (int i = 0; i < B * C; i++) t.S[i] = 0.99f - 0.001f * (i % 13);
    for (int i = 0; i < B; i++) t.s_pos[i] = 0.98f + 0.002f * i; /* among the negatives: dpos is not 0 */
    double l = loss_backward(&t.cfg, t.beta, t.dS, t.dpos, t.S, t.mask, t.s_pos, B, C);
    ck_assert(isfinite(l) && l >= 0.0);
    double ref = ref_loss(&t), tol = 4 * 0x1p-24 * (1 + t.beta) / 0.01;
    ck_assert_msg(fabs(l - ref) <= tol * (1 + ref), "%s at tau 0.01: %.9g, reference %.9g",
                  enum_name_of(loss_kind_names, (int)t.cfg.loss), l, ref);
    check_gradients(&t, kind == LOSS_HCL ? "hcl tau 0.01" : "infonce tau 0.01");
  }
}
END_TEST

/* ---- NT-Xent ---- */

enum { NB = 4, ND = 6, NK = 9 };

typedef struct {
  float Z[2 * NB * ND], Q[NK * ND], dZ[2 * NB * ND];
  int K;
  float tau;
  float *work;
} ntxent_case;

static double eval_ntxent(void *ctx) {
  ntxent_case *t = ctx;
  return loss_ntxent_forward(t->Z, NB, ND, t->Q, t->K, t->tau, t->work);
}

static double ref_ntxent(const ntxent_case *t) {
  int R = 2 * NB;
  double total = 0;
  for (int i = 0; i < R; i++) {
    double den = 0, num = 0;
    for (int k = 0; k < R + t->K; k++) {
      if (k == i) continue;
      const float *o = k < R ? t->Z + k * ND : t->Q + (k - R) * ND;
      double s = 0;
      for (int c = 0; c < ND; c++) s += (double)t->Z[i * ND + c] * o[c];
      den += exp(s / t->tau);
      if (k == (i + NB) % R) num = exp(s / t->tau);
    }
    total += -log(num / den);
  }
  return total / R;
}

static double eval_ntxent_ref(void *ctx) { return ref_ntxent(ctx); }

/* Differences of the double reference, so only truncation and the analytic gradient's float rounding
 * remain. Truncation: z_ic enters row i's log-sum-exp through every logit (coefficients |z_kc|/τ ≤ 1/τ)
 * and one logit of each other row; a log-sum-exp's third derivative along a direction is the third
 * central moment of the softmax over the logits' coefficients, at most 0.1·range³ = 0.8/τ³ for row i
 * and 0.1/τ³ for each of the 2B - 1 others; the mean over R = 2B rows divides by R:
 * M3 ≤ (0.8 + 0.1·(2B - 1))/(τ³·R). Analytic rounding: dZ_i = (Σ_k dS_ik z_k + Σ_k dS_ki z_k)/τ, each
 * sum of |dS|·|z| at most 2/(R·τ) (softmax rows sum to 1, plus the positive's −1), ~2B + K + 8
 * roundings per term (exp, normalisation, the sgemm's sums). */
static gc_spec ntxent_spec(const char *name, double tau) {
  const double h = 1e-3, R = 2 * NB;
  double m3 = (0.8 + 0.1 * (R - 1)) / (tau * tau * tau * R);
  return (gc_spec){.name = name, .h = h, .atol = gc_atol(h, 0, 0, m3, 2 * NB + NK + 8, 2 * 2.0 / (R * tau)),
                   .rtol = 8 * 0x1p-24, .max_checks = 2 * NB * ND};
}

START_TEST(ntxent_matches_formula_and_gradient_with_and_without_queue) {
  ntxent_case t;
  rng_t r;
  rng_init(&r, 80, 1);
  t.work = tensor_alloc(loss_ntxent_work_len(NB, NK));
  for (int K = 0; K <= NK; K += NK) {
    t.K = K;
    t.tau = 0.3f;
    fill_uniform(t.Z, sizeof t.Z / sizeof(float), &r, -1, 1);
    fill_uniform(t.Q, sizeof t.Q / sizeof(float), &r, -1, 1);
    for (int i = 0; i < 2 * NB; i++) vec_normalize(t.Z + i * ND, ND);
    for (int i = 0; i < NK; i++) vec_normalize(t.Q + i * ND, ND);
    double lf = eval_ntxent(&t);
    ck_assert_msg(fabs(lf - ref_ntxent(&t)) < 1e-5, "K=%d %g vs %g", K, lf, ref_ntxent(&t));
    double lb = loss_ntxent_backward(t.dZ, t.Z, NB, ND, t.Q, t.K, t.tau, t.work);
    ck_assert(fabs(lf - lb) < 1e-6);
    gc_spec spec = ntxent_spec(K ? "ntxent K=9" : "ntxent K=0", t.tau);
    gc_assert(gc_check(eval_ntxent_ref, &t, t.Z, t.dZ, 2 * NB * ND, &spec), spec.name);
    /* The check can fail: 1% planted in one entry (the largest, as gc_check's plant_ratio assumes) is
     * reported at that entry. */
    float planted[2 * NB * ND];
    memcpy(planted, t.dZ, sizeof planted);
    size_t k = 0;
    for (size_t i = 1; i < 2 * NB * ND; i++) k = fabsf(planted[i]) > fabsf(planted[k]) ? i : k;
    planted[k] *= 1.01f;
    gc_result bad = gc_check(eval_ntxent_ref, &t, t.Z, planted, 2 * NB * ND, &spec);
    ck_assert_msg(bad.ratio >= 1.0 && bad.worst_i == k, "planted 1%% at %zu: ratio %g at %zu", k,
                  bad.ratio, bad.worst_i);
    /* The contract view of the same problem: each row's partner is its positive, masked off with the
     * row itself; every other column is a negative. */
    eval_ntxent(&t);
    loss_view v = loss_ntxent_view(t.work, NB, K);
    ck_assert_int_eq(v.rows, 2 * NB);
    ck_assert_int_eq(v.cols, 2 * NB + K);
    for (int i = 0; i < v.rows; i++) {
      int p = (i + NB) % (2 * NB), off = 0;
      ck_assert(fabsf(v.s_pos[i] - vec_dot(t.Z + i * ND, t.Z + p * ND, ND)) < 1e-6f);
      for (int j = 0; j < v.cols; j++) off += v.mask[i * v.cols + j] == OFF;
      ck_assert_int_eq(off, 2);
      ck_assert_int_eq(v.mask[i * v.cols + i], OFF);
      ck_assert_int_eq(v.mask[i * v.cols + p], OFF);
    }
  }
  tensor_free(t.work);
}
END_TEST

START_TEST(loss_config_names_and_checks) {
  loss_config c;
  c = config_defaults()->trainer.moco.loss;
  ck_assert_int_eq(c.loss, LOSS_INFONCE);
  int k = -1;
  ck_assert_int_eq(enum_value_of(loss_kind_names, "hcl", &k), 0);
  ck_assert_int_eq(k, LOSS_HCL);
  ck_assert_str_eq(enum_name_of(loss_kind_names, (int)LOSS_NTXENT), "ntxent");
  ck_assert_int_lt(enum_value_of(loss_kind_names, "nce", &k), 0);
  ck_assert_int_eq(enum_value_of(triplet_negative_names, "mean", &k), 0);
  ck_assert_int_eq(k, TRIPLET_MEAN);
}
END_TEST

Suite *loss_suite(void) {
  Suite *s = suite_create("loss");
  TCase *tc = tcase_create("loss");
  tcase_add_test(tc, infonce_matches_formula_and_gradient);
  tcase_add_test(tc, hcl_and_dcl_match_reference_and_gradient);
  tcase_add_test(tc, hcl_lower_clamp_is_applied_without_gradient);
  tcase_add_test(tc, triplet_matches_hand_values_and_gradient);
  tcase_add_test(tc, every_loss_is_zero_on_rows_with_nothing_selected);
  tcase_add_test(tc, losses_match_reference_at_small_temperature);
  tcase_add_test(tc, ntxent_matches_formula_and_gradient_with_and_without_queue);
  tcase_add_test(tc, loss_config_names_and_checks);
  suite_add_tcase(s, tc);
  return s;
}
