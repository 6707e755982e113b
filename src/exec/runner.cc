// One-process jobs of the public API (foldcube/runner.h): loading, forward and training passes
// with their figures, and the output file.
#include "foldcube/runner.h"

#include <algorithm>
#include <chrono>

#include "core/rng.h"
#include "foldcube/memory.h"
#include "foldcube/runtime.h"
#include "io/param_names.h"
#include "plan/memory_model.h"

namespace fc {

const char* stack_kind_name(StackKind k) {
  return k == StackKind::kExtraMsa ? "extra_msa" : "evoformer";
}

Status detect_stack(const std::string& requested, const TensorFile* weights, StackKind* out) {
  if (requested == "extra_msa") {
    *out = StackKind::kExtraMsa;
  } else if (requested == "evoformer") {
    *out = StackKind::kEvoformer;
  } else if (requested == "auto") {
    const bool extra = weights != nullptr && weights->metadata.count("kind") &&
                       weights->metadata.at("kind") == "extra_msa";
    *out = extra ? StackKind::kExtraMsa : StackKind::kEvoformer;
  } else {
    return Status::InvalidArgument("unknown --stack '" + requested +
                                   "' (evoformer|extra_msa|auto)");
  }
  return Status::OK();
}

Status resolve_config(const std::string& config_path, const TensorFile* weights, StackKind kind,
                      int64_t blocks, EvoformerConfig* out) {
  if (!config_path.empty()) return EvoformerConfig::from_json_file(config_path, out);
  if (weights != nullptr) {
    if (weights->metadata.count("c_m"))
      return EvoformerConfig::from_metadata(weights->metadata, out);
    return infer_config_from_weights(*weights, out);
  }
  *out = EvoformerConfig();
  if (kind == StackKind::kExtraMsa) {  // AF2 extra-MSA stack: c_e = 64, 8 heads of 8
    out->c_m = 64;
    out->c_hidden_msa_att = 8;
  }
  out->no_blocks = blocks;
  return out->validate();
}

Status random_tensor(const Shape& shape, uint64_t seed, const std::string& what, Tensor* out) {
  FC_RETURN_IF_ERROR(Tensor::try_empty(shape, DType::F32, what, out));
  float* p = out->f32();
  const int64_t n = out->numel();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) p[i] = uniform_pm1(seed, i) * 1.7320508f;  // unit variance
  return Status::OK();
}

int64_t Job::param_bytes() const {
  return kind == StackKind::kExtraMsa ? extra_stack.param_bytes() : stack.param_bytes();
}

namespace {
// input.m, input.z and the optional masks of an inputs file (the rest of the file is dropped).
Status read_inputs(const std::string& path, Job* job) {
  TensorFile f;
  FC_RETURN_IF_ERROR(read_safetensors(path, &f));
  FC_RETURN_IF_ERROR(f.get_f32("input.m", {}, &job->m));
  if (job->m.ndim() != 3)
    return Status::InvalidArgument("input.m must be [s, r, c_m], got " + shape_str(job->m.shape()));
  FC_RETURN_IF_ERROR(f.get_f32("input.z", {}, &job->z));
  const int64_t s = job->m.dim(0), r = job->m.dim(1);
  if (f.has("input.msa_mask"))
    FC_RETURN_IF_ERROR(f.get_f32("input.msa_mask", {s, r}, &job->msa_mask));
  if (f.has("input.pair_mask"))
    FC_RETURN_IF_ERROR(f.get_f32("input.pair_mask", {r, r}, &job->pair_mask));
  return Status::OK();
}
}  // namespace

Status load_model(const JobSpec& spec, Job* job) {
  TensorFile wfile;
  const bool files = !spec.weights.empty();
  if (files) FC_RETURN_IF_ERROR(read_weights(spec.weights, &wfile));  // safetensors or AF2 .npz
  FC_RETURN_IF_ERROR(detect_stack(spec.stack, files ? &wfile : nullptr, &job->kind));
  // A whole AlphaFold model (OpenFold state dict or AF2 .npz): the stack's part of it.
  if (files)
    wfile = submodule_state_dict(
        std::move(wfile), job->kind == StackKind::kExtraMsa ? "extra_msa_stack" : "evoformer");
  FC_RETURN_IF_ERROR(
      resolve_config(spec.config, files ? &wfile : nullptr, job->kind, spec.blocks, &job->cfg));
  if (job->kind == StackKind::kExtraMsa) {
    if (files)
      FC_RETURN_IF_ERROR(ExtraMsaStack::load(job->cfg, wfile, &job->extra_stack));
    else
      job->extra_stack = ExtraMsaStack::random(job->cfg, spec.seed);
  } else if (files) {
    FC_RETURN_IF_ERROR(EvoformerStack::load(job->cfg, wfile, &job->stack));
  } else {
    job->stack = EvoformerStack::random(job->cfg, spec.seed);
  }
  return Status::OK();
}

Status load_job(const JobSpec& spec, Job* job) {
  FC_RETURN_IF_ERROR(load_model(spec, job));
  if (!spec.inputs.empty()) return read_inputs(spec.inputs, job);
  FC_RETURN_IF_ERROR(
      random_tensor({spec.s, spec.r, job->cfg.c_m}, spec.seed * 2 + 1, "input.m", &job->m));
  return random_tensor({spec.r, spec.r, job->cfg.c_z}, spec.seed * 2 + 2, "input.z", &job->z);
}

Status load_grad_outputs(const JobSpec& spec, const Job& job, Tensor* gm, Tensor* gz) {
  return load_grad_outputs(spec, job, gm, gz, nullptr);
}

Status load_grad_outputs(const JobSpec& spec, const Job& job, Tensor* gm, Tensor* gz, Tensor* gs) {
  if (gs != nullptr) *gs = Tensor();
  if (spec.grad_outputs.empty()) {
    FC_RETURN_IF_ERROR(random_tensor(job.m.shape(), spec.seed * 2 + 3, "grad.output.m", gm));
    return random_tensor(job.z.shape(), spec.seed * 2 + 4, "grad.output.z", gz);
  }
  TensorFile g;
  FC_RETURN_IF_ERROR(read_safetensors(spec.grad_outputs, &g));
  // Each tensor is optional: a missing one is a zero gradient.
  auto get = [&](const char* name, const Shape& shape, Tensor* out) -> Status {
    if (g.has(name)) return g.get_f32(name, shape, out);
    FC_RETURN_IF_ERROR(Tensor::try_empty(shape, DType::F32, name, out));
    std::fill(out->f32(), out->f32() + out->numel(), 0.f);
    return Status::OK();
  };
  FC_RETURN_IF_ERROR(get("grad.output.m", job.m.shape(), gm));
  FC_RETURN_IF_ERROR(get("grad.output.z", job.z.shape(), gz));
  if (!g.has("grad.output.s") || gs == nullptr) return Status::OK();
  if (job.kind == StackKind::kExtraMsa)
    return Status::InvalidArgument(spec.grad_outputs +
                                   ": grad.output.s given, but the ExtraMSA stack has no output.s");
  return g.get_f32("grad.output.s", {job.m.dim(1), job.cfg.c_s}, gs);
}

std::string policy_string(const std::vector<Recompute>& policy) {
  std::string s = policy.empty() ? "none" : "";
  for (size_t i = 0; i < policy.size(); ++i)
    s += std::string(i ? "," : "") + recompute_name(policy[i]);
  return s;
}

Status parse_policy(const std::string& list, std::vector<Recompute>* out) {
  out->clear();
  if (list.empty()) return Status::OK();
  for (size_t p = 0, q; p <= list.size(); p = q + 1) {
    q = list.find(',', p);
    if (q == std::string::npos) q = list.size();
    Recompute rc;
    FC_RETURN_IF_ERROR(parse_recompute(list.substr(p, q - p), &rc));
    out->push_back(rc);
  }
  return Status::OK();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

namespace {
using Clock = std::chrono::steady_clock;
double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// The forward's options: explicit chunking, or a memory budget's plan (base: what is live now
// plus a pristine copy of m and z when more than one pass runs).
Status forward_options(const Job& job, const RunOptions& o, ForwardOptions* fo,
                       ForwardReport* out) {
  fo->chunk = o.chunk;
  fo->chunk_target_bytes = o.chunk_target_bytes;
  fo->fused = o.fused;
  fo->dtype = o.dtype;
  if (o.memory_budget <= 0) return Status::OK();
  if (!o.fused)  // the inference plan models the fused path (fp32 or bf16)
    return Status::InvalidArgument("--memory-budget plans the fused path; drop --unfused");
  if (o.chunk > 0)
    return Status::InvalidArgument("--memory-budget chooses the chunk sizes; drop --chunk");
  const int64_t s = job.m.dim(0), r = job.m.dim(1);
  const int64_t base = mem_stats().live_bytes + (o.warmup + o.repeats > 1 ? out->mz_bytes : 0);
  FC_RETURN_IF_ERROR(plan_inference(job.cfg, s, r,
                                    job.msa_mask.defined() && job.pair_mask.defined(), base,
                                    o.memory_budget, num_threads(), &out->plan, o.dtype));
  fo->chunk_target_bytes = out->plan.chunk_target_bytes;
  return Status::OK();
}

// --profile: sums the wall time and the process CPU time between trace calls per module, in
// first-seen order (the CPU time is the steadier figure on a loaded machine).
struct ModuleTimer {
  std::vector<std::pair<std::string, double>> ms, cpu_ms;
  Clock::time_point mark;
  double cpu_mark = 0;
  void start(Clock::time_point t, double cpu) {
    ms.clear(), cpu_ms.clear();
    mark = t, cpu_mark = cpu;
  }
  TraceFn hook() {
    return [this](int, const std::string& module, const std::string&, const Tensor&) {
      const auto now = Clock::now();
      const double cpu = process_cpu_ms();
      add(&ms, module, ms_between(mark, now));
      add(&cpu_ms, module, cpu - cpu_mark);
      mark = now, cpu_mark = cpu;
    };
  }
  static void add(std::vector<std::pair<std::string, double>>* v, const std::string& module,
                  double d) {
    auto it = std::find_if(v->begin(), v->end(), [&](const auto& e) { return e.first == module; });
    if (it == v->end())
      v->emplace_back(module, d);
    else
      it->second += d;
  }
};
}  // namespace

Status run_forward(Job* job, const RunOptions& o, ForwardReport* out) {
  const EvoformerConfig& cfg = job->cfg;
  const bool extra = job->kind == StackKind::kExtraMsa;
  const int64_t s = job->m.dim(0), r = job->m.dim(1);
  out->mz_bytes = static_cast<int64_t>(job->m.nbytes() + job->z.nbytes());
  ForwardOptions fo;
  FC_RETURN_IF_ERROR(forward_options(*job, o, &fo, out));
  ModuleTimer timer;
  if (o.profile) fo.trace = timer.hook();
  const int passes = o.warmup + o.repeats;
  for (int it = 0; it < passes; ++it) {
    const bool last = it + 1 == passes;  // runs on the inputs themselves: no extra copy is live
    out->m = last ? std::move(job->m) : job->m.clone();
    out->z = last ? std::move(job->z) : job->z.clone();
    MemoryScope scope;
    const double cpu0 = process_cpu_ms();
    const auto t0 = Clock::now();
    timer.start(t0, cpu0);
    FC_RETURN_IF_ERROR(
        extra ? job->extra_stack.forward(out->m, out->z, job->msa_mask, job->pair_mask, fo)
              : job->stack.forward(out->m, out->z, job->msa_mask, job->pair_mask, &out->s_out, fo));
    const auto t1 = Clock::now();
    out->peak_tracked_bytes = std::max(out->peak_tracked_bytes, scope.peak());
    out->inference_peak_bytes =
        std::max(out->inference_peak_bytes, scope.peak() - scope.start_live() + out->mz_bytes);
    if (it >= o.warmup) {
      out->times_ms.push_back(ms_between(t0, t1));
      out->cpu_times_ms.push_back(process_cpu_ms() - cpu0);
    }
  }
  out->time_ms = median(out->times_ms);
  out->cpu_ms = median(out->cpu_times_ms);
  // The FLOP formula is the Evoformer block's; the ExtraMSA block's global attention differs.
  out->gflop = extra ? 0.0 : evoformer_block_flops(cfg, s, r) * cfg.no_blocks / 1e9;
  out->param_bytes = job->param_bytes();
  out->peak_rss_bytes = peak_rss_bytes();
  out->chunk_target_bytes = fo.chunk_target_bytes;
  out->chunk_target_bytes_used =
      fo.chunk_target_bytes > 0 ? fo.chunk_target_bytes : default_chunk_target_bytes(cfg, s, r);
  out->chunking =
      forward_chunking(cfg, s, r, fo.chunk, fo.chunk_target_bytes, num_threads(), extra);
  out->module_ms = std::move(timer.ms);
  out->module_cpu_ms = std::move(timer.cpu_ms);
  return Status::OK();
}

namespace {
// Adds one pass's module times, each divided by n (the mean over n passes), in first-seen order.
void add_module_times(const std::vector<ModuleTime>& pass, int n, std::vector<ModuleTime>* sum) {
  for (const ModuleTime& t : pass) {
    auto e = std::find_if(sum->begin(), sum->end(),
                          [&](const ModuleTime& x) { return x.module == t.module; });
    if (e == sum->end()) e = sum->insert(sum->end(), ModuleTime{t.module});
    e->forward_ms += t.forward_ms / n;
    e->backward_ms += t.backward_ms / n;
    e->recompute_ms += t.recompute_ms / n;
  }
}
}  // namespace

Status run_training(Job* job, const Tensor& gm, const Tensor& gz, const RunOptions& o,
                    TrainReport* out) {
  return run_training(job, gm, gz, Tensor(), o, out);
}

Status run_training(Job* job, const Tensor& gm, const Tensor& gz, const Tensor& gs,
                    const RunOptions& o, TrainReport* out) {
  const bool extra = job->kind == StackKind::kExtraMsa;
  if (extra && gs.defined())
    return Status::InvalidArgument("grad.output.s given, but the ExtraMSA stack has no output.s");
  TrainOptions to;
  to.chunk = o.chunk;
  to.chunk_target_bytes = o.chunk_target_bytes;
  to.dropout = o.dropout;
  to.seed = o.seed;
  to.profile = o.profile;
  to.policy = o.policy;
  to.dtype = o.dtype;
  const int passes = o.warmup + o.repeats;
  for (int it = 0; it < passes; ++it) {
    const bool last = it + 1 == passes;
    out->m = last ? job->m : job->m.clone();
    out->z = last ? job->z : job->z.clone();
    if (last) job->m = job->z = Tensor();
    const double cpu0 = process_cpu_ms();
    FC_RETURN_IF_ERROR(extra ? job->extra_stack.train_step(out->m, out->z, job->msa_mask,
                                                           job->pair_mask, gm, gz, to, &out->result)
                             : job->stack.train_step(out->m, out->z, job->msa_mask, job->pair_mask,
                                                     gm, gz, gs, to, &out->result));
    if (it < o.warmup) continue;
    const TrainResult& res = out->result;
    out->forward_ms.push_back(res.forward_ms);
    out->backward_ms.push_back(res.backward_ms);
    out->total_ms.push_back(res.forward_ms + res.backward_ms);
    out->cpu_ms.push_back(process_cpu_ms() - cpu0);
    add_module_times(res.module_ms, o.repeats, &out->module_ms);
  }
  out->peak_tracked_bytes = mem_stats().peak_bytes;
  out->peak_rss_bytes = peak_rss_bytes();
  return Status::OK();
}

Status write_outputs(const std::string& path, const EvoformerConfig& cfg, const Tensor& m,
                     const Tensor& z, const Tensor& s_out, const TrainResult* grads) {
  TensorFile out;
  out.metadata["format"] = "foldcube-output/1";
  out.metadata["config"] = cfg.to_json();
  out.put("output.m", m);
  out.put("output.z", z);
  if (s_out.defined()) out.put("output.s", s_out);
  if (grads != nullptr) {
    out.put("grad.input.m", grads->grad_m);
    out.put("grad.input.z", grads->grad_z);
    for (const auto& [name, t] : grads->grad_params) out.put("grad.param." + name, t);
  }
  return write_safetensors(path, out);
}

}  // namespace fc
