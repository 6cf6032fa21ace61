#include "core/tensor.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/par.h"

/* One product, as cblas takes it; parts compute blocks of rows or of columns of C. */
typedef struct {
  float *C;
  const float *A, *B;
  int M, N, K, lda, ldb, ldc, ta, tb, split_rows;
  float alpha, beta;
} gemm_call;

/* Products split into parts of at least this many multiply-adds (about 50 us of one core): below it
 * a run's wake-ups would cost more than the second core saves. */
#define GEMM_MIN_PART ((long)1 << 21)

/* C[m0:m1, n0:n1] alone: the same K loop for every element whatever the split. */
static void gemm_block(const gemm_call *g, int m0, int m1, int n0, int n1) {
  if (m1 <= m0 || n1 <= n0) return;
  const float *A = g->A + (g->ta ? (size_t)m0 : (size_t)m0 * g->lda);
  const float *B = g->B + (g->tb ? (size_t)n0 * g->ldb : (size_t)n0);
  cblas_sgemm(CblasRowMajor, g->ta ? CblasTrans : CblasNoTrans, g->tb ? CblasTrans : CblasNoTrans,
              m1 - m0, n1 - n0, g->K, g->alpha, A, g->lda, B, g->ldb, g->beta,
              g->C + (size_t)m0 * g->ldc + n0, g->ldc);
}

static void gemm_part(void *ctx, int part, int parts) {
  const gemm_call *g = ctx;
  long lo, hi;
  par_range(g->split_rows ? g->M : g->N, part, parts, &lo, &hi);
  if (g->split_rows)
    gemm_block(g, (int)lo, (int)hi, 0, g->N);
  else
    gemm_block(g, 0, g->M, (int)lo, (int)hi);
}

/* OpenBLAS runs single-threaded (par_set_threads); a large product is split across the compute team
 * along its longer side of C. Inside a layer's parallel run it is already one part of many. */
void mat_mul_ld(float *C, int ldc, const float *A, int lda, const float *B, int ldb, int M, int N,
                int K, int ta, int tb, float alpha, float beta) {
  if (M == 0 || N == 0) return;
  gemm_call g = {.C = C, .A = A, .B = B, .M = M, .N = N, .K = K, .lda = lda, .ldb = ldb, .ldc = ldc,
                 .ta = ta, .tb = tb, .split_rows = M >= N, .alpha = alpha, .beta = beta};
  par_run(par_parts((long)M * N * K, GEMM_MIN_PART), gemm_part, &g);
}

void mat_mul(float *C, const float *A, const float *B, int M, int N, int K, int ta, int tb,
             float alpha, float beta) {
  mat_mul_ld(C, N, A, ta ? M : K, B, tb ? K : N, M, N, K, ta, tb, alpha, beta);
}

void mat_vec(float *y, const float *A, const float *x, int M, int N, int ta, float alpha, float beta) {
  if (ta)
    cblas_sgemv(CblasRowMajor, CblasTrans, N, M, alpha, A, M, x, 1, beta, y, 1);
  else
    cblas_sgemv(CblasRowMajor, CblasNoTrans, M, N, alpha, A, N, x, 1, beta, y, 1);
}

typedef struct {
  float *dst;
  const float *src;
  size_t n;
} copy_call;

static void copy_part(void *ctx, int part, int parts) {
  const copy_call *a = ctx;
  long lo, hi;
  par_range((long)a->n, part, parts, &lo, &hi);
  memcpy(a->dst + lo, a->src + lo, (size_t)(hi - lo) * sizeof(float));
}

void vec_copy(float *restrict dst, const float *restrict src, size_t n) {
  copy_call a = {dst, src, n};
  par_run(par_parts((long)n, PAR_MIN_FLOATS), copy_part, &a);
}

void vec_fill(float *x, float v, size_t n) {
  for (size_t i = 0; i < n; i++) x[i] = v;
}

void vec_scale(float *x, float a, size_t n) {
  for (size_t i = 0; i < n; i++) x[i] *= a;
}

/* Blocks of 16 with a constant trip count, which -O2 vectorises (packed_dq calls this per used entry
 * of a row), then the tail. */
void vec_axpy(float *restrict y, float a, const float *restrict x, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int u = 0; u < 16; u++) y[i + u] += a * x[i + u];
  for (; i < n; i++) y[i] += a * x[i];
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
