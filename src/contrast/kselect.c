#include "contrast/kselect.h"

#include <string.h>

static inline void swapf(float *a, float *b) {
  float t = *a;
  *a = *b;
  *b = t;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* Moves the values of v[0..n) for which `above` holds (x > p, or x >= p with ge) to the front, in
 * order, and returns their number. Sixteen at a time: the values above are compressed into v at the
 * front's end, the others into scratch, which is copied back behind them. The full-vector store at
 * v + k only overwrites positions already read (k <= i), so it needs no slack in v; scratch has
 * KSELECT_SLACK. */
static inline int partition(float *v, int n, float p, float *scratch, int ge) {
  const __m512 pv = _mm512_set1_ps(p);
  const int pred = ge ? _CMP_GE_OQ : _CMP_GT_OQ;
  int k = 0, b = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    const __mmask16 up = _mm512_cmp_ps_mask(x, pv, pred);
    _mm512_storeu_ps(v + k, _mm512_maskz_compress_ps(up, x));
    _mm512_storeu_ps(scratch + b, _mm512_maskz_compress_ps((__mmask16)~up, x));
    const int c = __builtin_popcount(up);
    k += c;
    b += 16 - c;
  }
  if (i < n) { /* the tail: a masked load, and a store of exactly its values above */
    const __mmask16 t = (__mmask16)((1u << (n - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(t, v + i);
    const __mmask16 up = _mm512_mask_cmp_ps_mask(t, x, pv, pred);
    _mm512_mask_compressstoreu_ps(v + k, up, x);
    _mm512_storeu_ps(scratch + b, _mm512_maskz_compress_ps(t & (__mmask16)~up, x));
    const int c = __builtin_popcount(up);
    k += c;
    b += n - i - c;
  }
  memcpy(v + k, scratch, (size_t)b * sizeof *v);
  return k;
}
#else
/* Moves the values of v[0..n) for which `above` holds (x > p, or x >= p with ge) to the front and
 * returns their number. Branch-free (Lomuto with an unconditional swap): the comparisons of a
 * selection are unpredictable by nature, and a mispredicted branch per element would cost more than
 * the swap. Needs no scratch. */
static inline int partition(float *v, int n, float p, float *scratch, int ge) {
  (void)scratch;
  int k = 0;
  for (int i = 0; i < n; i++) {
    float x = v[i];
    v[i] = v[k];
    v[k] = x;
    k += ge ? x >= p : x > p;
  }
  return k;
}
#endif

static float median3(float a, float b, float c) {
  if (a > b) swapf(&a, &b);
  if (b > c) swapf(&b, &c);
  return a > b ? a : b;
}

/* Median of up to five values, by insertion sort. */
static float median5(float *v, int n) {
  for (int i = 1; i < n; i++)
    for (int j = i; j > 0 && v[j - 1] > v[j]; j--) swapf(&v[j - 1], &v[j]);
  return v[n / 2];
}

static float select_rank(float *v, int n, int r, int depth, float *scratch);

/* Median of medians of groups of five: a pivot with at least ~30% of the values on each side. The
 * group medians are moved to the front, which only reorders v. */
static float pivot_mom(float *v, int n, float *scratch) {
  int m = 0;
  for (int i = 0; i < n; i += 5) {
    int len = n - i < 5 ? n - i : 5;
    median5(v + i, len);
    swapf(&v[m++], &v[i + len / 2]);
  }
  return select_rank(v, m, m / 2, -1, scratch);
}

/* The value of descending rank r (0 = largest). depth counts down the lopsided partitions allowed
 * before switching to median-of-medians pivots; -1 means that switch has happened. */
static float select_rank(float *v, int n, int r, int depth, float *scratch) {
  for (;;) {
    if (n <= 5) {
      median5(v, n); /* ascending */
      for (int i = 0; i < n / 2; i++) swapf(&v[i], &v[n - 1 - i]);
      return v[r];
    }
    float p = depth < 0 || depth == 0 ? pivot_mom(v, n, scratch) : median3(v[0], v[n / 2], v[n - 1]);
    if (depth == 0) depth = -1;
    /* Descending three-way split: v[0..gt) > p, v[gt..eq) == p, v[eq..n) < p, the second half of it
     * only when the rank lies beyond gt. Equal keys end in the middle band, so runs of ties (common
     * in hand-built matrices and a saturated queue) end the recursion instead of degrading it. */
    int gt = partition(v, n, p, scratch, 0);
    if (r < gt) {
      if (depth > 0 && gt > n - n / 8) depth--; /* lopsided: fewer than 1/8 removed */
      n = gt;
      continue;
    }
    int eq = gt + partition(v + gt, n - gt, p, scratch, 1);
    if (r < eq) {
      return p;
    } else {
      if (depth > 0 && n - eq > n - n / 8) depth--;
      v += eq;
      r -= eq;
      n -= eq;
    }
  }
}

float kselect_largest(float *v, int n, int k, float *scratch) {
  int depth = 2;
  for (int m = n; m > 1; m >>= 1) depth++;
  return select_rank(v, n, k - 1, depth, scratch);
}
