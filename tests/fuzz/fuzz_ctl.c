/* The control protocol: the input is sent as a client's bytes (one or more request lines) to a real
 * ctl server on a libuv loop in this process, through framing, JSON parsing, argument validation and
 * the handlers of a command table shaped like mocod's (required, typed and bounded args, a free-form
 * `set`); every answer is read back until the server closes the connection. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include "fuzz.h"
#include "service/ctl.h"

static int answer(ctl_call *call, json_t *args, void *data) {
  (void)data;
  ctl_reply(call, json_pack("{s:O}", "args", args));
  return 0;
}

static int refuse(ctl_call *call, json_t *args, void *data) {
  (void)call;
  (void)args;
  (void)data;
  return -2; /* MOCO_EINVAL: ctl answers with the code's name */
}

static const ctl_arg eval_args[] = {{"probe", CTL_T_BOOL, 0, 0, 0},
                                    {"encoder", CTL_T_STRING, 0, 0, 0},
                                    {"train_limit", CTL_T_INT, 0, 0, 1e12},
                                    {"limit", CTL_T_NUMBER, 0, 0, 1e12},
                                    {NULL, 0, 0, 0, 0}};
static const ctl_arg export_args[] = {{"path", CTL_T_STRING, CTL_ARG_REQUIRED, 0, 0},
                                      {"opts", CTL_T_OBJECT, 0, 0, 0},
                                      {"list", CTL_T_ARRAY, 0, 0, 0},
                                      {NULL, 0, 0, 0, 0}};
static const ctl_command commands[] = {
    {"status", answer, CTL_SAFE_WHILE_RUNNING, NULL, "status"},
    {"eval", answer, CTL_CHANGES_STATE, eval_args, "eval"},
    {"export", answer, CTL_CHANGES_STATE, export_args, "export"},
    {"set", refuse, CTL_CHANGES_STATE | CTL_ANY_ARGS, NULL, "set"},
    {"subscribe", answer, CTL_SAFE_WHILE_RUNNING, NULL, "subscribe"},
    {NULL, NULL, 0, NULL, NULL},
};

static uv_loop_t loop;
static ctl_server srv;
static char sock[108];

static int setup(void) {
  static int ok = -1;
  if (ok >= 0) return ok;
  snprintf(sock, sizeof sock, "/tmp/mocod-fuzz-ctl-%d.sock", (int)getpid());
  ctl_config cfg;
  ctl_config_default(&cfg);
  cfg.path = sock;
  cfg.max_line = 4096; /* small, so that over-long lines are reached */
  uv_loop_init(&loop);
  ok = ctl_init(&srv, &loop, &cfg, commands, NULL) == 0;
  return ok;
}

int fuzz_ctl(const uint8_t *data, size_t size) {
  if (!setup()) return 0;
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  memcpy(sa.sun_path, sock, strlen(sock) + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return 0;
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0 && errno != EINPROGRESS) {
    close(fd);
    return 0;
  }
  /* Send and read on this thread while the loop turns, so that neither side's buffer fills. */
  size_t sent = 0;
  int shut = 0;
  char buf[65536];
  for (int turns = 0; turns < 100000; turns++) {
    if (sent < size) {
      ssize_t k = send(fd, data + sent, size - sent, MSG_NOSIGNAL);
      if (k > 0) sent += (size_t)k;
    } else if (!shut) {
      shutdown(fd, SHUT_WR);
      shut = 1;
    }
    uv_run(&loop, UV_RUN_NOWAIT);
    ssize_t k = recv(fd, buf, sizeof buf, 0);
    if (k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) break;
  }
  close(fd);
  uv_run(&loop, UV_RUN_NOWAIT);
  return 0;
}
FUZZ_ENTRY(fuzz_ctl)
