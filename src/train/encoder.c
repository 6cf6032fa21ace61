#include "train/encoder.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/file.h"
#include "data/dataset.h"
#include "data/loader.h"
#include "data/npy.h"
#include "train/eval.h"

#define INPUT_RECORD_VERSION 1

/* ---- the input record ---- */

void encoder_input_save(blob_writer *w, net_shape in, data_dtype input, int norm_len, const float *mean,
                        const float *std) {
  blob_section_begin(w, "NORM");
  blob_put_u32(w, INPUT_RECORD_VERSION);
  blob_put_u32(w, (uint32_t)in.c);
  blob_put_u32(w, (uint32_t)in.h);
  blob_put_u32(w, (uint32_t)in.w);
  blob_put_u32(w, (uint32_t)input);
  blob_put_u32(w, (uint32_t)norm_len);
  blob_put(w, mean, (size_t)norm_len * sizeof(float));
  blob_put(w, std, (size_t)norm_len * sizeof(float));
  blob_section_end(w);
}

int encoder_input_load(blob_reader *r, net_shape *in, data_dtype *input, int *norm_len, float **mean,
                       float **std) {
  blob_reader s;
  uint32_t v[6] = {0};
  *mean = *std = NULL;
  int rc = blob_section(r, "NORM", &s);
  for (int i = 0; !rc && i < 6; i++) rc = blob_get_u32(&s, &v[i]);
  if (rc) return moco_error_wrap(rc, "input record");
  if (v[0] != INPUT_RECORD_VERSION || v[1] < 1 || v[2] < 1 || v[3] < 1 || (v[4] != DATA_U8 && v[4] != DATA_F32) ||
      (v[5] != 0 && v[5] != v[1]) || s.len - s.pos != 2 * (size_t)v[5] * sizeof(float))
    return moco_error(MOCO_EFORMAT, "%s: offset %zu: input record: version %u, shape %ux%ux%u, dtype %u, %u "
                      "mean/std values: not one this build writes", s.name, s.base, v[0], v[1], v[2], v[3], v[4],
                      v[5]);
  *in = (net_shape){(int)v[1], (int)v[2], (int)v[3]};
  *input = (data_dtype)v[4];
  *norm_len = (int)v[5];
  if (!v[5]) return 0;
  *mean = malloc(v[5] * sizeof(float));
  *std = malloc(v[5] * sizeof(float));
  if (!*mean || !*std) {
    free(*mean), free(*std);
    *mean = *std = NULL;
    return moco_error(MOCO_ENOMEM, "input record");
  }
  blob_get(&s, *mean, v[5] * sizeof(float));
  blob_get(&s, *std, v[5] * sizeof(float));
  return 0;
}

/* ---- loading from a checkpoint ---- */

/* The section, or a message that says why an older checkpoint lacks it. */
static int find_section(const blob_reader *body, const char tag[4], int nth, blob_reader *at) {
  int rc = blob_find(body, tag, nth, at);
  if (rc == MOCO_ENOENT && !memcmp(tag, "NORM", 4))
    return moco_error(MOCO_EFORMAT, "%s: no input record (NORM section): checkpoints written before this mocod "
                      "lack it; resume once and checkpoint again", body->name ? body->name : "checkpoint");
  return rc;
}

int encoder_load(encoder *e, const trainer_config *tc, const blob_reader *body, int64_t step,
                 trainer_encoder which, int max_batch) {
  memset(e, 0, sizeof *e);
  e->which = which;
  e->step = step;
  blob_reader at;
  net_shape in;
  int rc = find_section(body, "NORM", 0, &at);
  if (!rc) rc = encoder_input_load(&at, &in, &e->input, &e->norm_len, &e->mean, &e->std);
  if (rc) return rc;
  json_t *spec = trainer_encoder_spec(tc);
  rc = net_build(&e->own, spec, in, max_batch, "model");
  json_decref(spec);
  if (rc) {
    encoder_free(e);
    return rc;
  }
  e->net = &e->own;
  e->net->training = 0;
  e->backbone_len = (int)json_array_size(tc->backbone);
  net_keep_output(e->net, e->backbone_len - 1); /* encoder_embed reads its features */
  if (!(rc = find_section(body, "NETW", which == TRAINER_KEY, &at))) rc = net_load(e->net, &at);
  if (rc) {
    encoder_free(e);
    return moco_error_wrap(rc, "%s encoder", which == TRAINER_KEY ? "key" : "query");
  }
  return 0;
}

void encoder_free(encoder *e) {
  if (e->net == &e->own) net_free(&e->own);
  free(e->mean);
  free(e->std);
  memset(e, 0, sizeof *e);
}

/* ---- safetensors ---- */

typedef struct {
  char name[48];
  const float *data;
  int ndim;
  int64_t shape[4];
  size_t n;
} tensor_ref;

static void add_tensor(tensor_ref *t, int *k, int li, const char *what, const float *data, int ndim,
                       const int64_t *shape) {
  tensor_ref *r = &t[(*k)++];
  snprintf(r->name, sizeof r->name, "layers.%d.%s", li, what);
  r->data = data;
  r->ndim = ndim;
  r->n = 1;
  for (int i = 0; i < ndim; i++) r->n *= (size_t)(r->shape[i] = shape[i]);
}

/* Every parameter and BatchNorm buffer, in layer order, with PyTorch's shapes. */
static int collect_tensors(const net *n, tensor_ref *t) {
  int k = 0;
  for (int i = 0; i < n->n_layers; i++) {
    const layer *L = &n->layers[i];
    const float *w = n->params + L->w_off, *b = n->params + L->b_off;
    int64_t C = L->in_shape.c, O = L->out_features, K = L->kernel;
    if (L->kind == LAYER_LINEAR || L->kind == LAYER_CONV2D) {
      int64_t ws[4] = {O, C, K, K};
      add_tensor(t, &k, i, "weight", w, L->kind == LAYER_LINEAR ? 2 : 4, ws);
      if (L->b_len) add_tensor(t, &k, i, "bias", b, 1, &O);
    } else if (L->kind == LAYER_BATCHNORM) {
      add_tensor(t, &k, i, "weight", w, 1, &C);
      add_tensor(t, &k, i, "bias", b, 1, &C);
      add_tensor(t, &k, i, "running_mean", n->buffers + L->buf_off, 1, &C);
      add_tensor(t, &k, i, "running_var", n->buffers + L->buf_off + C, 1, &C);
    }
  }
  return k;
}

static json_t *shape_json(net_shape s) { return json_pack("[i, i, i]", s.c, s.h, s.w); }

/* The resolved layer list: what a reader needs to rebuild the network without mocod's spec rules. */
static json_t *layers_json(const net *n) {
  json_t *a = json_array();
  for (int i = 0; i < n->n_layers; i++) {
    const layer *L = &n->layers[i];
    json_t *o = json_pack("{s:s}", "type", net_kind_name(L->kind));
    if (L->kind == LAYER_LINEAR || L->kind == LAYER_CONV2D) {
      json_object_set_new(o, "out", json_integer(L->out_features));
      json_object_set_new(o, "bias", json_boolean(L->bias));
    }
    if (L->kind == LAYER_CONV2D || L->kind == LAYER_MAXPOOL) {
      json_object_set_new(o, "kernel", json_integer(L->kernel));
      json_object_set_new(o, "stride", json_integer(L->stride));
      json_object_set_new(o, "pad", json_integer(L->pad));
    }
    if (L->kind == LAYER_BATCHNORM) json_object_set_new(o, "eps", json_real(L->bn_eps));
    json_object_set_new(o, "in_shape", shape_json(L->in_shape));
    json_object_set_new(o, "out_shape", shape_json(L->out_shape));
    json_array_append_new(a, o);
  }
  return a;
}

static json_t *floats_json(const float *x, int n) {
  json_t *a = json_array();
  for (int i = 0; i < n; i++) json_array_append_new(a, json_real(x[i]));
  return a;
}

/* Metadata values are strings (the format's rule): JSON texts where a value has structure. */
static void meta_put(json_t *meta, const char *key, json_t *v) {
  char *s = json_is_string(v) ? strdup(json_string_value(v))
                              : json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(9));
  json_object_set_new(meta, key, json_string(s ? s : ""));
  free(s);
  json_decref(v);
}

static json_t *metadata(const encoder *e) {
  const net *n = e->net;
  json_t *m = json_object();
  char step[32];
  snprintf(step, sizeof step, "%lld", (long long)e->step);
  meta_put(m, "format", json_string("mocod-encoder"));
  meta_put(m, "format_version", json_string("1"));
  meta_put(m, "encoder", json_string(e->which == TRAINER_KEY ? "key" : "query"));
  meta_put(m, "step", json_string(step));
  meta_put(m, "input_shape", shape_json(n->in_shape));
  meta_put(m, "input", json_string(data_dtype_name(e->input)));
  meta_put(m, "mean", floats_json(e->mean, e->norm_len));
  meta_put(m, "std", floats_json(e->std, e->norm_len));
  meta_put(m, "backbone_layers", json_integer(e->backbone_len));
  meta_put(m, "feature_dim", json_integer((json_int_t)net_shape_size(n->layers[e->backbone_len - 1].out_shape)));
  meta_put(m, "embed_dim", json_integer((json_int_t)net_shape_size(n->out_shape)));
  meta_put(m, "layers", layers_json(n));
  return m;
}

int encoder_write_safetensors(const encoder *e, const char *path, int64_t *bytes) {
  const net *n = e->net;
  tensor_ref *t = malloc((size_t)(4 * n->n_layers + 1) * sizeof *t);
  file_part *parts = malloc((size_t)(4 * n->n_layers + 3) * sizeof *parts);
  if (!t || !parts) {
    free(t), free(parts);
    return moco_error(MOCO_ENOMEM, "%s: safetensors of %d layers", path, n->n_layers);
  }
  int nt = collect_tensors(n, t);
  json_t *h = json_object();
  json_object_set_new(h, "__metadata__", metadata(e));
  size_t off = 0;
  for (int i = 0; i < nt; i++) {
    json_t *shape = json_array();
    for (int d = 0; d < t[i].ndim; d++) json_array_append_new(shape, json_integer(t[i].shape[d]));
    size_t len = t[i].n * sizeof(float);
    json_object_set_new(h, t[i].name, json_pack("{s:s, s:o, s:[I, I]}", "dtype", "F32", "shape", shape,
                                                "data_offsets", (json_int_t)off, (json_int_t)(off + len)));
    off += len;
  }
  char *text = json_dumps(h, JSON_COMPACT);
  json_decref(h);
  size_t tl = text ? strlen(text) : 0, padded = (tl + 7) & ~(size_t)7;
  char *head = text ? malloc(8 + padded) : NULL;
  char tmp[4200];
  int rc = 0;
  if (!head) rc = moco_error(MOCO_ENOMEM, "%s: safetensors header", path);
  else if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
    rc = moco_error(MOCO_ERANGE, "%s: path too long", path);
  if (!rc) {
    /* 8-byte alignment of the data: readers may then map the floats in place. */
    for (int b = 0; b < 8; b++) head[b] = (char)((uint64_t)padded >> (8 * b));
    memcpy(head + 8, text, tl);
    memset(head + 8 + tl, ' ', padded - tl);
    parts[0] = (file_part){head, 8 + padded};
    for (int i = 0; i < nt; i++) parts[1 + i] = (file_part){t[i].data, t[i].n * sizeof(float)};
    rc = file_write_atomic(path, tmp, parts, 1 + nt, 0644);
    if (!rc && bytes) *bytes = (int64_t)(8 + padded + off);
  }
  free(text);
  free(head);
  free(t);
  free(parts);
  return rc ? moco_error_wrap(rc, "export-model") : 0;
}

/* ---- embedding a data set ---- */

typedef struct {
  npy_writer x, labels, ids;
  int has_labels;
} embed_out;

static int out_open(embed_out *o, const char *path, int dim, int has_labels) {
  char side[4200];
  uint64_t dims[2] = {0, (uint64_t)dim};
  memset(o, 0, sizeof *o);
  o->has_labels = has_labels;
  int rc = npy_writer_open(&o->x, path, "<f4", 2, dims);
  if (!rc && has_labels && !(rc = eval_export_sibling(path, ".labels.npy", side, sizeof side)))
    rc = npy_writer_open(&o->labels, side, "<i4", 1, dims);
  if (!rc && !(rc = eval_export_sibling(path, ".ids.npy", side, sizeof side)))
    rc = npy_writer_open(&o->ids, side, "<i8", 1, dims);
  return rc;
}

static void out_abort(embed_out *o) {
  npy_writer_abort(&o->x);
  npy_writer_abort(&o->labels);
  npy_writer_abort(&o->ids);
}

static int out_close(embed_out *o) {
  int rc = npy_writer_close(&o->x);
  if (!rc && o->has_labels) rc = npy_writer_close(&o->labels);
  if (!rc) rc = npy_writer_close(&o->ids);
  if (rc) out_abort(o);
  return rc;
}

/* The data's headers are checked against the encoder's input before anything is allocated. */
static int check_data(const encoder *e, const char *data, const char *labels) {
  dataset ds;
  int rc = dataset_open(&ds, "embed", data, labels, 0);
  if (rc) return rc;
  net_shape in = e->net->in_shape;
  if (ds.shape.c != in.c || ds.shape.h != in.h || ds.shape.w != in.w)
    rc = moco_error(MOCO_ESHAPE, "embed: %s holds %dx%dx%d samples, the encoder takes %dx%dx%d", data, ds.shape.c,
                    ds.shape.h, ds.shape.w, in.c, in.h, in.w);
  /* u8 pixels become [0, 1] and float32 stays as stored: the normalisation only fits the kind of data
   * the encoder was trained on. */
  else if (ds.dtype != e->input)
    rc = moco_error(MOCO_ESHAPE, "embed: %s holds %s samples, the encoder was trained on %s", data,
                    data_dtype_name(ds.dtype), data_dtype_name(e->input));
  dataset_close(&ds);
  return rc;
}

static int open_data(const encoder *e, loader *l, const char *data, const char *labels, int chunk, int bad_skip) {
  int rc = check_data(e, data, labels);
  if (rc) return rc;
  /* A scan in stored order: no shuffling, and no views beyond the normalisation (augment stays zero:
   * every probability 0). */
  loader_config c = {.train = data,
                     .train_labels = labels,
                     .batch_size = chunk,
                     .prefetch = 1,
                     .workers = 1,
                     .epochs = 1,
                     .bad_record = bad_skip ? LOADER_BAD_SKIP : LOADER_BAD_STOP,
                     .view_mode = VIEW_AUGMENT,
                     .norm_len = e->norm_len,
                     .mean = e->mean,
                     .std = e->std};
  return loader_open(l, &c);
}

int encoder_embed(encoder *e, const char *data, const char *labels, int embeddings, int chunk, int bad_skip,
                  const char *out, encoder_progress_fn progress, void *ctx, uint64_t *rows, int *dim,
                  uint64_t *skipped) {
  net *n = e->net;
  if (chunk < 1 || chunk > n->max_batch) chunk = n->max_batch;
  loader l;
  int rc = open_data(e, &l, data, labels, chunk, bad_skip);
  if (rc) return rc;
  int out_layer = embeddings ? n->n_layers - 1 : e->backbone_len - 1;
  *dim = (int)net_shape_size(n->layers[out_layer].out_shape);
  *rows = *skipped = 0;
  embed_out o;
  loader_scan s;
  if ((rc = out_open(&o, out, *dim, l.has_labels))) {
    out_abort(&o);
    loader_close(&l);
    return rc;
  }
  if ((rc = loader_scan_open(&s, &l, LOADER_TRAIN, chunk))) goto done;
  n->training = 0;
  loader_batch b;
  while (!(rc = loader_scan_next(&s, &b)) && b.size > 0) {
    if (!net_forward(n, b.view1, b.size)) {
      rc = MOCO_ERANGE;
      break;
    }
    if ((rc = npy_writer_add(&o.x, net_layer_output(n, out_layer), (uint64_t)b.size)) ||
        (o.has_labels && (rc = npy_writer_add(&o.labels, b.labels, (uint64_t)b.size))) ||
        (rc = npy_writer_add(&o.ids, b.ids, (uint64_t)b.size)))
      break;
    *rows += (uint64_t)b.size;
    *skipped = b.skipped;
    if (progress) progress(ctx, *rows + *skipped, l.num_samples);
  }
  loader_scan_close(&s);
done:
  loader_close(&l);
  if (rc) {
    out_abort(&o);
    return moco_error_wrap(rc, "embed");
  }
  return out_close(&o);
}
