/* The network: parsing a layer-list spec, laying out the arenas, forward/backward over the layer
 * functions of core/layers.h, initialisation and save/load. */
#include "core/net.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/err.h"
#include "core/layers.h"
#include "core/par.h"
#include "core/tensor.h"

/* Bounds that keep every gemm dimension and index inside an int. */
#define NET_MAX_DIM (1 << 20)
#define NET_MAX_SAMPLE ((size_t)1 << 26)

static const char *const kind_names[] = {
    [LAYER_LINEAR] = "linear",   [LAYER_BATCHNORM] = "batchnorm", [LAYER_RELU] = "relu",
    [LAYER_CONV2D] = "conv2d",   [LAYER_MAXPOOL] = "maxpool",     [LAYER_AVGPOOL] = "avgpool",
    [LAYER_FLATTEN] = "flatten", [LAYER_L2NORM] = "l2norm",
};
#define N_KINDS ((int)(sizeof kind_names / sizeof kind_names[0]))

/* The keys each kind accepts, besides "type"; anything else in a layer object is an error, so a typo
 * ("kernal") cannot silently fall back to a default. */
static const char *const kind_keys[][6] = {
    [LAYER_LINEAR] = {"out", "bias"},
    [LAYER_BATCHNORM] = {"momentum", "eps"},
    [LAYER_RELU] = {0},
    [LAYER_CONV2D] = {"out", "kernel", "stride", "pad", "bias"},
    [LAYER_MAXPOOL] = {"kernel", "stride", "pad"},
    [LAYER_AVGPOOL] = {0},
    [LAYER_FLATTEN] = {0},
    [LAYER_L2NORM] = {0},
};

/* ---- spec parsing ------------------------------------------------------------------------------ */

typedef struct {
  const char *path; /* "model.backbone" */
  int index;
  const json_t *obj;
} spec_ctx;

static const char *json_kind(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT: return "object";
  case JSON_ARRAY: return "array";
  case JSON_STRING: return "string";
  case JSON_INTEGER: return "integer";
  case JSON_REAL: return "number";
  case JSON_TRUE:
  case JSON_FALSE: return "boolean";
  default: return "null";
  }
}

static int spec_int(const spec_ctx *c, const char *key, int required, int def, int lo, int *out) {
  const json_t *v = json_object_get(c->obj, key);
  if (!v) {
    if (required)
      return moco_error(MOCO_ECONFIG, "%s[%d].%s: missing field", c->path, c->index, key);
    *out = def;
    return 0;
  }
  if (!json_is_integer(v))
    return moco_error(MOCO_ECONFIG, "%s[%d].%s: must be an integer, got %s", c->path, c->index, key,
                      json_kind(v));
  json_int_t x = json_integer_value(v);
  if (x < lo)
    return moco_error(MOCO_ECONFIG, "%s[%d].%s: must be >= %d, got %lld", c->path, c->index, key,
                      lo, (long long)x);
  if (x > NET_MAX_DIM)
    return moco_error(MOCO_ERANGE, "%s[%d].%s: must be <= %d, got %lld", c->path, c->index, key,
                      NET_MAX_DIM, (long long)x);
  *out = (int)x;
  return 0;
}

static int spec_bool(const spec_ctx *c, const char *key, int def, int *out) {
  const json_t *v = json_object_get(c->obj, key);
  if (!v) {
    *out = def;
    return 0;
  }
  if (!json_is_boolean(v))
    return moco_error(MOCO_ECONFIG, "%s[%d].%s: must be true or false, got %s", c->path, c->index,
                      key, json_kind(v));
  *out = json_is_true(v);
  return 0;
}

/* A number in (lo, hi] (lo_open) or [lo, hi]. */
static int spec_float(const spec_ctx *c, const char *key, float def, double lo, double hi,
                      int lo_open, float *out) {
  const json_t *v = json_object_get(c->obj, key);
  if (!v) {
    *out = def;
    return 0;
  }
  if (!json_is_number(v))
    return moco_error(MOCO_ECONFIG, "%s[%d].%s: must be a number, got %s", c->path, c->index, key,
                      json_kind(v));
  double x = json_number_value(v);
  if (!(lo_open ? x > lo : x >= lo) || !(x <= hi))
    return moco_error(MOCO_ECONFIG, "%s[%d].%s: must be in %c%g, %g], got %g", c->path, c->index,
                      key, lo_open ? '(' : '[', lo, hi, x);
  *out = (float)x;
  return 0;
}

static int spec_keys(const spec_ctx *c, layer_kind kind) {
  const char *key;
  const json_t *v;
  json_object_foreach((json_t *)c->obj, key, v) {
    int ok = strcmp(key, "type") == 0;
    for (int i = 0; !ok && i < 6 && kind_keys[kind][i]; i++)
      ok = strcmp(key, kind_keys[kind][i]) == 0;
    if (ok) continue;
    char allowed[96] = "type";
    for (int i = 0; i < 6 && kind_keys[kind][i]; i++) {
      strcat(allowed, ", ");
      strcat(allowed, kind_keys[kind][i]);
    }
    return moco_error(MOCO_ECONFIG, "%s[%d].%s: unknown key for %s (allowed: %s)", c->path,
                      c->index, key, kind_names[kind], allowed);
  }
  return 0;
}

static int spec_kind(const spec_ctx *c, layer_kind *kind) {
  const json_t *t = json_object_get(c->obj, "type");
  if (!t) return moco_error(MOCO_ECONFIG, "%s[%d].type: missing field", c->path, c->index);
  if (!json_is_string(t))
    return moco_error(MOCO_ECONFIG, "%s[%d].type: must be a string, got %s", c->path, c->index,
                      json_kind(t));
  for (int k = 0; k < N_KINDS; k++)
    if (strcmp(json_string_value(t), kind_names[k]) == 0) {
      *kind = (layer_kind)k;
      return 0;
    }
  return moco_error(
      MOCO_ECONFIG,
      "%s[%d].type: unknown layer type \"%s\" (expected linear, batchnorm, relu, conv2d, "
      "maxpool, avgpool, flatten or l2norm)",
      c->path, c->index, json_string_value(t));
}

/* Reads one layer's hyperparameters (defaults as PyTorch's). */
static int spec_layer(const spec_ctx *c, layer *L) {
  int rc;
  if (!json_is_object(c->obj))
    return moco_error(MOCO_ECONFIG, "%s[%d]: must be an object, got %s", c->path, c->index,
                      json_kind(c->obj));
  if ((rc = spec_kind(c, &L->kind)) || (rc = spec_keys(c, L->kind))) return rc;
  switch (L->kind) {
  case LAYER_LINEAR:
    if ((rc = spec_int(c, "out", 1, 0, 1, &L->out_features)) ||
        (rc = spec_bool(c, "bias", 1, &L->bias)))
      return rc;
    break;
  case LAYER_CONV2D:
    if ((rc = spec_int(c, "out", 1, 0, 1, &L->out_features)) ||
        (rc = spec_int(c, "kernel", 1, 0, 1, &L->kernel)) ||
        (rc = spec_int(c, "stride", 0, 1, 1, &L->stride)) ||
        (rc = spec_int(c, "pad", 0, 0, 0, &L->pad)) || (rc = spec_bool(c, "bias", 1, &L->bias)))
      return rc;
    break;
  case LAYER_MAXPOOL:
    if ((rc = spec_int(c, "kernel", 1, 0, 1, &L->kernel)) ||
        (rc = spec_int(c, "stride", 0, L->kernel, 1, &L->stride)) ||
        (rc = spec_int(c, "pad", 0, 0, 0, &L->pad)))
      return rc;
    if (L->pad > L->kernel / 2)
      return moco_error(MOCO_ECONFIG, "%s[%d].pad: must be <= kernel/2 = %d, got %d", c->path,
                        c->index, L->kernel / 2, L->pad);
    break;
  case LAYER_BATCHNORM:
    if ((rc = spec_float(c, "momentum", 0.1f, 0.0, 1.0, 0, &L->bn_momentum)) ||
        (rc = spec_float(c, "eps", 1e-5f, 0.0, 1.0, 1, &L->bn_eps)))
      return rc;
    break;
  default: break;
  }
  return 0;
}

/* ---- shapes and sizes ---------------------------------------------------------------------------- */

static int is_vector(net_shape s) { return s.h == 1 && s.w == 1; }

static void layer_geom(const layer *L, conv_geom *g) {
  conv_geom_init(g, L->in_shape.c, L->in_shape.h, L->in_shape.w, L->kernel, L->stride, L->pad);
}

/* Output shape and parameter, buffer and saved-state sizes of L for input L->in_shape. */
static int layer_shape(layer *L, const char *path, int i, int max_batch) {
  net_shape in = L->in_shape;
  conv_geom g;
  L->out_shape = in;
  L->w_len = L->b_len = L->buf_len = L->saved_len = 0;
  switch (L->kind) {
  case LAYER_LINEAR:
  case LAYER_L2NORM:
    if (!is_vector(in))
      return moco_error(MOCO_ESHAPE,
                        "%s[%d]: %s expects a vector input, got %dx%dx%d (add flatten)", path, i,
                        kind_names[L->kind], in.c, in.h, in.w);
    if (L->kind == LAYER_L2NORM) {
      L->saved_len = (size_t)max_batch;
      break;
    }
    L->out_shape = (net_shape){L->out_features, 1, 1};
    L->w_len = (size_t)L->out_features * in.c;
    L->b_len = L->bias ? (size_t)L->out_features : 0;
    break;
  case LAYER_BATCHNORM:
    L->w_len = L->b_len = (size_t)in.c; /* gamma, beta */
    L->buf_len = 2 * (size_t)in.c; /* running mean, running var */
    L->saved_len = batchnorm_saved_len(in.c, max_batch);
    break;
  case LAYER_CONV2D:
  case LAYER_MAXPOOL:
    if (conv_geom_init(&g, in.c, in.h, in.w, L->kernel, L->stride, L->pad))
      return moco_error(MOCO_ESHAPE, "%s[%d].kernel: %d does not fit the input %dx%d with pad %d",
                        path, i, L->kernel, in.h, in.w, L->pad);
    L->out_shape = (net_shape){L->kind == LAYER_CONV2D ? L->out_features : in.c, g.OH, g.OW};
    if (L->kind == LAYER_MAXPOOL) {
      L->saved_len = net_shape_size(L->out_shape) * max_batch; /* the winners' offsets, int32 */
      break;
    }
    L->w_len = (size_t)L->out_features * in.c * L->kernel * L->kernel;
    L->b_len = L->bias ? (size_t)L->out_features : 0;
    L->chunk = conv2d_chunk(&g, L->out_features, max_batch);
    L->parts = par_threads();
    break;
  case LAYER_AVGPOOL: L->out_shape = (net_shape){in.c, 1, 1}; break;
  case LAYER_FLATTEN: L->out_shape = (net_shape){(int)net_shape_size(in), 1, 1}; break;
  case LAYER_RELU: break;
  }
  if (net_shape_size(L->out_shape) > NET_MAX_SAMPLE || L->w_len > NET_MAX_SAMPLE)
    return moco_error(MOCO_ERANGE, "%s[%d]: %s too large (output %dx%dx%d, %zu weights)", path, i,
                      kind_names[L->kind], L->out_shape.c, L->out_shape.h, L->out_shape.w,
                      L->w_len);
  return 0;
}

/* Workspace floats the layer needs in forward or backward. */
static size_t layer_workspace(const layer *L) {
  conv_geom g;
  switch (L->kind) {
  case LAYER_CONV2D:
    layer_geom(L, &g);
    return conv2d_workspace_len(&g, L->out_features, L->chunk, L->parts);
  case LAYER_BATCHNORM: return 2 * (size_t)L->in_shape.c;
  default: return 0;
  }
}

/* FNV-1a over the fields that decide what the parameters mean. BatchNorm momentum and eps are left
 * out on purpose: weights saved with one momentum are still valid under another. */
static uint64_t fnv(uint64_t h, int64_t v) {
  for (int i = 0; i < 8; i++) {
    h ^= (uint64_t)(v >> (8 * i)) & 0xff;
    h *= 0x100000001b3ULL;
  }
  return h;
}

static uint64_t arch_hash(const net *n) {
  uint64_t h = 0xcbf29ce484222325ULL;
  h = fnv(fnv(fnv(fnv(h, n->in_shape.c), n->in_shape.h), n->in_shape.w), n->n_layers);
  for (int i = 0; i < n->n_layers; i++) {
    const layer *L = &n->layers[i];
    int64_t f[] = {L->kind, L->out_features, L->bias,        L->kernel,     L->stride,
                   L->pad,  L->out_shape.c,  L->out_shape.h, L->out_shape.w};
    for (size_t k = 0; k < sizeof f / sizeof f[0]; k++) h = fnv(h, f[k]);
  }
  return h;
}

/* ---- arenas -------------------------------------------------------------------------------------- */

static void add_segment(net *n, size_t off, size_t len, int i, int no_decay) {
  if (len) n->segments[n->n_segments++] = (net_segment){off, len, i, no_decay};
}

/* Lays out and allocates params, grads, buffers, activations and scratch for layers whose
 * hyperparameters and shapes are set. On failure frees what it allocated. */
static int net_alloc(net *n) {
  size_t np = 0, nbuf = 0, nact = net_shape_size(n->in_shape) * n->max_batch, ws = 0;
  size_t max_in = 0;
  for (int i = 0; i < n->n_layers; i++) {
    layer *L = &n->layers[i];
    L->w_off = np, np += L->w_len;
    L->b_off = np, np += L->b_len;
    L->buf_off = nbuf, nbuf += L->buf_len;
    /* Every slice of the activation arena starts on a 64-byte boundary. */
    nact += (net_shape_size(L->out_shape) * n->max_batch + 15) & ~(size_t)15;
    nact += (L->saved_len + 15) & ~(size_t)15;
    size_t w = layer_workspace(L), in = net_shape_size(L->in_shape);
    if (w > ws) ws = w;
    if (i > 0 && in > max_in) max_in = in;
  }
  size_t gb = (max_in * n->max_batch + 15) & ~(size_t)15;
  n->n_params = np;
  n->n_buffers = nbuf;
  n->scratch_len = 2 * gb + ws;
  n->params = tensor_calloc(np);
  n->grads = tensor_calloc(np);
  n->buffers = tensor_calloc(nbuf);
  n->act = tensor_calloc(nact);
  n->scratch = tensor_calloc(n->scratch_len);
  n->segments = calloc(2 * (size_t)n->n_layers + 1, sizeof *n->segments);
  int bn_c = 1;
  for (int i = 0; i < n->n_layers; i++)
    if (n->layers[i].kind == LAYER_BATCHNORM && n->layers[i].in_shape.c > bn_c) bn_c = n->layers[i].in_shape.c;
  n->bn_sync = calloc(2 * (size_t)bn_c, sizeof *n->bn_sync);
  if (!n->params || !n->grads || !n->buffers || !n->act || !n->scratch || !n->segments || !n->bn_sync) {
    net_free(n);
    return moco_error(MOCO_ENOMEM, "net: %zu parameters, %zu activation floats", np, nact);
  }
  float *p = n->act;
  n->input = p;
  p += (net_shape_size(n->in_shape) * n->max_batch + 15) & ~(size_t)15;
  for (int i = 0; i < n->n_layers; i++) {
    layer *L = &n->layers[i];
    L->out = p;
    p += (net_shape_size(L->out_shape) * n->max_batch + 15) & ~(size_t)15;
    L->saved = L->saved_len ? p : NULL;
    p += (L->saved_len + 15) & ~(size_t)15;
    /* Weight decay on linear and conv weights only (biases and BatchNorm affine are excluded, as in
     * the MoCo and SimCLR recipes). */
    add_segment(n, L->w_off, L->w_len, i, L->kind == LAYER_BATCHNORM);
    add_segment(n, L->b_off, L->b_len, i, 1);
  }
  n->gbuf[0] = n->scratch;
  n->gbuf[1] = n->scratch + gb;
  n->training = 1;
  n->bn_groups = 1;
  n->last_batch = 0;
  n->arch_hash = arch_hash(n);
  return 0;
}

int net_build(net *n, const json_t *spec, net_shape in, int max_batch, const char *path) {
  memset(n, 0, sizeof *n);
  if (!path) path = "net";
  if (!json_is_array(spec))
    return moco_error(MOCO_ECONFIG, "%s: must be an array of layer objects, got %s", path,
                      spec ? json_kind(spec) : "nothing");
  if (in.c < 1 || in.h < 1 || in.w < 1 || net_shape_size(in) > NET_MAX_SAMPLE)
    return moco_error(MOCO_ESHAPE, "%s: input shape %dx%dx%d: every size must be >= 1", path, in.c,
                      in.h, in.w);
  if (max_batch < 1 || max_batch > NET_MAX_DIM)
    return moco_error(MOCO_ERANGE, "%s: max_batch must be in [1, %d], got %d", path, NET_MAX_DIM,
                      max_batch);
  n->n_layers = (int)json_array_size(spec);
  n->layers = calloc(n->n_layers ? n->n_layers : 1, sizeof *n->layers);
  if (!n->layers) return moco_error(MOCO_ENOMEM, "%s: %d layers", path, n->n_layers);
  n->in_shape = in;
  n->max_batch = max_batch;
  net_shape cur = in;
  for (int i = 0; i < n->n_layers; i++) {
    layer *L = &n->layers[i];
    spec_ctx c = {path, i, json_array_get(spec, i)};
    L->in_shape = cur;
    int rc = spec_layer(&c, L);
    if (!rc) rc = layer_shape(L, path, i, max_batch);
    if (rc) {
      net_free(n);
      return rc;
    }
    cur = L->out_shape;
  }
  n->out_shape = cur;
  for (int i = 0; i + 1 < n->n_layers; i++)
    n->layers[i].fused_relu =
        n->layers[i].kind == LAYER_BATCHNORM && n->layers[i + 1].kind == LAYER_RELU;
  return net_alloc(n);
}

int net_clone(net *dst, const net *src) {
  memset(dst, 0, sizeof *dst);
  dst->layers = calloc(src->n_layers ? src->n_layers : 1, sizeof *dst->layers);
  if (!dst->layers) return moco_error(MOCO_ENOMEM, "net_clone: %d layers", src->n_layers);
  memcpy(dst->layers, src->layers, src->n_layers * sizeof *dst->layers);
  dst->n_layers = src->n_layers;
  dst->in_shape = src->in_shape;
  dst->out_shape = src->out_shape;
  dst->max_batch = src->max_batch;
  int rc = net_alloc(dst);
  if (rc) return rc;
  memcpy(dst->params, src->params, src->n_params * sizeof(float));
  memcpy(dst->buffers, src->buffers, src->n_buffers * sizeof(float));
  dst->training = src->training;
  dst->bn_groups = src->bn_groups;
  dst->sync_bn = src->sync_bn;
  return 0;
}

void net_free(net *n) {
  tensor_free(n->params);
  tensor_free(n->grads);
  tensor_free(n->buffers);
  tensor_free(n->act);
  tensor_free(n->scratch);
  free(n->bn_sync);
  free(n->segments);
  free(n->layers);
  memset(n, 0, sizeof *n);
}

void net_init(net *n, rng_t *r) {
  for (int i = 0; i < n->n_layers; i++) {
    layer *L = &n->layers[i];
    float *w = n->params + L->w_off, *b = n->params + L->b_off;
    if (L->kind == LAYER_BATCHNORM) {
      vec_fill(w, 1.0f, L->w_len);
      vec_fill(b, 0.0f, L->b_len);
      vec_fill(n->buffers + L->buf_off, 0.0f, L->in_shape.c);
      vec_fill(n->buffers + L->buf_off + L->in_shape.c, 1.0f, L->in_shape.c);
      continue;
    }
    if (!L->w_len) continue;
    /* kaiming_uniform_(a = sqrt(5)): bound = gain sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2)), which
     * is 1 / sqrt(fan_in); PyTorch draws the bias from the same range. */
    size_t fan_in = L->w_len / (size_t)L->out_features;
    float bound = 1.0f / sqrtf((float)fan_in);
    for (size_t k = 0; k < L->w_len; k++) w[k] = rng_range(r, -bound, bound);
    for (size_t k = 0; k < L->b_len; k++) b[k] = rng_range(r, -bound, bound);
  }
}

/* ---- forward and backward ------------------------------------------------------------------------ */

/* The layer workspace follows the two gradient buffers in scratch. */
static float *net_workspace(const net *n) { return n->gbuf[1] + (n->gbuf[1] - n->gbuf[0]); }

static bn_dims layer_bn(const net *n, const layer *L, int B) {
  return (bn_dims){B,         L->in_shape.c, L->in_shape.h * L->in_shape.w,
                   n->bn_groups, L->bn_momentum, L->bn_eps, n->training,
                   n->sync_bn && n->bn_groups == 1 ? n->bn_sync : NULL, L->fused_relu};
}

void net_keep_output(net *n, int i) {
  if (i >= 0 && i < n->n_layers) n->layers[i].fused_relu = 0;
}

/* A ReLU that its BatchNorm runs (layer.fused_relu): nothing of its own to do either way. */
static int relu_fused(const net *n, int i) { return i > 0 && n->layers[i - 1].fused_relu; }

/* A flatten layer only renames the shape: its output is its input, not a copy (3 MB a pass for the
 * default backbone, on one thread), and backward hands its gradient through. Layer i's output (the
 * network's input for i < 0), looking through flattens. */
static const float *layer_output(const net *n, int i) {
  while (i >= 0 && n->layers[i].kind == LAYER_FLATTEN) i--;
  return i >= 0 ? n->layers[i].out : n->input;
}
static const float *layer_input(const net *n, int i) { return layer_output(n, i - 1); }

static void layer_forward(net *n, layer *L, const float *x, int B) {
  float *w = n->params + L->w_off, *b = L->b_len ? n->params + L->b_off : NULL;
  size_t len = net_shape_size(L->in_shape) * B;
  conv_geom g;
  bn_dims d;
  switch (L->kind) {
  case LAYER_LINEAR: linear_forward(L->out, x, w, b, B, L->in_shape.c, L->out_features); break;
  case LAYER_BATCHNORM:
    d = layer_bn(n, L, B);
    batchnorm_forward(L->fused_relu ? L[1].out : L->out, L->saved, n->buffers + L->buf_off,
                      n->buffers + L->buf_off + L->in_shape.c, x, w, n->params + L->b_off, &d);
    break;
  case LAYER_RELU: relu_forward(L->out, x, len); break;
  case LAYER_CONV2D:
    layer_geom(L, &g);
    conv2d_forward(L->out, net_workspace(n), x, w, b, B, L->out_features, &g, L->chunk, L->parts);
    break;
  case LAYER_MAXPOOL:
    layer_geom(L, &g);
    maxpool_forward(L->out, (int32_t *)L->saved, x, B, &g);
    break;
  case LAYER_AVGPOOL:
    avgpool_forward(L->out, x, B, L->in_shape.c, L->in_shape.h * L->in_shape.w);
    break;
  case LAYER_FLATTEN: break; /* see layer_output */
  case LAYER_L2NORM: l2norm_forward(L->out, L->saved, x, B, L->in_shape.c); break;
  }
}

/* dx may be NULL for the first layer: then only parameter gradients are computed. */
static void layer_backward(net *n, layer *L, float *dx, const float *dy, const float *x, int B) {
  const float *w = n->params + L->w_off;
  float *dw = n->grads + L->w_off, *db = L->b_len ? n->grads + L->b_off : NULL;
  float *ws = net_workspace(n);
  size_t len = net_shape_size(L->in_shape) * B;
  conv_geom g;
  bn_dims d;
  if (!dx && !L->w_len) return;
  switch (L->kind) {
  case LAYER_LINEAR:
    linear_backward(dx, dw, db, dy, x, w, B, L->in_shape.c, L->out_features);
    break;
  case LAYER_BATCHNORM:
    d = layer_bn(n, L, B);
    batchnorm_backward(dx, dw, n->grads + L->b_off, ws, dy, x, w, L->fused_relu ? L[1].out : L->out,
                       L->saved, &d);
    break;
  case LAYER_RELU: relu_backward(dx, dy, L->out, len); break;
  case LAYER_CONV2D:
    layer_geom(L, &g);
    conv2d_backward(dx, dw, db, ws, dy, x, w, B, L->out_features, &g, L->chunk, L->parts);
    break;
  case LAYER_MAXPOOL:
    layer_geom(L, &g);
    maxpool_backward(dx, dy, (const int32_t *)L->saved, B, &g);
    break;
  case LAYER_AVGPOOL:
    avgpool_backward(dx, dy, B, L->in_shape.c, L->in_shape.h * L->in_shape.w);
    break;
  case LAYER_FLATTEN: flatten_backward(dx, dy, len); break;
  case LAYER_L2NORM: l2norm_backward(dx, dy, L->out, L->saved, B, L->in_shape.c); break;
  }
}

const float *net_forward(net *n, const float *x, int B) {
  if (B < 1 || B > n->max_batch) {
    moco_error(MOCO_ERANGE, "net_forward: batch %d outside [1, %d]", B, n->max_batch);
    return NULL;
  }
  size_t len = net_shape_size(n->in_shape) * B;
  uintptr_t a = (uintptr_t)x, b = (uintptr_t)n->input, bytes = len * sizeof(float);
  if (a + bytes <= b || b + bytes <= a)
    vec_copy(n->input, x, len);
  else
    memmove(n->input, x, len * sizeof(float)); /* the caller passed (part of) the input buffer */
  for (int i = 0; i < n->n_layers; i++) {
    if (relu_fused(n, i)) continue; /* done by layer i - 1 */
    double t0 = n->prof ? clock_now() : 0.0;
    layer_forward(n, &n->layers[i], layer_input(n, i), B);
    if (n->prof) n->prof[2 * i] += clock_now() - t0;
  }
  const float *h = layer_output(n, n->n_layers - 1);
  n->last_batch = B;
  return h;
}

const float *net_layer_output(const net *n, int i) { return layer_output(n, i); }

int net_backward(net *n, const float *dout, float *dx, int B) {
  if (B != n->last_batch || B < 1)
    return moco_error(MOCO_ESTATE, "net_backward: batch %d, but the last forward had %d", B,
                      n->last_batch);
  /* Without dx nothing below the first layer with parameters needs an input gradient (a leading
   * flatten would otherwise cost the first linear layer a whole gemm). */
  int stop = 0;
  if (!dx)
    while (stop < n->n_layers - 1 && !n->layers[stop].w_len) stop++;
  const float *dy = dout;
  int next = 0; /* the gradient buffer the next layer writes: never the one dy is in */
  for (int i = n->n_layers - 1; i >= stop; i--) {
    /* dy passes through a flatten, and a fused ReLU's BatchNorm takes the gradient at its output */
    if ((n->layers[i].kind == LAYER_FLATTEN || relu_fused(n, i)) && i > stop) continue;
    float *din = i > stop ? n->gbuf[next] : i ? NULL : dx;
    double t0 = n->prof ? clock_now() : 0.0;
    layer_backward(n, &n->layers[i], din, dy, layer_input(n, i), B);
    if (n->prof) n->prof[2 * i + 1] += clock_now() - t0;
    dy = din;
    next ^= 1;
  }
  if (n->n_layers == 0 && dx) memcpy(dx, dout, net_shape_size(n->in_shape) * B * sizeof(float));
  return 0;
}

static void zero_grad_part(void *ctx, int part, int parts) {
  net *n = ctx;
  long lo, hi;
  par_range((long)n->n_params, part, parts, &lo, &hi);
  memset(n->grads + lo, 0, (size_t)(hi - lo) * sizeof(float));
}

/* Split over the team: megabytes every step, and a store stream per core goes about twice as fast. */
void net_zero_grad(net *n) { par_run(par_parts((long)n->n_params, 1L << 18), zero_grad_part, n); }

size_t net_num_params(const net *n) { return n->n_params; }

double net_flops_per_sample(const net *n) {
  double f = 0.0;
  for (int i = 0; i < n->n_layers; i++) {
    const layer *L = &n->layers[i];
    if (L->kind == LAYER_LINEAR || L->kind == LAYER_CONV2D)
      f += 2.0 * (double)L->w_len * L->out_shape.h * L->out_shape.w;
  }
  return f;
}

static size_t describe_append(char *buf, size_t cap, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static size_t describe_append(char *buf, size_t cap, size_t len, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int k = vsnprintf(len < cap ? buf + len : NULL, len < cap ? cap - len : 0, fmt, ap);
  va_end(ap);
  return len + (k > 0 ? (size_t)k : 0);
}

size_t net_describe(const net *n, char *buf, size_t cap) {
  net_shape s = n->in_shape;
  size_t len = describe_append(buf, cap, 0, "%dx%dx%d", s.c, s.h, s.w);
  for (int i = 0; i < n->n_layers; i++) {
    const layer *L = &n->layers[i];
    len = describe_append(buf, cap, len, " | %s", kind_names[L->kind]);
    if (L->kind == LAYER_LINEAR || L->kind == LAYER_CONV2D)
      len = describe_append(buf, cap, len, " %d", L->out_features);
    if (L->kind == LAYER_CONV2D || L->kind == LAYER_MAXPOOL)
      len = describe_append(buf, cap, len, " k%d s%d p%d", L->kernel, L->stride, L->pad);
    if ((L->kind == LAYER_LINEAR || L->kind == LAYER_CONV2D) && !L->bias)
      len = describe_append(buf, cap, len, " nobias");
    if (L->out_shape.c != s.c || L->out_shape.h != s.h || L->out_shape.w != s.w)
      len = describe_append(buf, cap, len, " -> %dx%dx%d", L->out_shape.c, L->out_shape.h,
                            L->out_shape.w);
    s = L->out_shape;
  }
  if (cap && len >= cap) buf[cap - 1] = '\0';
  return len;
}

/* ---- save and load ------------------------------------------------------------------------------- */

/* The architecture as saved: enough to say which layer and field differ when a load is refused. */
enum { DESC_FIELDS = 12 };
static const char *const desc_names[DESC_FIELDS] = {"type",           "out",
                                                    "bias",           "kernel",
                                                    "stride",         "pad",
                                                    "input channels", "input height",
                                                    "input width",    "output channels",
                                                    "output height",  "output width"};

static void layer_desc(const layer *L, uint32_t f[DESC_FIELDS]) {
  int32_t v[DESC_FIELDS] = {L->kind,       L->out_features, L->bias,        L->kernel,
                            L->stride,     L->pad,          L->in_shape.c,  L->in_shape.h,
                            L->in_shape.w, L->out_shape.c,  L->out_shape.h, L->out_shape.w};
  for (int k = 0; k < DESC_FIELDS; k++) f[k] = (uint32_t)v[k];
}

void net_save(const net *n, blob_writer *w) {
  blob_section_begin(w, "NETW");
  blob_put_u64(w, n->arch_hash);
  blob_put_u32(w, (uint32_t)n->n_layers);
  for (int i = 0; i < n->n_layers; i++) {
    uint32_t f[DESC_FIELDS];
    layer_desc(&n->layers[i], f);
    for (int k = 0; k < DESC_FIELDS; k++) blob_put_u32(w, f[k]);
  }
  blob_put_u64(w, n->n_params);
  blob_put(w, n->params, n->n_params * sizeof(float));
  blob_put_u64(w, n->n_buffers);
  blob_put(w, n->buffers, n->n_buffers * sizeof(float));
  blob_section_end(w);
}

static const char *kind_name(uint32_t k) { return k < (uint32_t)N_KINDS ? kind_names[k] : "?"; }

const char *net_kind_name(layer_kind k) { return kind_name((uint32_t)k); }

/* Compares the saved layer descriptions with n's; on the first difference records the message. */
static int compare_arch(const net *n, blob_reader *s, const char *name) {
  uint32_t nl;
  int rc = blob_get_u32(s, &nl);
  if (rc) return rc;
  for (uint32_t i = 0; i < nl && i < (uint32_t)n->n_layers; i++) {
    uint32_t saved[DESC_FIELDS], here[DESC_FIELDS];
    for (int k = 0; k < DESC_FIELDS; k++)
      if ((rc = blob_get_u32(s, &saved[k]))) return rc;
    layer_desc(&n->layers[i], here);
    for (int k = 0; k < DESC_FIELDS; k++) {
      if (saved[k] == here[k]) continue;
      if (k == 0)
        return moco_error(MOCO_ESHAPE,
                          "%s: architecture differs: layer %u is %s in the blob, %s here", name, i,
                          kind_name(saved[0]), kind_name(here[0]));
      return moco_error(MOCO_ESHAPE,
                        "%s: architecture differs: layer %u (%s): %s %u in the blob, %u here", name,
                        i, kind_name(here[0]), desc_names[k], saved[k], here[k]);
    }
  }
  if (nl != (uint32_t)n->n_layers)
    return moco_error(MOCO_ESHAPE, "%s: architecture differs: %u layers in the blob, %d here", name,
                      nl, n->n_layers);
  return 0;
}

int net_load(net *n, blob_reader *r) {
  blob_reader s;
  uint64_t hash, np, nb;
  const char *name = r->name ? r->name : "net";
  int rc = blob_section(r, "NETW", &s);
  if (!rc) rc = blob_get_u64(&s, &hash);
  if (!rc) rc = compare_arch(n, &s, name);
  if (!rc && hash != n->arch_hash)
    rc = moco_error(MOCO_ESHAPE, "%s: architecture hash %016llx in the blob, %016llx here", name,
                    (unsigned long long)hash, (unsigned long long)n->arch_hash);
  if (!rc) rc = blob_get_u64(&s, &np);
  if (!rc && np != n->n_params)
    rc = moco_error(MOCO_ESHAPE, "%s: %llu parameters in the blob, %zu here", name,
                    (unsigned long long)np, n->n_params);
  /* Check the whole payload before touching the network, so a refused load leaves it as it was. */
  size_t need = n->n_params * sizeof(float) + 8 + n->n_buffers * sizeof(float);
  if (!rc && s.len - s.pos != need)
    rc = moco_error(MOCO_EFORMAT, "%s: offset %zu: network payload is %zu bytes, expected %zu",
                    name, s.base + s.pos, s.len - s.pos, need);
  if (!rc) {
    memcpy(&nb, s.data + s.pos + n->n_params * sizeof(float), 8);
    if (nb != n->n_buffers)
      rc = moco_error(MOCO_ESHAPE, "%s: %llu buffer values in the blob, %zu here", name,
                      (unsigned long long)nb, n->n_buffers);
  }
  if (!rc) rc = blob_get(&s, n->params, n->n_params * sizeof(float));
  if (!rc) rc = blob_get_u64(&s, &nb);
  if (!rc) rc = blob_get(&s, n->buffers, n->n_buffers * sizeof(float));
  return rc;
}
