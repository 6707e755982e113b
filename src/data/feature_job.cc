// The whole data stage: files -> raw and model features (foldcube/features.h).
#include <chrono>
#include <nlohmann/json.hpp>

#include "foldcube/features.h"

namespace fc {

Status run_feature_job(const FeatureJob& job, TensorFile* out, double* timings_ms) {
  using clock = std::chrono::steady_clock;
  auto ms = [](clock::time_point a, clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  };
  const FeatureConfig& cfg = job.config;
  if (cfg.max_msa_clusters < 1 || cfg.max_extra_msa < 0 || cfg.max_templates < 0 ||
      cfg.max_recycling_iters < 0)
    return Status::InvalidArgument(
        "feature config: max_msa_clusters must be >= 1; max_extra_msa, max_templates and the "
        "recycle count >= 0");
  if (cfg.deterministic && !job.decisions.empty())
    return Status::InvalidArgument("--deterministic and --decisions exclude each other");
  const auto t0 = clock::now();
  std::vector<FastaRecord> records;
  FC_RETURN_IF_ERROR(read_fasta(job.fasta, &records));
  if (records.size() != 1)
    return Status::InvalidArgument(job.fasta + ": holds " + std::to_string(records.size()) +
                                   " records; the features command takes one query");
  Msa msa;
  FC_RETURN_IF_ERROR(read_msa(job.msa, &msa));
  const auto t1 = clock::now();
  RawFeatures raw;
  FC_RETURN_IF_ERROR(make_raw_features(records[0], msa, job.msa, &raw));
  const auto t2 = clock::now();
  FeatureDecisions dec;
  if (!job.decisions.empty()) {
    TensorFile dfile;
    FC_RETURN_IF_ERROR(read_safetensors(job.decisions, &dfile));
    Status st = decisions_from_tensors(dfile, raw, cfg, &dec);
    if (!st.ok()) return Status::InvalidArgument(job.decisions + ": " + st.message());
  } else {
    draw_decisions(raw, cfg, job.seed, &dec);
  }
  TensorFile result;
  put_raw_tensors(raw, "raw.", &result);
  FC_RETURN_IF_ERROR(make_model_features(raw, cfg, dec, "feature.", &result));
  const auto t3 = clock::now();
  nlohmann::json config = {
      {"max_msa_clusters", cfg.max_msa_clusters},
      {"max_extra_msa", cfg.max_extra_msa},
      {"max_templates", cfg.max_templates},
      {"max_recycling_iters", cfg.max_recycling_iters},
      {"masked_msa_replace_fraction", cfg.deterministic ? 0.0f : cfg.masked_msa_replace_fraction},
      {"deterministic", cfg.deterministic},
      {"seed", job.seed},
      {"decisions", job.decisions}};
  result.metadata["format"] = "foldcube-features/1";
  result.metadata["config"] = config.dump();
  // OpenFold's string features, as the golden files' raw_strings (descriptions may hold any
  // bytes; invalid UTF-8 is replaced in the JSON).
  const nlohmann::json strings = {{"domain_name", {raw.domain_name}},
                                  {"sequence", {raw.sequence}},
                                  {"msa_species_identifiers", raw.species},
                                  {"template_domain_names", {""}},
                                  {"template_sequence", {""}}};
  result.metadata["raw_strings"] =
      strings.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  result.metadata["num_alignments"] = std::to_string(raw.num_alignments);
  *out = std::move(result);
  if (timings_ms) {
    timings_ms[0] = ms(t0, t1);
    timings_ms[1] = ms(t1, t2);
    timings_ms[2] = ms(t2, t3);
  }
  return Status::OK();
}

}  // namespace fc
