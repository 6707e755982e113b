// `foldcube run --model af2`: the whole AlphaFold2 model from a parameter file and a feature file.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "dist/comm_api.h"
#include "exec/af2_dap.h"
#include "foldcube/alphafold.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/parallel.h"
#include "foldcube/plan.h"
#include "foldcube/runtime.h"
#include "foldcube/structure_io.h"

namespace fc::app {
namespace {

// --config: a preset name (model_1 ... model_5[_ptm]) or an OpenFold model config JSON file.
// Without --weights: seeded random parameters of that preset (default model_1_ptm; --blocks
// Evoformer blocks when given). With --weights: the config comes from the parameters; a preset must
// agree with them, a JSON file supplies the counts the shapes do not hold.
// ranks > 1: the stack blocks sharded over that many ranks, this one at `rank`
// (src/exec/af2_dap.h): a parameter file is read and loaded by this rank's share only.
Status load_model(const RunArgs& a, AlphaFold* model, int ranks = 1, int rank = 0) {
  const bool json_file = !a.config.empty() && a.config.find(".json") != std::string::npos;
  AlphaFoldConfig preset = alphafold_model_1_ptm();
  if (!a.config.empty() && !json_file) FC_RETURN_IF_ERROR(alphafold_preset(a.config, &preset));
  if (a.weights.empty()) {
    if (json_file)
      return Status::InvalidArgument("--config " + a.config +
                                     ": a config file needs --weights (random weights take a "
                                     "preset name, e.g. model_3_ptm)");
    AlphaFoldConfig cfg = preset;
    if (a.blocks_given) cfg.evoformer.no_blocks = a.blocks;
    if (ranks == 1) return AlphaFold::load(cfg, AlphaFold::random_weights(cfg, a.seed), model);
    return load_alphafold_shard(
        cfg, AlphaFold::random_weights(cfg, a.seed, dap_weight_filter(ranks, rank)), ranks, rank,
        model);
  }
  TensorFile w;         // safetensors or AlphaFold .npz
  TensorShapes shapes;  // every tensor's, under --dap those of the other ranks' blocks too
  if (ranks > 1) {
    FC_RETURN_IF_ERROR(read_weights(a.weights, &w, dap_weight_filter(ranks, rank), &shapes));
  } else {
    FC_RETURN_IF_ERROR(read_weights(a.weights, &w));
    shapes = shapes_of(w);
  }
  if (json_file) {
    std::ifstream in(a.config);
    if (!in) return Status::NotFound("cannot read --config " + a.config);
    const std::string text((std::istreambuf_iterator<char>(in)), {});
    if (nlohmann::json::parse(text, nullptr, false).is_discarded())
      return Status::InvalidArgument(a.config + ": not valid JSON");
    w.metadata["config"] = shapes.metadata["config"] = text;
  }
  AlphaFoldConfig cfg;
  FC_RETURN_IF_ERROR(alphafold_config_from_shapes(shapes, &cfg));
  if (!a.config.empty() && !json_file &&
      (cfg.templates != preset.templates || cfg.ptm != preset.ptm))
    return Status::InvalidArgument("--config " + a.config + " does not match " + a.weights +
                                   ": the parameters have " + (cfg.templates ? "" : "no ") +
                                   "templates and " + (cfg.ptm ? "a" : "no") + " TM head");
  const Status st =
      ranks > 1 ? load_alphafold_shard(cfg, w, ranks, rank, model) : AlphaFold::load(cfg, w, model);
  return st.WithContext(a.weights);
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

// The Evoformer stack's matmul GFLOP per pass (evoformer_block_flops on its S + T rows: the
// cluster rows and, with templates, the template rows), for the report's GFLOP/s.
double evoformer_gflop_per_pass(const AlphaFoldConfig& cfg, const FeatureDict& feats) {
  AlphaFoldDims d;
  if (!alphafold_dims(cfg, feats, &d).ok()) return 0;
  const int64_t rows = d.S + (cfg.templates ? d.T : 0);
  return evoformer_block_flops(cfg.evoformer, rows, d.r) * cfg.evoformer.no_blocks / 1e9;
}

Status write_report(const RunArgs& a, const std::vector<AlphaFoldStageStat>& stats, double ms,
                    int64_t peak, int64_t base, int64_t budget, const AlphaFoldPlan& plan,
                    double evoformer_gflop) {
  nlohmann::json j;
  j["model"] = "af2";
  j["time_ms"] = ms;
  j["peak_tracked_bytes"] = peak;
  j["base_tracked_bytes"] = base;  // weights and features, live before the forward
  if (budget > 0)
    j["memory_budget"] = {{"budget_bytes", budget},
                          {"predicted_peak_bytes", plan.predicted_peak_bytes},
                          {"peak_stage", plan.peak_stage},
                          {"chunk_target_bytes", plan.chunk_target_bytes},
                          {"pair_block_bytes", plan.pair_block_bytes}};
  j["peak_rss_bytes"] = peak_rss_bytes();
  j["threads"] = num_threads();
  for (const AlphaFoldStageStat& s : stats) {
    nlohmann::json st = {{"pass", s.pass},
                         {"stage", s.stage},
                         {"ms", s.ms},
                         {"entry_tracked_bytes", s.entry_bytes},  // above base_tracked_bytes
                         {"peak_tracked_bytes", s.peak_bytes}};
    if (s.stage == "evoformer" && evoformer_gflop > 0) st["gflop"] = evoformer_gflop;  // matmuls
    j["stages"].push_back(st);
  }
  return write_text_atomic(a.report, j.dump(2) + "\n");
}

// --dp D (data parallelism) needs one protein per group of ranks, and the whole-model run folds
// one feature set: D groups would fold the same protein D times. Refused, not ignored.
Status af2_dp_refused(const RunArgs& a) {
  if (a.dp <= 1) return Status::OK();
  return Status::InvalidArgument(
      "--dp " + std::to_string(a.dp) +
      ": --model af2 folds one feature set per job, so data parallelism has nothing to split; "
      "drop --dp (mpirun -np N ... --dap N shards the one protein over N ranks)");
}

// `--dap N` under `mpirun -np N`: every rank reads the weights and features and runs its shards
// (src/exec/af2_dap.h); rank 0 writes the outputs and the report with every rank's peaks.
Status run_af2_dap_job(const RunArgs& a, const Comm& world) {
  FC_RETURN_IF_ERROR(af2_dp_refused(a));
  FC_RETURN_IF_ERROR(check_dap_ranks(a, world));
  FC_RETURN_IF_ERROR(check_same_flags(a, world, "--dap"));
  AlphaFold model;
  FeatureDict feats;
  // Weight sharding (default under --dap): this rank reads and keeps every N-th stack block.
  const bool sharded = !a.replicate_weights && world.size() > 1;
  Status st = sharded ? load_model(a, &model, world.size(), world.rank()) : load_model(a, &model);
  if (st.ok()) st = load_features(a, &feats);
  FC_RETURN_IF_ERROR(world.agree(st, true));
  AlphaFoldOptions opts;
  opts.chunk = a.chunk;
  if (!a.chunk_target.empty())
    FC_RETURN_IF_ERROR(parse_bytes(a.chunk_target, &opts.chunk_target_bytes));
  opts.passes = a.recycles >= 0 ? a.recycles + 1 : 0;
  opts.recycle_tolerance = a.recycle_tolerance;
  FC_RETURN_IF_ERROR(parse_compute_dtype(a.dtype, &opts.dtype));
  // --memory-budget X per rank: the chunking from the per-rank memory model (every rank's peak,
  // the largest base over the ranks: the same chunking on every rank).
  int64_t budget = 0;
  AlphaFoldPlan plan;
  if (!a.memory_budget.empty()) {
    if (a.chunk > 0 || opts.chunk_target_bytes > 0)
      return Status::InvalidArgument(
          "--memory-budget chooses the chunking itself: drop --chunk / --chunk-target");
    FC_RETURN_IF_ERROR(parse_bytes(a.memory_budget, &budget));
    AlphaFoldDims dims;
    FC_RETURN_IF_ERROR(alphafold_dims(model.config(), feats, &dims).WithContext(a.features));
    if (opts.passes > 0) dims.passes = std::min(dims.passes, opts.passes);
    const std::vector<int64_t> bases = world.all_gather_i64(mem_stats().live_bytes);
    const int64_t base = *std::max_element(bases.begin(), bases.end());
    if (budget <= base)
      return Status::InvalidArgument("memory budget " + a.memory_budget +
                                     " per rank is below the weights and features every rank "
                                     "holds (" +
                                     std::to_string(base) + " bytes)");
    FC_RETURN_IF_ERROR(plan_alphafold_dap(model.config(), dims, bases, budget, num_threads(), &plan,
                                          opts.dtype, sharded));
    opts.chunk_target_bytes = plan.chunk_target_bytes;
    opts.pair_block_bytes = plan.pair_block_bytes;
  }
  std::vector<AlphaFoldStageStat> stats;
  opts.stats = &stats;
  AlphaFoldDapOutputs outs;
  AlphaFoldDapStats ds;
  const int64_t base = mem_stats().live_bytes;
  const dist::Communicator& comm = CommAccess::get(world);
  const auto t0 = std::chrono::steady_clock::now();
  st = alphafold_dap_forward(model, comm, feats, &outs, opts, &ds);
  FC_RETURN_IF_ERROR(world.agree(st.WithContext(a.features), true));
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  int64_t write_peak = 0;  // tracked peak while the outputs are written (absolute)
  if (!a.out.empty())
    FC_RETURN_IF_ERROR(
        world.agree(write_alphafold_dap_outputs(a.out, {{"format", "foldcube-af2-output/1"}}, outs,
                                                comm, &write_peak),
                    true));
  const std::map<std::string, Tensor>& out = outs.whole;
  // This rank's forward peak from the per-rank memory model, for the passes that ran (an early
  // stop ends like a run of that many passes); 0 when the model does not apply.
  int64_t predicted = 0;
  {
    AlphaFoldDims dims;
    AlphaFoldMemory mem;
    if (alphafold_dims(model.config(), feats, &dims).ok()) {
      dims.passes = static_cast<int>(out.at("num_recycles").data<int64_t>()[0]);
      if (alphafold_dap_forward_memory(model.config(), dims, opts, num_threads(), world.size(),
                                       world.rank(), &mem, sharded)
              .ok())
        predicted = base + mem.peak_bytes;
    }
  }
  const std::vector<int64_t> peaks = world.all_gather_i64(ds.forward_peak_bytes);
  const std::vector<int64_t> bases = world.all_gather_i64(base);
  const std::vector<int64_t> shards = world.all_gather_i64(ds.shard_bytes);
  const std::vector<int64_t> out_peaks = world.all_gather_i64(write_peak);
  const std::vector<int64_t> sent = world.all_gather_i64(ds.comm.total_bytes());
  const std::vector<int64_t> predicted_peaks = world.all_gather_i64(predicted);
  if (world.rank() == 0) {
    if (st.ok() && !a.quiet) {
      print_summary(a, out, stats, ms, peaks[0]);
      std::printf("  DAP over %d ranks; forward tracked peak per rank (MiB):", a.dap);
      for (int64_t p : peaks) std::printf(" %.1f", p / 1048576.0);
      if (predicted_peaks[0] > 0) {
        std::printf("\n  memory model, forward peak per rank (MiB):");
        for (int64_t p : predicted_peaks) std::printf(" %.1f", p / 1048576.0);
        bool exact = true;
        for (size_t i = 0; i < peaks.size(); ++i) exact = exact && peaks[i] == predicted_peaks[i];
        std::printf(exact ? " (= measured, to the byte)" : " (differs from measured)");
      }
      std::printf("\n  shards of m+z per rank (MiB):");
      for (int64_t b : shards) std::printf(" %.1f", b / 1048576.0);
      if (!a.out.empty()) {
        std::printf("\n  writing the outputs, tracked peak per rank (MiB):");
        for (int64_t p : out_peaks) std::printf(" %.1f", p / 1048576.0);
      }
      std::printf("\n");
      if (budget > 0)
        std::printf("  memory budget %.1f MiB per rank: largest rank peak %.1f MiB\n",
                    budget / 1048576.0, *std::max_element(peaks.begin(), peaks.end()) / 1048576.0);
    }
    if (st.ok() && !a.report.empty()) {
      nlohmann::json j;
      j["model"] = "af2";
      j["dap"] = a.dap;
      j["sharded_weights"] = sharded;
      j["time_ms"] = ms;
      j["rank_forward_peak_tracked_bytes"] = peaks;  // absolute, during the forward
      if (predicted_peaks[0] > 0)                    // the per-rank memory model's, absolute
        j["rank_predicted_forward_peak_bytes"] = predicted_peaks;
      j["rank_base_tracked_bytes"] = bases;           // weights and features on each rank
      j["rank_shard_bytes"] = shards;                 // the Evoformer's shards of m and z
      j["rank_output_write_peak_bytes"] = out_peaks;  // absolute, while writing --out
      j["rank_sent_bytes"] = sent;
      if (budget > 0)
        j["memory_budget"] = {{"budget_bytes_per_rank", budget},
                              {"chunk_target_bytes", opts.chunk_target_bytes},
                              {"pair_block_bytes", opts.pair_block_bytes}};
      j["threads"] = num_threads();
      for (const AlphaFoldStageStat& s : stats)  // rank 0's
        j["stages"].push_back({{"pass", s.pass},
                               {"stage", s.stage},
                               {"ms", s.ms},
                               {"entry_tracked_bytes", s.entry_bytes},
                               {"peak_tracked_bytes", s.peak_bytes}});
      st = write_text_atomic(a.report, j.dump(2) + "\n");
    }
  }
  return world.agree(st, true);
}

int run_af2_dap(const RunArgs& a) {
  if (const Status st = start_dap_mpi(a); !st.ok()) return fail(st);
  const Comm world = Comm::world();
  return end_mpi(world, run_af2_dap_job(a, world));
}

}  // namespace

int run_af2(const RunArgs& a) {
  set_num_threads(a.threads);
  if (a.backward || a.train || !a.plan.empty())
    return fail(Status::InvalidArgument(
        "--model af2 runs inference; --plan and training are not supported for the whole model "
        "yet"));
  if (a.dap > 0 || mpi_launched_world_size() > 1) return run_af2_dap(a);
  if (const Status st = af2_dp_refused(a); !st.ok()) return fail(st);
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
  if (Status st = parse_compute_dtype(a.dtype, &opts.dtype); !st.ok()) return fail(st);
  // --memory-budget: the stacks' chunking and the pair blocks from the whole-model memory model,
  // refused before any work when no chunking fits.
  AlphaFoldPlan plan;
  int64_t budget = 0;
  if (!a.memory_budget.empty()) {
    if (a.chunk > 0 || chunk_target > 0)
      return fail(
          Status::InvalidArgument("--memory-budget chooses the chunking itself: drop "
                                  "--chunk / --chunk-target"));
    if (Status st = parse_bytes(a.memory_budget, &budget); !st.ok()) return fail(st);
    AlphaFoldDims dims;
    if (Status st = alphafold_dims(model.config(), feats, &dims); !st.ok())
      return fail(st.WithContext(a.features));
    if (opts.passes > 0) dims.passes = std::min(dims.passes, opts.passes);
    if (Status st = plan_alphafold(model.config(), dims, mem_stats().live_bytes, budget,
                                   num_threads(), &plan, opts.dtype);
        !st.ok())
      return fail(st);
    opts.chunk_target_bytes = plan.chunk_target_bytes;
    opts.pair_block_bytes = plan.pair_block_bytes;
  }
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
  if (budget > 0 && !a.quiet)
    std::printf("memory budget %.1f MiB: predicted peak %.1f MiB (at the %s), measured %.1f MiB\n",
                budget / 1048576.0, plan.predicted_peak_bytes / 1048576.0, plan.peak_stage.c_str(),
                peak / 1048576.0);
  if (!a.out.empty()) {
    TensorFile f;
    f.metadata["format"] = "foldcube-af2-output/1";
    for (const auto& [name, t] : out) f.put("output." + name, t);
    if (Status st = write_safetensors(a.out, f); !st.ok()) return fail(st);
  }
  if (!a.quiet) print_summary(a, out, stats, ms, peak);
  if (!a.report.empty())
    if (Status st = write_report(a, stats, ms, peak, scope.start_live(), budget, plan,
                                 evoformer_gflop_per_pass(model.config(), feats));
        !st.ok())
      return fail(st);
  return 0;
}

}  // namespace fc::app
