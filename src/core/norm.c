/* BatchNorm over vectors ([B, C], S = 1) and per channel over images ([B, C, S]), with split-BN groups.
 *
 * Saved state, per group g: mean at saved[2 C g + c], rstd at saved[2 C g + C + c]. Backward recomputes
 * xhat = (x - mean) * rstd from the input instead of storing it: the input is kept anyway (it is the
 * previous layer's output) and this halves the memory traffic of the layer. */
#include "core/layers.h"
#include "core/dist.h"
#include "core/par.h"

#include <math.h>
#include <string.h>

#include "hot.h"

size_t batchnorm_saved_len(int C, int max_batch) { return 2 * (size_t)C * (size_t)max_batch; }

static int bn_groups(const bn_dims *d) {
  if (!d->training || d->G < 1) return 1;
  return d->G > d->B ? d->B : d->G;
}

/* Channels [c0, c1) of one call: images split by channel across the compute team (core/par.h); every
 * channel's statistics and gradients are computed as a whole, so the split does not change results. */
typedef struct {
  int c0, c1;
} bn_span;

/* Mean and biased variance per channel of samples [b0, b1) into mean[C], var[C]. */
static void bn_stats(float *restrict mean, float *restrict var, const float *inp, int b0, int b1,
                     bn_span r, const bn_dims *d) {
  int C = d->C, S = d->S;
  float inv_n = 1.0f / (float)((size_t)(b1 - b0) * S);
  if (S == 1) {
    /* Vectors: rows are samples, so accumulate whole rows; the loop over channels vectorises. */
    for (int c = r.c0; c < r.c1; c++) mean[c] = var[c] = 0.0f;
    for (int b = b0; b < b1; b++) {
      const float *restrict x = inp + (size_t)b * C;
      for (int c = r.c0; c < r.c1; c++) mean[c] += x[c];
    }
    for (int c = r.c0; c < r.c1; c++) mean[c] *= inv_n;
    for (int b = b0; b < b1; b++) {
      const float *restrict x = inp + (size_t)b * C;
      for (int c = r.c0; c < r.c1; c++) var[c] += (x[c] - mean[c]) * (x[c] - mean[c]);
    }
    for (int c = r.c0; c < r.c1; c++) var[c] *= inv_n;
    return;
  }
  /* Images: each (sample, channel) plane is contiguous; two passes for a variance that does not cancel. */
  for (int c = r.c0; c < r.c1; c++) {
    double s = 0.0;
    for (int b = b0; b < b1; b++) s += hot_sum(inp + ((size_t)b * C + c) * S, S);
    float m = (float)(s * inv_n);
    double v = 0.0;
    for (int b = b0; b < b1; b++) v += hot_sqdev(inp + ((size_t)b * C + c) * S, m, S);
    mean[c] = m;
    var[c] = (float)(v * inv_n);
  }
}

/* ReLU as relu_forward computes it, so the fused layer's output equals the two layers'. */
static inline float bn_relu(float v) { return v > 0.0f ? v : 0.0f; }

/* y = (x - mean) * rstd * gamma + beta over samples [b0, b1), then max(y, 0) with d->relu. */
static void bn_apply(float *out, const float *inp, const float *restrict mean,
                     const float *restrict rstd, const float *restrict gamma,
                     const float *restrict beta, int b0, int b1, bn_span r, const bn_dims *d) {
  int C = d->C, S = d->S;
  if (S == 1) {
    for (int b = b0; b < b1; b++) {
      const float *restrict x = inp + (size_t)b * C;
      float *restrict y = out + (size_t)b * C;
      if (d->relu)
        for (int c = r.c0; c < r.c1; c++) y[c] = bn_relu((x[c] - mean[c]) * (rstd[c] * gamma[c]) + beta[c]);
      else
        for (int c = r.c0; c < r.c1; c++) y[c] = (x[c] - mean[c]) * (rstd[c] * gamma[c]) + beta[c];
    }
    return;
  }
  for (int b = b0; b < b1; b++)
    for (int c = r.c0; c < r.c1; c++) {
      const float *restrict x = inp + ((size_t)b * C + c) * S;
      float *restrict y = out + ((size_t)b * C + c) * S;
      float k = rstd[c] * gamma[c], sh = beta[c] - mean[c] * k;
      if (d->relu)
        for (int i = 0; i < S; i++) y[i] = bn_relu(x[i] * k + sh);
      else
        for (int i = 0; i < S; i++) y[i] = x[i] * k + sh;
    }
}

/* The arguments of one forward or backward call, shared by its parts. */
typedef struct {
  float *out, *saved, *running_mean, *running_var; /* forward */
  float *dinp, *dgamma, *dbeta, *ws;                /* backward */
  const float *stats;                               /* backward: what the forward saved */
  const float *inp, *gamma, *beta, *dout;
  const float *y; /* backward with a fused ReLU: the forward's output, whose sign is the ReLU's mask */
  const bn_dims *d;
} bn_call;

static bn_span bn_part_span(const bn_call *a, int part, int parts) {
  long lo, hi;
  par_range(a->d->C, part, parts, &lo, &hi);
  return (bn_span){(int)lo, (int)hi};
}

/* Vectors split by channel too: each part then runs its loops over a slice of every row. */
static int bn_parts(const bn_dims *d) { return par_parts((long)d->B * d->C * d->S, PAR_MIN_FLOATS); }

static void bn_forward_part(void *ctx, int part, int parts) {
  const bn_call *a = ctx;
  const bn_dims *d = a->d;
  bn_span r = bn_part_span(a, part, parts);
  int C = d->C, G = bn_groups(d);
  if (!d->training) {
    for (int c = r.c0; c < r.c1; c++) {
      a->saved[c] = a->running_mean[c];
      a->saved[C + c] = 1.0f / sqrtf(a->running_var[c] + d->eps);
    }
    bn_apply(a->out, a->inp, a->saved, a->saved + C, a->gamma, a->beta, 0, d->B, r, d);
    return;
  }
  for (int g = 0; g < G; g++) {
    int b0 = (int)((long)g * d->B / G), b1 = (int)((long)(g + 1) * d->B / G);
    float *mean = a->saved + 2 * (size_t)C * g, *rstd = mean + C;
    bn_stats(mean, rstd, a->inp, b0, b1, r, d); /* rstd holds the variance until the update below */
    /* Split BN: each group's statistics move the running ones by 1/G of the momentum, so the running
     * statistics follow the average over groups (what averaging per-device buffers gives). */
    size_t n = (size_t)(b1 - b0) * d->S;
    float unbias = n > 1 ? (float)n / (float)(n - 1) : 1.0f;
    float m = d->momentum / (float)G;
    for (int c = r.c0; c < r.c1; c++) {
      if (g == 0) {
        a->running_mean[c] *= 1.0f - d->momentum;
        a->running_var[c] *= 1.0f - d->momentum;
      }
      a->running_mean[c] += m * mean[c];
      a->running_var[c] += m * rstd[c] * unbias;
      rstd[c] = 1.0f / sqrtf(rstd[c] + d->eps);
    }
    bn_apply(a->out, a->inp, mean, rstd, a->gamma, a->beta, b0, b1, r, d);
  }
}

/* ---- synchronised statistics (bn_dims.sync): per-channel sums over every rank ---- */

static int bn_synced(const bn_dims *d) { return d->sync && d->training && dist_active(); }

/* Which per-channel sum a part computes: pass 0 sum x, pass 1 sum (x - mean)^2, into sync[c]. */
typedef struct {
  const bn_call *a;
  int pass;
} bn_sync_call;

static void bn_sync_sum_part(void *ctx, int part, int parts) {
  const bn_sync_call *sc = ctx;
  const bn_dims *d = sc->a->d;
  bn_span r = bn_part_span(sc->a, part, parts);
  const float *mean = sc->a->saved;
  for (int c = r.c0; c < r.c1; c++) {
    double s = 0.0;
    for (int b = 0; b < d->B; b++) {
      const float *x = sc->a->inp + ((size_t)b * d->C + c) * d->S;
      s += sc->pass ? hot_sqdev(x, mean[c], d->S) : hot_sum(x, d->S);
    }
    d->sync[c] = s;
  }
}

static void bn_sync_apply_part(void *ctx, int part, int parts) {
  const bn_call *a = ctx;
  bn_apply(a->out, a->inp, a->saved, a->saved + a->d->C, a->gamma, a->beta, 0, a->d->B,
           bn_part_span(a, part, parts), a->d);
}

/* Two passes, as bn_stats, each summed across ranks: the mean first, then squared deviations from it
 * (a variance that does not cancel). The running statistics see the whole world's batch, so they stay
 * the same on every rank. */
static void bn_sync_forward(bn_call *a) {
  const bn_dims *d = a->d;
  int C = d->C, parts = bn_parts(d);
  float *mean = a->saved, *rstd = a->saved + C;
  double n = (double)d->B * d->S * dist_size();
  bn_sync_call sc = {a, 0};
  par_run(parts, bn_sync_sum_part, &sc);
  dist_sum_f64(d->sync, (size_t)C);
  for (int c = 0; c < C; c++) mean[c] = (float)(d->sync[c] / n);
  sc.pass = 1;
  par_run(parts, bn_sync_sum_part, &sc);
  dist_sum_f64(d->sync, (size_t)C);
  float unbias = n > 1 ? (float)(n / (n - 1)) : 1.0f;
  for (int c = 0; c < C; c++) {
    float var = (float)(d->sync[c] / n);
    a->running_mean[c] = (1.0f - d->momentum) * a->running_mean[c] + d->momentum * mean[c];
    a->running_var[c] = (1.0f - d->momentum) * a->running_var[c] + d->momentum * var * unbias;
    rstd[c] = 1.0f / sqrtf(var + d->eps);
  }
  par_run(parts, bn_sync_apply_part, a);
}

void batchnorm_forward(float *out, float *saved, float *running_mean, float *running_var,
                       const float *inp, const float *gamma, const float *beta, const bn_dims *d) {
  bn_call a = {.out = out, .saved = saved, .running_mean = running_mean,
               .running_var = running_var, .inp = inp, .gamma = gamma, .beta = beta, .d = d};
  if (bn_synced(d))
    bn_sync_forward(&a);
  else
    par_run(bn_parts(d), bn_forward_part, &a);
}

/* With a fused ReLU (d->relu) the backward's dy is the gradient at the ReLU's output, and the
 * BatchNorm's own output gradient is g = dy where the forward's output y is positive, 0 elsewhere (as
 * relu_backward). */
static inline float bn_masked(const float *restrict dy, const float *restrict y, int relu, size_t i) {
  return relu && !(y[i] > 0.0f) ? 0.0f : dy[i];
}

/* sum_dy[c] = sum g and sum_dyx[c] = sum g (x - mean) over samples [b0, b1), g as above, for the
 * statistics mean, rstd of those samples. */
static void bn_grad_sums(float *restrict sum_dy, float *restrict sum_dyx, const bn_call *a,
                         const float *restrict mean, const float *restrict rstd, int b0, int b1,
                         bn_span r) {
  const bn_dims *d = a->d;
  int C = d->C, S = d->S, relu = d->relu;
  for (int c = r.c0; c < r.c1; c++) sum_dy[c] = sum_dyx[c] = 0.0f;
  if (S == 1) {
    for (int b = b0; b < b1; b++) {
      const float *restrict x = a->inp + (size_t)b * C, *restrict dy = a->dout + (size_t)b * C;
      const float *restrict y = relu ? a->y + (size_t)b * C : NULL;
      for (int c = r.c0; c < r.c1; c++) {
        float g = bn_masked(dy, y, relu, (size_t)c);
        sum_dy[c] += g;
        sum_dyx[c] += g * (x[c] - mean[c]);
      }
    }
    return;
  }
  /* With a fused ReLU, g goes into dx (when wanted): a sample's planes of the part's channels are one
   * contiguous run, masked in one loop as relu_backward does (masking plane by plane costs a loop's
   * set-up per 49 floats); the sums then read g back from cache and bn_dx turns it into dx in place. */
  size_t run = (size_t)(r.c1 - r.c0) * S;
  for (int b = b0; b < b1; b++) {
    size_t off0 = ((size_t)b * C + r.c0) * S;
    const float *gsrc = a->dout;
    if (relu && a->dinp) {
      const float *restrict dy = a->dout + off0, *restrict y = a->y + off0;
      float *restrict g = a->dinp + off0;
      for (size_t i = 0; i < run; i++) g[i] = y[i] > 0.0f ? dy[i] : 0.0f;
      gsrc = a->dinp;
    }
    for (int c = r.c0; c < r.c1; c++) {
      size_t off = ((size_t)b * C + c) * S;
      if (relu && !a->dinp) {
        float s_dy, s_dyx;
        hot_relu_sums(a->dout + off, a->y + off, a->inp + off, mean[c], S, &s_dy, &s_dyx);
        sum_dy[c] += s_dy;
        sum_dyx[c] += s_dyx;
      } else {
        sum_dy[c] += hot_sum(gsrc + off, S);
        sum_dyx[c] += hot_dotdev(gsrc + off, a->inp + off, mean[c], S);
      }
    }
  }
}

/* dx = gamma rstd (g - k0 - (x - mean) k1) over samples [b0, b1), with k0, k1 per channel; on images
 * with a fused ReLU, bn_grad_sums left g in dx. */
static void bn_dx(const bn_call *a, const float *restrict mean, const float *restrict rstd,
                  const float *restrict k0, const float *restrict k1, int b0, int b1, bn_span r) {
  const bn_dims *d = a->d;
  const float *restrict gamma = a->gamma;
  int C = d->C, S = d->S, relu = d->relu;
  if (S == 1) {
    for (int b = b0; b < b1; b++) {
      const float *restrict x = a->inp + (size_t)b * C, *restrict dy = a->dout + (size_t)b * C;
      const float *restrict y = relu ? a->y + (size_t)b * C : NULL;
      float *restrict dx = a->dinp + (size_t)b * C;
      for (int c = r.c0; c < r.c1; c++)
        dx[c] = gamma[c] * rstd[c] * (bn_masked(dy, y, relu, (size_t)c) - k0[c] - (x[c] - mean[c]) * k1[c]);
    }
    return;
  }
  for (int b = b0; b < b1; b++)
    for (int c = r.c0; c < r.c1; c++) {
      size_t off = ((size_t)b * C + c) * S;
      const float *restrict x = a->inp + off, *restrict dy = a->dout + off;
      float *restrict dx = a->dinp + off;
      /* g - k0 - (x - m) k1 = g - x k1 - (k0 - m k1) */
      float sc = gamma[c] * rstd[c], o = k0[c] - mean[c] * k1[c], kk = k1[c];
      if (relu) {
        float *g = a->dinp + off; /* dx itself: no restrict */
        for (int i = 0; i < S; i++) g[i] = sc * (g[i] - x[i] * kk - o);
      } else {
        for (int i = 0; i < S; i++) dx[i] = sc * (dy[i] - x[i] * kk - o);
      }
    }
}

static void bn_backward_part(void *ctx, int part, int parts) {
  const bn_call *a = ctx;
  const bn_dims *d = a->d;
  bn_span r = bn_part_span(a, part, parts);
  int C = d->C, G = bn_groups(d);
  float *sum_dy = a->ws, *sum_dyx = a->ws + C;
  for (int g = 0; g < G; g++) {
    int b0 = d->training ? (int)((long)g * d->B / G) : 0;
    int b1 = d->training ? (int)((long)(g + 1) * d->B / G) : d->B;
    const float *mean = a->stats + 2 * (size_t)C * g, *rstd = mean + C;
    bn_grad_sums(sum_dy, sum_dyx, a, mean, rstd, b0, b1, r);
    /* Batch statistics depend on x (Ioffe & Szegedy eq. in sec. 3): with xhat = (x - m) rstd,
     *   dx = gamma rstd (dy - mean(dy) - xhat mean(dy xhat)).
     * In eval mode the statistics are constants and dx = gamma rstd dy. The sums are turned in place
     * into: sum_dy -> k0 = mean(dy), sum_dyx -> k1 = rstd^2 mean(dy (x - m)), after the parameter
     * gradients have taken what they need. */
    float inv_n = d->training ? 1.0f / (float)((size_t)(b1 - b0) * d->S) : 0.0f;
    for (int c = r.c0; c < r.c1; c++) {
      a->dbeta[c] += sum_dy[c];
      a->dgamma[c] += sum_dyx[c] * rstd[c];
      sum_dy[c] *= inv_n;
      sum_dyx[c] *= inv_n * rstd[c] * rstd[c];
    }
    if (a->dinp) bn_dx(a, mean, rstd, sum_dy, sum_dyx, b0, b1, r);
  }
}

static void bn_sync_grad_part(void *ctx, int part, int parts) {
  const bn_call *a = ctx;
  const bn_dims *d = a->d;
  bn_span r = bn_part_span(a, part, parts);
  int C = d->C;
  bn_grad_sums(a->ws, a->ws + C, a, a->stats, a->stats + C, 0, d->B, r);
  for (int c = r.c0; c < r.c1; c++) {
    d->sync[c] = a->ws[c];
    d->sync[C + c] = a->ws[C + c];
  }
}

static void bn_sync_dx_part(void *ctx, int part, int parts) {
  const bn_call *a = ctx;
  const bn_dims *d = a->d;
  int C = d->C;
  bn_dx(a, a->stats, a->stats + C, a->ws, a->ws + C, 0, d->B, bn_part_span(a, part, parts));
}

/* SyncBN's backward: dgamma and dbeta take this rank's sums (the gradient all-reduce adds the others');
 * dx needs mean(dy) and mean(dy xhat) over the world's batch. Each rank's dy is the gradient of its own
 * mean loss, N times its share of the global mean's; the same factor N scales dx, so the world's sums
 * over the world's count give dx in this rank's scale, and the averaged gradients equal one process's. */
static void bn_sync_backward(bn_call *a) {
  const bn_dims *d = a->d;
  int C = d->C, parts = bn_parts(d);
  const float *rstd = a->stats + C;
  par_run(parts, bn_sync_grad_part, a);
  for (int c = 0; c < C; c++) {
    a->dbeta[c] += a->ws[c];
    a->dgamma[c] += a->ws[C + c] * rstd[c];
  }
  if (!a->dinp) return;
  dist_sum_f64(d->sync, 2 * (size_t)C);
  double inv_n = 1.0 / ((double)d->B * d->S * dist_size());
  for (int c = 0; c < C; c++) {
    a->ws[c] = (float)(d->sync[c] * inv_n);
    a->ws[C + c] = (float)(d->sync[C + c] * inv_n) * rstd[c] * rstd[c];
  }
  par_run(parts, bn_sync_dx_part, a);
}

void batchnorm_backward(float *dinp, float *dgamma, float *dbeta, float *ws, const float *dout,
                        const float *inp, const float *gamma, const float *out, const float *saved,
                        const bn_dims *d) {
  bn_call a = {.dinp = dinp, .dgamma = dgamma, .dbeta = dbeta, .ws = ws, .inp = inp,
               .gamma = gamma, .y = out, .dout = dout, .stats = saved, .d = d};
  if (bn_synced(d))
    bn_sync_backward(&a);
  else
    par_run(bn_parts(d), bn_backward_part, &a);
}
