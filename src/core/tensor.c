#include "core/tensor.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void mat_mul(float *C, const float *A, const float *B, int M, int N, int K, int ta, int tb,
             float alpha, float beta) {
  if (M == 0 || N == 0) return;
  int lda = ta ? M : K, ldb = tb ? K : N;
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K,
              alpha, A, lda, B, ldb, beta, C, N);
}

void mat_mul_ld(float *C, int ldc, const float *A, int lda, const float *B, int ldb, int M, int N,
                int K, int ta, int tb, float alpha, float beta) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K,
              alpha, A, lda, B, ldb, beta, C, ldc);
}

void mat_vec(float *y, const float *A, const float *x, int M, int N, int ta, float alpha, float beta) {
  if (ta)
    cblas_sgemv(CblasRowMajor, CblasTrans, N, M, alpha, A, M, x, 1, beta, y, 1);
  else
    cblas_sgemv(CblasRowMajor, CblasNoTrans, M, N, alpha, A, N, x, 1, beta, y, 1);
}

void vec_fill(float *x, float v, size_t n) {
  for (size_t i = 0; i < n; i++) x[i] = v;
}

void vec_scale(float *x, float a, size_t n) {
  for (size_t i = 0; i < n; i++) x[i] *= a;
}

void vec_axpy(float *y, float a, const float *x, size_t n) {
  for (size_t i = 0; i < n; i++) y[i] += a * x[i];
}

float vec_dot(const float *x, const float *y, size_t n) {
  float s = 0.0f;
  for (size_t i = 0; i < n; i++) s += x[i] * y[i];
  return s;
}

float vec_normalize(float *x, size_t n) {
  float norm = sqrtf(vec_dot(x, x, n));
  if (norm > 0.0f) vec_scale(x, 1.0f / norm, n);
  return norm;
}

float *tensor_alloc(size_t n) {
  size_t bytes = (n * sizeof(float) + 63) & ~(size_t)63;
  return aligned_alloc(64, bytes ? bytes : 64);
}

float *tensor_calloc(size_t n) {
  float *p = tensor_alloc(n);
  if (p) memset(p, 0, n * sizeof(float));
  return p;
}

void tensor_free(float *p) { free(p); }
