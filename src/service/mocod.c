/* mocod: the momentum-contrast trainer daemon.
 *
 *   mocod -c CONFIG.json [--set PATH=VALUE]... [-d] [--resume | --no-resume]
 *   mocod -c CONFIG.json --check-config | --print-config
 *   mocod --config-doc
 *   mocod --export-model CHECKPOINT PATH [--encoder query|key]
 *   mocod embed --checkpoint CHECKPOINT --data FILES --out OUT.npy [...]   (service/offline.h)
 *
 * This file is the process: arguments, the pid file, daemonising; everything else is server_run.
 * Under mpirun (core/dist.h) rank 0 is the daemon and the other ranks follow it (service/world.h). */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/dist.h"
#include "core/err.h"
#include "core/file.h"
#include "service/config.h"
#include "service/ctl.h"
#include "service/log.h"
#include "service/offline.h"
#include "service/server.h"
#include "service/world.h"
#include "train/trainer.h"

static void usage(FILE *f) {
  fprintf(f,
          "usage: mocod [-c CONFIG.json] [--set PATH=VALUE]... [-d] [--resume | --no-resume]\n"
          "       mocod [-c CONFIG.json] [--set PATH=VALUE]... --check-config | --print-config\n"
          "       mocod --config-doc\n"
          "       mocod --export-model CHECKPOINT PATH [--encoder query|key]\n"
          "       mocod embed --checkpoint CHECKPOINT --data FILES --out OUT.npy [--features|--embeddings]\n"
          "\n"
          "  -c, --config FILE   the JSON config (default: every option at its default)\n"
          "  --set PATH=VALUE    override one option (VALUE is JSON, else a string); repeatable\n"
          "  -d, --daemon        run in the background; returns once the control socket is ready\n"
          "  --resume            continue from the newest checkpoint (fail when there is none)\n"
          "  --no-resume         start from scratch even when checkpoints exist\n"
          "                      (default: continue when a checkpoint exists)\n"
          "  --check-config      validate the config, build the model and data, and exit\n"
          "  --print-config      print the effective config with every default filled in\n"
          "  --config-doc        print the config reference as markdown\n"
          "  --export-model CKPT PATH  write the checkpoint's query (or --encoder key) encoder as\n"
          "                      safetensors, for scripts/load_encoder.py (PyTorch); CKPT: file or directory\n"
          "  embed               embed data with a checkpoint's encoder, offline (mocod embed --help)\n"
          "  -h, --help          this text\n");
}

/* ---- pid file: an exclusive flock held for the life of the process ---- */

static int pid_fd = -1;
static char pid_path[FILE_PATH_MAX]; /* checked by server_check_paths */

static int read_pid(int fd) {
  char buf[32] = {0};
  ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
  return n > 0 ? atoi(buf) : 0;
}

static int pidfile_acquire(const char *path, char *err, size_t errlen) {
  if (!*path) return 0;
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return snprintf(err, errlen, "pid file %s: %s", path, strerror(errno)), -1;
  /* A mocod that has just answered `stop` releases the lock moments later, once it has freed its
   * model: a start right after a stop waits up to 3 s for that rather than refusing. */
  int locked = flock(fd, LOCK_EX | LOCK_NB);
  for (int i = 0; locked && errno == EWOULDBLOCK && i < 30; i++) {
    usleep(100000);
    locked = flock(fd, LOCK_EX | LOCK_NB);
  }
  if (locked) {
    int e = errno, other = read_pid(fd);
    close(fd);
    if (e == EWOULDBLOCK)
      return snprintf(err, errlen, "another mocod (pid %d) is running with pid file %s", other, path), -1;
    return snprintf(err, errlen, "pid file %s: lock: %s", path, strerror(e)), -1;
  }
  /* The lock is ours, so whoever wrote a pid here is gone: a stale file from a crash. */
  int stale = read_pid(fd);
  if (stale && stale != getpid())
    log_msg(LL_WARNING, "replacing stale pid file %s (pid %d is not running)", path, stale);
  char buf[32];
  int n = snprintf(buf, sizeof buf, "%d\n", (int)getpid());
  if (ftruncate(fd, 0) || pwrite(fd, buf, (size_t)n, 0) != n) {
    int e = errno;
    close(fd);
    return snprintf(err, errlen, "pid file %s: %s", path, strerror(e)), -1;
  }
  pid_fd = fd;
  snprintf(pid_path, sizeof pid_path, "%s", path);
  return 0;
}

static void pidfile_release(void) {
  if (pid_fd < 0) return;
  unlink(pid_path); /* still holding the lock, so no other mocod owns this path yet */
  close(pid_fd);
  pid_fd = -1;
}


/* ---- daemonising: the parent waits on a pipe for "ok" or the reason the daemon could not start ---- */

static int ready_fd = -1;

static void on_ready(void *ctx, int rc, const char *msg) {
  (void)ctx;
  if (ready_fd < 0) {
    if (rc) fprintf(stderr, "mocod: %s\n", msg);
    return;
  }
  char buf[2048];
  int n = rc ? snprintf(buf, sizeof buf, "error %s", msg) : snprintf(buf, sizeof buf, "ok");
  if (write(ready_fd, buf, (size_t)n) < 0) { /* the parent is gone; nothing to tell */
  }
  close(ready_fd);
  ready_fd = -1;
}

/* Descriptors the caller left open would stay open for the daemon's whole life: a lock a script holds
 * (flock on an inherited fd is released only when every copy is closed), the pipe a test runner or a
 * `| tee` reads until EOF. The daemon keeps stdio (pointed at /dev/null) and the ready pipe. */
static int close_inherited_fds(int keep) {
  if (keep < 3) { /* the caller ran us with stdio closed: move the pipe out of the way of /dev/null */
    int moved = fcntl(keep, F_DUPFD_CLOEXEC, 3);
    if (moved < 0) return -1;
    close(keep);
    keep = moved;
  }
  if ((keep > 3 && close_range(3, (unsigned)keep - 1, 0)) || close_range((unsigned)keep + 1, ~0U, 0)) {
    /* close_range is Linux 5.9+: fall back to every descriptor below the limit */
    struct rlimit rl;
    int top = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY ? (int)rl.rlim_cur : 65536;
    for (int fd = 3; fd < top; fd++)
      if (fd != keep) close(fd);
  }
  return keep;
}

/* Returns in the daemon (0) or exits in the parent with the daemon's verdict. */
static int daemonise(void) {
  int p[2];
  if (pipe2(p, O_CLOEXEC)) {
    fprintf(stderr, "mocod: pipe: %s\n", strerror(errno));
    return -1;
  }
  pid_t pid = fork();
  if (pid < 0) {
    fprintf(stderr, "mocod: fork: %s\n", strerror(errno));
    return -1;
  }
  if (pid > 0) {
    close(p[1]);
    char buf[2048];
    size_t got = 0;
    ssize_t k;
    while (got < sizeof buf - 1 && ((k = read(p[0], buf + got, sizeof buf - 1 - got)) > 0 ||
                                    (k < 0 && errno == EINTR)))
      if (k > 0) got += (size_t)k;
    buf[got] = '\0';
    waitpid(pid, NULL, 0); /* the intermediate child, which exits at once */
    if (!strcmp(buf, "ok")) exit(0);
    if (!strncmp(buf, "error ", 6)) fprintf(stderr, "mocod: %s\n", buf + 6);
    else fprintf(stderr, "mocod: the daemon exited before it was ready (see log.file)\n");
    exit(1);
  }
  close(p[0]);
  if (setsid() < 0) _exit(1);
  /* A second fork: the daemon is no session leader and can never acquire a terminal. */
  pid = fork();
  if (pid < 0) _exit(1);
  if (pid > 0) _exit(0);
  ready_fd = close_inherited_fds(p[1]);
  if (ready_fd < 0) _exit(1);
  int null = open("/dev/null", O_RDWR);
  if (null >= 0) {
    dup2(null, 0);
    dup2(null, 1);
    dup2(null, 2);
    if (null > 2) close(null);
  }
  return 0;
}

static void say_not_ready(const char *fmt, const char *a) {
  char msg[1400];
  snprintf(msg, sizeof msg, fmt, a);
  on_ready(NULL, MOCO_EINVAL, msg);
}

/* The --set flag that gave the option a report line is about ("optim.lr: value -1 ..."), or NULL. */
static const char *set_flag_of(const char *line, const char **sets, int n_sets) {
  for (int i = 0; i < n_sets; i++) {
    size_t n = strcspn(sets[i], "=");
    if (!strncmp(line, sets[i], n) && line[n] == ':') return sets[i];
  }
  return NULL;
}

/* Every problem, each under the source it came from: the file, or the --set flag that gave the value. */
static void report_invalid(const char *config_path, char *report, const char **sets, int n_sets) {
  int from_file = 0, from_set = 0;
  for (char *p = report; *p; p += strcspn(p, "\n"), p += *p == '\n') {
    if (set_flag_of(p, sets, n_sets)) from_set = 1;
    else from_file = 1;
  }
  const char *file = config_path ? config_path : "(defaults)";
  if (from_set && !from_file) fprintf(stderr, "mocod: --set is invalid:\n");
  else if (from_set) fprintf(stderr, "mocod: config %s and --set are invalid:\n", file);
  else fprintf(stderr, "mocod: config %s is invalid:\n", file);
  for (char *line = strtok(report, "\n"); line; line = strtok(NULL, "\n")) {
    const char *flag = set_flag_of(line, sets, n_sets);
    if (flag) fprintf(stderr, "  %s (from --set %s)\n", line, flag);
    else fprintf(stderr, "  %s\n", line);
  }
}

/* A daemon has no standard error: an empty log.file ("standard error") would lose the human log, so it
 * goes to the schema's default file instead, said once on the terminal that started it. */
static int keep_daemon_log(json_t *config) {
  if (*config_str(config, "log.file")) return 0;
  json_t *def = json_loads(config_option_find("log.file")->def, JSON_DECODE_ANY, NULL);
  int rc = def ? config_set(config, "log.file", def, 0) : MOCO_ENOMEM;
  if (!rc)
    fprintf(stderr, "mocod: log.file is \"\" (standard error), which a daemon does not have: logging to %s\n",
            config_str(config, "log.file"));
  else
    fprintf(stderr, "mocod: log.file: %s\n", moco_errmsg());
  json_decref(def);
  return rc ? 1 : 0;
}

/* Room for CTL_MAX_CLIENTS connections besides the logs, checkpoints and data files, up to the hard
 * limit (Redis does the same for maxclients): the soft default of 1024 would refuse clients early. */
static void raise_fd_limit(void) {
  struct rlimit rl;
  rlim_t want = CTL_MAX_CLIENTS + 256;
  if (getrlimit(RLIMIT_NOFILE, &rl) || rl.rlim_cur >= want) return;
  rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > want ? want : rl.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &rl)) log_msg(LL_WARNING, "raising the open file limit: %s", strerror(errno));
}

enum { OPT_SET = 256, OPT_CHECK, OPT_PRINT, OPT_DOC, OPT_RESUME, OPT_NO_RESUME, OPT_EXPORT_MODEL, OPT_ENCODER };

static int run(json_t *config, const char *config_path, int check, int daemon_mode, int resume,
               const char *const *sets, int n_sets);

int main(int argc, char **argv) {
  static const struct option longopts[] = {
      {"config", required_argument, NULL, 'c'}, {"daemon", no_argument, NULL, 'd'},
      {"set", required_argument, NULL, OPT_SET}, {"check-config", no_argument, NULL, OPT_CHECK},
      {"print-config", no_argument, NULL, OPT_PRINT}, {"config-doc", no_argument, NULL, OPT_DOC},
      {"resume", no_argument, NULL, OPT_RESUME}, {"no-resume", no_argument, NULL, OPT_NO_RESUME},
      {"export-model", required_argument, NULL, OPT_EXPORT_MODEL}, {"encoder", required_argument, NULL, OPT_ENCODER},
      {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
  if (argc > 1 && !strcmp(argv[1], "embed")) return offline_embed(argc - 1, argv + 1);
  const char *config_path = NULL, *export_ckpt = NULL, *encoder = NULL;
  int daemon_mode = 0, check = 0, print = 0, doc = 0, resume = -1, c, rc;
  const char *sets[argc > 0 ? argc : 1];
  int n_sets = 0;
  while ((c = getopt_long(argc, argv, "c:dh", longopts, NULL)) != -1) {
    switch (c) {
    case 'c': config_path = optarg; break;
    case 'd': daemon_mode = 1; break;
    case OPT_SET: sets[n_sets++] = optarg; break;
    case OPT_CHECK: check = 1; break;
    case OPT_PRINT: print = 1; break;
    case OPT_DOC: doc = 1; break;
    case OPT_RESUME:
    case OPT_NO_RESUME:
      if (resume >= 0 && resume != (c == OPT_RESUME)) {
        fprintf(stderr, "mocod: --resume and --no-resume contradict each other; give one\n");
        return 2;
      }
      resume = c == OPT_RESUME;
      break;
    case OPT_EXPORT_MODEL: export_ckpt = optarg; break;
    case OPT_ENCODER: encoder = optarg; break;
    case 'h': usage(stdout); return 0;
    default: usage(stderr); return 2;
    }
  }
  if (export_ckpt) {
    if (optind + 1 != argc) {
      fprintf(stderr, "mocod: --export-model CHECKPOINT PATH: expected one PATH\n");
      return 2;
    }
    return offline_export_model(export_ckpt, argv[optind], encoder, sets, n_sets);
  }
  if (optind < argc) {
    fprintf(stderr, "mocod: unexpected argument '%s'\n", argv[optind]);
    usage(stderr);
    return 2;
  }
  if (doc) {
    config_write_doc(stdout);
    return 0;
  }

  json_t *config = NULL;
  if (config_path) {
    if (config_load_file(&config, config_path)) {
      fprintf(stderr, "mocod: config %s\n", moco_errmsg());
      return 2;
    }
  } else {
    config = config_new();
  }
  for (int i = 0; i < n_sets; i++)
    if (config_override(config, sets[i])) {
      fprintf(stderr, "mocod: %s\n", moco_errmsg());
      return 2;
    }
  char *report = NULL;
  if (config_finalize(config, &report)) {
    report_invalid(config_path, report ? report : (char *)moco_errmsg(), sets, n_sets);
    free(report);
    json_decref(config);
    return 2;
  }
  if (server_check_paths(config)) {
    fprintf(stderr, "mocod: config %s is invalid:\n  %s\n", config_path ? config_path : "(defaults)",
            moco_errmsg());
    json_decref(config);
    return 2;
  }
  if (daemon_mode && (rc = keep_daemon_log(config))) {
    json_decref(config);
    return rc;
  }
  if (print) {
    json_dumpf(config, stdout, JSON_INDENT(2) | JSON_REAL_PRECISION(15));
    fputc('\n', stdout);
    json_decref(config);
    return 0;
  }
  if (dist_init(&argc, &argv)) {
    fprintf(stderr, "mocod: %s\n", moco_errmsg());
    json_decref(config);
    return 1;
  }
  if (dist_active() && daemon_mode) {
    fprintf(stderr, "mocod: -d under mpirun: mpirun must stay the parent of its ranks, so the ranks cannot "
                    "detach; start the job in the background with scripts/mocod-mpi.sh LOG [mpirun options] -- "
                    "[mocod options], which returns once rank 0 answers (README, \"Several processes\")\n");
    json_decref(config);
    dist_finalize();
    return 2;
  }
  world_peers_init();
  if (dist_rank() > 0) {
    /* Only rank 0 stops the job (a stop it broadcasts): a SIGTERM or ^C that mpirun passes on to every
     * rank must not end a follower in the middle of a step that rank 0 is still finishing. */
    signal(SIGTERM, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    int code = world_follow(config);
    json_decref(config);
    dist_finalize();
    return code;
  }
  int code = run(config, config_path, check, daemon_mode, resume, sets, n_sets);
  world_send(WORLD_STOP, NULL, 0); /* also when rank 0 could not start: the others end with it */
  dist_finalize();
  return code;
}

/* Rank 0, or the only process: the check, or the daemon. */
static int run(json_t *config, const char *config_path, int check, int daemon_mode, int resume,
               const char *const *sets, int n_sets) {
  if (check) {
    mocod_config mc;
    trainer *t = NULL;
    if (config_read(config, &mc) || trainer_create(&t, &mc.trainer)) {
      fprintf(stderr, "mocod: config %s: %s\n", config_path ? config_path : "(defaults)", moco_errmsg());
      json_decref(config);
      return 2;
    }
    printf("config %s is valid: %lld steps\n", config_path ? config_path : "(defaults)",
           (long long)trainer_total_steps(t));
    trainer_destroy(t);
    json_decref(config);
    return 0;
  }

  if (daemon_mode && daemonise()) return 1;
  /* A file-size limit (ulimit -f) must fail the write with EFBIG, reported like a full disk, not
   * kill the daemon in the middle of a checkpoint. */
  signal(SIGXFSZ, SIG_IGN);

  /* From here on, failures reach the parent through on_ready when daemonised. */
  const char *pidf = config_str(config, "service.pid_file");
  char err[1400];
  if (server_open_log(config)) {
    say_not_ready("%s", moco_errmsg());
    return 1;
  }
  if (*pidf && server_make_dirs(pidf, 0)) {
    say_not_ready("pid file: %s", moco_errmsg());
    return 1;
  }
  raise_fd_limit();
  if (pidfile_acquire(pidf, err, sizeof err)) {
    on_ready(NULL, MOCO_EBUSY, err);
    json_decref(config);
    return 1;
  }
  server_options opt = {.resume = resume, .config_path = config_path, .sets = sets, .n_sets = n_sets,
                        .ready = on_ready};
  int code = server_run(config, &opt);
  pidfile_release();
  json_decref(config);
  log_close();
  return code;
}
