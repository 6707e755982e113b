// `foldcube features`: FASTA + MSA -> raw.* and feature.* tensors (OpenFold's data stage).
#include "foldcube/features.h"

#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>

#include "commands.h"
#include "foldcube/io.h"

namespace fc::app {

namespace {
struct FeaturesArgs {
  FeatureJob job;
  std::string out;
  bool timing = false;
};
}  // namespace

std::function<int()> add_features_command(CLI::App& app) {
  auto a = std::make_shared<FeaturesArgs>();
  CLI::App* cmd = app.add_subcommand(
      "features",
      "OpenFold's AlphaFold2 input features (predict mode): raw.<name> and feature.<name> from a "
      "one-record FASTA and an A3M or Stockholm MSA");
  cmd->add_option("--fasta", a->job.fasta, "query FASTA (one record)")->required();
  cmd->add_option("--msa", a->job.msa, "MSA: .a3m (A3M) or .sto (Stockholm); row 0 = the query")
      ->required();
  cmd->add_option("--out", a->out, "write the features here (safetensors, atomic)")->required();
  cmd->add_option("--max-msa-clusters", a->job.config.max_msa_clusters,
                  "cluster centres (default 512, model_1)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  cmd->add_option("--max-extra-msa", a->job.config.max_extra_msa, "extra MSA rows (default 5120)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 24));
  cmd->add_option("--max-templates", a->job.config.max_templates, "template slots (default 4)")
      ->check(CLI::Range(int64_t{0}, int64_t{1024}));
  cmd->add_option("--recycles", a->job.config.max_recycling_iters,
                  "recycling iterations: R = N + 1 feature slices (default 3)")
      ->check(CLI::Range(int64_t{0}, int64_t{64}));
  cmd->add_option("--seed", a->job.seed, "seed of the random transforms (default 0)");
  cmd->add_flag("--deterministic", a->job.config.deterministic,
                "no masked-MSA replacement, MSA and extra-MSA rows in file order");
  cmd->add_option("--decisions", a->job.decisions,
                  "take the random decisions from this file's random.* tensors");
  cmd->add_flag("--timing", a->timing, "print the time of each stage");
  return [cmd, a]() -> int {
    if (!*cmd) return -1;
    double t[3];
    TensorFile f;
    Status st = run_feature_job(a->job, &f, t);
    if (!st.ok()) return fail(st);
    st = write_safetensors(a->out, f);
    if (!st.ok()) return fail(st);
    if (a->timing)
      std::printf("features: parse %.1f ms, raw %.1f ms, model %.1f ms\n", t[0], t[1], t[2]);
    return 0;
  };
}

}  // namespace fc::app
