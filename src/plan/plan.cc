// The Plan value: JSON round trip, validation, executor options, buckets and the plan cache.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "foldcube/planner.h"
#include "foldcube/tensor.h"
#include "plan/json_int.h"

namespace fc {

namespace {
using json = nlohmann::json;
constexpr int kPlanFormat = 1;
}  // namespace

Status Plan::validate() const {
  FC_RETURN_IF_ERROR(cfg.validate());
  if (s < 1 || r < 1) return Status::InvalidArgument("plan: s and r must be >= 1");
  if (r_real < 1 || r_real > r)
    return Status::InvalidArgument("plan: r_real must be in [1, r] (residues before padding)");
  if (dap < 1 || dp < 1) return Status::InvalidArgument("plan: dap and dp must be >= 1");
  if (threads < 1) return Status::InvalidArgument("plan: threads must be >= 1");
  if (!check_plan_dtype(dtype).ok())
    return Status::InvalidArgument(std::string("plan: unknown dtype '") + plan_dtype_name(dtype) +
                                   "' (fp32|bf16|fp16)");
  if (const Status st = check_element_bytes(element_bytes); !st.ok())
    return Status::InvalidArgument("plan: " + st.message());
  if (chunk < 0 || chunk_target_bytes < 0)
    return Status::InvalidArgument("plan: chunk and chunk_target_bytes must be >= 0");
  if (training && static_cast<int64_t>(policy.size()) != cfg.no_blocks)
    return Status::InvalidArgument("plan: " + std::to_string(policy.size()) +
                                   " recompute policies for " + std::to_string(cfg.no_blocks) +
                                   " blocks");
  if (!training && !policy.empty())
    return Status::InvalidArgument("plan: an inference plan has no recompute policies");
  if (!partitions.empty() && dap < 2)
    return Status::InvalidArgument("plan: 'partitions' need dap >= 2");
  if (!partitions.empty() && partitions.size() != 1 &&
      static_cast<int64_t>(partitions.size()) != cfg.no_blocks)
    return Status::InvalidArgument("plan: " + std::to_string(partitions.size()) +
                                   " partition lists for " + std::to_string(cfg.no_blocks) +
                                   " blocks");
  return Status::OK();
}

std::string Plan::to_json(int indent) const {
  json j;
  j["format"] = kPlanFormat;
  j["config"] = json::parse(cfg.to_json());
  j["s"] = s;
  j["r"] = r;
  j["r_real"] = r_real;
  j["blocks"] = cfg.no_blocks;
  j["training"] = training;
  j["stack"] = extra_msa ? "extra_msa" : "evoformer";
  json pol = json::array();
  for (Recompute p : policy) pol.push_back(recompute_name(p));
  j["policy"] = pol;
  j["chunk"] = chunk;
  j["chunk_target_bytes"] = chunk_target_bytes;
  json mc = json::object();
  for (const auto& [name, n] : module_chunks) mc[name] = n;
  j["module_chunks"] = mc;
  j["dap"] = dap;
  j["dp"] = dp;
  j["dtype"] = plan_dtype_name(dtype);
  j["element_bytes"] = element_bytes;
  j["threads"] = threads;
  j["time_ms_estimate"] = time_ms;
  j["time_per_protein_ms_estimate"] = time_per_protein_ms;
  j["forward_ms_estimate"] = forward_ms;
  j["backward_ms_estimate"] = backward_ms;
  j["recompute_ms_estimate"] = recompute_ms;
  j["comm_ms_estimate"] = comm_ms;
  j["peak_bytes_estimate"] = peak_bytes;
  j["activation_bytes_estimate"] = activation_bytes;
  j["memory_limit_bytes"] = memory_limit_bytes;
  j["fits"] = fits;
  j["search_ms"] = search_ms;
  if (training && dap > 1)  // docs/planner.md
    j["note"] =
        "DAP training: communication volume exact (the executor's formula); per-rank memory an "
        "upper estimate (0-7 % above the measured peak, docs/planner.md), not an exact replay";
  j["profile"] = profile;
  json costs = json::array();
  for (const ModuleCost& c : module_costs)
    costs.push_back(
        {{"module", c.name}, {"forward_ms", c.forward_ms}, {"backward_ms", c.backward_ms}});
  j["module_costs_per_block"] = costs;
  if (!partitions.empty()) {
    json parts = json::array();
    for (const auto& block : partitions) {
      json b = json::array();
      for (const LayerSplit& ls : block)
        b.push_back({{"layer", ls.layer}, {"split", split_name(ls.split)}});
      parts.push_back(b);
    }
    j["partitions"] = parts;
  }
  return j.dump(indent);
}

Status Plan::from_json(const std::string& text, Plan* out) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    return Status::InvalidArgument(std::string("plan: not valid JSON: ") + e.what());
  }
  if (!j.is_object()) return Status::InvalidArgument("plan: expected a JSON object");
  Plan p;
  try {
    if (json_int<int>(j, "format", 0) != kPlanFormat)
      return Status::InvalidArgument("plan: unsupported format (expected " +
                                     std::to_string(kPlanFormat) + ")");
    for (const char* key : {"config", "s", "r", "training", "policy", "dap", "dp", "dtype"})
      if (!j.contains(key))
        return Status::InvalidArgument(std::string("plan: missing '") + key + "'");
    FC_RETURN_IF_ERROR(p.cfg.update_from_json(j["config"].dump()));
    p.s = json_int<int64_t>(j["s"], "s");
    p.r = json_int<int64_t>(j["r"], "r");
    p.r_real = json_int<int64_t>(j, "r_real", p.r);
    if (j.contains("blocks") && json_int<int64_t>(j["blocks"], "blocks") != p.cfg.no_blocks)
      return Status::InvalidArgument("plan: 'blocks' disagrees with config.no_blocks");
    p.training = j["training"].get<bool>();
    {
      const std::string stack = j.value("stack", std::string("evoformer"));
      if (stack != "evoformer" && stack != "extra_msa")
        return Status::InvalidArgument("plan: unknown stack '" + stack + "'");
      p.extra_msa = stack == "extra_msa";
    }
    for (const auto& name : j["policy"]) {
      Recompute rc;
      FC_RETURN_IF_ERROR(parse_recompute(name.get<std::string>(), &rc));
      p.policy.push_back(rc);
    }
    p.chunk = json_int<int64_t>(j, "chunk", 0);
    p.chunk_target_bytes = json_int<int64_t>(j, "chunk_target_bytes", 0);
    if (j.contains("module_chunks"))
      for (const auto& [name, n] : j["module_chunks"].items())
        p.module_chunks.emplace_back(name, json_int<int64_t>(n, "module_chunks"));
    p.dap = json_int<int>(j["dap"], "dap");
    p.dp = json_int<int>(j["dp"], "dp");
    {
      const Status st = parse_plan_dtype(j["dtype"].get<std::string>(), &p.dtype);
      if (!st.ok()) return Status::InvalidArgument("plan: " + st.message());
    }
    p.element_bytes = json_int<int>(j, "element_bytes", 0);
    p.threads = json_int<int>(j, "threads", 1);
    p.time_ms = j.value("time_ms_estimate", 0.0);
    p.time_per_protein_ms = j.value("time_per_protein_ms_estimate", 0.0);
    p.forward_ms = j.value("forward_ms_estimate", 0.0);
    p.backward_ms = j.value("backward_ms_estimate", 0.0);
    p.recompute_ms = j.value("recompute_ms_estimate", 0.0);
    p.comm_ms = j.value("comm_ms_estimate", 0.0);
    p.peak_bytes = json_int<int64_t>(j, "peak_bytes_estimate", 0);
    p.activation_bytes = json_int<int64_t>(j, "activation_bytes_estimate", 0);
    p.memory_limit_bytes = json_int<int64_t>(j, "memory_limit_bytes", 0);
    p.search_ms = j.value("search_ms", 0.0);
    p.fits = j.value("fits", true);
    p.profile = j.value("profile", std::string());
    if (j.contains("module_costs_per_block"))
      for (const auto& c : j["module_costs_per_block"])
        p.module_costs.push_back({c.at("module").get<std::string>(),
                                  c.at("forward_ms").get<double>(),
                                  c.at("backward_ms").get<double>()});
    if (j.contains("partitions"))
      for (const auto& block : j["partitions"]) {
        std::vector<LayerSplit> b;
        for (const auto& e : block) {
          LayerSplit ls;
          ls.layer = e.at("layer").get<std::string>();
          const Status st = parse_split(e.at("split").get<std::string>(), &ls.split);
          if (!st.ok()) return Status::InvalidArgument("plan: " + st.message());
          b.push_back(std::move(ls));
        }
        p.partitions.push_back(std::move(b));
      }
  } catch (const std::exception& e) {
    return Status::InvalidArgument(std::string("plan: bad value: ") + e.what());
  }
  FC_RETURN_IF_ERROR(p.validate());
  *out = std::move(p);
  return Status::OK();
}

ForwardOptions to_forward_options(const Plan& plan) {
  ForwardOptions o;
  o.chunk = plan.chunk;
  o.chunk_target_bytes = plan.chunk_target_bytes;
  o.dtype = plan_store_dtype(plan.dtype, plan.element_bytes);
  return o;
}

TrainOptions to_train_options(const Plan& plan) {
  TrainOptions o;
  o.policy = plan.policy;
  o.chunk = plan.chunk;
  o.chunk_target_bytes = plan.chunk_target_bytes;
  o.dtype = plan_store_dtype(plan.dtype, plan.element_bytes);
  return o;
}

// ---- Buckets -----------------------------------------------------------------------------------

std::vector<int64_t> default_buckets() {
  return {256, 512, 768, 1024, 1280, 1536, 2048, 2560, 3072, 3584, 4096, 4608, 5120};
}

Status bucket_residues(int64_t r, const std::vector<int64_t>& buckets, int64_t* out) {
  if (buckets.empty()) return Status::InvalidArgument("bucket list is empty");
  for (size_t i = 0; i < buckets.size(); ++i)
    if (buckets[i] < 1 || (i > 0 && buckets[i] <= buckets[i - 1]))
      return Status::InvalidArgument("bucket list must be positive and strictly increasing");
  auto it = std::lower_bound(buckets.begin(), buckets.end(), r);
  if (it == buckets.end())
    return Status::InvalidArgument("r=" + std::to_string(r) + " exceeds the largest bucket " +
                                   std::to_string(buckets.back()));
  *out = *it;
  return Status::OK();
}

Status pad_residues(int64_t r_pad, Tensor* m, Tensor* z, Tensor* msa_mask, Tensor* pair_mask) {
  if (m->ndim() != 3 || z->ndim() != 3 || z->dim(0) != m->dim(1) || z->dim(1) != m->dim(1) ||
      m->dtype() != DType::F32 || z->dtype() != DType::F32)
    return Status::InvalidArgument("pad_residues: m [s, r, c_m] and z [r, r, c_z] (F32) expected");
  const int64_t s = m->dim(0), r = m->dim(1), cm = m->dim(2), cz = z->dim(2);
  if (r_pad < r)
    return Status::InvalidArgument("pad_residues: r_pad=" + std::to_string(r_pad) +
                                   " is below r=" + std::to_string(r));
  if ((msa_mask->defined() && msa_mask->shape() != Shape{s, r}) ||
      (pair_mask->defined() && pair_mask->shape() != Shape{r, r}))
    return Status::InvalidArgument("pad_residues: masks must be [s, r] and [r, r]");
  Tensor mp = Tensor::zeros({s, r_pad, cm}), zp = Tensor::zeros({r_pad, r_pad, cz});
  Tensor mm = Tensor::zeros({s, r_pad}), pm = Tensor::zeros({r_pad, r_pad});
  for (int64_t i = 0; i < s; ++i) {
    std::memcpy(mp.f32() + i * r_pad * cm, m->f32() + i * r * cm, r * cm * sizeof(float));
    for (int64_t j = 0; j < r; ++j)
      mm.f32()[i * r_pad + j] = msa_mask->defined() ? msa_mask->f32()[i * r + j] : 1.f;
  }
  for (int64_t i = 0; i < r; ++i) {
    std::memcpy(zp.f32() + i * r_pad * cz, z->f32() + i * r * cz, r * cz * sizeof(float));
    for (int64_t j = 0; j < r; ++j)
      pm.f32()[i * r_pad + j] = pair_mask->defined() ? pair_mask->f32()[i * r + j] : 1.f;
  }
  *m = std::move(mp), *z = std::move(zp), *msa_mask = std::move(mm), *pair_mask = std::move(pm);
  return Status::OK();
}

// ---- Plan cache --------------------------------------------------------------------------------

std::string plan_cache_key(const PlanRequest& req) {
  int64_t r = req.r;
  if (req.bucket) {
    int64_t b = 0;
    if (bucket_residues(req.r, req.buckets.empty() ? default_buckets() : req.buckets, &b).ok())
      r = b;
  }
  std::ostringstream k;
  k << req.cfg.to_json() << "|s=" << req.s << "|r=" << r << "|bucket=" << req.bucket
    << "|devices=" << (req.devices > 0 ? req.devices : req.profile.devices)
    << "|mem=" << (req.memory_bytes > 0 ? req.memory_bytes : req.profile.memory_bytes)
    << "|train=" << req.training
    << "|dtype=" << plan_dtype_name(req.dtype.value_or(req.profile.dtype))
    << "|element_bytes=" << req.element_bytes.value_or(req.profile.element_bytes)
    << "|fixed=" << req.fixed_policy << ":" << recompute_name(req.policy) << "|chunk=" << req.chunk
    << "|target=" << req.chunk_target << "|dap=" << req.dap << "|dp=" << req.dp
    << "|profile=" << req.profile.to_json() << (req.extra_msa ? "|stack=extra_msa" : "")
    << (req.split_auto ? "|split=auto" : "");
  // FNV-1a, 64 bit: stable across runs and platforms.
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : k.str()) h = (h ^ c) * 1099511628211ull;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

Status cached_plan(const PlanRequest& req, const std::string& dir, Plan* out, bool* hit) {
  const std::string path = dir + "/plan-" + plan_cache_key(req) + ".json";
  *hit = false;
  if (std::ifstream f(path); f) {
    std::stringstream ss;
    ss << f.rdbuf();
    if (Plan::from_json(ss.str(), out).ok()) {
      *hit = true;
      return Status::OK();
    }  // a stale or damaged entry is replaced below
  }
  FC_RETURN_IF_ERROR(make_plan(req, out));
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  std::ofstream f(path);
  f << out->to_json() << "\n";
  if (!f) return Status::IOError("cannot write plan cache entry " + path);
  return Status::OK();
}

}  // namespace fc
