/* libFuzzer harnesses for every parser mocod exposes to files and sockets (tests/fuzz/fuzz_<x>.c).
 * Each defines fuzz_<x>(data, size), the one-input body; built with -DFUZZ_MAIN (make fuzz, clang
 * -fsanitize=fuzzer,address,undefined) it also defines LLVMFuzzerTestOneInput, and the normal test
 * suite (tests/test_fuzz_replay.c) replays the seed corpus and every kept crash through the same
 * function. */
#ifndef MOCO_TESTS_FUZZ_H
#define MOCO_TESTS_FUZZ_H

#include <stddef.h>
#include <stdint.h>

int fuzz_config(const uint8_t *data, size_t size);
int fuzz_ctl(const uint8_t *data, size_t size);
int fuzz_idx(const uint8_t *data, size_t size);
int fuzz_shard(const uint8_t *data, size_t size);
int fuzz_checkpoint(const uint8_t *data, size_t size);
int fuzz_npy(const uint8_t *data, size_t size);

/* The input as a file: a memfd, named /proc/self/fd/N in path (the readers take paths). Returns the
 * fd (close it after) or -1. */
int fuzz_memfile(const uint8_t *data, size_t size, char *path, size_t cap);

#ifdef FUZZ_MAIN
#define FUZZ_ENTRY(fn)                                                 \
  int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);        \
  int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) { return fn(data, size); }
#else
#define FUZZ_ENTRY(fn)
#endif

#endif
