// The foldcube CLI subcommands. Each returns the process exit code and prints a one-line
// "foldcube: error: ..." on user errors.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "foldcube/status.h"
#include "foldcube/tensor.h"

namespace CLI {
class App;
}

namespace fc {
class Comm;
}

namespace fc::app {

// `foldcube features` (app/features.cc): registers the subcommand on app; the returned function
// runs it when it was chosen and returns its exit code, else returns -1.
std::function<int()> add_features_command(CLI::App& app);
// `foldcube fold` (app/fold.cc), registered and run the same way.
std::function<int()> add_fold_command(CLI::App& app);
// `foldcube profile fit` (app/profile.cc), registered and run the same way.
std::function<int()> add_profile_command(CLI::App& app);

// Prints "foldcube: error: <message>" to stderr; returns exit code 1 (app/util.cc).
int fail(const Status& st);
// The non-empty items of s between separators.
std::vector<std::string> split(const std::string& s, char sep);

struct RunArgs {
  std::string weights, inputs, config, out, report;
  int64_t s = 128, r = 256, blocks = 2;
  uint64_t seed = 0;
  int threads = 0;  // 0 = OMP default
  int64_t chunk = 0;
  std::string chunk_target;  // automatic chunking aims chunk buffers at this many bytes ("64MiB")
  int repeats = 1;           // timed forward passes; the report gives the median
  int warmup = 0;
  bool quiet = false;
  bool profile = false;        // per-module time breakdown (last timed pass)
  bool unfused = false;        // inference: the unfused reference path (ForwardOptions::fused)
  std::string dtype = "fp32";  // inference GEMM inputs: fp32 | bf16 (ForwardOptions::dtype)
  bool dtype_given = false;    // --dtype was on the command line (run --plan: must match the plan)
  bool backward = false;       // training step: forward + backward
  std::string grad_outputs;    // safetensors with grad.output.m, grad.output.z
  std::string policy;          // recompute policy, one or comma-separated per block
  bool train = false;          // training mode: AF2 dropout on (implies backward)
  std::string stack = "auto";  // evoformer | extra_msa | auto (from the weights' metadata kind)
  std::string memory_budget;   // inference: tracked-peak budget, e.g. "6GiB"
  int dap = 0;                 // Dynamic Axial Parallelism over this many MPI ranks (0 = off)
  int dp = 1;                // data parallelism (training): this many DAP groups, one protein each
  std::string plan;          // "auto" (make_plan under --memory-budget) or a plan JSON file
  std::string plan_profile;  // device profile for --plan (default: this machine's, cached)
  std::string model;         // "" (a stack) or "af2" (the whole AlphaFold2 model)
  std::string features;      // --model af2: safetensors with feature.<name> tensors
  int recycles = -1;         // --model af2: recycling iterations (-1 = as many as the features)
  double recycle_tolerance = 0;    // --model af2: early stop (CA distance change, A); 0 = off
  int64_t extra = 1024;            // --model af2, random features: extra sequences
  int64_t templates = 4;           // --model af2, random features: templates
  bool blocks_given = false;       // --blocks was on the command line
  bool replicate_weights = false;  // --model af2 --dap: every rank holds every stack block
};
int run_command(const RunArgs& a);
// `run --model af2`: the whole AlphaFold2 model (app/run_af2.cc).
int run_af2(const RunArgs& a);
// `run --stack pairformer|msa_module` (or auto with a Boltz state dict): the AF3 trunk stacks
// (app/run_af3.cc).
bool is_af3_run(const RunArgs& a);
int run_af3(const RunArgs& a);
// Hash of every flag: the ranks of an MPI job must agree on all of them (app/run.cc).
uint64_t run_args_hash(const RunArgs& a);
// Checks every rank of an MPI job makes (app/run.cc): the world has the dap x dp ranks the flags
// ask for; every rank was started with the same flags (`job` names the job in the message, e.g.
// "--dap"). Each is a collective: call it on every rank.
Status check_dap_ranks(const RunArgs& a, const Comm& world);
Status check_same_flags(const RunArgs& a, const Comm& world, const char* job);
// `--dap N` jobs under mpirun (app/run.cc): a process an MPI launcher started without --dap is a
// user error; MPI starts when the launcher started several ranks or N > 1.
Status start_dap_mpi(const RunArgs& a);
// Ends an MPI job: rank 0 prints the error (the same on every rank), every rank finalizes; the
// exit code.
int end_mpi(const Comm& world, const Status& st);
// `run --plan`: plans (or loads a plan), runs it, reports estimates beside measurements
// (app/plan.cc).
int run_planned(const RunArgs& a);

struct BenchArgs {
  int threads = 0;
  int repeats = 0;        // timed repeats per row; 0 = default (3, or 1 with --train)
  std::string out_json;   // optional: write all rows as JSON
  std::string shapes;     // "s:r,s:r" (default "128:256,512:256"; "128:256" with --train)
  std::string blocks;     // "1,4" ("2,4" with --train)
  bool train = false;     // training-step table (policies, measured vs predicted memory)
  bool long_seq = false;  // long-sequence table under a memory budget (--shapes lists r values)
  bool chunks = false;    // chunking-overhead table at one shape (--shapes s:r)
  bool dap = false;       // DAP table: one process and mpirun -np N --dap N for N in `ranks`
  std::string ranks;      // "1,2,4"
  bool plan = false;      // planner table: planner vs fixed policies under a forcing budget
  std::string memory;     // --plan: the budget (default: forced from the memory model)
  std::string profile;    // --plan, --modules: device profile JSON (default: this machine's)
  bool modules = false;   // per-module cost model vs measured training step (--shapes s:r)
  std::string targets;    // --modules: training chunk targets, e.g. "1MiB,8MiB,32MiB"
  bool extra = false;     // --modules: the ExtraMSA block (AF2 extra-MSA dims) instead
  std::string dtype = "fp32";  // forward table: `run --dtype` of every row (fp32 | bf16)
};
int bench_command(const BenchArgs& a, const std::string& self_exe);
// `bench --plan` (app/plan.cc); exe runs the rows (`exe run --plan FILE`).
int bench_plan(const BenchArgs& a, const std::string& exe);

struct PlanArgs {
  int64_t s = 128, r = 256, blocks = 48;
  bool train = false;
  int devices = 0;           // 0 = the profile's
  std::string memory;        // per-device limit, e.g. "40GB" (default: the profile's)
  std::string profile;       // profile JSON (default: this machine, calibrated and cached)
  bool calibrate = false;    // re-run the calibration of this machine
  std::string dtype;         // fp32 | bf16 | fp16 (default: the profile's)
  int element_bytes = -1;    // bytes of every device buffer: 0 (engine) | 2 | 4; -1: the profile's
  std::string policy;        // evaluate this recompute policy for every block
  int64_t chunk = 0;         // force items per chunk
  std::string chunk_target;  // force the chunk target, e.g. "32MiB"
  int dap = 0, dp = 0;       // force degrees (0 = search)
  std::string split;         // --split-policy: "auto" = per-layer partitions, else pure DAP
  bool bucket = false;       // pad r to the next bucket
  std::string buckets;       // comma-separated bucket list (implies --bucket)
  std::string config;        // model config JSON (default AF2 model_1)
  std::string cache;         // plan cache directory
  std::string out;           // also write the plan JSON here
  bool json = false;
  bool explain_splits = false;
  std::string stack = "evoformer";  // evoformer | extra_msa (training) | pairformer | msa_module
  std::string weights;              // AF3 stacks: take the dims from this Boltz state dict
};
int plan_command(const PlanArgs& a);
// `plan --stack pairformer|msa_module`: the AF3 stacks' memory plan (app/run_af3.cc).
int plan_af3(const PlanArgs& a);

// "256,512,1024" -> increasing residue buckets; a one-line error naming the bad item.
Status parse_buckets(const std::string& text, std::vector<int64_t>* out);

}  // namespace fc::app
