/* k-th element selection in O(n): introselect (Musser 1997) — quickselect with a median-of-three
 * pivot, falling back to the median of medians (Blum et al. 1973) when partitions stay lopsided, so
 * the worst case stays linear. Mining calls it on a row's gathered candidates every step, where a
 * full sort would cost O(n log n). NaN must not be passed (the callers never gather one). */
#ifndef MOCO_CONTRAST_KSELECT_H
#define MOCO_CONTRAST_KSELECT_H

/* Floats of scratch past n that kselect_largest may write. */
enum { KSELECT_SLACK = 16 };

/* Reorders v[0..n) so that v[0..k) hold the k largest values (in no particular order) and returns the
 * k-th largest, v[k-1]. 1 <= k <= n. scratch: n + KSELECT_SLACK floats, not overlapping v, for the
 * partitions (AVX-512 partitions out of place, sixteen values at a time). */
float kselect_largest(float *v, int n, int k, float *scratch);

#endif
