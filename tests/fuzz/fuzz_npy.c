/* The NumPy .npy reader: header dictionary, then every record; the same file as its own labels too. */
#include <unistd.h>

#include "data/npy.h"
#include "fuzz.h"

static void read_all(const char *path, const char *labels) {
  npy_reader r;
  if (npy_reader_open(&r, path, labels, 0)) return;
  data_record rec;
  for (int i = 0; i < 4096 && npy_reader_next(&r, &rec) > 0; i++) {
  }
  npy_reader_close(&r);
}

int fuzz_npy(const uint8_t *data, size_t size) {
  char path[64];
  int fd = fuzz_memfile(data, size, path, sizeof path);
  if (fd < 0) return 0;
  npy_info info;
  if (npy_probe(path, &info) == 0) {
    int32_t max;
    npy_max_label(path, &info, &max);
    read_all(path, NULL);
    read_all(path, path);
  }
  close(fd);
  return 0;
}
FUZZ_ENTRY(fuzz_npy)
