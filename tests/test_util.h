// Shared helpers for the test suite.
#pragma once

#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "foldcube/config.h"
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

inline std::string data_path(const std::string& name) {
  return std::string(FOLDCUBE_TEST_DATA_DIR) + "/" + name;
}

// The golden README metric: max |x - ref| / max(rms(ref), 1). Shapes must match.
inline double golden_err(const Tensor& x, const Tensor& ref) {
  Tensor a = x.to(DType::F64), b = ref.to(DType::F64);
  const double* pa = a.data<double>();
  const double* pb = b.data<double>();
  double ss = 0, mx = 0;
  for (int64_t i = 0; i < b.numel(); ++i) ss += pb[i] * pb[i];
  for (int64_t i = 0; i < b.numel(); ++i) mx = std::max(mx, std::abs(pa[i] - pb[i]));
  const double rms = std::sqrt(ss / std::max<int64_t>(b.numel(), 1));
  return mx / std::max(rms, 1.0);
}

#ifdef FOLDCUBE_CLI_PATH
struct Result {
  int code;
  std::string out;  // stdout + stderr
};

// Runs the foldcube CLI with `args` and collects its exit code and output.
inline Result run_cli(const std::string& args) {
  const std::string cmd = std::string(FOLDCUBE_CLI_PATH) + " " + args + " 2>&1";
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
#endif

}  // namespace fc::test
