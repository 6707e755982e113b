// The folding pipeline (include/foldcube/fold.h).
#include "foldcube/fold.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "foldcube/alphafold.h"
#include "foldcube/features.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/planner.h"
#include "foldcube/plots.h"
#include "foldcube/runtime.h"
#include "foldcube/structure_io.h"

namespace fc {
namespace {

namespace fs = std::filesystem;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// 64-bit FNV-1a, chained: the feature cache key.
uint64_t fnv(uint64_t h, std::string_view bytes) {
  for (unsigned char c : bytes) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

Status read_bytes(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Status::IOError("cannot open " + path);
  std::ostringstream s;
  s << f.rdbuf();
  if (f.bad()) return Status::IOError("cannot read " + path);
  *out = s.str();
  return Status::OK();
}

// A job name from a FASTA description: its first word with unsafe characters replaced.
std::string job_name(const std::string& description, size_t index) {
  std::string w = description.substr(0, description.find_first_of(" \t"));
  for (char& c : w)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '-' && c != '.') c = '_';
  if (w.empty() || w == "." || w == "..") w = "job" + std::to_string(index + 1);
  return w.substr(0, 100);
}

// AlphaFold2 monomer feature settings of a model (model_1/2 use templates; model_2 and model_5
// crop the extra MSA to 1024 rows).
FeatureConfig feature_config(const std::string& model, int recycles) {
  FeatureConfig c;
  const bool small_extra = model.rfind("model_2", 0) == 0 || model.rfind("model_5", 0) == 0;
  c.max_extra_msa = small_extra ? 1024 : 5120;
  c.max_recycling_iters = recycles;
  return c;
}

std::string config_text(const FeatureConfig& c, uint64_t seed) {
  return std::to_string(c.max_msa_clusters) + "/" + std::to_string(c.max_extra_msa) + "/" +
         std::to_string(c.max_templates) + "/" + std::to_string(c.max_recycling_iters) + "/" +
         std::to_string(c.masked_msa_replace_fraction) + "/" + std::to_string(c.deterministic) +
         "/" + std::to_string(seed);
}

struct Job {
  std::string name;
  FastaRecord query;
  std::string msa_path;  // empty: single sequence
};

Status make_jobs(const FoldOptions& o, std::vector<Job>* jobs) {
  std::vector<FastaRecord> records;
  FC_RETURN_IF_ERROR(read_fasta(o.fasta, &records));
  const bool msa_dir = !o.msa.empty() && fs::is_directory(o.msa);
  if (records.size() > 1 && !o.msa.empty() && !msa_dir)
    return Status::InvalidArgument(o.fasta + " holds " + std::to_string(records.size()) +
                                   " records: --msa must be a directory of <name>.a3m|.sto");
  std::map<std::string, int> seen;
  for (size_t i = 0; i < records.size(); ++i) {
    Job j;
    j.name = job_name(records[i].description, i);
    if (seen[j.name]++) j.name += "_" + std::to_string(seen[j.name]);
    j.query = records[i];
    if (msa_dir) {
      for (const char* ext : {".a3m", ".sto", ".stockholm"})
        if (fs::exists(fs::path(o.msa) / (j.name + ext)))
          j.msa_path = (fs::path(o.msa) / (j.name + ext)).string();
      if (j.msa_path.empty())
        return Status::NotFound(o.msa + ": no " + j.name + ".a3m or .sto for record '" +
                                records[i].description + "'");
    } else {
      j.msa_path = o.msa;
    }
    jobs->push_back(std::move(j));
  }
  return Status::OK();
}

// raw.* and feature.* of a job, from the cache when an intact entry exists.
Status job_features(const FoldOptions& o, const Job& job, const FeatureConfig& cfg,
                    const std::string& cache_dir, TensorFile* out, bool* from_cache) {
  std::string msa_bytes;
  if (!job.msa_path.empty()) FC_RETURN_IF_ERROR(read_bytes(job.msa_path, &msa_bytes));
  uint64_t key = fnv(0xcbf29ce484222325ull, "foldcube-features/1");
  key = fnv(key, job.query.description + "\n" + job.query.sequence + "\n");
  key = fnv(key, msa_bytes);
  key = fnv(key, config_text(cfg, o.seed));
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(key));
  const std::string entry = (fs::path(cache_dir) / (std::string(hex) + ".safetensors")).string();
  *from_cache = false;
  if (fs::exists(entry)) {
    TensorFile cached;
    const Status st = read_safetensors(entry, &cached);
    auto k = cached.metadata.find("cache_key");
    if (st.ok() && k != cached.metadata.end() && k->second == hex && cached.has("feature.aatype") &&
        cached.has("raw.msa")) {
      *out = std::move(cached);
      *from_cache = true;
      return Status::OK();
    }
    std::error_code ec;
    fs::remove(entry, ec);  // corrupt or foreign: rebuilt below, never used
  }
  Msa msa;
  if (job.msa_path.empty()) {
    msa.width = static_cast<int64_t>(job.query.sequence.size());
    msa.descriptions = {job.query.description};
    msa.lines = {1};
    msa.letters = job.query.sequence;
    msa.deletions.assign(job.query.sequence.size(), 0);
  } else {
    const std::string ext = fs::path(job.msa_path).extension().string();
    if (ext == ".sto" || ext == ".stockholm")
      FC_RETURN_IF_ERROR(parse_stockholm(msa_bytes, job.msa_path, &msa));
    else
      FC_RETURN_IF_ERROR(parse_a3m(msa_bytes, job.msa_path, &msa));
  }
  RawFeatures raw;
  FC_RETURN_IF_ERROR(make_raw_features(job.query, msa, job.msa_path, &raw));
  FeatureDecisions dec;
  draw_decisions(raw, cfg, o.seed, &dec);
  TensorFile f;
  put_raw_tensors(raw, "raw.", &f);
  FC_RETURN_IF_ERROR(make_model_features(raw, cfg, dec, "feature.", &f));
  f.metadata["cache_key"] = hex;
  f.metadata["sequence"] = raw.sequence;
  std::error_code ec;
  fs::create_directories(cache_dir, ec);
  if (!ec) FC_RETURN_IF_ERROR(write_safetensors(entry, f));
  *out = std::move(f);
  return Status::OK();
}

// feature.* with trailing rows that are masked in every pass removed (OpenFold pads the MSA to
// max_msa_clusters and the extra MSA to max_extra_msa; masked rows cannot change valid outputs).
FeatureDict trimmed_features(const TensorFile& f) {
  FeatureDict d;
  for (const std::string& n : f.names)
    if (n.rfind("feature.", 0) == 0) d[n.substr(8)] = f.tensors.at(n);
  auto rows_in_use = [&](const char* mask_name) -> int64_t {
    const Tensor& m = d.at(mask_name);  // [rows, r, R]
    const int64_t rows = m.dim(0), per_row = m.numel() / std::max<int64_t>(rows, 1);
    int64_t used = 0;
    for (int64_t s = 0; s < rows; ++s)
      for (int64_t k = 0; k < per_row; ++k)
        if (m.f32()[s * per_row + k] != 0.0f) used = s + 1;
    return used;
  };
  auto trim = [&](std::initializer_list<const char*> names, int64_t keep) {
    for (const char* n : names) {
      auto it = d.find(n);
      if (it != d.end() && it->second.dim(0) > keep)
        it->second = it->second.slice(0, 0, keep).contiguous();
    }
  };
  if (d.count("msa_mask"))
    trim({"msa_feat", "msa_mask", "true_msa", "bert_mask"},
         std::max<int64_t>(1, rows_in_use("msa_mask")));
  if (d.count("extra_msa_mask"))
    trim({"extra_msa", "extra_has_deletion", "extra_deletion_value", "extra_msa_mask"},
         std::max<int64_t>(1, rows_in_use("extra_msa_mask")));
  if (d.count("template_mask")) {
    const Tensor& tm = d.at("template_mask");  // [T, R]
    int64_t used = 0;
    for (int64_t t = 0; t < tm.dim(0); ++t)
      for (int64_t k = 0; k < tm.dim(1); ++k)
        if (tm.f32()[t * tm.dim(1) + k] != 0.0f) used = t + 1;
    if (used == 0) {
      for (auto it = d.begin(); it != d.end();)
        it = it->first.rfind("template_", 0) == 0 ? d.erase(it) : std::next(it);
    } else {
      trim({"template_aatype", "template_all_atom_positions", "template_all_atom_mask",
            "template_mask", "template_pseudo_beta", "template_pseudo_beta_mask",
            "template_torsion_angles_sin_cos", "template_alt_torsion_angles_sin_cos",
            "template_torsion_angles_mask"},
           used);
    }
  }
  return d;
}

Status write_model_outputs(const fs::path& dir, const std::string& model,
                           const std::map<std::string, Tensor>& out, const FeatureDict& feats,
                           FoldModelResult* res) {
  const Tensor& plddt = out.at("plddt");
  const int64_t r = plddt.numel();
  const Tensor& aa = feats.at("aatype");         // [r, R]
  const Tensor& ri = feats.at("residue_index");  // [r, R]
  ProteinStructure p;
  for (int64_t i = 0; i < r; ++i) {
    p.aatype.push_back(aa.data<int64_t>()[i * aa.dim(1)]);
    p.residue_index.push_back(ri.data<int64_t>()[i * ri.dim(1)] + 1);
  }
  const Tensor& x = out.at("final_atom_positions");
  const Tensor& m = out.at("final_atom_mask");
  p.positions.assign(x.f32(), x.f32() + x.numel());
  p.mask.assign(m.f32(), m.f32() + m.numel());
  p.b_factors.assign(plddt.f32(), plddt.f32() + r);
  std::string text;
  FC_RETURN_IF_ERROR(to_pdb(p, &text));
  FC_RETURN_IF_ERROR(write_text_atomic((dir / ("unrelaxed_" + model + ".pdb")).string(), text));
  FC_RETURN_IF_ERROR(to_mmcif(p, model, &text));
  FC_RETURN_IF_ERROR(write_text_atomic((dir / ("unrelaxed_" + model + ".cif")).string(), text));
  double mean = 0;
  for (float v : p.b_factors) mean += v;
  res->mean_plddt = mean / std::max<int64_t>(r, 1);
  std::vector<float> pae;
  float max_pae = 0, ptm = -1;
  if (out.count("predicted_aligned_error")) {
    const Tensor& e = out.at("predicted_aligned_error");
    pae.assign(e.f32(), e.f32() + e.numel());
    max_pae = out.at("max_predicted_aligned_error").f32()[0];
    ptm = out.at("ptm_score").f32()[0];
    res->ptm = ptm;
    FC_RETURN_IF_ERROR(plot_pae((dir / ("pae_" + model + ".png")).string(), pae, r, max_pae));
  }
  return write_text_atomic((dir / ("confidence_" + model + ".json")).string(),
                           confidence_json(p.b_factors, pae, max_pae, ptm));
}

}  // namespace

Status find_parameter_files(const std::string& params, const std::vector<int>& models,
                            std::vector<std::pair<std::string, std::string>>* out) {
  out->clear();
  if (params.empty()) return Status::InvalidArgument("no parameters given (--params)");
  if (!fs::is_directory(params)) {
    if (!fs::exists(params)) return Status::NotFound("parameter file " + params + " not found");
    std::string stem = fs::path(params).stem().string();
    if (stem.rfind("params_", 0) == 0) stem = stem.substr(7);
    out->push_back({stem, params});
    return Status::OK();
  }
  for (int k = 1; k <= 5; ++k) {
    if (!models.empty() && std::find(models.begin(), models.end(), k) == models.end()) continue;
    const std::string base = "model_" + std::to_string(k);
    for (const std::string& name : {base + "_ptm", base})
      for (const char* ext : {".npz", ".safetensors"}) {
        const fs::path p = fs::path(params) / ("params_" + name + ext);
        if (fs::exists(p) &&
            std::none_of(out->begin(), out->end(), [&](auto& e) { return e.first == name; })) {
          out->push_back({name, p.string()});
          goto next_model;
        }
      }
    if (!models.empty())
      return Status::NotFound(params + ": no params_" + base + "[_ptm].npz|.safetensors");
  next_model:;
  }
  if (out->empty()) return Status::NotFound(params + ": no params_model_<k>[_ptm] files");
  return Status::OK();
}

Status fold(const FoldOptions& o, std::vector<FoldJobResult>* results) {
  std::vector<Job> jobs;
  FC_RETURN_IF_ERROR(make_jobs(o, &jobs));
  std::vector<std::pair<std::string, std::string>> params;
  FC_RETURN_IF_ERROR(find_parameter_files(o.params, o.models, &params));
  const std::string cache =
      o.cache_dir.empty() ? (fs::path(o.out_dir) / ".feature_cache").string() : o.cache_dir;
  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  if (ec) return Status::IOError("cannot create " + o.out_dir + ": " + ec.message());
  auto progress = [&](const std::string& stage, const std::string& job, double done,
                      const std::string& msg) {
    if (o.progress) o.progress(stage, job, done, msg);
  };
  const double steps = static_cast<double>(jobs.size() * (params.size() + 1));
  double step = 0;
  results->clear();
  for (const Job& job : jobs) {
    FoldJobResult jr;
    jr.name = job.name;
    const fs::path dir = fs::path(o.out_dir) / job.name;
    fs::create_directories(dir, ec);
    if (ec) return Status::IOError("cannot create " + dir.string() + ": " + ec.message());
    std::vector<std::vector<float>> plddts;
    std::vector<std::string> labels;
    std::map<std::string, TensorFile> feature_sets;  // by feature config text
    TensorFile first_features;
    for (const auto& [model, path] : params) {
      const FeatureConfig fc = feature_config(model, o.recycles);
      const std::string key = config_text(fc, o.seed);
      if (!feature_sets.count(key)) {
        progress("features", job.name, step / steps, "building or loading features");
        const auto t0 = std::chrono::steady_clock::now();
        bool cached = false;
        FC_RETURN_IF_ERROR(job_features(o, job, fc, cache, &feature_sets[key], &cached));
        jr.features_from_cache = cached;
        jr.feature_seconds += seconds_since(t0);
        progress("features", job.name, step / steps,
                 cached ? "features from the cache" : "features built and cached");
      }
      ++step;
      const TensorFile& features = feature_sets.at(key);
      if (first_features.names.empty()) first_features = features;
      progress(model, job.name, step / steps, "loading parameters " + path);
      AlphaFold net;
      FC_RETURN_IF_ERROR(load_alphafold(path, &net));
      const AlphaFoldConfig& cfg = net.config();
      const FeatureDict feats = trimmed_features(features);
      AlphaFoldOptions ao;
      ao.chunk = o.chunk;
      ao.recycle_tolerance = o.recycle_tolerance;
      ao.passes = o.recycles + 1;
      ao.dtype = o.dtype;
      // A copy of the binding: clang 14 (fuzz and TSan builds) cannot capture a binding.
      ao.progress = [&, model = model](int pass, const std::string& stage) {
        if (stage == "structure_module")
          progress(model, job.name, step / steps,
                   "recycling pass " + std::to_string(pass + 1) + " of " +
                       std::to_string(o.recycles + 1) + " done");
      };
      if (!o.buckets.empty()) {
        FC_RETURN_IF_ERROR(bucket_residues(feats.at("aatype").dim(0), o.buckets, &ao.pad_to)
                               .WithContext(job.name));
      }
      if (o.memory_budget_bytes > 0) {
        // Chunking from the whole-model memory model; refused before the model runs.
        AlphaFoldDims dims;
        FC_RETURN_IF_ERROR(alphafold_dims(cfg, feats, &dims));
        dims.passes = std::min(dims.passes, ao.passes);
        if (ao.pad_to > dims.r) {
          dims.r_features = dims.r;
          dims.r = ao.pad_to;
        }
        AlphaFoldPlan plan;
        FC_RETURN_IF_ERROR(plan_alphafold(cfg, dims, mem_stats().live_bytes, o.memory_budget_bytes,
                                          num_threads(), &plan, ao.dtype)
                               .WithContext(job.name + " " + model));
        ao.chunk_target_bytes = plan.chunk_target_bytes;
        ao.pair_block_bytes = plan.pair_block_bytes;
      }
      progress(model, job.name, step / steps, "running the model");
      const auto t0 = std::chrono::steady_clock::now();
      std::map<std::string, Tensor> out;
      FC_RETURN_IF_ERROR(net.forward(feats, &out, ao).WithContext(job.name + " " + model));
      FoldModelResult mr;
      mr.model = model;
      mr.seconds = seconds_since(t0);
      FC_RETURN_IF_ERROR(write_model_outputs(dir, model, out, feats, &mr));
      const Tensor& pl = out.at("plddt");
      plddts.emplace_back(pl.f32(), pl.f32() + pl.numel());
      labels.push_back(model);
      jr.models.push_back(mr);
      ++step;
      progress(model, job.name, step / steps, "done");
    }
    // Ranking: by pTM when every model has a TM head, else by mean pLDDT.
    const bool by_ptm = std::all_of(jr.models.begin(), jr.models.end(),
                                    [](const FoldModelResult& m) { return m.ptm >= 0; });
    std::vector<size_t> order(jr.models.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      return by_ptm ? jr.models[a].ptm > jr.models[b].ptm
                    : jr.models[a].mean_plddt > jr.models[b].mean_plddt;
    });
    nlohmann::json rj;
    rj["metric"] = by_ptm ? "ptm" : "mean_plddt";
    for (size_t k = 0; k < order.size(); ++k) {
      FoldModelResult& m = jr.models[order[k]];
      m.rank = static_cast<int>(k + 1);
      rj["order"].push_back(m.model);
      rj["plddts"][m.model] = m.mean_plddt;
      if (m.ptm >= 0) rj["ptms"][m.model] = m.ptm;
      std::string pdb;
      FC_RETURN_IF_ERROR(read_bytes((dir / ("unrelaxed_" + m.model + ".pdb")).string(), &pdb));
      FC_RETURN_IF_ERROR(
          write_text_atomic((dir / ("ranked_" + std::to_string(k) + ".pdb")).string(), pdb));
    }
    FC_RETURN_IF_ERROR(write_text_atomic((dir / "ranking.json").string(), rj.dump(2) + "\n"));
    FC_RETURN_IF_ERROR(plot_plddt((dir / "plddt.png").string(), plddts, labels));
    const Tensor& msa = first_features.tensors.at("raw.msa");  // [S, N] HHblits alphabet, 21 = gap
    std::vector<int8_t> tokens(msa.numel());
    for (int64_t i = 0; i < msa.numel(); ++i)
      tokens[i] = static_cast<int8_t>(msa.dtype() == DType::I64 ? msa.data<int64_t>()[i]
                                                                : msa.data<int32_t>()[i]);
    FC_RETURN_IF_ERROR(
        plot_msa_coverage((dir / "coverage.png").string(), tokens, msa.dim(0), msa.dim(1), 21));
    progress("outputs", job.name, step / steps, "wrote " + dir.string());
    results->push_back(std::move(jr));
  }
  return Status::OK();
}

}  // namespace fc
