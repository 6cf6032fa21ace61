/* Image files for mocopack's `images` command: PNG (libpng) and JPEG (libjpeg-turbo), told apart by their
 * magic, decoded to RGB, resized so that the shorter side is `size` and centre-cropped to size x size
 * (torchvision's Resize(size) + CenterCrop(size)), then kept as RGB or turned grey with BT.601 luma
 * (0.299 R + 0.587 G + 0.114 B, as PIL's convert("L")), as u8 planes (C, size, size).
 *
 * Resampling is PIL's antialiased bilinear: a triangle filter whose radius grows with the reduction,
 * so a photo shrunk to 32 x 32 averages its pixels instead of skipping them. A file that does not
 * decode (bad magic, a corrupt or truncated stream, which libjpeg only warns about) is an error naming
 * the file and the decoder's reason; nothing is written for it. */
#ifndef MOCO_DATA_IMAGE_H
#define MOCO_DATA_IMAGE_H

#include <stddef.h>
#include <stdint.h>

/* Sizes beyond this are no image a camera makes: a header claiming more is corrupt. */
#define IMAGE_MAX_SIDE 65536

/* 1 when the name ends in .png, .jpg or .jpeg (any case): the files an image folder holds. */
int image_is_candidate(const char *name);

/* Decodes path into out [channels, size, size] (channels 1 or 3). */
int image_load(const char *path, int size, int channels, uint8_t *out);

/* The resampling alone, on an RGB image rgb [h, w, 3] (interleaved, as decoders give it): for tests. */
int image_resize_crop(const uint8_t *rgb, int w, int h, int size, int channels, uint8_t *out);

#endif
