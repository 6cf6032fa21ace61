#include "service/offline.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/err.h"
#include "core/par.h"
#include "service/config.h"
#include "train/checkpoint.h"
#include "train/encoder.h"

/* The config a checkpoint was written with, with the --set overrides, finalized (defaults filled,
 * checked). */
static int checkpoint_config(const checkpoint_file *f, const char **sets, int n_sets, json_t **config) {
  blob_reader at, sub;
  uint32_t n = 0;
  int rc = blob_find(&f->body, "CONF", 0, &at);
  if (!rc) rc = blob_section(&at, "CONF", &sub);
  if (!rc) rc = blob_get_u32(&sub, &n);
  if (!rc && n > sub.len - sub.pos) rc = moco_error(MOCO_EFORMAT, "%s: CONF section: %u bytes promised", f->path, n);
  if (rc) return moco_error_wrap(rc, "%s: the run's config", f->path);
  json_error_t jerr;
  *config = json_loadb((const char *)sub.data + sub.pos, n, 0, &jerr);
  if (!*config) return moco_error(MOCO_EFORMAT, "%s: CONF section: %s", f->path, jerr.text);
  for (int i = 0; !rc && i < n_sets; i++) rc = config_override(*config, sets[i]);
  char *report = NULL;
  if (rc || (rc = config_finalize(*config, &report))) {
    moco_error(rc, "%s: its config no longer passes this mocod's checks: %s", f->path, report ? report : "");
    free(report);
    json_decref(*config);
    *config = NULL;
    return rc;
  }
  return 0;
}

static int parse_encoder(const char *name, trainer_encoder *which) {
  if (!name || !strcmp(name, "query")) *which = TRAINER_QUERY;
  else if (!strcmp(name, "key")) *which = TRAINER_KEY;
  else return moco_error(MOCO_EINVAL, "--encoder: '%s', expected query or key", name);
  return 0;
}

/* Reads the checkpoint (a file, or a directory's newest good one) and builds the encoder from it. The
 * run's `threads` becomes the compute team's size unless threads > 0 overrides it. */
static int open_encoder(const char *ckpt, const char *enc_name, int max_batch, int threads, const char **sets, int n_sets,
                        encoder *e) {
  trainer_encoder which = TRAINER_QUERY;
  int rc = parse_encoder(enc_name, &which);
  if (rc) return rc;
  checkpoint_file f;
  struct stat st;
  if (stat(ckpt, &st) == 0 && S_ISDIR(st.st_mode))
    rc = checkpoint_read_latest(&f, ckpt, NULL, NULL);
  else
    rc = checkpoint_read(&f, ckpt);
  if (rc) return rc;
  json_t *config = NULL;
  trainer_config tc;
  if (!(rc = checkpoint_config(&f, sets, n_sets, &config)) && !(rc = config_to_trainer(config, &tc))) {
    int k = threads > 0 ? threads : tc.threads;
    rc = par_set_threads(k < PAR_MAX_THREADS ? k : PAR_MAX_THREADS);
    if (!rc) rc = encoder_load(e, &tc, &f.body, f.step, which, max_batch);
    if (rc) moco_error_wrap(rc, "%s", f.path);
  }
  json_decref(config);
  checkpoint_file_free(&f);
  return rc;
}

static int failed(const char *what) {
  fprintf(stderr, "mocod: %s: %s\n", what, moco_errmsg());
  return 1;
}

int offline_export_model(const char *checkpoint, const char *path, const char *enc_name, const char **sets, int n_sets) {
  encoder e;
  int64_t bytes = 0;
  if (open_encoder(checkpoint, enc_name, 1, 1, sets, n_sets, &e)) return failed("export-model");
  int rc = encoder_write_safetensors(&e, path, &bytes);
  if (!rc)
    printf("exported the %s encoder of step %lld (%zu parameters) to %s (%lld bytes)\n",
           e.which == TRAINER_KEY ? "key" : "query", (long long)e.step, net_num_params(e.net), path,
           (long long)bytes);
  encoder_free(&e);
  return rc ? failed("export-model") : 0;
}

/* ---- embed ---- */

typedef struct {
  int tty;
  double t0, last;
  int last_tenth;
} progress_state;

/* A line rewritten in place on a terminal (a few times a second); in a log, one line per tenth. */
static void on_progress(void *ctx, uint64_t done, uint64_t total) {
  progress_state *p = ctx;
  double now = clock_now(), pct = total ? 100.0 * (double)done / (double)total : 100.0;
  int tenth = (int)(pct / 10);
  if (p->tty ? now - p->last < 0.2 && done < total : tenth == p->last_tenth) return;
  p->last = now;
  p->last_tenth = tenth;
  fprintf(stderr, "%sembed: %llu / %llu records (%.1f%%), %.0f records/s%s", p->tty ? "\r" : "",
          (unsigned long long)done, (unsigned long long)total, pct,
          now > p->t0 ? (double)done / (now - p->t0) : 0.0, p->tty ? "" : "\n");
}

static const char embed_usage[] =
    "usage: mocod embed --checkpoint CKPT --data FILES --out OUT.npy [--features | --embeddings]\n"
    "                   [--labels FILE] [--encoder query|key] [--batch N] [--threads N]\n"
    "                   [--bad-record stop|skip] [--set PATH=VALUE]...\n"
    "  CKPT: a checkpoint file or directory; FILES: paths or globs of any format mocod reads.\n"
    "  Writes OUT.npy (float32 [n, dim]: backbone features by default), OUT.ids.npy and, for labelled\n"
    "  data, OUT.labels.npy.\n";

enum { E_CKPT = 300, E_DATA, E_OUT, E_FEAT, E_EMB, E_LABELS, E_ENC, E_BATCH, E_THREADS, E_BAD, E_SET, E_HELP };

typedef struct {
  const char *ckpt, *data, *out, *labels, *enc;
  int embeddings, batch, threads, skip;
  const char **sets; /* argv-sized, from the caller */
  int n_sets;
} embed_opts;

static int parse_embed(int argc, char **argv, embed_opts *o) {
  static const struct option longopts[] = {
      {"checkpoint", required_argument, NULL, E_CKPT}, {"data", required_argument, NULL, E_DATA},
      {"out", required_argument, NULL, E_OUT},         {"features", no_argument, NULL, E_FEAT},
      {"embeddings", no_argument, NULL, E_EMB},        {"labels", required_argument, NULL, E_LABELS},
      {"encoder", required_argument, NULL, E_ENC},     {"batch", required_argument, NULL, E_BATCH},
      {"threads", required_argument, NULL, E_THREADS}, {"bad-record", required_argument, NULL, E_BAD},
      {"set", required_argument, NULL, E_SET},         {"help", no_argument, NULL, E_HELP},
      {NULL, 0, NULL, 0}};
  const char **sets = o->sets;
  *o = (embed_opts){.batch = 256, .sets = sets};
  int c;
  optind = 1;
  while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
    char *end = NULL;
    switch (c) {
    case E_CKPT: o->ckpt = optarg; break;
    case E_DATA: o->data = optarg; break;
    case E_OUT: o->out = optarg; break;
    case E_FEAT: o->embeddings = 0; break;
    case E_EMB: o->embeddings = 1; break;
    case E_LABELS: o->labels = optarg; break;
    case E_ENC: o->enc = optarg; break;
    case E_BATCH: o->batch = (int)strtol(optarg, &end, 10); break;
    case E_THREADS: o->threads = (int)strtol(optarg, &end, 10); break;
    case E_BAD:
      if (strcmp(optarg, "stop") && strcmp(optarg, "skip")) return fprintf(stderr, "mocod embed: --bad-record: '%s', expected stop or skip\n", optarg), 2;
      o->skip = !strcmp(optarg, "skip");
      break;
    case E_SET: o->sets[o->n_sets++] = optarg; break;
    case E_HELP: fputs(embed_usage, stdout); return -1;
    default: fputs(embed_usage, stderr); return 2;
    }
    if (end && (*end || o->batch < 1 || o->batch > 65536 || o->threads < 0 || o->threads > 256))
      return fprintf(stderr, "mocod embed: --%s: '%s', expected a count (batch 1..65536, threads 1..256)\n",
                     c == E_BATCH ? "batch" : "threads", optarg), 2;
  }
  if (optind < argc) return fprintf(stderr, "mocod embed: unexpected argument '%s'\n%s", argv[optind], embed_usage), 2;
  if (!o->ckpt || !o->data || !o->out)
    return fprintf(stderr, "mocod embed: --checkpoint, --data and --out are required\n%s", embed_usage), 2;
  return 0;
}

int offline_embed(int argc, char **argv) {
  const char *sets[argc > 0 ? argc : 1];
  embed_opts o = {.sets = sets};
  int rc = parse_embed(argc, argv, &o);
  if (rc) return rc < 0 ? 0 : rc;
  encoder e;
  if (open_encoder(o.ckpt, o.enc, o.batch, o.threads, o.sets, o.n_sets, &e)) return failed("embed");
  progress_state p = {.tty = isatty(2), .t0 = clock_now(), .last_tenth = -1};
  uint64_t rows = 0, skipped = 0;
  int dim = 0;
  rc = encoder_embed(&e, o.data, o.labels, o.embeddings, o.batch, o.skip, o.out, on_progress, &p, &rows, &dim,
                     &skipped);
  if (p.tty) fputc('\n', stderr);
  if (!rc)
    printf("embedded %llu records (%llu bad skipped) with the %s encoder of step %lld: %s [%llu, %d] float32 "
           "%s in %.2f s\n", (unsigned long long)rows, (unsigned long long)skipped,
           e.which == TRAINER_KEY ? "key" : "query", (long long)e.step, o.out, (unsigned long long)rows, dim,
           o.embeddings ? "embeddings" : "features", clock_now() - p.t0);
  encoder_free(&e);
  return rc ? failed("embed") : 0;
}
