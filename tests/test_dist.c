/* A world of several ranks (core/dist.h) against one process: dist-check (tests/dist/dist_check.c) trains
 * the tiny model on a synthetic global batch, alone and under `mpirun -np 2`, and the runs must agree.
 * Tests run as root in CI, hence the OMPI_ALLOW_RUN_AS_ROOT variables. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/blob.h"
#include "core/err.h"
#include "data/loader.h"
#include "testutil.h"
#include "train/checkpoint.h"
#include "service/config.h"

/* Under the sanitizers, Open MPI's own allocations kept past MPI_Finalize are not ours to report
 * (tests/lsan-mpi.supp); the full unwinder reaches them through its dlopen'ed components. */
#define MPIENV "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 " \
               "LSAN_OPTIONS=suppressions=tests/lsan-mpi.supp ASAN_OPTIONS=fast_unwind_on_malloc=0 "
#define MPIRUN MPIENV "mpirun -np %d --oversubscribe "

/* The end of a command's output, short enough for a check message. */
static const char *tail_of(const char *out) {
  size_t n = strlen(out);
  return n > 1500 ? out + n - 1500 : out;
}

enum { STEPS = 50 };

/* Runs dist-check in a world of np (1: without mpirun) into dir/name.{loss,queue}. */
static void run_check(const char *dir, const char *name, int np, int sync_bn) {
  const char *train = data_path("fmnist-train-images-idx3-ubyte.gz");
  char cmd[4096], out[8192];
  if (np == 1)
    snprintf(cmd, sizeof cmd, "%s %s %d %d %s/%s", bin_path("dist-check"), train, STEPS, sync_bn, dir, name);
  else
    snprintf(cmd, sizeof cmd, MPIRUN "%s %s %d %d %s/%s", np, bin_path("dist-check"), train, STEPS, sync_bn, dir,
             name);
  int rc = run_capture(cmd, out, sizeof out);
  ck_assert_msg(rc == 0, "%s: exit %d\n%s", cmd, rc, tail_of(out));
}

static void read_losses(const char *dir, const char *name, double *loss) {
  char path[4200];
  snprintf(path, sizeof path, "%s/%s.loss", dir, name);
  FILE *f = fopen(path, "r");
  ck_assert_msg(f != NULL, "%s missing", path);
  for (int t = 0; t < STEPS; t++) {
    int step;
    ck_assert_msg(fscanf(f, "%d %lf", &step, &loss[t]) == 2 && step == t, "%s: step %d", path, t);
  }
  fclose(f);
}

static size_t read_queue(const char *dir, const char *name, float *q, size_t cap) {
  char path[4200];
  snprintf(path, sizeof path, "%s/%s.queue", dir, name);
  FILE *f = fopen(path, "rb");
  ck_assert_msg(f != NULL, "%s missing", path);
  size_t n = fread(q, sizeof *q, cap, f);
  fclose(f);
  return n;
}

/* The largest relative difference of the two runs' losses, over steps whose loss is not 0 (the first
 * step has an empty queue). */
static double loss_gap(const double *a, const double *b, int *compared) {
  double worst = 0.0;
  *compared = 0;
  for (int t = 0; t < STEPS; t++) {
    if (a[t] == 0.0 && b[t] == 0.0) continue;
    double g = fabs(a[t] - b[t]) / fmax(fabs(a[t]), fabs(b[t]));
    if (g > worst) worst = g;
    ++*compared;
  }
  return worst;
}

/* The proof of equivalence: a world of 2 with SyncBN and the shuffle-BN groups split across ranks is one
 * process on the whole batch, up to the order of float sums (BatchNorm's sums, the halved sgemms, the
 * all-reduce), which training then carries along: 1e-4 relative on every loss of 50 steps (seen: 1.4e-7)
 * and the queue's unit keys within 1e-4 (seen: 2.6e-6). Per-rank BatchNorm, the nearest wrong model,
 * is 2e-2 and 1e-1 away (below). */
START_TEST(two_ranks_reproduce_one_process) {
  char *dir = strdup(test_tmpdir());
  run_check(dir, "one", 1, 1);
  run_check(dir, "two", 2, 1);
  double a[STEPS], b[STEPS];
  read_losses(dir, "one", a);
  read_losses(dir, "two", b);
  int compared;
  double gap = loss_gap(a, b, &compared);
  ck_assert_int_ge(compared, STEPS - 2);
  ck_assert_msg(gap < 1e-4, "losses differ by %g relative", gap);
  enum { CAP = 1 << 16 };
  float *qa = malloc(CAP * sizeof *qa), *qb = malloc(CAP * sizeof *qb);
  size_t na = read_queue(dir, "one", qa, CAP), nb = read_queue(dir, "two", qb, CAP);
  ck_assert_uint_eq(na, nb);
  ck_assert_uint_gt(na, 0);
  double worst = 0.0;
  for (size_t i = 0; i < na; i++) worst = fmax(worst, fabs((double)qa[i] - qb[i]));
  ck_assert_msg(worst < 1e-4, "queue keys differ by %g", worst);
  free(qa);
  free(qb);
  rm_rf(dir);
  free(dir);
}
END_TEST

/* Without SyncBN each rank normalises its own half of the batch (MoCo v1/v2 under DDP): a different
 * model, which the comparison above must be able to see. */
START_TEST(per_rank_batchnorm_is_not_one_process) {
  char *dir = strdup(test_tmpdir());
  run_check(dir, "one", 1, 0);
  run_check(dir, "two", 2, 0);
  double a[STEPS], b[STEPS];
  read_losses(dir, "one", a);
  read_losses(dir, "two", b);
  int compared;
  double gap = loss_gap(a, b, &compared);
  ck_assert_msg(gap > 1e-3, "per-rank statistics left the losses within %g", gap);
  rm_rf(dir);
  free(dir);
}
END_TEST

enum { SHARE_B = 24 };

/* The loader settings of the share tests: batch 24 from `train`, a shuffle window of 500. */
static loader_config share_config(const char *train) {
  loader_config c = config_defaults()->trainer.loader;
  c.drop_last = 1;
  c.train = train;
  c.batch_size = SHARE_B;
  c.shuffle_buffer = 500;
  c.workers = 2;
  c.seed = 5;
  return c;
}

/* A rank's share of the stream is its slice of the batch one process gets: same ids and labels, the same
 * views to the bit (each view's randomness comes from (seed, epoch, id, view)), for three batches. */
static void check_slices(const char *train, int disjoint) {
  enum { B = SHARE_B, N = 3, IN = 28 * 28 };
  loader whole, part[N];
  loader_config c = share_config(train);
  ck_assert_msg(loader_open(&whole, &c) == 0, "%s", moco_errmsg());
  for (int r = 0; r < N; r++) {
    loader_config cr = c;
    cr.share_index = r;
    cr.share_count = N;
    ck_assert_msg(loader_open(&part[r], &cr) == 0, "%s", moco_errmsg());
    ck_assert_int_eq(loader_reads_share(&part[r]), disjoint);
  }
  for (int step = 0; step < 3; step++) {
    loader_batch w;
    ck_assert_int_eq(loader_next(&whole, &w), 0);
    ck_assert_int_eq(w.size, B);
    for (int r = 0; r < N; r++) {
      loader_batch b;
      ck_assert_int_eq(loader_next(&part[r], &b), 0);
      int r0 = r * B / N;
      ck_assert_int_eq(b.size, B / N);
      ck_assert_uint_eq(b.index, w.index);
      ck_assert_mem_eq(b.ids, w.ids + r0, (size_t)b.size * sizeof *b.ids);
      ck_assert_mem_eq(b.labels, w.labels + r0, (size_t)b.size * sizeof *b.labels);
      ck_assert_mem_eq(b.view1, w.view1 + (size_t)r0 * IN, (size_t)b.size * IN * sizeof(float));
      ck_assert_mem_eq(b.view2, w.view2 + (size_t)r0 * IN, (size_t)b.size * IN * sizeof(float));
    }
  }
  c.share_index = 3;
  c.share_count = 3;
  loader bad;
  ck_assert_int_eq(loader_open(&bad, &c), MOCO_ECONFIG);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "share_index"));
  for (int r = 0; r < N; r++) loader_close(&part[r]);
  loader_close(&whole);
}

START_TEST(loader_shares_are_slices_of_the_batch) { check_slices(data_path("fmnist-train-images-idx3-ubyte.gz"), 0); }
END_TEST

/* The records a share reads in one epoch of `train` (epochs = 1, so the reader stops at its end), and
 * the rows it was handed. */
static uint64_t epoch_reads(const char *train, int index, int count, uint64_t *rows) {
  loader_config c = share_config(train);
  c.epochs = 1;
  c.share_index = index;
  c.share_count = count;
  loader l;
  ck_assert_msg(loader_open(&l, &c) == 0, "%s", moco_errmsg());
  loader_batch b;
  *rows = 0;
  while (loader_next(&l, &b) == 0 && b.size > 0) *rows += (uint64_t)b.size;
  uint64_t n = loader_records_read(&l);
  loader_close(&l);
  return n;
}

/* On files that seek (the sample set as a plain IDX file) every share reads only the records of its
 * rows: over one epoch the two shares' reads add up to the 2,000 records once (a record read by both
 * would make the sum larger; each share reads at least its rows), and they still get exactly their
 * slices of one process's batches. On the gzip file (a stream) each share reads all 2,000. A share
 * resumed from a saved position mid-window continues as it would have. */
START_TEST(loader_shares_read_disjoint_records) {
  enum { RECORDS = 2000, IN = 28 * 28 };
  char cmd[8192], out[1024];
  static const char *const names[2] = {"train-images-idx3-ubyte", "train-labels-idx1-ubyte"};
  for (int i = 0; i < 2; i++) { /* data_path's answer lasts until its next call */
    char gz[64];
    snprintf(gz, sizeof gz, "fmnist-%s.gz", names[i]);
    snprintf(cmd, sizeof cmd, "gunzip -c %s > %s", data_path(gz), test_scratch_path(i, names[i]));
    ck_assert_int_eq(run_capture(cmd, out, sizeof out), 0);
  }
  const char *plain = test_scratch_slot(0);
  check_slices(plain, 1);
  uint64_t rows[2], reads[2];
  for (int r = 0; r < 2; r++) {
    reads[r] = epoch_reads(plain, r, 2, &rows[r]);
    ck_assert_uint_ge(reads[r], rows[r]);
  }
  ck_assert_uint_eq(rows[0] + rows[1], RECORDS / SHARE_B * SHARE_B);
  ck_assert_uint_eq(reads[0] + reads[1], RECORDS);
  uint64_t whole_rows;
  ck_assert_uint_eq(epoch_reads(plain, 0, 1, &whole_rows), RECORDS);
  ck_assert_uint_eq(epoch_reads(data_path("fmnist-train-images-idx3-ubyte.gz"), 1, 2, &rows[1]), RECORDS);

  /* Resume: share 1 of 2 saved after 30 batches (window of 500 = 20.8 batches: mid-window) against the
   * same share going on. */
  loader_config c = share_config(plain);
  c.share_index = 1;
  c.share_count = 2;
  loader a, b;
  ck_assert_int_eq(loader_open(&a, &c), 0);
  ck_assert_int_eq(loader_open(&b, &c), 0);
  loader_batch x, y;
  for (int i = 0; i < 30; i++) ck_assert_int_eq(loader_next(&a, &x), 0);
  loader_pos p;
  loader_position(&a, &p);
  ck_assert_int_eq(loader_seek(&b, &p), 0);
  for (int i = 0; i < 30; i++) {
    ck_assert_int_eq(loader_next(&a, &x), 0);
    ck_assert_int_eq(loader_next(&b, &y), 0);
    ck_assert_int_eq(x.size, y.size);
    ck_assert_mem_eq(x.ids, y.ids, (size_t)x.size * sizeof *x.ids);
    ck_assert_mem_eq(x.view1, y.view1, (size_t)x.size * IN * sizeof(float));
  }
  loader_close(&a);
  loader_close(&b);
}
END_TEST

/* ---- the daemon across ranks ---- */

/* mocod on config/tiny.json with everything under dir, SyncBN, a progress event every step, exiting when
 * done; np 1 runs it without mpirun. `extra` adds --set options. */
static void mocod_opts(char *opts, size_t n, const char *dir, const char *extra) {
  snprintf(opts, n,
           "-c config/tiny.json --set data.dir='\"data\"' --set log.progress='\"%s/progress.jsonl\"' "
           "--set log.file='\"%s/mocod.log\"' --set checkpoint.dir='\"%s/ckpt\"' "
           "--set service.socket='\"%s/sock\"' --set service.pid_file='\"%s/pid\"' "
           "--set log.every_steps=1 --set model.sync_bn=true --set service.exit_on_finish=true %s",
           dir, dir, dir, dir, dir, extra);
}

static void mocod_cmd(char *cmd, size_t n, int np, const char *dir, const char *extra) {
  char pre[256] = "", opts[4096];
  if (np > 1) snprintf(pre, sizeof pre, MPIRUN, np);
  mocod_opts(opts, sizeof opts, dir, extra);
  snprintf(cmd, n, "%s%s %s", pre, bin_path("mocod"), opts);
}

/* The losses of the progress events, in step order; returns how many. */
static int progress_losses(const char *dir, double *loss, int cap) {
  char path[4200], line[8192];
  snprintf(path, sizeof path, "%s/progress.jsonl", dir);
  FILE *f = fopen(path, "r");
  ck_assert_msg(f != NULL, "%s missing", path);
  int n = 0;
  while (n < cap && fgets(line, sizeof line, f)) {
    const char *l = strstr(line, "\"loss\":");
    if (strncmp(line, "{\"event\":\"progress\"", 19) || !l) continue;
    loss[n++] = atof(l + 7);
  }
  fclose(f);
  return n;
}

/* The queue's keys in the newest checkpoint under dir/ckpt (section QUEU: size, dim, ptr, filled, keys). */
static size_t checkpoint_queue(const char *dir, float *keys, size_t cap) {
  char ck[4200];
  snprintf(ck, sizeof ck, "%s/ckpt", dir);
  checkpoint_file f;
  ck_assert_int_eq(checkpoint_read_latest(&f, ck, NULL, NULL), 0);
  blob_reader r = f.body, sub;
  char tag[4];
  size_t n = 0;
  while (blob_peek_tag(&r, tag) && blob_section(&r, tag, &sub) == 0) {
    if (memcmp(tag, "QUEU", 4)) continue;
    uint32_t K, d, ptr, filled;
    ck_assert(!blob_get_u32(&sub, &K) && !blob_get_u32(&sub, &d) && !blob_get_u32(&sub, &ptr) &&
              !blob_get_u32(&sub, &filled));
    n = (size_t)K * d;
    ck_assert_uint_le(n, cap);
    ck_assert_int_eq(blob_get(&sub, keys, n * sizeof *keys), 0);
    break;
  }
  checkpoint_file_free(&f);
  return n;
}

/* `mpirun -np 2 mocod` is one daemon training the tiny job as one mocod does: the same loss at every
 * one of 50 steps and the same queue in the final checkpoint, to float rounding (see above). */
START_TEST(daemon_two_ranks_train_as_one) {
  char *a = strdup(test_tmpdir()), *b = strdup(test_tmpdir());
  char cmd[8192], out[16384];
  mocod_cmd(cmd, sizeof cmd, 1, a, "--set optim.steps=50");
  ck_assert_msg(run_capture(cmd, out, sizeof out) == 0, "%s\n%s", cmd, tail_of(out));
  mocod_cmd(cmd, sizeof cmd, 2, b, "--set optim.steps=50");
  ck_assert_msg(run_capture(cmd, out, sizeof out) == 0, "%s\n%s", cmd, tail_of(out));
  double la[STEPS + 8], lb[STEPS + 8];
  ck_assert_int_eq(progress_losses(a, la, STEPS + 8), STEPS);
  ck_assert_int_eq(progress_losses(b, lb, STEPS + 8), STEPS);
  int compared;
  double gap = loss_gap(la, lb, &compared);
  ck_assert_int_ge(compared, STEPS - 2);
  ck_assert_msg(gap < 1e-4, "losses differ by %g relative", gap);
  enum { CAP = 1 << 16 };
  float *qa = malloc(CAP * sizeof *qa), *qb = malloc(CAP * sizeof *qb);
  size_t na = checkpoint_queue(a, qa, CAP), nb = checkpoint_queue(b, qb, CAP);
  ck_assert_uint_eq(na, nb);
  ck_assert_uint_gt(na, 0);
  double worst = 0.0;
  for (size_t i = 0; i < na; i++) worst = fmax(worst, fabs((double)qa[i] - qb[i]));
  ck_assert_msg(worst < 1e-4, "queue keys differ by %g", worst);
  free(qa);
  free(qb);
  rm_rf(a);
  rm_rf(b);
  free(a);
  free(b);
}
END_TEST

/* The float32 data of an .npy file that eval_export wrote (format 1.0: its header length at byte 8);
 * the number of floats, 0 when unreadable. */
static size_t npy_floats(const char *path, float *x, size_t cap) {
  FILE *f = fopen(path, "rb");
  if (!f) return 0;
  unsigned char head[10];
  size_t n = 0;
  if (fread(head, 1, sizeof head, f) == sizeof head && !fseek(f, 10 + head[8] + 256 * head[9], SEEK_SET))
    n = fread(x, sizeof *x, cap, f);
  fclose(f);
  return n;
}

/* One number of the final eval event in dir's progress log (-1e9 when absent). */
static double eval_figure(const char *dir, const char *name) {
  char path[4200], line[16384], key[64];
  snprintf(path, sizeof path, "%s/progress.jsonl", dir);
  snprintf(key, sizeof key, "\"%s\":", name);
  FILE *f = fopen(path, "r");
  ck_assert_msg(f != NULL, "%s missing", path);
  double v = -1e9;
  while (fgets(line, sizeof line, f)) {
    const char *at = strstr(line, key);
    if (!strncmp(line, "{\"event\":\"eval\",", 16) && at) v = atof(at + strlen(key));
  }
  fclose(f);
  return v;
}

/* Resumes dir's checkpoint in a world of np without exiting at the end: the final evaluation runs,
 * then an export of the training split's features through mococtl, then a stop. */
static void eval_and_export(const char *dir, int np) {
  char cmd[8192], sh[12288], out[16384];
  mocod_cmd(cmd, sizeof cmd, np, dir, "--resume --set optim.steps=20 --set service.exit_on_finish=false");
  snprintf(sh, sizeof sh,
           "%s > %s/run.out 2>&1 & p=$!; d=%s; "
           "for i in $(seq 600); do grep -q '\"event\":\"finished\"' $d/progress.jsonl 2>/dev/null && break; "
           "sleep 0.1; done; "
           "%s -s $d/sock export path=$d/train.npy split=train || exit 11; "
           "%s -s $d/sock stop || exit 12; wait $p || exit 13",
           cmd, dir, dir, bin_path("mococtl"), bin_path("mococtl"));
  int rc = run_capture(sh, out, sizeof out);
  ck_assert_msg(rc == 0, "world of %d: exit %d (11: export failed, 12: stop failed, 13: mocod failed)\n%s", np, rc,
                tail_of(out));
}

/* Evaluation and export run on every rank's shard of the data and are gathered on rank 0: from the same
 * checkpoint a world of 2 exports the features one process exports and computes its figures. The
 * features agree to float rounding (each rank encodes its shard in chunks of half the batch, and sgemm
 * may sum in another order for another row count): seen 1.2e-7 of 1.0, bound 1e-5 of the largest value. The kNN
 * votes, retrieval ranks and probe are discontinuous in the features, so a rounding-level change can
 * move one sample: the bound is one sample of the 1,000 (500 for the probe's train accuracy of 2,000). */
START_TEST(eval_and_export_on_two_ranks_match_one_process) {
  char *a = strdup(test_tmpdir()), *b = strdup(test_tmpdir());
  char cmd[8192], out[16384];
  mocod_cmd(cmd, sizeof cmd, 1, a, "--set optim.steps=20");
  ck_assert_msg(run_capture(cmd, out, sizeof out) == 0, "%s\n%s", cmd, tail_of(out));
  snprintf(cmd, sizeof cmd, "rm -f %s/progress.jsonl && cp -r %s/ckpt %s/", a, a, b);
  ck_assert_int_eq(run_capture(cmd, out, sizeof out), 0);
  eval_and_export(a, 1);
  eval_and_export(b, 2);
  enum { CAP = 2000 * 16 + 1 };
  float *fa = malloc(CAP * sizeof *fa), *fb = malloc(CAP * sizeof *fb);
  char pa[4200], pb[4200];
  snprintf(pa, sizeof pa, "%s/train.npy", a);
  snprintf(pb, sizeof pb, "%s/train.npy", b);
  size_t na = npy_floats(pa, fa, CAP), nb = npy_floats(pb, fb, CAP);
  ck_assert_uint_eq(na, 2000 * 16); /* every training sample's 16 backbone features */
  ck_assert_uint_eq(nb, na);
  double worst = 0.0, scale = 0.0;
  for (size_t i = 0; i < na; i++) {
    worst = fmax(worst, fabs((double)fa[i] - fb[i]));
    scale = fmax(scale, fabs((double)fa[i]));
  }
  ck_assert_msg(worst <= 1e-5 * scale, "features differ by %g (largest %g)", worst, scale);
  static const struct {
    const char *name;
    double tol;
  } fig[] = {{"n_train", 0},        {"n_eval", 0},       {"knn_acc", 1e-3},     {"knn_acc_small", 1e-3},
             {"recall1", 1e-3},     {"recall10", 1e-3},  {"recall1_emb", 1e-3}, {"recall10_emb", 1e-3},
             {"probe_acc", 1.001e-3}, {"probe_train_acc", 5.001e-4}};
  for (size_t i = 0; i < sizeof fig / sizeof fig[0]; i++) {
    double x = eval_figure(a, fig[i].name), y = eval_figure(b, fig[i].name);
    ck_assert_msg(x > -1e9 && fabs(x - y) <= fig[i].tol + 1e-7, "%s: %g alone, %g on two ranks", fig[i].name, x, y);
  }
  ck_assert_double_eq(eval_figure(b, "n_train"), 2000);
  for (int i = 0; i < 2; i++) {
    const char *name = i ? "uniformity" : "alignment";
    double x = eval_figure(a, name), y = eval_figure(b, name);
    ck_assert_msg(fabs(x - y) <= 1e-4 * fabs(x), "%s: %g alone, %g on two ranks", name, x, y);
  }
  free(fa);
  free(fb);
  rm_rf(a);
  rm_rf(b);
  free(a);
  free(b);
}
END_TEST

/* `-d` is refused under mpirun, naming scripts/mocod-mpi.sh, which starts the 2-rank job in the
 * background and returns once rank 0 answers: status then says world_size 2, and `stop` ends mpirun. A
 * job that cannot start (a training file that is not there) makes the script fail with mocod's reason. */
START_TEST(mpi_job_in_the_background) {
  char *dir = strdup(test_tmpdir());
  char cmd[8192], sh[16384], out[16384], opts[4096];
  mocod_cmd(cmd, sizeof cmd, 2, dir, "-d");
  ck_assert_msg(run_capture(cmd, out, sizeof out) != 0, "-d under mpirun was accepted");
  ck_assert_msg(strstr(out, "scripts/mocod-mpi.sh") != NULL, "%s", tail_of(out));
  mocod_opts(opts, sizeof opts, dir, "--set optim.steps=1000000");
  char bins[2][1024]; /* bin_path's answer lasts until its next call */
  snprintf(bins[0], sizeof bins[0], "%s", bin_path("mocod"));
  snprintf(bins[1], sizeof bins[1], "%s", bin_path("mococtl"));
  snprintf(sh, sizeof sh,
           "d=%s; export MOCOD=%s MOCOCTL=%s; pid=$(" MPIENV "scripts/mocod-mpi.sh $d/mpirun.log -np 2 "
           "--oversubscribe -- %s) || exit 11; "
           "$MOCOCTL -s $d/sock --json status | grep -q '\"world_size\": *2' || exit 12; "
           "$MOCOCTL -s $d/sock stop || exit 13; "
           "for i in $(seq 300); do s=$(ps -o stat= -p $pid); [ -z \"$s\" ] || [ \"${s#Z}\" != \"$s\" ] && exit 0; "
           "sleep 0.1; done; exit 14",
           dir, bins[0], bins[1], opts);
  int rc = run_capture(sh, out, sizeof out);
  ck_assert_msg(rc == 0, "exit %d (11: the script failed, 12: status without world_size 2, 13: stop failed, "
                "14: mpirun still up 30 s after stop)\n%s", rc, tail_of(out));
  mocod_opts(opts, sizeof opts, dir, "--set data.train='\"missing-idx3-ubyte\"'");
  snprintf(sh, sizeof sh, "MOCOD=%s MOCOCTL=%s " MPIENV "scripts/mocod-mpi.sh %s/bad.log -np 2 --oversubscribe -- %s",
           bins[0], bins[1], dir, opts);
  ck_assert_msg(run_capture(sh, out, sizeof out) == 1, "a job that cannot start: %s", tail_of(out));
  ck_assert_msg(strstr(out, "missing-idx3-ubyte") != NULL, "the reason is not named: %s", tail_of(out));
  rm_rf(dir);
  free(dir);
}
END_TEST

/* A rank killed mid-run ends the whole job within seconds, rank 0's log names it, and the run resumes
 * from the newest checkpoint. A `set` during the run reaches every rank (the ranks compare their models
 * every 50 steps; a rank that missed it would fail the step), and so does an export between two steps
 * (every rank extracts its shard; one that missed it would leave rank 0 waiting in the gather). */
START_TEST(killed_rank_ends_the_job_and_it_resumes) {
  char *dir = strdup(test_tmpdir());
  char cmd[8192], sh[12288], out[16384];
  mocod_cmd(cmd, sizeof cmd, 2, dir, "--set optim.steps=1000000 --set checkpoint.every_steps=20");
  /* Start, wait for step 60, set the learning rate, export features, wait for step 120, kill rank 1 (the mocod that is
   * mpirun's child and not rank 0's pid), then time how long mpirun takes to end. */
  snprintf(sh, sizeof sh,
           "( %s > %s/mpirun.out 2>&1 & ); d=%s; "
           "step() { tail -n 1 $d/progress.jsonl 2>/dev/null | sed -n 's/.*\"step\":\\([0-9]*\\).*/\\1/p'; }; "
           "for i in $(seq 600); do s=$(step); [ \"${s:-0}\" -ge 60 ] && break; sleep 0.1; done; "
           "%s -s $d/sock set optim.lr=0.02 || exit 11; "
           "%s -s $d/sock export path=$d/mid.npy || exit 15; "
           "for i in $(seq 600); do s=$(step); [ \"${s:-0}\" -ge 120 ] && break; sleep 0.1; done; "
           "r0=$(cat $d/pid 2>/dev/null); [ -n \"$r0\" ] || { tail -n 3 $d/mocod.log; exit 14; }; "
           "mp=$(ps -o ppid= -p $r0 | tr -d ' '); "
           "r1=$(pgrep -P $mp -x mocod | grep -v \"^$r0$\" | head -n 1); [ -n \"$r1\" ] || exit 12; "
           "kill -9 $r1; for i in $(seq 300); do kill -0 $mp 2>/dev/null || exit 0; sleep 0.1; done; exit 13",
           cmd, dir, dir, bin_path("mococtl"), bin_path("mococtl"));
  int rc = run_capture(sh, out, sizeof out);
  ck_assert_msg(rc == 0, "exit %d (11: set failed, 12: no rank 1, 13: mpirun still up 30 s after the "
                "kill, 14: the job ended before the kill, 15: export failed)\n%s", rc, tail_of(out));
  char log[4200];
  snprintf(log, sizeof log, "grep -c 'rank 1 (pid .*) is gone' %s/mocod.log", dir);
  ck_assert_msg(run_capture(log, out, sizeof out) == 0, "rank 0's log does not name rank 1");
  snprintf(log, sizeof log, "grep -c 'differs from rank 0' %s/mocod.log", dir);
  ck_assert_msg(run_capture(log, out, sizeof out) != 0, "the ranks drifted apart: %s", tail_of(out));
  /* Resume with the same world and finish 20 steps later. */
  long step = 0;
  snprintf(log, sizeof log, "ls %s/ckpt | tail -n 1 | sed 's/[^0-9]//g'", dir);
  ck_assert_int_eq(run_capture(log, out, sizeof out), 0);
  step = atol(out);
  ck_assert_int_ge(step, 100);
  char extra[256];
  snprintf(extra, sizeof extra, "--resume --set optim.steps=%ld", step + 20);
  mocod_cmd(cmd, sizeof cmd, 2, dir, extra);
  ck_assert_msg(run_capture(cmd, out, sizeof out) == 0, "resume: %s\n%s", cmd, tail_of(out));
  snprintf(log, sizeof log, "grep -c 'resumed from .*ckpt-0*%ld.mcp' %s/mocod.log", step, dir);
  ck_assert_msg(run_capture(log, out, sizeof out) == 0, "no resume from step %ld", step);
  rm_rf(dir);
  free(dir);
}
END_TEST

Suite *dist_suite(void) {
  Suite *s = suite_create("dist");
  TCase *tc = tcase_create("world");
  /* mpirun's ranks run in process groups of their own: a timeout that kills mpirun leaves them */
  tcase_add_checked_fixture(tc, test_reaper_start, test_reaper_stop);
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, loader_shares_are_slices_of_the_batch);
  tcase_add_test(tc, two_ranks_reproduce_one_process);
  tcase_add_test(tc, per_rank_batchnorm_is_not_one_process);
  tcase_add_test(tc, daemon_two_ranks_train_as_one);
  tcase_add_test(tc, eval_and_export_on_two_ranks_match_one_process);
  tcase_add_test(tc, mpi_job_in_the_background);
  tcase_add_test(tc, killed_rank_ends_the_job_and_it_resumes);
  suite_add_tcase(s, tc);
  TCase *files = tcase_create("files"); /* in-process shares on a plain file in a scratch directory */
  tcase_add_checked_fixture(files, test_scratch_setup, test_scratch_teardown);
  tcase_add_test(files, loader_shares_read_disjoint_records);
  suite_add_tcase(s, files);
  return s;
}
