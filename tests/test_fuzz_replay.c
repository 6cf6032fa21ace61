/* Every input of the fuzz corpora (tests/fuzz/corpus/<target>/: the seeds and each crash or hang a
 * fuzzer found, kept after its fix) replayed through the harness bodies in the normal build, so a
 * regression fails `make test` (and `make asan`) without clang. */
#include <check.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz/fuzz.h"

static const struct {
  const char *name;
  int (*fn)(const uint8_t *, size_t);
} targets[] = {{"config", fuzz_config}, {"ctl", fuzz_ctl}, {"idx", fuzz_idx}, {"shard", fuzz_shard},
               {"checkpoint", fuzz_checkpoint}, {"npy", fuzz_npy}};

static int replay_dir(const char *dir, int (*fn)(const uint8_t *, size_t)) {
  DIR *d = opendir(dir);
  ck_assert_msg(d != NULL, "%s: missing", dir);
  int n = 0;
  struct dirent *de;
  while ((de = readdir(d))) {
    if (de->d_name[0] == '.') continue;
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
    FILE *f = fopen(p, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)len + 1);
    ck_assert_uint_eq(fread(buf, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    fn(buf, (size_t)len);
    free(buf);
    n++;
  }
  closedir(d);
  return n;
}

START_TEST(every_corpus_input_runs_clean) {
  char dir[256];
  snprintf(dir, sizeof dir, "tests/fuzz/corpus/%s", targets[_i].name);
  ck_assert_int_gt(replay_dir(dir, targets[_i].fn), 0);
}
END_TEST

Suite *fuzz_replay_suite(void) {
  Suite *s = suite_create("fuzz_replay");
  TCase *tc = tcase_create("fuzz_replay");
  tcase_set_timeout(tc, 60);
  tcase_add_loop_test(tc, every_corpus_input_runs_clean, 0, (int)(sizeof targets / sizeof targets[0]));
  suite_add_tcase(s, tc);
  return s;
}
