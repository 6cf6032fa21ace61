/* Internal to src/service: what config.c (the schema, its checks) and config_doc.c (the reference,
 * the did-you-mean suggestion) share. */
#ifndef MOCO_SERVICE_CONFIG_INT_H
#define MOCO_SERVICE_CONFIG_INT_H

#include <stddef.h>

#include "service/config.h"

/* The type's name for messages and the reference: "integer", "number", "layer list", ... */
const char *config_type_name(config_type t);

/* The names of an enum row joined by sep ("a|b|c"), cut to fit n bytes. */
void config_names_text(const enum_name *t, const char *sep, char *buf, size_t n);

/* "[0, 1]", "(0, 1]", "[0, 1)": the row's bounds as an interval. */
void config_range_text(const config_option *o, char *buf, size_t n);

/* The known option or section path closest to `path`, written to out, when it is close enough to be
 * a typo; returns 0 when nothing is. */
int config_suggest(const char *path, char *out, size_t n);

#endif
