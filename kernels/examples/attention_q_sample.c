/* libfastdiff_kernels from C: q_sample and attention on a GPU, checked against the CPU.
 *
 *   ./fastdiff_example        exit 0: both match; 1: a mismatch or a CUDA error;
 *                             2: no CUDA driver or GPU here (the message says which)
 *
 * Device memory comes from the driver API, loaded at run time like the library does, so the
 * example builds without a CUDA toolkit (cuda.h from Triton's wheel).
 */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <cuda.h>

#include "fastdiff_kernels.h"

static struct {
  CUresult (*DeviceGet)(CUdevice *, int);
  CUresult (*DevicePrimaryCtxRetain)(CUcontext *, CUdevice);
  CUresult (*CtxSetCurrent)(CUcontext);
  CUresult (*MemAlloc)(CUdeviceptr *, size_t);
  CUresult (*MemFree)(CUdeviceptr);
  CUresult (*MemcpyHtoD)(CUdeviceptr, const void *, size_t);
  CUresult (*MemcpyDtoH)(void *, CUdeviceptr, size_t);
  CUresult (*CtxSynchronize)(void);
} cu;

static int load_driver(void) {
  void *lib = dlopen("libcuda.so.1", RTLD_NOW);
  if (!lib) return 0;
  *(void **)&cu.DeviceGet = dlsym(lib, "cuDeviceGet");
  *(void **)&cu.DevicePrimaryCtxRetain = dlsym(lib, "cuDevicePrimaryCtxRetain");
  *(void **)&cu.CtxSetCurrent = dlsym(lib, "cuCtxSetCurrent");
  *(void **)&cu.MemAlloc = dlsym(lib, "cuMemAlloc_v2");
  *(void **)&cu.MemFree = dlsym(lib, "cuMemFree_v2");
  *(void **)&cu.MemcpyHtoD = dlsym(lib, "cuMemcpyHtoD_v2");
  *(void **)&cu.MemcpyDtoH = dlsym(lib, "cuMemcpyDtoH_v2");
  *(void **)&cu.CtxSynchronize = dlsym(lib, "cuCtxSynchronize");
  return cu.MemcpyDtoH && cu.CtxSynchronize;
}

static void *to_device(const void *host, size_t bytes) {
  CUdeviceptr p = 0;
  if (cu.MemAlloc(&p, bytes) || (host && cu.MemcpyHtoD(p, host, bytes))) {
    fprintf(stderr, "device allocation or copy failed\n");
    exit(1);
  }
  return (void *)(uintptr_t)p;
}

static void to_host(void *host, const void *device, size_t bytes) {
  if (cu.MemcpyDtoH(host, (CUdeviceptr)(uintptr_t)device, bytes)) {
    fprintf(stderr, "copy to host failed\n");
    exit(1);
  }
}

static float uniform(void) { return (float)rand() / RAND_MAX * 2.0f - 1.0f; }

static int check(fdk_status status, const char *what) {
  if (status == FDK_SUCCESS) return 1;
  fprintf(stderr, "%s: %s: %s\n", what, fdk_status_name(status), fdk_last_error());
  return 0;
}

/* x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, noise given, fp32 (B, N) */
static int run_q_sample(void) {
  enum { B = 3, C = 4, S = 37, N = C * S, T = 50 };
  static float x0[B * N], noise[B * N], xt[B * N], acp[T];
  int64_t t[B] = {0, 17, T - 1};
  for (int i = 0; i < B * N; i++) x0[i] = uniform(), noise[i] = uniform();
  for (int i = 0; i < T; i++) acp[i] = 1.0f - (i + 1) / (float)(T + 1);
  fdk_q_sample_args a = {.dtype = FDK_FLOAT32, .x0 = to_device(x0, sizeof x0), .t = to_device(t, sizeof t),
                         .alphas_cumprod = to_device(acp, sizeof acp), .num_timesteps = T,
                         .noise = to_device(noise, sizeof noise), .keys = NULL, .x_t = to_device(NULL, sizeof xt),
                         .v = NULL, .batch = B, .channels = C, .spatial = S, .channels_last = 0};
  if (!check(fdk_q_sample(&a, NULL), "fdk_q_sample") || cu.CtxSynchronize()) return 0;
  to_host(xt, a.x_t, sizeof xt);
  double worst = 0;
  for (int b = 0; b < B; b++)
    for (int i = 0; i < N; i++) {
      double abar = acp[t[b]], want = sqrt(abar) * x0[b * N + i] + sqrt(1 - abar) * noise[b * N + i];
      worst = fmax(worst, fabs(xt[b * N + i] - want));
    }
  printf("q_sample   (3, 4, 37) fp32: max |error| %.2e\n", worst);
  return worst < 1e-5;
}

/* o = softmax(τ q kᵀ) v, fp32 (B, H, L, D) contiguous, Lq ≠ Lk */
static int run_attention(void) {
  enum { B = 2, H = 3, LQ = 67, LK = 45, D = 64 };
  static float q[B * H * LQ * D], k[B * H * LK * D], v[B * H * LK * D], o[B * H * LQ * D];
  for (int i = 0; i < B * H * LQ * D; i++) q[i] = uniform();
  for (int i = 0; i < B * H * LK * D; i++) k[i] = uniform(), v[i] = uniform();
  fdk_attention_fwd_args a = {
      .dtype = FDK_FLOAT32, .q = to_device(q, sizeof q), .k = to_device(k, sizeof k), .v = to_device(v, sizeof v),
      .o = to_device(NULL, sizeof o), .lse = to_device(NULL, sizeof(float) * B * H * LQ), .batch = B, .heads = H,
      .len_q = LQ, .len_k = LK, .head_dim = D, .stride_q = {H * LQ * D, LQ * D, D, 1},
      .stride_k = {H * LK * D, LK * D, D, 1}, .stride_v = {H * LK * D, LK * D, D, 1},
      .stride_o = {H * LQ * D, LQ * D, D, 1}, .scale = 1.0 / sqrt(D)};
  if (!check(fdk_attention_fwd(&a, NULL), "fdk_attention_fwd") || cu.CtxSynchronize()) return 0;
  to_host(o, a.o, sizeof o);
  double worst = 0, s[LK];
  for (int bh = 0; bh < B * H; bh++)
    for (int i = 0; i < LQ; i++) {
      const float *qi = q + (bh * LQ + i) * D;
      double m = -INFINITY, l = 0;
      for (int j = 0; j < LK; j++) {
        s[j] = 0;
        for (int d = 0; d < D; d++) s[j] += qi[d] * (double)k[(bh * LK + j) * D + d];
        s[j] *= a.scale;
        m = fmax(m, s[j]);
      }
      for (int j = 0; j < LK; j++) l += exp(s[j] - m);
      for (int d = 0; d < D; d++) {
        double want = 0;
        for (int j = 0; j < LK; j++) want += exp(s[j] - m) / l * v[(bh * LK + j) * D + d];
        worst = fmax(worst, fabs(o[(bh * LQ + i) * D + d] - want));
      }
    }
  printf("attention  (2, 3, 67/45, 64) fp32: max |error| %.2e\n", worst);
  return worst < 1e-4;
}

int main(void) {
  fdk_status status = fdk_init();
  if (status != FDK_SUCCESS) {
    printf("%s: %s\n", fdk_status_name(status), fdk_last_error());
    return 2;
  }
  CUdevice dev;
  CUcontext ctx;
  if (!load_driver() || cu.DeviceGet(&dev, 0) || cu.DevicePrimaryCtxRetain(&ctx, dev) || cu.CtxSetCurrent(ctx)) {
    printf("no usable CUDA device\n");
    return 2;
  }
  int ok = run_q_sample();
  ok = run_attention() && ok;
  printf(ok ? "ok: both match the CPU\n" : "FAILED\n");
  return ok ? 0 : 1;
}
