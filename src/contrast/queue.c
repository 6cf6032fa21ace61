#include "contrast/queue.h"

#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/tensor.h"

int queue_init(queue *q, int queue_size, int dim) {
  memset(q, 0, sizeof *q);
  if (queue_size <= 0 || dim <= 0)
    return moco_error(MOCO_EINVAL, "queue_init: queue_size %d, dim %d: both must be > 0", queue_size,
                      dim);
  size_t K = (size_t)queue_size;
  q->queue_size = queue_size;
  q->dim = dim;
  q->keys = tensor_calloc(K * (size_t)dim);
  q->ids = malloc(K * sizeof *q->ids);
  q->labels = malloc(K * sizeof *q->labels);
  q->steps = malloc(K * sizeof *q->steps);
  if (!q->keys || !q->ids || !q->labels || !q->steps) {
    queue_free(q);
    return moco_error(MOCO_ENOMEM, "queue_init: %d slots of dimension %d", queue_size, dim);
  }
  queue_reset(q);
  return 0;
}

void queue_free(queue *q) {
  tensor_free(q->keys);
  free(q->ids);
  free(q->labels);
  free(q->steps);
  memset(q, 0, sizeof *q);
}

void queue_reset(queue *q) {
  for (int i = 0; i < q->queue_size; i++) {
    q->ids[i] = -1;
    q->labels[i] = -1;
    q->steps[i] = -1;
  }
  q->ptr = 0;
  q->filled = 0;
}

/* Rows [from, from + n) of the batch into slots [slot, slot + n), which must not pass the end. */
static void write_run(queue *q, int slot, const float *keys, const int64_t *ids, const int32_t *labels,
                      int from, int n, int64_t step) {
  size_t d = (size_t)q->dim;
  memcpy(q->keys + (size_t)slot * d, keys + (size_t)from * d, (size_t)n * d * sizeof(float));
  for (int i = 0; i < n; i++) {
    q->ids[slot + i] = ids ? ids[from + i] : -1;
    q->labels[slot + i] = labels ? labels[from + i] : -1;
    q->steps[slot + i] = step;
  }
}

void queue_enqueue(queue *q, const float *keys, const int64_t *ids, const int32_t *labels, int B,
                   int64_t step) {
  int K = q->queue_size;
  if (B <= 0) return;
  /* Rows that would be overwritten within this same batch are skipped: only the last K survive. */
  int skip = B > K ? B - K : 0, n = B - skip;
  int slot = (int)(((int64_t)q->ptr + skip) % K);
  int first = n < K - slot ? n : K - slot;
  write_run(q, slot, keys, ids, labels, skip, first, step);
  if (first < n) write_run(q, 0, keys, ids, labels, skip + first, n - first, step);
  q->ptr = (int)(((int64_t)q->ptr + B) % K);
  q->filled = (int64_t)q->filled + B >= K ? K : q->filled + B;
}

void queue_save(const queue *q, blob_writer *w) {
  size_t K = (size_t)q->queue_size;
  blob_section_begin(w, "QUEU");
  blob_put_u32(w, (uint32_t)q->queue_size);
  blob_put_u32(w, (uint32_t)q->dim);
  blob_put_u32(w, (uint32_t)q->ptr);
  blob_put_u32(w, (uint32_t)q->filled);
  blob_put(w, q->keys, K * (size_t)q->dim * sizeof(float));
  blob_put(w, q->ids, K * sizeof *q->ids);
  blob_put(w, q->labels, K * sizeof *q->labels);
  blob_put(w, q->steps, K * sizeof *q->steps);
  blob_section_end(w);
}

int queue_load(queue *q, blob_reader *r) {
  blob_reader s;
  uint32_t K, d, ptr, filled;
  int rc;
  if ((rc = blob_section(r, "QUEU", &s))) return moco_error_wrap(rc, "queue");
  if ((rc = blob_get_u32(&s, &K)) || (rc = blob_get_u32(&s, &d)) || (rc = blob_get_u32(&s, &ptr)) ||
      (rc = blob_get_u32(&s, &filled)))
    return moco_error_wrap(rc, "queue");
  if (K != (uint32_t)q->queue_size || d != (uint32_t)q->dim)
    return moco_error(MOCO_ESHAPE, "queue: %s: saved queue_size %u dim %u, this queue has %d x %d",
                      s.name, K, d, q->queue_size, q->dim);
  if (filled > K || ptr >= K || (filled < K && ptr != filled))
    return moco_error(MOCO_EFORMAT, "queue: %s: offset %zu: ptr %u, filled %u inconsistent for %u slots",
                      s.name, s.base, ptr, filled, K);
  size_t n = K;
  /* Read into the live arrays only after the header passed; a truncated payload then leaves the
   * queue reset rather than half old, half new. */
  if ((rc = blob_get(&s, q->keys, n * d * sizeof(float))) ||
      (rc = blob_get(&s, q->ids, n * sizeof *q->ids)) ||
      (rc = blob_get(&s, q->labels, n * sizeof *q->labels)) ||
      (rc = blob_get(&s, q->steps, n * sizeof *q->steps))) {
    queue_reset(q);
    return moco_error_wrap(rc, "queue");
  }
  if (s.pos != s.len) {
    queue_reset(q);
    return moco_error(MOCO_EFORMAT, "queue: %s: offset %zu: %zu trailing bytes in section", s.name,
                      s.base + s.pos, s.len - s.pos);
  }
  q->ptr = (int)ptr;
  q->filled = (int)filled;
  return 0;
}
