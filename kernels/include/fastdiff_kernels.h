/*
 * libfastdiff_kernels: fastdiff's Triton kernels compiled ahead of time (sm_80, sm_90, sm_100),
 * behind a plain C ABI.  See docs/c-abi.md.
 *
 * - One function per op direction.  Each takes device pointers, sizes, strides (in elements),
 *   scalars and a CUDA stream, checks what it can, picks the kernel configuration from the
 *   launch tables it was built with, and launches; it returns a status code, and
 *   fdk_last_error() gives the message of the calling thread's last failure.
 * - The CUDA driver (libcuda.so.1) is loaded at run time: the library loads on a machine
 *   without a GPU and reports FDK_ERROR_NO_DRIVER there.  Launches use the calling thread's
 *   current CUDA context (the runtime API's, or PyTorch's, primary context).
 * - Dry run (fdk_set_dry_run): every call is checked and planned down to, and excluding, the
 *   driver call; nothing runs and no driver is needed.  For host-overhead measurements and tests.
 *
 * Pointers must be 16-byte aligned (what cudaMalloc and PyTorch give); the kernels assume it.
 * A call never launches anything when it returns an error.
 */
#ifndef FASTDIFF_KERNELS_H
#define FASTDIFF_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FDK_API __attribute__((visibility("default")))

struct CUstream_st; /* cuda.h's CUstream is `struct CUstream_st *`; NULL is the default stream */

typedef enum fdk_status {
  FDK_SUCCESS = 0,
  FDK_ERROR_INVALID_ARGUMENT = 1, /* a null pointer, a negative size, a bad stride, ...: nothing launched */
  FDK_ERROR_UNSUPPORTED = 2,      /* no compiled configuration for these arguments or this GPU */
  FDK_ERROR_NO_DRIVER = 3,        /* libcuda.so.1 not found or not initialisable */
  FDK_ERROR_CUDA = 4              /* the driver reported an error (message has its name) */
} fdk_status;

typedef enum fdk_dtype { FDK_FLOAT32 = 0, FDK_FLOAT16 = 1, FDK_BFLOAT16 = 2 } fdk_dtype;

/* Name of a status, e.g. "FDK_ERROR_NO_DRIVER". */
FDK_API const char *fdk_status_name(fdk_status status);
/* Message of the calling thread's last failing call ("" when none). */
FDK_API const char *fdk_last_error(void);
/* Loads and initialises the CUDA driver; FDK_ERROR_NO_DRIVER (with a message) without one. */
FDK_API fdk_status fdk_init(void);
/* Makes device `ordinal`'s primary context (the CUDA runtime's, and PyTorch's) current on the calling
   thread where the thread has no current context, as the runtime does at its first call on a thread.
   A thread that launches before any runtime call needs it: a worker thread (PyTorch's autograd
   engine has some) that so far only took cached allocations, say.  Nothing to do in dry run. */
FDK_API fdk_status fdk_use_device(int ordinal);
/* Hash of the kernel sources the library was built from (fastdiff compares it with its own). */
FDK_API const char *fdk_source_hash(void);

/* ---------------------------------------------------------------------------- dry run */

/* arch 0: off.  arch 80, 90 or 100: plan every call as on that GPU (num_sms multiprocessors), record
   the launches instead of making them; nothing needs the driver.  Process-wide. */
FDK_API void fdk_set_dry_run(int arch, int num_sms);

typedef struct fdk_launch_record {
  const char *case_name; /* the launch table's case, e.g. "q_sample[bf16,n16,draw]" */
  unsigned grid[3];
  int num_args;
  int64_t args[48]; /* integers and pointers as they are; an fp32 argument as its value's bits */
} fdk_launch_record;

/* Copies the launches recorded since the last call (at most max, oldest first) and forgets them;
   returns how many were copied.  Dry run records the last 64 launches. */
FDK_API int fdk_dry_run_take(fdk_launch_record *out, int max);

/* ---------------------------------------------------------------------------- noising */

/* x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε per sample b (t[b] outside [0, num_timesteps) gives NaN).
   x0, noise, x_t, v: (batch, per_sample) in one dense run per sample (contiguous NCHW, or
   channels-last when channels_last = 1, channels × spatial = per_sample elements).
   keys != NULL: ε is drawn in the kernel (Philox keyed by keys[b], NCHW order) and written to
   noise; keys == NULL: noise is read.  v != NULL: also writes v = sqrt(ᾱ)ε − sqrt(1 − ᾱ)x0. */
typedef struct fdk_q_sample_args {
  fdk_dtype dtype;                /* of x0, noise, x_t, v */
  const void *x0;
  const int64_t *t;               /* (batch,) */
  const float *alphas_cumprod;    /* (num_timesteps,) */
  int64_t num_timesteps;
  void *noise;
  const int64_t *keys;            /* (batch,) or NULL */
  void *x_t;
  void *v;                        /* or NULL */
  int64_t batch, channels, spatial;
  int channels_last;
} fdk_q_sample_args;
FDK_API fdk_status fdk_q_sample(const fdk_q_sample_args *args, struct CUstream_st *stream);

/* ---------------------------------------------------------------------------- attention */

/* o = softmax(scale · q kᵀ) v per (batch, head); lse (batch, heads, len_q) fp32 gets the base-2
   log-sum-exp of each score row (the backward reads it).  Layout (B, H, L, D) with any strides
   in elements whose head-dim stride is 1 and the others multiples of 16 bytes; head_dim in
   {32, 40, 64, 80, 96, 128, 160}; len_k >= 1. */
typedef struct fdk_attention_fwd_args {
  fdk_dtype dtype;
  const void *q, *k, *v;
  void *o;
  float *lse;
  int64_t batch, heads, len_q, len_k, head_dim;
  int64_t stride_q[4], stride_k[4], stride_v[4], stride_o[4];
  double scale; /* τ, e.g. 1/sqrt(head_dim) */
} fdk_attention_fwd_args;
FDK_API fdk_status fdk_attention_fwd(const fdk_attention_fwd_args *args, struct CUstream_st *stream);

/* dq, dk, dv from do (the output's gradient), q, k, v, o and lse of the forward.  Scratch, fp32:
   delta, batch·heads·len_q floats, read when len_k is longer than the short path's keys;
   dkdv_partial, fdk_attention_bwd_partials(...) floats, read when that is not 0 (short keys:
   partial dk, dv of each query slice, then summed in a fixed order).  One buffer of the larger
   size may serve as both. */
typedef struct fdk_attention_bwd_args {
  fdk_dtype dtype;
  const void *d_o, *q, *k, *v, *o;
  const float *lse;
  void *dq, *dk, *dv;
  float *delta;
  int64_t batch, heads, len_q, len_k, head_dim;
  int64_t stride_do[4], stride_q[4], stride_k[4], stride_v[4], stride_o[4];
  int64_t stride_dq[4], stride_dk[4], stride_dv[4];
  double scale;
  float *dkdv_partial;
} fdk_attention_bwd_args;
/* The floats of dkdv_partial fdk_attention_bwd needs for these sizes on this device (or the dry run's). */
FDK_API fdk_status fdk_attention_bwd_partials(fdk_dtype dtype, int64_t batch, int64_t heads, int64_t len_q,
                                              int64_t len_k, int64_t head_dim, int64_t *floats);
FDK_API fdk_status fdk_attention_bwd(const fdk_attention_bwd_args *args, struct CUstream_st *stream);

/* ---------------------------------------------------------------------------- diffusion loss */

/* loss = (1/B) Σ_b w_b · mean_i (pred − target)² in fp32 (w_b = 1 without weight): per-block sums,
   then one program adds them in a fixed order (deterministic).  pred, target: (batch, per_sample)
   dense; partial: fdk_diffusion_loss_partials(...) floats of scratch. */
typedef struct fdk_diffusion_loss_args {
  fdk_dtype dtype;
  const void *pred, *target;
  const float *weight;           /* (batch,) or NULL */
  float *loss;                   /* one float */
  float *partial;
  int64_t batch, per_sample;
} fdk_diffusion_loss_args;
FDK_API int64_t fdk_diffusion_loss_partials(int64_t batch, int64_t per_sample);
FDK_API fdk_status fdk_diffusion_loss_fwd(const fdk_diffusion_loss_args *args, struct CUstream_st *stream);

/* d_pred = 2·grad·w_b·(pred − target)/(B·N), in pred's dtype. */
typedef struct fdk_diffusion_loss_bwd_args {
  fdk_dtype dtype;
  const float *grad;             /* one float: the loss's upstream gradient */
  const void *pred, *target;
  const float *weight;           /* (batch,) or NULL */
  void *d_pred;
  int64_t batch, per_sample;
} fdk_diffusion_loss_bwd_args;
FDK_API fdk_status fdk_diffusion_loss_bwd(const fdk_diffusion_loss_bwd_args *args, struct CUstream_st *stream);

/* ---------------------------------------------------------------------------- group_norm_silu */

/* y = SiLU(GroupNorm(x)·(1 + scale) + shift) (silu = 0: without the SiLU).  x, y: (batch,
   channels, spatial) contiguous, or channels-last (channels_last = 1).  weight, bias: (channels,);
   scale, shift: (batch, channels) with row strides; all four optional (NULL) and in params_dtype.
   Outputs for the backward: mean, rstd (batch, groups) and the per-channel coefficients coef_a,
   coef_d (batch, channels), fp32.  partial_mean, partial_m2: batch·channels·split floats of
   scratch each, split from fdk_group_norm_silu_split.  Every buffer 16-byte aligned. */
typedef struct fdk_group_norm_silu_fwd_args {
  fdk_dtype dtype, params_dtype;
  const void *x;
  void *y;
  const void *weight, *bias, *scale, *shift;
  int64_t stride_scale, stride_shift;
  float *mean, *rstd, *coef_a, *coef_d, *partial_mean, *partial_m2;
  int64_t batch, channels, spatial, groups;
  int channels_last, silu;
  double eps;
} fdk_group_norm_silu_fwd_args;
/* How many spatial chunks each channel's reduction is split into on this device (or the dry run's). */
FDK_API fdk_status fdk_group_norm_silu_split(int64_t batch, int64_t channels, int64_t spatial, int channels_last,
                                             int64_t *split);
FDK_API fdk_status fdk_group_norm_silu_fwd(const fdk_group_norm_silu_fwd_args *args, struct CUstream_st *stream);

/* Gradients from dy (laid out like x) and the forward's mean, rstd, coef_a, coef_d.  dx like x;
   dweight, dbias (channels,) fp32, both given when weight or bias is (both are written); dscale,
   dshift (batch, channels) fp32, given exactly when scale / shift are.  Scratch, fp32: sum_dz,
   sum_dzx batch·channels·split each; dx_e, dx_f batch·groups each; term_w, term_b batch·channels
   each (when weight or bias is given). */
typedef struct fdk_group_norm_silu_bwd_args {
  fdk_dtype dtype, params_dtype;
  const void *dy, *x;
  const float *mean, *rstd, *coef_a, *coef_d;
  const void *weight, *bias, *scale;
  int has_shift;
  int64_t stride_scale;
  void *dx;
  float *dweight, *dbias, *dscale, *dshift;
  float *sum_dz, *sum_dzx, *dx_e, *dx_f, *term_w, *term_b;
  int64_t batch, channels, spatial, groups;
  int channels_last, silu;
} fdk_group_norm_silu_bwd_args;
FDK_API fdk_status fdk_group_norm_silu_bwd(const fdk_group_norm_silu_bwd_args *args, struct CUstream_st *stream);

/* ---------------------------------------------------------------------------- sampler_step */

/* One fused denoising step (fastdiff.ops.sampler_step): guidance, prediction conversion, the
   update x_next = a·x + b·x̂0 + c·ε̂ + d·x̂0_prev + e·z, and the inpainting blend.  All (batch,
   channels, spatial) tensors share x's layout.  coeffs: (11,) or (batch, 11) fp32.  stats:
   batch·fdk_sampler_step_chunks(...)·4 floats of scratch when guidance_rescale > 0. */
typedef struct fdk_sampler_step_args {
  fdk_dtype dtype;               /* x, x0_prev, known, mask, x_next, x0_out */
  fdk_dtype out_dtype;           /* model_output, uncond_output */
  const void *x, *model_output, *uncond_output; /* uncond_output NULL: no guidance */
  const float *coeffs;
  int per_sample_coeffs;
  const void *x0_prev;           /* or NULL */
  const int64_t *seeds;          /* (batch,): with add_noise or known */
  const void *known, *mask;      /* inpainting, or NULL; mask (batch, spatial) when mask_per_pixel */
  int mask_per_pixel;
  void *x_next, *x0_out;         /* x0_out NULL: x̂0 not written */
  float *stats;
  int64_t batch, channels, spatial;
  int channels_last, add_noise;
  int64_t step;
  double guidance_scale, guidance_rescale, clip_x0; /* clip_x0 0: no clipping */
} fdk_sampler_step_args;
FDK_API int64_t fdk_sampler_step_chunks(int64_t per_sample);
FDK_API fdk_status fdk_sampler_step(const fdk_sampler_step_args *args, struct CUstream_st *stream);

#ifdef __cplusplus
}
#endif
#endif /* FASTDIFF_KERNELS_H */
