// `foldcube bench`: the Evoformer forward table. Each row runs in a fresh `foldcube run` process
// so that its peak RSS is its own; the SGEMM peak of the same BLAS is measured in this run.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "commands.h"
#include "foldcube/runtime.h"
#include "foldcube/tensor.h"
#include "kernels/kernels.h"

namespace fc::app {

namespace {
std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

// Median SGEMM GFLOP/s at n x n x n through kern::gemm (the engine's own GEMM).
double sgemm_gflops(int64_t n, int repeats) {
  Tensor a = Tensor::full({n, n}, 0.5f), b = Tensor::full({n, n}, 0.25f), c = Tensor::zeros({n, n});
  kern::gemm(false, true, n, n, n, 1.f, a.f32(), n, b.f32(), n, 0.f, c.f32(), n);  // warm-up
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    kern::gemm(false, true, n, n, n, 1.f, a.f32(), n, b.f32(), n, 0.f, c.f32(), n);
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return 2.0 * n * n * n / t[t.size() / 2] / 1e9;
}

std::string self_exe() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "foldcube";
  buf[n] = '\0';
  return buf;
}
}  // namespace

int bench_command(const BenchArgs& a, const std::string&) {
  set_num_threads(a.threads);
  const int threads = num_threads();
  const std::string exe = self_exe();
  const auto shapes = split(a.shapes.empty() ? "128:256,512:256" : a.shapes, ',');
  const auto blocks = split(a.blocks.empty() ? "1,4" : a.blocks, ',');

  const double peak = sgemm_gflops(2048, 5);
  std::printf("foldcube bench: Evoformer forward, AF2 model_1 dims, %d thread(s), fp32\n", threads);
  std::printf("SGEMM n=2048 (oneDNN, same run): %.1f GFLOP/s\n\n", peak);
  std::printf("| s | r | blocks | median ms | GFLOP | GFLOP/s | %% of SGEMM | tracked peak MiB | peak/(m+z) | RSS peak MiB |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  nlohmann::json rows = nlohmann::json::array();
  char tmpl[] = "/tmp/foldcube_benchXXXXXX";
  const int fd = mkstemp(tmpl);
  if (fd < 0) {
    std::fprintf(stderr, "foldcube: error: cannot create a temporary file\n");
    return 1;
  }
  close(fd);
  const std::string report = tmpl;
  for (const std::string& shape : shapes) {
    const auto sr = split(shape, ':');
    if (sr.size() != 2) {
      std::fprintf(stderr, "foldcube: error: bad shape '%s' (want s:r)\n", shape.c_str());
      return 2;
    }
    for (const std::string& nb : blocks) {
      const std::string cmd = "'" + exe + "' run --quiet --s " + sr[0] + " --r " + sr[1] +
                              " --blocks " + nb + " --threads " + std::to_string(threads) +
                              " --warmup 1 --repeats " + std::to_string(a.repeats) +
                              " --report '" + report + "'";
      if (std::system(cmd.c_str()) != 0) {
        std::fprintf(stderr, "foldcube: error: benchmark row failed: %s\n", cmd.c_str());
        return 1;
      }
      std::ifstream f(report);
      nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
      if (j.is_discarded()) {
        std::fprintf(stderr, "foldcube: error: unreadable report from: %s\n", cmd.c_str());
        return 1;
      }
      const double gfs = j["gflops_per_s"].get<double>();
      std::printf("| %s | %s | %s | %.0f | %.0f | %.1f | %.1f %% | %.1f | %.2f | %.1f |\n",
                  sr[0].c_str(), sr[1].c_str(), nb.c_str(), j["time_ms"].get<double>(),
                  j["gflop"].get<double>(), gfs, 100.0 * gfs / peak,
                  j["peak_tracked_bytes"].get<double>() / 1048576.0,
                  j["peak_tracked_bytes"].get<double>() / j["mz_bytes"].get<double>(),
                  j["peak_rss_bytes"].get<double>() / 1048576.0);
      std::fflush(stdout);
      j["sgemm_gflops"] = peak;
      rows.push_back(j);
    }
  }
  std::remove(report.c_str());
  if (!a.out_json.empty()) {
    std::ofstream f(a.out_json);
    f << nlohmann::json{{"sgemm_gflops", peak}, {"threads", threads}, {"rows", rows}}.dump(2) << "\n";
  }
  return 0;
}

}  // namespace fc::app
