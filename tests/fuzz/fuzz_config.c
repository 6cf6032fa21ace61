/* The config loader (a JSON file, with `extends`) and the --set parser, through validation and the
 * mapping to the trainer's config. Input: a config file; its lines are also tried as --set arguments. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz.h"
#include "service/config.h"
#include "train/trainer.h"

static void finalize(json_t *c) {
  char *report = NULL;
  if (config_finalize(c, &report) == 0) {
    mocod_config *mc = malloc(sizeof *mc);
    if (mc) config_read(c, mc);
    free(mc);
  }
  free(report);
}

int fuzz_config(const uint8_t *data, size_t size) {
  char path[64];
  int fd = fuzz_memfile(data, size, path, sizeof path);
  if (fd < 0) return 0;
  json_t *c = NULL;
  if (config_load_file(&c, path) == 0) finalize(c);
  json_decref(c);
  close(fd);

  c = config_new();
  char *text = strndup((const char *)data, size);
  for (char *save = NULL, *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
    if (config_override(c, line)) break;
  finalize(c);
  free(text);
  json_decref(c);
  return 0;
}
FUZZ_ENTRY(fuzz_config)
