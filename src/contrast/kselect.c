#include "contrast/kselect.h"

static inline void swapf(float *a, float *b) {
  float t = *a;
  *a = *b;
  *b = t;
}

/* Moves the values of v[0..n) for which `above` holds (x > p, or x >= p) to the front and returns
 * their number. Branch-free (Lomuto with an unconditional swap): the comparisons of a selection are
 * unpredictable by nature, and a mispredicted branch per element would cost more than the swap. */
static int partition_gt(float *v, int n, float p) {
  int k = 0;
  for (int i = 0; i < n; i++) {
    float x = v[i];
    v[i] = v[k];
    v[k] = x;
    k += x > p;
  }
  return k;
}

static int partition_ge(float *v, int n, float p) {
  int k = 0;
  for (int i = 0; i < n; i++) {
    float x = v[i];
    v[i] = v[k];
    v[k] = x;
    k += x >= p;
  }
  return k;
}

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

static float select_rank(float *v, int n, int r, int depth);

/* Median of medians of groups of five: a pivot with at least ~30% of the values on each side. The
 * group medians are moved to the front, which only reorders v. */
static float pivot_mom(float *v, int n) {
  int m = 0;
  for (int i = 0; i < n; i += 5) {
    int len = n - i < 5 ? n - i : 5;
    median5(v + i, len);
    swapf(&v[m++], &v[i + len / 2]);
  }
  return select_rank(v, m, m / 2, -1);
}

/* The value of descending rank r (0 = largest). depth counts down the lopsided partitions allowed
 * before switching to median-of-medians pivots; -1 means that switch has happened. */
static float select_rank(float *v, int n, int r, int depth) {
  for (;;) {
    if (n <= 5) {
      median5(v, n); /* ascending */
      for (int i = 0; i < n / 2; i++) swapf(&v[i], &v[n - 1 - i]);
      return v[r];
    }
    float p = depth < 0 || depth == 0 ? pivot_mom(v, n) : median3(v[0], v[n / 2], v[n - 1]);
    if (depth == 0) depth = -1;
    /* Descending three-way split: v[0..gt) > p, v[gt..eq) == p, v[eq..n) < p, the second half of it
     * only when the rank lies beyond gt. Equal keys end in the middle band, so runs of ties (common
     * in hand-built matrices and a saturated queue) end the recursion instead of degrading it. */
    int gt = partition_gt(v, n, p);
    if (r < gt) {
      if (depth > 0 && gt > n - n / 8) depth--; /* lopsided: fewer than 1/8 removed */
      n = gt;
      continue;
    }
    int eq = gt + partition_ge(v + gt, n - gt, p);
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

float kselect_largest(float *v, int n, int k) {
  int depth = 2;
  for (int m = n; m > 1; m >>= 1) depth++;
  return select_rank(v, n, k - 1, depth);
}
