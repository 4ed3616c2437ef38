/* fastdiff.ops._aot_binding: Python's entry to libfastdiff_kernels.
 *
 * One METH_FASTCALL function per op direction taking plain ints and floats — data pointers (0 for
 * NULL), sizes, strides, scalars, the raw CUDA stream last — in the order of the op's argument
 * struct in fastdiff_kernels.h, and returning the fdk_status.  No torch headers, no allocation
 * per call: the arguments are written into the struct on the stack (see fastdiff/ops/_aot.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>

#include "fastdiff_kernels.h"

/* How one struct field is read from the arguments: e enum/int, i int, l int64, p pointer, d double,
   4 an int64[4] taking four arguments. */
typedef struct { size_t offset; char kind; } field;
#define F(type, name, kind) {offsetof(type, name), kind}

/* Pointers and int64 sizes from Python ints without CPython's generic byte-array path (which
   PyLong_AsUnsignedLongLong and PyLong_AsLongLong take for every multi-digit int, i.e. every address). */
static void *address_of(PyObject *arg) {
  if (!PyLong_Check(arg)) {
    PyErr_Format(PyExc_TypeError, "an address must be an int, got %s", Py_TYPE(arg)->tp_name);
    return NULL;
  }
  return (void *)(uintptr_t)PyLong_AsUnsignedLongLongMask(arg); /* data_ptr() values: never negative */
}

static int64_t int64_of(PyObject *arg, int *overflow) {
  int this_one = 0;
  long long v = PyLong_AsLongLongAndOverflow(arg, &this_one);
  *overflow |= this_one;
  return v;
}

static int fill(void *s, const field *fields, int n, PyObject *const *args, Py_ssize_t nargs, const char *fn) {
  Py_ssize_t want = 1; /* the stream */
  for (int i = 0; i < n; i++) want += fields[i].kind == '4' ? 4 : 1;
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", fn, want, nargs);
    return -1;
  }
  Py_ssize_t a = 0;
  int overflow = 0;
  for (int i = 0; i < n; i++) {
    char *at = (char *)s + fields[i].offset;
    switch (fields[i].kind) {
      case 'e': case 'i': *(int *)at = (int)PyLong_AsLong(args[a++]); break;
      case 'l': *(int64_t *)at = int64_of(args[a++], &overflow); break;
      case 'p': *(void **)at = address_of(args[a++]); break;
      case 'd': *(double *)at = PyFloat_AsDouble(args[a++]); break;
      case '4': for (int k = 0; k < 4; k++) ((int64_t *)at)[k] = int64_of(args[a++], &overflow); break;
    }
  }
  if (overflow && !PyErr_Occurred()) PyErr_Format(PyExc_OverflowError, "%s: an integer does not fit 64 bits", fn);
  return PyErr_Occurred() ? -1 : 0;
}

static struct CUstream_st *stream_of(PyObject *arg) { return (struct CUstream_st *)address_of(arg); }

#define OP(name, type, ...)                                                                          \
  static const field name##_fields[] = {__VA_ARGS__};                                                \
  static PyObject *py_##name(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {              \
    (void)self;                                                                                      \
    type s;                                                                                          \
    int n = (int)(sizeof name##_fields / sizeof(field));                                             \
    if (fill(&s, name##_fields, n, args, nargs, #name)) return NULL;                                 \
    struct CUstream_st *stream = stream_of(args[nargs - 1]);                                         \
    if (PyErr_Occurred()) return NULL;                                                               \
    return PyLong_FromLong(fdk_##name(&s, stream));                                                  \
  }

#define T fdk_q_sample_args
OP(q_sample, T, F(T, dtype, 'e'), F(T, x0, 'p'), F(T, t, 'p'), F(T, alphas_cumprod, 'p'), F(T, num_timesteps, 'l'),
   F(T, noise, 'p'), F(T, keys, 'p'), F(T, x_t, 'p'), F(T, v, 'p'), F(T, batch, 'l'), F(T, channels, 'l'),
   F(T, spatial, 'l'), F(T, channels_last, 'i'))
#undef T
#define T fdk_diffusion_loss_args
OP(diffusion_loss_fwd, T, F(T, dtype, 'e'), F(T, pred, 'p'), F(T, target, 'p'), F(T, weight, 'p'), F(T, loss, 'p'),
   F(T, partial, 'p'), F(T, batch, 'l'), F(T, per_sample, 'l'))
#undef T
#define T fdk_diffusion_loss_bwd_args
OP(diffusion_loss_bwd, T, F(T, dtype, 'e'), F(T, grad, 'p'), F(T, pred, 'p'), F(T, target, 'p'), F(T, weight, 'p'),
   F(T, d_pred, 'p'), F(T, batch, 'l'), F(T, per_sample, 'l'))
#undef T
#define T fdk_attention_fwd_args
OP(attention_fwd, T, F(T, dtype, 'e'), F(T, q, 'p'), F(T, k, 'p'), F(T, v, 'p'), F(T, o, 'p'), F(T, lse, 'p'),
   F(T, batch, 'l'), F(T, heads, 'l'), F(T, len_q, 'l'), F(T, len_k, 'l'), F(T, head_dim, 'l'), F(T, stride_q, '4'),
   F(T, stride_k, '4'), F(T, stride_v, '4'), F(T, stride_o, '4'), F(T, scale, 'd'))
#undef T
#define T fdk_attention_bwd_args
OP(attention_bwd, T, F(T, dtype, 'e'), F(T, d_o, 'p'), F(T, q, 'p'), F(T, k, 'p'), F(T, v, 'p'), F(T, o, 'p'),
   F(T, lse, 'p'), F(T, dq, 'p'), F(T, dk, 'p'), F(T, dv, 'p'), F(T, delta, 'p'), F(T, batch, 'l'),
   F(T, heads, 'l'), F(T, len_q, 'l'), F(T, len_k, 'l'), F(T, head_dim, 'l'), F(T, stride_do, '4'),
   F(T, stride_q, '4'), F(T, stride_k, '4'), F(T, stride_v, '4'), F(T, stride_o, '4'), F(T, stride_dq, '4'),
   F(T, stride_dk, '4'), F(T, stride_dv, '4'), F(T, scale, 'd'), F(T, dkdv_partial, 'p'))
#undef T
#define T fdk_group_norm_silu_fwd_args
OP(group_norm_silu_fwd, T, F(T, dtype, 'e'), F(T, params_dtype, 'e'), F(T, x, 'p'), F(T, y, 'p'), F(T, weight, 'p'),
   F(T, bias, 'p'), F(T, scale, 'p'), F(T, shift, 'p'), F(T, stride_scale, 'l'), F(T, stride_shift, 'l'),
   F(T, mean, 'p'), F(T, rstd, 'p'), F(T, coef_a, 'p'), F(T, coef_d, 'p'), F(T, partial_mean, 'p'),
   F(T, partial_m2, 'p'), F(T, batch, 'l'), F(T, channels, 'l'), F(T, spatial, 'l'), F(T, groups, 'l'),
   F(T, channels_last, 'i'), F(T, silu, 'i'), F(T, eps, 'd'))
#undef T
#define T fdk_group_norm_silu_bwd_args
OP(group_norm_silu_bwd, T, F(T, dtype, 'e'), F(T, params_dtype, 'e'), F(T, dy, 'p'), F(T, x, 'p'), F(T, mean, 'p'),
   F(T, rstd, 'p'), F(T, coef_a, 'p'), F(T, coef_d, 'p'), F(T, weight, 'p'), F(T, bias, 'p'), F(T, scale, 'p'),
   F(T, has_shift, 'i'), F(T, stride_scale, 'l'), F(T, dx, 'p'), F(T, dweight, 'p'), F(T, dbias, 'p'),
   F(T, dscale, 'p'), F(T, dshift, 'p'), F(T, sum_dz, 'p'), F(T, sum_dzx, 'p'), F(T, dx_e, 'p'), F(T, dx_f, 'p'),
   F(T, term_w, 'p'), F(T, term_b, 'p'), F(T, batch, 'l'), F(T, channels, 'l'), F(T, spatial, 'l'),
   F(T, groups, 'l'), F(T, channels_last, 'i'), F(T, silu, 'i'))
#undef T
#define T fdk_sampler_step_args
OP(sampler_step, T, F(T, dtype, 'e'), F(T, out_dtype, 'e'), F(T, x, 'p'), F(T, model_output, 'p'),
   F(T, uncond_output, 'p'), F(T, coeffs, 'p'), F(T, per_sample_coeffs, 'i'), F(T, x0_prev, 'p'), F(T, seeds, 'p'),
   F(T, known, 'p'), F(T, mask, 'p'), F(T, mask_per_pixel, 'i'), F(T, x_next, 'p'), F(T, x0_out, 'p'),
   F(T, stats, 'p'), F(T, batch, 'l'), F(T, channels, 'l'), F(T, spatial, 'l'), F(T, channels_last, 'i'),
   F(T, add_noise, 'i'), F(T, step, 'l'), F(T, guidance_scale, 'd'), F(T, guidance_rescale, 'd'),
   F(T, clip_x0, 'd'))
#undef T

static PyObject *py_last_error(PyObject *self, PyObject *unused) {
  (void)self, (void)unused;
  return PyUnicode_FromString(fdk_last_error());
}
static PyObject *py_source_hash(PyObject *self, PyObject *unused) {
  (void)self, (void)unused;
  return PyUnicode_FromString(fdk_source_hash());
}
static PyObject *py_set_dry_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  (void)self;
  if (nargs != 2) return PyErr_Format(PyExc_TypeError, "set_dry_run takes (arch, num_sms)");
  fdk_set_dry_run((int)PyLong_AsLong(args[0]), (int)PyLong_AsLong(args[1]));
  if (PyErr_Occurred()) return NULL;
  Py_RETURN_NONE;
}
static PyObject *py_use_device(PyObject *self, PyObject *ordinal) {
  (void)self;
  long index = PyLong_AsLong(ordinal);
  if (index == -1 && PyErr_Occurred()) return NULL;
  return PyLong_FromLong(fdk_use_device((int)index));
}
static PyObject *py_dry_run_take(PyObject *self, PyObject *unused) {
  (void)self, (void)unused;
  fdk_launch_record records[64];
  int n = fdk_dry_run_take(records, 64);
  PyObject *out = PyList_New(n);
  for (int i = 0; out && i < n; i++) {
    PyObject *args = PyList_New(records[i].num_args);
    for (int k = 0; args && k < records[i].num_args; k++) PyList_SET_ITEM(args, k, PyLong_FromLongLong(records[i].args[k]));
    PyList_SET_ITEM(out, i, Py_BuildValue("(s(III)N)", records[i].case_name, records[i].grid[0], records[i].grid[1],
                                          records[i].grid[2], args));
  }
  return out;
}

#define FAST(name) {#name, (PyCFunction)(void (*)(void))py_##name, METH_FASTCALL, NULL}
static PyMethodDef methods[] = {
    FAST(q_sample), FAST(diffusion_loss_fwd), FAST(diffusion_loss_bwd), FAST(attention_fwd), FAST(attention_bwd),
    FAST(group_norm_silu_fwd), FAST(group_norm_silu_bwd), FAST(sampler_step),
    FAST(set_dry_run),
    {"last_error", py_last_error, METH_NOARGS, NULL},
    {"source_hash", py_source_hash, METH_NOARGS, NULL},
    {"dry_run_take", py_dry_run_take, METH_NOARGS, NULL},
    {"use_device", py_use_device, METH_O, NULL},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_aot_binding", "libfastdiff_kernels for fastdiff.ops", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__aot_binding(void) { return PyModule_Create(&module); }
