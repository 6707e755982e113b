// Device profiles of the planner's cost model: the planner's dtype names, DeviceProfile JSON
// (read, write, validate; user profiles from peaks and efficiencies), the default per-host path
// and load_or_calibrate_profile. The measurements are in calibrate.cc, the time model in
// cost_model.cc. Fields and formulas: docs/planner.md.
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "foldcube/planner.h"
#include "foldcube/runtime.h"
#include "foldcube/tensor.h"
#include "io/io_util.h"
#include "plan/json_int.h"

namespace fc {

namespace {
using json = nlohmann::json;

// Default efficiencies for user profiles that give peaks only (docs/planner.md).
struct Efficiency {
  double gemm = 0.75, bwd = 0.6, batched = 0.6, attention = 0.55, attention_bwd = 0.4, mem = 0.7;
};
}  // namespace

int64_t dtype_bytes(DType dtype) { return static_cast<int64_t>(dtype_size(dtype)); }

const char* plan_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return "fp32";
    case DType::BF16:
      return "bf16";
    case DType::F16:
      return "fp16";
    case DType::F64:
      return "fp64";
    case DType::I64:
    case DType::I32:
      break;  // not a precision
  }
  return "?";
}

Status parse_plan_dtype(const std::string& name, DType* out) {
  for (DType t : {DType::F32, DType::BF16, DType::F16})
    if (name == plan_dtype_name(t)) {
      *out = t;
      return Status::OK();
    }
  return Status::InvalidArgument("unknown dtype '" + name + "' (fp32|bf16|fp16)");
}

Status check_plan_dtype(DType dtype) {
  if (dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16) return Status::OK();
  return Status::InvalidArgument(std::string("unsupported planner dtype '") +
                                 plan_dtype_name(dtype) + "' (fp32|bf16|fp16)");
}

int64_t plan_buffer_bytes(int element_bytes) { return element_bytes > 0 ? element_bytes : 4; }

DType plan_store_dtype(DType dtype, int element_bytes) {
  return element_bytes == 0 && dtype != DType::F32 ? DType::BF16 : DType::F32;
}

Status check_element_bytes(int element_bytes) {
  if (element_bytes == 0 || element_bytes == 2 || element_bytes == 4) return Status::OK();
  return Status::InvalidArgument("element_bytes must be 0 (the engine's layout), 2 or 4, not " +
                                 std::to_string(element_bytes));
}

// ---- Profiles ----------------------------------------------------------------------------------

std::string DeviceProfile::to_json() const {
  json j;
  j["name"] = name;
  j["calibrated"] = calibrated;
  j["devices"] = devices;
  j["threads"] = threads;
  j["memory_bytes"] = memory_bytes;
  j["dtype"] = plan_dtype_name(dtype);
  j["element_bytes"] = element_bytes;
  j["gemm_gflops"] = gemm_gflops;
  j["gemm_half_rows"] = gemm_half_rows;
  j["gemm_half_cols"] = gemm_half_cols;
  j["narrow_gemm"] = narrow_gemm;
  j["gemm_by_rows"] = gemm_by_rows;
  j["gemm_bwd_gflops"] = gemm_bwd_gflops;
  j["gemm_bwd_half_rows"] = gemm_bwd_half_rows;
  j["batched_gflops"] = batched_gflops;
  j["batched_by_rows"] = batched_by_rows;
  j["attention_gflops"] = attention_gflops;
  j["attention_bwd_gflops"] = attention_bwd_gflops;
  j["attention_len_exp"] = attention_len_exp;
  j["attention_score_gps"] = attention_score_gps;
  j["attention_bwd_score_gps"] = attention_bwd_score_gps;
  j["attention_score_passes"] = attention_score_passes;
  j["attention_bwd_score_passes"] = attention_bwd_score_passes;
  j["attention_bias_score_passes"] = attention_bias_score_passes;
  j["attention_bias_bwd_score_passes"] = attention_bias_bwd_score_passes;
  j["mem_gbps"] = mem_gbps;
  j["mem_bwd_gbps"] = mem_bwd_gbps;
  j["stream_gbps"] = stream_gbps;
  j["mem_by_size"] = mem_by_size;
  j["link_gbps"] = link_gbps;
  j["link_latency_us"] = link_latency_us;
  j["link_by_ranks"] = link_by_ranks;
  j["core_share"] = core_share;
  j["collective_a2a_copies"] = collective_a2a_copies;
  j["collective_gather_copies"] = collective_gather_copies;
  j["dap_form"] = dap_form;
  j["train_fwd_factor"] = train_fwd_factor;
  j["train_bwd_factor"] = train_bwd_factor;
  j["chunk_overhead_us"] = chunk_overhead_us;
  j["module_overhead_us"] = module_overhead_us;
  j["module_kernels"] = module_kernels;
  return j.dump(2);
}

Status DeviceProfile::validate() const {
  if (devices < 1) return Status::InvalidArgument("profile: devices must be >= 1");
  if (threads < 1) return Status::InvalidArgument("profile: threads must be >= 1");
  if (memory_bytes < 0) return Status::InvalidArgument("profile: memory_bytes must be >= 0");
  if (!check_plan_dtype(dtype).ok())
    return Status::InvalidArgument(std::string("profile: unknown dtype '") +
                                   plan_dtype_name(dtype) + "' (fp32|bf16|fp16)");
  if (const Status st = check_element_bytes(element_bytes); !st.ok())
    return Status::InvalidArgument("profile: " + st.message());
  const std::pair<const char*, double> rates[] = {{"gemm_gflops", gemm_gflops},
                                                  {"gemm_bwd_gflops", gemm_bwd_gflops},
                                                  {"batched_gflops", batched_gflops},
                                                  {"attention_gflops", attention_gflops},
                                                  {"attention_bwd_gflops", attention_bwd_gflops},
                                                  {"mem_gbps", mem_gbps}};
  for (const auto& [key, v] : rates)
    if (!(v > 0) || !std::isfinite(v))
      return Status::InvalidArgument(std::string("profile: ") + key + " must be > 0");
  if (!(train_fwd_factor > 0) || !(train_bwd_factor > 0) || !std::isfinite(train_fwd_factor) ||
      !std::isfinite(train_bwd_factor))
    return Status::InvalidArgument("profile: train_fwd_factor and train_bwd_factor must be > 0");
  if (!(chunk_overhead_us >= 0) || !std::isfinite(chunk_overhead_us))
    return Status::InvalidArgument("profile: chunk_overhead_us must be >= 0");
  if (!(module_overhead_us >= 0) || !std::isfinite(module_overhead_us))
    return Status::InvalidArgument("profile: module_overhead_us must be >= 0");
  if (!(module_kernels >= 0) || !std::isfinite(module_kernels))
    return Status::InvalidArgument("profile: module_kernels must be >= 0");
  for (const double v :
       {attention_score_gps, attention_bwd_score_gps, attention_score_passes,
        attention_bwd_score_passes, attention_bias_score_passes, attention_bias_bwd_score_passes})
    if (!(v >= 0) || !std::isfinite(v))
      return Status::InvalidArgument(
          "profile: attention_score_gps, attention_bwd_score_gps and the attention score passes "
          "(attention_[bias_][bwd_]score_passes) must be >= 0");
  if (!(collective_a2a_copies >= 0) || !std::isfinite(collective_a2a_copies) ||
      !(collective_gather_copies >= 0) || !std::isfinite(collective_gather_copies))
    return Status::InvalidArgument(
        "profile: collective_a2a_copies and collective_gather_copies must be >= 0");
  if (dap_form != "engine" && dap_form != "pasdap")
    return Status::InvalidArgument("profile: dap_form must be engine or pasdap");
  if (!(mem_bwd_gbps >= 0) || !std::isfinite(mem_bwd_gbps))
    return Status::InvalidArgument("profile: mem_bwd_gbps must be >= 0 (0: mem_gbps)");
  if (!(stream_gbps >= 0) || !std::isfinite(stream_gbps))
    return Status::InvalidArgument("profile: stream_gbps must be >= 0 (0: mem_gbps)");
  if (!(gemm_half_rows >= 0) || !(gemm_bwd_half_rows >= 0) || !(gemm_half_cols >= 0) ||
      !std::isfinite(attention_len_exp) || !(link_gbps >= 0) || !(link_latency_us >= 0))
    return Status::InvalidArgument(
        "profile: gemm_half_rows, link_gbps and link_latency_us must be >= 0");
  if (!(core_share >= 0 && core_share <= 1))
    return Status::InvalidArgument("profile: core_share must be in [0, 1] (0: not shared)");
  if (devices > 1 && link_gbps <= 0)
    return Status::InvalidArgument("profile: link_gbps must be > 0 with more than one device");
  return Status::OK();
}

namespace {
// A calibrated table under `key` (absent: left empty): rows [x >= 1, rate > 0, rate > 0] with x
// strictly ascending.
Status read_table(const json& j, const char* key, std::vector<std::array<double, 3>>* out) {
  if (!j.contains(key)) return Status::OK();
  *out = j[key].get<std::vector<std::array<double, 3>>>();
  for (size_t i = 0; i < out->size(); ++i) {
    const auto& e = (*out)[i];
    if (!(e[0] >= 1 && e[1] > 0 && e[2] > 0) || !std::isfinite(e[0]) || !std::isfinite(e[1]) ||
        !std::isfinite(e[2]) || (i > 0 && !(e[0] > (*out)[i - 1][0])))
      return Status::InvalidArgument(std::string("profile: ") + key +
                                     " rows must be [x >= 1, rate > 0, rate > 0] with x ascending");
  }
  return Status::OK();
}
}  // namespace

Status DeviceProfile::from_json(const std::string& text, DeviceProfile* out) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    return Status::InvalidArgument(std::string("profile: not valid JSON: ") + e.what());
  }
  if (!j.is_object()) return Status::InvalidArgument("profile: expected a JSON object");
  DeviceProfile p;
  try {
    auto num = [&](const char* key, double* v) {
      if (j.contains(key)) *v = j.at(key).get<double>();
    };
    if (j.contains("name")) p.name = j["name"].get<std::string>();
    if (j.contains("calibrated")) p.calibrated = j["calibrated"].get<bool>();
    p.devices = json_int<int>(j, "devices", p.devices);
    p.threads = json_int<int>(j, "threads", p.threads);
    p.memory_bytes = json_int<int64_t>(j, "memory_bytes", p.memory_bytes);
    if (j.contains("memory_gb")) {
      const double gb = j["memory_gb"].get<double>();
      if (!(gb >= 0 && gb < 9e9))  // bytes must fit int64
        return Status::InvalidArgument("profile: memory_gb must be in [0, 9e9)");
      p.memory_bytes = static_cast<int64_t>(gb * 1e9);
    }
    if (j.contains("dtype")) {
      const Status st = parse_plan_dtype(j["dtype"].get<std::string>(), &p.dtype);
      if (!st.ok()) return Status::InvalidArgument("profile: " + st.message());
    }
    p.element_bytes = json_int<int>(j, "element_bytes", p.element_bytes);
    num("gemm_gflops", &p.gemm_gflops);
    num("gemm_half_rows", &p.gemm_half_rows);
    num("gemm_half_cols", &p.gemm_half_cols);
    FC_RETURN_IF_ERROR(read_table(j, "narrow_gemm", &p.narrow_gemm));
    FC_RETURN_IF_ERROR(read_table(j, "gemm_by_rows", &p.gemm_by_rows));
    FC_RETURN_IF_ERROR(read_table(j, "mem_by_size", &p.mem_by_size));
    FC_RETURN_IF_ERROR(read_table(j, "batched_by_rows", &p.batched_by_rows));
    num("gemm_bwd_gflops", &p.gemm_bwd_gflops);
    p.gemm_bwd_half_rows = -1;  // absent: the forward's
    num("gemm_bwd_half_rows", &p.gemm_bwd_half_rows);
    num("batched_gflops", &p.batched_gflops);
    num("attention_gflops", &p.attention_gflops);
    num("attention_bwd_gflops", &p.attention_bwd_gflops);
    num("attention_len_exp", &p.attention_len_exp);
    num("attention_score_gps", &p.attention_score_gps);
    num("attention_bwd_score_gps", &p.attention_bwd_score_gps);
    num("attention_score_passes", &p.attention_score_passes);
    num("attention_bwd_score_passes", &p.attention_bwd_score_passes);
    num("attention_bias_score_passes", &p.attention_bias_score_passes);
    num("attention_bias_bwd_score_passes", &p.attention_bias_bwd_score_passes);
    num("mem_gbps", &p.mem_gbps);
    num("mem_bwd_gbps", &p.mem_bwd_gbps);
    num("stream_gbps", &p.stream_gbps);
    num("link_gbps", &p.link_gbps);
    num("link_latency_us", &p.link_latency_us);
    FC_RETURN_IF_ERROR(read_table(j, "link_by_ranks", &p.link_by_ranks));
    num("core_share", &p.core_share);
    num("collective_a2a_copies", &p.collective_a2a_copies);
    num("collective_gather_copies", &p.collective_gather_copies);
    if (j.contains("dap_form")) p.dap_form = j["dap_form"].get<std::string>();
    num("train_fwd_factor", &p.train_fwd_factor);
    num("train_bwd_factor", &p.train_bwd_factor);
    num("chunk_overhead_us", &p.chunk_overhead_us);
    num("module_overhead_us", &p.module_overhead_us);
    num("module_kernels", &p.module_kernels);
    // A machine we do not have: rates from peaks and efficiencies.
    double peak = 0, bw = 0;
    num("peak_gflops", &peak);
    num("peak_mem_gbps", &bw);
    Efficiency e;
    num("eff_gemm", &e.gemm);
    num("eff_bwd", &e.bwd);
    num("eff_batched", &e.batched);
    num("eff_attention", &e.attention);
    num("eff_attention_bwd", &e.attention_bwd);
    num("eff_mem", &e.mem);
    for (double v : {e.gemm, e.bwd, e.batched, e.attention, e.attention_bwd, e.mem})
      if (!(v > 0 && v <= 1))
        return Status::InvalidArgument("profile: efficiencies (eff_*) must be in (0, 1]");
    if (peak < 0 || bw < 0)
      return Status::InvalidArgument("profile: peak_gflops and peak_mem_gbps must be > 0");
    if (peak > 0) {
      if (p.gemm_gflops == 0) p.gemm_gflops = e.gemm * peak;
      if (p.gemm_bwd_gflops == 0) p.gemm_bwd_gflops = e.bwd * peak;
      if (p.batched_gflops == 0) p.batched_gflops = e.batched * peak;
      if (p.attention_gflops == 0) p.attention_gflops = e.attention * peak;
      if (p.attention_bwd_gflops == 0) p.attention_bwd_gflops = e.attention_bwd * peak;
    }
    if (bw > 0 && p.mem_gbps == 0) p.mem_gbps = e.mem * bw;
    if (p.gemm_bwd_half_rows < 0) p.gemm_bwd_half_rows = p.gemm_half_rows;
    if (p.mem_bwd_gbps == 0) p.mem_bwd_gbps = p.mem_gbps;
    if (p.stream_gbps == 0) p.stream_gbps = p.mem_gbps;
  } catch (const std::exception& e) {
    return Status::InvalidArgument(std::string("profile: bad value: ") + e.what());
  }
  if (p.gemm_gflops == 0)
    return Status::InvalidArgument("profile: give gemm_gflops (calibrated) or peak_gflops");
  if (p.mem_gbps == 0)
    return Status::InvalidArgument("profile: give mem_gbps (calibrated) or peak_mem_gbps");
  FC_RETURN_IF_ERROR(p.validate());
  *out = p;
  return Status::OK();
}

std::string default_profile_path() {
  std::string base;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x != nullptr && *x)
    base = x;
  else if (const char* h = std::getenv("HOME"); h != nullptr && *h)
    base = std::string(h) + "/.cache";
  else
    base = "/tmp";
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  // Rates depend on the thread count, so each count has its own calibration.
  return base + "/foldcube/profile-" + host + "-" + std::to_string(num_threads()) + "t.json";
}

Status load_or_calibrate_profile(const std::string& path, bool recalibrate, DeviceProfile* out) {
  const bool local = path.empty();
  const std::string p = local ? default_profile_path() : path;
  if (!recalibrate) {
    std::ifstream f(p);
    if (f) {
      std::stringstream ss;
      ss << f.rdbuf();
      Status st = DeviceProfile::from_json(ss.str(), out);
      if (!st.ok()) return Status::InvalidArgument(p + ": " + st.message());
      return Status::OK();
    }
    if (!local) return Status::NotFound("profile " + p + " not found");
  }
  // A calibration that did not get its cores (other processes running) measures their load, not
  // the machine (seen: every estimate 10x too slow from a profile calibrated at load 15). It is
  // used for this run, marked in its name, and not cached.
  const auto t0 = std::chrono::steady_clock::now();
  const double cpu0 = process_cpu_ms();
  FC_RETURN_IF_ERROR(calibrate_profile(0, out));
  const double wall_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const double share = (process_cpu_ms() - cpu0) / std::max(wall_ms * out->threads, 1e-9);
  if (local && share < 0.6) {
    char note[96];
    std::snprintf(note, sizeof note, " [busy machine: %.0f %% of %d cores; not cached]",
                  100 * share, out->threads);
    out->name += note;
    return Status::OK();
  }
  return write_profile(p, *out);
}

Status write_profile(const std::string& path, const DeviceProfile& dev) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  const std::string text = dev.to_json() + "\n";
  return io::write_file_atomic(path, [&](std::FILE* f) {
    return std::fwrite(text.data(), 1, text.size(), f) == text.size()
               ? Status::OK()
               : Status::IOError("cannot write profile " + path);
  });
}

}  // namespace fc
