#include "data/image.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <png.h>

#include "core/err.h"

int image_is_candidate(const char *name) {
  const char *dot = strrchr(name, '.');
  if (!dot) return 0;
  char ext[8] = {0};
  for (int i = 0; i < 7 && dot[1 + i]; i++) ext[i] = (char)tolower((unsigned char)dot[1 + i]);
  return !strcmp(ext, "png") || !strcmp(ext, "jpg") || !strcmp(ext, "jpeg");
}

/* ---- decoding to RGB [h, w, 3] ---- */

static int decode_png(const char *path, uint8_t **rgb, int *w, int *h) {
  png_image img;
  memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&img, path))
    return moco_error(MOCO_EFORMAT, "%s: PNG does not decode: %s", path, img.message);
  if (img.width > IMAGE_MAX_SIDE || img.height > IMAGE_MAX_SIDE) {
    png_image_free(&img);
    return moco_error(MOCO_EFORMAT, "%s: PNG of %ux%u pixels, at most %d a side", path, img.width, img.height,
                      IMAGE_MAX_SIDE);
  }
  img.format = PNG_FORMAT_RGB;
  *w = (int)img.width, *h = (int)img.height;
  if (!(*rgb = malloc(PNG_IMAGE_SIZE(img)))) {
    png_image_free(&img);
    return moco_error(MOCO_ENOMEM, "%s: %dx%d pixels", path, *w, *h);
  }
  if (!png_image_finish_read(&img, NULL, *rgb, 0, NULL)) {
    free(*rgb);
    *rgb = NULL;
    return moco_error(MOCO_EFORMAT, "%s: PNG does not decode: %s", path, img.message);
  }
  return 0;
}

typedef struct {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char msg[JMSG_LENGTH_MAX];
} jpeg_err;

static void jpeg_fail(j_common_ptr c) {
  jpeg_err *e = (jpeg_err *)c->err;
  (*c->err->format_message)(c, e->msg);
  longjmp(e->jump, 1);
}

/* libjpeg only warns about corrupt or truncated data and fills in grey: here that is a failure. */
static void jpeg_message(j_common_ptr c, int level) {
  if (level < 0) jpeg_fail(c);
}

static int decode_jpeg(const char *path, FILE *f, uint8_t **rgb, int *w, int *h) {
  struct jpeg_decompress_struct d;
  jpeg_err e;
  d.err = jpeg_std_error(&e.pub);
  e.pub.error_exit = jpeg_fail;
  e.pub.emit_message = jpeg_message;
  /* volatile: read after a longjmp out of libjpeg */
  uint8_t *volatile buf = NULL;
  if (setjmp(e.jump)) {
    jpeg_destroy_decompress(&d);
    free(buf);
    return moco_error(MOCO_EFORMAT, "%s: JPEG does not decode: %s", path, e.msg);
  }
  jpeg_create_decompress(&d);
  jpeg_stdio_src(&d, f);
  jpeg_read_header(&d, TRUE);
  d.out_color_space = JCS_RGB;
  jpeg_start_decompress(&d);
  if (d.output_width > IMAGE_MAX_SIDE || d.output_height > IMAGE_MAX_SIDE || d.output_components != 3) {
    snprintf(e.msg, sizeof e.msg, "%ux%u pixels of %d components, expected at most %d a side and RGB",
             d.output_width, d.output_height, d.output_components, IMAGE_MAX_SIDE);
    longjmp(e.jump, 1);
  }
  *w = (int)d.output_width, *h = (int)d.output_height;
  if (!(buf = malloc((size_t)*w * *h * 3))) {
    snprintf(e.msg, sizeof e.msg, "out of memory for %dx%d pixels", *w, *h);
    longjmp(e.jump, 1);
  }
  while (d.output_scanline < d.output_height) {
    JSAMPROW row = buf + (size_t)d.output_scanline * *w * 3;
    jpeg_read_scanlines(&d, &row, 1);
  }
  jpeg_finish_decompress(&d);
  jpeg_destroy_decompress(&d);
  *rgb = buf;
  return 0;
}

static int decode(const char *path, uint8_t **rgb, int *w, int *h) {
  FILE *f = fopen(path, "rb");
  if (!f) return moco_error(errno == ENOENT ? MOCO_ENOENT : MOCO_EIO, "%s: cannot open: %s", path, strerror(errno));
  uint8_t m[8] = {0};
  size_t n = fread(m, 1, sizeof m, f);
  rewind(f);
  int rc;
  if (n == 8 && !memcmp(m, "\x89PNG\r\n\x1a\n", 8)) {
    fclose(f);
    rc = decode_png(path, rgb, w, h);
  } else if (n >= 3 && m[0] == 0xff && m[1] == 0xd8 && m[2] == 0xff) {
    rc = decode_jpeg(path, f, rgb, w, h);
    fclose(f);
  } else {
    fclose(f);
    rc = moco_error(MOCO_EFORMAT, "%s: offset 0: neither PNG (89 'PNG') nor JPEG (ff d8 ff): %02x %02x %02x %02x",
                    path, m[0], m[1], m[2], m[3]);
  }
  return rc;
}

/* ---- resampling ---- */

/* Source taps of each output pixel along one axis: output o of N covers source pixels [lo, lo + n) of
 * the n_src, weighted by a triangle of radius max(scale, 1) around its centre, normalised to sum 1. */
typedef struct {
  int *lo, *n;
  float *w;
  int taps;
} axis_taps;

static int taps_init(axis_taps *t, int n_src, int N, int first, int count) {
  double scale = (double)n_src / N, support = scale > 1 ? scale : 1;
  t->taps = (int)ceil(support) * 2 + 1;
  t->lo = malloc((size_t)count * sizeof *t->lo);
  t->n = malloc((size_t)count * sizeof *t->n);
  t->w = malloc((size_t)count * t->taps * sizeof *t->w);
  if (!t->lo || !t->n || !t->w) return MOCO_ENOMEM;
  for (int k = 0; k < count; k++) {
    double c = (first + k + 0.5) * scale;
    int lo = (int)floor(c - support), hi = (int)ceil(c + support);
    if (lo < 0) lo = 0;
    if (hi > n_src) hi = n_src;
    if (hi - lo > t->taps) hi = lo + t->taps;
    double sum = 0;
    float *w = t->w + (size_t)k * t->taps;
    for (int j = lo; j < hi; j++) sum += w[j - lo] = (float)fmax(0.0, 1.0 - fabs(j + 0.5 - c) / support);
    for (int j = lo; j < hi; j++) w[j - lo] = sum > 0 ? (float)(w[j - lo] / sum) : 1.0f / (float)(hi - lo);
    t->lo[k] = lo;
    t->n[k] = hi - lo;
  }
  return 0;
}

static void taps_free(axis_taps *t) {
  free(t->lo);
  free(t->n);
  free(t->w);
}

static uint8_t to_u8(float v) { return (uint8_t)(v <= 0 ? 0 : v >= 255 ? 255 : lrintf(v)); }

int image_resize_crop(const uint8_t *rgb, int w, int h, int size, int channels, uint8_t *out) {
  /* shorter side to size, the other in proportion (rounded, as torchvision), then the centre square */
  int nw = w <= h ? size : (int)lround((double)w * size / h), nh = h <= w ? size : (int)lround((double)h * size / w);
  if (nw < size) nw = size;
  if (nh < size) nh = size;
  int x0 = (int)lround((nw - size) / 2.0), y0 = (int)lround((nh - size) / 2.0);
  axis_taps tx = {0}, ty = {0};
  float *tmp = malloc((size_t)h * size * 3 * sizeof *tmp);
  int rc = tmp && !taps_init(&tx, w, nw, x0, size) && !taps_init(&ty, h, nh, y0, size) ? 0 : MOCO_ENOMEM;
  if (!rc) {
    for (int y = 0; y < h; y++) /* horizontal pass: every source row, only the crop's columns */
      for (int x = 0; x < size; x++) {
        const float *wt = tx.w + (size_t)x * tx.taps;
        const uint8_t *p = rgb + ((size_t)y * w + tx.lo[x]) * 3;
        float acc[3] = {0, 0, 0};
        for (int j = 0; j < tx.n[x]; j++)
          for (int c = 0; c < 3; c++) acc[c] += wt[j] * p[3 * j + c];
        for (int c = 0; c < 3; c++) tmp[((size_t)y * size + x) * 3 + c] = acc[c];
      }
    for (int y = 0; y < size; y++) /* vertical pass: only the crop's rows */
      for (int x = 0; x < size; x++) {
        const float *wt = ty.w + (size_t)y * ty.taps;
        float acc[3] = {0, 0, 0};
        for (int j = 0; j < ty.n[y]; j++)
          for (int c = 0; c < 3; c++) acc[c] += wt[j] * tmp[((size_t)(ty.lo[y] + j) * size + x) * 3 + c];
        size_t o = (size_t)y * size + x, plane = (size_t)size * size;
        if (channels == 1)
          out[o] = to_u8(0.299f * to_u8(acc[0]) + 0.587f * to_u8(acc[1]) + 0.114f * to_u8(acc[2]));
        else
          for (int c = 0; c < 3; c++) out[c * plane + o] = to_u8(acc[c]);
      }
  }
  taps_free(&tx);
  taps_free(&ty);
  free(tmp);
  return rc ? moco_error(rc, "resizing %dx%d to %d", w, h, size) : 0;
}

int image_load(const char *path, int size, int channels, uint8_t *out) {
  uint8_t *rgb = NULL;
  int w = 0, h = 0;
  int rc = decode(path, &rgb, &w, &h);
  if (!rc) rc = image_resize_crop(rgb, w, h, size, channels, out);
  free(rgb);
  return rc;
}
