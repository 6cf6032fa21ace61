/* Faults injected into the real daemon where they happen in service: SIGKILL at random moments (also
 * inside checkpoint writes), a full disk and a file-size limit while checkpointing, the log directory
 * removed or blocked, logs moved under it, a FIFO under a checkpoint's name, over-long paths, and
 * clients that stall, idle or come by the thousand. Each test starts $MOCOD_BIN/mocod on
 * config/tiny.json in its own directory (tests/daemon_harness.h). */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon_harness.h"
#include "testutil.h"
#include "train/checkpoint.h"

/* Parses every line of the progress log; a last line without its newline is allowed only when
 * torn_ok (the daemon was just killed). Returns the number of lines; *last_start gets the newest
 * start event (owned) when not NULL. */
static int check_progress(int torn_ok, json_t **last_start) {
  char *text = dh_slurp(dh_path("run/progress.jsonl"));
  ck_assert_ptr_nonnull(text);
  if (last_start) *last_start = NULL;
  int n = 0;
  for (char *l = text, *nl; *l; l = nl + 1) {
    nl = strchr(l, '\n');
    if (!nl) {
      ck_assert_msg(torn_ok, "progress log ends in a line without newline: %.200s", l);
      break;
    }
    json_error_t e;
    json_t *j = json_loadb(l, (size_t)(nl - l), 0, &e);
    ck_assert_msg(j != NULL, "progress line %d does not parse (%s): %.200s", n + 1, e.text, l);
    if (last_start && !strcmp(json_string_value(json_object_get(j, "event")), "start")) {
      json_decref(*last_start);
      *last_start = json_incref(j);
    }
    json_decref(j);
    n++;
  }
  free(text);
  return n;
}

/* Every file under a checkpoint's final name verifies: a kill leaves the old file or the new one,
 * never half of one. Returns how many there are. */
static int check_checkpoints_whole(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return 0;
  int n = 0;
  struct dirent *de;
  while ((de = readdir(d))) {
    if (strncmp(de->d_name, "ckpt-", 5)) continue;
    char p[PATH_MAX + 300];
    snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
    checkpoint_file f;
    ck_assert_msg(checkpoint_read(&f, p) == 0, "%s does not verify", p);
    checkpoint_file_free(&f);
    n++;
  }
  closedir(d);
  return n;
}

static int count_tmp_files(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return 0;
  int n = 0;
  struct dirent *de;
  while ((de = readdir(d))) n += strstr(de->d_name, ".tmp") != NULL;
  closedir(d);
  return n;
}

static int fault_kills(void) {
  const char *e = getenv("MOCOD_FAULT_KILLS");
  return e && atoi(e) > 0 ? atoi(e) : 10;
}

/* The issue asks for 50 kills; `make test` runs 10 to stay within seconds, and
 * MOCOD_FAULT_KILLS=50 (scripts/fault-kills.sh) runs the full count. Half the kills land within
 * milliseconds of a `checkpoint` command, so inside its write. */
START_TEST(sigkill_anywhere_then_resume_from_newest_complete_checkpoint) {
  const char *seed_env = getenv("MOCOD_FAULT_SEED");
  unsigned seed = seed_env ? (unsigned)atoi(seed_env) : (unsigned)getpid();
  srand(seed);
  int kills = fault_kills();
  char ckdir[PATH_MAX + 64];
  snprintf(ckdir, sizeof ckdir, "%s", dh_path("run/checkpoints"));
  long long expect = -1; /* step the next start must resume at; -1: nothing on disk yet */
  for (int i = 0; i < kills; i++) {
    const char *args[] = {"--set", "optim.steps=100000", "--set", "checkpoint.every_steps=4", "--set",
                          "checkpoint.keep=3", "--set", "log.every_steps=1",
                          expect >= 0 ? "--resume" : NULL, NULL};
    int pid = 0;
    int rc = dh_start_argv(&pid, args);
    char *out = dh_slurp(dh_path("out.txt"));
    ck_assert_msg(rc == 0 && pid > 0, "start %d (seed %u) failed: %s", i, seed, out ? out : "");
    free(out);
    json_t *start = NULL;
    check_progress(0, &start);
    ck_assert_ptr_nonnull(start);
    ck_assert_msg(json_integer_value(json_object_get(start, "step")) == (expect < 0 ? 0 : expect),
                  "start %d (seed %u) at step %lld, the newest complete checkpoint is at %lld", i, seed,
                  (long long)json_integer_value(json_object_get(start, "step")), expect);
    json_decref(start);

    if (i % 2) {
      dh_client *c = dh_client_open(1);
      dh_wait_step(1 + rand() % 8, 10);
      ck_assert_int_eq(dh_client_send(c, "{\"id\":1,\"cmd\":\"checkpoint\"}\n"), 0);
      usleep((useconds_t)(rand() % 4000));
      kill(pid, SIGKILL);
      dh_client_close(c);
    } else {
      usleep((useconds_t)(rand() % 150000));
      kill(pid, SIGKILL);
    }
    ck_assert_int_eq(dh_wait_exit(pid, 10), 128 + SIGKILL);
    check_progress(1, NULL);
    check_checkpoints_whole(ckdir);
    checkpoint_file f;
    if (checkpoint_read_latest(&f, ckdir, NULL, NULL) == 0) {
      expect = f.step;
      checkpoint_file_free(&f);
    }
  }
  /* The last restart repairs a torn line, and a clean stop leaves every line whole. */
  int pid = dh_start("optim.steps=100000", NULL);
  dh_stop(pid);
  check_progress(0, NULL);
}
END_TEST

/* Lowers the daemon's file-size limit (the test's prlimit on another process): writes past it fail
 * with EFBIG, as on a full disk. Pass RLIM_INFINITY to lift it. */
static void set_fsize(int pid, rlim_t bytes) {
  struct rlimit rl = {bytes, RLIM_INFINITY};
  ck_assert_msg(prlimit(pid, RLIMIT_FSIZE, &rl, NULL) == 0, "prlimit: %s", strerror(errno));
}

static json_t *status(void) { return dh_call_ok("{\"id\":1,\"cmd\":\"status\"}", 5); }

START_TEST(checkpoint_that_cannot_be_written_is_reported_retried_and_training_goes_on) {
  int pid = dh_start("optim.steps=100000", "checkpoint.every_steps=0", "checkpoint.every_seconds=0",
                     "log.every_steps=100000", NULL);
  dh_client *sub = dh_client_open(1);
  json_t *a = dh_client_call(sub, "{\"id\":1,\"cmd\":\"subscribe\"}", 5);
  json_decref(a);
  dh_wait_step(2, 10);
  json_t *good = dh_call_ok("{\"id\":1,\"cmd\":\"checkpoint\"}", 20);
  long long g = json_integer_value(json_object_get(good, "step"));
  long long bytes = json_integer_value(json_object_get(good, "bytes"));
  json_decref(good);
  struct stat st;
  ck_assert_int_eq(stat(dh_path("run/progress.jsonl"), &st), 0);
  ck_assert_msg(st.st_size < bytes / 2, "the progress log (%lld bytes) would hit the limit first",
                (long long)st.st_size);
  set_fsize(pid, (rlim_t)(bytes / 2));
  dh_wait_step(g + 2, 10);

  dh_client *c = dh_client_open(1);
  a = dh_client_call(c, "{\"id\":2,\"cmd\":\"checkpoint\"}", 20);
  ck_assert_ptr_nonnull(a);
  ck_assert(json_is_false(json_object_get(a, "ok")));
  const char *msg = json_string_value(json_object_get(json_object_get(a, "error"), "message"));
  ck_assert_msg(strstr(msg, "checkpoint failed") && strstr(msg, "File too large"), "%s", msg);
  json_decref(a);
  /* The error event reached the subscriber. */
  int seen = 0;
  json_t *ev;
  while (!seen && (ev = dh_client_line(sub, 5))) {
    seen = !strcmp(json_string_value(json_object_get(ev, "event")), "error") &&
           !strcmp(json_string_value(json_object_get(ev, "what")), "checkpoint");
    json_decref(ev);
  }
  ck_assert_msg(seen, "no error event for the failed checkpoint");
  /* No partial file; status keeps the last good one and names the failure; training goes on. */
  ck_assert_int_eq(count_tmp_files(dh_path("run/checkpoints")), 0);
  ck_assert_int_eq(check_checkpoints_whole(dh_path("run/checkpoints")), 1);
  json_t *s = status();
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(s, "last_checkpoint"), "step")), g);
  ck_assert(json_is_object(json_object_get(s, "last_checkpoint_error")));
  ck_assert_int_eq(json_integer_value(json_object_get(s, "checkpoint_failures")), 1);
  long long now = json_integer_value(json_object_get(s, "step"));
  json_decref(s);
  dh_wait_step(now + 3, 10);
  /* Room again: the next checkpoint is written and the failure cleared. */
  set_fsize(pid, RLIM_INFINITY);
  a = dh_client_call(c, "{\"id\":3,\"cmd\":\"checkpoint\"}", 20);
  ck_assert(json_is_true(json_object_get(a, "ok")));
  json_decref(a);
  s = status();
  ck_assert_int_gt(json_integer_value(json_object_get(json_object_get(s, "last_checkpoint"), "step")), g);
  ck_assert(json_is_null(json_object_get(s, "last_checkpoint_error")));
  json_decref(s);
  dh_client_close(c);
  dh_client_close(sub);
  dh_stop(pid);
  char *log = dh_slurp(dh_path("run/mocod.log"));
  ck_assert_msg(strstr(log, "checkpoint failed at step"), "%s", log);
  free(log);
}
END_TEST

START_TEST(stop_whose_checkpoint_fails_answers_an_error) {
  int pid = dh_start("optim.steps=100000", "checkpoint.every_steps=0", "checkpoint.every_seconds=0",
                     "log.every_steps=100000", NULL);
  dh_wait_step(2, 10);
  json_t *good = dh_call_ok("{\"id\":1,\"cmd\":\"checkpoint\"}", 20);
  long long g = json_integer_value(json_object_get(good, "step"));
  long long bytes = json_integer_value(json_object_get(good, "bytes"));
  json_decref(good);
  set_fsize(pid, (rlim_t)(bytes / 2));
  dh_wait_step(g + 2, 10);
  dh_client *c = dh_client_open(1);
  json_t *a = dh_client_call(c, "{\"id\":1,\"cmd\":\"stop\"}", 20);
  dh_client_close(c);
  ck_assert_ptr_nonnull(a);
  ck_assert_msg(json_is_false(json_object_get(a, "ok")), "stop answered success after a failed checkpoint");
  const char *msg = json_string_value(json_object_get(json_object_get(a, "error"), "message"));
  ck_assert_msg(strstr(msg, "its checkpoint failed") && strstr(msg, "are lost"), "%s", msg);
  json_decref(a);
  ck_assert_int_eq(dh_wait_exit(pid, 20), 1);
  /* The progress log says it too: an error event and a stop event naming the failure. */
  char *text = dh_slurp(dh_path("run/progress.jsonl"));
  ck_assert_msg(strstr(text, "\"event\":\"error\"") && strstr(text, "\"what\":\"checkpoint\"") &&
                    strstr(text, "\"checkpoint_error\""),
                "%s", text);
  free(text);
}
END_TEST

/* A real full file system: a small tmpfs in a mount namespace of this test process (root, or
 * unprivileged user namespaces, needed; otherwise the test says so and passes on what it can). */
START_TEST(full_disk_prunes_old_checkpoints_to_make_room) {
  char ck[PATH_MAX + 64];
  snprintf(ck, sizeof ck, "%s", dh_path("ck"));
  ck_assert_int_eq(mkdir(ck, 0700), 0);
  if (unshare(CLONE_NEWNS) != 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0 ||
      mount("tmpfs", ck, "tmpfs", 0, "size=200k") != 0) {
    fprintf(stderr, "faults: no mount namespace here (%s); the full-disk case is covered only by the "
                    "file-size limit test\n", strerror(errno));
    return;
  }
  /* 55 KB checkpoints: three fit in 200 KB, the fourth finds the disk full. */
  char dirset[PATH_MAX + 128];
  snprintf(dirset, sizeof dirset, "checkpoint.dir=%s", ck);
  int pid = dh_start("optim.steps=100000", dirset, "checkpoint.every_steps=3", "checkpoint.keep=10",
                     "log.every_steps=100000", NULL);
  double end = clock_now() + 30;
  char *log = NULL;
  while (clock_now() < end) {
    free(log);
    log = dh_slurp(dh_path("run/mocod.log"));
    if (strstr(log, "disk full: deleted")) break;
    usleep(20000);
  }
  ck_assert_msg(strstr(log, "disk full: deleted"), "no pruning for room: %s", log);
  free(log);
  json_t *s = status();
  ck_assert_int_eq(json_integer_value(json_object_get(s, "checkpoint_failures")), 0);
  json_decref(s);
  dh_stop(pid);
  ck_assert_int_eq(count_tmp_files(ck), 0);
  ck_assert_int_ge(check_checkpoints_whole(ck), 1);
  umount2(ck, MNT_DETACH);
}
END_TEST

START_TEST(fifo_named_like_a_checkpoint_does_not_block_startup) {
  int pid = dh_start("optim.steps=100000", NULL);
  dh_wait_step(3, 10);
  dh_stop(pid);
  checkpoint_file f;
  ck_assert_int_eq(checkpoint_read_latest(&f, dh_path("run/checkpoints"), NULL, NULL), 0);
  long long good = f.step;
  checkpoint_file_free(&f);
  ck_assert_int_eq(mkfifo(dh_path("run/checkpoints/ckpt-000009999999.mcp"), 0600), 0);
  pid = dh_start("optim.steps=100000", NULL);
  json_t *s = status();
  ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(s, "last_checkpoint"), "step")),
                   good);
  json_decref(s);
  dh_stop(pid);
  char *log = dh_slurp(dh_path("run/mocod.log"));
  ck_assert_msg(strstr(log, "ckpt-000009999999.mcp: not a regular file"), "%s", log);
  free(log);
  /* Not a checkpoint, so not pruned either. */
  struct stat st;
  ck_assert_int_eq(stat(dh_path("run/checkpoints/ckpt-000009999999.mcp"), &st), 0);
  ck_assert(S_ISFIFO(st.st_mode));
}
END_TEST

START_TEST(long_paths_work_or_are_refused_by_name) {
  /* 1,500 bytes (over the old 1,023-byte buffers): used whole. */
  char deep[1600] = "", set[1700];
  for (int i = 0; i < 7; i++) {
    char part[210];
    memset(part, 'a' + i, 200);
    part[200] = '\0';
    strcat(deep, part);
    strcat(deep, "/");
  }
  strcat(deep, "ck");
  snprintf(set, sizeof set, "checkpoint.dir=%s", deep);
  int pid = dh_start("optim.steps=100000", set, NULL);
  dh_wait_step(2, 10);
  dh_stop(pid);
  ck_assert_int_ge(check_checkpoints_whole(dh_path(deep)), 1);
  /* 5,000 bytes: refused at once, naming the key. */
  char *huge = malloc(5100);
  strcpy(huge, "checkpoint.dir=");
  memset(huge + strlen(huge), 'x', 5000);
  huge[15 + 5000] = '\0';
  ck_assert_int_eq(dh_mocod("--set", huge, "--check-config", NULL), 2);
  char *out = dh_slurp(dh_path("out.txt"));
  ck_assert_msg(strstr(out, "checkpoint.dir: path of 5000 bytes"), "%s", out);
  free(out);
  /* export's path: the same, naming args.path. */
  pid = dh_start("optim.steps=100000", NULL);
  char *req = malloc(5200);
  snprintf(req, 5200, "{\"id\":1,\"cmd\":\"export\",\"args\":{\"path\":\"%s\"}}", huge + 15);
  dh_client *c = dh_client_open(1);
  json_t *a = dh_client_call(c, req, 10);
  ck_assert_str_eq(dh_error_code(a), "bad_args");
  ck_assert_ptr_nonnull(strstr(json_string_value(json_object_get(json_object_get(a, "error"), "message")),
                               "args.path: path of 5000 bytes"));
  json_decref(a);
  dh_client_close(c);
  free(req);
  free(huge);
  dh_stop(pid);
}
END_TEST

/* The deleted file a process still writes to: the contents of its fd whose link names `name` and
 * "(deleted)". NULL when there is none. */
static char *read_deleted_fd(int pid, const char *name) {
  char d[64];
  snprintf(d, sizeof d, "/proc/%d/fd", pid);
  DIR *dir = opendir(d);
  if (!dir) return NULL;
  char *text = NULL;
  struct dirent *de;
  while (!text && (de = readdir(dir))) {
    char link[PATH_MAX + 32], target[PATH_MAX];
    snprintf(link, sizeof link, "%s/%s", d, de->d_name);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n <= 0) continue;
    target[n] = '\0';
    if (strstr(target, name) && strstr(target, "(deleted)")) text = dh_slurp(link);
  }
  closedir(dir);
  return text;
}

static void wait_for_text(const char *file, const char *what) {
  double end = clock_now() + 10;
  char *text = NULL;
  while (clock_now() < end) {
    free(text);
    text = dh_slurp(file);
    if (text && strstr(text, what)) break;
    usleep(10000);
  }
  ck_assert_msg(text && strstr(text, what), "%s does not say \"%s\": %s", file, what, text ? text : "");
  free(text);
}

START_TEST(log_directory_removed_or_blocked_and_moved_logs) {
  int pid = dh_start("optim.steps=100000", "log.file=logs/mocod.log", "log.progress=logs/progress.jsonl",
                     NULL);
  dh_wait_step(2, 10);
  /* logrotate: moved, then SIGHUP. */
  ck_assert_int_eq(rename(dh_path("logs/mocod.log"), dh_path("logs/mocod.log.1")), 0);
  kill(pid, SIGHUP);
  wait_for_text(dh_path("logs/mocod.log"), "SIGHUP: log files reopened");
  /* The directory removed: training goes on; SIGHUP recreates it. */
  rm_rf(dh_path("logs"));
  long long s = dh_status_step();
  dh_wait_step(s + 3, 10);
  kill(pid, SIGHUP);
  wait_for_text(dh_path("logs/mocod.log"), "SIGHUP: log files reopened");
  /* Removed and a file put in its way: the old files stay in use and the log says why. */
  rm_rf(dh_path("logs"));
  FILE *f = fopen(dh_path("logs"), "w");
  fclose(f);
  kill(pid, SIGHUP);
  double end = clock_now() + 10;
  char *old = NULL;
  while (clock_now() < end) {
    free(old);
    old = read_deleted_fd(pid, "logs/mocod.log");
    if (old && strstr(old, "still writing to the log file opened before")) break;
    usleep(10000);
  }
  ck_assert_msg(old && strstr(old, "still writing to the log file opened before"), "%s", old ? old : "");
  free(old);
  s = dh_status_step();
  dh_wait_step(s + 3, 10);
  unlink(dh_path("logs"));
  kill(pid, SIGHUP);
  wait_for_text(dh_path("logs/mocod.log"), "SIGHUP: log files reopened");
  dh_stop(pid);
}
END_TEST

/* Connections that never send, one that sends without ever reading, a thousand at once: the others'
 * status is answered and training advances. (Latency is measured by bench_soak, not judged here.) */
START_TEST(stalled_idle_and_a_thousand_clients_harm_nobody) {
  struct rlimit rl;
  getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
  int n = rl.rlim_cur > 1100 ? 1000 : (int)rl.rlim_cur - 100;
  int pid = dh_start("optim.steps=100000", NULL);
  dh_client **idle = calloc((size_t)n, sizeof *idle);
  for (int i = 0; i < n; i++) idle[i] = dh_client_open(1);
  /* The stalled one pipelines requests and reads nothing, until the kernel stops taking them. */
  dh_client *stalled = dh_client_open(1);
  int fd = dh_client_fd(stalled);
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  for (int i = 0; i < 100000; i++)
    if (dh_client_send(stalled, "{\"id\":1,\"cmd\":\"status\"}\n")) break;
  long long s0 = dh_status_step();
  for (int i = 0; i < 20; i++) {
    json_t *st = status();
    ck_assert_int_ge(json_integer_value(json_object_get(st, "clients")), 1);
    json_decref(st);
  }
  dh_wait_step(s0 + 5, 20);
  json_t *st = status();
  ck_assert_int_ge(json_integer_value(json_object_get(st, "clients")), n);
  json_decref(st);
  for (int i = 0; i < n; i++) dh_client_close(idle[i]);
  free(idle);
  dh_client_close(stalled);
  dh_stop(pid);
}
END_TEST

Suite *faults_suite(void) {
  Suite *s = suite_create("faults");
  /* The kills in their own case, so that scripts/fault-kills.sh runs them alone (CK_RUN_CASE=kills). */
  TCase *kills = tcase_create("kills");
  tcase_add_checked_fixture(kills, dh_setup, dh_teardown);
  tcase_set_timeout(kills, 120);
  tcase_add_test(kills, sigkill_anywhere_then_resume_from_newest_complete_checkpoint);
  suite_add_tcase(s, kills);
  TCase *tc = tcase_create("faults");
  tcase_add_checked_fixture(tc, dh_setup, dh_teardown);
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, checkpoint_that_cannot_be_written_is_reported_retried_and_training_goes_on);
  tcase_add_test(tc, stop_whose_checkpoint_fails_answers_an_error);
  tcase_add_test(tc, full_disk_prunes_old_checkpoints_to_make_room);
  tcase_add_test(tc, fifo_named_like_a_checkpoint_does_not_block_startup);
  tcase_add_test(tc, long_paths_work_or_are_refused_by_name);
  tcase_add_test(tc, log_directory_removed_or_blocked_and_moved_logs);
  tcase_add_test(tc, stalled_idle_and_a_thousand_clients_harm_nobody);
  suite_add_tcase(s, tc);
  return s;
}
