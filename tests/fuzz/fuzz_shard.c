/* The shard reader: header, then every record (block checksums are unchecked in fuzzing builds, so
 * the block decoding behind them is reached). */
#include <unistd.h>

#include "data/shard.h"
#include "fuzz.h"

int fuzz_shard(const uint8_t *data, size_t size) {
  char path[64];
  int fd = fuzz_memfile(data, size, path, sizeof path);
  if (fd < 0) return 0;
  shard_header h;
  shard_reader r;
  if (shard_probe(path, &h) == 0 && shard_reader_open(&r, path, &h, 0) == 0) {
    data_record rec;
    for (int i = 0; i < 4096 && shard_reader_next(&r, &rec) != 0; i++) {
    }
    shard_reader_close(&r);
  }
  close(fd);
  return 0;
}
FUZZ_ENTRY(fuzz_shard)
