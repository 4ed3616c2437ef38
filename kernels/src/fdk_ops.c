/* The op functions: check the arguments, pick the case from the launch tables by the key the
   Python launcher uses (fastdiff/ops/<op>.py), compute the grid and launch.  The tests compare
   the launches planned here with the Python launcher's over a grid of shapes (dry run). */
#include <pthread.h>
#include <stdio.h>

#include "fdk_internal.h"

/* A host out-parameter: any alignment will do (only device buffers must be 16-byte aligned). */
static fdk_status check_out(const void *p, const char *name) {
  return p ? FDK_SUCCESS : fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "%s must not be NULL", name);
}

static const double LOG2E = 1.4426950408889634; /* scores in base 2: exp(x) = 2^(x·log2 e) */

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static int divisible16(int64_t v) { return v % 16 == 0; }
static int elem_size(fdk_dtype d) { return d == FDK_FLOAT32 ? 4 : 2; }

#define CHECK(expr)                  \
  do {                               \
    fdk_status s_ = (expr);          \
    if (s_ != FDK_SUCCESS) return s_; \
  } while (0)

/* The case of `table` for key on arch: the call's device's (fdk_device, read once per call) or the
   dry run's. */
static fdk_status pick(int table, const int *key, int nkey, int arch, int *entry) {
  *entry = fdk_find(table, key, arch);
  if (*entry < 0) {
    char text[96];
    int n = 0;
    text[0] = 0;
    for (int i = 0; i < nkey && n < (int)sizeof text; i++) n += snprintf(text + n, sizeof text - n, "%s%d", i ? "," : "", key[i]);
    return fdk_fail(FDK_ERROR_UNSUPPORTED, "no compiled %s case for key (%s) on sm_%d", fdk_tables[table].name, text,
                    arch);
  }
  return FDK_SUCCESS;
}

static int cx(int entry, int which) { return fdk_entries[entry].constexprs[which]; }

/* The BLOCK of each table's first compiled case (0 where it has none), read from the tables once, at
   the first call that asks. */
static int first_blocks[FDK_NUM_TABLES];
static pthread_once_t first_blocks_once = PTHREAD_ONCE_INIT;

static void read_first_blocks(void) {
  for (int t = 0; t < FDK_NUM_TABLES; t++) {
    const fdk_table *table = &fdk_tables[t];
    int i = 0, n = table->nrows * FDK_NUM_ARCHS;
    while (i < n && table->ids[i] < 0) i++;
    first_blocks[t] = i < n ? cx(table->ids[i], FDK_CX_BLOCK) : 0;
  }
}

/* The BLOCK every case of `table` shares (for every key and arch), or 0 when the library has none of
   them: what sizes a call's scratch and chunks before its case is picked. */
static int shared_block(int table) {
  pthread_once(&first_blocks_once, read_first_blocks);
  return first_blocks[table];
}

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
  int arch, sms, entry;
  CHECK(fdk_device(&arch, &sms));
  CHECK(pick(FDK_TABLE_q_sample, key, 5, arch, &entry));
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

/* A (B, H, L, D) operand: L is len_q, or len_k for k, v and their gradients (by_keys). */
typedef struct { const char *name; const void *p; const int64_t *stride; int by_keys; } attention_operand;

/* The checks the forward and the backward share: the sizes, then, unless batch·heads·len_q = 0 (*empty:
   nothing to launch), each (B, H, L, D) operand in turn, lse and scale. */
static fdk_status check_attention(fdk_dtype dtype, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D,
                                  const attention_operand *operands, int n, const float *lse, double scale,
                                  int *empty) {
  CHECK(check_attention_sizes(dtype, B, H, Lq, Lk, D));
  *empty = B * H * Lq == 0;
  if (*empty) return FDK_SUCCESS;
  int64_t qs[4] = {B, H, Lq, D}, ks[4] = {B, H, Lk, D};
  for (int i = 0; i < n; i++)
    CHECK(check_bhld(operands[i].name, operands[i].p, operands[i].stride, operands[i].by_keys ? ks : qs, dtype));
  CHECK(fdk_check_ptr(lse, "lse"));
  if (!(scale > 0)) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "scale must be > 0");
  return FDK_SUCCESS;
}

#define STRIDES(s) {.l = (s)[0]}, {.l = (s)[1]}, {.l = (s)[2]}

/* As fastdiff/ops/flash_attention.py: SHORT_PROGRAMS_PER_SM, short_programs and the _Tables plans.  A short
   path (every key in one block) applies when its table has a case and len_k <= its BLOCK_N; small-grid
   tiles when batch·heads·⌈len_q / BLOCK_M⌉ < #SMs and the table has them. */
enum { ATTN_SHORT_PROGRAMS_PER_SM = 2 };

static int64_t short_programs(int64_t bh, int64_t q_blocks, int num_sms) {
  int64_t want = cdiv((int64_t)ATTN_SHORT_PROGRAMS_PER_SM * num_sms, bh);
  want = want < q_blocks ? want : q_blocks;
  return want > 1 ? want : 1;
}

/* The short case of `table` for key, or -1 when the call takes the long path. */
static int short_case(int table, const int *key, int arch, int64_t len_k) {
  int entry = fdk_find(table, key, arch);
  return entry >= 0 && len_k <= cx(entry, FDK_CX_BLOCK_N) ? entry : -1;
}

/* The case with small-grid tiles (key[n - 1] = 1) instead of the default one when the grid is small. */
static int small_grid_case(int table, int *key, int n, int arch, int entry, int64_t bh, int64_t len_q, int sms) {
  if (bh * cdiv(len_q, cx(entry, FDK_CX_BLOCK_M)) >= sms) return entry;
  key[n - 1] = 1;
  int small = fdk_find(table, key, arch);
  key[n - 1] = 0;
  return small >= 0 ? small : entry;
}

fdk_status fdk_attention_fwd(const fdk_attention_fwd_args *a, struct CUstream_st *stream) {
  if (!a) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "args must not be NULL");
  attention_operand operands[4] = {{"q", a->q, a->stride_q, 0}, {"k", a->k, a->stride_k, 1},
                                   {"v", a->v, a->stride_v, 1}, {"o", a->o, a->stride_o, 0}};
  int empty, arch, sms, entry;
  CHECK(check_attention(a->dtype, a->batch, a->heads, a->len_q, a->len_k, a->head_dim, operands, 4, a->lse, a->scale,
                        &empty));
  if (empty) return FDK_SUCCESS;
  CHECK(fdk_device(&arch, &sms));
  int key[4] = {arch, a->dtype, (int)a->head_dim, 0};
  int64_t bh = a->batch * a->heads, programs;
  if ((entry = short_case(FDK_TABLE_attention_fwd_short, key, arch, a->len_k)) >= 0) {
    programs = short_programs(bh, cdiv(a->len_q, cx(entry, FDK_CX_BLOCK_M)), sms);
  } else {
    CHECK(pick(FDK_TABLE_attention_fwd, key, 4, arch, &entry));
    entry = small_grid_case(FDK_TABLE_attention_fwd, key, 4, arch, entry, bh, a->len_q, sms);
    programs = cdiv(a->len_q, cx(entry, FDK_CX_BLOCK_M));
  }
  unsigned grid[3] = {(unsigned)bh, (unsigned)programs, 1};
  fdk_arg args[22] = {{.p = a->q}, {.p = a->k}, {.p = a->v}, {.p = a->o}, {.p = a->lse},
                      STRIDES(a->stride_q), STRIDES(a->stride_k), STRIDES(a->stride_v), STRIDES(a->stride_o),
                      {.l = a->heads}, {.l = a->len_q}, {.l = a->len_k}, {.l = a->head_dim},
                      {.f = (float)(a->scale * LOG2E)}};
  return fdk_launch(entry, grid, args, 22, stream);
}

/* The short backward's case on arch (or -1), and in *parts its programs per (batch, head) for sms SMs. */
static int attention_bwd_short(fdk_dtype dtype, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, int arch,
                               int sms, int64_t *parts) {
  int key[3] = {arch, dtype, (int)D};
  int entry = short_case(FDK_TABLE_attention_bwd_short, key, arch, Lk);
  *parts = entry >= 0 ? short_programs(B * H, cdiv(Lq, cx(entry, FDK_CX_BLOCK_M)), sms) : 0;
  return entry;
}

fdk_status fdk_attention_bwd_partials(fdk_dtype dtype, int64_t batch, int64_t heads, int64_t len_q, int64_t len_k,
                                      int64_t head_dim, int64_t *floats) {
  CHECK(check_attention_sizes(dtype, batch, heads, len_q, len_k, head_dim));
  CHECK(check_out(floats, "floats"));
  int arch, sms;
  CHECK(fdk_device(&arch, &sms));
  int64_t parts;
  attention_bwd_short(dtype, batch, heads, len_q, len_k, head_dim, arch, sms, &parts);
  *floats = 2 * parts * batch * heads * len_k * head_dim;
  return FDK_SUCCESS;
}

fdk_status fdk_attention_bwd(const fdk_attention_bwd_args *a, struct CUstream_st *stream) {
  if (!a) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "args must not be NULL");
  attention_operand operands[8] = {{"do", a->d_o, a->stride_do, 0}, {"q", a->q, a->stride_q, 0},
                                   {"k", a->k, a->stride_k, 1},     {"v", a->v, a->stride_v, 1},
                                   {"o", a->o, a->stride_o, 0},     {"dq", a->dq, a->stride_dq, 0},
                                   {"dk", a->dk, a->stride_dk, 1},  {"dv", a->dv, a->stride_dv, 1}};
  int empty, arch, sms;
  CHECK(check_attention(a->dtype, a->batch, a->heads, a->len_q, a->len_k, a->head_dim, operands, 8, a->lse, a->scale,
                        &empty));
  if (empty) return FDK_SUCCESS;
  CHECK(fdk_device(&arch, &sms));
  unsigned bh = (unsigned)(a->batch * a->heads);
  float scale = (float)a->scale, scale2 = (float)(a->scale * LOG2E);
  int64_t parts;
  int red, rkey[1] = {a->dtype};
  int sh = attention_bwd_short(a->dtype, a->batch, a->heads, a->len_q, a->len_k, a->head_dim, arch, sms, &parts);
  if (sh >= 0) { /* one kernel for dq and the dK, dV partials, then their sum */
    CHECK(fdk_check_ptr(a->dkdv_partial, "dkdv_partial"));
    CHECK(pick(FDK_TABLE_attention_bwd_reduce, rkey, 1, arch, &red));
    unsigned grid[3] = {bh, (unsigned)parts, 1};
    fdk_arg args[32] = {{.p = a->q}, {.p = a->k}, {.p = a->v}, {.p = a->o}, {.p = a->d_o}, {.p = a->lse},
                        {.p = a->dq}, {.p = a->dkdv_partial}, STRIDES(a->stride_q), STRIDES(a->stride_k),
                        STRIDES(a->stride_v), STRIDES(a->stride_o), STRIDES(a->stride_do), STRIDES(a->stride_dq),
                        {.l = a->heads}, {.l = a->len_q}, {.l = a->len_k}, {.l = a->head_dim}, {.f = scale},
                        {.f = scale2}};
    CHECK(fdk_launch(sh, grid, args, 32, stream));
    unsigned grid_red[3] = {bh, 2, (unsigned)cdiv(a->len_k * a->head_dim, cx(red, FDK_CX_BLOCK))};
    fdk_arg red_args[14] = {{.p = a->dkdv_partial}, {.p = a->dk}, {.p = a->dv}, STRIDES(a->stride_dk),
                            STRIDES(a->stride_dv), {.l = a->heads}, {.l = a->len_k}, {.l = a->head_dim},
                            {.l = parts}, {.f = scale}};
    return fdk_launch(red, grid_red, red_args, 14, stream);
  }
  CHECK(fdk_check_ptr(a->delta, "delta"));
  /* pick every case before launching anything: a missing one launches nothing */
  int key[5] = {arch, a->dtype, (int)a->head_dim, 1, 1}, pre, dq, kv[2], passes = 1;
  CHECK(pick(FDK_TABLE_attention_bwd_pre, key, 3, arch, &pre));
  if ((kv[0] = fdk_find(FDK_TABLE_attention_bwd_dkdv, key, arch)) < 0) { /* head dim 160: dK and dV apart */
    key[4] = 0;
    CHECK(pick(FDK_TABLE_attention_bwd_dkdv, key, 5, arch, &kv[0]));
    key[3] = 0, key[4] = 1;
    CHECK(pick(FDK_TABLE_attention_bwd_dkdv, key, 5, arch, &kv[1]));
    passes = 2;
  }
  key[3] = 0;
  CHECK(pick(FDK_TABLE_attention_bwd_dq, key, 4, arch, &dq));
  dq = small_grid_case(FDK_TABLE_attention_bwd_dq, key, 4, arch, dq, bh, a->len_q, sms);
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

/* ---------------------------------------------------------------------------- diffusion loss */

static fdk_status check_loss_sizes(fdk_dtype dtype, int64_t batch, int64_t per_sample) {
  CHECK(fdk_check_dtype(dtype));
  CHECK(fdk_check_size(batch, "batch", 1));
  CHECK(fdk_check_size(per_sample, "per_sample", 1));
  return FDK_SUCCESS;
}

int64_t fdk_diffusion_loss_partials(int64_t batch, int64_t per_sample) {
  int block = shared_block(FDK_TABLE_sq_err_partial);
  return block ? batch * cdiv(per_sample, block) : -1;
}

fdk_status fdk_diffusion_loss_fwd(const fdk_diffusion_loss_args *a, struct CUstream_st *stream) {
  if (!a) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "args must not be NULL");
  CHECK(check_loss_sizes(a->dtype, a->batch, a->per_sample));
  CHECK(fdk_check_ptr(a->pred, "pred"));
  CHECK(fdk_check_ptr(a->target, "target"));
  CHECK(fdk_check_ptr(a->loss, "loss"));
  CHECK(fdk_check_ptr(a->partial, "partial"));
  if (a->weight) CHECK(fdk_check_ptr(a->weight, "weight"));
  int key[3] = {a->dtype, a->weight != NULL, divisible16(a->per_sample)}, arch, sms, partial, total;
  CHECK(fdk_device(&arch, &sms));
  CHECK(pick(FDK_TABLE_sq_err_partial, key, 3, arch, &partial));
  CHECK(pick(FDK_TABLE_sum, key, 0, arch, &total));
  int64_t blocks = cdiv(a->per_sample, cx(partial, FDK_CX_BLOCK));
  unsigned grid[3] = {(unsigned)blocks, (unsigned)a->batch, 1}, one[3] = {1, 1, 1};
  fdk_arg args[7] = {{.p = a->pred}, {.p = a->target}, {.p = a->weight ? (const void *)a->weight : a->pred},
                     {.p = a->partial}, {.l = a->per_sample}, {.l = blocks},
                     {.f = (float)(1.0 / (double)(a->batch * a->per_sample))}};
  CHECK(fdk_launch(partial, grid, args, 7, stream));
  fdk_arg sum_args[3] = {{.p = a->partial}, {.p = a->loss}, {.l = a->batch * blocks}};
  return fdk_launch(total, one, sum_args, 3, stream);
}

fdk_status fdk_diffusion_loss_bwd(const fdk_diffusion_loss_bwd_args *a, struct CUstream_st *stream) {
  if (!a) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "args must not be NULL");
  CHECK(check_loss_sizes(a->dtype, a->batch, a->per_sample));
  CHECK(fdk_check_ptr(a->grad, "grad"));
  CHECK(fdk_check_ptr(a->pred, "pred"));
  CHECK(fdk_check_ptr(a->target, "target"));
  CHECK(fdk_check_ptr(a->d_pred, "d_pred"));
  if (a->weight) CHECK(fdk_check_ptr(a->weight, "weight"));
  int key[3] = {a->dtype, a->weight != NULL, divisible16(a->per_sample)}, arch, sms, entry;
  CHECK(fdk_device(&arch, &sms));
  CHECK(pick(FDK_TABLE_sq_err_backward, key, 3, arch, &entry));
  unsigned grid[3] = {(unsigned)cdiv(a->per_sample, cx(entry, FDK_CX_BLOCK)), (unsigned)a->batch, 1};
  fdk_arg args[7] = {{.p = a->grad}, {.p = a->pred}, {.p = a->target},
                     {.p = a->weight ? (const void *)a->weight : a->pred}, {.p = a->d_pred}, {.l = a->per_sample},
                     {.f = (float)(1.0 / (double)(a->batch * a->per_sample))}};
  return fdk_launch(entry, grid, args, 7, stream);
}

/* ---------------------------------------------------------------------------- group_norm_silu */

/* As fastdiff/ops/group_norm.py: _tile_shape, _split and Geometry. */
enum { GN_TILE = 4096, GN_MAX_SPLIT = 64, GN_PROGRAMS_PER_SM = 4 };

typedef struct { int block_c, block_s, c_blocks, split, tiles, divisible; } gn_geometry;

static gn_geometry gn_geometry_of(int64_t B, int64_t C, int64_t S, int channels_last, int num_sms) {
  gn_geometry g;
  if (channels_last) {
    g.block_c = C <= 16 ? 16 : 64;
    g.block_s = C <= 16 ? 128 : GN_TILE / 64;
  } else {
    g.block_c = S < 1024 ? 32 : GN_TILE / 1024;
    g.block_s = S < 1024 ? 64 : 1024;
  }
  g.c_blocks = (int)cdiv(C, g.block_c);
  int64_t n_tiles = cdiv(S, g.block_s), want = cdiv((int64_t)GN_PROGRAMS_PER_SM * num_sms, B * g.c_blocks);
  int64_t split = want < n_tiles ? want : n_tiles;
  split = split < GN_MAX_SPLIT ? split : GN_MAX_SPLIT;
  split = split > 1 ? split : 1;
  g.tiles = (int)cdiv(n_tiles, split);
  g.split = (int)cdiv(n_tiles, g.tiles);
  g.divisible = divisible16(C) && divisible16(S);
  return g;
}

static fdk_status gn_check(fdk_dtype dtype, fdk_dtype params_dtype, int64_t B, int64_t C, int64_t S, int64_t G,
                           int channels_last) {
  CHECK(fdk_check_dtype(dtype));
  CHECK(fdk_check_dtype(params_dtype));
  CHECK(fdk_check_size(B, "batch", 1));
  CHECK(fdk_check_size(C, "channels", 1));
  CHECK(fdk_check_size(S, "spatial", 1));
  CHECK(fdk_check_size(G, "groups", 1));
  CHECK(fdk_check_size(C * S, "channels * spatial", 1));
  if (C % G) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "groups (%lld) must divide channels (%lld)", (long long)G,
                             (long long)C);
  if (channels_last != 0 && channels_last != 1)
    return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "channels_last must be 0 or 1, got %d", channels_last);
  return FDK_SUCCESS;
}

fdk_status fdk_group_norm_silu_split(int64_t batch, int64_t channels, int64_t spatial, int channels_last,
                                     int64_t *split) {
  CHECK(gn_check(FDK_FLOAT32, FDK_FLOAT32, batch, channels, spatial, 1, channels_last));
  CHECK(check_out(split, "split"));
  int arch, sms;
  CHECK(fdk_device(&arch, &sms));
  *split = gn_geometry_of(batch, channels, spatial, channels_last, sms).split;
  return FDK_SUCCESS;
}

static const void *first_present(const void *a, const void *b, const void *c, const void *d, const void *fallback) {
  return a ? a : b ? b : c ? c : d ? d : fallback;
}

static fdk_status check_optional(const void *p, const char *name) { return p ? fdk_check_ptr(p, name) : FDK_SUCCESS; }

fdk_status fdk_group_norm_silu_fwd(const fdk_group_norm_silu_fwd_args *a, struct CUstream_st *stream) {
  if (!a) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "args must not be NULL");
  int64_t B = a->batch, C = a->channels, S = a->spatial, G = a->groups;
  CHECK(gn_check(a->dtype, a->params_dtype, B, C, S, G, a->channels_last));
  CHECK(fdk_check_ptr(a->x, "x"));
  CHECK(fdk_check_ptr(a->y, "y"));
  CHECK(fdk_check_ptr(a->mean, "mean"));
  CHECK(fdk_check_ptr(a->rstd, "rstd"));
  CHECK(fdk_check_ptr(a->coef_a, "coef_a"));
  CHECK(fdk_check_ptr(a->coef_d, "coef_d"));
  CHECK(fdk_check_ptr(a->partial_mean, "partial_mean"));
  CHECK(fdk_check_ptr(a->partial_m2, "partial_m2"));
  CHECK(check_optional(a->weight, "weight"));
  CHECK(check_optional(a->bias, "bias"));
  CHECK(check_optional(a->scale, "scale"));
  CHECK(check_optional(a->shift, "shift"));
  if (!(a->eps >= 0)) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "eps must be >= 0");
  int arch, sms;
  CHECK(fdk_device(&arch, &sms));
  gn_geometry g = gn_geometry_of(B, C, S, a->channels_last, sms);
  int silu = a->silu != 0;
  int stats_key[5] = {a->dtype, a->channels_last, g.block_c, g.block_s, g.divisible};
  int apply_key[6] = {a->dtype, a->channels_last, g.block_c, g.block_s, silu, g.divisible};
  int final_key[5] = {a->params_dtype, a->weight != NULL, a->bias != NULL, a->scale != NULL, a->shift != NULL};
  int stats, finalize, apply;
  CHECK(pick(FDK_TABLE_gn_stats, stats_key, 5, arch, &stats));
  CHECK(pick(FDK_TABLE_gn_finalize, final_key, 5, arch, &finalize));
  CHECK(pick(FDK_TABLE_gn_apply, apply_key, 6, arch, &apply));
  int64_t chunk_s = (int64_t)g.tiles * g.block_s;
  const void *stand_in = first_present(a->weight, a->bias, a->scale, a->shift, a->mean);
  unsigned grid_stats[3] = {(unsigned)g.split, (unsigned)g.c_blocks, (unsigned)B};
  fdk_arg stats_args[8] = {{.p = a->x}, {.p = a->partial_mean}, {.p = a->partial_m2}, {.l = C}, {.l = S},
                           {.l = chunk_s}, {.l = g.tiles}, {.l = g.split}};
  CHECK(fdk_launch(stats, grid_stats, stats_args, 8, stream));
  unsigned grid_final[3] = {(unsigned)(B * G), 1, 1};
  fdk_arg final_args[19] = {{.p = a->partial_mean}, {.p = a->partial_m2}, {.p = a->weight ? a->weight : stand_in},
                            {.p = a->bias ? a->bias : stand_in}, {.p = a->scale ? a->scale : stand_in},
                            {.p = a->shift ? a->shift : stand_in}, {.p = a->mean}, {.p = a->rstd}, {.p = a->coef_a},
                            {.p = a->coef_d}, {.l = C}, {.l = S}, {.l = G}, {.l = C / G}, {.l = g.split},
                            {.l = chunk_s}, {.l = a->scale ? a->stride_scale : 0},
                            {.l = a->shift ? a->stride_shift : 0}, {.f = (float)a->eps}};
  CHECK(fdk_launch(finalize, grid_final, final_args, 19, stream));
  unsigned grid_apply[3] = {(unsigned)cdiv(S, g.block_s), (unsigned)g.c_blocks, (unsigned)B};
  fdk_arg apply_args[9] = {{.p = a->x}, {.p = a->y}, {.p = a->mean}, {.p = a->coef_a}, {.p = a->coef_d},
                           {.l = C}, {.l = S}, {.l = G}, {.l = C / G}};
  return fdk_launch(apply, grid_apply, apply_args, 9, stream);
}

fdk_status fdk_group_norm_silu_bwd(const fdk_group_norm_silu_bwd_args *a, struct CUstream_st *stream) {
  if (!a) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "args must not be NULL");
  int64_t B = a->batch, C = a->channels, S = a->spatial, G = a->groups;
  CHECK(gn_check(a->dtype, a->params_dtype, B, C, S, G, a->channels_last));
  const void *required[] = {a->dy, a->x, a->mean, a->rstd, a->coef_a, a->coef_d, a->dx, a->sum_dz, a->sum_dzx,
                            a->dx_e, a->dx_f};
  const char *names[] = {"dy", "x", "mean", "rstd", "coef_a", "coef_d", "dx", "sum_dz", "sum_dzx", "dx_e", "dx_f"};
  for (int i = 0; i < 11; i++) CHECK(fdk_check_ptr(required[i], names[i]));
  int affine = a->weight || a->bias;
  CHECK(check_optional(a->weight, "weight"));
  CHECK(check_optional(a->bias, "bias"));
  CHECK(check_optional(a->scale, "scale"));
  if (affine) {
    CHECK(fdk_check_ptr(a->dweight, "dweight (weight or bias given)"));
    CHECK(fdk_check_ptr(a->dbias, "dbias (weight or bias given)"));
    CHECK(fdk_check_ptr(a->term_w, "term_w (weight or bias given)"));
    CHECK(fdk_check_ptr(a->term_b, "term_b (weight or bias given)"));
  }
  if (!a->scale != !a->dscale) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "dscale must be given exactly with scale");
  if (!a->has_shift != !a->dshift) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "dshift must be given exactly with has_shift");
  CHECK(check_optional(a->dscale, "dscale"));
  CHECK(check_optional(a->dshift, "dshift"));
  int arch, sms;
  CHECK(fdk_device(&arch, &sms));
  gn_geometry g = gn_geometry_of(B, C, S, a->channels_last, sms);
  int silu = a->silu != 0;
  int tile_key[6] = {a->dtype, a->channels_last, g.block_c, g.block_s, silu, g.divisible};
  int final_key[5] = {a->params_dtype, a->weight != NULL, a->bias != NULL, a->scale != NULL, a->has_shift != 0};
  int reduce, finalize, col_sum = -1, dx;
  CHECK(pick(FDK_TABLE_gn_bwd_reduce, tile_key, 6, arch, &reduce));
  CHECK(pick(FDK_TABLE_gn_bwd_finalize, final_key, 5, arch, &finalize));
  if (affine) CHECK(pick(FDK_TABLE_gn_col_sum, tile_key, 0, arch, &col_sum));
  CHECK(pick(FDK_TABLE_gn_dx, tile_key, 6, arch, &dx));
  int64_t chunk_s = (int64_t)g.tiles * g.block_s;
  unsigned grid_tiles[3] = {(unsigned)g.split, (unsigned)g.c_blocks, (unsigned)B};
  fdk_arg reduce_args[15] = {{.p = a->x}, {.p = a->dy}, {.p = a->mean}, {.p = a->rstd}, {.p = a->coef_a},
                             {.p = a->coef_d}, {.p = a->sum_dz}, {.p = a->sum_dzx}, {.l = C}, {.l = S},
                             {.l = G}, {.l = C / G}, {.l = chunk_s}, {.l = g.tiles}, {.l = g.split}};
  CHECK(fdk_launch(reduce, grid_tiles, reduce_args, 15, stream));
  const void *stand_in = first_present(a->weight, a->bias, a->scale, NULL, a->rstd);
  unsigned grid_final[3] = {(unsigned)(B * G), 1, 1};
  fdk_arg final_args[18] = {{.p = a->sum_dz}, {.p = a->sum_dzx}, {.p = a->weight ? a->weight : stand_in},
                            {.p = a->bias ? a->bias : stand_in}, {.p = a->scale ? a->scale : stand_in},
                            {.p = a->rstd}, {.p = a->dx_e}, {.p = a->dx_f},
                            {.p = a->dscale ? (const void *)a->dscale : a->rstd},
                            {.p = a->dshift ? (const void *)a->dshift : a->rstd},
                            {.p = affine ? (const void *)a->term_w : a->rstd},
                            {.p = affine ? (const void *)a->term_b : a->rstd}, {.l = C}, {.l = S}, {.l = G},
                            {.l = C / G}, {.l = g.split}, {.l = a->scale ? a->stride_scale : 0}};
  CHECK(fdk_launch(finalize, grid_final, final_args, 18, stream));
  if (affine) {
    unsigned grid_sum[3] = {(unsigned)cdiv(C, cx(col_sum, FDK_CX_BLOCK)), 1, 1};
    fdk_arg sum_args[6] = {{.p = a->term_w}, {.p = a->term_b}, {.p = a->dweight}, {.p = a->dbias}, {.l = B},
                           {.l = C}};
    CHECK(fdk_launch(col_sum, grid_sum, sum_args, 6, stream));
  }
  unsigned grid_dx[3] = {(unsigned)cdiv(S, g.block_s), (unsigned)g.c_blocks, (unsigned)B};
  fdk_arg dx_args[12] = {{.p = a->x}, {.p = a->dy}, {.p = a->dx}, {.p = a->mean}, {.p = a->coef_a},
                         {.p = a->coef_d}, {.p = a->dx_e}, {.p = a->dx_f}, {.l = C}, {.l = S},
                         {.l = G}, {.l = C / G}};
  return fdk_launch(dx, grid_dx, dx_args, 12, stream);
}

/* ---------------------------------------------------------------------------- sampler_step */

enum { STEP_MAX_CHUNKS = 64 };

/* As _chunking in fastdiff/ops/fused_step.py: at most 64 chunks, each a multiple of the stats block. */
static int64_t step_chunk(int64_t n, int stats_block) {
  int64_t per = cdiv(n, STEP_MAX_CHUNKS);
  return cdiv(per, stats_block) * stats_block;
}

int64_t fdk_sampler_step_chunks(int64_t per_sample) {
  int block = shared_block(FDK_TABLE_sampler_step_stats);
  return block && per_sample > 0 ? cdiv(per_sample, step_chunk(per_sample, block)) : -1;
}

fdk_status fdk_sampler_step(const fdk_sampler_step_args *a, struct CUstream_st *stream) {
  if (!a) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "args must not be NULL");
  CHECK(fdk_check_dtype(a->dtype));
  CHECK(fdk_check_dtype(a->out_dtype));
  CHECK(fdk_check_size(a->batch, "batch", 1));
  CHECK(fdk_check_size(a->channels, "channels", 1));
  CHECK(fdk_check_size(a->spatial, "spatial", 1));
  int64_t n = a->channels * a->spatial;
  CHECK(fdk_check_size(n, "channels * spatial", 1));
  CHECK(fdk_check_ptr(a->x, "x"));
  CHECK(fdk_check_ptr(a->model_output, "model_output"));
  CHECK(fdk_check_ptr(a->coeffs, "coeffs"));
  CHECK(fdk_check_ptr(a->x_next, "x_next"));
  CHECK(check_optional(a->uncond_output, "uncond_output"));
  CHECK(check_optional(a->x0_prev, "x0_prev"));
  CHECK(check_optional(a->x0_out, "x0_out"));
  int inpaint = a->known != NULL;
  if (inpaint != (a->mask != NULL)) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "known and mask go together");
  CHECK(check_optional(a->known, "known"));
  CHECK(check_optional(a->mask, "mask"));
  if (a->add_noise || inpaint) CHECK(fdk_check_ptr(a->seeds, "seeds (add_noise or inpainting)"));
  int rescale = a->uncond_output && a->guidance_rescale > 0;
  if (rescale) CHECK(fdk_check_ptr(a->stats, "stats (guidance_rescale > 0)"));
  if (a->step < 0) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "step must be >= 0, got %lld", (long long)a->step);
  /* bit i: the i-th option of the kernel, as StepFlags.bits() */
  int flags[9] = {a->uncond_output != NULL, rescale, a->clip_x0 > 0, a->x0_prev != NULL, a->x0_out != NULL,
                  a->add_noise != 0, inpaint, inpaint && a->mask_per_pixel, a->channels_last != 0};
  int bits = 0;
  for (int i = 0; i < 9; i++) bits |= flags[i] << i;
  int step_key[4] = {a->dtype, a->out_dtype, bits, divisible16(n)}, stats_key[2] = {a->out_dtype, divisible16(n)};
  int arch, sms, step, stats = -1;
  CHECK(fdk_device(&arch, &sms));
  CHECK(pick(FDK_TABLE_sampler_step, step_key, 4, arch, &step));
  if (rescale) CHECK(pick(FDK_TABLE_sampler_step_stats, stats_key, 2, arch, &stats));
  int block = shared_block(FDK_TABLE_sampler_step_stats);
  if (!block) return fdk_fail(FDK_ERROR_UNSUPPORTED, "no compiled sampler_step_stats case (its block sizes the chunks)");
  int64_t chunk = step_chunk(n, block), num_chunks = cdiv(n, chunk);
  if (rescale) {
    unsigned grid[3] = {(unsigned)num_chunks, (unsigned)a->batch, 1};
    fdk_arg args[7] = {{.p = a->model_output}, {.p = a->uncond_output}, {.p = a->stats}, {.l = n},
                       {.l = num_chunks}, {.l = chunk}, {.f = (float)a->guidance_scale}};
    CHECK(fdk_launch(stats, grid, args, 7, stream));
  }
  unsigned grid[3] = {(unsigned)cdiv(n, cx(step, FDK_CX_BLOCK)), (unsigned)a->batch, 1};
  fdk_arg args[21] = {{.p = a->x}, {.p = a->model_output},
                      {.p = a->uncond_output ? a->uncond_output : a->model_output},
                      {.p = rescale ? (const void *)a->stats : a->x_next}, {.p = a->coeffs},
                      {.p = a->x0_prev ? a->x0_prev : a->x}, {.p = a->seeds ? (const void *)a->seeds : a->coeffs},
                      {.p = inpaint ? a->known : a->x}, {.p = inpaint ? a->mask : a->x}, {.p = a->x_next},
                      {.p = a->x0_out ? a->x0_out : a->x_next}, {.l = n}, {.l = a->channels}, {.l = a->spatial},
                      {.l = a->per_sample_coeffs ? 11 : 0}, {.l = num_chunks}, {.l = chunk}, {.l = a->step},
                      {.f = (float)a->guidance_scale}, {.f = (float)a->guidance_rescale},
                      {.f = a->clip_x0 > 0 ? (float)a->clip_x0 : 0.0f}};
  return fdk_launch(step, grid, args, 21, stream);
}
