/* The encoder out of mocod: safetensors export (offline from a checkpoint and through the running daemon),
 * its layout checked in C and by scripts/load_encoder.py's standard-library check, PyTorch's embeddings
 * against mocod's own (when python3-torch is installed), offline `mocod embed`, and bad input. One small
 * run (RGB .npy data, a few steps) serves every test. */
#include <check.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/err.h"
#include "data/npy.h"
#include "data_fixtures.h"
#include "testutil.h"

static char dir[64];
static char buf[8][1024];

static const char *in_dir(int k, const char *name) {
  snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
  return buf[k];
}

/* 96 RGB 3x10x10 u8 images with labels, and a config that trains 6 steps and checkpoints at the end. */
static void setup(void) {
  strcpy(dir, test_tmpdir());
  data_shape s = {3, 10, 10};
  size_t sb = data_shape_size(s);
  enum { N = 96 };
  uint8_t *x = malloc(N * sb);
  int32_t y[N];
  for (int i = 0; i < N; i++) {
    fx_sample((uint64_t)i, 0, s, DATA_U8, x + (size_t)i * sb);
    y[i] = i % 3;
  }
  uint64_t dims[4] = {N, 3, 10, 10};
  ck_assert_int_eq(npy_write(in_dir(0, "rgb.npy"), "|u1", 4, dims, x), 0);
  ck_assert_int_eq(npy_write(in_dir(0, "rgb.labels.npy"), "<i4", 1, dims, y), 0);
  free(x);
  FILE *f = fopen(in_dir(0, "cfg.json"), "w");
  fprintf(f,
          "{\"data\": {\"dir\": \"%s\", \"train\": \"rgb.npy\", \"eval\": \"\", \"shuffle_buffer\": 96, "
          "\"workers\": 1},\n"
          " \"model\": {\"backbone\": [{\"type\": \"conv2d\", \"out\": 6, \"kernel\": 3, \"pad\": 1},"
          " {\"type\": \"batchnorm\"}, {\"type\": \"relu\"}, {\"type\": \"maxpool\", \"kernel\": 3, \"stride\": 2,"
          " \"pad\": 1}, {\"type\": \"conv2d\", \"out\": 8, \"kernel\": 3, \"bias\": false},"
          " {\"type\": \"batchnorm\"}, {\"type\": \"relu\"}, {\"type\": \"avgpool\"}, {\"type\": \"linear\", \"out\": 12},"
          " {\"type\": \"batchnorm\"}],\n"
          "   \"head\": [{\"type\": \"linear\", \"out\": 16}, {\"type\": \"relu\"}], \"embed_dim\": 8},\n"
          " \"contrast\": {\"queue_size\": 64, \"shuffle_bn_groups\": 2, \"negatives\": {\"num_negatives\": 16}},\n"
          " \"optim\": {\"batch_size\": 16, \"steps\": 6, \"lr\": 0.05},\n"
          " \"eval\": {\"probe_at_end\": false, \"groups\": []},\n"
          " \"log\": {\"file\": \"%s/log\", \"progress\": \"\"},\n"
          " \"checkpoint\": {\"dir\": \"%s/ck\", \"every_steps\": 0, \"every_seconds\": 0},\n"
          " \"service\": {\"socket\": \"%s/sock\", \"pid_file\": \"%s/pid\", \"exit_on_finish\": true}}\n",
          dir, dir, dir, dir, dir);
  fclose(f);
  char cmd[2048], out[4096];
  snprintf(cmd, sizeof cmd, "%s -c %s/cfg.json", bin_path("mocod"), dir);
  int st = run_capture(cmd, out, sizeof out);
  ck_assert_msg(st == 0, "%s -> %d: %s", cmd, st, out);
}

static void teardown(void) { rm_rf(dir); }

/* A program of the build by absolute path: the commands below run in the test's directory. */
static const char *prog(const char *name) {
  static char abs[2][4096];
  char *p = abs[name[4] == 'c'];
  ck_assert_ptr_nonnull(realpath(bin_path(name), p));
  return p;
}

static int mocod(const char *args, char *out, size_t n) {
  char cmd[4096];
  snprintf(cmd, sizeof cmd, "cd %s && %s %s", dir, prog("mocod"), args);
  return run_capture(cmd, out, n);
}

static char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  ck_assert_msg(f != NULL, "%s", path);
  fseek(f, 0, SEEK_END);
  *len = (size_t)ftell(f);
  rewind(f);
  char *p = malloc(*len + 1);
  ck_assert_int_eq(fread(p, 1, *len, f), *len);
  fclose(f);
  p[*len] = '\0';
  return p;
}

/* The float32 [n, d] array of a .npy file mocod wrote; *n, *d its shape. */
static float *read_npy(const char *path, uint64_t *n, uint64_t *d) {
  npy_info in;
  ck_assert_msg(npy_probe(path, &in) == 0, "%s", moco_errmsg());
  ck_assert_str_eq(in.descr, "<f4");
  ck_assert_int_eq(in.ndim, 2);
  *n = in.dims[0], *d = in.dims[1];
  size_t len;
  char *all = slurp(path, &len);
  float *x = malloc(*n * *d * sizeof *x + 1);
  memcpy(x, all + in.data_off, *n * *d * sizeof *x);
  free(all);
  return x;
}

START_TEST(safetensors_layout_is_complete_and_consistent) {
  char out[4096];
  ck_assert_msg(mocod("--export-model ck q.safetensors", out, sizeof out) == 0, "%s", out);
  ck_assert_msg(strstr(out, "exported the query encoder of step 6"), "%s", out);
  size_t len;
  char *f = slurp(in_dir(0, "q.safetensors"), &len);
  uint64_t hl;
  memcpy(&hl, f, 8);
  ck_assert_uint_eq(hl % 8, 0);
  json_error_t e;
  json_t *h = json_loadb(f + 8, hl, 0, &e);
  ck_assert_msg(h != NULL, "%s", e.text);
  json_t *meta = json_object_get(h, "__metadata__");
  ck_assert_str_eq(json_string_value(json_object_get(meta, "format")), "mocod-encoder");
  ck_assert_str_eq(json_string_value(json_object_get(meta, "encoder")), "query");
  ck_assert_str_eq(json_string_value(json_object_get(meta, "input_shape")), "[3,10,10]");
  ck_assert_str_eq(json_string_value(json_object_get(meta, "input")), "u8");
  ck_assert_str_eq(json_string_value(json_object_get(meta, "backbone_layers")), "10");
  ck_assert_str_eq(json_string_value(json_object_get(meta, "embed_dim")), "8");
  json_t *mean = json_loads(json_string_value(json_object_get(meta, "mean")), 0, NULL);
  ck_assert_int_eq(json_array_size(mean), 3);
  json_decref(mean);
  /* every tensor F32, its size its shape's, back to back, ending at the end of the file */
  size_t total = 0;
  const char *name;
  json_t *t;
  int n = 0;
  json_object_foreach(h, name, t) {
    if (!strcmp(name, "__metadata__")) continue;
    ck_assert_str_eq(json_string_value(json_object_get(t, "dtype")), "F32");
    size_t count = 1, i;
    json_t *d;
    json_array_foreach(json_object_get(t, "shape"), i, d) count *= (size_t)json_integer_value(d);
    json_t *off = json_object_get(t, "data_offsets");
    size_t a = (size_t)json_integer_value(json_array_get(off, 0)), b = (size_t)json_integer_value(json_array_get(off, 1));
    ck_assert_uint_eq(b - a, 4 * count);
    total += b - a;
    n++;
  }
  ck_assert_uint_eq(8 + hl + total, len);
  /* conv 0: weight, bias; bn 1: 4; conv 4: weight only (bias false); bn 5: 4; linear 8: 2; bn 9: 4;
   * head linear 10: 2; linear 12 (embed): 2 */
  ck_assert_int_eq(n, 2 + 4 + 1 + 4 + 2 + 4 + 2 + 2);
  ck_assert_ptr_null(json_object_get(h, "layers.4.bias"));
  json_t *w = json_object_get(json_object_get(h, "layers.4.weight"), "shape");
  ck_assert_int_eq(json_integer_value(json_array_get(w, 0)), 8);
  ck_assert_int_eq(json_integer_value(json_array_get(w, 1)), 6);
  ck_assert_int_eq(json_integer_value(json_array_get(w, 3)), 3);
  ck_assert_ptr_nonnull(json_object_get(h, "layers.9.running_var"));
  json_decref(h);
  free(f);
  /* the key encoder is another file */
  ck_assert_msg(mocod("--export-model ck/ k.safetensors --encoder key", out, sizeof out) == 0, "%s", out);
  ck_assert_msg(strstr(out, "key encoder"), "%s", out);
  /* the standard-library check of the same rules, always run */
  char cmd[2048];
  snprintf(cmd, sizeof cmd, "python3 scripts/load_encoder.py %s/q.safetensors --check-layout", dir);
  int st = run_capture(cmd, out, sizeof out);
  ck_assert_msg(st == 0 && strstr(out, ": ok: query encoder of step 6"), "%s -> %d: %s", cmd, st, out);
}
END_TEST

START_TEST(offline_embed_streams_features_and_embeddings_with_labels_and_ids) {
  char out[4096];
  ck_assert_msg(mocod("embed --checkpoint ck --data rgb.npy --out e.npy --embeddings --batch 10", out, sizeof out) == 0,
                "%s", out);
  ck_assert_msg(strstr(out, "embed: 96 / 96 records (100.0%)") && strstr(out, "embedded 96 records"), "%s", out);
  uint64_t n, d;
  float *z = read_npy(in_dir(0, "e.npy"), &n, &d);
  ck_assert_int_eq(n, 96);
  ck_assert_int_eq(d, 8);
  for (uint64_t i = 0; i < n; i++) {
    double s = 0;
    for (uint64_t k = 0; k < d; k++) s += (double)z[i * d + k] * z[i * d + k];
    ck_assert_double_eq_tol(s, 1.0, 1e-5);
  }
  npy_info li;
  ck_assert_int_eq(npy_probe(in_dir(1, "e.labels.npy"), &li), 0);
  ck_assert_int_eq(li.count, 96);
  ck_assert_int_eq(npy_probe(in_dir(1, "e.ids.npy"), &li), 0);
  ck_assert_str_eq(li.descr, "<i8");
  ck_assert_msg(mocod("embed --checkpoint ck --data rgb.npy --out f.npy", out, sizeof out) == 0, "%s", out);
  float *f = read_npy(in_dir(1, "f.npy"), &n, &d);
  ck_assert_int_eq(d, 12); /* the backbone's last layer: batchnorm over 12 features */
  /* the same data twice in one call gives the same rows twice, in file order */
  ck_assert_msg(mocod("embed --checkpoint ck --data rgb.npy,rgb.npy --out g.npy --batch 7", out, sizeof out) == 0,
                "%s", out);
  uint64_t n2;
  float *g = read_npy(in_dir(1, "g.npy"), &n2, &d);
  ck_assert_int_eq(n2, 192);
  /* (to rounding: other batch sizes take other blockings of the matrix products) */
  for (int i = 0; i < 96 * 12; i++) {
    ck_assert_float_eq_tol(g[i], f[i], 1e-5f);
    ck_assert_float_eq_tol(g[96 * 12 + i], f[i], 1e-5f);
  }
  free(z);
  free(f);
  free(g);
}
END_TEST

/* The first interpreter that has torch and numpy (found without importing them), or NULL. */
static const char *torch_python(void) {
  static const char *cands[] = {"python3", "/usr/bin/python3", NULL};
  const char *env = getenv("MOCOD_TORCH_PYTHON");
  char cmd[512], out[256];
  if (env) return env;
  for (int i = 0; cands[i]; i++) {
    snprintf(cmd, sizeof cmd, "%s -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec(\"torch\") and "
             "u.find_spec(\"numpy\")))'", cands[i]);
    if (run_capture(cmd, out, sizeof out) == 0) return cands[i];
  }
  return NULL;
}

START_TEST(pytorch_embeddings_match_mocods_own) {
  const char *py = torch_python();
  if (!py) {
    fprintf(stderr, "export: SKIPPED the PyTorch comparison: no python3 with torch and numpy "
                    "(apt-get install python3-torch python3-numpy, or set MOCOD_TORCH_PYTHON)\n");
    return;
  }
  char out[8192], cmd[2048];
  /* query embeddings, key features: every layer kind on both paths, in two interpreter starts */
  for (int k = 0; k < 2; k++) {
    const char *enc = k ? "key" : "query";
    int feat = k;
    snprintf(cmd, sizeof cmd, "--export-model ck m.safetensors --encoder %s", enc);
    ck_assert_msg(mocod(cmd, out, sizeof out) == 0, "%s", out);
    {
      snprintf(cmd, sizeof cmd, "embed --checkpoint ck --encoder %s --data rgb.npy --out c.npy %s", enc,
               feat ? "--features" : "--embeddings");
      ck_assert_msg(mocod(cmd, out, sizeof out) == 0, "%s", out);
      snprintf(cmd, sizeof cmd, "%s scripts/load_encoder.py %s/m.safetensors --embed %s/rgb.npy %s/t.npy %s", py, dir,
               dir, dir, feat ? "--features" : "");
      int st = run_capture(cmd, out, sizeof out);
      ck_assert_msg(st == 0, "%s -> %d: %s", cmd, st, out);
      uint64_t n, d, n2, d2;
      float *a = read_npy(in_dir(0, "c.npy"), &n, &d), *b = read_npy(in_dir(1, "t.npy"), &n2, &d2);
      ck_assert_int_eq(n, n2);
      ck_assert_int_eq(d, d2);
      double worst = 0;
      for (uint64_t i = 0; i < n * d; i++) worst = fmax(worst, fabs((double)a[i] - b[i]));
      fprintf(stderr, "export: %s encoder %s: PyTorch vs mocod max |diff| %.3g over %llu x %llu\n", enc,
              feat ? "features" : "embeddings", worst, (unsigned long long)n, (unsigned long long)d);
      ck_assert_msg(worst <= 1e-4, "%s %s: max diff %g", enc, feat ? "features" : "embeddings", worst);
      free(a);
      free(b);
    }
  }
}
END_TEST

START_TEST(daemon_exports_the_model_on_request) {
  char out[4096], cmd[2048];
  /* a second run of the same config, resumed from its checkpoint, kept alive for commands */
  ck_assert_msg(mocod("-c cfg.json --set optim.steps=100000 --set service.exit_on_finish=false -d", out,
                      sizeof out) == 0, "%s", out);
  snprintf(cmd, sizeof cmd, "cd %s && %s -s %s/sock export-model d.safetensors key", dir, prog("mococtl"), dir);
  int st = run_capture(cmd, out, sizeof out);
  ck_assert_msg(st == 0 && strstr(out, "safetensors"), "%s -> %d: %s", cmd, st, out);
  snprintf(cmd, sizeof cmd, "%s -s %s/sock export-model %s/x.safetensors sideways", prog("mococtl"), dir, dir);
  ck_assert_int_eq(run_capture(cmd, out, sizeof out), 3);
  snprintf(cmd, sizeof cmd, "%s -s %s/sock raw '{\"id\":1,\"cmd\":\"export_model\",\"args\":{\"path\":\"%s/no/such/dir/x\"}}'",
           prog("mococtl"), dir, dir);
  run_capture(cmd, out, sizeof out);
  ck_assert_msg(strstr(out, "\"ok\":false") && strstr(out, "no/such/dir"), "%s", out);
  snprintf(cmd, sizeof cmd, "%s -s %s/sock stop", prog("mococtl"), dir);
  ck_assert_int_eq(run_capture(cmd, out, sizeof out), 0);
  snprintf(cmd, sizeof cmd, "python3 scripts/load_encoder.py %s/d.safetensors --check-layout", dir);
  st = run_capture(cmd, out, sizeof out);
  ck_assert_msg(st == 0 && strstr(out, "ok: key encoder"), "%s", out);
}
END_TEST

START_TEST(bad_checkpoints_data_and_files_are_reported) {
  char out[4096];
  ck_assert_int_eq(mocod("--export-model no-such.mcp x.safetensors", out, sizeof out), 1);
  ck_assert_msg(strstr(out, "no-such.mcp"), "%s", out);
  ck_assert_int_eq(mocod("--export-model ck x.safetensors --encoder sideways", out, sizeof out), 1);
  ck_assert_msg(strstr(out, "--encoder: 'sideways'"), "%s", out);
  /* a damaged checkpoint file is refused by its checksum, naming it */
  char cmd[2048];
  snprintf(cmd, sizeof cmd, "cp %s/ck/ckpt-000000000006.mcp %s/bad.mcp && printf 'XXXX' | dd of=%s/bad.mcp bs=1 "
           "seek=300 conv=notrunc 2>/dev/null", dir, dir, dir);
  ck_assert_int_eq(run_capture(cmd, out, sizeof out), 0);
  ck_assert_int_eq(mocod("--export-model bad.mcp x.safetensors", out, sizeof out), 1);
  ck_assert_msg(strstr(out, "bad.mcp") && strstr(out, "checksum"), "%s", out);
  ck_assert_int_eq(access(in_dir(0, "x.safetensors"), F_OK), -1);
  /* data of another shape: refused, and no output left behind */
  uint64_t dims[4] = {4, 1, 10, 10};
  uint8_t grey[400] = {0};
  ck_assert_int_eq(npy_write(in_dir(0, "grey.npy"), "|u1", 4, dims, grey), 0);
  ck_assert_int_eq(mocod("embed --checkpoint ck --data grey.npy --out o.npy", out, sizeof out), 1);
  ck_assert_msg(strstr(out, "1x10x10") && strstr(out, "3x10x10"), "%s", out);
  snprintf(cmd, sizeof cmd, "ls %s | grep -c '^o\\.'", dir);
  run_capture(cmd, out, sizeof out);
  ck_assert_str_eq(out, "0\n");
  ck_assert_int_eq(mocod("embed --data rgb.npy --out o.npy", out, sizeof out), 2);
  /* --set changes the run's config as for mocod: threads may change, the model may not */
  ck_assert_msg(mocod("embed --checkpoint ck --data rgb.npy --out o.npy --set threads=2", out, sizeof out) == 0, "%s", out);
  ck_assert_int_eq(mocod("embed --checkpoint ck --data rgb.npy --out o.npy --set model.embed_dim=4", out, sizeof out), 1);
  ck_assert_msg(strstr(out, "architecture differs"), "%s", out);
  /* a safetensors file cut short, or with a wrong dtype, fails the layout check naming what */
  ck_assert_msg(mocod("--export-model ck q.safetensors", out, sizeof out) == 0, "%s", out);
  snprintf(cmd, sizeof cmd, "head -c 2000 %s/q.safetensors > %s/cut.safetensors && python3 scripts/load_encoder.py "
           "%s/cut.safetensors --check-layout", dir, dir, dir);
  ck_assert_int_eq(run_capture(cmd, out, sizeof out), 1);
  ck_assert_msg(strstr(out, "cut.safetensors"), "%s", out);
  snprintf(cmd, sizeof cmd, "sed 's/\"F32\"/\"F16\"/' %s/q.safetensors > %s/f16.safetensors && python3 "
           "scripts/load_encoder.py %s/f16.safetensors --check-layout", dir, dir, dir);
  ck_assert_int_eq(run_capture(cmd, out, sizeof out), 1);
  ck_assert_msg(strstr(out, "dtype F16, expected F32"), "%s", out);
}
END_TEST

Suite *export_suite(void) {
  Suite *s = suite_create("export");
  TCase *tc = tcase_create("export");
  tcase_set_timeout(tc, 120);
  /* one training run for the whole case: the tests only read its checkpoint and write beside it */
  tcase_add_unchecked_fixture(tc, setup, teardown);
  tcase_add_test(tc, safetensors_layout_is_complete_and_consistent);
  tcase_add_test(tc, offline_embed_streams_features_and_embeddings_with_labels_and_ids);
  tcase_add_test(tc, pytorch_embeddings_match_mocods_own);
  tcase_add_test(tc, daemon_exports_the_model_on_request);
  tcase_add_test(tc, bad_checkpoints_data_and_files_are_reported);
  suite_add_tcase(s, tc);
  return s;
}
