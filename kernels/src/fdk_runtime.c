/* The library's runtime: the CUDA driver loaded at run time, errors, table look-ups, launches
   and the dry run.  The driver API is reached only through dlopen/dlsym, so the library loads
   on a machine without a GPU or CUDA toolkit (cuda.h comes with Triton's wheel). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda.h>

#include "fdk_internal.h"

/* ---------------------------------------------------------------------------- errors */

static __thread char last_error[512];

fdk_status fdk_fail(fdk_status status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, ap);
  va_end(ap);
  return status;
}

const char *fdk_last_error(void) { return last_error; }

const char *fdk_status_name(fdk_status status) {
  switch (status) {
    case FDK_SUCCESS: return "FDK_SUCCESS";
    case FDK_ERROR_INVALID_ARGUMENT: return "FDK_ERROR_INVALID_ARGUMENT";
    case FDK_ERROR_UNSUPPORTED: return "FDK_ERROR_UNSUPPORTED";
    case FDK_ERROR_NO_DRIVER: return "FDK_ERROR_NO_DRIVER";
    case FDK_ERROR_CUDA: return "FDK_ERROR_CUDA";
  }
  return "FDK_UNKNOWN_STATUS";
}

const char *fdk_source_hash(void) { return FDK_SOURCE_HASH; }

fdk_status fdk_check_ptr(const void *p, const char *name) {
  if (p == NULL) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "%s must not be NULL", name);
  if ((uintptr_t)p % 16)
    return fdk_fail(FDK_ERROR_UNSUPPORTED, "%s must be 16-byte aligned (the kernels assume it), got %p", name, p);
  return FDK_SUCCESS;
}

fdk_status fdk_check_size(int64_t v, const char *name, int64_t min) {
  if (v < min) return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "%s must be >= %lld, got %lld", name, (long long)min,
                               (long long)v);
  if (v >= INT32_MAX) return fdk_fail(FDK_ERROR_UNSUPPORTED, "%s must be < 2**31, got %lld", name, (long long)v);
  return FDK_SUCCESS;
}

fdk_status fdk_check_dtype(fdk_dtype dtype) {
  if ((int)dtype < FDK_FLOAT32 || (int)dtype > FDK_BFLOAT16)
    return fdk_fail(FDK_ERROR_INVALID_ARGUMENT, "dtype must be FDK_FLOAT32, FDK_FLOAT16 or FDK_BFLOAT16, got %d",
                    (int)dtype);
  return FDK_SUCCESS;
}

/* ---------------------------------------------------------------------------- the driver */

#define FDK_DRIVER_FUNCTIONS(X)                                                                      \
  X(cuInit) X(cuGetErrorName) X(cuCtxGetCurrent) X(cuCtxGetDevice) X(cuDeviceGetAttribute)           \
  X(cuModuleLoadData) X(cuModuleGetFunction) X(cuFuncSetAttribute) X(cuLaunchKernel) X(cuDeviceGet)    \
  X(cuDevicePrimaryCtxRetain) X(cuCtxSetCurrent)

static struct {
#define FDK_FIELD(name) __typeof__(&name) name;
  FDK_DRIVER_FUNCTIONS(FDK_FIELD)
#undef FDK_FIELD
} cu;
static pthread_once_t driver_once = PTHREAD_ONCE_INIT;
static fdk_status driver_status;
static char driver_error[256];

static void load_driver(void) {
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    driver_status = FDK_ERROR_NO_DRIVER;
    snprintf(driver_error, sizeof driver_error, "no CUDA driver: cannot load libcuda.so.1 (%s)", dlerror());
    return;
  }
#define FDK_LOAD(name)                                                                               \
  if (!(cu.name = (__typeof__(&name))dlsym(lib, #name))) {                                           \
    driver_status = FDK_ERROR_NO_DRIVER;                                                             \
    snprintf(driver_error, sizeof driver_error, "no CUDA driver: libcuda.so.1 lacks " #name);        \
    return;                                                                                          \
  }
  FDK_DRIVER_FUNCTIONS(FDK_LOAD)
#undef FDK_LOAD
  CUresult r = cu.cuInit(0);
  if (r != CUDA_SUCCESS) {
    const char *name = "?";
    cu.cuGetErrorName(r, &name);
    driver_status = FDK_ERROR_NO_DRIVER;
    snprintf(driver_error, sizeof driver_error, "no CUDA driver: cuInit failed with %s", name);
  }
}

fdk_status fdk_init(void) {
  pthread_once(&driver_once, load_driver);
  return driver_status ? fdk_fail(driver_status, "%s", driver_error) : FDK_SUCCESS;
}

static fdk_status cuda_fail(CUresult r, const char *what) {
  const char *name = "?";
  cu.cuGetErrorName(r, &name);
  return fdk_fail(FDK_ERROR_CUDA, "%s failed: %s", what, name);
}

/* ---------------------------------------------------------------------------- dry run */

#define FDK_LOG_SIZE 64
static int dry_arch, dry_sms;
static fdk_launch_record dry_log[FDK_LOG_SIZE];
static int dry_count;
static pthread_mutex_t dry_lock = PTHREAD_MUTEX_INITIALIZER;

void fdk_set_dry_run(int arch, int num_sms) {
  pthread_mutex_lock(&dry_lock);
  dry_arch = arch;
  dry_sms = num_sms > 0 ? num_sms : 132;
  dry_count = 0;
  pthread_mutex_unlock(&dry_lock);
}

int fdk_dry_run_take(fdk_launch_record *out, int max) {
  pthread_mutex_lock(&dry_lock);
  int n = dry_count < FDK_LOG_SIZE ? dry_count : FDK_LOG_SIZE;
  int first = dry_count - n, copied = 0;
  for (int i = 0; i < n && copied < max; i++) out[copied++] = dry_log[(first + i) % FDK_LOG_SIZE];
  dry_count = 0;
  pthread_mutex_unlock(&dry_lock);
  return copied;
}

static void record(int entry, const unsigned grid[3], const fdk_arg *args, int nargs) {
  pthread_mutex_lock(&dry_lock);
  fdk_launch_record *r = &dry_log[dry_count++ % FDK_LOG_SIZE];
  r->case_name = fdk_entries[entry].case_name;
  memcpy(r->grid, grid, sizeof r->grid);
  r->num_args = nargs;
  for (int i = 0; i < nargs && i < 48; i++) {
    char kind = fdk_entries[entry].arg_kinds[i];
    if (kind == 'p') r->args[i] = (int64_t)(uintptr_t)args[i].p;
    else if (kind == 'f') { int32_t bits; memcpy(&bits, &args[i].f, 4); r->args[i] = bits; }
    else r->args[i] = args[i].l;
  }
  pthread_mutex_unlock(&dry_lock);
}

/* ---------------------------------------------------------------------------- devices, tables */

#define FDK_MAX_DEVICES 64

/* The arch of the cubins that run on a device of compute capability major.minor (its launch tables'
   arch), 0 when none does: an sm_80 cubin runs on every 8.x; Triton's sm_90 and sm_100 cubins are
   sm_90a and sm_100a, which run on 9.0 and 10.0 alone (not on 10.3, nor on 12.x).  The same rule as
   fastdiff.ops.launch_tables.library_arch (tests/test_kernels_c.py compares them). */
static int table_arch(int major, int minor) {
  if (major == 8) return 80;
  return minor == 0 && (major == 9 || major == 10) ? 10 * major : 0;
}

/* Each device's compute capability (10 major + minor) and SM count, by ordinal, read from the driver
   at the device's first call: capability << 16 | SMs, 0 until then.  A device's properties never
   change, so threads reading one at the same time store the same value. */
static int device_properties[FDK_MAX_DEVICES];

static fdk_status properties_of(CUdevice dev, int *major, int *minor, int *num_sms) {
  if (dev < 0 || dev >= FDK_MAX_DEVICES)
    return fdk_fail(FDK_ERROR_UNSUPPORTED, "device %d: the library serves devices 0 to %d", (int)dev,
                    FDK_MAX_DEVICES - 1);
  int known = __atomic_load_n(&device_properties[dev], __ATOMIC_RELAXED);
  if (!known) {
    CUresult r = cu.cuDeviceGetAttribute(major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
    if (r != CUDA_SUCCESS) return cuda_fail(r, "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)");
    if ((r = cu.cuDeviceGetAttribute(minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)) != CUDA_SUCCESS)
      return cuda_fail(r, "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)");
    if ((r = cu.cuDeviceGetAttribute(num_sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)) != CUDA_SUCCESS)
      return cuda_fail(r, "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)");
    known = (10 * *major + *minor) << 16 | *num_sms;
    __atomic_store_n(&device_properties[dev], known, __ATOMIC_RELAXED);
  }
  *major = (known >> 16) / 10;
  *minor = (known >> 16) % 10;
  *num_sms = known & 0xffff;
  return FDK_SUCCESS;
}

/* The calling thread's current context (NULL: none), with the driver loaded. */
static fdk_status current_context(CUcontext *ctx) {
  fdk_status s = fdk_init();
  if (s) return s;
  CUresult r = cu.cuCtxGetCurrent(ctx);
  return r == CUDA_SUCCESS ? FDK_SUCCESS : cuda_fail(r, "cuCtxGetCurrent");
}

fdk_status fdk_use_device(int ordinal) {
  if (dry_arch) return FDK_SUCCESS;
  CUcontext ctx;
  CUdevice dev;
  CUresult r;
  fdk_status s = current_context(&ctx);
  if (s || ctx) return s;
  if ((r = cu.cuDeviceGet(&dev, ordinal)) != CUDA_SUCCESS) return cuda_fail(r, "cuDeviceGet");
  if ((r = cu.cuDevicePrimaryCtxRetain(&ctx, dev)) != CUDA_SUCCESS) return cuda_fail(r, "cuDevicePrimaryCtxRetain");
  if ((r = cu.cuCtxSetCurrent(ctx)) != CUDA_SUCCESS) return cuda_fail(r, "cuCtxSetCurrent");
  return FDK_SUCCESS;
}

fdk_status fdk_device(int *arch, int *num_sms) {
  if (dry_arch) {
    *arch = dry_arch;
    *num_sms = dry_sms;
    return FDK_SUCCESS;
  }
  /* the thread's current device, read on every call: the properties are cached, not which device */
  CUcontext ctx;
  CUdevice dev;
  CUresult r;
  fdk_status s = current_context(&ctx);
  if (s) return s;
  if (!ctx) return fdk_fail(FDK_ERROR_CUDA, "no current CUDA context on this thread (call fdk_use_device or cudaSetDevice first)");
  if ((r = cu.cuCtxGetDevice(&dev)) != CUDA_SUCCESS) return cuda_fail(r, "cuCtxGetDevice");
  int major, minor;
  if ((s = properties_of(dev, &major, &minor, num_sms))) return s;
  *arch = table_arch(major, minor);
  if (!*arch) {
    char built[64];
    int n = 0;
    built[0] = 0;
    for (int a = 0; a < FDK_NUM_ARCHS && n < (int)sizeof built; a++) /* sm_90a, sm_100a: arch-specific cubins */
      n += snprintf(built + n, sizeof built - n, "%ssm_%d%s", a ? ", " : "", fdk_archs[a], fdk_archs[a] >= 90 ? "a" : "");
    return fdk_fail(FDK_ERROR_UNSUPPORTED, "no kernels for compute capability %d.%d (the library has %s)", major, minor,
                    built);
  }
  return FDK_SUCCESS;
}

static int same_key(const int *row, const int *key, int n) {
  for (int i = 0; i < n; i++)
    if (row[i] != key[i]) return 0;
  return 1;
}

int fdk_find(int table, const int *key, int arch) {
  /* The row each table matched last on this thread: a model calls an op with the same key over and
     over, and this look-up is on every launch's host path. */
  static __thread int last_row[FDK_NUM_TABLES];
  int a = 0;
  while (a < FDK_NUM_ARCHS && fdk_archs[a] != arch) a++;
  if (a == FDK_NUM_ARCHS) return -1;
  const fdk_table *t = &fdk_tables[table];
  int row = last_row[table];
  if (row < t->nrows && same_key(t->keys + row * t->nkey, key, t->nkey)) return t->ids[row * FDK_NUM_ARCHS + a];
  for (row = 0; row < t->nrows; row++) {
    if (same_key(t->keys + row * t->nkey, key, t->nkey)) {
      last_row[table] = row;
      return t->ids[row * FDK_NUM_ARCHS + a];
    }
  }
  return -1;
}

/* ---------------------------------------------------------------------------- launching */

/* Loaded functions per (context, entry): the context is the device's primary one in practice. */
typedef struct { CUcontext ctx; CUfunction *functions; } loaded_context;
static loaded_context loaded[FDK_MAX_DEVICES];
static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;

static fdk_status function_of(int entry, CUfunction *out) {
  CUcontext ctx;
  CUresult r = cu.cuCtxGetCurrent(&ctx);
  if (r != CUDA_SUCCESS) return cuda_fail(r, "cuCtxGetCurrent");
  pthread_mutex_lock(&load_lock);
  fdk_status status = FDK_SUCCESS;
  int slot = 0;
  while (slot < FDK_MAX_DEVICES && loaded[slot].ctx && loaded[slot].ctx != ctx) slot++;
  if (slot == FDK_MAX_DEVICES) {
    status = fdk_fail(FDK_ERROR_UNSUPPORTED, "more than %d CUDA contexts", FDK_MAX_DEVICES);
    goto done;
  }
  if (!loaded[slot].ctx) {
    loaded[slot].functions = calloc(fdk_num_entries, sizeof(CUfunction));
    if (!loaded[slot].functions) { status = fdk_fail(FDK_ERROR_CUDA, "out of host memory"); goto done; }
    loaded[slot].ctx = ctx;
  }
  CUfunction *fn = &loaded[slot].functions[entry];
  if (!*fn) {
    const fdk_entry *e = &fdk_entries[entry];
    CUmodule module;
    if ((r = cu.cuModuleLoadData(&module, e->cubin)) != CUDA_SUCCESS) { status = cuda_fail(r, "cuModuleLoadData"); goto done; }
    if ((r = cu.cuModuleGetFunction(fn, module, e->kernel)) != CUDA_SUCCESS) {
      status = cuda_fail(r, "cuModuleGetFunction");
      goto done;
    }
    if (e->shared > 48 * 1024 &&
        (r = cu.cuFuncSetAttribute(*fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, e->shared)) != CUDA_SUCCESS) {
      *fn = NULL;
      status = cuda_fail(r, "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)");
      goto done;
    }
  }
  *out = *fn;
done:
  pthread_mutex_unlock(&load_lock);
  return status;
}

fdk_status fdk_launch(int entry, const unsigned grid[3], const fdk_arg *args, int nargs, struct CUstream_st *stream) {
  const fdk_entry *e = &fdk_entries[entry];
  if ((int)strlen(e->arg_kinds) != nargs)
    return fdk_fail(FDK_ERROR_UNSUPPORTED, "%s takes %d arguments, the library passed %d (stale build?)",
                    e->case_name, (int)strlen(e->arg_kinds), nargs);
  for (int i = 0; i < nargs; i++) {
    if (e->arg_kinds[i] == 'i' && (args[i].l < INT32_MIN || args[i].l > INT32_MAX))
      return fdk_fail(FDK_ERROR_UNSUPPORTED, "%s: argument %d = %lld does not fit 32 bits", e->case_name, i,
                      (long long)args[i].l);
  }
  if ((uint64_t)grid[0] * grid[1] * grid[2] == 0) return FDK_SUCCESS;
  if (grid[1] > 65535 || grid[2] > 65535)
    return fdk_fail(FDK_ERROR_UNSUPPORTED, "%s: grid (%u, %u, %u) exceeds 65535 in y or z", e->case_name, grid[0],
                    grid[1], grid[2]);
  if (dry_arch) {
    record(entry, grid, args, nargs);
    return FDK_SUCCESS;
  }
  CUfunction fn;
  fdk_status s = function_of(entry, &fn);
  if (s) return s;
  void *params[64];
  int32_t ints[64];
  void *scratch = NULL;
  for (int i = 0; i < nargs; i++) {
    switch (e->arg_kinds[i]) {
      case 'i': ints[i] = (int32_t)args[i].l; params[i] = &ints[i]; break;
      case 'l': params[i] = (void *)&args[i].l; break;
      case 'f': params[i] = (void *)&args[i].f; break;
      default: params[i] = (void *)&args[i].p; break;
    }
  }
  for (int i = 0; i < e->extra_pointers; i++) params[nargs + i] = &scratch;
  CUresult r = cu.cuLaunchKernel(fn, grid[0], grid[1], grid[2], 32 * e->num_warps, 1, 1, e->shared, (CUstream)stream,
                                 params, NULL);
  return r == CUDA_SUCCESS ? FDK_SUCCESS : cuda_fail(r, e->case_name);
}
