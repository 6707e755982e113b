// `foldcube run --model af2`: the whole AlphaFold2 model from a parameter file and a feature file.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "foldcube/alphafold.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/plan.h"
#include "foldcube/runtime.h"

namespace fc::app {
namespace {

// Without --weights: seeded random parameters at model_1_ptm dimensions (--blocks Evoformer blocks
// when given).
Status load_model(const RunArgs& a, AlphaFold* model) {
  if (a.weights.empty()) {
    AlphaFoldConfig cfg = alphafold_model_1_ptm();
    if (a.blocks_given) cfg.evoformer.no_blocks = a.blocks;
    return AlphaFold::load(cfg, AlphaFold::random_weights(cfg, a.seed), model);
  }
  return load_alphafold(a.weights, model);
}

// feature.<name> tensors of the features file, without the prefix.
// Without --features: seeded random features with --r residues, --s clusters, --extra sequences,
// --templates and --recycles + 1 passes (default 3 recycles).
Status load_features(const RunArgs& a, FeatureDict* out) {
  if (a.features.empty()) {
    const int passes = a.recycles >= 0 ? a.recycles + 1 : 4;
    *out = random_alphafold_features(a.r, a.s, a.extra, a.templates, passes, a.seed + 7);
    return Status::OK();
  }
  return read_feature_file(a.features, out);
}

void print_summary(const RunArgs& a, const std::map<std::string, Tensor>& out,
                   const std::vector<AlphaFoldStageStat>& stats, double ms, int64_t peak) {
  const Tensor& plddt = out.at("plddt");
  double mean = 0;
  for (int64_t i = 0; i < plddt.numel(); ++i) mean += plddt.f32()[i];
  mean /= std::max<int64_t>(plddt.numel(), 1);
  std::printf("foldcube run: AlphaFold2, r=%lld, %lld pass(es), %d thread(s)\n",
              static_cast<long long>(plddt.numel()),
              static_cast<long long>(out.at("num_recycles").data<int64_t>()[0]), num_threads());
  std::printf("  time        %10.1f ms\n", ms);
  std::printf("  tracked peak %9.1f MiB\n  peak RSS    %9.1f MiB\n", peak / 1048576.0,
              peak_rss_bytes() / 1048576.0);
  std::printf("  mean pLDDT  %10.2f\n", mean);
  if (out.count("ptm_score")) std::printf("  pTM         %10.4f\n", out.at("ptm_score").f32()[0]);
  std::map<std::string, double> per_stage;
  for (const AlphaFoldStageStat& s : stats) per_stage[s.stage] += s.ms;
  for (const auto& [stage, t] : per_stage) std::printf("    %-20s %9.1f ms\n", stage.c_str(), t);
  if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
}

Status write_report(const RunArgs& a, const std::vector<AlphaFoldStageStat>& stats, double ms,
                    int64_t peak) {
  nlohmann::json j;
  j["model"] = "af2";
  j["time_ms"] = ms;
  j["peak_tracked_bytes"] = peak;
  j["peak_rss_bytes"] = peak_rss_bytes();
  j["threads"] = num_threads();
  for (const AlphaFoldStageStat& s : stats)
    j["stages"].push_back(
        {{"pass", s.pass}, {"stage", s.stage}, {"ms", s.ms}, {"peak_tracked_bytes", s.peak_bytes}});
  std::ofstream f(a.report);
  f << j.dump(2) << "\n";
  if (!f) return Status::IOError("cannot write report " + a.report);
  return Status::OK();
}

}  // namespace

int run_af2(const RunArgs& a) {
  set_num_threads(a.threads);
  if (!a.memory_budget.empty() || a.dap > 0 || a.backward || a.train || !a.plan.empty())
    return fail(Status::InvalidArgument(
        "--model af2 runs inference on one process; --memory-budget, --dap, --plan and training "
        "are not supported for the whole model yet"));
  AlphaFold model;
  if (Status st = load_model(a, &model); !st.ok()) return fail(st);
  FeatureDict feats;
  if (Status st = load_features(a, &feats); !st.ok()) return fail(st);
  int64_t chunk_target = 0;
  if (!a.chunk_target.empty())
    if (Status st = parse_bytes(a.chunk_target, &chunk_target); !st.ok()) return fail(st);
  AlphaFoldOptions opts;
  opts.chunk = a.chunk;
  opts.chunk_target_bytes = chunk_target;
  opts.passes = a.recycles >= 0 ? a.recycles + 1 : 0;
  opts.recycle_tolerance = a.recycle_tolerance;
  std::vector<AlphaFoldStageStat> stats;
  opts.stats = &stats;
  std::map<std::string, Tensor> out;
  MemoryScope scope;
  const auto t0 = std::chrono::steady_clock::now();
  if (Status st = model.forward(feats, &out, opts); !st.ok())
    return fail(st.WithContext(a.features));
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const int64_t peak = scope.peak();
  if (!a.out.empty()) {
    TensorFile f;
    f.metadata["format"] = "foldcube-af2-output/1";
    for (const auto& [name, t] : out) f.put("output." + name, t);
    if (Status st = write_safetensors(a.out, f); !st.ok()) return fail(st);
  }
  if (!a.quiet) print_summary(a, out, stats, ms, peak);
  if (!a.report.empty())
    if (Status st = write_report(a, stats, ms, peak); !st.ok()) return fail(st);
  return 0;
}

}  // namespace fc::app
