/* mococtl against the real daemon: it and its completion script cover every command of the daemon's
 * table with the same arguments, and the protocol's rough edges stay smooth (set with sections, the
 * error codes of refused keys, config sections, skipped-record counts, dates in human output). */
#include <check.h>
#include <jansson.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

static char dir[PATH_MAX], repo[PATH_MAX], bin[PATH_MAX];
static char out[1 << 16];

static void setup(void) {
  const char *b = getenv("MOCOD_BIN");
  ck_assert(realpath(b && *b ? b : "build/bin", bin) != NULL);
  ck_assert(getcwd(repo, sizeof repo) != NULL);
  snprintf(dir, sizeof dir, "%s", test_tmpdir());
}

static void teardown(void) {
  char cmd[3 * PATH_MAX];
  snprintf(cmd, sizeof cmd, "cd '%s' && [ -S run/mocod.sock ] && '%s/mococtl' stop >/dev/null 2>&1", dir, bin);
  if (system(cmd)) { /* nothing was running */
  }
  rm_rf(dir);
}

/* Runs a shell command in the test directory with the programs on PATH; output in `out`. */
static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...) {
  char cmd[3000], full[3000 + 3 * PATH_MAX];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(cmd, sizeof cmd, fmt, ap);
  va_end(ap);
  snprintf(full, sizeof full, "cd '%s' && PATH='%s':\"$PATH\" && %s", dir, bin, cmd);
  return run_capture(full, out, sizeof out);
}

#define SH_OK(...) ck_assert_msg(sh(__VA_ARGS__) == 0, "%s", out)
#define HAS(text) ck_assert_msg(strstr(out, text) != NULL, "no \"%s\" in:\n%s", text, out)

/* A human output line "  key:   value..." whose value starts with `value`, whatever the alignment. */
static int has_field(const char *key, const char *value) {
  char k[64];
  snprintf(k, sizeof k, "%s:", key);
  for (const char *p = strstr(out, k); p; p = strstr(p + 1, k)) {
    if (p != out && p[-1] != ' ' && p[-1] != '\n') continue;
    const char *v = p + strlen(k) + strspn(p + strlen(k), " ");
    if (!strncmp(v, value, strlen(value))) return 1;
  }
  return 0;
}
#define FIELD(key, value) ck_assert_msg(has_field(key, value), "no %s: %s in:\n%s", key, value, out)

/* The tiny job on the sample data, in the background; it finishes in a second and keeps answering. */
static void start_daemon(const char *extra) {
  SH_OK("mocod -c '%s/config/tiny.json' --set data.dir='%s/data' %s -d", repo, repo, extra);
}

static void wait_finished(void) {
  for (int i = 0; i < 600; i++) {
    sh("mococtl --json status");
    if (strstr(out, "\"state\":\"finished\"")) return;
    usleep(50000);
  }
  ck_abort_msg("training did not finish: %s", out);
}

START_TEST(completion_script_is_current) {
  SH_OK("mococtl --bash-completion > completion.txt && cmp completion.txt '%s/scripts/mococtl.bash-completion'",
        repo);
}
END_TEST

/* Every command the daemon lists is a mococtl command (subscribe is `watch`) that the completion script
 * offers with the daemon's own argument names, and every mococtl command but raw is the daemon's. */
START_TEST(mococtl_and_completion_cover_every_daemon_command) {
  start_daemon("");
  SH_OK("mococtl --json commands");
  json_t *r = json_loads(out, 0, NULL);
  ck_assert_msg(r != NULL, "%s", out);
  char *completion = NULL;
  SH_OK("cat '%s/scripts/mococtl.bash-completion'", repo);
  completion = strdup(out);
  const char *list = strstr(completion, "compgen -W \"status");
  ck_assert_msg(list != NULL, "no command list in the completion script");
  list += strlen("compgen -W \"");
  char offered[512]; /* " status pause ... raw " */
  snprintf(offered, sizeof offered, " %.*s ", (int)strcspn(list, "\""), list);
  SH_OK("mococtl --help");
  char *help = strdup(out);
  size_t i;
  json_t *c;
  json_array_foreach(json_object_get(r, "commands"), i, c) {
    const char *name = json_string_value(json_object_get(c, "name"));
    char typed[64]; /* as typed: subscribe is watch, export_model is export-model */
    snprintf(typed, sizeof typed, "%s", strcmp(name, "subscribe") ? name : "watch");
    for (char *u = typed; *u; u++) *u = *u == '_' ? '-' : *u;
    char word[80];
    snprintf(word, sizeof word, " %s ", typed);
    ck_assert_msg(strstr(offered, word) != NULL, "completion lacks the command %s", typed);
    snprintf(word, sizeof word, "\n  %s", typed);
    ck_assert_msg(strstr(help, word) != NULL, "mococtl --help lacks %s", typed);
    json_t *args = json_object_get(c, "args");
    if (json_array_size(args) == 0) continue;
    char want[512];
    size_t k = (size_t)snprintf(want, sizeof want, "    %s) keys=\"", typed), j;
    json_t *a;
    json_array_foreach(args, j, a) k += (size_t)snprintf(want + k, sizeof want - k, "%s%s=", j ? " " : "",
                                                         json_string_value(json_object_get(a, "name")));
    snprintf(want + k, sizeof want - k, "\"");
    /* positional words: config's key (completed with the config's keys), export-model's PATH [encoder] */
    if (!strcmp(name, "config") || !strcmp(name, "export_model")) continue;
    ck_assert_msg(strstr(completion, want) != NULL, "completion lacks: %s", want);
  }
  /* and back: mococtl's commands are the daemon's */
  for (char *w = strtok(offered, " "); w; w = strtok(NULL, " ")) {
    if (!strcmp(w, "raw")) continue;
    char proto[64];
    snprintf(proto, sizeof proto, "%s", strcmp(w, "watch") ? w : "subscribe");
    for (char *u = proto; *u; u++) *u = *u == '-' ? '_' : *u;
    int found = 0;
    json_array_foreach(json_object_get(r, "commands"), i, c) found |= !strcmp(json_string_value(json_object_get(c, "name")), proto);
    ck_assert_msg(found, "mococtl offers %s, which the daemon does not have", w);
  }
  free(help);
  free(completion);
  json_decref(r);
}
END_TEST

START_TEST(set_takes_sections_and_refuses_with_bad_args) {
  start_daemon("");
  SH_OK("mococtl raw '{\"cmd\":\"set\",\"args\":{\"optim\":{\"lr\":0.125},\"contrast\":{\"temperature\":0.25}}}'");
  HAS("\"optim.lr\":0.125");
  HAS("\"contrast.temperature\":0.25");
  ck_assert_int_eq(sh("mococtl set optim.lrr=3"), 1);
  HAS("args.optim.lrr: unknown key (did you mean 'optim.lr'?) (bad_args)");
  ck_assert_int_eq(sh("mococtl set optim.batch_size=64"), 1);
  HAS("args.optim.batch_size: cannot change while training");
  HAS("(bad_args)");
  ck_assert_int_eq(sh("mococtl set optim.lr=-1"), 1);
  HAS("args.optim.lr: value -1 out of range");
  ck_assert_int_eq(sh("mococtl raw '{\"cmd\":\"set\",\"args\":{\"optim\":{}}}'"), 1);
  HAS("args.optim: an empty object sets nothing");
  SH_OK("mococtl config optim");
  HAS("runtime_keys: [\"optim.lr\"");
  HAS("  batch_size:");
  SH_OK("mococtl config contrast.temperature");
  FIELD("value", "0.25");
}
END_TEST

START_TEST(eval_and_export_take_their_arguments) {
  start_daemon("");
  wait_finished();
  SH_OK("mococtl eval probe=true encoder=key limit=200");
  HAS("probe_acc:");
  SH_OK("mococtl --json eval limit=100");
  HAS("\"n_eval\":100");
  SH_OK("mococtl export path=emb.npy split=train what=embeddings && test -s emb.npy && test -s emb.labels.npy");
  FIELD("what", "embeddings");
  ck_assert_int_eq(sh("mococtl eval probes=true"), 3);
  HAS("'probes=true': unknown argument; allowed: probe encoder train_limit limit");
  ck_assert_int_eq(sh("mococtl nosuchcommand"), 3);
  HAS("unknown command 'nosuchcommand'");
  /* human status: times as dates, durations as h:mm:ss; the skipped count is there */
  SH_OK("mococtl status");
  FIELD("skipped", "0");
  FIELD("time", "20"); /* a date */
  ck_assert_msg(strstr(out, "e+09") == NULL, "a time printed as a number: %s", out);
  FIELD("uptime_sec", "0:00:");
  /* arrays of reals (the per-class accuracies) at the scalars' precision, not 0.97536944999999997 */
  const char *cls = strstr(out, "class_acc:");
  ck_assert_msg(cls != NULL, "no class_acc in:\n%s", out);
  size_t run = 0, longest = 0;
  for (const char *c = cls; *c && *c != '\n'; c++) {
    run = (*c >= '0' && *c <= '9') ? run + 1 : 0;
    if (run > longest) longest = run;
  }
  ck_assert_msg(longest <= 6, "a real in an array printed with %zu digits: %.300s", longest, cls);
}
END_TEST

/* A damaged block in sharded data: with data.bad_record skip the normalisation statistics and the
 * stream leave it out, and status, progress events and the log count it; with stop nothing starts. */
START_TEST(bad_records_are_skipped_and_counted) {
  SH_OK("mocopack idx --block-size 10K -o shards/train '%s/data/fmnist-train-images-idx3-ubyte.gz' && "
        "printf 'XXXX' | dd of=shards/train-00000.shard bs=1 seek=300000 conv=notrunc 2>/dev/null",
        repo);
  const char *data = "--set data.dir=shards --set 'data.train=train-*.shard' --set data.eval=";
  ck_assert_int_eq(sh("mocod -c '%s/config/tiny.json' %s --check-config", repo, data), 2);
  HAS("checksum");
  char extra[512];
  snprintf(extra, sizeof extra, "%s --set data.bad_record=skip", data);
  start_daemon(extra);
  wait_finished();
  SH_OK("mococtl --json status");
  ck_assert_msg(strstr(out, "\"skipped\":0") == NULL && strstr(out, "\"skipped\":"), "%s", out);
  SH_OK("grep -c '\"skipped\":[1-9]' run/progress.jsonl && grep 'normalisation statistics skipped' run/mocod.log && "
        "grep 'damaged record(s)' run/mocod.log");
}
END_TEST

/* Values changed with `set` survive stop and resume, unless the new command line sets the key. */
START_TEST(set_values_are_kept_across_resume) {
  start_daemon("--set optim.steps=400");
  SH_OK("mococtl set contrast.temperature=0.25 optim.lr=0.125 && mococtl stop");
  start_daemon("--set optim.steps=400 --set optim.lr=0.5");
  SH_OK("mococtl --json config contrast.temperature");
  HAS("\"value\":0.25");
  SH_OK("mococtl --json config optim.lr");
  HAS("\"value\":0.5");
  SH_OK("mococtl stop && grep '\"event\":\"start\"' run/progress.jsonl | tail -1");
  HAS("\"restored\":{\"contrast.temperature\":0.25}");
}
END_TEST

Suite *mococtl_suite(void) {
  Suite *s = suite_create("mococtl");
  TCase *tc = tcase_create("mococtl");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, completion_script_is_current);
  tcase_add_test(tc, mococtl_and_completion_cover_every_daemon_command);
  tcase_add_test(tc, set_takes_sections_and_refuses_with_bad_args);
  tcase_add_test(tc, eval_and_export_take_their_arguments);
  tcase_add_test(tc, bad_records_are_skipped_and_counted);
  tcase_add_test(tc, set_values_are_kept_across_resume);
  suite_add_tcase(s, tc);
  return s;
}
