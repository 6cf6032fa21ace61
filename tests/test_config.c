/* The config schema: defaults, validation reporting every problem, unknown keys, --set, `set`. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "service/config.h"
#include "testutil.h"

static json_t *parse(const char *text) {
  json_error_t e;
  json_t *j = json_loads(text, 0, &e);
  ck_assert_msg(j != NULL, "test JSON does not parse: %s", e.text);
  return j;
}

START_TEST(every_default_parses_and_is_valid) {
  for (size_t i = 0; i < config_n_options; i++) {
    const config_option *o = &config_options[i];
    json_error_t e;
    json_t *v = json_loads(o->def, JSON_DECODE_ANY, &e);
    ck_assert_msg(v != NULL, "%s: default does not parse", o->path);
    char why[512];
    ck_assert_msg(config_check_value(o, v, why, sizeof why) == 0, "%s: %s", o->path, why);
    ck_assert_msg(o->doc && *o->doc, "%s: no doc line", o->path);
    json_decref(v);
  }
}
END_TEST

START_TEST(empty_config_is_filled_with_defaults) {
  json_t *c = config_new();
  ck_assert_int_eq(config_finalize(c, NULL), 0);
  for (size_t i = 0; i < config_n_options; i++)
    ck_assert_msg(config_get(c, config_options[i].path) != NULL, "%s missing", config_options[i].path);
  ck_assert_int_eq(config_int(c, "contrast.queue_size") > 0, 1);
  ck_assert_str_eq(config_str(c, "service.socket"), "run/mocod.sock");
  json_decref(c);
}
END_TEST

START_TEST(validation_reports_every_problem_with_path_value_and_allowed) {
  json_t *c = parse("{\"contrast\":{\"temperature\":0,\"queue_sise\":10},"
                    "\"optim\":{\"batch_size\":\"big\",\"optimizer\":\"adam\"},"
                    "\"log\":{\"level\":\"loud\"},\"bogus\":1}");
  char *report = NULL;
  ck_assert_int_eq(config_finalize(c, &report), MOCO_ECONFIG);
  ck_assert_ptr_nonnull(report);
  ck_assert_ptr_nonnull(strstr(report, "contrast.temperature: value 0 out of range, allowed [0.001, 10]"));
  ck_assert_ptr_nonnull(
      strstr(report, "contrast.queue_sise: unknown key (did you mean 'contrast.queue_size'?)"));
  ck_assert_ptr_nonnull(strstr(report, "optim.batch_size: expected integer, found \"big\""));
  ck_assert_ptr_nonnull(strstr(report, "optim.optimizer: value \"adam\" not allowed, expected one of"));
  ck_assert_ptr_nonnull(strstr(report, "log.level: value \"loud\" not allowed"));
  ck_assert_ptr_nonnull(strstr(report, "bogus: unknown key"));
  int lines = 0;
  for (char *p = report; *p; p++) lines += *p == '\n';
  ck_assert_int_eq(lines, 6);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "and 5 more problems"));
  free(report);
  json_decref(c);
}
END_TEST

START_TEST(sections_must_be_objects_and_integers_integral) {
  json_t *c = parse("{\"optim\":[1],\"eval\":{\"k\":2.5}}");
  char *report = NULL;
  ck_assert_int_eq(config_finalize(c, &report), MOCO_ECONFIG);
  ck_assert_ptr_nonnull(strstr(report, "optim: expected an object (a section), found an array"));
  ck_assert_ptr_nonnull(strstr(report, "eval.k: expected an integer, found 2.5"));
  free(report);
  json_decref(c);
}
END_TEST

START_TEST(cross_option_rules_are_checked) {
  json_t *c = parse("{\"contrast\":{\"queue_size\":16},\"optim\":{\"batch_size\":32}}");
  char *report = NULL;
  ck_assert_int_eq(config_finalize(c, &report), MOCO_ECONFIG);
  ck_assert_ptr_nonnull(strstr(report, "contrast.queue_size: value 16 smaller than optim.batch_size 32"));
  free(report);
  json_decref(c);
}
END_TEST

START_TEST(override_parses_json_else_string) {
  json_t *c = config_new();
  ck_assert_int_eq(config_override(c, "optim.lr=0.5"), 0);
  ck_assert_int_eq(config_override(c, "checkpoint.dir=/tmp/x y"), 0);
  ck_assert_int_eq(config_override(c, "eval.probe_at_end=false"), 0);
  ck_assert_int_eq(config_override(c, "noequals"), MOCO_EINVAL);
  ck_assert_int_eq(config_finalize(c, NULL), 0);
  ck_assert(config_num(c, "optim.lr") == 0.5);
  ck_assert_str_eq(config_str(c, "checkpoint.dir"), "/tmp/x y");
  ck_assert_int_eq(config_bool(c, "eval.probe_at_end"), 0);
  json_decref(c);
}
END_TEST

START_TEST(set_accepts_runtime_keys_and_refuses_others_with_reason) {
  json_t *c = config_new();
  ck_assert_int_eq(config_finalize(c, NULL), 0);
  json_t *v = json_real(0.1);
  ck_assert_int_eq(config_set(c, "contrast.temperature", v, 1), 0);
  ck_assert(config_num(c, "contrast.temperature") == 0.1);
  json_decref(v);
  v = json_integer(128);
  ck_assert_int_eq(config_set(c, "contrast.queue_size", v, 1), MOCO_ESTATE);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "cannot change while training"));
  json_decref(v);
  v = json_integer(-1);
  ck_assert_int_eq(config_set(c, "optim.lr", v, 1), MOCO_ECONFIG);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "optim.lr: value -1 out of range"));
  json_decref(v);
  v = json_integer(3);
  ck_assert_int_eq(config_set(c, "optim.lrr", v, 1), MOCO_ENOENT);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "did you mean 'optim.lr'"));
  json_decref(v);
  json_decref(c);
}
END_TEST

START_TEST(doc_lists_every_option) {
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  config_write_doc(f);
  fclose(f);
  for (size_t i = 0; i < config_n_options; i++) {
    char key[256];
    snprintf(key, sizeof key, "| `%s` |", config_options[i].path);
    ck_assert_msg(strstr(buf, key) != NULL, "%s not documented", config_options[i].path);
  }
  free(buf);
}
END_TEST

START_TEST(shipped_configs_are_valid) {
  static const char *names[] = {"default", "tiny", "moco", "random", "semi-hard", "band", "mixing",
                                "adversarial", "hcl", "triplet", "simclr", "curriculum", "dynamic",
                                "guards", "guard-ceiling", "guard-skip", NULL};
  for (int i = 0; names[i]; i++) {
    char path[256];
    snprintf(path, sizeof path, "config/%s.json", names[i]);
    json_t *c = NULL;
    ck_assert_msg(config_load_file(&c, path) == 0, "%s: %s", path, moco_errmsg());
    char *report = NULL;
    ck_assert_msg(config_finalize(c, &report) == 0, "%s:\n%s", path, report ? report : moco_errmsg());
    mocod_config *mc = malloc(sizeof *mc);
    ck_assert_msg(config_read(c, mc) == 0, "%s: %s", path, moco_errmsg());
    free(mc);
    json_decref(c);
  }
}
END_TEST

START_TEST(extends_merges_sections_and_comments_are_ignored) {
  char *dir = test_tmpdir();
  char base[300], child[300];
  snprintf(base, sizeof base, "%s/base.json", dir);
  snprintf(child, sizeof child, "%s/child.json", dir);
  FILE *f = fopen(base, "w");
  fputs("{\"optim\": {\"lr\": 0.5, \"batch_size\": 64}, \"seed\": 3}", f);
  fclose(f);
  f = fopen(child, "w");
  fputs("{\"//\": \"a note\", \"extends\": \"base.json\", \"optim\": {\"lr\": 0.1, \"// why\": 1}}", f);
  fclose(f);
  json_t *c = NULL;
  ck_assert_int_eq(config_load_file(&c, child), 0);
  ck_assert_int_eq(config_finalize(c, NULL), 0);
  ck_assert(config_num(c, "optim.lr") == 0.1);
  ck_assert_int_eq(config_int(c, "optim.batch_size"), 64);
  ck_assert_int_eq(config_int(c, "seed"), 3);
  json_decref(c);
  /* A cycle is refused, not followed forever. */
  f = fopen(base, "w");
  fputs("{\"extends\": \"child.json\"}", f);
  fclose(f);
  ck_assert_int_eq(config_load_file(&c, child), MOCO_EFORMAT);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "nested more than 8 deep"));
  rm_rf(dir);
}
END_TEST

Suite *config_suite(void) {
  Suite *s = suite_create("config");
  TCase *tc = tcase_create("schema");
  tcase_add_test(tc, every_default_parses_and_is_valid);
  tcase_add_test(tc, empty_config_is_filled_with_defaults);
  tcase_add_test(tc, validation_reports_every_problem_with_path_value_and_allowed);
  tcase_add_test(tc, sections_must_be_objects_and_integers_integral);
  tcase_add_test(tc, cross_option_rules_are_checked);
  tcase_add_test(tc, override_parses_json_else_string);
  tcase_add_test(tc, set_accepts_runtime_keys_and_refuses_others_with_reason);
  tcase_add_test(tc, doc_lists_every_option);
  tcase_add_test(tc, shipped_configs_are_valid);
  tcase_add_test(tc, extends_merges_sections_and_comments_are_ignored);
  suite_add_tcase(s, tc);
  return s;
}
