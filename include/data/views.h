/* Views: what a stored sample becomes before the network sees it. In `augment` mode each sample gives
 * two independent random views (MoCo's query and key); in `pair` mode the two views are the record's own
 * two samples (query/positive document, caption/image features, two sensors), only normalised.
 *
 * Images (h*w > 1), one view, in order (each step with its probability *_p, parameters drawn uniformly
 * from [min, max]):
 *   random resized crop (area fraction crop_scale, aspect ratio crop_ratio drawn log-uniformly, resized
 *   back to H x W bilinearly: torchvision's RandomResizedCrop), horizontal flip, translation (up to
 *   translate_max of the width / height, zero fill), brightness (x * f), contrast ((x - m) * f + m, m the
 *   mean of the image's grey levels), and on 3-channel (RGB) images saturation (blend with the image's
 *   grey version: g + f (x - g)), hue (a shift by h of the HSV hue, h in [-hue_max, hue_max] turns of
 *   the colour wheel) and random grayscale (every channel set to the grey level), torchvision's
 *   ColorJitter and RandomGrayscale in that fixed order; Gaussian noise (std drawn per view); each of
 *   the colour steps and the noise clamped to [0, 1] for u8 data; normalisation; random erasing
 *   (Zhong et al. 2017: a rectangle of erase_scale of the area, ratio erase_ratio, set to 0 = the
 *   normalised mean). Grey levels are ITU-R BT.601 luma, 0.299 R + 0.587 G + 0.114 B, as torchvision's.
 *   The colour steps draw no random numbers for images of other channel counts, so their streams do not
 *   depend on these settings.
 * Vectors (d, 1, 1): SCARF feature masking (Bahri et al. 2022: a fraction mask_rate of the features,
 *   chosen uniformly, each replaced by that feature's value in another random sample of the batch, i.e. a
 *   draw from its empirical marginal), Gaussian noise, normalisation.
 *
 * Randomness: a view's generator is seeded from (seed, epoch, sample id, view index) alone, so views do
 * not depend on which thread made them or in which order. */
#ifndef MOCO_DATA_VIEWS_H
#define MOCO_DATA_VIEWS_H

#include <stddef.h>
#include <stdint.h>

#include "core/enum.h"
#include "core/rng.h"
#include "data/record.h"

typedef enum { VIEW_AUGMENT = 0, VIEW_PAIR = 1 } view_mode;

typedef struct {
  /* images */
  float crop_p, crop_scale_min, crop_scale_max, crop_ratio_min, crop_ratio_max;
  float flip_p;
  float translate_p, translate_max;
  float brightness_p, brightness_min, brightness_max;
  float contrast_p, contrast_min, contrast_max;
  /* RGB images */
  float saturation_p, saturation_min, saturation_max;
  float hue_p, hue_max;
  float grayscale_p;
  float erase_p, erase_scale_min, erase_scale_max, erase_ratio_min, erase_ratio_max;
  /* images and vectors */
  float noise_p, noise_std_min, noise_std_max;
  /* vectors */
  float mask_p, mask_rate_min, mask_rate_max;
} view_config;

/* data.mode: "augment", "pair". The views' values, defaults (MoCo v2's recipe scaled to small grey
 * images, SCARF's 60 % corruption) and ranges, min <= max pairs included, are the config's (views.*,
 * src/service/config.c). */
extern const enum_name view_mode_names[];

typedef struct {
  view_config cfg;
  view_mode mode;
  data_shape shape;
  data_dtype dtype;
  size_t n;            /* elements per sample */
  int image;           /* h * w > 1 */
  float *mean, *inv_std; /* per channel (per feature for vectors): shape.c values */
} view_pipeline;

/* norm_len is 0 (no normalisation), 1 (one mean/std for all) or shape.c (per channel / feature). */
int view_init(view_pipeline *v, const view_config *cfg, view_mode mode, data_shape shape, data_dtype dtype,
              int norm_len, const float *mean, const float *std);
void view_free(view_pipeline *v);

/* Per-thread workspace, sized once for the pipeline's sample size. */
typedef struct {
  float *tmp;
  uint32_t *idx;
  int *x0, *x1;   /* per output column: the two source columns of a resize, and the weight of x1 */
  float *fx;
} view_scratch;

int view_scratch_init(view_scratch *s, const view_pipeline *v);
void view_scratch_free(view_scratch *s);

/* n stored records `stride` bytes apart (a sample, then in pair data the second sample) to views:
 * view1, view2 are [n, C, H, W]. */
typedef struct {
  const uint8_t *raw;
  size_t stride;
  int n;
  const int64_t *ids;
  uint64_t seed, epoch;
} view_batch_in;

void view_batch(const view_pipeline *v, const view_batch_in *in, float *view1, float *view2, view_scratch *s);

/* Decodes and normalises one stored sample, no augmentation (evaluation, pair mode). */
void view_plain(const view_pipeline *v, const uint8_t *raw, float *out);

/* The pieces, public so tests can hold each to its bounds. */
typedef struct {
  int x, y, w, h;
} view_box;

void view_rng(rng_t *r, uint64_t seed, uint64_t epoch, int64_t id, int view);
/* A crop inside an H x W image: 1 <= w <= W, 1 <= h <= H, 0 <= x <= W - w, 0 <= y <= H - h. */
view_box view_crop_box(const view_config *c, int H, int W, rng_t *r);
/* The colour steps on one RGB image x [3, H*W] (hw pixels), clamped to [lo, hi]: saturation factor f,
 * hue shift h (turns), grayscale. */
void view_saturation(float *x, size_t hw, float f, float lo, float hi);
void view_hue(float *x, size_t hw, float h, float lo, float hi);
void view_grayscale(float *x, size_t hw);

/* Bilinear resize of box b of x [C, H, W] to out [C, H, W]; reads only pixels inside b. */
void view_resize_crop(const float *x, int C, int H, int W, view_box b, float *out, view_scratch *s);
/* One augmented view, normalised, of record i of the batch `in` (whose other records are SCARF's
 * donors). */
void view_augment(const view_pipeline *v, const view_batch_in *in, int i, float *out, rng_t *r,
                  view_scratch *s);

#endif
