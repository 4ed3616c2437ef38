/* Internal pieces shared by the runtime (fdk_runtime.c), the op functions (fdk_ops.c) and the
   tables kernels/build.py generates (fdk_tables.c). */
#pragma once
#include "fastdiff_kernels.h"
#include "fdk_tables.h"

/* One compiled case for one arch, as kernels/build.py read it from Triton's output. */
typedef struct fdk_entry {
  const char *case_name;
  const char *kernel;          /* the cubin's function name */
  int arch;
  const unsigned char *cubin;
  size_t cubin_size;
  int shared;                  /* dynamic shared memory, bytes */
  int num_warps;
  const char *arg_kinds;       /* one letter per launch argument: p pointer, i int32, l int64, f fp32 */
  int extra_pointers;          /* scratch pointers newer Tritons append (passed as NULL: sizes are 0) */
  int constexprs[FDK_NUM_CX];  /* integer constexprs by FDK_CX_<name> (block sizes for the grid) */
} fdk_entry;

/* One launch table: nrows keys of nkey ints, and per row the entry index for each arch (-1: none). */
typedef struct fdk_table {
  const char *name;
  int nkey, nrows;
  const int *keys;
  const int *ids;
} fdk_table;

extern const int fdk_archs[FDK_NUM_ARCHS];
extern const int fdk_num_entries;
extern const fdk_entry fdk_entries[];
extern const fdk_table fdk_tables[FDK_NUM_TABLES];

typedef union fdk_arg {
  const void *p;
  int64_t l; /* i and l kinds: checked to fit */
  float f;
} fdk_arg;

/* Records msg as the thread's last error and returns status. */
fdk_status fdk_fail(fdk_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The table arch (80, 90, 100) and SM count of the current context's device (its properties read from
   the driver once per device), or the dry run's.  A device no cubin of the library runs on fails. */
fdk_status fdk_device(int *arch, int *num_sms);

/* The entry of `table` for key and arch, or -1. */
int fdk_find(int table, const int *key, int arch);

/* Launches entry with grid and args (checked against the entry's kinds), or records it in dry run. */
fdk_status fdk_launch(int entry, const unsigned grid[3], const fdk_arg *args, int nargs, struct CUstream_st *stream);

/* Checks for the op functions: each fails with a message naming the argument. */
fdk_status fdk_check_ptr(const void *p, const char *name);
fdk_status fdk_check_size(int64_t v, const char *name, int64_t min);
fdk_status fdk_check_dtype(fdk_dtype dtype);
