#include "arrays.h"

#include <Python.h>
#include <nanobind/stl/string.h>

namespace fcpy {

namespace {
PyObject* g_not_found = nullptr;  // foldcube.NotFoundError
}  // namespace

void add_exceptions(nb::module_& mod) {
  PyObject* bases = PyTuple_Pack(2, PyExc_FileNotFoundError, PyExc_ValueError);
  g_not_found = PyErr_NewExceptionWithDoc(
      "foldcube.NotFoundError",
      "A file, tensor or feature that is not there (a FileNotFoundError and a ValueError).", bases,
      nullptr);
  Py_DECREF(bases);
  if (g_not_found == nullptr) throw nb::python_error();
  mod.attr("NotFoundError") = nb::borrow(g_not_found);
}

void throw_status(const fc::Status& st) {
  PyObject* type = PyExc_RuntimeError;
  switch (st.code()) {
    case fc::Status::Code::kOk:
      return;
    case fc::Status::Code::kInvalidArgument:
      type = PyExc_ValueError;
      break;
    case fc::Status::Code::kNotFound:
      type = g_not_found;
      break;
    case fc::Status::Code::kIOError:
      type = PyExc_OSError;
      break;
    case fc::Status::Code::kOutOfMemory:
      type = PyExc_MemoryError;
      break;
    case fc::Status::Code::kCancelled:
      type = PyExc_KeyboardInterrupt;
      break;
    case fc::Status::Code::kInternal:
      break;
  }
  PyErr_SetString(type, st.message().c_str());
  throw nb::python_error();
}

namespace {

[[noreturn]] void raise(PyObject* type, const std::string& msg) {
  PyErr_SetString(type, msg.c_str());
  throw nb::python_error();
}

std::string class_name(nb::handle obj) {
  return nb::cast<std::string>(
      nb::str(nb::handle(reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr()))).attr("__name__")));
}

std::string dtype_str(nb::dlpack::dtype d) {
  const char* kind = "?";
  switch (static_cast<nb::dlpack::dtype_code>(d.code)) {
    case nb::dlpack::dtype_code::Int:
      kind = "int";
      break;
    case nb::dlpack::dtype_code::UInt:
      kind = "uint";
      break;
    case nb::dlpack::dtype_code::Float:
      kind = "float";
      break;
    case nb::dlpack::dtype_code::Bool:
      return "bool";
    default:
      break;
  }
  return std::string(kind) + std::to_string(d.bits);
}

std::string shape_text(const nb::ndarray<nb::ro>& a) {
  std::string s = "[";
  for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

bool c_contiguous(const nb::ndarray<nb::ro>& a) {
  int64_t want = 1;
  for (int i = static_cast<int>(a.ndim()) - 1; i >= 0; --i) {
    if (a.shape(i) != 1 && a.stride(i) != want) return false;
    want *= static_cast<int64_t>(a.shape(i));
  }
  return true;
}

// The array behind obj (read-only view of it), or a TypeError naming arg.
nb::ndarray<nb::ro> as_array(nb::handle obj, const std::string& arg, const std::string& want) {
  nb::ndarray<nb::ro> a;
  if (!nb::try_cast(obj, a, false))
    raise(PyExc_TypeError, arg + ": expected " + want + ", got " + class_name(obj));
  if (a.device_type() != nb::device::cpu::value)
    raise(PyExc_TypeError, arg + ": expected a CPU array, got one on another device");
  return a;
}

fc::Shape shape_of(const nb::ndarray<nb::ro>& a) {
  fc::Shape s(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) s[i] = static_cast<int64_t>(a.shape(i));
  return s;
}

}  // namespace

fc::Tensor take_f32(nb::handle obj, const ArraySpec& spec) {
  const std::string arg = spec.arg;
  const std::string want = "a float32 array of shape " + spec.text;
  nb::ndarray<nb::ro> a = as_array(obj, arg, want);
  if (a.dtype() != nb::dtype<float>())
    raise(PyExc_TypeError, arg + ": expected dtype float32 (shape " + spec.text + "), got " +
                               dtype_str(a.dtype()) + "; convert with .astype(numpy.float32)");
  bool ok = a.ndim() == spec.dims.size();
  for (size_t i = 0; ok && i < spec.dims.size(); ++i)
    ok = spec.dims[i] < 0 || static_cast<int64_t>(a.shape(i)) == spec.dims[i];
  if (!ok)
    raise(PyExc_ValueError, arg + ": expected shape " + spec.text + ", got " + shape_text(a));
  if (!c_contiguous(a))
    raise(PyExc_ValueError,
          arg + ": the array must be C-contiguous (pass numpy.ascontiguousarray(" + arg + "))");
  if (spec.writable) {
    nb::ndarray<> w;
    if (!nb::try_cast(obj, w, false))
      raise(PyExc_ValueError, arg + ": the array is read-only, but the call writes its result " +
                                  "into it (pass a writable copy)");
  }
  return fc::Tensor::wrap(const_cast<void*>(static_cast<const void*>(a.data())), shape_of(a),
                          fc::DType::F32, nullptr);
}

fc::Tensor take_f32_opt(nb::handle obj, const ArraySpec& spec) {
  return obj.is_none() ? fc::Tensor() : take_f32(obj, spec);
}

fc::Tensor take_any(nb::handle obj, const std::string& arg) {
  nb::ndarray<nb::ro> a = as_array(obj, arg, "an array");
  fc::DType t;
  const nb::dlpack::dtype d = a.dtype();
  if (d == nb::dtype<float>())
    t = fc::DType::F32;
  else if (d == nb::dtype<double>())
    t = fc::DType::F64;
  else if (d == nb::dtype<int64_t>())
    t = fc::DType::I64;
  else if (d == nb::dtype<int32_t>())
    t = fc::DType::I32;
  else
    raise(PyExc_TypeError,
          arg + ": expected float32, float64, int64 or int32, got " + dtype_str(d));
  if (!c_contiguous(a))
    raise(PyExc_ValueError,
          arg + ": the array must be C-contiguous (pass numpy.ascontiguousarray(...))");
  return fc::Tensor::wrap(const_cast<void*>(static_cast<const void*>(a.data())), shape_of(a), t,
                          nullptr);
}

nb::object to_numpy(const fc::Tensor& t, bool read_only) {
  nb::dlpack::dtype d;
  switch (t.dtype()) {
    case fc::DType::F32:
      d = nb::dtype<float>();
      break;
    case fc::DType::F64:
      d = nb::dtype<double>();
      break;
    case fc::DType::I64:
      d = nb::dtype<int64_t>();
      break;
    case fc::DType::I32:
      d = nb::dtype<int32_t>();
      break;
    default:  // BF16 / F16 raw patterns: widened to float32
      return to_numpy(t.to(fc::DType::F32), read_only);
  }
  auto* keep = new fc::Tensor(t.contiguous());
  nb::capsule owner(keep, [](void* p) noexcept { delete static_cast<fc::Tensor*>(p); });
  std::vector<size_t> shape(keep->shape().begin(), keep->shape().end());
  void* data = keep->numel() ? keep->data<void>() : nullptr;
  if (read_only)
    return nb::cast(
        nb::ndarray<nb::numpy, nb::ro>(data, shape.size(), shape.data(), owner, nullptr, d));
  return nb::cast(nb::ndarray<nb::numpy>(data, shape.size(), shape.data(), owner, nullptr, d));
}

}  // namespace fcpy
