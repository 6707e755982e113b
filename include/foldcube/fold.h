// The folding pipeline: FASTA (+ MSA) in, ranked structures and confidence out. Stages: features
// (OpenFold's data pipeline, cached ahead of time by a hash of the inputs and the feature config),
// the AlphaFold2 model per parameter set, and the outputs a person reads (PDB, mmCIF, confidence
// JSON, PNG plots, ranking). Every output file is written atomically.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "foldcube/status.h"
#include "foldcube/tensor.h"

namespace fc {

struct FoldOptions {
  std::string fasta;        // one or many records; each record is a job
  std::string msa;          // one record: an .a3m/.sto file; many: a directory of <name>.a3m|.sto;
                            // empty: single-sequence mode (the query is the whole MSA)
  std::string params;       // a parameter file (.npz or safetensors) or a directory of
                            // params_model_<k>[_ptm].npz / .safetensors
  std::vector<int> models;  // model numbers 1..5 to run from a directory (empty: every one found)
  std::string out_dir;      // receives <job>/...
  std::string cache_dir;    // feature cache (empty: <out_dir>/.feature_cache)
  int recycles = 3;         // recycling iterations (R = recycles + 1 passes)
  double recycle_tolerance = 0;
  uint64_t seed = 0;
  int64_t chunk = 0;
  // Tracked-memory budget of each model run (weights, features and the forward), 0 = none: the
  // chunking comes from the whole-model memory model (plan_alphafold); a job that cannot fit is
  // refused before its model runs.
  int64_t memory_budget_bytes = 0;
  // Size buckets: when non-empty, each job's residues are padded (masked) up to the smallest
  // bucket that holds them (AlphaFoldOptions::pad_to) and the outputs cropped back.
  std::vector<int64_t> buckets;
  DType dtype = DType::F32;  // AlphaFoldOptions::dtype of every model run (F32 or BF16)
  // Progress lines: stage ("features", "model_1", "outputs"), job name, fraction done (0..1) of
  // the whole run, and a message.
  std::function<void(const std::string& stage, const std::string& job, double done,
                     const std::string& message)>
      progress;
};

struct FoldModelResult {
  std::string model;                // e.g. "model_1_ptm"
  double mean_plddt = 0, ptm = -1;  // ptm < 0: no TM head
  double seconds = 0;
  int rank = 0;  // 1 = best
};

struct FoldJobResult {
  std::string name;
  bool features_from_cache = false;
  double feature_seconds = 0;
  std::vector<FoldModelResult> models;
};

// Runs every job; stops at the first error (outputs already written stay complete).
Status fold(const FoldOptions& opts, std::vector<FoldJobResult>* results);

// The parameter files fold would use: (model name, path), in model order.
Status find_parameter_files(const std::string& params, const std::vector<int>& models,
                            std::vector<std::pair<std::string, std::string>>* out);

}  // namespace fc
