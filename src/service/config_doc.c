/* The parts of the config module that write about the schema rather than apply it: the markdown
 * reference (--config-doc) and the did-you-mean suggestion for an unknown key. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config_int.h"
#include "service/config.h"
#include "service/log.h"

/* ---------------------------------------------------------------------------------------------------
 * Unknown keys, with a suggestion.
 * ------------------------------------------------------------------------------------------------- */

static size_t edit_distance(const char *a, const char *b) {
  size_t la = strlen(a), lb = strlen(b);
  if (la > 64 || lb > 64) return (size_t)-1;
  size_t d[65], prev;
  for (size_t j = 0; j <= lb; j++) d[j] = j;
  for (size_t i = 1; i <= la; i++) {
    prev = d[0];
    d[0] = i;
    for (size_t j = 1; j <= lb; j++) {
      size_t keep = d[j];
      size_t sub = prev + (a[i - 1] != b[j - 1]);
      size_t del = d[j] + 1, ins = d[j - 1] + 1;
      d[j] = sub < del ? (sub < ins ? sub : ins) : (del < ins ? del : ins);
      prev = keep;
    }
  }
  return d[lb];
}

/* The known option or section path closest to `path`, written to out, when it is close enough to be
 * a typo; returns 0 when nothing is. Candidates are every option and each of its enclosing sections. */
int config_suggest(const char *path, char *out, size_t n) {
  size_t best_d = (size_t)-1;
  char cand[256];
  for (size_t i = 0; i < config_n_options; i++) {
    const char *p = config_options[i].path;
    for (const char *end = p;; end++) {
      if (*end != '.' && *end != '\0') continue;
      size_t len = (size_t)(end - p);
      if (len < sizeof cand) {
        memcpy(cand, p, len);
        cand[len] = '\0';
        size_t d = edit_distance(path, cand);
        if (d < best_d) {
          best_d = d;
          snprintf(out, n, "%s", cand);
        }
      }
      if (!*end) break;
    }
  }
  size_t len = strlen(path);
  size_t limit = len < 6 ? 1 : len < 12 ? 2 : 3;
  return best_d <= limit;
}

/* ---------------------------------------------------------------------------------------------------
 * The markdown reference.
 * ------------------------------------------------------------------------------------------------- */

static void allowed_text(const config_option *o, char *buf, size_t n) {
  char range[80];
  switch (o->type) {
  case CONFIG_INT:
  case CONFIG_NUM:
    config_range_text(o, range, sizeof range);
    snprintf(buf, n, "%s in %s", config_type_name(o->type), range);
    break;
  case CONFIG_ENUM: {
    char names[256];
    config_names_text(o->names, "`, `", names, sizeof names);
    snprintf(buf, n, "`%s`", names);
    break;
  }
  default: snprintf(buf, n, "%s", config_type_name(o->type)); break;
  }
}

/* The default layer lists, one layer per line. */
static void write_layer_defaults(FILE *out) {
  for (size_t i = 0; i < config_n_options; i++) {
    const config_option *o = &config_options[i];
    if (o->type != CONFIG_LAYERS) continue;
    json_t *v = json_loads(o->def, 0, NULL);
    fprintf(out, "\nDefault `%s`:\n\n```json\n[\n", o->path);
    size_t k;
    json_t *l;
    json_array_foreach(v, k, l) {
      char *t = json_dumps(l, LOG_JSON_FLAGS);
      fprintf(out, "  %s%s\n", t ? t : "?", k + 1 < json_array_size(v) ? "," : "");
      free(t);
    }
    fprintf(out, "]\n```\n");
    json_decref(v);
  }
}

void config_write_doc(FILE *out) {
  char section[128] = "";
  for (size_t i = 0; i < config_n_options; i++) {
    const config_option *o = &config_options[i];
    const char *dot = strchr(o->path, '.');
    size_t n = dot ? (size_t)(dot - o->path) : 0;
    char sec[128];
    snprintf(sec, sizeof sec, "%.*s", (int)n, o->path);
    if (i == 0 || strcmp(sec, section)) {
      snprintf(section, sizeof section, "%s", sec);
      fprintf(out, "%s### %s\n\n", i ? "\n" : "", n ? section : "top level");
      fprintf(out, "| key | default | allowed | `set` | meaning |\n|---|---|---|---|---|\n");
    }
    char allowed[512];
    allowed_text(o, allowed, sizeof allowed);
    /* A layer list's default is long: it goes under the table, this row points there. */
    fprintf(out, "| `%s` | %s%s%s | %s | %s | %s |\n", o->path, o->type == CONFIG_LAYERS ? "" : "`",
            o->type == CONFIG_LAYERS ? "see below" : o->def, o->type == CONFIG_LAYERS ? "" : "`",
            allowed, (o->flags & CONFIG_RUNTIME) ? "yes" : "no", o->doc);
  }
  write_layer_defaults(out);
}
