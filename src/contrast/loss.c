#include "contrast/loss.h"

#include <math.h>
#include <string.h>

#include "contrast/mine.h"
#include "core/err.h"
#include "core/par.h"
#include "core/tensor.h"

/* The contract's mask values, short names for the inner loops. */
enum { M_OFF = MINE_OFF, M_NEG = MINE_NEG, M_POS = MINE_POS };

const enum_name loss_kind_names[] = {
    {"infonce", LOSS_INFONCE}, {"hcl", LOSS_HCL}, {"triplet", LOSS_TRIPLET}, {"ntxent", LOSS_NTXENT}, {NULL, 0}};
const enum_name triplet_negative_names[] = {{"hardest", TRIPLET_HARDEST}, {"mean", TRIPLET_MEAN}, {NULL, 0}};

/* ---- row kernels -------------------------------------------------------------------------------- */

/* exp(x) for x <= 0 up to rounding (every exponent here has its row maximum subtracted). Cephes' expf:
 * x = n·ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r, 2^n put into the exponent bits.
 * Branch-free so the row loops vectorise (a libm call per entry cost 5x the similarity sgemm at
 * K = 65536); relative error below 1e-7 on [−86, 0]. x is clamped to [−86, 10]: below, e^−86 ≈ 4e−38
 * stands in for smaller values (no sum here can tell it from 0 next to its own largest term, 1, and
 * it keeps results out of the slow subnormal range); above, entries that are masked off anyway (their
 * similarity may exceed the row maximum of the used ones) cannot overflow the exponent bits. */
static inline float exp_le0(float x) {
  x = x < -86.0f ? -86.0f : x > 10.0f ? 10.0f : x;
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* rint via 1.5·2^23 */
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;              /* ln2 in two parts */
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

/* Rows are processed in pieces of exactly BLOCK entries, the last one copied into padded storage
 * (mask OFF beyond the row): GCC's -O2 vectoriser only takes loops whose trip count needs no scalar
 * epilogue, and these loops are the loss's whole cost at K = 65536. Sums and maxima run in LANES
 * independent lanes, so vectorising them reassociates nothing the source did not; exp sums leave
 * float for double once per block. */
enum { LANES = 16, BLOCK = 256 };

typedef struct {
  const float *s;
  const uint8_t *m;
  float *out; /* where this piece's per-entry output goes (out_pad for the padded last piece) */
  int n;      /* entries of the row in this piece */
  float s_pad[BLOCK], out_pad[BLOCK];
  uint8_t m_pad[BLOCK];
} row_piece;

static void piece_at(row_piece *p, const float *s, const uint8_t *m, float *out, int j0, int C) {
  p->n = C - j0 < BLOCK ? C - j0 : BLOCK;
  if (p->n == BLOCK) {
    p->s = s + j0, p->m = m + j0, p->out = out ? out + j0 : p->out_pad;
    return;
  }
  memcpy(p->s_pad, s + j0, (size_t)p->n * sizeof(float));
  memset(p->s_pad + p->n, 0, (size_t)(BLOCK - p->n) * sizeof(float));
  memcpy(p->m_pad, m + j0, (size_t)p->n);
  memset(p->m_pad + p->n, M_OFF, (size_t)(BLOCK - p->n));
  if (out) memcpy(p->out_pad, out + j0, (size_t)p->n * sizeof(float));
  p->s = p->s_pad, p->m = p->m_pad, p->out = p->out_pad;
}

/* Writes a padded piece's output back to the row. */
static void piece_done(const row_piece *p, float *out, int j0) {
  if (out && p->out == p->out_pad) memcpy(out + j0, p->out_pad, (size_t)p->n * sizeof(float));
}

static float block_sum(const float *restrict x) {
  float lane[LANES] = {0};
  for (int t = 0; t < BLOCK; t += LANES)
    for (int k = 0; k < LANES; k++) lane[k] += x[t + k];
  float sum = 0.0f;
  for (int k = 0; k < LANES; k++) sum += lane[k];
  return sum;
}

/* Largest S_j with mask == kind in the piece, −inf when none. */
static float block_max(const float *restrict s, const uint8_t *restrict m, int kind) {
  float sel[BLOCK], lane[LANES];
  for (int j = 0; j < BLOCK; j++) sel[j] = m[j] == kind ? s[j] : -INFINITY;
  for (int k = 0; k < LANES; k++) lane[k] = -INFINITY;
  for (int t = 0; t < BLOCK; t += LANES)
    for (int k = 0; k < LANES; k++) lane[k] = sel[t + k] > lane[k] ? sel[t + k] : lane[k];
  float mx = -INFINITY;
  for (int k = 0; k < LANES; k++) mx = lane[k] > mx ? lane[k] : mx;
  return mx;
}

typedef struct {
  float max_neg, max_pos; /* largest S over MINE_NEG / MINE_POS entries, −inf when none */
  int n_neg, n_pos;
} row_scan;

static row_scan scan_row(const float *s, const uint8_t *m, int C) {
  row_scan r = {-INFINITY, -INFINITY, 0, 0};
  row_piece p;
  for (int j0 = 0; j0 < C; j0 += BLOCK) {
    piece_at(&p, s, m, NULL, j0, C);
    int cn = 0, cp = 0;
    for (int j = 0; j < BLOCK; j++) {
      cn += p.m[j] == M_NEG;
      cp += p.m[j] == M_POS;
    }
    if (cn) r.max_neg = fmaxf(r.max_neg, block_max(p.s, p.m, M_NEG));
    if (cp) r.max_pos = fmaxf(r.max_pos, block_max(p.s, p.m, M_POS));
    r.n_neg += cn;
    r.n_pos += cp;
  }
  return r;
}

/* out[j] = exp(a·(S_j − c) + d) where lo <= mask_j <= hi, else 0; returns the piece's sum. The
 * exponent is formed from the difference S_j − c (exact near the row maximum c) rather than as
 * a·S_j − a·c, whose rounding at 1/τ = 14 would be 1e-6 relative on every term. */
static float block_exp(float *restrict out, const float *restrict s, const uint8_t *restrict m, int lo,
                       int hi, float a, float c, float d) {
  for (int j = 0; j < BLOCK; j++) {
    float e = exp_le0(a * (s[j] - c) + d);
    out[j] = (unsigned)(m[j] - lo) <= (unsigned)(hi - lo) ? e : 0.0f;
  }
  return block_sum(out);
}

/* Σ_j exp(a·(S_j − c) + d) over the entries with lo <= mask_j <= hi, in double; the terms are also
 * left in out[0..C) (0 elsewhere) when out is not NULL. The exponents must be <= 0 up to rounding:
 * c >= their largest S_j, d <= 0. */
static double row_expsum(float *out, const float *s, const uint8_t *m, int C, int lo, int hi, float a,
                         float c, float d) {
  row_piece p;
  double total = 0.0;
  for (int j0 = 0; j0 < C; j0 += BLOCK) {
    piece_at(&p, s, m, out, j0, C);
    total += block_exp(p.out, p.s, p.m, lo, hi, a, c, d);
    piece_done(&p, out, j0);
  }
  return total;
}

static void block_scale(float *restrict o, const uint8_t *restrict m, float ca, float cp) {
  for (int j = 0; j < BLOCK; j++) o[j] *= m[j] == M_POS ? cp : ca;
}

/* ds[j] *= (mask_j == MINE_POS ? cp : ca) over a row. */
static void row_scale(float *ds, const uint8_t *m, int C, float ca, float cp) {
  row_piece p;
  for (int j0 = 0; j0 < C; j0 += BLOCK) {
    piece_at(&p, ds, m, ds, j0, C);
    block_scale(p.out, p.m, ca, cp);
    piece_done(&p, ds, j0);
  }
}

/* One InfoNCE row (see loss.h). With ds, writes g·∂L/∂l_j into ds[j] and g·∂L/∂l_pos into *dpos,
 * where l = s/τ; g = 1/(τB) turns that into the gradient of the batch mean w.r.t. s. */
static double infonce_row(float *ds, float *dpos, const float *s, const uint8_t *m, int C,
                          float s_pos, float inv_tau, float g) {
  row_scan r = scan_row(s, m, C);
  float top = fmaxf(fmaxf(r.max_neg, r.max_pos), s_pos);
  double e0 = exp((double)inv_tau * ((double)s_pos - top));
  double z_all = e0 + row_expsum(ds, s, m, C, M_NEG, M_POS, inv_tau, top, 0.0f);
  double z_pos = e0;
  if (r.n_pos) z_pos += row_expsum(NULL, s, m, C, M_POS, M_POS, inv_tau, top, 0.0f);
  if (ds) {
    /* ∂L/∂l_j = p_j − [j ∈ P]·p_j·(Z_all / Z_P), p_j = e_j / Z_all: the softmax minus the positives'
     * share of it, renormalised over the positives. */
    float ca = (float)(g / z_all), cp = (float)(g / z_all - g / z_pos);
    row_scale(ds, m, C, ca, cp);
    *dpos = (float)(g * (e0 / z_all - e0 / z_pos));
  }
  return log(z_all) - log(z_pos);
}

/* o[j] ← k1·o[j] − k2·w_j on negatives (0 elsewhere), w_j = exp(aw·(S_j − sn)): o holds w_j e_j from
 * the forward sums and w_j is recomputed rather than stored. */
static void block_hcl_grad(float *restrict o, const float *restrict s, const uint8_t *restrict m,
                           float k1, float k2, float aw, float sn) {
  for (int j = 0; j < BLOCK; j++) {
    float w = exp_le0(aw * (s[j] - sn));
    o[j] = m[j] == M_NEG ? k1 * o[j] - k2 * w : 0.0f;
  }
}

/* One HCL row (see loss.h for the estimator). Every exponential is taken relative to the row's
 * largest similarity `top`, the importance weights relative to their own set's largest (so Σw >= 1);
 * the ratios that matter (R, P̄, Ng and Z are all scaled by e^−top/τ together) are unchanged by
 * either shift. With ds, writes g·∂L/∂l into ds and *dpos as infonce_row does. */
static double hcl_row(float *ds, float *dpos, const float *s, const uint8_t *m, int C, float s_pos,
                      float inv_tau, float beta, float tau_plus, float g) {
  row_scan r = scan_row(s, m, C);
  if (r.n_neg == 0) { /* Ng = 0: L = −log(e_pos / e_pos) = 0 whatever the positives */
    if (ds) {
      vec_fill(ds, 0.0f, (size_t)C);
      *dpos = 0.0f;
    }
    return 0.0;
  }
  double N = r.n_neg;
  float sn = r.max_neg;                                /* largest negative */
  float sp = r.max_pos > s_pos ? r.max_pos : s_pos;    /* largest positive */
  float top = sn > sp ? sn : sp;
  float a1 = (1.0f + beta) * inv_tau, aw = beta * inv_tau;
  /* R = N·A/W with A = Σ w_j e_j and W = Σ w_j over the negatives, w_j e_j = exp((1+β)l_j − β·l_sn −
   * l_top) = exp((1+β)(l_j − l_sn) + (l_sn − l_top)). */
  double A = row_expsum(ds, s, m, C, M_NEG, M_NEG, a1, sn, inv_tau * (sn - top));
  double W = row_expsum(NULL, s, m, C, M_NEG, M_NEG, aw, sn, 0.0f);
  /* P̄ over the own positive and the MINE_POS columns, weighted the same way. */
  double d0 = (double)s_pos - top, dp = (double)s_pos - sp;
  double e0 = exp(inv_tau * d0), v0 = exp(aw * dp);
  double AP = v0 * e0, WP = v0;
  if (r.n_pos) {
    AP += row_expsum(NULL, s, m, C, M_POS, M_POS, a1, sp, inv_tau * (sp - top));
    WP += row_expsum(NULL, s, m, C, M_POS, M_POS, aw, sp, 0.0f);
  }
  double R = N * A / W, Pbar = AP / WP;
  double ng_raw = (R - tau_plus * N * Pbar) / (1.0 - tau_plus);
  double ng_floor = N * exp(-(double)inv_tau * (1.0 + top)); /* N·e^{−1/τ}, scaled by e^{−top/τ} */
  int clamped = ng_raw < ng_floor;
  double Z = e0 + (clamped ? ng_floor : ng_raw);
  double loss = log(Z) - inv_tau * d0;
  if (!ds) return loss;

  double dl0 = e0 / Z - 1.0;
  if (clamped) {
    vec_fill(ds, 0.0f, (size_t)C);
  } else {
    /* ∂Ng/∂l_j = N/(1−τ⁺) · (w_j/W) · ((1+β) e_j − β A/W)       for negatives,
     * ∂Ng/∂l_p = −τ⁺N/(1−τ⁺) · (v_p/WP) · ((1+β) e_p − β P̄)   for positives; both divided by Z. */
    double cn = N / ((1.0 - tau_plus) * W * Z), cpos = -tau_plus * N / ((1.0 - tau_plus) * WP * Z);
    float k1 = (float)(g * cn * (1.0 + beta)), k2 = (float)(g * cn * beta * (A / W));
    row_piece p;
    for (int j0 = 0; j0 < C; j0 += BLOCK) {
      piece_at(&p, s, m, ds, j0, C);
      block_hcl_grad(p.out, p.s, p.m, k1, k2, aw, sn);
      piece_done(&p, ds, j0);
    }
    if (r.n_pos) {
      float dtop = inv_tau * (sp - top);
      for (int j = 0; j < C; j++)
        if (m[j] == M_POS) {
          double ve = exp_le0(a1 * (s[j] - sp) + dtop), v = exp_le0(aw * (s[j] - sp));
          ds[j] = (float)(g * cpos * ((1.0 + beta) * ve - beta * Pbar * v));
        }
    }
    dl0 += cpos * ((1.0 + beta) * v0 * e0 - beta * Pbar * v0);
  }
  *dpos = (float)(g * dl0);
  return loss;
}

/* One triplet row; with ds, writes g·∂L/∂s (g = 1/B). */
static double triplet_row(float *ds, float *dpos, const float *s, const uint8_t *m, int C,
                          float s_pos, float margin, triplet_negative mode, float g) {
  if (ds) vec_fill(ds, 0.0f, (size_t)C);
  if (dpos) *dpos = 0.0f;
  if (mode == TRIPLET_HARDEST) {
    int hard = -1;
    for (int j = 0; j < C; j++)
      if (m[j] == M_NEG && (hard < 0 || s[j] > s[hard])) hard = j;
    if (hard < 0) return 0.0;
    double h = (double)s[hard] - s_pos + margin;
    if (h <= 0.0) return 0.0;
    if (ds) {
      ds[hard] = g;
      *dpos = -g;
    }
    return h;
  }
  int n = 0, active = 0;
  double sum = 0.0;
  for (int j = 0; j < C; j++) n += m[j] == M_NEG;
  if (n == 0) return 0.0;
  for (int j = 0; j < C; j++) {
    if (m[j] != M_NEG) continue;
    double h = (double)s[j] - s_pos + margin;
    if (h <= 0.0) continue;
    sum += h;
    active++;
    if (ds) ds[j] = g / (float)n;
  }
  if (dpos) *dpos = -g * (float)active / (float)n;
  return sum / n;
}

/* ---- the (S, mask) losses over a batch ----------------------------------------------------------- */

/* A loss over B rows. Rows are independent, so they run in parts across the compute team; each part
 * sums its rows' losses and the parts are added in order. The number of parts depends only on the
 * problem's size, never on the team's, so the total is the same on any number of threads. */
typedef struct {
  loss_config c;
  float beta;
  float *dS, *dpos; /* NULL: forward only */
  const float *S, *s_pos;
  const uint8_t *mask;
  int B, C;
  double part_loss[PAR_MAX_THREADS];
} rows_call;

static double one_row(const rows_call *r, int i) {
  size_t at = (size_t)i * r->C;
  float *ds = r->dS ? r->dS + at : NULL, *dpos = r->dS ? r->dpos + i : NULL;
  const float *s = r->S + at;
  const uint8_t *m = r->mask + at;
  float inv_tau = 1.0f / r->c.temperature;
  switch (r->c.loss) {
  case LOSS_HCL: /* g = 1/(τB): the gradient of the batch mean w.r.t. s */
    return hcl_row(ds, dpos, s, m, r->C, r->s_pos[i], inv_tau, r->beta, r->c.tau_plus,
                   inv_tau / (float)r->B);
  case LOSS_TRIPLET:
    return triplet_row(ds, dpos, s, m, r->C, r->s_pos[i], r->c.margin, r->c.triplet_negative,
                       1.0f / (float)r->B);
  default: return infonce_row(ds, dpos, s, m, r->C, r->s_pos[i], inv_tau, inv_tau / (float)r->B);
  }
}

static void rows_part(void *ctx, int part, int parts) {
  rows_call *r = ctx;
  long lo, hi;
  par_range(r->B, part, parts, &lo, &hi);
  double total = 0.0;
  for (long i = lo; i < hi; i++) total += one_row(r, (int)i);
  r->part_loss[part] = total;
}

static double run_rows(rows_call *r) {
  if (r->B <= 0) return 0.0;
  int parts = (long)r->B * r->C < PAR_MIN_FLOATS ? 1 : r->B < PAR_MAX_THREADS ? r->B : PAR_MAX_THREADS;
  par_run(parts, rows_part, r);
  double total = 0.0;
  for (int k = 0; k < parts; k++) total += r->part_loss[k];
  return total / r->B;
}

double loss_forward(const loss_config *c, float beta, const float *S, const uint8_t *mask,
                    const float *s_pos, int B, int C) {
  rows_call r = {.c = *c, .beta = beta, .S = S, .mask = mask, .s_pos = s_pos, .B = B, .C = C};
  return run_rows(&r);
}

double loss_backward(const loss_config *c, float beta, float *dS, float *dpos, const float *S,
                     const uint8_t *mask, const float *s_pos, int B, int C) {
  rows_call r = {.c = *c, .beta = beta, .dS = dS, .dpos = dpos, .S = S, .mask = mask,
                 .s_pos = s_pos, .B = B, .C = C};
  return run_rows(&r);
}

static loss_config config_of(loss_kind kind, float tau, float tau_plus, float margin,
                             triplet_negative mode) {
  return (loss_config){.loss = kind, .temperature = tau, .tau_plus = tau_plus, .margin = margin,
                       .triplet_negative = mode};
}

double loss_infonce_forward(const float *S, const uint8_t *mask, const float *s_pos, int B, int C,
                            float tau) {
  loss_config c = config_of(LOSS_INFONCE, tau, 0.0f, 0.0f, TRIPLET_HARDEST);
  return loss_forward(&c, 0.0f, S, mask, s_pos, B, C);
}

double loss_infonce_backward(float *dS, float *dpos, const float *S, const uint8_t *mask,
                             const float *s_pos, int B, int C, float tau) {
  loss_config c = config_of(LOSS_INFONCE, tau, 0.0f, 0.0f, TRIPLET_HARDEST);
  return loss_backward(&c, 0.0f, dS, dpos, S, mask, s_pos, B, C);
}

double loss_hcl_forward(const float *S, const uint8_t *mask, const float *s_pos, int B, int C,
                        float tau, float beta, float tau_plus) {
  loss_config c = config_of(LOSS_HCL, tau, tau_plus, 0.0f, TRIPLET_HARDEST);
  return loss_forward(&c, beta, S, mask, s_pos, B, C);
}

double loss_hcl_backward(float *dS, float *dpos, const float *S, const uint8_t *mask,
                         const float *s_pos, int B, int C, float tau, float beta, float tau_plus) {
  loss_config c = config_of(LOSS_HCL, tau, tau_plus, 0.0f, TRIPLET_HARDEST);
  return loss_backward(&c, beta, dS, dpos, S, mask, s_pos, B, C);
}

double loss_triplet_forward(const float *S, const uint8_t *mask, const float *s_pos, int B, int C,
                            float margin, triplet_negative mode) {
  loss_config c = config_of(LOSS_TRIPLET, 1.0f, 0.0f, margin, mode);
  return loss_forward(&c, 0.0f, S, mask, s_pos, B, C);
}

double loss_triplet_backward(float *dS, float *dpos, const float *S, const uint8_t *mask,
                             const float *s_pos, int B, int C, float margin, triplet_negative mode) {
  loss_config c = config_of(LOSS_TRIPLET, 1.0f, 0.0f, margin, mode);
  return loss_backward(&c, 0.0f, dS, dpos, S, mask, s_pos, B, C);
}

/* ---- NT-Xent ------------------------------------------------------------------------------------ */

/* NT-Xent is InfoNCE on a [2B, 2B + K] similarity matrix whose row i masks off itself and its
 * partner p(i) (the partner is the row's s_pos instead). work: S [2B, L] | dS [2B, L] | s_pos [2B] |
 * dpos [2B] | mask [2B, L] bytes, L = 2B + K. */
typedef struct {
  float *S, *dS, *s_pos, *dpos;
  uint8_t *mask;
  int R, L;
} ntxent_work;

size_t loss_ntxent_work_len(int B, int K) {
  size_t R = 2 * (size_t)B, L = R + (size_t)K;
  return 2 * R * L + 2 * R + (R * L + sizeof(float) - 1) / sizeof(float);
}

static ntxent_work ntxent_layout(float *work, int B, int K) {
  ntxent_work w;
  w.R = 2 * B;
  w.L = w.R + K;
  w.S = work;
  w.dS = w.S + (size_t)w.R * w.L;
  w.s_pos = w.dS + (size_t)w.R * w.L;
  w.dpos = w.s_pos + w.R;
  w.mask = (uint8_t *)(w.dpos + w.R);
  return w;
}

loss_view loss_ntxent_view(const float *work, int B, int K) {
  ntxent_work w = ntxent_layout((float *)work, B, K);
  return (loss_view){w.S, w.mask, w.s_pos, w.R, w.L};
}

static ntxent_work ntxent_similarities(const float *Z, int B, int d, const float *negatives, int K,
                                       float *work) {
  ntxent_work w = ntxent_layout(work, B, K);
  mat_mul_ld(w.S, w.L, Z, d, Z, d, w.R, w.R, d, 0, 1, 1.0f, 0.0f);
  if (K > 0) mat_mul_ld(w.S + w.R, w.L, Z, d, negatives, d, w.R, K, d, 0, 1, 1.0f, 0.0f);
  memset(w.mask, M_NEG, (size_t)w.R * w.L);
  for (int i = 0; i < w.R; i++) {
    int p = (i + B) % w.R;
    w.mask[(size_t)i * w.L + i] = M_OFF;
    w.mask[(size_t)i * w.L + p] = M_OFF;
    w.s_pos[i] = w.S[(size_t)i * w.L + p];
  }
  return w;
}

double loss_ntxent_forward(const float *Z, int B, int d, const float *negatives, int K, float tau,
                           float *work) {
  ntxent_work w = ntxent_similarities(Z, B, d, negatives, K, work);
  return loss_infonce_forward(w.S, w.mask, w.s_pos, w.R, w.L, tau);
}

double loss_ntxent_backward(float *dZ, const float *Z, int B, int d, const float *negatives, int K,
                            float tau, float *work) {
  ntxent_work w = ntxent_similarities(Z, B, d, negatives, K, work);
  float *dS = w.dS;
  double loss = loss_infonce_backward(dS, w.dpos, w.S, w.mask, w.s_pos, w.R, w.L, tau);
  /* s_ik = z_i·z_k feeds both z_i and z_k: dZ = G·Z + Gᵀ·Z over the in-batch block, where G is dS
   * with each row's positive gradient put back at its partner's column (masked off, so 0 there). */
  for (int i = 0; i < w.R; i++) dS[(size_t)i * w.L + (i + B) % w.R] = w.dpos[i];
  mat_mul_ld(dZ, d, dS, w.L, Z, d, w.R, d, w.R, 0, 0, 1.0f, 0.0f);
  mat_mul_ld(dZ, d, dS, w.L, Z, d, w.R, d, w.R, 1, 0, 1.0f, 1.0f);
  if (K > 0) mat_mul_ld(dZ, d, dS + w.R, w.L, negatives, d, w.R, d, K, 0, 0, 1.0f, 1.0f);
  return loss;
}
