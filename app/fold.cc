// `foldcube fold`: FASTA (+ MSA) and AlphaFold parameters in, ranked structures and confidence out.
#include "foldcube/fold.h"

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <memory>

#include "commands.h"
#include "foldcube/plan.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"

namespace fc::app {
namespace {

struct FoldArgs {
  FoldOptions opts;
  std::string models;  // "1,2,3"
  int threads = 0;
  std::string memory_budget;
  bool bucket = false;
  std::string buckets;
  std::string dtype = "fp32";
};

// A one-line progress bar with the stage and an ETA on a terminal; plain log lines otherwise.
class Progress {
 public:
  Progress() : tty_(::isatty(STDERR_FILENO)), t0_(std::chrono::steady_clock::now()) {}
  ~Progress() {
    if (tty_ && drawn_) std::fprintf(stderr, "\n");
  }
  void update(const std::string& stage, const std::string& job, double done,
              const std::string& msg) {
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    if (!tty_) {
      std::fprintf(stderr, "[%7.1f s] %s %s: %s\n", el, job.c_str(), stage.c_str(), msg.c_str());
      return;
    }
    const int width = 30, filled = static_cast<int>(done * width + 0.5);
    std::string bar(filled, '#');
    bar.resize(width, '.');
    char eta[32] = "--";
    if (done > 0.02) std::snprintf(eta, sizeof(eta), "%.0f s", el / done - el);
    std::fprintf(stderr, "\r\033[K[%s] %3.0f%%  %s %s: %s  (elapsed %.0f s, ETA %s)", bar.c_str(),
                 100 * done, job.c_str(), stage.c_str(), msg.c_str(), el, eta);
    std::fflush(stderr);
    drawn_ = true;
  }

 private:
  bool tty_, drawn_ = false;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace

std::function<int()> add_fold_command(CLI::App& app) {
  auto a = std::make_shared<FoldArgs>();
  CLI::App* cmd = app.add_subcommand(
      "fold",
      "Fold proteins: FASTA (+ A3M/Stockholm MSA) and AlphaFold2 parameters in; per job ranked "
      "PDB/mmCIF files (pLDDT as B-factors), confidence JSON, pLDDT/PAE/coverage plots out");
  cmd->add_option("--fasta", a->opts.fasta, "query FASTA; each record is a job")->required();
  cmd->add_option("--msa", a->opts.msa,
                  "MSA of the query (.a3m or .sto); a directory of <name>.a3m|.sto for several "
                  "records; none: single-sequence mode");
  cmd->add_option("--params", a->opts.params,
                  "directory of params_model_<k>[_ptm].npz (official AlphaFold) or .safetensors "
                  "(OpenFold state dicts), or one such file")
      ->required();
  cmd->add_option("--models", a->models,
                  "models to run from the directory, e.g. 1,2,3 (default all)");
  cmd->add_option("--recycles", a->opts.recycles, "recycling iterations (default 3)")
      ->check(CLI::Range(0, 64));
  cmd->add_option("--recycle-tolerance", a->opts.recycle_tolerance,
                  "stop recycling when the CA distances change by less than this (A; 0 = off)")
      ->check(CLI::Range(0.0, 1e6));
  cmd->add_option("--memory-budget", a->memory_budget,
                  "tracked-memory budget of each model run, e.g. 8GiB: chunking from the "
                  "whole-model memory model; refused before the run when it cannot fit");
  cmd->add_flag("--bucket", a->bucket,
                "pad each protein's residues up to a size bucket (AF3's list: 256, 512, 768, ...) "
                "so one shape serves every protein of the bucket; outputs are cropped back");
  cmd->add_option("--buckets", a->buckets, "comma-separated bucket list (implies --bucket)");
  cmd->add_option("--threads", a->threads, "threads (default: OMP_NUM_THREADS or all cores)")
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--cache", a->opts.cache_dir,
                  "feature cache directory (default OUT/.feature_cache); a second run of the same "
                  "inputs skips the data stage");
  cmd->add_option("--seed", a->opts.seed, "seed of the feature pipeline's random transforms");
  cmd->add_option("--chunk", a->opts.chunk, "force items per chunk in the stacks (0 = automatic)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  cmd->add_option("--dtype", a->dtype,
                  "GEMM inputs of the stacks: fp32 (default) | bf16 (bf16 products, f32 "
                  "accumulation; faster, within the bf16 tolerance of docs/benchmarks.md)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  cmd->add_option("--out", a->opts.out_dir, "output directory")->required();
  return [cmd, a]() -> int {
    if (!*cmd) return -1;
    if (!a->memory_budget.empty())
      if (Status st = parse_bytes(a->memory_budget, &a->opts.memory_budget_bytes); !st.ok())
        return fail(st);
    if (!a->buckets.empty()) {
      if (Status st = parse_buckets(a->buckets, &a->opts.buckets); !st.ok()) return fail(st);
    } else if (a->bucket) {
      a->opts.buckets = default_buckets();
    }
    if (Status st = parse_compute_dtype(a->dtype, &a->opts.dtype); !st.ok()) return fail(st);
    set_num_threads(a->threads);
    for (const std::string& m : split(a->models, ',')) {
      char* end = nullptr;
      const long k = std::strtol(m.c_str(), &end, 10);
      if (*end != '\0' || k < 1 || k > 5)
        return fail(Status::InvalidArgument("--models: '" + m + "' is not a model number 1..5"));
      a->opts.models.push_back(static_cast<int>(k));
    }
    Progress bar;
    a->opts.progress = [&bar](const std::string& stage, const std::string& job, double done,
                              const std::string& msg) { bar.update(stage, job, done, msg); };
    std::vector<FoldJobResult> results;
    const Status st = fold(a->opts, &results);
    a->opts.progress = nullptr;
    if (!st.ok()) return fail(st);
    for (const FoldJobResult& j : results) {
      std::printf("%s: features %.2f s%s\n", j.name.c_str(), j.feature_seconds,
                  j.features_from_cache ? " (cache)" : "");
      for (const FoldModelResult& m : j.models) {
        std::printf("  rank %d  %-14s mean pLDDT %6.2f", m.rank, m.model.c_str(), m.mean_plddt);
        if (m.ptm >= 0) std::printf("  pTM %.4f", m.ptm);
        std::printf("  %.1f s\n", m.seconds);
      }
    }
    std::printf("wrote %s\n", a->opts.out_dir.c_str());
    return 0;
  };
}

}  // namespace fc::app
