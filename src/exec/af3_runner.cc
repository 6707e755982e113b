// af3_run (include/foldcube/af3.h): an AF3 trunk stack from files, forward or training step,
// with outputs and gradients under the golden files' names.
#include "exec/af3_runner.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "foldcube/af3.h"
#include "foldcube/memory.h"
#include "foldcube/runtime.h"
#include "model/common.h"

namespace fc {

namespace {
double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

Status af3_optional_input(const TensorFile& f, const std::string& name, Tensor* out) {
  *out = Tensor();
  return f.has(name) ? f.get_f32(name, {}, out) : Status::OK();
}

Status af3_grad_output(const TensorFile* g, const std::string& x, const Shape& shape, Tensor* out) {
  if (g == nullptr) {
    *out = Tensor::full(shape, 1.f);
    return Status::OK();
  }
  const std::string name = g->has("grad.output." + x) ? "grad.output." + x : "probe." + x;
  if (!g->has(name))
    return Status::InvalidArgument("grad outputs: no grad.output." + x + " (or probe." + x + ")");
  FC_RETURN_IF_ERROR(g->get_f32(name, shape, out));
  *out = out->clone();
  return Status::OK();
}

TrainOptions af3_train_options(const Af3RunSpec& spec) {
  TrainOptions o;
  o.policy = spec.policy;
  o.chunk = spec.chunk;
  o.chunk_target_bytes = spec.chunk_target_bytes;
  o.dropout = spec.dropout;
  o.seed = spec.seed;
  o.dtype = spec.dtype;
  return o;
}

void af3_output_metadata(const std::string& kind, TensorFile* out) {
  out->metadata["format"] = "foldcube-output/1";
  out->metadata["kind"] = kind;
}

void af3_put_grads(const TrainResult& tr, TensorFile* out) {
  for (const auto& [name, t] : tr.grad_params) out->put("grad.param." + name, t);
}

Status af3_stack_of_file(const std::string& path, std::string* kind) {
  *kind = "";
  std::ifstream f(path, std::ios::binary);
  if (!f) return Status::NotFound("weights " + path + ": cannot open");
  uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), 8);
  if (!f || n > (uint64_t{1} << 28)) return Status::OK();  // not safetensors: not ours to judge
  std::string header(n, '\0');
  f.read(header.data(), static_cast<std::streamsize>(n));
  if (!f) return Status::OK();
  const nlohmann::json j = nlohmann::json::parse(header, nullptr, false);
  if (!j.is_object()) return Status::OK();
  if (j.contains("__metadata__") && j["__metadata__"].is_object() &&
      j["__metadata__"].contains("kind") && j["__metadata__"]["kind"].is_string()) {
    const std::string k = j["__metadata__"]["kind"].get<std::string>();
    if (k == "pairformer" || k == "msa_module") *kind = k;
  }
  if (kind->empty() && j.contains("msa_proj.weight") && j.contains("s_proj.weight"))
    *kind = "msa_module";
  if (kind->empty() && j.contains("layers.0.pre_norm_s.weight")) *kind = "pairformer";
  return Status::OK();
}

Status af3_random_inputs(const Af3Config& c, const Af3RunSpec& spec, TensorFile* in) {
  if (spec.n < 1 || spec.n_msa < 1 || spec.n > (1 << 20) || spec.n_msa > (1 << 20))
    return Status::InvalidArgument("random AF3 inputs: n and n_msa must be in [1, 2^20]");
  auto put = [&](const std::string& name, const Shape& shape) -> Status {
    Tensor t;
    FC_RETURN_IF_ERROR(Tensor::try_empty(shape, DType::F32, name, &t));
    random_fill(name, t, spec.seed);
    in->put(name, t);
    return Status::OK();
  };
  const int64_t n = spec.n;
  FC_RETURN_IF_ERROR(put("input.z", {n, n, c.c_z}));
  if (c.kind == "pairformer") return put("input.s", {n, c.c_s});
  FC_RETURN_IF_ERROR(put("input.emb", {n, c.c_s}));
  return put("input.msa_feat", {spec.n_msa, n, c.msa_feat});
}

Status af3_load_weights(const Af3RunSpec& spec, TensorFile* w, Af3Config* cfg) {
  if (spec.weights.empty()) {
    if (spec.stack != "pairformer" && spec.stack != "msa_module")
      return Status::InvalidArgument(
          "the AF3 stacks without --weights need --stack pairformer or --stack msa_module");
    cfg->kind = spec.stack;
    cfg->no_blocks = spec.blocks;
    FC_RETURN_IF_ERROR(cfg->validate());
    if (spec.stack == "pairformer")
      PairformerStack::random(*cfg, spec.seed).export_weights(w);
    else
      MsaModule::random(*cfg, spec.seed).export_weights(w);
    return Status::OK();
  }
  return read_af3_weights(spec.weights, spec.stack, w, cfg);
}

Status read_af3_weights(const std::string& path, const std::string& kind, TensorFile* w,
                        Af3Config* cfg) {
  FC_RETURN_IF_ERROR(read_weights(path, w));
  FC_RETURN_IF_ERROR(Af3Config::from_weights(*w, cfg).WithContext(
      path + " (" + (kind == "auto" ? "an AF3 stack" : kind) + ")"));
  if (kind != "auto" && kind != cfg->kind)
    return Status::InvalidArgument(path + " holds a Boltz " + cfg->kind + " state dict, not a " +
                                   kind);
  return Status::OK();
}

Status af3_msa_feat(const TensorFile& in, const std::string& path, Tensor* feat) {
  if (!in.has("input.msa")) return in.get_f32("input.msa_feat", {}, feat).WithContext(path);
  Tensor hd, dv, mp;
  FC_RETURN_IF_ERROR(in.get_f32("input.has_deletion", {}, &hd).WithContext(path));
  FC_RETURN_IF_ERROR(in.get_f32("input.deletion_value", {}, &dv).WithContext(path));
  FC_RETURN_IF_ERROR(in.get_f32("input.msa_paired", {}, &mp).WithContext(path));
  return msa_features(in.tensors.at("input.msa"), hd, dv, mp, feat).WithContext(path);
}

namespace {
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::string mib(int64_t bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f MiB", bytes / 1048576.0);
  return b;
}

// Fits the run into spec.memory_bytes (when set): `extra` is what is live beyond the plan's
// weights and inputs (the caller's other tensors, a clone per repeat). Sets the chunk target
// (and the policy, training without one) in the options and the plan's figures in the report.
Status apply_budget(const Af3Config& cfg, const Af3RunSpec& spec, int64_t n, int64_t n_msa,
                    int64_t extra_live, ForwardOptions* fopts, TrainOptions* topts,
                    Af3RunReport* rep) {
  if (spec.memory_bytes <= 0) return Status::OK();
  Af3PlanRequest q;
  q.cfg = cfg;
  q.n = n;
  q.n_msa = std::max<int64_t>(n_msa, 1);
  q.train = spec.training;
  q.policy = spec.policy;
  q.chunk = spec.chunk;
  q.chunk_target_bytes = spec.chunk_target_bytes;
  q.threads = num_threads();
  q.dtype = spec.dtype;
  Af3Plan free_plan;
  FC_RETURN_IF_ERROR(af3_plan(q, &free_plan));
  const int64_t base = free_plan.rows[0].param_bytes + free_plan.input_bytes;
  const int64_t extra = std::max<int64_t>(0, mem_stats().live_bytes - base) + extra_live;
  int64_t least = 0;  // the smallest budget the plan can meet
  if (spec.training) {
    least = INT64_MAX;
    for (const Af3PlanRow& r : free_plan.rows) least = std::min(least, base + extra + r.peak_bytes);
  } else {
    least = base + extra +
            af3_forward_peak_bytes(cfg, n, q.n_msa, spec.chunk,
                                   spec.chunk == 0 && spec.chunk_target_bytes == 0
                                       ? 1
                                       : free_plan.rows[0].chunk_target_bytes,
                                   q.threads, q.dtype);
  }
  rep->least_budget_bytes = least;
  Af3Plan plan;
  q.memory_bytes = spec.memory_bytes - extra;
  if (q.memory_bytes > 0) FC_RETURN_IF_ERROR(af3_plan(q, &plan));
  if (q.memory_bytes <= 0 || plan.chosen < 0)
    return Status::InvalidArgument("--memory-budget " + mib(spec.memory_bytes) + ": the " +
                                   cfg.kind + (spec.training ? " training step" : " forward") +
                                   " at n=" + std::to_string(n) + " needs at least " + mib(least) +
                                   " (weights and inputs " + mib(base + extra) + ")");
  const Af3PlanRow& row = plan.rows[plan.chosen];
  fopts->chunk_target_bytes = row.chunk_target_bytes;
  topts->chunk_target_bytes = row.chunk_target_bytes;
  if (spec.training && topts->policy.empty()) topts->policy = {row.policy};
  rep->planned_peak_bytes = base + extra + row.peak_bytes;
  rep->chunk_target_bytes = row.chunk_target_bytes;
  if (spec.training) rep->policy = recompute_name(topts->policy.front());
  return Status::OK();
}
}  // namespace

Status af3_run(const Af3RunSpec& spec, Af3RunReport* rep) {
  *rep = Af3RunReport{};
  TensorFile w, in, g;
  Af3Config cfg;
  FC_RETURN_IF_ERROR(af3_load_weights(spec, &w, &cfg));
  if (spec.inputs.empty())
    FC_RETURN_IF_ERROR(af3_random_inputs(cfg, spec, &in));
  else
    FC_RETURN_IF_ERROR(read_safetensors(spec.inputs, &in));
  if (spec.repeats < 1) return Status::InvalidArgument("repeats must be >= 1");
  const bool grads_given = spec.training && !spec.grad_outputs.empty();
  if (grads_given) FC_RETURN_IF_ERROR(read_safetensors(spec.grad_outputs, &g));
  const TensorFile* gp = grads_given ? &g : nullptr;
  rep->stack = cfg.kind;
  TrainOptions topts = af3_train_options(spec);
  ForwardOptions fopts;
  fopts.chunk = spec.chunk;
  fopts.chunk_target_bytes = spec.chunk_target_bytes;
  fopts.dtype = spec.dtype;
  TrainResult tr;
  af3_output_metadata(cfg.kind, &rep->out);
  MemoryScope scope;
  const int64_t live0 = scope.start_live();
  // With a budget: from the forward's start (weights, inputs and work; loading briefly held the
  // file's weights beside the stack's copy, which the budget does not cover).
  std::optional<MemoryScope> run_scope;
  if (cfg.kind == "pairformer") {
    PairformerStack stack;
    FC_RETURN_IF_ERROR(PairformerStack::load(cfg, w, &stack).WithContext(spec.weights));
    Tensor s, z, mask;
    FC_RETURN_IF_ERROR(in.get_f32("input.s", {}, &s).WithContext(spec.inputs));
    FC_RETURN_IF_ERROR(in.get_f32("input.z", {}, &z).WithContext(spec.inputs));
    FC_RETURN_IF_ERROR(af3_optional_input(in, "input.mask", &mask).WithContext(spec.inputs));
    s = s.clone();
    z = z.clone();
    mask = mask.defined() ? mask.clone() : mask;
    rep->n = s.ndim() == 2 ? s.dim(0) : 0;
    Tensor gs, gz;  // dL/d outputs (training), live through the step
    if (spec.training) {
      FC_RETURN_IF_ERROR(af3_grad_output(gp, "s", s.shape(), &gs));
      FC_RETURN_IF_ERROR(af3_grad_output(gp, "z", z.shape(), &gz));
    }
    if (spec.memory_bytes > 0) {  // only what the run uses stays live
      w = TensorFile{};
      in = TensorFile{};
      const int64_t clones =
          spec.training || spec.repeats == 1 ? 0 : static_cast<int64_t>(s.nbytes() + z.nbytes());
      FC_RETURN_IF_ERROR(apply_budget(cfg, spec, rep->n, 1, clones, &fopts, &topts, rep));
      run_scope.emplace();
    }
    const auto t0 = std::chrono::steady_clock::now();
    if (spec.training) {
      FC_RETURN_IF_ERROR(stack.train_step(s, z, mask, gs, gz, topts, &tr));
      rep->out.put("grad.input.s", tr.grad_m);
      rep->out.put("grad.input.z", tr.grad_z);
      rep->time_ms = ms_since(t0);
    } else {
      std::vector<double> times;
      for (int i = 0; i < spec.repeats; ++i) {
        Tensor si = i + 1 < spec.repeats ? s.clone() : s, zi = i + 1 < spec.repeats ? z.clone() : z;
        const auto t1 = std::chrono::steady_clock::now();
        FC_RETURN_IF_ERROR(stack.forward(si, zi, mask, fopts));
        times.push_back(ms_since(t1));
      }
      rep->time_ms = median(times);
    }
    rep->out.put("output.s", s);
    rep->out.put("output.z", z);
  } else {
    MsaModule mod;
    FC_RETURN_IF_ERROR(MsaModule::load(cfg, w, &mod).WithContext(spec.weights));
    Tensor z, emb, feat, msa_mask, tok;
    FC_RETURN_IF_ERROR(in.get_f32("input.z", {}, &z).WithContext(spec.inputs));
    FC_RETURN_IF_ERROR(in.get_f32("input.emb", {}, &emb).WithContext(spec.inputs));
    FC_RETURN_IF_ERROR(
        af3_optional_input(in, "input.msa_mask", &msa_mask).WithContext(spec.inputs));
    FC_RETURN_IF_ERROR(
        af3_optional_input(in, "input.token_pad_mask", &tok).WithContext(spec.inputs));
    FC_RETURN_IF_ERROR(af3_msa_feat(in, spec.inputs, &feat));
    z = z.clone();
    rep->n = z.ndim() == 3 ? z.dim(0) : 0;
    rep->n_msa = feat.ndim() == 3 ? feat.dim(0) : 0;
    Tensor gz;  // dL/d output z (training), live through the step
    if (spec.training) FC_RETURN_IF_ERROR(af3_grad_output(gp, "z", z.shape(), &gz));
    if (spec.memory_bytes > 0) {  // only what the run uses stays live
      emb = emb.clone();
      feat = feat.clone();
      msa_mask = msa_mask.defined() ? msa_mask.clone() : msa_mask;
      tok = tok.defined() ? tok.clone() : tok;
      w = TensorFile{};
      in = TensorFile{};
      const int64_t clones =
          spec.training || spec.repeats == 1 ? 0 : static_cast<int64_t>(z.nbytes());
      FC_RETURN_IF_ERROR(apply_budget(cfg, spec, rep->n, rep->n_msa, clones, &fopts, &topts, rep));
      run_scope.emplace();
    }
    const auto t0 = std::chrono::steady_clock::now();
    if (spec.training) {
      Tensor g_emb;
      FC_RETURN_IF_ERROR(mod.train_step(z, emb, feat, msa_mask, tok, gz, topts, &tr, &g_emb));
      rep->out.put("grad.input.z", tr.grad_z);
      rep->out.put("grad.input.emb", g_emb);
      rep->out.put("grad.trace.embed.m", tr.grad_m);
      rep->time_ms = ms_since(t0);
    } else {
      std::vector<double> times;
      for (int i = 0; i < spec.repeats; ++i) {
        Tensor zi = i + 1 < spec.repeats ? z.clone() : z;
        const auto t1 = std::chrono::steady_clock::now();
        FC_RETURN_IF_ERROR(mod.forward(zi, emb, feat, msa_mask, tok, fopts));
        times.push_back(ms_since(t1));
      }
      rep->time_ms = median(times);
    }
    rep->out.put("output.z", z);
  }
  if (spec.training) {
    af3_put_grads(tr, &rep->out);
    rep->forward_ms = tr.forward_ms;
    rep->backward_ms = tr.backward_ms;
    rep->activation_bytes = tr.activation_bytes;
  }
  rep->peak_tracked_bytes = scope.peak() - live0;
  rep->measured_peak_bytes = run_scope ? run_scope->peak() : scope.peak();
  return Status::OK();
}

}  // namespace fc
