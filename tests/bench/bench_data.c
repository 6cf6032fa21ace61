/* The data pipeline's throughput and memory. Prints figures; judges nothing.
 *
 * 1. Fashion-MNIST (60,000 28x28 images, gzip IDX from dataset-fashion-mnist): samples/s through the
 *    whole pipeline (read, shuffle buffer of 10,000, two augmented views with the default recipe,
 *    normalisation), with 1 and 2 workers, against the default training step's appetite of 256 samples
 *    per ~20 ms.
 * 2. Memory: a packed set of >= 1 GB (3x32x32 u8 images, CIFAR-sized) generated in /tmp, streamed once
 *    with a 10,000-record shuffle buffer; peak RSS after 10 % and after 100 % of it shows whether memory
 *    grows with the data. The set is deleted afterwards.
 *
 * MOCOD_BENCH_GB (default 1.05) sets the size of the generated set. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "core/err.h"
#include "data/loader.h"
#include "data/shard.h"
#include "../testutil.h"
#include "service/config.h"

#define FMNIST "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"

/* Resets the peak-RSS mark (VmHWM) so each phase reports its own peak. */
static void reset_peak(void) {
  FILE *f = fopen("/proc/self/clear_refs", "w");
  if (f) {
    fputs("5", f);
    fclose(f);
  }
}

static int stream(const loader_config *c, uint64_t samples, double *rate, double *wait) {
  loader l;
  int rc = loader_open(&l, c);
  if (rc) return rc;
  double t0 = clock_now();
  uint64_t n = 0;
  loader_batch b;
  volatile float sink = 0;
  while (n < samples && !(rc = loader_next(&l, &b)) && b.size) {
    sink += b.view1[0] + b.view2[b.size - 1];
    n += (uint64_t)b.size;
  }
  double t = clock_now() - t0;
  *rate = (double)n / t;
  *wait = loader_wait_seconds(&l) / t;
  loader_close(&l);
  return rc;
}

static void bench_fmnist(void) {
  static const float mean[1] = {0.2860f}, std[1] = {0.3530f};
  loader_config c;
  c = config_defaults()->trainer.loader;
  c.train = FMNIST;
  c.norm_len = 1;
  c.mean = mean;
  c.std = std;
  const double need = 256.0 / 0.020; /* the default step: 256 samples per ~20 ms */
  printf("fashion-mnist: batch 256, shuffle_buffer 10000, default augmentation, 2 epochs per run\n");
  for (int w = 1; w <= 2; w++) {
    c.workers = w;
    double rate, wait;
    int rc = stream(&c, 120000, &rate, &wait);
    if (rc) {
      printf("  workers %d: %s\n", w, moco_errmsg());
      return;
    }
    printf("  workers %d: %9.0f samples/s  (%.1fx the %0.f samples/s a default step consumes; consumer "
           "waited %.0f%% of the time)\n", w, rate, rate / need, need, 100 * wait);
  }
}

/* Writes `bytes` of 3x32x32 u8 records with labels into shards of 256 MiB under dir. */
static int generate(const char *dir, double bytes, uint64_t *records) {
  shard_header h = {.flags = SHARD_LABELS, .dtype = DATA_U8, .shape = {3, 32, 32}, .num_classes = 10};
  size_t rb = shard_record_bytes(&h), sb = 3 * 32 * 32;
  uint64_t n = (uint64_t)(bytes / rb) + 1, per = (256u << 20) / rb;
  uint8_t *px = malloc(sb);
  rng_t r;
  rng_init(&r, 1, 1);
  int rc = 0;
  for (uint64_t i = 0, k = 0; !rc && i < n; k++) {
    char path[512];
    shard_writer w;
    snprintf(path, sizeof path, "%s/big-%03llu.shard", dir, (unsigned long long)k);
    if ((rc = shard_writer_open(&w, path, &h))) break;
    for (uint64_t j = 0; j < per && i < n && !rc; j++, i++) {
      for (size_t p = 0; p < sb; p += 4) { /* cheap texture: what matters is the byte count */
        uint32_t v = rng_u32(&r);
        memcpy(px + p, &v, 4);
      }
      rc = shard_writer_add(&w, (int64_t)i, (int32_t)(i % 10), px, NULL);
    }
    if (rc)
      shard_writer_abort(&w);
    else
      rc = shard_writer_close(&w);
  }
  free(px);
  *records = n;
  return rc;
}

static void bench_memory(void) {
  const char *gb_env = getenv("MOCOD_BENCH_GB");
  double gb = gb_env ? atof(gb_env) : 1.05;
  char *dir = test_tmpdir();
  if (!dir) {
    printf("memory: cannot create a directory in /tmp\n");
    return;
  }
  char dirc[64], spec[128];
  snprintf(dirc, sizeof dirc, "%s", dir);
  snprintf(spec, sizeof spec, "%s/big-*.shard", dirc);
  uint64_t n = 0;
  double t0 = clock_now();
  int rc = generate(dirc, gb * (1u << 30), &n);
  double tg = clock_now() - t0;
  if (rc) {
    printf("memory: generating: %s\n", moco_errmsg());
    rm_rf(dirc);
    return;
  }
  printf("memory: generated %.2f GB (%llu records of 3x32x32 u8) in %.1f s\n", gb, (unsigned long long)n, tg);
  loader_config c;
  c = config_defaults()->trainer.loader;
  c.train = spec;
  c.epochs = 1;
  long before = proc_status_kb("VmRSS:");
  reset_peak();
  loader l;
  if ((rc = loader_open(&l, &c))) {
    printf("memory: %s\n", moco_errmsg());
    rm_rf(dirc);
    return;
  }
  loader_batch b;
  uint64_t seen = 0;
  long peak10 = -1;
  t0 = clock_now();
  while (!(rc = loader_next(&l, &b)) && b.size) {
    seen += (uint64_t)b.size;
    if (peak10 < 0 && seen >= n / 10) peak10 = proc_status_kb("VmHWM:");
  }
  double ts = clock_now() - t0;
  long peak = proc_status_kb("VmHWM:");
  loader_close(&l);
  size_t window = 10000 * (3 * 32 * 32 + 12), slots = 5 * 256 * (3 * 32 * 32 + 12 + 2 * 4 * 3 * 32 * 32);
  printf("memory: streamed %llu samples (one epoch, 2 views) in %.1f s, %.0f samples/s, %.0f MB/s%s%s\n",
         (unsigned long long)seen, ts, seen / ts, seen * 3084.0 / ts / 1e6, rc ? ": " : "", rc ? moco_errmsg() : "");
  printf("memory: RSS before open %ld MB; peak after 10%% of the set %ld MB, after 100%% %ld MB (buffers: "
         "shuffle window %.0f MB + 5 batch slots %.0f MB)\n", before >> 10, peak10 >> 10, peak >> 10, window / 1e6,
         slots / 1e6);
  rm_rf(dirc);
}

int main(void) {
  bench_fmnist();
  bench_memory();
  return 0;
}
