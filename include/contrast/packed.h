/* A selection's used columns, packed row by row.
 *
 * Most strategies use few of a row's C columns (hardest with n = 1024 of a 65536-key queue uses one in
 * 64), yet the loss and the query gradient dq = dS·candidates over the dense [R, C] matrices cost O(C)
 * per row whatever the mask says. Packed, each row holds only its used entries (mask != MINE_OFF), in
 * column order, so the same loss functions run on [R, W] with W ≈ n and the gradient gathers n keys
 * instead of multiplying by all K. Column order is kept so that every loss sees its entries in the
 * order the dense row has them (the triplet loss's "first on ties" picks the same column).
 *
 *   S, mask  [R, W]  each row's used entries, then MINE_OFF with S = 0 up to W
 *   dS       [R, W]  the loss gradient on those entries, written by the caller's loss
 *   col      [R, W]  the column in the dense layout of each used entry (-1 past `used`)
 *   used     [R]
 *
 * W is the most entries any row of the packed block uses, rounded up to PACKED_ALIGN, so the loss
 * scans no more than it must; storage is allocated once for `rows` rows of up to `cap` entries. */
#ifndef MOCO_CONTRAST_PACKED_H
#define MOCO_CONTRAST_PACKED_H

#include <stdint.h>

enum { PACKED_ALIGN = 16 };

typedef struct {
  int rows, cap;    /* storage: rows of up to cap entries */
  float *S, *dS;    /* [rows, cap] */
  uint8_t *mask;    /* [rows, cap] */
  int32_t *col;     /* [rows, cap] */
  int32_t *used;    /* [rows] */
} packed;

/* A packed block of R rows with row stride W, inside a packed's storage (W <= cap). */
typedef struct {
  int R, W;
  float *S, *dS;
  uint8_t *mask;
  int32_t *col, *used;
} packed_rows;

/* The capacity worth packing for rows of C columns: past about one column in 16 a gather per used
 * entry costs more than the dense products over all of them. At least min(C, 256) so that small
 * problems (tests, tiny queues) always pack. */
int packed_cap_for(int C);

int packed_init(packed *p, int rows, int cap);
void packed_free(packed *p);

/* Packs rows [r0, r0 + R) of S, mask [.., C] into the storage of those rows and describes them in
 * *out. Returns 0, or MOCO_ERANGE when some row uses more than cap columns: the caller then stays
 * dense for these rows (nothing else is wrong, *out is not usable). */
int packed_gather(packed *p, const float *S, const uint8_t *mask, int r0, int R, int C,
                  packed_rows *out);

/* dq [R, d] += alpha · Σ_j dS[i, j] · key(col[i, j]) over each row's used entries: the transpose of
 * the similarity products, restricted to the packed columns. Column c < K is row c of queue_keys
 * [K, d]; c >= batch_off is row c − batch_off of batch_keys (the block's own in-batch keys). */
void packed_dq(const packed_rows *pr, float alpha, const float *queue_keys, int K,
               const float *batch_keys, int batch_off, int d, float *dq);

#endif
