/* fastdiff.ops._eager: the ops' eager calls at the cost of a native op.
 *
 * Such a call used to spend most of its host time in Python before the library's C function:
 * reading its signature (types, dtypes, devices, shapes, strides) to find its launch plan,
 * allocating its outputs, unpacking data pointers, and, under autograd, a Python
 * autograd.Function and backward.  Each entry here does that in C++.  It reads the signature off
 * the tensors, finds the plan of that signature, allocates the outputs with ATen and calls
 * libfastdiff_kernels, on the current CUDA stream (or in dry run); a call autograd records gets a
 * C++ autograd node whose backward launches from C++ too (see "calls autograd records").
 *
 * Plans come from Python: the first call of a signature asks the op's planner (registered by its
 * module with `set_planner`), which makes the public function's checks when the call is a checked
 * one (raising its errors) and returns the plan's integers, or None when that signature takes the
 * Python path (an input the kernels read only after a copy, an empty tensor).  A plan made for an
 * unchecked call serves unchecked calls only, until a checked call of its signature is checked.
 *
 * An entry returns None where the Python path must take the call (it then behaves as before):
 *   - the first argument is not a plain tensor (a tracer's, a subclass; nn.Parameter counts as
 *     plain), or a tensor argument is not a dense tensor with storage (nested, vmap's, symbolic);
 *   - the call does not launch through the library: off the current CUDA device, the reference
 *     backend in force, or CPU tensors outside dry run;
 *   - a checked call whose numbers are not of the types its fast check takes (the Python path then
 *     checks them, and raises where they are wrong);
 *   - q_sample with a gradient (it has no backward kernel), or an attention head dim without one;
 *   - the library declines the signature (no compiled case: Triton's JIT takes it, in Python).
 *
 * Scratch (statistics, partial sums, an inference call's log-sum-exp) is a fresh ATen allocation:
 * the caching allocator serves it with no device call, stream-ordered, and it stays valid in a
 * CUDA-graph capture.
 */
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/randint.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "fastdiff_kernels.h"

namespace {

/* ---------------------------------------------------------------------------- configuration */

PyObject *dry_run_flag = nullptr;   // fastdiff.ops._backend's contextvar: True inside dry_run()
PyObject *backend_override = nullptr; // its contextvar: the use_backend() name in force, or None
PyObject *current_device = nullptr; // torch._C._cuda_getDevice
PyObject *raw_stream = nullptr;     // torch._C._cuda_getCurrentRawStream
PyObject *reference_name = nullptr; // "reference"
std::atomic<int64_t> launches{0};   // library calls made from here, backward passes included (tests)

bool contextvar_is(PyObject *var, PyObject *value) {
  PyObject *v = nullptr;
  if (var == nullptr || PyContextVar_Get(var, nullptr, &v) < 0 || v == nullptr) {
    PyErr_Clear();
    return false;
  }
  bool same = v == value || (PyUnicode_Check(v) && PyUnicode_Check(value) && PyUnicode_Compare(v, value) == 0);
  Py_DECREF(v);
  return same;
}

/* ---------------------------------------------------------------------------- signatures and plans */

using Key = std::vector<int64_t>;

struct KeyHash {
  size_t operator()(const Key &key) const {
    uint64_t h = 1469598103934665603ull;
    for (int64_t w : key) h = (h ^ static_cast<uint64_t>(w)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

constexpr int MAX_PLAN = 40;

struct Plan {
  bool launches = false; // false: the signature takes the Python path
  bool checked = false;  // the public function's checks passed for this signature
  bool declined = false; // the library has no case for it
  int size = 0;
  int64_t ints[MAX_PLAN] = {};
};

struct Registry {
  explicit Registry(const char *op) : op(op) {}
  const char *op; // the library's name of the op, in error messages
  PyObject *planner = nullptr;
  PyObject *backward = nullptr; // the op's Python backward, where the library declines one (see `recorded`)
  std::unordered_map<Key, Plan, KeyHash> plans;
};

constexpr size_t MAX_SIGNATURES = 1024; // past this many, the plans are forgotten and made again

/* One call's tensors as its signature and data: tensors are added in the op's argument order. */
struct Call {
  Key key;
  const at::Tensor *tensors[8] = {};
  int count = 0;
  bool wants_grad = false;

  Call() { key.reserve(96); }

  // false where the argument is neither None nor a dense tensor with storage (vmap's and other
  // wrappers, nested tensors, symbolic sizes take the Python path); the first must be a tensor, not a
  // subclass (nn.Parameter counts as a tensor)
  bool add(PyObject *arg, bool differentiable) {
    if (arg == Py_None && count > 0) {
      key.push_back(-1);
      tensors[count++] = nullptr;
      return true;
    }
    if (count == 0 ? !THPVariable_CheckExact(arg) : !THPVariable_Check(arg)) return false;
    const at::Tensor &t = THPVariable_Unpack(arg);
    if (t.layout() != at::kStrided || t.is_nested() || !t.has_storage() ||
        t.unsafeGetTensorImpl()->has_symbolic_sizes_strides())
      return false;
    key.push_back(reinterpret_cast<intptr_t>(Py_TYPE(arg)));
    key.push_back(static_cast<int64_t>(t.scalar_type()));
    key.push_back(static_cast<int64_t>(t.device().type()) * 1024 + t.device().index());
    key.push_back(t.dim());
    for (int64_t s : t.sizes()) key.push_back(s);
    for (int64_t s : t.strides()) key.push_back(s);
    wants_grad |= differentiable && t.requires_grad();
    tensors[count++] = &t;
    return true;
  }

  // the call's first n arguments; bit i of `differentiable`: argument i has a gradient
  bool add_all(PyObject *const *args, int n, unsigned differentiable) {
    for (int i = 0; i < n; i++)
      if (!add(args[i], differentiable >> i & 1)) return false;
    return true;
  }

  const at::Tensor &operator[](int i) const { return *tensors[i]; }
  void *ptr(int i) const { return tensors[i] ? tensors[i]->data_ptr() : nullptr; }
};

enum Path { PYTHON = 0, LAUNCH = 1, FAILED = -1 };

/* Where a call on x launches: LAUNCH with *stream set (the current CUDA stream; 0 in dry run on the
   CPU) or PYTHON; *dry says whether dry run is on. */
Path stream_for(const at::Tensor &x, void **stream, bool *dry) {
  *dry = contextvar_is(dry_run_flag, Py_True);
  *stream = nullptr;
  if (x.is_cpu()) return *dry ? LAUNCH : PYTHON;
  if (!x.is_cuda() || current_device == nullptr || raw_stream == nullptr) return PYTHON;
  if (contextvar_is(backend_override, reference_name)) return PYTHON;
  PyObject *device = PyObject_CallNoArgs(current_device);
  if (device == nullptr) return FAILED;
  long current = PyLong_AsLong(device);
  Py_DECREF(device);
  if (current != x.device().index()) return PyErr_Occurred() ? FAILED : PYTHON;
  PyObject *index = PyLong_FromLong(current);
  PyObject *s = index ? PyObject_CallOneArg(raw_stream, index) : nullptr;
  Py_XDECREF(index);
  if (s == nullptr) return FAILED;
  *stream = PyLong_AsVoidPtr(s);
  Py_DECREF(s);
  if (PyErr_Occurred()) return FAILED;
  if (fdk_use_device(static_cast<int>(current)) != FDK_SUCCESS) {
    PyErr_Format(PyExc_RuntimeError, "libfastdiff_kernels: %s", fdk_last_error());
    return FAILED;
  }
  return LAUNCH;
}

/* The plan of the call's signature: asks the planner on a signature not seen (or, for a checked
   call, not checked) yet.  nullptr with PYTHON or FAILED in *path otherwise. */
const Plan *find_plan(Registry &r, Call &call, bool checked, PyObject *const *args, Py_ssize_t nargs, Path *path) {
  *path = PYTHON;
  auto it = r.plans.find(call.key);
  if (it == r.plans.end() || (checked && !it->second.checked)) {
    if (r.planner == nullptr) return nullptr;
    bool was_checked = it != r.plans.end() && it->second.checked;
    // Python code from here on (it may let another thread in): `it` is looked up again below
    PyObject *made = PyObject_Vectorcall(r.planner, args, nargs, nullptr); // raises a checked call's errors
    if (made == nullptr) {
      *path = FAILED;
      return nullptr;
    }
    Plan plan;
    plan.checked = checked || was_checked;
    if (made != Py_None) {
      PyObject *ints = PySequence_Fast(made, "a plan is a tuple of ints");
      Py_ssize_t n = ints ? PySequence_Fast_GET_SIZE(ints) : 0;
      if (ints == nullptr || n > MAX_PLAN) {
        if (ints) PyErr_Format(PyExc_ValueError, "%s: a plan of %zd ints (at most %d)", r.op, n, MAX_PLAN);
        Py_XDECREF(ints);
        Py_DECREF(made);
        *path = FAILED;
        return nullptr;
      }
      for (Py_ssize_t i = 0; i < n; i++) plan.ints[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(ints, i));
      plan.size = static_cast<int>(n);
      plan.launches = true;
      Py_DECREF(ints);
    }
    Py_DECREF(made);
    if (PyErr_Occurred()) {
      *path = FAILED;
      return nullptr;
    }
    if (r.plans.size() >= MAX_SIGNATURES && r.plans.find(call.key) == r.plans.end()) r.plans.clear();
    it = r.plans.insert_or_assign(call.key, plan).first;
  }
  if (!it->second.launches || it->second.declined) return nullptr;
  *path = LAUNCH;
  return &it->second;
}

/* A call the library declined (no compiled case): nothing launched; the entry leaves the call (and,
   from then on, its signature) to the Python path, which launches it through Triton's JIT. */
struct Declined {};

/* After a library call: throws Declined where it declined (not in dry run: there is no JIT to fall
   back on), or its message where it failed. */
void check(fdk_status status, const char *op, bool dry) {
  if (status == FDK_SUCCESS) {
    launches++;
    return;
  }
  if (status == FDK_ERROR_UNSUPPORTED && !dry) throw Declined{};
  throw std::runtime_error(std::string("libfastdiff_kernels ") + op + ": " + fdk_last_error());
}

void decline(Registry &r, const Key &key) {
  auto it = r.plans.find(key);
  if (it != r.plans.end()) it->second.declined = true;
}

at::Tensor floats(const at::Tensor &like, int64_t n) { return at::empty({n}, like.options().dtype(at::kFloat)); }

PyObject *wrap(const at::Tensor &t) { return t.defined() ? THPVariable_Wrap(t) : Py_NewRef(Py_None); }

bool is_float(PyObject *o) { return PyFloat_CheckExact(o); }
bool is_bool(PyObject *o) { return o == Py_True || o == Py_False; }

#define ENTRY(name) PyObject *name(PyObject *, PyObject *const *args, Py_ssize_t nargs)
#define ARGS(n)                                                                              \
  if (nargs != (n)) return PyErr_Format(PyExc_TypeError, "%s takes %d arguments", __func__, (n))
#define PYTHON_PATH Py_RETURN_NONE
// An entry's start: its arguments counted, `checked` (the last one), the first n_tensors read into
// `call` (bit i of `differentiable`: argument i has a gradient), and whether autograd records it.
#define BEGIN(n_args, n_tensors, differentiable)                                             \
  ARGS(n_args);                                                                              \
  bool checked = args[(n_args) - 1] == Py_True;                                              \
  Call call;                                                                                 \
  if (!call.add_all(args, n_tensors, differentiable)) PYTHON_PATH;                           \
  bool record = call.wants_grad && c10::GradMode::is_enabled()
// the common prologue: the call's path, then its plan (PYTHON_PATH or the error where there is none)
#define PLAN(registry, checked, length)                                                      \
  void *stream;                                                                              \
  bool dry;                                                                                  \
  Path path = stream_for(call[0], &stream, &dry);                                            \
  const Plan *found = path == LAUNCH ? find_plan(registry, call, checked, args, nargs, &path) : nullptr; \
  if (path == FAILED) return nullptr;                                                        \
  if (path == PYTHON) PYTHON_PATH;                                                           \
  if (found->size != (length))                                                               \
    return PyErr_Format(PyExc_ValueError, "%s: its planner gave %d ints, not %d", registry.op, found->size, (length)); \
  const Plan plan = *found; /* a copy: ATen may run Python code (a dispatch mode) that clears the plans */ \
  const int64_t *p = plan.ints
// An entry's `try` block's handlers: a call the library declined goes to the Python path; any other
// C++ error raises RuntimeError.
#define CATCH_TO_PYTHON                                                                      \
  catch (const Declined &) {                                                                 \
    decline(registry, call.key);                                                             \
    PYTHON_PATH;                                                                             \
  }                                                                                          \
  catch (const std::exception &e) {                                                          \
    return PyErr_Format(PyExc_RuntimeError, "%s", e.what());                                 \
  }

Registry group_norm_silu_plans{"group_norm_silu_fwd"}, attention_plans{"attention_fwd"},
    sampler_step_plans{"sampler_step"}, noising_plans{"q_sample"}, loss_plans{"diffusion_loss_fwd"};

/* ---------------------------------------------------------------------------- calls autograd records

   A call with an input that requires grad (grad mode on) is recorded by a C++ autograd node
   (torch::autograd::Function): its forward launches as the inference call does, keeping what the
   backward reads; its backward launches the library's backward on the forward's stream, from the
   autograd engine's thread, without the GIL.  Where the library declines a backward (no case for
   it), the op's Python backward takes it, through Triton's JIT.  A forward the library declines
   throws Declined before anything launches, as an inference call's does. */

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;


/* Every backward goes to the op's Python backward, as one the library declines does (tests: the
   library declines none of the shipped cases). */
std::atomic<bool> python_backward_only{false};

/* What a recorded forward keeps besides tensors: the plan, the stream, dry run, one double. */
void keep(AutogradContext *ctx, const Plan &plan, void *stream, bool dry, double real) {
  ctx->saved_data["plan"] = std::vector<int64_t>(plan.ints, plan.ints + plan.size);
  ctx->saved_data["stream"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(stream));
  ctx->saved_data["dry"] = dry;
  ctx->saved_data["real"] = real;
}

/* The forward's stream, for the backward, which runs on an autograd engine thread: made ready to
   launch on x's device there (that thread may have no current CUDA context yet). */
CUstream_st *kept_stream(AutogradContext *ctx, const at::Tensor &x) {
  if (x.is_cuda() && fdk_use_device(x.device().index()) != FDK_SUCCESS)
    throw std::runtime_error(std::string("libfastdiff_kernels: ") + fdk_last_error());
  return reinterpret_cast<CUstream_st *>(static_cast<intptr_t>(ctx->saved_data["stream"].toInt()));
}

/* A number argument of a Python backward: 'i' an int, 'f' a float, 'b' a bool. */
struct Number {
  char kind;
  double value;
};

PyObject *number(const Number &n) {
  if (n.kind == 'i') return PyLong_FromLongLong(static_cast<long long>(n.value));
  if (n.kind == 'b') return PyBool_FromLong(n.value != 0.0);
  return PyFloat_FromDouble(n.value);
}

/* Holds the GIL for a scope (the engine's thread does not hold it). */
struct Gil {
  PyGILState_STATE state = PyGILState_Ensure();
  ~Gil() { PyGILState_Release(state); }
};

/* The Python error set now, as text (and cleared). */
std::string python_error() {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyObject *text = value ? PyObject_Str(value) : nullptr;
  const char *utf8 = text ? PyUnicode_AsUTF8(text) : nullptr;
  std::string message = utf8 ? utf8 : "the Python backward failed";
  Py_XDECREF(text), Py_XDECREF(type), Py_XDECREF(value), Py_XDECREF(tb);
  PyErr_Clear();
  return message;
}

/* The op's Python backward on these arguments (None for an undefined tensor), under the GIL: the
   gradients it returns, a tensor or a tuple of tensors and None. */
variable_list python_backward(Registry &r, std::initializer_list<at::Tensor> tensors,
                              std::initializer_list<Number> numbers) {
  Gil gil;
  if (r.backward == nullptr)
    throw std::runtime_error(std::string(r.op) + ": the library declined the backward and there is no Python one");
  PyObject *args = PyTuple_New(static_cast<Py_ssize_t>(tensors.size() + numbers.size()));
  if (args == nullptr) throw std::runtime_error(python_error());
  Py_ssize_t i = 0;
  for (const at::Tensor &t : tensors) PyTuple_SET_ITEM(args, i++, wrap(t)); // NULL items: the call fails
  for (const Number &n : numbers) PyTuple_SET_ITEM(args, i++, number(n));
  PyObject *out = PyErr_Occurred() ? nullptr : PyObject_Call(r.backward, args, nullptr);
  Py_DECREF(args);
  if (out == nullptr) throw std::runtime_error(python_error());
  PyObject *seq = PyTuple_Check(out) ? Py_NewRef(out) : PyTuple_Pack(1, out);
  Py_DECREF(out);
  if (seq == nullptr) throw std::runtime_error(python_error());
  variable_list grads;
  bool ok = true;
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(seq); k++) {
    PyObject *g = PyTuple_GET_ITEM(seq, k);
    ok &= g == Py_None || THPVariable_Check(g);
    grads.push_back(g != Py_None && THPVariable_Check(g) ? THPVariable_Unpack(g) : at::Tensor());
  }
  Py_DECREF(seq);
  if (!ok) throw std::runtime_error(std::string(r.op) + ": its Python backward returned something not a tensor");
  return grads;
}

at::Tensor or_undefined(const OptionalTensor &t) { return t.has_value() ? *t : at::Tensor(); }
void *ptr(const OptionalTensor &t) { return t.has_value() && t->defined() ? t->data_ptr() : nullptr; }

/* ---------------------------------------------------------------------------- the ops */

/* group_norm_silu(x, weight, bias, scale, shift, num_groups, eps, silu, checked) -> y.
   Plan: dtype, params dtype, scale and shift row strides, B, C, S, G, channels-last, silu, the
   saved statistics' floats and the partials' floats, the offsets (bytes) of rstd, A, d in the
   statistics and of M2 in the partials; then the backward's: its scratch floats and the offsets
   (bytes) of Σ dz·x̂, E, F, the dγ and dβ terms and the spare (C,) row in it (Σ dz at 0). */
fdk_status group_norm_forward(const int64_t *p, const at::Tensor &x, void *const params[4], double eps,
                              const at::Tensor &y, char *stats, char *partials, void *stream) {
  fdk_group_norm_silu_fwd_args a{};
  a.dtype = static_cast<fdk_dtype>(p[0]);
  a.params_dtype = static_cast<fdk_dtype>(p[1]);
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.weight = params[0], a.bias = params[1], a.scale = params[2], a.shift = params[3];
  a.stride_scale = p[2], a.stride_shift = p[3];
  a.mean = reinterpret_cast<float *>(stats);
  a.rstd = reinterpret_cast<float *>(stats + p[12]);
  a.coef_a = reinterpret_cast<float *>(stats + p[13]);
  a.coef_d = reinterpret_cast<float *>(stats + p[14]);
  a.partial_mean = reinterpret_cast<float *>(partials);
  a.partial_m2 = reinterpret_cast<float *>(partials + p[15]);
  a.batch = p[4], a.channels = p[5], a.spatial = p[6], a.groups = p[7];
  a.channels_last = static_cast<int>(p[8]), a.silu = static_cast<int>(p[9]);
  a.eps = eps;
  return fdk_group_norm_silu_fwd(&a, static_cast<CUstream_st *>(stream));
}

struct GroupNormSiLU : torch::autograd::Function<GroupNormSiLU> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const OptionalTensor &weight,
                            const OptionalTensor &bias, const OptionalTensor &scale, const OptionalTensor &shift,
                            const Plan *plan, double eps, void *stream, bool dry) {
    const int64_t *p = plan->ints;
    at::Tensor y = at::empty_like(x), saved = floats(x, p[10]), partials = floats(x, p[11]);
    void *params[4] = {ptr(weight), ptr(bias), ptr(scale), ptr(shift)};
    check(group_norm_forward(p, x, params, eps, y, static_cast<char *>(saved.data_ptr()),
                             static_cast<char *>(partials.data_ptr()), stream),
          "group_norm_silu_fwd", dry);
    ctx->save_for_backward({x, saved, or_undefined(weight), or_undefined(bias), or_undefined(scale),
                            or_undefined(shift)});
    keep(ctx, *plan, stream, dry, eps);
    return y;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    variable_list s = ctx->get_saved_variables(); // x, saved, weight, bias, scale, shift
    const at::Tensor &x = s[0];
    std::vector<int64_t> plan = ctx->saved_data["plan"].toIntVector();
    const int64_t *p = plan.data();
    bool dry = ctx->saved_data["dry"].toBool();
    at::Tensor dy = grads[0].strides() == x.strides() ? grads[0] : at::empty_like(x).copy_(grads[0]);
    int64_t B = p[4], C = p[5];
    bool has[4] = {s[2].defined(), s[3].defined(), s[4].defined(), s[5].defined()}, affine = has[0] || has[1];
    auto f32 = x.options().dtype(at::kFloat);
    at::Tensor dx = at::empty_like(x), dw = has[0] ? at::empty({C}, f32) : at::Tensor(),
               db = has[1] ? at::empty({C}, f32) : at::Tensor(), ds = has[2] ? at::empty({B, C}, f32) : at::Tensor(),
               dsh = has[3] ? at::empty({B, C}, f32) : at::Tensor(), work = floats(x, p[16]);
    char *stats = static_cast<char *>(s[1].data_ptr()), *w = static_cast<char *>(work.data_ptr());
    void *spare = affine ? w + p[22] : nullptr;
    fdk_group_norm_silu_bwd_args a{};
    a.dtype = static_cast<fdk_dtype>(p[0]), a.params_dtype = static_cast<fdk_dtype>(p[1]);
    a.dy = dy.data_ptr(), a.x = x.data_ptr();
    a.mean = reinterpret_cast<const float *>(stats), a.rstd = reinterpret_cast<const float *>(stats + p[12]);
    a.coef_a = reinterpret_cast<const float *>(stats + p[13]);
    a.coef_d = reinterpret_cast<const float *>(stats + p[14]);
    a.weight = has[0] ? s[2].data_ptr() : nullptr, a.bias = has[1] ? s[3].data_ptr() : nullptr;
    a.scale = has[2] ? s[4].data_ptr() : nullptr, a.has_shift = has[3], a.stride_scale = p[2];
    a.dx = dx.data_ptr();
    a.dweight = static_cast<float *>(has[0] ? dw.data_ptr() : spare);
    a.dbias = static_cast<float *>(has[1] ? db.data_ptr() : spare);
    a.dscale = has[2] ? ds.data_ptr<float>() : nullptr, a.dshift = has[3] ? dsh.data_ptr<float>() : nullptr;
    a.sum_dz = reinterpret_cast<float *>(w), a.sum_dzx = reinterpret_cast<float *>(w + p[17]);
    a.dx_e = reinterpret_cast<float *>(w + p[18]), a.dx_f = reinterpret_cast<float *>(w + p[19]);
    a.term_w = affine ? reinterpret_cast<float *>(w + p[20]) : nullptr;
    a.term_b = affine ? reinterpret_cast<float *>(w + p[21]) : nullptr;
    a.batch = B, a.channels = C, a.spatial = p[6], a.groups = p[7];
    a.channels_last = static_cast<int>(p[8]), a.silu = static_cast<int>(p[9]);
    try {
      if (python_backward_only) throw Declined{};
      check(fdk_group_norm_silu_bwd(&a, kept_stream(ctx, x)), "group_norm_silu_bwd", dry);
    } catch (const Declined &) {
      variable_list g = python_backward(
          group_norm_silu_plans, {dy, x, s[1], s[2], s[3], s[4], s[5]},
          {{'i', static_cast<double>(p[7])}, {'f', ctx->saved_data["real"].toDouble()}, {'b', static_cast<double>(p[9])}});
      g.resize(5);
      dx = g[0], dw = g[1], db = g[2], ds = g[3], dsh = g[4];
    }
    return {dx, dw, db, ds, dsh, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

ENTRY(group_norm_silu) {
  BEGIN(9, 5, 0b11111);
  PyObject *groups = args[5], *eps_arg = args[6], *silu = args[7];
  if (checked && (!PyLong_CheckExact(groups) || !is_float(eps_arg) || !is_bool(silu))) PYTHON_PATH;
  double eps = PyFloat_AsDouble(eps_arg);
  if (checked && !(eps >= 0.0 && eps < INFINITY)) PYTHON_PATH;
  call.key.push_back(PyLong_AsLongLong(groups));
  call.key.push_back(PyObject_IsTrue(silu));
  if (PyErr_Occurred()) return nullptr;
  Registry &registry = group_norm_silu_plans;
  PLAN(registry, checked, 23);
  try {
    const at::Tensor &x = call[0];
    if (record) {
      auto opt = [&](int i) { return call.tensors[i] ? OptionalTensor(call[i]) : OptionalTensor(); };
      return wrap(GroupNormSiLU::apply(x, opt(1), opt(2), opt(3), opt(4), &plan, eps, stream, dry));
    }
    at::Tensor y = at::empty_like(x), scratch = floats(x, p[10] + p[11]);
    char *stats = static_cast<char *>(scratch.data_ptr());
    void *params[4] = {call.ptr(1), call.ptr(2), call.ptr(3), call.ptr(4)};
    check(group_norm_forward(p, x, params, eps, y, stats, stats + 4 * p[10], stream), registry.op, dry);
    return wrap(y);
  }
  CATCH_TO_PYTHON
}

/* attention(q, k, v, scale, checked) -> o (B, H, Lq, D) stored as (B, Lq, H, D).
   Plan: dtype, B, H, Lq, Lk, D, the strides of q, k, v and o (4 each); then the backward's: the
   strides of dq, dk, dv (4 each) and its scratch floats (-1: the head dim has no backward). */
fdk_status attention_forward(const int64_t *p, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                             double scale, const at::Tensor &o, const at::Tensor &lse, void *stream) {
  const int64_t *sizes = p + 1, *strides = p + 6;
  fdk_attention_fwd_args a{};
  a.dtype = static_cast<fdk_dtype>(p[0]);
  a.q = q.data_ptr(), a.k = k.data_ptr(), a.v = v.data_ptr();
  a.o = o.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.batch = sizes[0], a.heads = sizes[1], a.len_q = sizes[2], a.len_k = sizes[3], a.head_dim = sizes[4];
  std::memcpy(a.stride_q, strides, sizeof a.stride_q);
  std::memcpy(a.stride_k, strides + 4, sizeof a.stride_k);
  std::memcpy(a.stride_v, strides + 8, sizeof a.stride_v);
  std::memcpy(a.stride_o, strides + 12, sizeof a.stride_o);
  a.scale = scale;
  return fdk_attention_fwd(&a, static_cast<CUstream_st *>(stream));
}

at::Tensor attention_output(const int64_t *p, const at::Tensor &q) {
  return at::empty_strided({p[1], p[2], p[3], p[5]}, {p[18], p[19], p[20], p[21]}, q.options());
}

at::Tensor attention_lse(const int64_t *p, const at::Tensor &q) {
  return at::empty({p[1], p[2], p[3]}, q.options().dtype(at::kFloat));
}

/* Whether the kernels read x (B, H, L, D) in place: unit-stride head dim, 16-byte aligned rows (the
   rule of flash_attention._aligned, here for the backward, which runs without the GIL). */
bool kernel_layout(const at::Tensor &x) {
  int64_t step = 16 / static_cast<int64_t>(x.element_size());
  auto n = x.sizes();
  auto st = x.strides();
  return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && st[3] == 1 && (n[0] == 1 || st[0] % step == 0) &&
         (n[1] == 1 || st[1] % step == 0) && (n[2] == 1 || st[2] % step == 0);
}

/* A fresh contiguous copy (`contiguous()` returns a contiguous view off a 16-byte boundary as is). */
at::Tensor dense_copy(const at::Tensor &x) { return at::empty_like(x, at::MemoryFormat::Contiguous).copy_(x); }

struct Attention : torch::autograd::Function<Attention> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                            const Plan *plan, double scale, void *stream, bool dry) {
    const int64_t *p = plan->ints;
    at::Tensor o = attention_output(p, q), lse = attention_lse(p, q);
    check(attention_forward(p, q, k, v, scale, o, lse, stream), "attention_fwd", dry);
    ctx->save_for_backward({q, k, v, o, lse});
    keep(ctx, *plan, stream, dry, scale);
    return o;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    variable_list s = ctx->get_saved_variables(); // q, k, v, o, lse
    std::vector<int64_t> plan = ctx->saved_data["plan"].toIntVector();
    const int64_t *p = plan.data(), *g = p + 22;
    bool dry = ctx->saved_data["dry"].toBool();
    double scale = ctx->saved_data["real"].toDouble();
    at::Tensor d_o = kernel_layout(grads[0]) ? grads[0] : dense_copy(grads[0]);
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &o = s[3];
    at::Tensor dq = at::empty_strided(q.sizes(), {g[0], g[1], g[2], g[3]}, q.options());
    at::Tensor dk = at::empty_strided(k.sizes(), {g[4], g[5], g[6], g[7]}, k.options());
    at::Tensor dv = at::empty_strided(v.sizes(), {g[8], g[9], g[10], g[11]}, v.options());
    at::Tensor work = floats(q, p[34]);
    fdk_attention_bwd_args a{};
    a.dtype = static_cast<fdk_dtype>(p[0]);
    a.d_o = d_o.data_ptr(), a.q = q.data_ptr(), a.k = k.data_ptr(), a.v = v.data_ptr(), a.o = o.data_ptr();
    a.lse = s[4].data_ptr<float>();
    a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv = dv.data_ptr();
    a.delta = a.dkdv_partial = work.data_ptr<float>(); // one scratch serves both (fastdiff_kernels.h)
    a.batch = p[1], a.heads = p[2], a.len_q = p[3], a.len_k = p[4], a.head_dim = p[5];
    for (int i = 0; i < 4; i++) {
      a.stride_do[i] = d_o.stride(i), a.stride_q[i] = p[6 + i], a.stride_k[i] = p[10 + i], a.stride_v[i] = p[14 + i];
      a.stride_o[i] = o.stride(i), a.stride_dq[i] = g[i], a.stride_dk[i] = g[4 + i], a.stride_dv[i] = g[8 + i];
    }
    a.scale = scale;
    try {
      if (python_backward_only) throw Declined{};
      check(fdk_attention_bwd(&a, kept_stream(ctx, q)), "attention_bwd", dry);
    } catch (const Declined &) {
      variable_list d = python_backward(attention_plans, {d_o, q, k, v, o, s[4]}, {{'f', scale}});
      d.resize(3);
      dq = d[0], dk = d[1], dv = d[2];
    }
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

ENTRY(attention) {
  BEGIN(5, 3, 0b111);
  PyObject *scale_arg = args[3];
  double scale = 0.0;
  if (scale_arg != Py_None) {
    if (checked && !is_float(scale_arg)) PYTHON_PATH;
    scale = PyFloat_AsDouble(scale_arg);
    if (PyErr_Occurred()) return nullptr;
    if (checked && !(scale > 0.0 && scale < INFINITY)) PYTHON_PATH;
  } else if (!checked) {
    PYTHON_PATH; // the unchecked entry takes the scale `attention` resolved
  }
  Registry &registry = attention_plans;
  PLAN(registry, checked, 35);
  if (scale_arg == Py_None) scale = 1.0 / std::sqrt(static_cast<double>(p[5]));
  try {
    if ((reinterpret_cast<uintptr_t>(call.ptr(0)) | reinterpret_cast<uintptr_t>(call.ptr(1)) |
         reinterpret_cast<uintptr_t>(call.ptr(2))) % 16)
      PYTHON_PATH; // a view off a 16-byte boundary: copied in Python
    const at::Tensor &q = call[0];
    if (record && p[34] < 0) PYTHON_PATH; // a head dim without a backward: the Python path says so
    if (record) return wrap(Attention::apply(q, call[1], call[2], &plan, scale, stream, dry));
    at::Tensor o = attention_output(p, q), lse = attention_lse(p, q);
    check(attention_forward(p, q, call[1], call[2], scale, o, lse, stream), registry.op, dry);
    return wrap(o);
  }
  CATCH_TO_PYTHON
}

/* sampler_step(x, model_output, coeffs, uncond_output, x0_prev, seeds, known, mask, guidance_scale,
   guidance_rescale, clip_x0, step, add_noise, return_x0, checked) -> (x_next, x̂0 or None).
   Plan: dtype, output dtype, per-sample coefficients, per-pixel mask, B, C, S, channels-last,
   rescale, chunks of the guidance statistics. */
ENTRY(sampler_step) {
  BEGIN(15, 8, 0);
  (void)record; // no gradient: the op is never differentiated
  PyObject *gs = args[8], *gr = args[9], *clip_arg = args[10], *step_arg = args[11], *noise_arg = args[12];
  double guidance_scale = 0.0, guidance_rescale = 0.0, clip = 0.0;
  int64_t step = 0;
  if (checked) {
    if (!is_float(gs) || !is_float(gr) || !(clip_arg == Py_None || is_float(clip_arg)) ||
        !PyLong_CheckExact(step_arg) || !is_bool(noise_arg))
      PYTHON_PATH;
  }
  guidance_scale = PyFloat_AsDouble(gs);
  guidance_rescale = PyFloat_AsDouble(gr);
  if (clip_arg != Py_None) clip = PyFloat_AsDouble(clip_arg);
  int overflow = 0;
  step = PyLong_AsLongLongAndOverflow(step_arg, &overflow);
  int add_noise = PyObject_IsTrue(noise_arg), return_x0 = PyObject_IsTrue(args[13]);
  if (PyErr_Occurred()) return nullptr;
  if (checked && (!std::isfinite(guidance_scale) || !(guidance_rescale >= 0.0 && guidance_rescale <= 1.0) ||
                  (clip_arg != Py_None && !(clip > 0.0)) || overflow || step < 0 || step >= (int64_t{1} << 62)))
    PYTHON_PATH;
  if (overflow) PYTHON_PATH;
  for (int64_t flag : {int64_t{guidance_rescale > 0.0}, int64_t{clip_arg != Py_None}, int64_t{add_noise},
                       int64_t{return_x0}})
    call.key.push_back(flag);
  Registry &registry = sampler_step_plans;
  PLAN(registry, checked, 10);
  try {
    const at::Tensor &x = call[0];
    at::Tensor x_next = at::empty_like(x), x0_out = return_x0 ? at::empty_like(x) : at::Tensor();
    at::Tensor stats = p[8] ? floats(x, p[4] * p[9] * 4) : at::Tensor();
    fdk_sampler_step_args a{};
    a.dtype = static_cast<fdk_dtype>(p[0]), a.out_dtype = static_cast<fdk_dtype>(p[1]);
    a.x = call.ptr(0), a.model_output = call.ptr(1), a.coeffs = static_cast<const float *>(call.ptr(2));
    a.uncond_output = call.ptr(3), a.x0_prev = call.ptr(4), a.seeds = static_cast<const int64_t *>(call.ptr(5));
    a.known = call.ptr(6), a.mask = call.ptr(7);
    a.per_sample_coeffs = static_cast<int>(p[2]), a.mask_per_pixel = static_cast<int>(p[3]);
    a.x_next = x_next.data_ptr();
    a.x0_out = return_x0 ? x0_out.data_ptr() : nullptr;
    a.stats = p[8] ? stats.data_ptr<float>() : nullptr;
    a.batch = p[4], a.channels = p[5], a.spatial = p[6], a.channels_last = static_cast<int>(p[7]);
    a.add_noise = add_noise, a.step = step;
    a.guidance_scale = guidance_scale, a.guidance_rescale = guidance_rescale, a.clip_x0 = clip;
    check(fdk_sampler_step(&a, static_cast<CUstream_st *>(stream)), registry.op, dry);
    return Py_BuildValue("(NN)", wrap(x_next), wrap(x0_out));
  }
  CATCH_TO_PYTHON
}

/* noising(x0, t, alphas_cumprod, noise, keys, want_v, checked) -> (x_t, noise, v or None): the
   noise as given, or drawn in the kernel from `keys` (drawn here, as torch.randint does, when both
   are None).  Plan: dtype, number of timesteps, B, C, S, channels-last. */
ENTRY(noising) {
  BEGIN(7, 5, 0b01001); // x0 and noise are differentiable
  if (record) PYTHON_PATH; // no backward: the Python path differentiates through the reference
  int want_v = PyObject_IsTrue(args[5]);
  if (want_v < 0) return nullptr;
  call.key.push_back(want_v);
  Registry &registry = noising_plans;
  PLAN(registry, checked, 6);
  try {
    const at::Tensor &x0 = call[0];
    bool draw = call.tensors[3] == nullptr;
    at::Tensor keys;
    if (draw) keys = call.tensors[4] ? *call.tensors[4] : at::randint(0, int64_t{1} << 62, {p[2]}, x0.options().dtype(at::kLong));
    at::Tensor x_t = at::empty_like(x0), noise = draw ? at::empty_like(x0) : call[3];
    at::Tensor v = want_v ? at::empty_like(x0) : at::Tensor();
    fdk_q_sample_args a{};
    a.dtype = static_cast<fdk_dtype>(p[0]);
    a.x0 = x0.data_ptr();
    a.t = static_cast<const int64_t *>(call.ptr(1));
    a.alphas_cumprod = static_cast<const float *>(call.ptr(2));
    a.num_timesteps = p[1];
    a.noise = noise.data_ptr();
    a.keys = draw ? keys.data_ptr<int64_t>() : nullptr;
    a.x_t = x_t.data_ptr();
    a.v = want_v ? v.data_ptr() : nullptr;
    a.batch = p[2], a.channels = p[3], a.spatial = p[4], a.channels_last = static_cast<int>(p[5]);
    check(fdk_q_sample(&a, static_cast<CUstream_st *>(stream)), registry.op, dry);
    return Py_BuildValue("(NNN)", wrap(x_t), wrap(noise), wrap(v));
  }
  CATCH_TO_PYTHON
}

/* diffusion_loss(pred, target, weight, checked) -> the fp32 scalar loss.  Plan: dtype, B, N, the
   partial sums' floats. */
fdk_status loss_forward(const int64_t *p, const at::Tensor &pred, const at::Tensor &target, void *weight,
                        const at::Tensor &loss, void *stream) {
  at::Tensor partial = floats(pred, p[3]);
  fdk_diffusion_loss_args a{};
  a.dtype = static_cast<fdk_dtype>(p[0]);
  a.pred = pred.data_ptr(), a.target = target.data_ptr(), a.weight = static_cast<const float *>(weight);
  a.loss = loss.data_ptr<float>(), a.partial = partial.data_ptr<float>();
  a.batch = p[1], a.per_sample = p[2];
  return fdk_diffusion_loss_fwd(&a, static_cast<CUstream_st *>(stream));
}

struct DiffusionLoss : torch::autograd::Function<DiffusionLoss> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &pred, const at::Tensor &target,
                            const OptionalTensor &weight, const Plan *plan, void *stream, bool dry) {
    at::Tensor loss = at::empty({}, pred.options().dtype(at::kFloat));
    check(loss_forward(plan->ints, pred, target, ptr(weight), loss, stream), "diffusion_loss_fwd", dry);
    ctx->save_for_backward({pred, target, or_undefined(weight)});
    keep(ctx, *plan, stream, dry, 0.0);
    return loss;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    variable_list s = ctx->get_saved_variables(); // pred, target, weight
    std::vector<int64_t> p = ctx->saved_data["plan"].toIntVector();
    bool dry = ctx->saved_data["dry"].toBool();
    at::Tensor grad = grads[0];
    if (grad.scalar_type() != at::kFloat || reinterpret_cast<uintptr_t>(grad.data_ptr()) % 16)
      grad = at::empty({}, grad.options().dtype(at::kFloat)).copy_(grad); // a view into a stack of losses
    at::Tensor d_pred = at::empty_like(s[0]);
    fdk_diffusion_loss_bwd_args a{};
    a.dtype = static_cast<fdk_dtype>(p[0]);
    a.grad = grad.data_ptr<float>(), a.pred = s[0].data_ptr(), a.target = s[1].data_ptr();
    a.weight = s[2].defined() ? s[2].data_ptr<float>() : nullptr;
    a.d_pred = d_pred.data_ptr();
    a.batch = p[1], a.per_sample = p[2];
    try {
      if (python_backward_only) throw Declined{};
      check(fdk_diffusion_loss_bwd(&a, kept_stream(ctx, s[0])), "diffusion_loss_bwd", dry);
    } catch (const Declined &) {
      d_pred = python_backward(loss_plans, {grad, s[0], s[1], s[2]}, {}).at(0);
    }
    bool target_grad = ctx->needs_input_grad(1);
    return {d_pred, target_grad ? -d_pred.to(s[1].scalar_type()) : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

ENTRY(diffusion_loss) {
  BEGIN(4, 3, 0b011); // the weight is a constant
  Registry &registry = loss_plans;
  PLAN(registry, checked, 4);
  try {
    const at::Tensor &pred = call[0];
    if (record) {
      // the weight is a constant: no gradient flows to it (as in the Python path, which detaches it)
      OptionalTensor weight = call.tensors[2] ? OptionalTensor(call[2].detach()) : OptionalTensor();
      return wrap(DiffusionLoss::apply(pred, call[1], weight, &plan, stream, dry));
    }
    at::Tensor loss = at::empty({}, pred.options().dtype(at::kFloat));
    check(loss_forward(p, pred, call[1], call.ptr(2), loss, stream), registry.op, dry);
    return wrap(loss);
  }
  CATCH_TO_PYTHON
}

/* ---------------------------------------------------------------------------- module */

Registry *registry_named(PyObject *name) {
  const char *s = PyUnicode_AsUTF8(name);
  if (s == nullptr) return nullptr;
  struct { const char *name; Registry *r; } all[] = {
      {"group_norm_silu", &group_norm_silu_plans}, {"attention", &attention_plans},
      {"sampler_step", &sampler_step_plans}, {"noising", &noising_plans}, {"diffusion_loss", &loss_plans}};
  for (auto &e : all)
    if (std::strcmp(s, e.name) == 0) return e.r;
  PyErr_Format(PyExc_KeyError, "no op %R", name);
  return nullptr;
}

ENTRY(configure) {
  ARGS(4);
  PyObject **slots[] = {&dry_run_flag, &backend_override, &current_device, &raw_stream};
  for (int i = 0; i < 4; i++) {
    Py_XSETREF(*slots[i], args[i] == Py_None ? nullptr : Py_NewRef(args[i]));
  }
  if (reference_name == nullptr && (reference_name = PyUnicode_InternFromString("reference")) == nullptr) return nullptr;
  Py_RETURN_NONE;
}

ENTRY(set_planner) {
  ARGS(3);
  Registry *r = registry_named(args[0]);
  if (r == nullptr) return nullptr;
  Py_XSETREF(r->planner, Py_NewRef(args[1]));
  Py_XSETREF(r->backward, args[2] == Py_None ? nullptr : Py_NewRef(args[2]));
  r->plans.clear();
  Py_RETURN_NONE;
}

PyObject *set_python_backward_only(PyObject *, PyObject *on) {
  int value = PyObject_IsTrue(on);
  if (value < 0) return nullptr;
  python_backward_only = value == 1;
  Py_RETURN_NONE;
}

PyObject *launched(PyObject *, PyObject *) { return PyLong_FromLongLong(launches.load()); }

PyObject *torch_version(PyObject *, PyObject *) { return PyUnicode_FromString(FASTDIFF_TORCH_VERSION); }

#define FAST(name) {#name, (PyCFunction)(void (*)(void))name, METH_FASTCALL, nullptr}
PyMethodDef methods[] = {
    FAST(group_norm_silu), FAST(attention), FAST(sampler_step), FAST(noising), FAST(diffusion_loss),
    FAST(configure), FAST(set_planner),
    {"launched", launched, METH_NOARGS, "How many library calls were made from here."},
    {"set_python_backward_only", set_python_backward_only, METH_O,
     "Tests: every backward goes to the op's Python backward, as one the library declines does."},
    {"torch_version", torch_version, METH_NOARGS, "The torch version this module was built against."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_eager", "The ops' eager calls in C++ (fastdiff.ops._aot)", -1,
                      methods, nullptr, nullptr, nullptr, nullptr};

} // namespace

PyMODINIT_FUNC PyInit__eager(void) { return PyModule_Create(&module); }
