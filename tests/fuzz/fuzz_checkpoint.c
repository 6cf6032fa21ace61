/* The checkpoint loader: checkpoint_read (trailer, header), then trainer_load (every module's
 * section) into a trainer built once from config/tiny.json and the sample data. Checksums are
 * unchecked in fuzzing builds, so mutated sections reach the module loaders. */
#include <jansson.h>
#include <stdlib.h>
#include <unistd.h>

#include "fuzz.h"
#include "service/config.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

/* Run from the repository root (make fuzz, make test); NULL when the sample data is not there. */
static trainer *tiny_trainer(void) {
  static trainer *t;
  static int tried;
  static mocod_config mc;
  static json_t *c; /* kept: the trainer config borrows the model description from it */
  if (tried) return t;
  tried = 1;
  char *report = NULL;
  if (config_load_file(&c, "config/tiny.json") == 0 && config_override(c, "threads=1") == 0 &&
      config_finalize(c, &report) == 0 && config_read(c, &mc) == 0 && trainer_create(&t, &mc.trainer))
    t = NULL;
  free(report);
  return t;
}

int fuzz_checkpoint(const uint8_t *data, size_t size) {
  trainer *t = tiny_trainer();
  char path[64];
  int fd = fuzz_memfile(data, size, path, sizeof path);
  if (fd < 0) return 0;
  checkpoint_file f;
  if (checkpoint_read(&f, path) == 0 && t) trainer_load(t, &f.body);
  checkpoint_file_free(&f);
  close(fd);
  return 0;
}
FUZZ_ENTRY(fuzz_checkpoint)
