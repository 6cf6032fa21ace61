/* mocod's configuration: one JSON document, described by ONE schema table (config_options), Redis
 * config.c style. Every other view of the configuration is derived from that table: default filling,
 * validation, the `config` and `set` commands (only rows flagged CONFIG_RUNTIME may change while
 * training), --print-config and the markdown reference printed by `mocod --config-doc`.
 *
 * A config is a jansson object tree addressed by dotted paths ("contrast.queue_size"). After
 * config_finalize every option in the table is present with a valid value, so the typed getters below
 * never fail on a finalized tree. */
#ifndef MOCO_SERVICE_CONFIG_H
#define MOCO_SERVICE_CONFIG_H

#include <jansson.h>
#include <stddef.h>
#include <stdio.h>

#include "train/trainer.h"

typedef enum {
  CONFIG_INT,    /* JSON integer within [min, max] */
  CONFIG_NUM,    /* JSON number within [min, max] */
  CONFIG_BOOL,   /* true / false */
  CONFIG_STR,    /* string; a path is relative to the directory mocod was started in */
  CONFIG_ENUM,   /* one of the words in `choices` ("a|b|c") */
  CONFIG_LAYERS, /* array of layer objects (include/core/net.h), checked in full by net_build */
  CONFIG_INTS,   /* array of integers, each within [min, max] */
} config_type;

enum {
  CONFIG_RUNTIME = 1 << 0, /* may change while training, through `set`; applied between steps */
};

typedef struct {
  const char *path;    /* dotted JSON path */
  config_type type;
  const char *def;     /* default, as JSON text */
  double min, max;     /* CONFIG_INT / CONFIG_NUM: inclusive bounds */
  const char *choices; /* CONFIG_ENUM: allowed words, '|'-separated */
  unsigned flags;
  const char *doc;     /* one line */
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

/* Maps a finalized config onto the modules' config structs. */
int config_to_trainer(const json_t *root, trainer_config *tc);

/* The markdown reference: one table per section. */
void config_write_doc(FILE *out);

#endif
