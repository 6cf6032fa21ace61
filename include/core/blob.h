/* Binary blobs for everything mocod saves (network weights, optimizer state, the queue, checkpoints).
 * A blob is a sequence of sections; a section is
 *     tag (4 bytes) | payload length (u64 LE) | payload | crc32 of the payload (u32 LE)
 * so a reader finds corruption at the section that holds it and says at which offset. Little-endian,
 * which is what every machine mocod targets is; multi-byte fields are written with memcpy. */
#ifndef MOCO_CORE_BLOB_H
#define MOCO_CORE_BLOB_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
  uint8_t *data;
  size_t len, cap;
  size_t section_start; /* offset of the open section's length field, 0 when none is open */
  int err;              /* sticky: the first failure (MOCO_ENOMEM); checked once at the end */
} blob_writer;

void blob_writer_init(blob_writer *w);
void blob_writer_free(blob_writer *w);
void blob_put(blob_writer *w, const void *p, size_t n);
void blob_put_u32(blob_writer *w, uint32_t v);
void blob_put_u64(blob_writer *w, uint64_t v);
void blob_put_f32(blob_writer *w, float v);
void blob_put_str(blob_writer *w, const char *s); /* u32 length + bytes */
/* Sections do not nest. tag is 4 characters, e.g. "NETP". */
void blob_section_begin(blob_writer *w, const char tag[4]);
void blob_section_end(blob_writer *w);

typedef struct {
  const uint8_t *data;
  size_t len, pos;
  size_t base;      /* offset of data[0] within the whole blob, for messages */
  const char *name; /* what is being read (file name), for messages */
} blob_reader;

void blob_reader_init(blob_reader *r, const void *data, size_t len, const char *name);
/* Each returns 0 or MOCO_EEOF with "name: offset N: need K bytes, M left". */
int blob_get(blob_reader *r, void *p, size_t n);
int blob_get_u32(blob_reader *r, uint32_t *v);
int blob_get_u64(blob_reader *r, uint64_t *v);
int blob_get_f32(blob_reader *r, float *v);
/* Copies a string into buf (NUL-terminated); MOCO_EFORMAT when it does not fit. */
int blob_get_str(blob_reader *r, char *buf, size_t cap);
/* Reads the next section, which must carry `tag`, verifies its checksum and points `sub` at its
 * payload. MOCO_EFORMAT on a wrong tag, MOCO_EEOF on truncation, MOCO_ECHECKSUM on corruption. */
int blob_section(blob_reader *r, const char tag[4], blob_reader *sub);
/* Peeks at the next section's tag without consuming it; 0 when at the end. */
int blob_peek_tag(const blob_reader *r, char tag[4]);

/* Positions *at at the nth (from 0) section tagged `tag` after r's position, passing over (and
 * checksumming) the others; r does not move. MOCO_ENOENT when there is none. */
int blob_find(const blob_reader *r, const char tag[4], int nth, blob_reader *at);

uint32_t blob_crc32(const void *p, size_t n);

/* A stored checksum against the computed one. Fuzzing builds (tests/fuzz, OSS-Fuzz's macro) accept
 * any, so that mutated inputs reach the parsers behind the checksums instead of stopping at them. */
static inline int blob_crc_mismatch(uint32_t stored, uint32_t computed) {
#ifdef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
  (void)stored;
  (void)computed;
  return 0;
#else
  return stored != computed;
#endif
}

#endif
