#include "data/views.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"

const enum_name view_mode_names[] = {{"augment", VIEW_AUGMENT}, {"pair", VIEW_PAIR}, {NULL, 0}};

int view_init(view_pipeline *v, const view_config *cfg, view_mode mode, data_shape shape, data_dtype dtype,
              int norm_len, const float *mean, const float *std) {
  memset(v, 0, sizeof *v);
  int C = shape.c;
  if (norm_len != 0 && norm_len != 1 && norm_len != C)
    return moco_error(MOCO_ECONFIG, "normalisation: %d mean/std values, expected 1 or %d (one per %s)",
                      norm_len, C, shape.h * shape.w > 1 ? "channel" : "feature");
  for (int i = 0; i < norm_len; i++)
    if (!isfinite(mean[i]) || !(std[i] > 0.0f) || !isfinite(std[i]))
      return moco_error(MOCO_ECONFIG, "normalisation[%d]: mean %g std %g, expected finite and std > 0", i,
                        mean[i], std[i]);
  v->cfg = *cfg;
  v->mode = mode;
  v->shape = shape;
  v->dtype = dtype;
  v->n = data_shape_size(shape);
  v->image = shape.h * shape.w > 1;
  v->mean = malloc((size_t)C * sizeof *v->mean);
  v->inv_std = malloc((size_t)C * sizeof *v->inv_std);
  if (!v->mean || !v->inv_std) {
    view_free(v);
    return moco_error(MOCO_ENOMEM, "normalisation for %d channels", C);
  }
  for (int c = 0; c < C; c++) {
    v->mean[c] = norm_len ? mean[norm_len == 1 ? 0 : c] : 0.0f;
    v->inv_std[c] = norm_len ? 1.0f / std[norm_len == 1 ? 0 : c] : 1.0f;
  }
  return 0;
}

void view_free(view_pipeline *v) {
  free(v->mean);
  free(v->inv_std);
  v->mean = v->inv_std = NULL;
}

int view_scratch_init(view_scratch *s, const view_pipeline *v) {
  size_t w = (size_t)v->shape.w;
  s->tmp = malloc(v->n * sizeof *s->tmp);
  s->idx = malloc(v->n * sizeof *s->idx);
  s->x0 = malloc(w * sizeof *s->x0);
  s->x1 = malloc(w * sizeof *s->x1);
  s->fx = malloc(w * sizeof *s->fx);
  if (s->tmp && s->idx && s->x0 && s->x1 && s->fx) return 0;
  view_scratch_free(s);
  return moco_error(MOCO_ENOMEM, "view scratch for %zu elements", v->n);
}

void view_scratch_free(view_scratch *s) {
  free(s->tmp);
  free(s->idx);
  free(s->x0);
  free(s->x1);
  free(s->fx);
  memset(s, 0, sizeof *s);
}

void view_rng(rng_t *r, uint64_t seed, uint64_t epoch, int64_t id, int view) {
  rng_init(r, seed + 0x9e3779b97f4a7c15ULL * (2 * epoch + (uint64_t)view + 1),
           RNG_STREAM_AUGMENT + (uint64_t)id);
}

static int iround(float x) { return (int)lrintf(x); }

/* Log-uniform draw: aspect ratios r and 1/r are equally likely. */
static float log_uniform(rng_t *r, float lo, float hi) { return expf(rng_range(r, logf(lo), logf(hi))); }

/* torchvision RandomResizedCrop.get_params: ten tries at the drawn area and ratio, then a centre crop
 * clamped to the allowed ratio. */
view_box view_crop_box(const view_config *c, int H, int W, rng_t *r) {
  float area = (float)H * W;
  for (int t = 0; t < 10; t++) {
    float target = area * rng_range(r, c->crop_scale_min, c->crop_scale_max);
    float ratio = log_uniform(r, c->crop_ratio_min, c->crop_ratio_max);
    int w = iround(sqrtf(target * ratio)), h = iround(sqrtf(target / ratio));
    if (w > 0 && w <= W && h > 0 && h <= H) {
      int y = (int)rng_below(r, (uint32_t)(H - h + 1)), x = (int)rng_below(r, (uint32_t)(W - w + 1));
      return (view_box){x, y, w, h};
    }
  }
  float in_ratio = (float)W / H;
  int w = W, h = H;
  if (in_ratio < c->crop_ratio_min)
    h = iround(w / c->crop_ratio_min);
  else if (in_ratio > c->crop_ratio_max)
    w = iround(h * c->crop_ratio_max);
  if (h < 1) h = 1;
  if (w < 1) w = 1;
  if (h > H) h = H;
  if (w > W) w = W;
  return (view_box){(W - w) / 2, (H - h) / 2, w, h};
}

/* Source coordinate of output pixel o for a span of n input pixels mapped onto N output pixels
 * (half-pixel centres, align_corners = false), clamped to the span so no pixel outside it is read. */
static void src_coord(int o, int n, int N, int *i0, int *i1, float *frac) {
  float s = ((float)o + 0.5f) * (float)n / (float)N - 0.5f;
  if (s < 0.0f) s = 0.0f;
  if (s > (float)(n - 1)) s = (float)(n - 1);
  int i = (int)s;
  *i0 = i;
  *i1 = i + 1 < n ? i + 1 : i;
  *frac = s - (float)i;
}

void view_resize_crop(const float *x, int C, int H, int W, view_box b, float *out, view_scratch *s) {
  for (int ox = 0; ox < W; ox++) {
    src_coord(ox, b.w, W, &s->x0[ox], &s->x1[ox], &s->fx[ox]);
    s->x0[ox] += b.x;
    s->x1[ox] += b.x;
  }
  for (int oy = 0; oy < H; oy++) {
    int y0, y1;
    float fy;
    src_coord(oy, b.h, H, &y0, &y1, &fy);
    for (int c = 0; c < C; c++) {
      const float *p = x + (size_t)c * H * W;
      const float *r0 = p + (size_t)(b.y + y0) * W, *r1 = p + (size_t)(b.y + y1) * W;
      float *o = out + ((size_t)c * H + oy) * W;
      for (int ox = 0; ox < W; ox++) {
        float f = s->fx[ox];
        float top = r0[s->x0[ox]] + (r0[s->x1[ox]] - r0[s->x0[ox]]) * f;
        float bot = r1[s->x0[ox]] + (r1[s->x1[ox]] - r1[s->x0[ox]]) * f;
        o[ox] = top + (bot - top) * fy;
      }
    }
  }
}

static void flip(float *x, int C, int H, int W) {
  for (int r = 0; r < C * H; r++) {
    float *row = x + (size_t)r * W;
    for (int i = 0, j = W - 1; i < j; i++, j--) {
      float t = row[i];
      row[i] = row[j];
      row[j] = t;
    }
  }
}

/* out[y][x] = in[y - dy][x - dx], zero where that falls outside. */
static void translate(const float *in, float *out, int C, int H, int W, int dx, int dy) {
  for (int c = 0; c < C; c++)
    for (int y = 0; y < H; y++) {
      float *o = out + ((size_t)c * H + y) * W;
      int sy = y - dy;
      for (int x = 0; x < W; x++) {
        int sx = x - dx;
        o[x] = sy >= 0 && sy < H && sx >= 0 && sx < W ? in[((size_t)c * H + sy) * W + sx] : 0.0f;
      }
    }
}

/* x = clamp(a * x + b, lo, hi): brightness, contrast, clamping and normalisation are all this. In blocks
 * of eight because -O2's vectoriser (GCC's "very cheap" cost model) takes no loop that needs a scalar
 * epilogue: each block becomes one vector operation, the tail stays scalar. The min/max are written as
 * the comparisons the vector min/max instructions implement. */
static void affine(float *x, size_t n, float a, float b, float lo, float hi) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; k++) {
      float v = x[i + k] * a + b;
      v = v > hi ? hi : v;
      x[i + k] = v < lo ? lo : v;
    }
  for (; i < n; i++) {
    float v = x[i] * a + b;
    v = v > hi ? hi : v;
    x[i] = v < lo ? lo : v;
  }
}

static void clamp(float *x, size_t n, float lo, float hi) { affine(x, n, 1.0f, 0.0f, lo, hi); }

/* Eight partial sums: a float reduction the compiler may vectorise without reordering a single sum. */
static float sum8(const float *x, size_t n) {
  float acc[8] = {0};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; k++) acc[k] += x[i + k];
  float s = 0.0f;
  for (; i < n; i++) s += x[i];
  for (int k = 0; k < 8; k++) s += acc[k];
  return s;
}

static void add_noise(const view_config *c, float *x, size_t n, rng_t *r) {
  float sd = rng_range(r, c->noise_std_min, c->noise_std_max);
  for (size_t i = 0; i < n; i++) x[i] += sd * rng_normal(r);
}

static void normalise(const view_pipeline *v, float *x) {
  size_t hw = (size_t)v->shape.h * v->shape.w;
  for (int c = 0; c < v->shape.c; c++)
    affine(x + c * hw, hw, v->inv_std[c], -v->mean[c] * v->inv_std[c], -INFINITY, INFINITY);
}

/* Random erasing (Zhong et al. 2017), applied after normalisation so 0 is the data mean. */
static void erase(const view_config *c, float *x, int C, int H, int W, rng_t *r) {
  if (rng_uniform(r) >= c->erase_p) return;
  float area = (float)H * W;
  for (int t = 0; t < 10; t++) {
    float target = area * rng_range(r, c->erase_scale_min, c->erase_scale_max);
    float ratio = log_uniform(r, c->erase_ratio_min, c->erase_ratio_max);
    int h = iround(sqrtf(target * ratio)), w = iround(sqrtf(target / ratio));
    if (h < 1 || w < 1 || h >= H || w >= W) continue;
    int y = (int)rng_below(r, (uint32_t)(H - h + 1)), x0 = (int)rng_below(r, (uint32_t)(W - w + 1));
    for (int ch = 0; ch < C; ch++)
      for (int yy = y; yy < y + h; yy++) memset(x + ((size_t)ch * H + yy) * W + x0, 0, (size_t)w * sizeof *x);
    return;
  }
}

/* BT.601 luma of pixel i of an RGB image [3, hw]. */
static inline float luma(const float *x, size_t hw, size_t i) {
  return 0.299f * x[i] + 0.587f * x[hw + i] + 0.114f * x[2 * hw + i];
}

/* The mean grey level: for one channel its mean, for RGB the luma's, which is the luma of the channel
 * means (torchvision's adjust_contrast takes the mean of the grayscale image). */
static float grey_mean(const float *x, int C, size_t hw) {
  if (C != 3) return sum8(x, (size_t)C * hw) / (float)((size_t)C * hw);
  return (0.299f * sum8(x, hw) + 0.587f * sum8(x + hw, hw) + 0.114f * sum8(x + 2 * hw, hw)) / (float)hw;
}

void view_saturation(float *x, size_t hw, float f, float lo, float hi) {
  for (size_t i = 0; i < hw; i++) {
    float g = luma(x, hw, i);
    for (int c = 0; c < 3; c++) {
      float v = g + f * (x[c * hw + i] - g);
      x[c * hw + i] = v < lo ? lo : v > hi ? hi : v;
    }
  }
}

void view_grayscale(float *x, size_t hw) {
  for (size_t i = 0; i < hw; i++) x[i] = x[hw + i] = x[2 * hw + i] = luma(x, hw, i);
}

/* One pixel: RGB -> HSV, hue + h (mod 1), back (torchvision's adjust_hue, which goes through HSV). */
static void hue_pixel(float *r, float *g, float *b, float h) {
  float mx = fmaxf(*r, fmaxf(*g, *b)), mn = fminf(*r, fminf(*g, *b)), d = mx - mn;
  if (d <= 0.0f || mx <= 0.0f) return; /* grey (or black): no hue to turn */
  float hue = mx == *r ? (*g - *b) / d : mx == *g ? 2.0f + (*b - *r) / d : 4.0f + (*r - *g) / d;
  hue = hue / 6.0f + h;
  hue -= floorf(hue);
  float s = d / mx, v = mx, hh = hue * 6.0f;
  int k = (int)hh % 6;
  float f = hh - floorf(hh), p = v * (1.0f - s), q = v * (1.0f - s * f), t = v * (1.0f - s * (1.0f - f));
  float rgb[6][3] = {{v, t, p}, {q, v, p}, {p, v, t}, {p, q, v}, {t, p, v}, {v, p, q}};
  *r = rgb[k][0], *g = rgb[k][1], *b = rgb[k][2];
}

void view_hue(float *x, size_t hw, float h, float lo, float hi) {
  for (size_t i = 0; i < hw; i++) {
    float *r = &x[i], *g = &x[hw + i], *b = &x[2 * hw + i];
    hue_pixel(r, g, b, h);
    for (int c = 0; c < 3; c++) {
      float *v = &x[c * hw + i];
      *v = *v < lo ? lo : *v > hi ? hi : *v;
    }
  }
}

/* Brightness then contrast, as torchvision's ColorJitter blends them: each result clamped to [0, 1]
 * for u8 data (the range of a pixel); contrast pulls towards the mean grey level of the brightened
 * image. Then, for RGB images only, saturation, hue and random grayscale. One pass each, since this is
 * the hot loop of the pipeline. */
static void jitter(const view_config *c, float *x, int C, size_t hw, int bounded, rng_t *r) {
  size_t n = (size_t)C * hw;
  int bright = rng_uniform(r) < c->brightness_p;
  float fb = bright ? rng_range(r, c->brightness_min, c->brightness_max) : 1.0f;
  int contrast = rng_uniform(r) < c->contrast_p;
  float fc = contrast ? rng_range(r, c->contrast_min, c->contrast_max) : 1.0f;
  float lo = bounded ? 0.0f : -INFINITY, hi = bounded ? 1.0f : INFINITY;
  if (bright) affine(x, n, fb, 0.0f, lo, hi);
  if (contrast) {
    float m = grey_mean(x, C, hw);
    affine(x, n, fc, m * (1.0f - fc), lo, hi);
  }
  if (C != 3) return;
  if (rng_uniform(r) < c->saturation_p) view_saturation(x, hw, rng_range(r, c->saturation_min, c->saturation_max), lo, hi);
  if (rng_uniform(r) < c->hue_p) view_hue(x, hw, rng_range(r, -c->hue_max, c->hue_max), lo, hi);
  if (rng_uniform(r) < c->grayscale_p) view_grayscale(x, hw);
}

static void augment_image(const view_pipeline *v, const uint8_t *raw, float *out, rng_t *r, view_scratch *s) {
  const view_config *c = &v->cfg;
  int C = v->shape.c, H = v->shape.h, W = v->shape.w;
  size_t n = v->n;
  /* u8 pixels live in [0, 1] once decoded; crops and flips keep them there (convex combinations), jitter
   * and noise are clamped back. f32 data has no known range, so it is not clamped. */
  int bounded = v->dtype == DATA_U8;
  if (rng_uniform(r) < c->crop_p) {
    data_decode(v->dtype, raw, s->tmp, n);
    view_resize_crop(s->tmp, C, H, W, view_crop_box(c, H, W, r), out, s);
  } else {
    data_decode(v->dtype, raw, out, n);
  }
  if (rng_uniform(r) < c->flip_p) flip(out, C, H, W);
  if (rng_uniform(r) < c->translate_p) {
    int dx = iround(rng_range(r, -c->translate_max, c->translate_max) * W);
    int dy = iround(rng_range(r, -c->translate_max, c->translate_max) * H);
    memcpy(s->tmp, out, n * sizeof *out);
    translate(s->tmp, out, C, H, W, dx, dy);
  }
  jitter(c, out, C, (size_t)H * W, bounded, r);
  if (rng_uniform(r) < c->noise_p) {
    add_noise(c, out, n, r);
    if (bounded) clamp(out, n, 0.0f, 1.0f);
  }
  normalise(v, out);
  erase(c, out, C, H, W, r);
}

/* SCARF: q = rate * d features chosen without replacement (partial Fisher-Yates), each taken from a
 * uniformly drawn other sample of the batch. */
static void augment_vector(const view_pipeline *v, const view_batch_in *in, int i, float *out, rng_t *r,
                           view_scratch *s) {
  const view_config *c = &v->cfg;
  size_t n = v->n;
  data_decode(v->dtype, in->raw + (size_t)i * in->stride, out, n);
  if (rng_uniform(r) < c->mask_p && in->n > 1) {
    size_t q = (size_t)lrintf(rng_range(r, c->mask_rate_min, c->mask_rate_max) * (float)n);
    if (q > n) q = n;
    for (size_t k = 0; k < n; k++) s->idx[k] = (uint32_t)k;
    for (size_t k = 0; k < q; k++) {
      size_t j = k + rng_below(r, (uint32_t)(n - k));
      uint32_t f = s->idx[j];
      s->idx[j] = s->idx[k];
      s->idx[k] = f;
      uint32_t d = rng_below(r, (uint32_t)in->n - 1);
      if ((int)d >= i) d++;
      out[f] = data_decode_at(v->dtype, in->raw + (size_t)d * in->stride, f);
    }
  }
  if (rng_uniform(r) < c->noise_p) {
    add_noise(c, out, n, r);
    if (v->dtype == DATA_U8) clamp(out, n, 0.0f, 1.0f);
  }
  normalise(v, out);
}

void view_augment(const view_pipeline *v, const view_batch_in *in, int i, float *out, rng_t *r,
                  view_scratch *s) {
  if (v->image)
    augment_image(v, in->raw + (size_t)i * in->stride, out, r, s);
  else
    augment_vector(v, in, i, out, r, s);
}

void view_plain(const view_pipeline *v, const uint8_t *raw, float *out) {
  data_decode(v->dtype, raw, out, v->n);
  normalise(v, out);
}

void view_batch(const view_pipeline *v, const view_batch_in *in, float *view1, float *view2, view_scratch *s) {
  size_t sb = v->n * data_dtype_size(v->dtype);
  for (int i = 0; i < in->n; i++) {
    const uint8_t *raw = in->raw + (size_t)i * in->stride;
    float *o1 = view1 + (size_t)i * v->n, *o2 = view2 + (size_t)i * v->n;
    if (v->mode == VIEW_PAIR) {
      view_plain(v, raw, o1);
      view_plain(v, raw + sb, o2);
      continue;
    }
    rng_t r;
    view_rng(&r, in->seed, in->epoch, in->ids[i], 0);
    view_augment(v, in, i, o1, &r, s);
    view_rng(&r, in->seed, in->epoch, in->ids[i], 1);
    view_augment(v, in, i, o2, &r, s);
  }
}
