/* The float32 tensor convention: a tensor is a plain `float *` with its shape carried by the caller,
 * row-major, batch first (a batch of images is [B, C, H, W]; of vectors [B, D]). These helpers are the
 * only place where matrix products happen, and every one of them goes through cblas. */
#ifndef MOCO_CORE_TENSOR_H
#define MOCO_CORE_TENSOR_H

#include <stddef.h>

/* C[M,N] = alpha * op(A) · op(B) + beta * C, row-major; op(A) is [M,K], op(B) is [K,N].
 * ta/tb: 0 to use A/B as stored ([M,K] / [K,N]), 1 to use their transposes (stored [K,M] / [N,K]). */
void mat_mul(float *C, const float *A, const float *B, int M, int N, int K, int ta, int tb,
             float alpha, float beta);
/* mat_mul with explicit row strides (leading dimensions) of C, A and B, for products into or out of a
 * block of columns of a wider matrix: the step writes Q·queueᵀ, Q·keysᵀ and Q·bankᵀ side by side
 * into one [B, C] similarity matrix (ldc = C). */
void mat_mul_ld(float *C, int ldc, const float *A, int lda, const float *B, int ldb, int M, int N,
                int K, int ta, int tb, float alpha, float beta);

/* y[M] = alpha * op(A) · x + beta * y; A stored [M,N] (ta = 0) or [N,M] (ta = 1). */
void mat_vec(float *y, const float *A, const float *x, int M, int N, int ta, float alpha, float beta);

void vec_fill(float *x, float v, size_t n);
/* dst[0..n) = src[0..n), not overlapping; split over the compute team when n is large (a batch of
 * inputs is a megabyte, copied on one core otherwise). */
void vec_copy(float *restrict dst, const float *restrict src, size_t n);
void vec_scale(float *x, float a, size_t n);
/* y += a * x; y and x do not overlap. */
void vec_axpy(float *restrict y, float a, const float *restrict x, size_t n);
float vec_dot(const float *x, const float *y, size_t n);
/* Rescales x to unit L2 norm (a zero vector stays zero); returns the norm before scaling. */
float vec_normalize(float *x, size_t n);

/* Starts loading the cache lines of x[0..n) ahead of a use: for rows read at scattered addresses
 * (queue keys picked by mining), which the hardware prefetchers cannot guess. */
static inline void prefetch_floats(const float *x, size_t n) {
  for (const float *p = x, *end = x + n; p < end; p += 16) __builtin_prefetch(p);
}

/* 64-byte aligned allocation so vector loops and BLAS see aligned rows; free with tensor_free. */
float *tensor_alloc(size_t n);
float *tensor_calloc(size_t n);
void tensor_free(float *p);

#endif
