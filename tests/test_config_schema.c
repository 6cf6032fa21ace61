/* The schema as the one home of every config value: each row's default lies inside its own range or
 * names, survives `mocod --print-config` -> load -> finalize unchanged, binds one field of its own
 * (a non-default value set through the config reads back there and changes nothing else), and what
 * the modules keep after they are built from config_defaults() is what the rows say. A new module
 * default, hand mapping or drifting copy shows up here. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "service/config.h"
#include "testutil.h"
#include "train/step.h"

static json_t *finalized(void) {
  json_t *c = config_new();
  char *report = NULL;
  int rc = config_finalize(c, &report);
  ck_assert_msg(rc == 0, "defaults do not finalize:\n%s", report ? report : moco_errmsg());
  free(report);
  return c;
}

static json_t *row_default(const config_option *o) {
  json_error_t e;
  json_t *v = json_loads(o->def, JSON_DECODE_ANY, &e);
  ck_assert_msg(v != NULL, "%s: default '%s' is not JSON: %s", o->path, o->def, e.text);
  return v;
}

START_TEST(every_default_lies_within_its_row) {
  for (size_t i = 0; i < config_n_options; i++) {
    const config_option *o = &config_options[i];
    json_t *v = row_default(o);
    char why[512];
    ck_assert_msg(config_check_value(o, v, why, sizeof why) == 0, "%s: default %s: %s", o->path, o->def, why);
    json_decref(v);
    ck_assert_msg(o->size > 0, "%s: binds no field", o->path);
    ck_assert_msg(o->off + o->size <= sizeof(mocod_config), "%s: field outside mocod_config", o->path);
    ck_assert_msg(o->type != CONFIG_ENUM || (o->names && o->names[0].name), "%s: no names", o->path);
    /* Two rows on one field would be two homes for one value. */
    for (size_t j = 0; j < i; j++) {
      const config_option *p = &config_options[j];
      ck_assert_msg(o->off + o->size <= p->off || p->off + p->size <= o->off, "%s and %s bind overlapping fields",
                    o->path, p->path);
    }
  }
}
END_TEST

START_TEST(print_config_loads_back_unchanged) {
  char *dir = test_tmpdir();
  char path[512], cmd[1200];
  snprintf(path, sizeof path, "%s/printed.json", dir);
  snprintf(cmd, sizeof cmd, "%s --print-config > %s", bin_path("mocod"), path);
  ck_assert_int_eq(system(cmd), 0);
  json_t *printed = NULL;
  ck_assert_msg(config_load_file(&printed, path) == 0, "%s", moco_errmsg());
  ck_assert_int_eq(config_finalize(printed, NULL), 0);
  json_t *defaults = finalized();
  for (size_t i = 0; i < config_n_options; i++) {
    const config_option *o = &config_options[i];
    json_t *want = row_default(o), *got = config_get(printed, o->path);
    ck_assert_msg(got && json_equal(want, got), "%s: printed %s, schema %s", o->path,
                  got ? json_dumps(got, JSON_ENCODE_ANY) : "nothing", o->def);
    json_decref(want);
  }
  ck_assert_msg(json_equal(printed, defaults), "--print-config differs from the finalized defaults");
  json_decref(printed);
  json_decref(defaults);
  rm_rf(dir);
}
END_TEST

/* Values other than the default for a row, nearest the default's side first: the first one the rules
 * that tie options together accept is used. */
static int candidates(const config_option *o, const json_t *def, json_t **out) {
  int n = 0;
  switch (o->type) {
  case CONFIG_INT: {
    json_int_t d = json_integer_value(def);
    if (d + 1 <= o->max) out[n++] = json_integer(d + 1);
    if (d - 1 >= o->min) out[n++] = json_integer(d - 1);
    break;
  }
  case CONFIG_NUM: {
    double d = json_number_value(def);
    if (d < o->max) out[n++] = json_real(d + (o->max - d) / 2);
    if (d > o->min) out[n++] = json_real(d - (d - o->min) / 2);
    if (d < o->max) out[n++] = json_real(d + (o->max - d) / 1024); /* below a paired maximum */
    if (d > o->min) out[n++] = json_real(d - (d - o->min) / 1024);
    break;
  }
  case CONFIG_BOOL: out[n++] = json_boolean(!json_is_true(def)); break;
  case CONFIG_STR: out[n++] = json_string("run-x/some.file"); break;
  case CONFIG_LAYERS: out[n++] = json_pack("[{s:s, s:i}, {s:s}]", "type", "linear", "out", 24, "type", "relu"); break;
  case CONFIG_INTS: out[n++] = json_pack("[i, i]", 5, 10); break;
  case CONFIG_ENUM: break; /* every name is tried on its own */
  }
  return n;
}

/* Reads the config with `v` at o's path into *c; 0 when the rules accepted it. */
static int read_with(const config_option *o, const json_t *v, mocod_config *c) {
  json_t *root = finalized();
  int rc = config_set(root, o->path, v, 0);
  if (!rc) {
    ck_assert_msg(config_read(root, c) == 0, "%s: %s", o->path, moco_errmsg());
    /* Layer lists are borrowed from the tree: compare them while it lives. */
    if (o->type == CONFIG_LAYERS) {
      const json_t *p;
      memcpy(&p, (char *)c + o->off, sizeof p);
      ck_assert_msg(p == config_get(root, o->path), "%s: field does not hold the config's list", o->path);
    }
  }
  json_decref(root);
  return rc;
}

/* The field of row o in c holds v. */
static void expect_field(const config_option *o, const mocod_config *c, const json_t *v) {
  const char *f = (const char *)c + o->off;
  switch (o->type) {
  case CONFIG_INT: {
    long long got = 0;
    if (o->size == sizeof(int32_t)) {
      int32_t x;
      memcpy(&x, f, sizeof x);
      got = x;
    } else {
      int64_t x;
      memcpy(&x, f, sizeof x);
      got = x;
    }
    ck_assert_msg(got == json_integer_value(v), "%s: field %lld, config %lld", o->path, got,
                  (long long)json_integer_value(v));
    break;
  }
  case CONFIG_NUM: {
    double got;
    if (o->size == sizeof(float)) {
      float x;
      memcpy(&x, f, sizeof x);
      got = x;
      ck_assert_msg(x == (float)json_number_value(v), "%s: field %g, config %g", o->path, got, json_number_value(v));
    } else {
      memcpy(&got, f, sizeof got);
      ck_assert_msg(got == json_number_value(v), "%s: field %g, config %g", o->path, got, json_number_value(v));
    }
    break;
  }
  case CONFIG_BOOL: {
    int x;
    memcpy(&x, f, sizeof x);
    ck_assert_msg(x == json_is_true(v), "%s: field %d", o->path, x);
    break;
  }
  case CONFIG_ENUM: {
    int x, want = -1;
    memcpy(&x, f, sizeof x);
    ck_assert_int_eq(enum_value_of(o->names, json_string_value(v), &want), 0);
    ck_assert_msg(x == want, "%s: field %d, \"%s\" is %d", o->path, x, json_string_value(v), want);
    break;
  }
  case CONFIG_STR: ck_assert_str_eq(f, json_string_value(v)); break;
  case CONFIG_LAYERS: break; /* compared in read_with */
  case CONFIG_INTS: {
    int count;
    memcpy(&count, (const char *)c + o->count_off, sizeof count);
    ck_assert_int_eq(count, (int)json_array_size(v));
    for (int k = 0; k < count; k++) {
      int64_t x;
      memcpy(&x, f + k * sizeof x, sizeof x);
      ck_assert_int_eq(x, json_integer_value(json_array_get(v, (size_t)k)));
    }
    break;
  }
  }
}

/* Zeroes [off, off + n) of both. */
static void blank(unsigned char *a, unsigned char *b, size_t off, size_t n) {
  memset(a + off, 0, n);
  memset(b + off, 0, n);
}

/* Bytes of c outside o's field equal the defaults', but for what data.* derive (the trainer's resolved
 * paths), a list's count and the layer-list pointers. */
static void expect_only_field_changed(const config_option *o, const mocod_config *c, const mocod_config *d) {
  static mocod_config x, y;
  x = *c;
  y = *d;
  unsigned char *a = (unsigned char *)&x, *b = (unsigned char *)&y;
  blank(a, b, o->off, o->size);
  size_t derived = offsetof(mocod_config, trainer.train), derived_end = offsetof(mocod_config, trainer.loader);
  blank(a, b, derived, derived_end - derived);
  if (o->type == CONFIG_INTS) blank(a, b, o->count_off, sizeof(int));
  for (size_t i = 0; i < config_n_options; i++) /* layer lists point into each config's own tree */
    if (config_options[i].type == CONFIG_LAYERS) blank(a, b, config_options[i].off, config_options[i].size);
  /* Check sends a message per assertion: compare first, assert once. */
  size_t k = 0;
  while (k < sizeof x && a[k] == b[k]) k++;
  ck_assert_msg(k == sizeof x, "%s: changed byte %zu outside its field [%zu, %zu)", o->path, k, o->off,
                o->off + o->size);
}

START_TEST(every_row_binds_its_own_field) {
  mocod_config *c = malloc(sizeof *c), *d = malloc(sizeof *d);
  json_t *root = finalized();
  ck_assert_int_eq(config_read(root, d), 0);
  for (size_t i = 0; i < config_n_options; i++) {
    const config_option *o = &config_options[i];
    json_t *def = row_default(o);
    expect_field(o, d, def);
    json_t *vals[64];
    int n = 0;
    if (o->type == CONFIG_ENUM)
      for (const enum_name *e = o->names; e->name; e++) vals[n++] = json_string(e->name);
    else n = candidates(o, def, vals);
    ck_assert_msg(n > 0, "%s: no value to try", o->path);
    int accepted = 0;
    for (int k = 0; k < n; k++) {
      char why[512];
      ck_assert_msg(config_check_value(o, vals[k], why, sizeof why) == 0, "%s: %s", o->path, why);
      /* A value a rule refuses with the other defaults (a dynamic controller's signal under the
       * default strategy) is not read; every other must land in the field. */
      if (read_with(o, vals[k], c) == 0) {
        expect_field(o, c, vals[k]);
        expect_only_field_changed(o, c, d);
        accepted++;
        if (o->type != CONFIG_ENUM) break;
      }
      json_decref(vals[k]);
      vals[k] = NULL;
    }
    for (int k = 0; k < n; k++) json_decref(vals[k]);
    ck_assert_msg(accepted >= (o->type == CONFIG_ENUM && n > 1 ? 2 : 1), "%s: %d of %d values accepted: %s",
                  o->path, accepted, n, moco_errmsg());
    json_decref(def);
  }
  /* The schema's defaults are what config_defaults() hands the tests and benchmarks. */
  const mocod_config *cd = config_defaults();
  ck_assert_ptr_nonnull(cd);
  for (size_t i = 0; i < config_n_options; i++) {
    const config_option *o = &config_options[i];
    if (o->type == CONFIG_LAYERS) continue;
    ck_assert_msg(!memcmp((const char *)cd + o->off, (const char *)d + o->off, o->size), "%s: config_defaults differs",
                  o->path);
  }
  json_decref(root);
  free(c);
  free(d);
}
END_TEST

/* What the modules keep once built from the defaults is what the rows say: none of them substitutes
 * a value of its own. */
START_TEST(modules_built_from_defaults_keep_the_schema_values) {
  const mocod_config *cd = config_defaults();
  ck_assert_ptr_nonnull(cd);
  moco_config mc = cd->trainer.moco;
  json_t *spec = json_loads("[{\"type\":\"linear\",\"out\":8},{\"type\":\"l2norm\"}]", 0, NULL);
  for (int adversarial = 0; adversarial < 2; adversarial++) {
    if (adversarial) mc.mine.strategy = MINE_ADVERSARIAL;
    moco_model *m = calloc(1, sizeof *m);
    ck_assert_msg(moco_init(m, &mc, spec, (net_shape){4, 1, 1}, "model") == 0, "%s", moco_errmsg());
    ck_assert(!memcmp(&m->cfg, &mc, sizeof mc));
    /* the modules read the model's one copy */
    ck_assert(m->mine.cfg == &m->cfg.mine && m->hard.cfg == &m->cfg.hardness && m->opt.cfg == &m->cfg.optim);
    ck_assert_int_eq(m->queue.queue_size, mc.queue_size);
    if (adversarial) {
      ck_assert(m->bank.cfg == &m->cfg.advbank);
      ck_assert_int_eq(m->bank.size, mc.mine.bank_size);
    }
    moco_free(m);
    free(m);
  }
  json_decref(spec);
  /* The values issue 13 found drifting between the schema and the modules. */
  ck_assert(cd->trainer.moco.momentum.encoder_momentum == 0.99f);
  ck_assert_int_eq(cd->trainer.loader.shuffle_buffer, 65536);
  ck_assert_int_eq(cd->trainer.moco.mine.strategy, MINE_HARDEST);
  ck_assert_int_eq(cd->trainer.embed_dim, 64);
  ck_assert(cd->trainer.probe.weight_decay == 1e-4f);
}
END_TEST

/* Checks the modules used to make on their own now live in the schema: open bounds and rules. */
START_TEST(bounds_and_rules_refuse_what_the_modules_refused) {
  json_t *root = finalized();
  json_t *zero = json_real(0.0), *one = json_real(1.0);
  ck_assert_int_eq(config_set(root, "optim.momentum", zero, 0), 0);
  ck_assert_int_eq(config_set(root, "views.crop_scale_min", one, 0), 0); /* the closed end is allowed */
  static const struct {
    const char *path, *value, *why;
  } bad[] = {
      {"views.crop_scale_min", "0", "allowed (0, 1]"},
      {"views.erase_scale_min", "0", "allowed (0, 1]"},
      {"contrast.hardness.warmup", "1", "allowed [0, 1)"},
      {"contrast.negatives.band_lo", "0.3", "not below band_hi"},
      {"views.mask_rate_min", "0.7", "greater than views.mask_rate_max"},
      {"contrast.shuffle_bn_groups", "512", "above optim.batch_size"},
      {"optim.nesterov", "true", "optim.momentum above 0"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    json_t *v = json_loads(bad[i].value, JSON_DECODE_ANY, NULL);
    int rc = config_set(root, bad[i].path, v, 0);
    json_decref(v);
    ck_assert_msg(rc == MOCO_ECONFIG, "%s = %s accepted", bad[i].path, bad[i].value);
    ck_assert_msg(strstr(moco_errmsg(), bad[i].why), "%s: '%s' lacks '%s'", bad[i].path, moco_errmsg(), bad[i].why);
  }
  json_decref(zero);
  json_decref(one);
  json_decref(root);
}
END_TEST

Suite *config_schema_suite(void) {
  Suite *s = suite_create("config_schema");
  TCase *tc = tcase_create("config_schema");
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, every_default_lies_within_its_row);
  tcase_add_test(tc, print_config_loads_back_unchanged);
  tcase_add_test(tc, every_row_binds_its_own_field);
  tcase_add_test(tc, modules_built_from_defaults_keep_the_schema_values);
  tcase_add_test(tc, bounds_and_rules_refuse_what_the_modules_refused);
  suite_add_tcase(s, tc);
  return s;
}
