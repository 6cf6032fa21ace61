/* The IDX reader (plain or gzip): probe, then every record, as the loader does; the same file as
 * its own labels too. */
#include <unistd.h>

#include "data/idx.h"
#include "fuzz.h"

static void read_all(const char *path, const char *labels) {
  idx_reader r;
  if (idx_reader_open(&r, path, labels, 0)) return;
  data_record rec;
  for (int i = 0; i < 4096 && idx_reader_next(&r, &rec) > 0; i++) {
  }
  idx_reader_close(&r);
}

int fuzz_idx(const uint8_t *data, size_t size) {
  char path[64];
  int fd = fuzz_memfile(data, size, path, sizeof path);
  if (fd < 0) return 0;
  idx_info info;
  if (idx_probe(path, &info) == 0) {
    int32_t max;
    idx_max_label(path, &info, &max);
    read_all(path, NULL);
    read_all(path, path);
  }
  close(fd);
  return 0;
}
FUZZ_ENTRY(fuzz_idx)
