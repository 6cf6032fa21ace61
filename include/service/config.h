/* mocod's configuration: one JSON document, described by ONE schema table (config_options), Redis
 * config.c style. A row names an option, its one default, its range (or the owning module's
 * {name, value} table, core/enum.h), its flags and the field of mocod_config it binds (offsetof).
 * Every other view of the configuration is derived from that table: default filling, validation, the
 * structs the modules run on (config_read, a loop over the rows), config_defaults for tests, the
 * `config` and `set` commands (only rows flagged CONFIG_RUNTIME may change while training),
 * --print-config and the markdown reference printed by `mocod --config-doc`. No module keeps a default
 * or a range check of its own; the rules that tie options together live beside the table.
 *
 * A config is a jansson object tree addressed by dotted paths ("contrast.queue_size"). After
 * config_finalize every option in the table is present with a valid value, so the typed getters below
 * never fail on a finalized tree. */
#ifndef MOCO_SERVICE_CONFIG_H
#define MOCO_SERVICE_CONFIG_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "core/file.h"
#include "service/log.h"
#include "train/trainer.h"

typedef enum {
  CONFIG_INT,    /* JSON integer within [min, max]; binds an int or an int64_t */
  CONFIG_NUM,    /* JSON number within [min, max]; binds a float or a double */
  CONFIG_BOOL,   /* true / false; binds an int (0 / 1) */
  CONFIG_STR,    /* string; a path is relative to the directory mocod was started in; binds a char[] */
  CONFIG_ENUM,   /* one of the names of the owning module's {name, value} table; binds that enum */
  CONFIG_LAYERS, /* array of layer objects (include/core/net.h), checked in full by net_build; binds a
                    const json_t * borrowed from the config tree */
  CONFIG_INTS,   /* array of integers, each within [min, max]; binds an int64_t[] and its int count */
} config_type;

enum {
  CONFIG_RUNTIME = 1 << 0,  /* may change while training, through `set`; applied between steps */
  CONFIG_MIN_OPEN = 1 << 1, /* the value must lie above min, not at it (a divisor, a log's argument) */
  CONFIG_MAX_OPEN = 1 << 2, /* the value must lie below max, not at it */
};

/* Every value of the configuration, each in the field its row binds: the trainer's (and through it
 * every module's) settings, the data spec as written, and the service's own. */
typedef struct {
  struct {
    char dir[FILE_PATH_MAX], train[FILE_PATH_MAX], train_labels[FILE_PATH_MAX];
    char eval[FILE_PATH_MAX], eval_labels[FILE_PATH_MAX];
  } data;                 /* as configured; trainer.train etc. hold them with data.dir applied */
  trainer_config trainer;
  struct {
    int64_t every_steps, train_limit, limit;
    int probe_at_end;
  } eval;
  struct {
    char dir[FILE_PATH_MAX];
    int64_t every_steps, every_seconds;
    int keep;
  } checkpoint;
  struct {
    char progress[FILE_PATH_MAX], file[FILE_PATH_MAX];
    log_level level;
    int64_t every_steps;
  } log;
  struct {
    char socket[FILE_PATH_MAX], pid_file[FILE_PATH_MAX];
    char metrics_listen[256]; /* HOST:PORT */
    int exit_on_finish;
  } service;
} mocod_config;

/* One option, Redis createXConfig style: its path, type, the ONE default, range or names, flags, the
 * field it binds in mocod_config and its one-line doc. */
typedef struct {
  const char *path;        /* dotted JSON path */
  config_type type;
  const char *def;         /* default, as JSON text */
  double min, max;         /* CONFIG_INT / CONFIG_NUM / CONFIG_INTS: bounds (inclusive unless flagged open) */
  const enum_name *names;  /* CONFIG_ENUM: the owning module's table */
  unsigned flags;
  size_t off, size;        /* the bound field: offsetof(mocod_config, ...) and its sizeof */
  size_t count_off;        /* CONFIG_INTS: offsetof the int that receives the element count */
  const char *doc;         /* one line */
} config_option;

extern const config_option config_options[];
extern const size_t config_n_options;

/* The row for a dotted path, or NULL. */
const config_option *config_option_find(const char *path);

/* Reads a JSON file. MOCO_ENOENT / MOCO_EFORMAT with "path:line:column: what" on failure.
 * A top-level "extends": "other.json" (relative to this file's directory) loads that file first and
 * lays this one over it, objects merged key by key. Keys starting with "//" are comments, anywhere. */
int config_load_file(json_t **root, const char *path);
/* An empty config (every value at its default once finalized). */
json_t *config_new(void);

/* Applies "PATH=VALUE" (from --set): VALUE is parsed as JSON, else taken as a string. Intermediate
 * objects are created. Not validated here: config_finalize does that with the rest. */
int config_override(json_t *root, const char *assignment);

/* Checks the whole tree against the table and fills in defaults. Reports EVERY problem at once: on
 * failure returns MOCO_ECONFIG, *report (when report is not NULL) receives a malloc'd text with one
 * line per problem ("contrast.temperature: value 0 out of range, allowed [0.001, 10]"; unknown keys
 * name the closest known one), and moco_errmsg holds the first line and the count. */
int config_finalize(json_t *root, char **report);

/* Checks one value against its row; 0, or MOCO_ECONFIG with the reason written to why. */
int config_check_value(const config_option *o, const json_t *v, char *why, size_t why_len);

/* Changes one value of a finalized config. With `runtime` set, only CONFIG_RUNTIME rows are
 * accepted (anything else is refused with MOCO_ESTATE and the reason). The value is checked against
 * the row and against the rules that tie options together; on failure nothing changes. */
int config_set(json_t *root, const char *path, const json_t *value, int runtime);

/* The value at a dotted path, or NULL (borrowed reference). */
json_t *config_get(const json_t *root, const char *path);
/* Typed getters for a finalized config (a missing or mistyped value reads as 0 / "" / NULL). */
long long config_int(const json_t *root, const char *path);
double config_num(const json_t *root, const char *path);
int config_bool(const json_t *root, const char *path);
const char *config_str(const json_t *root, const char *path);

/* Reads a finalized config into every row's field: a loop over the rows, then data.dir applied to the
 * data spec (trainer.train etc.). LAYERS fields borrow from root, which must outlive c. */
int config_read(const json_t *root, mocod_config *c);

/* config_read's trainer part alone: what a trainer is built from. Layer lists borrow from root. */
int config_to_trainer(const json_t *root, trainer_config *tc);

/* The schema's defaults, read once into a struct that lives as long as the process: what a test or a
 * benchmark that builds module configs in C starts from (config_defaults()->trainer.moco.loss). NULL
 * only if the schema's own defaults do not finalize, which the config tests rule out. */
const mocod_config *config_defaults(void);

/* The markdown reference: one table per section. */
void config_write_doc(FILE *out);

#endif
