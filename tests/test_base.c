/* The base helpers: error messages, random streams, blobs, matrix products. */
#include <check.h>
#include <math.h>
#include <string.h>

#include "core/blob.h"
#include "core/err.h"
#include "core/rng.h"
#include "core/tensor.h"

START_TEST(error_message_carries_context) {
  int rc = moco_error(MOCO_EFORMAT, "%s: offset %d: bad magic", "x.idx", 4);
  ck_assert_int_eq(rc, MOCO_EFORMAT);
  ck_assert_str_eq(moco_strerror(rc), "EFORMAT");
  moco_error_wrap(rc, "loading %s", "train");
  ck_assert_str_eq(moco_errmsg(), "loading train: x.idx: offset 4: bad magic");
}
END_TEST

START_TEST(rng_streams_are_reproducible_and_independent) {
  rng_t a, b, c;
  rng_init(&a, 42, RNG_STREAM_INIT);
  rng_init(&b, 42, RNG_STREAM_INIT);
  rng_init(&c, 42, RNG_STREAM_SHUFFLE);
  int same_ab = 1, same_ac = 0;
  for (int i = 0; i < 100; i++) {
    uint32_t x = rng_u32(&a), y = rng_u32(&b), z = rng_u32(&c);
    same_ab &= x == y;
    same_ac += x == z;
  }
  ck_assert(same_ab);
  ck_assert_int_lt(same_ac, 3);
}
END_TEST

START_TEST(rng_distributions_have_expected_moments) {
  rng_t r;
  rng_init(&r, 7, 9);
  double su = 0, sn = 0, sn2 = 0;
  int counts[5] = {0};
  const int N = 200000;
  for (int i = 0; i < N; i++) {
    float u = rng_uniform(&r);
    ck_assert(u >= 0.0f && u < 1.0f);
    su += u;
    float z = rng_normal(&r);
    sn += z;
    sn2 += z * z;
    counts[rng_below(&r, 5)]++;
  }
  ck_assert(fabs(su / N - 0.5) < 0.01);
  ck_assert(fabs(sn / N) < 0.01);
  ck_assert(fabs(sn2 / N - 1.0) < 0.02);
  for (int k = 0; k < 5; k++) ck_assert(fabs(counts[k] / (double)N - 0.2) < 0.01);
}
END_TEST

START_TEST(blob_sections_round_trip_and_detect_corruption) {
  blob_writer w;
  blob_writer_init(&w);
  blob_section_begin(&w, "TEST");
  blob_put_u32(&w, 7);
  blob_put_str(&w, "hello");
  blob_put_f32(&w, 1.5f);
  blob_section_end(&w);
  ck_assert_int_eq(w.err, 0);

  blob_reader r, s;
  uint32_t v;
  float f;
  char str[16];
  blob_reader_init(&r, w.data, w.len, "t.bin");
  ck_assert_int_eq(blob_section(&r, "TEST", &s), 0);
  ck_assert_int_eq(blob_get_u32(&s, &v), 0);
  ck_assert_uint_eq(v, 7);
  ck_assert_int_eq(blob_get_str(&s, str, sizeof str), 0);
  ck_assert_str_eq(str, "hello");
  ck_assert_int_eq(blob_get_f32(&s, &f), 0);
  ck_assert(f == 1.5f);
  ck_assert_int_eq(blob_get_u32(&s, &v), MOCO_EEOF);

  blob_reader_init(&r, w.data, w.len, "t.bin");
  ck_assert_int_eq(blob_section(&r, "NOPE", &s), MOCO_EFORMAT);
  w.data[14] ^= 1;
  blob_reader_init(&r, w.data, w.len, "t.bin");
  ck_assert_int_eq(blob_section(&r, "TEST", &s), MOCO_ECHECKSUM);
  ck_assert_ptr_nonnull(strstr(moco_errmsg(), "t.bin: offset 0"));
  blob_reader_init(&r, w.data, w.len - 3, "t.bin");
  ck_assert_int_eq(blob_section(&r, "TEST", &s), MOCO_EEOF);
  blob_writer_free(&w);
}
END_TEST

START_TEST(mat_mul_matches_naive_for_every_transpose) {
  enum { M = 5, N = 7, K = 3 };
  float A[M * K], At[K * M], B[K * N], Bt[N * K], C[M * N], ref[M * N];
  rng_t r;
  rng_init(&r, 1, 1);
  for (int i = 0; i < M; i++)
    for (int k = 0; k < K; k++) At[k * M + i] = A[i * K + k] = rng_normal(&r);
  for (int k = 0; k < K; k++)
    for (int j = 0; j < N; j++) Bt[j * K + k] = B[k * N + j] = rng_normal(&r);
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      float s = 0;
      for (int k = 0; k < K; k++) s += A[i * K + k] * B[k * N + j];
      ref[i * N + j] = s;
    }
  const float *as[2] = {A, At}, *bs[2] = {B, Bt};
  for (int ta = 0; ta < 2; ta++)
    for (int tb = 0; tb < 2; tb++) {
      mat_mul(C, as[ta], bs[tb], M, N, K, ta, tb, 1.0f, 0.0f);
      for (int i = 0; i < M * N; i++) ck_assert(fabsf(C[i] - ref[i]) < 1e-5f);
    }
  float x[K] = {1, 2, 3}, y[M];
  mat_vec(y, A, x, M, K, 0, 1.0f, 0.0f);
  for (int i = 0; i < M; i++)
    ck_assert(fabsf(y[i] - (A[i * K] + 2 * A[i * K + 1] + 3 * A[i * K + 2])) < 1e-5f);
  float z[M] = {1, 0, 0, 0, 0}, w[K];
  mat_vec(w, At, z, K, M, 0, 1.0f, 0.0f);
  for (int k = 0; k < K; k++) ck_assert(fabsf(w[k] - A[k]) < 1e-6f);
}
END_TEST

Suite *base_suite(void) {
  Suite *s = suite_create("base");
  TCase *tc = tcase_create("base");
  tcase_add_test(tc, error_message_carries_context);
  tcase_add_test(tc, rng_streams_are_reproducible_and_independent);
  tcase_add_test(tc, rng_distributions_have_expected_moments);
  tcase_add_test(tc, blob_sections_round_trip_and_detect_corruption);
  tcase_add_test(tc, mat_mul_matches_naive_for_every_transpose);
  suite_add_tcase(s, tc);
  return s;
}
