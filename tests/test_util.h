// Shared helpers for the test suite.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/model.h"
#include "foldcube/tensor.h"

namespace fc::test {

// The small Evoformer dimensions the training, memory-model and planner tests share.
inline EvoformerConfig small_config() {
  EvoformerConfig cfg;
  cfg.c_m = 32;
  cfg.c_z = 16;
  cfg.c_hidden_msa_att = 8;
  cfg.no_heads_msa = 4;
  cfg.c_hidden_pair_att = 8;
  cfg.no_heads_pair = 2;
  cfg.c_hidden_opm = 8;
  cfg.c_hidden_mul = 16;
  cfg.c_s = 24;
  return cfg;
}

// Paths the build fixes, defined in one generated TU (CMakeLists.txt, foldcube_test_paths) so
// that every other test TU compiles with a path-free command line and ccache shares it between
// checkouts: tests/data, the foldcube executable, and mpirun ("" when MPI is not configured).
const char* data_dir();
const char* cli_path();
const char* mpiexec();

inline std::string data_path(const std::string& name) {
  return std::string(data_dir()) + "/" + name;
}

// Where a golden file is: tests/data, else ../shared/golden beside the checkout (large cases),
// else $FOLDCUBE_GOLDEN_DIR, else "".
inline std::string golden_path(const std::string& name) {
  std::vector<std::string> paths = {data_path(name),
                                    std::string(data_dir()) + "/../../../shared/golden/" + name};
  if (const char* dir = std::getenv("FOLDCUBE_GOLDEN_DIR"))
    paths.push_back(std::string(dir) + "/" + name);
  for (const std::string& p : paths)
    if (std::filesystem::exists(p)) return p;
  return "";
}

// True when every element of x is finite (no NaN, no Inf).
inline bool all_finite(const Tensor& x) {
  const Tensor a = x.to(DType::F64);
  const double* p = a.data<double>();  // [numel]
  for (int64_t i = 0; i < a.numel(); ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

// max(a, b) that keeps a NaN (std::max drops a NaN in its second argument): every max-reduction
// of errors in the tests uses it, so one NaN difference makes the result NaN and every `<`/`<=`
// comparison against a tolerance fail.
inline double max_nan(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return std::max(a, b);
}

// The golden README metric: max |x - ref| / max(rms(ref), 1). Shapes must match. +Inf when x or
// ref holds a non-finite value, so no comparison against a tolerance passes on NaN or Inf.
// Same shape, same bits, and finite (two equal NaN outputs are not a pass).
inline bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && all_finite(a) && all_finite(b) &&
         std::memcmp(a.contiguous().f32(), b.contiguous().f32(), a.nbytes()) == 0;
}

// The recompute-policy lists the golden training tests run: none, module, block for every block,
// and with two blocks or more a mixed list (block, module, then none).
inline std::vector<std::vector<Recompute>> golden_policy_sets(int64_t blocks) {
  std::vector<std::vector<Recompute>> sets = {
      {Recompute::kNone}, {Recompute::kModule}, {Recompute::kBlock}};
  if (blocks >= 2) {
    std::vector<Recompute> mixed(blocks, Recompute::kNone);
    mixed[0] = Recompute::kBlock;
    mixed[1] = Recompute::kModule;
    sets.push_back(mixed);
  }
  return sets;
}

// ||x - ref||_2 / ||ref||_2 over all elements (the bf16 accuracy metric; docs/benchmarks.md).
inline double normwise_err(const Tensor& x, const Tensor& ref) {
  const Tensor a = x.to(DType::F64), b = ref.to(DType::F64);
  if (a.numel() != b.numel()) return std::numeric_limits<double>::infinity();
  double num = 0, den = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double d = a.data<double>()[i] - b.data<double>()[i];
    num += d * d;
    den += b.data<double>()[i] * b.data<double>()[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// ||x||_2 in double precision.
inline double norm2(const Tensor& x) {
  const Tensor a = x.to(DType::F64);
  double ss = 0;
  for (int64_t i = 0; i < a.numel(); ++i) ss += a.data<double>()[i] * a.data<double>()[i];
  return std::sqrt(ss);
}

// A reference gradient that is zero to rounding: a LayerNorm bias whose effect a softmax
// cancels (msa_att_row.layer_norm_z.bias: a constant added to every logit of a row).
inline bool zero_to_rounding(const Tensor& ref) { return norm2(ref) < 1e-6; }

// The reference whose norm scales a zero-to-rounding gradient's noise: the same LayerNorm's
// weight gradient, a sum over the same rows that does not cancel ("....bias" -> "....weight";
// the name itself when it does not end in "bias").
inline std::string noise_scale_name(const std::string& name) {
  const std::string suffix = "bias";
  if (name.size() < suffix.size() || name.compare(name.size() - 4, 4, suffix) != 0) return name;
  return name.substr(0, name.size() - 4) + "weight";
}

// The normwise error of a parameter gradient. Where the reference is zero to rounding there is
// no relative error: the computed gradient is summation noise, measured as ||x|| / ||scale||
// (scale: the reference named by noise_scale_name), so the metric does not depend on the
// gradient's units or on which kernels a machine's oneDNN picks.
inline double param_grad_err(const Tensor& x, const Tensor& ref, const Tensor& scale) {
  if (!zero_to_rounding(ref)) return normwise_err(x.contiguous(), ref.contiguous());
  const double s = norm2(scale);
  return s < 1e-6 ? norm2(x) : norm2(x) / s;
}

inline double golden_err(const Tensor& x, const Tensor& ref) {
  Tensor a = x.to(DType::F64), b = ref.to(DType::F64);
  const double* pa = a.data<double>();  // [numel]
  const double* pb = b.data<double>();  // [numel]
  if (a.numel() != b.numel()) return std::numeric_limits<double>::infinity();
  double ss = 0, mx = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    if (!std::isfinite(pa[i]) || !std::isfinite(pb[i]))
      return std::numeric_limits<double>::infinity();
    ss += pb[i] * pb[i];
    mx = std::max(mx, std::abs(pa[i] - pb[i]));
  }
  const double rms = std::sqrt(ss / std::max<int64_t>(b.numel(), 1));
  return mx / std::max(rms, 1.0);
}

// The golden metric over the positions where keep [numel / c] is 1 (c trailing channels per
// position): padded tokens have precision-dependent values (README "Masks"). +Inf on a
// non-finite compared value or mismatched sizes.
inline double masked_err(const Tensor& x, const Tensor& ref, const Tensor& keep) {
  Tensor a = x.to(DType::F64), b = ref.to(DType::F64), k = keep.to(DType::F64);
  if (a.numel() != b.numel() || b.numel() % k.numel() != 0)
    return std::numeric_limits<double>::infinity();
  const int64_t c = b.numel() / k.numel();
  const double* pa = a.data<double>();  // [numel]
  const double* pb = b.data<double>();  // [numel]
  const double* pk = k.data<double>();  // [numel / c]
  double ss = 0, mx = 0;
  int64_t cnt = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    if (pk[i / c] == 0) continue;
    if (!std::isfinite(pa[i])) return std::numeric_limits<double>::infinity();
    ss += pb[i] * pb[i];
    mx = std::max(mx, std::abs(pa[i] - pb[i]));
    ++cnt;
  }
  return mx / std::max(std::sqrt(ss / std::max<int64_t>(cnt, 1)), 1.0);
}

// max |a - b| over n elements; +Inf when either side holds a non-finite value.
template <typename T>
double max_abs_diff(const T* a, const T* b, int64_t n) {
  double mx = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) return std::numeric_limits<double>::infinity();
    mx = std::max(mx, std::abs(x - y));
  }
  return mx;
}

// A fresh directory (mkdtemp under GoogleTest's temp dir) removed with everything in it when the
// object dies: two suites (or two ctest processes) running at once never share a file name.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "/foldcube_XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) {
      std::fprintf(stderr, "mkdtemp(%s) failed\n", tmpl.c_str());
      std::abort();
    }
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A path in this test process's own temp directory (created on first use, removed at exit).
inline std::string temp_file(const std::string& name) {
  static const TempDir dir;
  return dir.file(name);
}

// Wall-time limits in the tests are multiplied by this: sanitizer builds (ASan/UBSan, detected
// at compile time) run several times slower.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_UNDEFINED__)
#define FOLDCUBE_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(undefined_behavior_sanitizer)
#define FOLDCUBE_TEST_SANITIZED 1
#endif
#endif
#ifdef FOLDCUBE_TEST_SANITIZED
inline constexpr double kTimeScale = 10;
#else
inline constexpr double kTimeScale = 1;
#endif

struct Result {
  int code;
  std::string out;  // stdout + stderr
};

// Runs the foldcube CLI with `args` behind `env_prefix` (e.g. "env -u VAR") and collects its
// exit code and output.
inline Result run_cli_env(const std::string& env_prefix, const std::string& args) {
  const std::string cmd = env_prefix + " " + std::string(cli_path()) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  Result r{-1, ""};
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int st = pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

// Runs the foldcube CLI with `args` and collects its exit code and output.
inline Result run_cli(const std::string& args) { return run_cli_env("", args); }

// `foldcube <args>` on np MPI ranks (np 0: one process without mpirun), under `timeout` (120 s,
// times kTimeScale) so that a hang fails the test instead of blocking the suite.
inline Result run_mpi_cli(int np, const std::string& args) {
  const std::string limit = std::to_string(static_cast<int>(120 * kTimeScale));
  return run_cli_env(
      "timeout " + limit +
          (np > 0 ? " " + std::string(mpiexec()) + " -np " + std::to_string(np) + " --oversubscribe"
                  : ""),
      args);
}

}  // namespace fc::test
