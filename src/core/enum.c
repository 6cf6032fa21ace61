#include "core/enum.h"

#include <stdio.h>
#include <string.h>

#include "core/err.h"

const char *enum_name_of(const enum_name *t, int value) {
  for (; t->name; t++)
    if (t->value == value) return t->name;
  return "?";
}

int enum_value_of(const enum_name *t, const char *name, int *value) {
  char allowed[256];
  size_t k = 0;
  allowed[0] = '\0';
  for (const enum_name *e = t; e->name; e++) {
    if (!strcmp(e->name, name)) {
      *value = e->value;
      return 0;
    }
    int w = snprintf(allowed + k, sizeof allowed - k, "%s%s", k ? ", " : "", e->name);
    if (w > 0 && (size_t)w < sizeof allowed - k) k += (size_t)w;
  }
  return moco_error(MOCO_ENOENT, "\"%s\": expected one of %s", name, allowed);
}
