// `foldcube bench`: the Evoformer forward table, or with --train the training-step table per
// recompute policy beside the memory model (include/foldcube/plan.h). Each row runs in a fresh
// `foldcube run` process so that its peak RSS is its own; the SGEMM peak of the same BLAS is
// measured in this run (forward table).
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
#include "foldcube/model.h"
#include "foldcube/plan.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"
#include "foldcube/tensor.h"
#include "kernels/kernels.h"
#include "plan/memory_model.h"

namespace fc::app {

namespace {
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

// A temporary file for the rows' reports (empty on failure).
std::string temp_report() {
  char tmpl[] = "/tmp/foldcube_benchXXXXXX";
  const int fd = mkstemp(tmpl);
  if (fd < 0) {
    std::fprintf(stderr, "foldcube: error: cannot create a temporary file\n");
    return "";
  }
  close(fd);
  return tmpl;
}

// Runs one benchmark row (a `foldcube run ... --report report` command) and reads its report.
bool run_row(const std::string& cmd, const std::string& report, nlohmann::json* j) {
  if (std::system(cmd.c_str()) != 0) {
    std::fprintf(stderr, "foldcube: error: benchmark row failed: %s\n", cmd.c_str());
    return false;
  }
  std::ifstream f(report);
  *j = nlohmann::json::parse(f, nullptr, false);
  if (j->is_discarded()) {
    std::fprintf(stderr, "foldcube: error: unreadable report from: %s\n", cmd.c_str());
    return false;
  }
  return true;
}

// A positive integer list entry ("128", "4"); false (with a message) otherwise.
bool parse_count(const std::string& text, const char* what, int64_t* out) {
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || *end != '\0' || v <= 0) {
    std::fprintf(stderr, "foldcube: error: bad %s '%s' (want a positive integer)\n", what,
                 text.c_str());
    return false;
  }
  *out = v;
  return true;
}

double mib(double bytes) { return bytes / 1048576.0; }

struct TrainPolicy {
  Recompute p;
  const char* label;
  double seeds_fp16_mb;  // seeds' fp16 activation memory, 48 blocks, (s, r) = (128, 256)
};
constexpr TrainPolicy kTrainPolicies[] = {{Recompute::kNone, "none", 0},
                                          {Recompute::kModule, "small (module)", 7462},
                                          {Recompute::kBlock, "large (block)", 2070}};

// One `foldcube run --backward` row per policy at (s, r) and nb blocks, printed beside the memory
// model's predictions; returns the time(block) / time(none) line, or false when a row failed.
bool train_rows(const std::string& exe, const std::string& report, int threads, int repeats,
                const std::vector<std::string>& sr, int64_t s, int64_t r, int64_t nb,
                nlohmann::json* rows, std::string* ratio) {
  const EvoformerConfig cfg;  // AF2 model_1 dims, as `foldcube run` without weights
  double time_none = 0, time_block = 0;
  for (const TrainPolicy& pol : kTrainPolicies) {
    const std::string cmd = "'" + exe + "' run --backward --policy " + recompute_name(pol.p) +
                            " --quiet --s " + sr[0] + " --r " + sr[1] + " --blocks " +
                            std::to_string(nb) + " --threads " + std::to_string(threads) +
                            " --warmup 1 --repeats " + std::to_string(repeats) + " --report '" +
                            report + "'";
    nlohmann::json j;
    if (!run_row(cmd, report, &j)) return false;
    const int64_t pred_peak = stack_step_peak_bytes(cfg, s, r, nb, {pol.p}, threads);
    const int64_t pred_act = stack_activation_bytes(cfg, s, r, nb, {pol.p});
    const double ms = j["time_ms"].get<double>();
    if (pol.p == Recompute::kNone) time_none = ms;
    if (pol.p == Recompute::kBlock) time_block = ms;
    std::printf("| %s | %lld | %.1f | %.1f | %.0f | %.1f | %.1f | %.1f |\n", pol.label,
                static_cast<long long>(nb), mib(j["step_peak_bytes"].get<double>()),
                mib(j["activation_bytes"].get<double>()), ms, mib(pred_peak), mib(pred_act),
                mib(j["peak_rss_bytes"].get<double>()));
    std::fflush(stdout);
    j["predicted_peak_bytes"] = pred_peak;
    j["predicted_activation_bytes"] = pred_act;
    rows->push_back(j);
  }
  char line[160];
  std::snprintf(line, sizeof(line),
                "time(block) / time(none) at %lld block(s): %.2f (%.0f ms / %.0f ms)",
                static_cast<long long>(nb), time_block / time_none, time_block, time_none);
  *ratio = line;
  return true;
}

// The memory model at AF2's 48 blocks in fp32 and fp16 beside the seeds' published fp16
// activation memory (at (128, 256)).
void train_extrapolation(int64_t s, int64_t r, int threads, nlohmann::json* extrapolated) {
  constexpr int64_t kAf2Blocks = 48;
  const EvoformerConfig cfg;
  const bool seeds_shape = s == 128 && r == 256;
  std::printf("\nMemory model extrapolated to %lld blocks, s=%lld r=%lld, %d thread(s)\n\n",
              static_cast<long long>(kAf2Blocks), static_cast<long long>(s),
              static_cast<long long>(r), threads);
  std::printf(
      "| policy | activation fp32 (MB) | peak fp32 (MB) | activation fp16 (MB) | "
      "peak fp16 (MB) | seeds' activation fp16 (MB) |\n");
  std::printf("|---|---|---|---|---|---|\n");
  for (const TrainPolicy& pol : kTrainPolicies) {
    nlohmann::json e = {
        {"s", s}, {"r", r}, {"blocks", kAf2Blocks}, {"policy", recompute_name(pol.p)}};
    std::string seeds = "-";
    if (seeds_shape && pol.seeds_fp16_mb > 0) {
      seeds = std::to_string(static_cast<int>(pol.seeds_fp16_mb));
      e["seeds_activation_fp16_mb"] = pol.seeds_fp16_mb;
    }
    std::printf("| %s |", pol.label);
    for (const int64_t eb : {int64_t{4}, int64_t{2}}) {
      const int64_t act = stack_activation_bytes(cfg, s, r, kAf2Blocks, {pol.p}, eb);
      const int64_t pk = stack_step_peak_bytes(cfg, s, r, kAf2Blocks, {pol.p}, threads, eb);
      std::printf(" %.0f | %.0f |", mib(act), mib(pk));
      const std::string suffix = eb == 4 ? "_fp32" : "_fp16";
      e["activation_bytes" + suffix] = act;
      e["peak_bytes" + suffix] = pk;
    }
    std::printf(" %s |\n", seeds.c_str());
    extrapolated->push_back(e);
  }
}

// `bench --train`: per shape and block count, one `foldcube run --backward` row per recompute
// policy, with the memory model's predictions beside the measurements; then the model at 48
// blocks in fp32 and fp16 next to the seeds' published fp16 activation memory.
int bench_train(const BenchArgs& a, int threads, const std::string& exe,
                const std::string& report) {
  const auto shapes = split(a.shapes.empty() ? "128:256" : a.shapes, ',');
  const auto blocks = split(a.blocks.empty() ? "2,4" : a.blocks, ',');
  const int repeats = a.repeats > 0 ? a.repeats : 1;
  std::printf(
      "foldcube bench --train: Evoformer training step (forward + backward, no dropout), "
      "AF2 model_1 dims, %d thread(s), fp32, one warm-up step then %d timed step(s) per row; MB = "
      "2^20 bytes\n",
      threads, repeats);
  std::printf(
      "peak/activation mem: tracked bytes above weights and inputs (peak: whole step; "
      "activation: kept from forward for backward); predicted: include/foldcube/plan.h\n");
  nlohmann::json rows = nlohmann::json::array(), extrapolated = nlohmann::json::array();
  for (const std::string& shape : shapes) {
    const auto sr = split(shape, ':');
    int64_t s = 0, r = 0;
    if (sr.size() != 2 || !parse_count(sr[0], "s", &s) || !parse_count(sr[1], "r", &r)) {
      std::fprintf(stderr, "foldcube: error: bad shape '%s' (want s:r)\n", shape.c_str());
      return 2;
    }
    std::printf("\ns=%lld r=%lld\n\n", static_cast<long long>(s), static_cast<long long>(r));
    std::printf(
        "| policy | blocks | peak mem (MB) | activation mem (MB) | time (ms) | "
        "predicted peak (MB) | predicted activation (MB) | peak RSS (MB) |\n");
    std::printf("|---|---|---|---|---|---|---|---|\n");
    std::vector<std::string> ratios;
    for (const std::string& nb_text : blocks) {
      int64_t nb = 0;
      if (!parse_count(nb_text, "block count", &nb)) return 2;
      ratios.emplace_back();
      if (!train_rows(exe, report, threads, repeats, sr, s, r, nb, &rows, &ratios.back())) return 1;
    }
    std::printf("\n");
    for (const std::string& line : ratios) std::printf("%s\n", line.c_str());
    train_extrapolation(s, r, threads, &extrapolated);
  }
  if (!a.out_json.empty()) {
    std::ofstream f(a.out_json);
    f << nlohmann::json{{"threads", threads}, {"rows", rows}, {"extrapolated", extrapolated}}.dump(
             2)
      << "\n";
  }
  return 0;
}
}  // namespace

// `bench --long`: one AF2 block at s=128 and growing r, each row under --memory-budget of
// 2.5 x bytes(m+z) plus the weights (the T1044 target), then the largest r whose finest
// plan fits 16 GiB according to the memory model.
int bench_long(const BenchArgs& a, int threads, const std::string& exe, const std::string& report) {
  const EvoformerConfig cfg;
  const int64_t s = 128;
  const auto rs = split(a.shapes.empty() ? "512,1024,2048" : a.shapes, ',');
  std::printf(
      "foldcube bench --long: one Evoformer block, AF2 model_1 dims, s=%lld, %d thread(s), "
      "fp32, budget = 2.5 x bytes(m+z) + weights; MiB = 2^20 bytes\n\n",
      static_cast<long long>(s), threads);
  std::printf(
      "| r | m+z MiB | budget MiB | time ms | tracked peak MiB | predicted MiB | "
      "peak/(m+z) | inference/(m+z) | RSS peak MiB | chunk target MiB |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  const int64_t weights = EvoformerStack::random(
                              [&] {
                                EvoformerConfig c = cfg;
                                c.no_blocks = 1;
                                return c;
                              }(),
                              0)
                              .param_bytes();
  for (const std::string& rtext : rs) {
    const int64_t r = std::atoll(rtext.c_str());
    if (r <= 0) {
      std::fprintf(stderr, "foldcube: error: bad r '%s'\n", rtext.c_str());
      return 2;
    }
    const int64_t mz = (s * r * cfg.c_m + r * r * cfg.c_z) * 4;
    const int64_t budget = mz * 5 / 2 + weights;
    const std::string cmd = "'" + exe + "' run --quiet --s " + std::to_string(s) + " --r " +
                            std::to_string(r) + " --blocks 1 --threads " + std::to_string(threads) +
                            " --memory-budget " + std::to_string(budget) + " --report '" + report +
                            "'";
    nlohmann::json j;
    if (!run_row(cmd, report, &j)) {
      std::printf("| %lld | %.0f | %.0f | does not fit | | | | | | |\n", static_cast<long long>(r),
                  mz / 1048576.0, budget / 1048576.0);
      continue;
    }
    const double peak = j["peak_tracked_bytes"].get<double>();
    std::printf(
        "| %lld | %.0f | %.0f | %.0f | %.1f | %.1f | %.2f | %.2f | %.1f | %.2f |\n",
        static_cast<long long>(r), mz / 1048576.0, budget / 1048576.0, j["time_ms"].get<double>(),
        peak / 1048576.0, j["predicted_peak_bytes"].get<double>() / 1048576.0, peak / mz,
        j["inference_peak_bytes"].get<double>() / mz, j["peak_rss_bytes"].get<double>() / 1048576.0,
        j["chunk_target_bytes"].get<double>() / 1048576.0);
    std::fflush(stdout);
  }
  // Largest r whose finest plan fits 16 GiB (weights, m, z, masks and the forward's own peak).
  const int64_t cap = int64_t{16} << 30;
  auto fits = [&](int64_t r) {
    const int64_t base = weights + (s * r * cfg.c_m + r * r * cfg.c_z) * 4;
    InferencePlan plan;
    return plan_inference(cfg, s, r, false, base, cap, threads, &plan).ok();
  };
  int64_t lo = 1, hi = 1;
  while (fits(hi * 2)) hi *= 2;
  lo = hi;
  hi *= 2;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    (fits(mid) ? lo : hi) = mid;
  }
  std::printf("\nLargest r for one block in a 16 GiB budget (s=%lld, memory model): r = %lld\n",
              static_cast<long long>(s), static_cast<long long>(lo));
  return 0;
}

struct ChunkRow {
  std::string label, flags;
  std::vector<double> times, cpu;  // wall and process CPU ms of every timed pass
  nlohmann::json last;             // the last report; null when the run refused
};

// Unchunked, automatic, budgets of 1.75-2.5 x bytes(m+z) (plus the pristine copy of m and z the
// repeats keep, plus the weights), and forced chunk sizes.
std::vector<ChunkRow> chunk_rows(int64_t mz, int64_t weights) {
  std::vector<ChunkRow> rows = {{"unchunked", "--chunk 1000000000", {}, {}, {}},
                                {"automatic", "", {}, {}, {}}};
  for (double x : {2.5, 2.25, 2.0, 1.875, 1.75}) {
    char label[64];
    std::snprintf(label, sizeof label, "budget %.3g x (m+z)", x);
    // The run keeps a pristine copy of m and z for its repeats: it gets (1 + x) x bytes(m+z).
    rows.push_back(
        {label,
         "--memory-budget " + std::to_string(static_cast<int64_t>((1 + x) * mz) + weights),
         {},
         {},
         {}});
  }
  for (int c : {64, 16, 4})
    rows.push_back({"--chunk " + std::to_string(c), "--chunk " + std::to_string(c), {}, {}, {}});
  return rows;
}

double upper_median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Prints the chunking table; returns its rows as JSON.
nlohmann::json print_chunk_table(const std::vector<ChunkRow>& rows, int64_t mz) {
  const double base = upper_median(rows[0].times), base_cpu = upper_median(rows[0].cpu);
  std::printf(
      "| chunking | time ms | vs unchunked | CPU ms | CPU vs unchunked | tracked peak MiB | "
      "inference/(m+z) | RSS peak MiB | "
      "chunk target MiB | items per chunk (row att s, col att r, tri att r, OPM r, tri-mul c_t) "
      "|\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  nlohmann::json out = nlohmann::json::array();
  for (const ChunkRow& row : rows) {
    if (row.last.is_null() || row.times.empty()) {
      std::printf("| %s | refused (below the smallest feasible budget) | | | | | | | | |\n",
                  row.label.c_str());
      continue;
    }
    const nlohmann::json& j = row.last;
    const double t = upper_median(row.times), cpu = upper_median(row.cpu);
    auto items = [&](const char* module, size_t loop) {
      const auto& loops = j["module_chunks"][module];
      return loops.size() > loop ? loops[loop]["items"].get<int64_t>() : 0;
    };
    std::printf(
        "| %s | %.0f | %.3f | %.0f | %.3f | %.1f | %.2f | %.1f | %.2f | %lld, %lld, %lld, %lld, "
        "%lld |\n",
        row.label.c_str(), t, t / base, cpu, cpu / base_cpu,
        j["peak_tracked_bytes"].get<double>() / 1048576.0,
        j["inference_peak_bytes"].get<double>() / mz, j["peak_rss_bytes"].get<double>() / 1048576.0,
        row.flags.rfind("--chunk ", 0) == 0
            ? 0.0
            : j["chunk_target_bytes_used"].get<double>() / 1048576.0,
        static_cast<long long>(items("msa_att_row", 1)),
        static_cast<long long>(items("msa_att_col", 0)),
        static_cast<long long>(items("tri_att_start", 1)),
        static_cast<long long>(items("outer_product_mean", 1)),
        static_cast<long long>(items("tri_mul_out", 0)));
    nlohmann::json o = j;
    o["label"] = row.label;
    o["median_ms"] = t;
    o["all_times_ms"] = row.times;
    o["median_cpu_ms"] = cpu;
    o["all_cpu_ms"] = row.cpu;
    out.push_back(o);
  }
  return out;
}

// `bench --chunks`: the cost of chunking. One AF2 block at one (s, r) (default 128:256), run
// unchunked (every chunk loop takes its whole axis), with the automatic chunking, under budgets
// of decreasing multiples of bytes(m+z) (plus the weights), and with forced --chunk sizes. Rows
// run in interleaved rounds so that drift on a shared machine hits every row alike; the time is
// the median over all timed repeats of all rounds. Budget rows give the weights, the pristine copy
// of m and z the repeats need, and x times bytes(m+z) for the inference; forced --chunk rows show
// chunk target 0 (unused).
int bench_chunks(const BenchArgs& a, int threads, const std::string& exe,
                 const std::string& report) {
  const auto sr = split(a.shapes.empty() ? "128:256" : a.shapes, ':');
  int64_t s = 0, r = 0;
  if (sr.size() != 2 || !parse_count(sr[0], "s", &s) || !parse_count(sr[1], "r", &r)) {
    std::fprintf(stderr, "foldcube: error: --chunks takes one s:r shape\n");
    return 2;
  }
  const EvoformerConfig cfg;
  EvoformerConfig one = cfg;
  one.no_blocks = 1;
  const int64_t weights = EvoformerStack::random(one, 0).param_bytes();
  const int64_t mz = (s * r * cfg.c_m + r * r * cfg.c_z) * 4;
  std::vector<ChunkRow> rows = chunk_rows(mz, weights);
  const int repeats = a.repeats > 0 ? a.repeats : 3, rounds = 2;
  const double peak = sgemm_gflops(2048, 5);
  std::printf(
      "foldcube bench --chunks: one Evoformer block, AF2 model_1 dims, s=%lld r=%lld, %d "
      "thread(s), fp32; %d rounds x %d repeats per row, interleaved; SGEMM n=2048 (same run) "
      "%.1f GFLOP/s; MiB = 2^20 bytes\n\n",
      static_cast<long long>(s), static_cast<long long>(r), threads, rounds, repeats, peak);
  for (int round = 0; round < rounds; ++round)
    for (ChunkRow& row : rows) {
      const std::string cmd =
          "'" + exe + "' run --quiet --s " + std::to_string(s) + " --r " + std::to_string(r) +
          " --blocks 1 --threads " + std::to_string(threads) + " --warmup 1 --repeats " +
          std::to_string(repeats) + " " + row.flags + " --report '" + report + "'";
      nlohmann::json j;
      if (!run_row(cmd, report, &j)) {
        row.last = nlohmann::json();  // refused: the budget is below the smallest feasible one
        continue;
      }
      for (double t : j["times_ms"]) row.times.push_back(t);
      for (double t : j["cpu_times_ms"]) row.cpu.push_back(t);
      row.last = j;
    }
  const nlohmann::json out = print_chunk_table(rows, mz);
  if (!a.out_json.empty()) {
    std::ofstream f(a.out_json);
    f << nlohmann::json{{"sgemm_gflops", peak}, {"threads", threads}, {"rows", out}}.dump(2)
      << "\n";
  }
  return 0;
}

// One DAP row of `bench --dap` from its report j (the one-process baselines beside it); adds the
// ratio to j.
void print_dap_row(bool train, const std::vector<std::string>& sr, int64_t n, const char* over,
                   int per, double base_act, double base_peak, double base_work,
                   nlohmann::json* jp) {
  const nlohmann::json& j = *jp;
  auto max_of = [](const nlohmann::json& v) {
    double x = 0;
    for (const auto& e : v) x = std::max(x, e.get<double>());
    return x;
  };
  if (train) {
    const double act = max_of(j["rank_activation_bytes"]);
    const double peak = max_of(j["rank_step_peak_bytes"]);
    const double sent = j["forward_sent_bytes_per_rank"].get<double>() +
                        j["backward_sent_bytes_per_rank"].get<double>();
    const double model = j["forward_sent_bytes_per_rank_model"].get<double>() +
                         j["backward_sent_bytes_per_rank_model"].get<double>();
    std::printf(
        "| %s | %s | %lld%s | %d | %.0f | %.1f | %.3f | %.1f | %.3f | %.2f | %.2f | %.2f |\n",
        sr[0].c_str(), sr[1].c_str(), static_cast<long long>(n), over, per,
        j["time_ms"].get<double>(), act / 1048576.0, act / base_act, peak / 1048576.0,
        peak / base_peak, sent / 1048576.0, model / 1048576.0,
        j["grad_all_reduce_bytes_per_rank"].get<double>() / 1048576.0);
    (*jp)["activation_vs_one_process"] = act / base_act;
  } else {
    double other = 0, work = 0;
    const auto& peaks = j["rank_peak_tracked_bytes"];
    const auto& works = j["rank_work_peak_bytes"];
    for (size_t k = 0; k < peaks.size(); ++k) {
      if (k > 0) other = std::max(other, peaks[k].get<double>());
      work = std::max(work, works[k].get<double>());
    }
    std::printf("| %s | %s | %lld%s | %d | %.0f | %.1f | %.1f | %.1f | %.3f | %.2f | %.2f |\n",
                sr[0].c_str(), sr[1].c_str(), static_cast<long long>(n), over, per,
                j["time_ms"].get<double>(), peaks[0].get<double>() / 1048576.0, other / 1048576.0,
                work / 1048576.0, work / base_work,
                j["block_sent_bytes_per_rank"].get<double>() / 1048576.0,
                j["block_sent_bytes_per_rank_model"].get<double>() / 1048576.0);
    (*jp)["work_vs_one_process"] = work / base_work;
  }
}

// `bench --dap [--train]`: the DAP table. One AF2 block at each s:r (default 128:256) in one
// process and under `mpirun -np N ... --dap N` for N in --ranks (default 1,2,4), each rank with
// max(1, threads / N) threads (N above the core count oversubscribes; the table says so).
// Inference: time, tracked peak of rank 0 (which also holds the full inputs and outputs for the
// file I/O) and of the other ranks, the largest work per rank (see below) against the
// one-process inference peak, and bytes each rank sent per block beside dap_block_volume.
// --train (policy none, no dropout): step time, activation bytes and step peak per rank against
// one process, and forward/backward bytes per rank beside the analytic counts.
int bench_dap(const BenchArgs& a, int threads, const std::string& exe, const std::string& report) {
  const auto shapes = split(a.shapes.empty() ? "128:256" : a.shapes, ',');
  const auto ranks = split(a.ranks.empty() ? "1,2,4" : a.ranks, ',');
  const int repeats = a.repeats > 0 ? a.repeats : (a.train ? 1 : 3);
  const long cores = sysconf(_SC_NPROCESSORS_ONLN);
  std::printf(
      "foldcube bench --dap%s: one Evoformer block, AF2 model_1 dims, fp32, %d thread(s) in all, "
      "%ld core(s); median of %d after 1 warm-up; MiB = 2^20 bytes\n\n",
      a.train ? " --train (policy none)" : "", threads, cores, repeats);
  if (a.train)
    std::printf(
        "| s | r | ranks | threads/rank | step ms | activation/rank MiB (max) | vs 1 process | "
        "step peak/rank MiB (max) | vs 1 process | sent fwd+bwd/rank MiB | model MiB | "
        "grad all-reduce MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  else
    std::printf(
        "| s | r | ranks | threads/rank | time ms | rank 0 peak MiB | max other rank peak MiB | "
        "work/rank MiB (max) | work vs 1 process | sent/block/rank MiB | model MiB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n");
  const std::string mode = a.train ? " --backward --policy none" : "";
  nlohmann::json rows = nlohmann::json::array();
  for (const std::string& shape : shapes) {
    const auto sr = split(shape, ':');
    int64_t s = 0, r = 0;
    if (sr.size() != 2 || !parse_count(sr[0], "s", &s) || !parse_count(sr[1], "r", &r)) return 2;
    const std::string common = " run --quiet --s " + sr[0] + " --r " + sr[1] +
                               " --blocks 1 --warmup 1 --repeats " + std::to_string(repeats) +
                               mode + " --report '" + report + "'";
    nlohmann::json one;
    if (!run_row("'" + exe + "'" + common + " --threads " + std::to_string(threads), report, &one))
      return 1;
    // Inference work baseline: the one-process inference peak (m + z + workspace). A DAP rank's
    // work is its tracked peak above weights and inputs; on non-root ranks that includes the
    // shards of m and z, on rank 0 (which holds the full inputs) it does not, so the --dap 1 row
    // shows the workspace only.
    const double base_work = a.train ? 0.0 : one["inference_peak_bytes"].get<double>();
    const double base_act = a.train ? one["activation_bytes"].get<double>() : 0.0;
    const double base_peak = a.train ? one["step_peak_bytes"].get<double>() : 0.0;
    if (a.train)
      std::printf("| %s | %s | 1 (no MPI) | %d | %.0f | %.1f | 1.000 | %.1f | 1.000 | | | |\n",
                  sr[0].c_str(), sr[1].c_str(), threads, one["time_ms"].get<double>(),
                  base_act / 1048576.0, base_peak / 1048576.0);
    else
      std::printf("| %s | %s | 1 (no MPI) | %d | %.0f | %.1f | | %.1f | 1.000 | | |\n",
                  sr[0].c_str(), sr[1].c_str(), threads, one["time_ms"].get<double>(),
                  one["peak_tracked_bytes"].get<double>() / 1048576.0, base_work / 1048576.0);
    std::fflush(stdout);
    one["ranks"] = 0;
    rows.push_back(one);
    for (const std::string& ntext : ranks) {
      int64_t n = 0;
      if (!parse_count(ntext, "rank count", &n)) return 2;
      const int per = std::max<int>(1, threads / static_cast<int>(n));
      const std::string cmd =
          "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_WAIT_POLICY=passive "
          "mpirun --oversubscribe --bind-to none -np " +
          std::to_string(n) + " '" + exe + "'" + common + " --threads " + std::to_string(per) +
          " --dap " + std::to_string(n) + " > /dev/null";
      nlohmann::json j;
      if (!run_row(cmd, report, &j)) return 1;
      const char* over = n * per > cores ? " (oversubscribed)" : "";
      print_dap_row(a.train, sr, n, over, per, base_act, base_peak, base_work, &j);
      std::fflush(stdout);
      j["ranks"] = n;
      j["threads_per_rank"] = per;
      rows.push_back(j);
    }
  }
  if (!a.out_json.empty()) {
    std::ofstream f(a.out_json);
    f << nlohmann::json{{"threads", threads}, {"rows", rows}}.dump(2) << "\n";
  }
  return 0;
}

// `bench --modules`: the cost model per training module against the measured step. For one
// s:r and each training chunk target of --targets, one block, policy none: a fresh `foldcube run
// --backward --profile` (one warm-up, --repeats timed steps) beside block_module_costs on this
// machine's profile (the planner's per-module forward and backward estimates).
int bench_modules(const BenchArgs& a, int threads, const std::string& exe,
                  const std::string& report) {
  const auto sr = split(a.shapes.empty() ? "128:256" : a.shapes, ':');
  int64_t s = 0, r = 0;
  if (sr.size() != 2 || !parse_count(sr[0], "s", &s) || !parse_count(sr[1], "r", &r)) {
    std::fprintf(stderr, "foldcube: error: --modules takes one s:r shape\n");
    return 2;
  }
  std::vector<int64_t> targets;
  for (const std::string& t :
       split(a.targets.empty() ? "1MiB,4MiB,16MiB,64MiB,1GiB" : a.targets, ',')) {
    int64_t b = 0;
    const Status st = parse_bytes(t, &b);
    if (!st.ok() || b <= 0) {
      std::fprintf(stderr, "foldcube: error: bad chunk target '%s' in --targets\n", t.c_str());
      return 2;
    }
    targets.push_back(b);
  }
  DeviceProfile dev;
  const Status st = load_or_calibrate_profile(a.profile, false, &dev);
  if (!st.ok()) {
    std::fprintf(stderr, "foldcube: error: %s\n", st.message().c_str());
    return 1;
  }
  dev.threads = threads;
  EvoformerConfig cfg;
  cfg.no_blocks = 1;
  if (a.extra) {  // AF2's extra-MSA stack, as `foldcube plan --stack extra_msa`
    cfg.c_m = 64;
    cfg.c_hidden_msa_att = 8;
  }
  const int repeats = a.repeats > 0 ? a.repeats : 1;
  std::printf(
      "foldcube bench --modules: one AF2 %s block, training step (policy none), s=%lld r=%lld, "
      "%d thread(s), profile '%s'\n\n",
      a.extra ? "ExtraMSA" : "Evoformer", static_cast<long long>(s), static_cast<long long>(r),
      threads, dev.name.c_str());
  std::printf(
      "| target MiB | module | est. fwd ms | meas. fwd ms | est/meas | est. bwd ms | meas. bwd ms "
      "| est/meas |\n|---|---|---|---|---|---|---|---|\n");
  nlohmann::json rows = nlohmann::json::array();
  for (const int64_t tgt : targets) {
    const std::string cmd =
        "'" + exe + "' run --quiet --backward --profile" + (a.extra ? " --stack extra_msa" : "") +
        " --s " + std::to_string(s) + " --r " + std::to_string(r) + " --blocks 1 --threads " +
        std::to_string(threads) + " --chunk-target " + std::to_string(tgt) +
        " --warmup 1 --repeats " + std::to_string(repeats) + " --report '" + report + "'";
    nlohmann::json j;
    if (!run_row(cmd, report, &j)) return 1;
    const std::vector<ModuleCost> est = block_module_costs(cfg, s, r, 0, tgt, true, dev, a.extra);
    double ef = 0, eb = 0, mf = 0, mb = 0;
    for (const ModuleCost& c : est) {
      const nlohmann::json& m = j["module_ms"][c.name];
      const double f = m["forward"].get<double>(), b = m["backward"].get<double>();
      ef += c.forward_ms, eb += c.backward_ms, mf += f, mb += b;
      std::printf("| %.2f | %s | %.1f | %.1f | %.2f | %.1f | %.1f | %.2f |\n", mib(tgt),
                  c.name.c_str(), c.forward_ms, f, c.forward_ms / f, c.backward_ms, b,
                  c.backward_ms / b);
      rows.push_back({{"target_bytes", tgt},
                      {"module", c.name},
                      {"forward_ms_estimate", c.forward_ms},
                      {"forward_ms", f},
                      {"backward_ms_estimate", c.backward_ms},
                      {"backward_ms", b}});
    }
    std::printf("| %.2f | **modules** | %.1f | %.1f | %.2f | %.1f | %.1f | %.2f |\n", mib(tgt), ef,
                mf, ef / mf, eb, mb, eb / mb);
    std::printf("| %.2f | **step** (measured incl. input copies) | | %.1f | | | %.1f | |\n",
                mib(tgt), j["forward_ms"].get<double>(), j["backward_ms"].get<double>());
    std::fflush(stdout);
  }
  if (!a.out_json.empty()) {
    std::ofstream f(a.out_json);
    f << nlohmann::json{{"threads", threads}, {"profile", dev.name}, {"rows", rows}}.dump(2)
      << "\n";
  }
  return 0;
}

int bench_command(const BenchArgs& a, const std::string&) {
  set_num_threads(a.threads);
  const int threads = num_threads();
  const std::string exe = self_exe();
  if (a.dtype != "fp32" && (a.plan || a.train || a.long_seq || a.chunks || a.dap || a.modules)) {
    std::fprintf(stderr, "foldcube: error: --dtype bf16 applies to the forward table only\n");
    return 2;
  }
  if (a.plan) return bench_plan(a, exe);
  const std::string report = temp_report();
  if (report.empty()) return 1;
  if (a.train || a.long_seq || a.chunks || a.dap || a.modules) {
    const int rc = a.modules    ? bench_modules(a, threads, exe, report)
                   : a.dap      ? bench_dap(a, threads, exe, report)
                   : a.train    ? bench_train(a, threads, exe, report)
                   : a.long_seq ? bench_long(a, threads, exe, report)
                                : bench_chunks(a, threads, exe, report);
    std::remove(report.c_str());
    return rc;
  }
  const auto shapes = split(a.shapes.empty() ? "128:256,512:256" : a.shapes, ',');
  const auto blocks = split(a.blocks.empty() ? "1,4" : a.blocks, ',');
  const int repeats = a.repeats > 0 ? a.repeats : 3;

  const double peak = sgemm_gflops(2048, 5);
  std::printf("foldcube bench: Evoformer forward, AF2 model_1 dims, %d thread(s), %s\n", threads,
              a.dtype == "bf16" ? "bf16 GEMM inputs (fused)" : "fp32");
  std::printf("SGEMM n=2048 (oneDNN, same run): %.1f GFLOP/s\n\n", peak);
  std::printf(
      "| s | r | blocks | median ms | GFLOP | GFLOP/s | %% of SGEMM | tracked peak MiB | "
      "inference peak MiB | inference/(m+z) | RSS peak MiB |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
  nlohmann::json rows = nlohmann::json::array();
  for (const std::string& shape : shapes) {
    const auto sr = split(shape, ':');
    if (sr.size() != 2) {
      std::fprintf(stderr, "foldcube: error: bad shape '%s' (want s:r)\n", shape.c_str());
      return 2;
    }
    for (const std::string& nb : blocks) {
      const std::string cmd = "'" + exe + "' run --quiet --s " + sr[0] + " --r " + sr[1] +
                              " --blocks " + nb + " --threads " + std::to_string(threads) +
                              " --warmup 1 --repeats " + std::to_string(repeats) + " --dtype " +
                              a.dtype + " --report '" + report + "'";
      nlohmann::json j;
      if (!run_row(cmd, report, &j)) return 1;
      const double gfs = j["gflops_per_s"].get<double>();
      std::printf("| %s | %s | %s | %.0f | %.0f | %.1f | %.1f %% | %.1f | %.1f | %.2f | %.1f |\n",
                  sr[0].c_str(), sr[1].c_str(), nb.c_str(), j["time_ms"].get<double>(),
                  j["gflop"].get<double>(), gfs, 100.0 * gfs / peak,
                  j["peak_tracked_bytes"].get<double>() / 1048576.0,
                  j["inference_peak_bytes"].get<double>() / 1048576.0,
                  j["inference_peak_bytes"].get<double>() / j["mz_bytes"].get<double>(),
                  j["peak_rss_bytes"].get<double>() / 1048576.0);
      std::fflush(stdout);
      j["sgemm_gflops"] = peak;
      rows.push_back(j);
    }
  }
  std::remove(report.c_str());
  if (!a.out_json.empty()) {
    std::ofstream f(a.out_json);
    f << nlohmann::json{{"sgemm_gflops", peak}, {"threads", threads}, {"rows", rows}}.dump(2)
      << "\n";
  }
  return 0;
}

}  // namespace fc::app
