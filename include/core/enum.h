/* {name, value} tables for the enums that the config names, Redis style
 * ({"volatile-lru", MAXMEMORY_VOLATILE_LRU}): each module exports the table of its own enum, the config
 * schema (src/service/config.c) points its row at it, and messages name values through it. A table
 * ends with {NULL, 0}; values are stated, never implied by position. */
#ifndef MOCO_CORE_ENUM_H
#define MOCO_CORE_ENUM_H

typedef struct {
  const char *name;
  int value;
} enum_name;

/* The name of `value` in table t, or "?" when the table has none. */
const char *enum_name_of(const enum_name *t, int value);
/* The value named `name`: 0 and *value set, or MOCO_ENOENT with the allowed names in moco_errmsg. */
int enum_value_of(const enum_name *t, const char *name, int *value);

#endif
