/* The op functions: check the arguments, pick the case from the launch tables by the key the
   Python launcher uses (fastdiff/ops/<op>.py), compute the grid and launch.  The tests compare
   the launches planned here with the Python launcher's over a grid of shapes (dry run). */
#include <stdio.h>

#include "fdk_internal.h"

static const double LOG2E = 1.4426950408889634; /* scores in base 2: exp(x) = 2^(x·log2 e) */

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static int divisible16(int64_t v) { return v % 16 == 0; }
static int elem_size(fdk_dtype d) { return d == FDK_FLOAT32 ? 4 : 2; }

#define CHECK(expr)                  \
  do {                               \
    fdk_status s_ = (expr);          \
    if (s_ != FDK_SUCCESS) return s_; \
  } while (0)

/* The case of `table` for key on this device (or the dry run's arch). */
static fdk_status pick(int table, const int *key, int nkey, int *entry) {
  int arch, sms;
  CHECK(fdk_device(&arch, &sms));
  *entry = fdk_find(table, key, arch);
  if (*entry < 0) {
    char text[96] = "";
    int n = 0;
    for (int i = 0; i < nkey && n < (int)sizeof text; i++) n += snprintf(text + n, sizeof text - n, "%s%d", i ? "," : "", key[i]);
    return fdk_fail(FDK_ERROR_UNSUPPORTED, "no compiled %s case for key (%s) on sm_%d", fdk_tables[table].name, text,
                    arch);
  }
  return FDK_SUCCESS;
}

static int cx(int entry, int which) { return fdk_entries[entry].constexprs[which]; }

/* ---------------------------------------------------------------------------- noising */

fdk_status fdk_q_sample(const fdk_q_sample_args *a, struct CUstream_st *stream) {
  if (!a) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "args must not be NULL");
  CHECK(fdk_check_dtype(a->dtype));
  CHECK(fdk_check_size(a->batch, "batch", 0));
  CHECK(fdk_check_size(a->channels, "channels", 1));
  CHECK(fdk_check_size(a->spatial, "spatial", 1));
  CHECK(fdk_check_size(a->num_timesteps, "num_timesteps", 1));
  int64_t n = a->channels * a->spatial;
  CHECK(fdk_check_size(n, "channels * spatial", 1));
  if (a->batch == 0) return FDK_SUCCESS;
  CHECK(fdk_check_ptr(a->x0, "x0"));
  CHECK(fdk_check_ptr(a->t, "t"));
  CHECK(fdk_check_ptr(a->alphas_cumprod, "alphas_cumprod"));
  CHECK(fdk_check_ptr(a->noise, "noise"));
  CHECK(fdk_check_ptr(a->x_t, "x_t"));
  if (a->keys) CHECK(fdk_check_ptr(a->keys, "keys"));
  if (a->v) CHECK(fdk_check_ptr(a->v, "v"));
  int draw = a->keys != NULL, want_v = a->v != NULL;
  /* the layout only changes where drawn noise goes: given noise is read in memory order */
  int key[5] = {a->dtype, draw, want_v, draw && a->channels_last, divisible16(n)};
  int entry;
  CHECK(pick(FDK_TABLE_q_sample, key, 5, &entry));
  unsigned grid[3] = {(unsigned)cdiv(n, cx(entry, FDK_CX_BLOCK)), (unsigned)a->batch, 1};
  fdk_arg args[11] = {{.p = a->x0}, {.p = a->t}, {.p = a->alphas_cumprod}, {.p = a->noise},
                      {.p = draw ? (const void *)a->keys : (const void *)a->t}, {.p = a->x_t},
                      {.p = want_v ? a->v : a->x_t}, {.l = n}, {.l = a->channels}, {.l = a->spatial},
                      {.l = a->num_timesteps}};
  return fdk_launch(entry, grid, args, 11, stream);
}

/* ---------------------------------------------------------------------------- attention */

/* (B, H, L, D) strides: unit head dim, 16-byte multiples elsewhere (for dims longer than 1),
   and 32-bit token offsets: what the kernels' hints and index math assume. */
static fdk_status check_bhld(const char *name, const void *p, const int64_t st[4], const int64_t shape[4],
                             fdk_dtype dtype) {
  CHECK(fdk_check_ptr(p, name));
  if (st[3] != 1) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "%s must have a unit head-dim stride, got %lld", name,
                                  (long long)st[3]);
  int64_t step = 16 / elem_size(dtype);
  for (int i = 0; i < 3; i++) {
    if (st[i] < 0) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "%s stride %d must be >= 0, got %lld", name, i,
                                   (long long)st[i]);
    if (shape[i] > 1 && st[i] % step)
      return fdk_fail(FDK_ERROR_UNSUPPORTED, "%s stride %d must be a multiple of %lld elements (16 bytes), got %lld",
                      name, i, (long long)step, (long long)st[i]);
    if (st[i] >= INT32_MAX) return fdk_fail(FDK_ERROR_UNSUPPORTED, "%s stride %d must be < 2**31", name, i);
  }
  int64_t row = st[2] > shape[3] ? st[2] : shape[3];
  if (shape[2] * row >= INT32_MAX)
    return fdk_fail(FDK_ERROR_UNSUPPORTED, "%s is too long for 32-bit token offsets", name);
  return FDK_SUCCESS;
}

static fdk_status check_attention_sizes(fdk_dtype dtype, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D) {
  CHECK(fdk_check_dtype(dtype));
  CHECK(fdk_check_size(B, "batch", 0));
  CHECK(fdk_check_size(H, "heads", 0));
  CHECK(fdk_check_size(Lq, "len_q", 0));
  CHECK(fdk_check_size(Lk, "len_k", 1));
  CHECK(fdk_check_size(B * H, "batch * heads", 0));
  if (D != 32 && D != 40 && D != 64 && D != 80 && D != 96 && D != 128 && D != 160)
    return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "head_dim must be one of 32, 40, 64, 80, 96, 128, 160, got %lld",
                    (long long)D);
  return FDK_SUCCESS;
}

#define STRIDES(s) {.l = (s)[0]}, {.l = (s)[1]}, {.l = (s)[2]}

fdk_status fdk_attention_fwd(const fdk_attention_fwd_args *a, struct CUstream_st *stream) {
  if (!a) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "args must not be NULL");
  CHECK(check_attention_sizes(a->dtype, a->batch, a->heads, a->len_q, a->len_k, a->head_dim));
  if (a->batch * a->heads * a->len_q == 0) return FDK_SUCCESS;
  int64_t qs[4] = {a->batch, a->heads, a->len_q, a->head_dim}, ks[4] = {a->batch, a->heads, a->len_k, a->head_dim};
  CHECK(check_bhld("q", a->q, a->stride_q, qs, a->dtype));
  CHECK(check_bhld("k", a->k, a->stride_k, ks, a->dtype));
  CHECK(check_bhld("v", a->v, a->stride_v, ks, a->dtype));
  CHECK(check_bhld("o", a->o, a->stride_o, qs, a->dtype));
  CHECK(fdk_check_ptr(a->lse, "lse"));
  if (!(a->scale > 0)) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "scale must be > 0");
  int arch, sms, entry;
  CHECK(fdk_device(&arch, &sms));
  int key[3] = {arch, a->dtype, (int)a->head_dim};
  CHECK(pick(FDK_TABLE_attention_fwd, key, 3, &entry));
  unsigned grid[3] = {(unsigned)(a->batch * a->heads), (unsigned)cdiv(a->len_q, cx(entry, FDK_CX_BLOCK_M)), 1};
  fdk_arg args[22] = {{.p = a->q}, {.p = a->k}, {.p = a->v}, {.p = a->o}, {.p = a->lse},
                      STRIDES(a->stride_q), STRIDES(a->stride_k), STRIDES(a->stride_v), STRIDES(a->stride_o),
                      {.l = a->heads}, {.l = a->len_q}, {.l = a->len_k}, {.l = a->head_dim},
                      {.f = (float)(a->scale * LOG2E)}};
  return fdk_launch(entry, grid, args, 22, stream);
}

fdk_status fdk_attention_bwd(const fdk_attention_bwd_args *a, struct CUstream_st *stream) {
  if (!a) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "args must not be NULL");
  CHECK(check_attention_sizes(a->dtype, a->batch, a->heads, a->len_q, a->len_k, a->head_dim));
  if (a->batch * a->heads * a->len_q == 0) return FDK_SUCCESS;
  int64_t qs[4] = {a->batch, a->heads, a->len_q, a->head_dim}, ks[4] = {a->batch, a->heads, a->len_k, a->head_dim};
  CHECK(check_bhld("do", a->d_o, a->stride_do, qs, a->dtype));
  CHECK(check_bhld("q", a->q, a->stride_q, qs, a->dtype));
  CHECK(check_bhld("k", a->k, a->stride_k, ks, a->dtype));
  CHECK(check_bhld("v", a->v, a->stride_v, ks, a->dtype));
  CHECK(check_bhld("o", a->o, a->stride_o, qs, a->dtype));
  CHECK(check_bhld("dq", a->dq, a->stride_dq, qs, a->dtype));
  CHECK(check_bhld("dk", a->dk, a->stride_dk, ks, a->dtype));
  CHECK(check_bhld("dv", a->dv, a->stride_dv, ks, a->dtype));
  CHECK(fdk_check_ptr(a->lse, "lse"));
  CHECK(fdk_check_ptr(a->delta, "delta"));
  if (!(a->scale > 0)) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "scale must be > 0");
  int arch, sms;
  CHECK(fdk_device(&arch, &sms));
  /* pick every case before launching anything: a missing one launches nothing */
  int key[5] = {arch, a->dtype, (int)a->head_dim, 1, 1}, pre, dq, kv[2], passes = 1;
  CHECK(pick(FDK_TABLE_attention_bwd_pre, key, 3, &pre));
  CHECK(pick(FDK_TABLE_attention_bwd_dq, key, 3, &dq));
  if ((kv[0] = fdk_find(FDK_TABLE_attention_bwd_dkdv, key, arch)) < 0) { /* head dim 160: dK and dV apart */
    key[4] = 0;
    CHECK(pick(FDK_TABLE_attention_bwd_dkdv, key, 5, &kv[0]));
    key[3] = 0, key[4] = 1;
    CHECK(pick(FDK_TABLE_attention_bwd_dkdv, key, 5, &kv[1]));
    passes = 2;
  }
  unsigned bh = (unsigned)(a->batch * a->heads);
  float scale = (float)a->scale, scale2 = (float)(a->scale * LOG2E);
  unsigned grid_pre[3] = {bh, (unsigned)cdiv(a->len_q, cx(pre, FDK_CX_BLOCK_M)), 1};
  fdk_arg pre_args[12] = {{.p = a->o}, {.p = a->d_o}, {.p = a->delta}, STRIDES(a->stride_o), STRIDES(a->stride_do),
                          {.l = a->heads}, {.l = a->len_q}, {.l = a->head_dim}};
  CHECK(fdk_launch(pre, grid_pre, pre_args, 12, stream));
  for (int i = 0; i < passes; i++) {
    unsigned grid[3] = {bh, (unsigned)cdiv(a->len_k, cx(kv[i], FDK_CX_BLOCK_N)), 1};
    fdk_arg args[32] = {{.p = a->q}, {.p = a->k}, {.p = a->v}, {.p = a->d_o}, {.p = a->lse}, {.p = a->delta},
                        {.p = a->dk}, {.p = a->dv}, STRIDES(a->stride_q), STRIDES(a->stride_k), STRIDES(a->stride_v),
                        STRIDES(a->stride_do), STRIDES(a->stride_dk), STRIDES(a->stride_dv), {.l = a->heads},
                        {.l = a->len_q}, {.l = a->len_k}, {.l = a->head_dim}, {.f = scale}, {.f = scale2}};
    CHECK(fdk_launch(kv[i], grid, args, 32, stream));
  }
  unsigned grid_dq[3] = {bh, (unsigned)cdiv(a->len_q, cx(dq, FDK_CX_BLOCK_M)), 1};
  fdk_arg args[28] = {{.p = a->q}, {.p = a->k}, {.p = a->v}, {.p = a->d_o}, {.p = a->lse}, {.p = a->delta},
                      {.p = a->dq}, STRIDES(a->stride_q), STRIDES(a->stride_k), STRIDES(a->stride_v),
                      STRIDES(a->stride_do), STRIDES(a->stride_dq), {.l = a->heads}, {.l = a->len_q},
                      {.l = a->len_k}, {.l = a->head_dim}, {.f = scale}, {.f = scale2}};
  return fdk_launch(dq, grid_dq, args, 28, stream);
}
