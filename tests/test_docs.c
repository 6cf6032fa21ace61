/* Executable documentation: every shell example in README.md and docs/NAME.md runs against the built
 * programs, so an example that stops working fails `make test`.
 *
 * The convention (docs/service.md, "Examples in these documents"):
 *   - a block fenced as ```sh is an example and runs; its lines run with `sh -e`, in a scratch
 *     directory that looks like the repository (config/, scripts/, data/ with the sample data, and
 *     build/bin/ with the programs, which are also on PATH);
 *   - `# expect: exit N` in the block: it must end with status N (default 0); `# expect: TEXT`: its
 *     output (stdout and stderr) must contain TEXT; `# needs: TOOL`: it is skipped, and says so, when TOOL
 *     is not installed (runs of spaces compare as one, so column alignment does not matter);
 *   - ```sh not-run: REASON marks the few that cannot run here (they are counted and listed);
 *   - the blocks of one document run in order in one directory, so later ones see what earlier ones
 *     made (a daemon started, a checkpoint written); a daemon left running is stopped at the end.
 * Reduced budgets: build/bin/mocod there is a wrapper that adds --set overrides (the sample data, a few
 * steps, one thread; `budget` below) for every key the command line does not set itself, so an example
 * written for the full data set and minutes of training runs in seconds. Fenced blocks without a
 * language must not hold commands (a synopsis is ```text), so no example escapes the runner.
 * MOCOD_DOCS=docs/service.md (comma-separated) runs only those documents. */
#include <check.h>
#include <glob.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

/* What the wrapper adds unless the command line sets the key: the repository's 2,000 + 1,000 image
 * sample of Fashion-MNIST (absolute paths, so data.dir does not matter), 6 steps, small evaluations. */
static const char *const budget[] = {
    "data.train=@/data/fmnist-train-images-idx3-ubyte.gz", "data.eval=@/data/fmnist-t10k-images-idx3-ubyte.gz",
    "optim.steps=6", "threads=1", "data.workers=1", "log.every_steps=2", "eval.probe_max_iter=20",
    "eval.every_steps=0", "checkpoint.every_seconds=0", NULL};

enum { MAX_DOCS = 32, EXAMPLE_TIMEOUT = 120 };

static char docs[MAX_DOCS][PATH_MAX];
static int n_docs;

typedef struct {
  int line;        /* of the opening fence */
  char *text;      /* the commands */
  int exit_status; /* expected */
  char *expect[16];
  int n_expect;
  char needs[64];
  char not_run[256];
} example;

static char *read_text(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  rewind(f);
  char *s = malloc((size_t)n + 1);
  if (s && fread(s, 1, (size_t)n, f) != (size_t)n) n = 0;
  if (s) s[n] = '\0';
  fclose(f);
  return s;
}

static int starts_with(const char *s, const char *p) { return !strncmp(s, p, strlen(p)); }

/* A command a reader would type: what a language-less block must not start with. */
static int looks_like_command(const char *line) {
  static const char *const cmds[] = {"build/bin/", "mocod ", "mococtl ", "mocopack ", "make ", "scripts/", NULL};
  while (*line == ' ') line++;
  for (int i = 0; cmds[i]; i++)
    if (starts_with(line, cmds[i])) return 1;
  return 0;
}

/* Parses the fenced blocks of a markdown text. Returns the number of sh examples (at most cap) and
 * reports a language-less block that holds commands in *stray (its line), else 0. */
static int parse_examples(char *md, example *ex, int cap, int *stray) {
  int n = 0, lineno = 0, in = 0, indent = 0, first = 0;
  example *cur = NULL;
  size_t len = 0, size = 0;
  *stray = 0;
  for (char *line = md, *next; line && *line; line = next) {
    next = strchr(line, '\n');
    if (next) *next++ = '\0';
    lineno++;
    int ind = (int)strspn(line, " ");
    if (!in) {
      if (!starts_with(line + ind, "```")) continue;
      const char *info = line + ind + 3;
      in = 1, indent = ind, first = 1, cur = NULL;
      if (!*info) in = 2; /* no language: checked for commands below */
      else if (!strcmp(info, "sh") || starts_with(info, "sh ")) {
        ck_assert_msg(n < cap, "too many examples");
        cur = &ex[n++];
        memset(cur, 0, sizeof *cur);
        cur->line = lineno;
        const char *nr = strstr(info, "not-run:");
        if (nr) snprintf(cur->not_run, sizeof cur->not_run, "%s", nr + 8 + strspn(nr + 8, " "));
        len = 0, size = 256;
        cur->text = calloc(size, 1);
      }
      continue;
    }
    if (starts_with(line + ind, "```") && !line[ind + 3]) {
      in = 0;
      continue;
    }
    const char *body = line + (ind < indent ? ind : indent);
    if (in == 2 && first && looks_like_command(body) && !*stray) *stray = lineno;
    first = 0;
    if (!cur) continue;
    if (starts_with(body, "# expect: exit ")) cur->exit_status = atoi(body + 15);
    else if (starts_with(body, "# expect: ") && cur->n_expect < 16) cur->expect[cur->n_expect++] = strdup(body + 10);
    else if (starts_with(body, "# needs: ")) snprintf(cur->needs, sizeof cur->needs, "%s", body + 9);
    size_t k = strlen(body);
    if (len + k + 2 > size) {
      while (len + k + 2 > size) size *= 2;
      cur->text = realloc(cur->text, size);
    }
    memcpy(cur->text + len, body, k);
    len += k;
    cur->text[len++] = '\n';
    cur->text[len] = '\0';
  }
  return n;
}

static void free_examples(example *ex, int n) {
  for (int i = 0; i < n; i++) {
    free(ex[i].text);
    for (int k = 0; k < ex[i].n_expect; k++) free(ex[i].expect[k]);
  }
}

static void write_file(const char *path, const char *text, int mode) {
  FILE *f = fopen(path, "w");
  ck_assert_msg(f != NULL, "cannot write %s", path);
  fputs(text, f);
  fclose(f);
  chmod(path, (mode_t)mode);
}

/* The scratch repository: config/ and scripts/ linked, data/ and docs/img/ real (examples write there),
 * build/bin/ with mococtl and mocopack linked and mocod wrapped (the budget). */
static void make_scratch(const char *work, const char *repo, const char *bin) {
  char cmd[12 * PATH_MAX];
  snprintf(cmd, sizeof cmd,
           "mkdir -p '%s/build/bin' '%s/data' '%s/docs/img' && cd '%s' && ln -s '%s/config' config && "
           "ln -s '%s/scripts' scripts && ln -s '%s'/data/* data/ && ln -s '%s/mococtl' '%s/mocopack' build/bin/",
           work, work, work, work, repo, repo, repo, bin, bin);
  ck_assert_msg(system(cmd) == 0, "making the scratch directory %s", work);
  char *w = malloc(1 << 14);
  int k = snprintf(w, 1 << 14,
                   "#!/bin/sh\n# mocod with the documentation runner's budget (tests/test_docs.c): each\n"
                   "# override is added unless the command line sets that key itself.\nfor o in");
  for (int i = 0; budget[i]; i++) {
    const char *at = strchr(budget[i], '@');
    k += at ? snprintf(w + k, (1 << 14) - (size_t)k, " '%.*s%s%s'", (int)(at - budget[i]), budget[i], work, at + 1)
            : snprintf(w + k, (1 << 14) - (size_t)k, " '%s'", budget[i]);
  }
  snprintf(w + k, (1 << 14) - (size_t)k,
           "; do\n  case \" $* \" in *\" --set ${o%%%%=*}=\"*|*\" --set=${o%%%%=*}=\"*) ;; *) set -- \"$@\" --set \"$o\" ;; esac\n"
           "done\nexec '%s/mocod' \"$@\"\n",
           bin);
  char path[PATH_MAX + 32];
  snprintf(path, sizeof path, "%s/build/bin/mocod", work);
  write_file(path, w, 0755);
  free(w);
}

/* Stops whatever daemon the document left running (pid file of the default config). */
static void stop_daemons(const char *work) {
  char cmd[PATH_MAX + 512];
  snprintf(cmd, sizeof cmd,
           "cd '%s' && p=$(cat run/mocod.pid 2>/dev/null) && [ -n \"$p\" ] && kill \"$p\" 2>/dev/null && "
           "for i in $(seq 50); do kill -0 \"$p\" 2>/dev/null || exit 0; sleep 0.1; done; "
           "[ -n \"$p\" ] && kill -9 \"$p\" 2>/dev/null; exit 0",
           work);
  if (system(cmd) != 0) fprintf(stderr, "test_docs: stopping the daemon in %s failed\n", work);
}

/* s with every run of spaces made one space, so that expectations do not depend on column alignment. */
static char *squeeze(const char *s) {
  char *t = strdup(s ? s : ""), *w = t;
  for (const char *r = t; *r; r++)
    if (*r != ' ' || w == t || w[-1] != ' ') *w++ = *r;
  *w = '\0';
  return t;
}

/* Runs one example; returns NULL when it behaved as the document says, else what went wrong. */
static char *run_example(const example *e, const char *tmp, const char *work, const char *doc, int idx) {
  char script[PATH_MAX + 64], out[PATH_MAX + 64], cmd[6 * PATH_MAX];
  snprintf(script, sizeof script, "%s/example-%d.sh", tmp, idx);
  snprintf(out, sizeof out, "%s/example-%d.out", tmp, idx);
  write_file(script, e->text, 0644);
  snprintf(cmd, sizeof cmd,
           "cd '%s' && env -u MOCOD_SOCKET PATH=\"%s/build/bin:$PATH\" timeout -k 5 %d sh -e '%s' >'%s' 2>&1 </dev/null",
           work, work, EXAMPLE_TIMEOUT, script, out);
  int st = system(cmd);
  int status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  char *output = read_text(out);
  char *why = NULL;
  size_t cap = 8192;
  const char *tail = output ? output + (strlen(output) > 3000 ? strlen(output) - 3000 : 0) : "";
  if (status != e->exit_status) {
    why = malloc(cap);
    snprintf(why, cap, "%s:%d: exit status %d, expected %d%s\n--- example ---\n%s--- output (end) ---\n%s", doc,
             e->line, status, e->exit_status, status == 124 ? " (timed out)" : "", e->text, tail);
  }
  char *flat = squeeze(output);
  for (int k = 0; !why && k < e->n_expect; k++) {
    char *want = squeeze(e->expect[k]);
    if (!strstr(flat, want)) {
      why = malloc(cap);
      snprintf(why, cap, "%s:%d: output lacks \"%s\"\n--- example ---\n%s--- output (end) ---\n%s", doc, e->line,
               e->expect[k], e->text, tail);
    }
    free(want);
  }
  free(flat);
  free(output);
  return why;
}

static int tool_missing(const char *tool) {
  char cmd[128];
  snprintf(cmd, sizeof cmd, "command -v '%s' >/dev/null 2>&1", tool);
  return system(cmd) != 0;
}

START_TEST(every_example_in_the_document_runs) {
  const char *doc = docs[_i];
  char repo[PATH_MAX], bin[PATH_MAX], tmp[PATH_MAX], work[PATH_MAX + 8];
  const char *b = getenv("MOCOD_BIN");
  ck_assert(getcwd(repo, sizeof repo) != NULL);
  ck_assert_msg(realpath(b && *b ? b : "build/bin", bin) != NULL, "MOCOD_BIN");
  char *md = read_text(doc);
  ck_assert_msg(md != NULL, "cannot read %s", doc);
  static example ex[128];
  int stray, n = parse_examples(md, ex, 128, &stray);
  free(md);
  ck_assert_msg(!stray, "%s:%d: a fenced block without a language starts with a command: mark it ```sh (an "
                "example that runs) or ```text (a synopsis)", doc, stray);
  snprintf(tmp, sizeof tmp, "%s", test_tmpdir());
  snprintf(work, sizeof work, "%s/repo", tmp);
  make_scratch(work, repo, bin);
  prctl(PR_SET_CHILD_SUBREAPER, 1); /* daemons (double fork) are reaped here */
  int ran = 0, skipped = 0, not_run = 0;
  char *failure = NULL;
  for (int i = 0; i < n && !failure; i++) {
    if (ex[i].not_run[0]) {
      not_run++;
      fprintf(stderr, "test_docs: %s:%d: not run: %s\n", doc, ex[i].line, ex[i].not_run);
    } else if (ex[i].needs[0] && tool_missing(ex[i].needs)) {
      skipped++;
      fprintf(stderr, "test_docs: %s:%d: skipped: needs %s, not installed\n", doc, ex[i].line, ex[i].needs);
    } else {
      failure = run_example(&ex[i], tmp, work, doc, i);
      ran++;
    }
  }
  stop_daemons(work);
  rm_rf(tmp);
  free_examples(ex, n);
  if (failure) {
    fprintf(stderr, "%s\n", failure);
    ck_abort_msg("%.4000s", failure);
  }
  fprintf(stderr, "test_docs: %s: %d example(s) ran, %d skipped, %d not run\n", doc, ran, skipped, not_run);
  for (int i = 0; i < n; i++)
    ck_assert_msg(!ex[i].not_run[0] || strlen(ex[i].not_run) > 8, "%s:%d: not-run needs a reason", doc, ex[i].line);
}
END_TEST

/* README.md and docs/NAME.md, or the comma-separated list in $MOCOD_DOCS (to iterate on one). */
static void find_docs(void) {
  const char *only = getenv("MOCOD_DOCS");
  if (only && *only) {
    for (const char *p = only; *p && n_docs < MAX_DOCS;) {
      size_t k = strcspn(p, ",");
      snprintf(docs[n_docs++], PATH_MAX, "%.*s", (int)k, p);
      p += k + (p[k] == ',');
    }
    return;
  }
  glob_t g;
  snprintf(docs[n_docs++], PATH_MAX, "README.md");
  if (glob("docs/*.md", 0, NULL, &g) == 0) {
    for (size_t i = 0; i < g.gl_pathc && n_docs < MAX_DOCS; i++) snprintf(docs[n_docs++], PATH_MAX, "%s", g.gl_pathv[i]);
    globfree(&g);
  }
}

Suite *docs_suite(void) {
  Suite *s = suite_create("docs");
  TCase *tc = tcase_create("examples");
  find_docs();
  tcase_set_timeout(tc, 600);
  tcase_add_loop_test(tc, every_example_in_the_document_runs, 0, n_docs);
  suite_add_tcase(s, tc);
  return s;
}
