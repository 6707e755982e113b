// foldcube._core: the Python binding of the foldcube library. It converts arguments (arrays
// without copies, see arrays.h), releases the GIL around each library call, turns Ctrl-C into the
// library's cancel flag, and maps Status errors to exceptions. Every computation is a library call.
#include <nanobind/nanobind.h>
#include <nanobind/stl/filesystem.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "arrays.h"
#include "foldcube/af3.h"
#include "foldcube/alphafold.h"
#include "foldcube/features.h"
#include "foldcube/fold.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/parallel.h"
#include "foldcube/partition.h"
#include "foldcube/plan.h"
#include "foldcube/planner.h"
#include "foldcube/runner.h"
#include "foldcube/runtime.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace fcpy {
namespace {

std::thread::id g_main_thread;  // the thread that imported the module (Python's main thread)

// Runs fn (returning fc::Status) with the GIL released, through fc::run_shielded (on this thread,
// with signals blocked on it and its kernel team) with `threads` kernel threads (0 = the calling
// thread's setting). On the main thread Ctrl-C sets the library's cancel flag for the duration,
// and an interrupted call raises KeyboardInterrupt; other errors raise as throw_status.
template <typename F>
void compute(int threads, F&& fn) {
  fc::Status st;
  bool interrupted = false;
  {
    std::optional<fc::SigintCancelScope> sigint;
    if (std::this_thread::get_id() == g_main_thread) sigint.emplace();
    nb::gil_scoped_release release;
    st = fc::run_shielded([&]() -> fc::Status {
      if (threads > 0) fc::set_num_threads(threads);
      return fn();
    });
    interrupted = sigint && sigint->interrupted();
  }
  if (interrupted) {
    PyErr_SetString(PyExc_KeyboardInterrupt, "foldcube call interrupted");
    throw nb::python_error();
  }
  check(st);
}

int threads_arg(std::optional<int> threads) {
  if (threads && *threads < 1) throw nb::value_error("threads: must be >= 1 (None = current)");
  return threads ? *threads : 0;
}

// "fp32" | "bf16": the GEMM inputs of the stacks (AlphaFoldOptions::dtype).
fc::DType dtype_arg(const std::string& dtype) {
  fc::DType out = fc::DType::F32;
  const fc::Status st = fc::parse_compute_dtype(dtype, &out);
  if (!st.ok()) throw nb::value_error(st.message().c_str());
  return out;
}

int64_t chunk_arg(std::optional<int64_t> chunk) {
  if (chunk && *chunk < 1) throw nb::value_error("chunk: must be >= 1 (None = automatic)");
  return chunk ? *chunk : 0;
}

// A byte count: int, or a string such as "6GiB" (fc::parse_bytes); None = 0.
int64_t bytes_arg(nb::handle obj, const char* arg) {
  if (obj.is_none()) return 0;
  int64_t v = 0;
  if (nb::isinstance<nb::str>(obj)) {
    const fc::Status st = fc::parse_bytes(nb::cast<std::string>(obj), &v);
    if (!st.ok()) throw nb::value_error((std::string(arg) + ": " + st.message()).c_str());
  } else if (!nb::try_cast(obj, v, false)) {
    throw nb::type_error((std::string(arg) + ": expected bytes as int or str like '6GiB'").c_str());
  }
  if (v < 1) throw nb::value_error((std::string(arg) + ": must be positive").c_str());
  return v;
}

// A config as a dict, a JSON string or None (defaults), as JSON text.
std::string config_json(nb::handle obj) {
  if (obj.is_none()) return "{}";
  if (nb::isinstance<nb::str>(obj)) return nb::cast<std::string>(obj);
  if (nb::isinstance<nb::dict>(obj))
    return nb::cast<std::string>(nb::module_::import_("json").attr("dumps")(obj));
  throw nb::type_error("config: expected a dict, a JSON string or None");
}

nb::object config_dict(const fc::EvoformerConfig& cfg) {
  return nb::module_::import_("json").attr("loads")(cfg.to_json());
}

fc::EvoformerConfig make_config(nb::handle obj, const fc::EvoformerConfig& base) {
  fc::EvoformerConfig cfg = base;
  check(cfg.update_from_json(config_json(obj)).WithContext("config"));
  check(cfg.validate().WithContext("config"));
  return cfg;
}

std::string dims(const char* a, const char* b, const char* c, int64_t v) {
  return std::string("[") + a + ", " + b + ", " + c + "=" + std::to_string(v) + "]";
}

// The stream arguments of a stack call: m [s, r, c_m], z [r, r, c_z], masks [s, r], [r, r].
struct Streams {
  fc::Tensor m, z, msa_mask, pair_mask;
  int64_t s = 0, r = 0;
};
Streams take_streams(const fc::EvoformerConfig& cfg, nb::handle m, nb::handle z,
                     nb::handle msa_mask, nb::handle pair_mask, bool writable) {
  Streams st;
  st.m = take_f32(m, {"m", {-1, -1, cfg.c_m}, dims("s", "r", "c_m", cfg.c_m), writable});
  st.s = st.m.dim(0);
  st.r = st.m.dim(1);
  const std::string r = std::to_string(st.r), s = std::to_string(st.s);
  st.z = take_f32(z, {"z",
                      {st.r, st.r, cfg.c_z},
                      "[r=" + r + ", r=" + r + ", c_z=" + std::to_string(cfg.c_z) + "]",
                      writable});
  st.msa_mask = take_f32_opt(msa_mask, {"msa_mask", {st.s, st.r}, "[s=" + s + ", r=" + r + "]"});
  st.pair_mask = take_f32_opt(pair_mask, {"pair_mask", {st.r, st.r}, "[r=" + r + ", r=" + r + "]"});
  return st;
}

// A plan passed to a single-process call: one device, the stack's dimensions and these inputs.
void check_plan(const fc::Plan& p, const fc::EvoformerConfig& cfg, const Streams& in,
                bool training) {
  if (p.dap != 1 || p.dp != 1)
    throw nb::value_error("plan: a DAP/DP plan needs several processes (foldcube run --plan)");
  // The engine runs fp32 or bf16 with f32 buffers (docs/planner.md, "Element size and store
  // dtype"); an fp16 plan, or one with 2- or 4-byte buffers in half precision, has no path here.
  if (p.dtype == fc::DType::F16 || (p.dtype == fc::DType::BF16 && p.element_bytes != 0))
    throw nb::value_error(
        ("plan: the engine runs fp32, or bf16 with f32 buffers; this plan is for " +
         std::string(plan_dtype_name(p.dtype)) + " with element_bytes " +
         std::to_string(p.element_bytes))
            .c_str());
  if (p.training != training)
    throw nb::value_error(training ? "plan: an inference plan cannot run a training step"
                                   : "plan: a training plan; use train_step or plan(train=False)");
  const fc::EvoformerConfig& c = p.cfg;
  if (c.c_m != cfg.c_m || c.c_z != cfg.c_z || c.no_blocks != cfg.no_blocks)
    throw nb::value_error("plan: made for other model dimensions or another block count");
  if (p.s != in.s || p.r_real != in.r)
    throw nb::value_error(
        ("plan: made for s=" + std::to_string(p.s) + ", r=" + std::to_string(p.r_real) +
         ", the inputs have s=" + std::to_string(in.s) + ", r=" + std::to_string(in.r))
            .c_str());
}

// Inference options: a plan, a memory budget (chunking from the memory model; the budget covers
// the tracked memory already live, the work of the call and the caller's m and z), or a chunk.
fc::ForwardOptions forward_options(const fc::EvoformerConfig& cfg, const Streams& in,
                                   nb::handle memory_budget, std::optional<int64_t> chunk,
                                   std::optional<int> threads, const fc::Plan* plan) {
  fc::ForwardOptions fo;
  fo.chunk = chunk_arg(chunk);
  const int64_t budget = bytes_arg(memory_budget, "memory_budget");
  if (plan != nullptr) {
    if (budget > 0 || fo.chunk > 0)
      throw nb::value_error("plan: the plan sets the chunking; drop memory_budget and chunk");
    check_plan(*plan, cfg, in, false);
    return fc::to_forward_options(*plan);
  }
  if (budget == 0) return fo;
  if (fo.chunk > 0)
    throw nb::value_error("memory_budget: chooses the chunk sizes itself; drop chunk");
  const int64_t base =
      fc::mem_stats().live_bytes + static_cast<int64_t>(in.m.nbytes() + in.z.nbytes());
  fc::InferencePlan ip;
  check(fc::plan_inference(cfg, in.s, in.r, in.msa_mask.defined() && in.pair_mask.defined(), base,
                           budget, threads ? *threads : fc::num_threads(), &ip));
  fo.chunk_target_bytes = ip.chunk_target_bytes;
  return fo;
}

fc::TensorFile state_file(nb::dict state) {
  fc::TensorFile f;
  for (auto [k, v] : state) {
    const std::string name = nb::cast<std::string>(nb::str(k));
    f.put(name, take_any(v, name));
  }
  return f;
}

nb::dict state_dict_of(const fc::TensorFile& f) {
  nb::dict d;
  for (const std::string& n : f.names) d[n.c_str()] = to_numpy(f.tensors.at(n), true);
  return d;
}

// ---- Stacks ------------------------------------------------------------------------------------

struct Evoformer {
  fc::Job job;
};
struct ExtraMsa {
  fc::Job job;
};

// Weights of `kind` from a file (a stack's or a whole AlphaFold state dict, safetensors or .npz).
fc::Job load_stack(const std::filesystem::path& path, const std::string& kind,
                   const std::optional<std::filesystem::path>& config) {
  fc::JobSpec spec;
  spec.weights = path.string();
  spec.stack = kind;
  spec.config = config ? config->string() : "";
  fc::Job job;
  compute(0, [&] { return fc::load_model(spec, &job); });
  return job;
}

nb::tuple evoformer_call(Evoformer& self, nb::handle m, nb::handle z, nb::handle msa_mask,
                         nb::handle pair_mask, nb::handle memory_budget,
                         std::optional<int64_t> chunk, std::optional<int> threads,
                         const fc::Plan* plan) {
  const fc::Job& job = self.job;
  Streams in = take_streams(job.cfg, m, z, msa_mask, pair_mask, true);
  const fc::ForwardOptions fo = forward_options(job.cfg, in, memory_budget, chunk, threads, plan);
  fc::Tensor s;
  compute(threads_arg(threads),
          [&] { return job.stack.forward(in.m, in.z, in.msa_mask, in.pair_mask, &s, fo); });
  return nb::make_tuple(m, z, to_numpy(s));
}

// policy: "none" | "module" | "block" | a comma-separated list | a list of those names.
std::vector<fc::Recompute> policy_arg(nb::handle obj) {
  std::string text;
  if (nb::isinstance<nb::str>(obj)) {
    text = nb::cast<std::string>(obj);
  } else {
    std::vector<std::string> names;
    if (!nb::try_cast(obj, names))
      throw nb::type_error("policy: expected 'none', 'module', 'block' or a list of them");
    for (size_t i = 0; i < names.size(); ++i) text += (i ? "," : "") + names[i];
  }
  std::vector<fc::Recompute> p;
  const fc::Status st = fc::parse_policy(text, &p);
  if (!st.ok()) throw nb::value_error(("policy: " + st.message()).c_str());
  if (p.size() == 1 && p[0] == fc::Recompute::kNone) p.clear();
  return p;
}

// The options of a training step without a plan.
fc::TrainOptions train_options(nb::handle policy, bool dropout, uint64_t seed,
                               std::optional<int64_t> chunk) {
  fc::TrainOptions to;
  to.policy = policy_arg(policy);
  to.chunk = chunk_arg(chunk);
  to.dropout = dropout;
  to.seed = seed;
  return to;
}

// What every train_step returns besides its streams: input gradients are added by the caller;
// parameter gradients under the stack's state_dict names, the step's kept activations, tracked
// peak and times.
nb::dict train_dict(const fc::TrainResult& res) {
  nb::dict params;
  for (const auto& [name, t] : res.grad_params) params[name.c_str()] = to_numpy(t);
  nb::dict out;
  out["grad_params"] = params;
  out["activation_bytes"] = res.activation_bytes;
  out["peak_bytes"] = res.peak_bytes;
  out["forward_ms"] = res.forward_ms;
  out["backward_ms"] = res.backward_ms;
  return out;
}

// dL/d output m and z of an Evoformer-shaped stack call.
std::pair<fc::Tensor, fc::Tensor> take_stream_grads(const fc::EvoformerConfig& cfg,
                                                    const Streams& in, nb::handle grad_m,
                                                    nb::handle grad_z) {
  const std::string ms = "[s=" + std::to_string(in.s) + ", r=" + std::to_string(in.r) +
                         ", c_m=" + std::to_string(cfg.c_m) + "]";
  const std::string zs = "[r=" + std::to_string(in.r) + ", r=" + std::to_string(in.r) +
                         ", c_z=" + std::to_string(cfg.c_z) + "]";
  return {take_f32(grad_m, {"grad_m", in.m.shape(), ms}),
          take_f32(grad_z, {"grad_z", in.z.shape(), zs})};
}

nb::dict evoformer_train_step(Evoformer& self, nb::handle m, nb::handle z, nb::handle grad_m,
                              nb::handle grad_z, nb::handle grad_s, nb::handle msa_mask,
                              nb::handle pair_mask, nb::handle policy, bool dropout, uint64_t seed,
                              std::optional<int64_t> chunk, std::optional<int> threads,
                              const fc::Plan* plan) {
  const fc::Job& job = self.job;
  const fc::EvoformerConfig& cfg = job.cfg;
  Streams in = take_streams(cfg, m, z, msa_mask, pair_mask, true);
  const auto [gm, gz] = take_stream_grads(cfg, in, grad_m, grad_z);
  const fc::Tensor gs = take_f32_opt(
      grad_s, {"grad_s",
               {in.r, cfg.c_s},
               "[r=" + std::to_string(in.r) + ", c_s=" + std::to_string(cfg.c_s) + "]"});
  fc::TrainOptions to = train_options(policy, dropout, seed, chunk);
  if (plan != nullptr) {
    if (!to.policy.empty() || chunk)
      throw nb::value_error("plan: the plan sets the policy and chunking; drop policy and chunk");
    check_plan(*plan, cfg, in, true);
    to = fc::to_train_options(*plan);
    to.dropout = dropout;
    to.seed = seed;
  }
  fc::TrainResult res;
  compute(threads_arg(threads), [&] {
    return job.stack.train_step(in.m, in.z, in.msa_mask, in.pair_mask, gm, gz, gs, to, &res);
  });
  nb::dict out = train_dict(res);
  out["m"] = m;
  out["z"] = z;
  out["s"] = to_numpy(res.s);
  out["grad_m"] = to_numpy(res.grad_m);
  out["grad_z"] = to_numpy(res.grad_z);
  return out;
}

nb::tuple extra_call(ExtraMsa& self, nb::handle m, nb::handle z, nb::handle msa_mask,
                     nb::handle pair_mask, nb::handle memory_budget, std::optional<int64_t> chunk,
                     std::optional<int> threads) {
  const fc::Job& job = self.job;
  Streams in = take_streams(job.cfg, m, z, msa_mask, pair_mask, true);
  const fc::ForwardOptions fo =
      forward_options(job.cfg, in, memory_budget, chunk, threads, nullptr);
  compute(threads_arg(threads),
          [&] { return job.extra_stack.forward(in.m, in.z, in.msa_mask, in.pair_mask, fo); });
  return nb::make_tuple(m, z);
}

nb::dict extra_train_step(ExtraMsa& self, nb::handle m, nb::handle z, nb::handle grad_m,
                          nb::handle grad_z, nb::handle msa_mask, nb::handle pair_mask,
                          nb::handle policy, bool dropout, uint64_t seed,
                          std::optional<int64_t> chunk, std::optional<int> threads) {
  const fc::Job& job = self.job;
  Streams in = take_streams(job.cfg, m, z, msa_mask, pair_mask, true);
  const auto [gm, gz] = take_stream_grads(job.cfg, in, grad_m, grad_z);
  const fc::TrainOptions to = train_options(policy, dropout, seed, chunk);
  fc::TrainResult res;
  compute(threads_arg(threads), [&] {
    return job.extra_stack.train_step(in.m, in.z, in.msa_mask, in.pair_mask, gm, gz, to, &res);
  });
  nb::dict out = train_dict(res);
  out["m"] = m;
  out["z"] = z;
  out["grad_m"] = to_numpy(res.grad_m);
  out["grad_z"] = to_numpy(res.grad_z);
  return out;
}

// ---- AlphaFold3 trunk stacks (Boltz names) -----------------------------------------------------

struct Pairformer {
  fc::PairformerStack stack;
};
struct MsaModulePy {
  fc::MsaModule module;
};

// An AF3 config from a dict of overrides (None: AF3 / Boltz-2 dims) for a stack of `kind`.
fc::Af3Config af3_config_arg(nb::handle obj, const std::string& kind) {
  fc::Af3Config c;
  c.kind = kind;
  if (!obj.is_none()) {
    if (!nb::isinstance<nb::dict>(obj)) throw nb::type_error("config: expected a dict or None");
    const std::pair<const char*, int64_t*> ints[] = {{"c_s", &c.c_s},
                                                     {"c_z", &c.c_z},
                                                     {"c_m", &c.c_m},
                                                     {"no_heads_single", &c.no_heads_single},
                                                     {"no_heads_pair", &c.no_heads_pair},
                                                     {"c_hidden_pair", &c.c_hidden_pair},
                                                     {"transition_n", &c.transition_n},
                                                     {"no_blocks", &c.no_blocks}};
    const std::pair<const char*, float*> floats[] = {{"pair_dropout", &c.pair_dropout},
                                                     {"msa_dropout", &c.msa_dropout}};
    for (auto [k, v] : nb::borrow<nb::dict>(obj)) {
      const std::string key = nb::cast<std::string>(nb::str(k));
      bool known = false;
      for (const auto& [name, field] : ints)
        if (key == name) {
          if (!nb::try_cast(v, *field, false))
            throw nb::type_error(("config: " + key + " must be an int").c_str());
          known = true;
        }
      for (const auto& [name, field] : floats)
        if (key == name) {
          *field = nb::cast<float>(v);
          known = true;
        }
      if (!known) throw nb::value_error(("config: unknown key '" + key + "'").c_str());
    }
  }
  check(c.validate().WithContext("config"));
  return c;
}

nb::dict af3_config_dict(const fc::Af3Config& c) {
  nb::dict d;
  d["kind"] = c.kind;
  d["c_s"] = c.c_s;
  d["c_z"] = c.c_z;
  d["c_m"] = c.c_m;
  d["no_heads_single"] = c.no_heads_single;
  d["no_heads_pair"] = c.no_heads_pair;
  d["c_hidden_pair"] = c.c_hidden_pair;
  d["transition_n"] = c.transition_n;
  d["no_blocks"] = c.no_blocks;
  d["pair_dropout"] = c.pair_dropout;
  d["msa_dropout"] = c.msa_dropout;
  return d;
}

// The weights of a Boltz state dict file and the config read from them; a file of the other AF3
// stack is a ValueError.
fc::TensorFile read_af3(const std::filesystem::path& path, const std::string& kind,
                        fc::Af3Config* cfg) {
  fc::TensorFile f;
  compute(0, [&] { return fc::read_af3_weights(path.string(), kind, &f, cfg); });
  return f;
}

std::string n_dims(const char* a, int64_t n, const char* b, int64_t c) {
  return "[" + std::string(a) + "=" + std::to_string(n) + ", " + b + "=" + std::to_string(c) + "]";
}

// The Pairformer's arguments: s [n, c_s], z [n, n, c_z] (written in place), mask [n].
struct SingleStreams {
  fc::Tensor s, z, mask;
  int64_t n = 0;
};
SingleStreams take_single(const fc::Af3Config& c, nb::handle s, nb::handle z, nb::handle mask) {
  SingleStreams in;
  in.s = take_f32(s, {"s", {-1, c.c_s}, "[n, c_s=" + std::to_string(c.c_s) + "]", true});
  in.n = in.s.dim(0);
  const std::string n = std::to_string(in.n);
  in.z = take_f32(z, {"z",
                      {in.n, in.n, c.c_z},
                      "[n=" + n + ", n=" + n + ", c_z=" + std::to_string(c.c_z) + "]",
                      true});
  in.mask = take_f32_opt(mask, {"mask", {in.n}, "[n=" + n + "]"});
  return in;
}

nb::tuple pairformer_call(Pairformer& self, nb::handle s, nb::handle z, nb::handle mask,
                          std::optional<int64_t> chunk, std::optional<int> threads,
                          const std::string& dtype) {
  SingleStreams in = take_single(self.stack.config(), s, z, mask);
  fc::ForwardOptions fo;
  fo.chunk = chunk_arg(chunk);
  fo.dtype = dtype_arg(dtype);
  compute(threads_arg(threads), [&] { return self.stack.forward(in.s, in.z, in.mask, fo); });
  return nb::make_tuple(s, z);
}

nb::dict pairformer_train_step(Pairformer& self, nb::handle s, nb::handle z, nb::handle grad_s,
                               nb::handle grad_z, nb::handle mask, nb::handle policy, bool dropout,
                               uint64_t seed, std::optional<int64_t> chunk,
                               std::optional<int> threads, const std::string& dtype) {
  const fc::Af3Config& c = self.stack.config();
  SingleStreams in = take_single(c, s, z, mask);
  const std::string n = std::to_string(in.n);
  const fc::Tensor gs = take_f32(
      grad_s, {"grad_s", in.s.shape(), "[n=" + n + ", c_s=" + std::to_string(c.c_s) + "]"});
  const fc::Tensor gz = take_f32(
      grad_z,
      {"grad_z", in.z.shape(), "[n=" + n + ", n=" + n + ", c_z=" + std::to_string(c.c_z) + "]"});
  fc::TrainOptions to = train_options(policy, dropout, seed, chunk);
  to.dtype = dtype_arg(dtype);
  fc::TrainResult res;
  compute(threads_arg(threads),
          [&] { return self.stack.train_step(in.s, in.z, in.mask, gs, gz, to, &res); });
  nb::dict out = train_dict(res);
  out["s"] = s;
  out["z"] = z;
  out["grad_s"] = to_numpy(res.grad_m);
  out["grad_z"] = to_numpy(res.grad_z);
  return out;
}

// The MSA module's arguments: z [n, n, c_z] (written in place), emb [n, c_s], msa_feat
// [N, n, msa_feat], msa_mask [N, n], token_mask [n].
struct MsaInputs {
  fc::Tensor z, emb, msa_feat, msa_mask, token_mask;
  int64_t n = 0, rows = 0;
};
MsaInputs take_msa_inputs(const fc::Af3Config& c, nb::handle z, nb::handle emb, nb::handle msa_feat,
                          nb::handle msa_mask, nb::handle token_mask) {
  MsaInputs in;
  in.emb = take_f32(emb, {"emb", {-1, c.c_s}, "[n, c_s=" + std::to_string(c.c_s) + "]"});
  in.n = in.emb.dim(0);
  const std::string n = std::to_string(in.n);
  in.z = take_f32(z, {"z",
                      {in.n, in.n, c.c_z},
                      "[n=" + n + ", n=" + n + ", c_z=" + std::to_string(c.c_z) + "]",
                      true});
  in.msa_feat = take_f32(
      msa_feat,
      {"msa_feat", {-1, in.n, c.msa_feat}, "[N, n=" + n + ", " + std::to_string(c.msa_feat) + "]"});
  in.rows = in.msa_feat.dim(0);
  in.msa_mask =
      take_f32_opt(msa_mask, {"msa_mask", {in.rows, in.n}, n_dims("N", in.rows, "n", in.n)});
  in.token_mask = take_f32_opt(token_mask, {"token_mask", {in.n}, "[n=" + n + "]"});
  return in;
}

nb::object msa_module_call(MsaModulePy& self, nb::handle z, nb::handle emb, nb::handle msa_feat,
                           nb::handle msa_mask, nb::handle token_mask, std::optional<int64_t> chunk,
                           std::optional<int> threads, const std::string& dtype) {
  MsaInputs in = take_msa_inputs(self.module.config(), z, emb, msa_feat, msa_mask, token_mask);
  fc::ForwardOptions fo;
  fo.chunk = chunk_arg(chunk);
  fo.dtype = dtype_arg(dtype);
  compute(threads_arg(threads), [&] {
    return self.module.forward(in.z, in.emb, in.msa_feat, in.msa_mask, in.token_mask, fo);
  });
  return nb::borrow(z);
}

nb::dict msa_module_train_step(MsaModulePy& self, nb::handle z, nb::handle emb, nb::handle msa_feat,
                               nb::handle grad_z, nb::handle msa_mask, nb::handle token_mask,
                               nb::handle policy, bool dropout, uint64_t seed,
                               std::optional<int64_t> chunk, std::optional<int> threads,
                               const std::string& dtype) {
  const fc::Af3Config& c = self.module.config();
  MsaInputs in = take_msa_inputs(c, z, emb, msa_feat, msa_mask, token_mask);
  const std::string n = std::to_string(in.n);
  const fc::Tensor gz = take_f32(
      grad_z,
      {"grad_z", in.z.shape(), "[n=" + n + ", n=" + n + ", c_z=" + std::to_string(c.c_z) + "]"});
  fc::TrainOptions to = train_options(policy, dropout, seed, chunk);
  to.dtype = dtype_arg(dtype);
  fc::TrainResult res;
  fc::Tensor grad_emb;
  compute(threads_arg(threads), [&] {
    return self.module.train_step(in.z, in.emb, in.msa_feat, in.msa_mask, in.token_mask, gz, to,
                                  &res, &grad_emb);
  });
  nb::dict out = train_dict(res);
  out["z"] = z;
  out["grad_z"] = to_numpy(res.grad_z);
  out["grad_emb"] = to_numpy(grad_emb);
  out["grad_msa_embedding"] = to_numpy(res.grad_m);
  return out;
}

nb::object af3_msa_features(nb::handle msa, nb::handle has_deletion, nb::handle deletion_value,
                            nb::handle msa_paired) {
  const fc::Tensor tm = take_any(msa, "msa");
  if (tm.ndim() != 2) throw nb::value_error("msa: expected [N, n] token classes (int64)");
  const fc::Shape sh = tm.shape();
  const std::string d = n_dims("N", sh[0], "n", sh[1]);
  const fc::Tensor hd = take_f32(has_deletion, {"has_deletion", sh, d});
  const fc::Tensor dv = take_f32(deletion_value, {"deletion_value", sh, d});
  const fc::Tensor mp = take_f32(msa_paired, {"msa_paired", sh, d});
  fc::Tensor out;
  compute(0, [&] { return fc::msa_features(tm, hd, dv, mp, &out); });
  return to_numpy(out);
}

// ---- Whole model, features, fold ---------------------------------------------------------------

struct AlphaFold {
  fc::AlphaFold model;
};

// A path, or a dict of arrays named like the model's features (a "feature." prefix is dropped;
// with such keys present, keys without it (raw.*, random.*) are ignored).
fc::FeatureDict features_arg(nb::handle obj) {
  fc::FeatureDict f;
  if (nb::isinstance<nb::str>(obj) || nb::hasattr(obj, "__fspath__")) {
    const std::string path = nb::cast<std::string>(nb::str(obj));
    compute(0, [&] { return fc::read_feature_file(path, &f); });
    return f;
  }
  if (!nb::isinstance<nb::dict>(obj))
    throw nb::type_error("features: expected a dict of arrays or a path to a features file");
  nb::dict d = nb::borrow<nb::dict>(obj);
  bool prefixed = false;
  for (auto [k, v] : d) prefixed |= nb::cast<std::string>(nb::str(k)).rfind("feature.", 0) == 0;
  for (auto [k, v] : d) {
    std::string name = nb::cast<std::string>(nb::str(k));
    if (prefixed && name.rfind("feature.", 0) != 0) continue;
    if (prefixed) name = name.substr(8);
    f[name] = take_any(v, "features['" + nb::cast<std::string>(nb::str(k)) + "']");
  }
  return f;
}

nb::dict alphafold_predict(AlphaFold& self, nb::handle features, std::optional<int> recycles,
                           double recycle_tolerance, std::optional<int64_t> chunk,
                           std::optional<int> threads, const std::string& dtype) {
  const fc::FeatureDict feats = features_arg(features);
  fc::AlphaFoldOptions opts;
  opts.chunk = chunk_arg(chunk);
  opts.dtype = dtype_arg(dtype);
  if (recycles && *recycles < 0) throw nb::value_error("recycles: must be >= 0");
  opts.passes = recycles ? *recycles + 1 : 0;
  opts.recycle_tolerance = recycle_tolerance;
  std::map<std::string, fc::Tensor> out;
  compute(threads_arg(threads), [&] { return self.model.forward(feats, &out, opts); });
  nb::dict d;
  for (const auto& [name, t] : out) d[name.c_str()] = to_numpy(t);
  return d;
}

nb::dict features_fn(const std::filesystem::path& fasta, const std::filesystem::path& msa,
                     uint64_t seed, bool deterministic,
                     std::optional<std::filesystem::path> decisions, int64_t max_msa_clusters,
                     int64_t max_extra_msa, int64_t recycles) {
  fc::FeatureJob job;
  job.fasta = fasta.string();
  job.msa = msa.string();
  job.seed = seed;
  job.config.deterministic = deterministic;
  job.config.max_msa_clusters = max_msa_clusters;
  job.config.max_extra_msa = max_extra_msa;
  job.config.max_recycling_iters = recycles;
  job.decisions = decisions ? decisions->string() : "";
  fc::TensorFile f;
  compute(0, [&] { return fc::run_feature_job(job, &f); });
  nb::dict d;
  for (const std::string& n : f.names) d[n.c_str()] = to_numpy(f.tensors.at(n));
  return d;
}

nb::list fold_fn(const std::filesystem::path& fasta, const std::filesystem::path& params,
                 const std::filesystem::path& out_dir, std::optional<std::filesystem::path> msa,
                 std::vector<int> models, int recycles, double recycle_tolerance, uint64_t seed,
                 std::optional<int64_t> chunk, std::optional<std::filesystem::path> cache,
                 std::optional<int> threads, const std::string& dtype) {
  fc::FoldOptions o;
  o.dtype = dtype_arg(dtype);
  o.fasta = fasta.string();
  o.params = params.string();
  o.out_dir = out_dir.string();
  o.msa = msa ? msa->string() : "";
  o.models = models;
  o.recycles = recycles;
  o.recycle_tolerance = recycle_tolerance;
  o.seed = seed;
  o.chunk = chunk_arg(chunk);
  o.cache_dir = cache ? cache->string() : "";
  std::vector<fc::FoldJobResult> results;
  compute(threads_arg(threads), [&] { return fc::fold(o, &results); });
  nb::list jobs;
  for (const fc::FoldJobResult& j : results) {
    nb::list ms;
    for (const fc::FoldModelResult& r : j.models) {
      nb::dict md;
      md["model"] = r.model;
      md["mean_plddt"] = r.mean_plddt;
      md["ptm"] = r.ptm >= 0 ? nb::cast(r.ptm) : nb::none();
      md["seconds"] = r.seconds;
      md["rank"] = r.rank;
      ms.append(md);
    }
    nb::dict jd;
    jd["name"] = j.name;
    jd["features_from_cache"] = j.features_from_cache;
    jd["feature_seconds"] = j.feature_seconds;
    jd["models"] = ms;
    jobs.append(jd);
  }
  return jobs;
}

// ---- Planner -----------------------------------------------------------------------------------

fc::Plan plan_fn(int64_t s, int64_t r, int64_t blocks, bool train, nb::handle memory, int devices,
                 const std::string& dtype, nb::handle config,
                 std::optional<std::filesystem::path> profile, std::optional<std::string> policy,
                 std::optional<int64_t> chunk, std::optional<int> dap, std::optional<int> dp,
                 const std::string& split_policy) {
  fc::PlanRequest req;
  req.cfg = make_config(config, fc::EvoformerConfig());
  req.cfg.no_blocks = blocks;
  req.s = s;
  req.r = r;
  req.training = train;
  req.devices = devices;
  req.memory_bytes = bytes_arg(memory, "memory");
  fc::DType t;
  const fc::Status dst = fc::parse_plan_dtype(dtype, &t);
  if (!dst.ok()) throw nb::value_error(("dtype: " + dst.message()).c_str());
  req.dtype = t;
  if (policy) {
    const fc::Status pst = fc::parse_recompute(*policy, &req.policy);
    if (!pst.ok()) throw nb::value_error(("policy: " + pst.message()).c_str());
    req.fixed_policy = true;
  }
  req.chunk = chunk_arg(chunk);
  // `foldcube plan --dap / --dp / --split-policy`
  if ((dap && *dap < 1) || (dp && *dp < 1)) throw nb::value_error("dap, dp: must be >= 1");
  req.dap = dap.value_or(0);
  req.dp = dp.value_or(0);
  if (split_policy != "dap" && split_policy != "auto")
    throw nb::value_error(("split_policy: '" + split_policy +
                           "' is not 'dap' (pure DAP) or 'auto' (each layer's partition)")
                              .c_str());
  req.split_auto = split_policy == "auto";
  fc::Plan plan;
  compute(0, [&]() -> fc::Status {
    FC_RETURN_IF_ERROR(
        fc::load_plan_profile(profile ? profile->string() : "", false, devices, &req.profile));
    return fc::make_plan(req, &plan);
  });
  return plan;
}

std::vector<std::string> policy_names(const std::vector<fc::Recompute>& p) {
  std::vector<std::string> v;
  for (fc::Recompute x : p) v.push_back(fc::recompute_name(x));
  return v;
}

// ---- Memory ------------------------------------------------------------------------------------

struct PyMemoryScope {
  std::unique_ptr<fc::MemoryScope> scope;
  int64_t start = 0, peak = 0;
};

}  // namespace
}  // namespace fcpy

NB_MODULE(_core, mod) {
  using namespace fcpy;
  g_main_thread = std::this_thread::get_id();
  mod.doc() = "The foldcube C++ library (see the foldcube package for documentation).";
  mod.attr("__version__") = FOLDCUBE_VERSION;
  add_exceptions(mod);

  nb::class_<fc::Plan>(mod, "Plan")
      .def_ro("s", &fc::Plan::s)
      .def_ro("r", &fc::Plan::r)
      .def_ro("r_real", &fc::Plan::r_real)
      .def_ro("training", &fc::Plan::training)
      .def_prop_ro("blocks", [](const fc::Plan& p) { return p.cfg.no_blocks; })
      .def_prop_ro("config", [](const fc::Plan& p) { return config_dict(p.cfg); })
      .def_prop_ro("policy", [](const fc::Plan& p) { return policy_names(p.policy); })
      .def_ro("chunk", &fc::Plan::chunk)
      .def_ro("chunk_target_bytes", &fc::Plan::chunk_target_bytes)
      .def_ro("dap", &fc::Plan::dap)
      .def_ro("dp", &fc::Plan::dp)
      .def_prop_ro("dtype", [](const fc::Plan& p) { return std::string(plan_dtype_name(p.dtype)); })
      .def_ro("threads", &fc::Plan::threads)
      .def_ro("time_ms", &fc::Plan::time_ms)
      .def_ro("time_per_protein_ms", &fc::Plan::time_per_protein_ms)
      .def_ro("forward_ms", &fc::Plan::forward_ms)
      .def_ro("backward_ms", &fc::Plan::backward_ms)
      .def_ro("recompute_ms", &fc::Plan::recompute_ms)
      .def_ro("comm_ms", &fc::Plan::comm_ms)
      .def_ro("peak_bytes", &fc::Plan::peak_bytes)
      .def_ro("activation_bytes", &fc::Plan::activation_bytes)
      .def_ro("memory_limit_bytes", &fc::Plan::memory_limit_bytes)
      .def_ro("fits", &fc::Plan::fits)
      .def_ro("profile", &fc::Plan::profile)
      .def_prop_ro("partitions",
                   [](const fc::Plan& p) {
                     std::vector<std::vector<std::pair<std::string, std::string>>> v;
                     for (const std::vector<fc::LayerSplit>& block : p.partitions) {
                       v.emplace_back();
                       for (const fc::LayerSplit& l : block)
                         v.back().emplace_back(l.layer, fc::split_name(l.split));
                     }
                     return v;
                   })
      .def("to_json", [](const fc::Plan& p) { return p.to_json(2); })
      .def_static(
          "from_json",
          [](const std::string& text) {
            fc::Plan p;
            check(fc::Plan::from_json(text, &p));
            return p;
          },
          "text"_a)
      .def("__repr__", [](const fc::Plan& p) {
        return "<foldcube.Plan " + std::string(p.training ? "training" : "inference") +
               " s=" + std::to_string(p.s) + " r=" + std::to_string(p.r) +
               " blocks=" + std::to_string(p.cfg.no_blocks) +
               " time_ms=" + std::to_string(p.time_ms) +
               " peak_bytes=" + std::to_string(p.peak_bytes) + ">";
      });

  mod.def("plan", &plan_fn, "s"_a, "r"_a, "blocks"_a = 48, "train"_a = false,
          "memory"_a = nb::none(), "devices"_a = 1, "dtype"_a = "fp32", nb::kw_only(),
          "config"_a = nb::none(), "profile"_a = nb::none(), "policy"_a = nb::none(),
          "chunk"_a = nb::none(), "dap"_a = nb::none(), "dp"_a = nb::none(),
          "split_policy"_a = "dap");

  nb::class_<Evoformer>(mod, "Evoformer")
      .def_static(
          "load",
          [](const std::filesystem::path& path, std::optional<std::filesystem::path> config) {
            return Evoformer{load_stack(path, "evoformer", config)};
          },
          "path"_a, "config"_a = nb::none())
      .def_static(
          "random",
          [](nb::handle config, uint64_t seed) {
            Evoformer e;
            e.job.cfg = make_config(config, fc::EvoformerConfig());
            compute(0, [&] {
              e.job.stack = fc::EvoformerStack::random(e.job.cfg, seed);
              return fc::Status::OK();
            });
            return e;
          },
          "config"_a = nb::none(), "seed"_a = 0)
      .def_static(
          "from_state_dict",
          [](nb::dict state, nb::handle config) {
            const fc::TensorFile f = state_file(state);
            Evoformer e;
            if (config.is_none())
              check(fc::infer_config_from_weights(f, &e.job.cfg));
            else
              e.job.cfg = make_config(config, fc::EvoformerConfig());
            compute(0, [&] { return fc::EvoformerStack::load(e.job.cfg, f, &e.job.stack); });
            return e;
          },
          "state"_a, "config"_a = nb::none())
      .def_prop_ro("config", [](const Evoformer& e) { return config_dict(e.job.cfg); })
      .def_prop_ro("param_bytes", [](const Evoformer& e) { return e.job.stack.param_bytes(); })
      .def("state_dict",
           [](const Evoformer& e) {
             fc::TensorFile f;
             e.job.stack.export_weights(&f);
             return state_dict_of(f);
           })
      .def("__call__", &evoformer_call, "m"_a, "z"_a, "msa_mask"_a = nb::none(),
           "pair_mask"_a = nb::none(), nb::kw_only(), "memory_budget"_a = nb::none(),
           "chunk"_a = nb::none(), "threads"_a = nb::none(), "plan"_a.none() = nb::none())
      .def("train_step", &evoformer_train_step, "m"_a, "z"_a, "grad_m"_a, "grad_z"_a,
           "grad_s"_a = nb::none(), nb::kw_only(), "msa_mask"_a = nb::none(),
           "pair_mask"_a = nb::none(), "policy"_a = "none", "dropout"_a = false, "seed"_a = 0,
           "chunk"_a = nb::none(), "threads"_a = nb::none(), "plan"_a.none() = nb::none());

  nb::class_<ExtraMsa>(mod, "ExtraMsaStack")
      .def_static(
          "load",
          [](const std::filesystem::path& path, std::optional<std::filesystem::path> config) {
            return ExtraMsa{load_stack(path, "extra_msa", config)};
          },
          "path"_a, "config"_a = nb::none())
      .def_static(
          "random",
          [](nb::handle config, uint64_t seed) {
            fc::EvoformerConfig base;  // AF2's extra-MSA stack: c_e = 64, 8 heads of 8, 4 blocks
            base.c_m = 64;
            base.c_hidden_msa_att = 8;
            base.no_blocks = 4;
            ExtraMsa e;
            e.job.kind = fc::StackKind::kExtraMsa;
            e.job.cfg = make_config(config, base);
            compute(0, [&] {
              e.job.extra_stack = fc::ExtraMsaStack::random(e.job.cfg, seed);
              return fc::Status::OK();
            });
            return e;
          },
          "config"_a = nb::none(), "seed"_a = 0)
      .def_prop_ro("config", [](const ExtraMsa& e) { return config_dict(e.job.cfg); })
      .def_prop_ro("param_bytes", [](const ExtraMsa& e) { return e.job.extra_stack.param_bytes(); })
      .def("state_dict",
           [](const ExtraMsa& e) {
             fc::TensorFile f;
             e.job.extra_stack.export_weights(&f);
             return state_dict_of(f);
           })
      .def("__call__", &extra_call, "m"_a, "z"_a, "msa_mask"_a = nb::none(),
           "pair_mask"_a = nb::none(), nb::kw_only(), "memory_budget"_a = nb::none(),
           "chunk"_a = nb::none(), "threads"_a = nb::none())
      .def("train_step", &extra_train_step, "m"_a, "z"_a, "grad_m"_a, "grad_z"_a, nb::kw_only(),
           "msa_mask"_a = nb::none(), "pair_mask"_a = nb::none(), "policy"_a = "none",
           "dropout"_a = false, "seed"_a = 0, "chunk"_a = nb::none(), "threads"_a = nb::none());

  nb::class_<Pairformer>(mod, "Pairformer")
      .def_static(
          "load",
          [](const std::filesystem::path& path) {
            fc::Af3Config cfg;
            const fc::TensorFile f = read_af3(path, "pairformer", &cfg);
            Pairformer p;
            compute(0, [&] { return fc::PairformerStack::load(cfg, f, &p.stack); });
            return p;
          },
          "path"_a)
      .def_static(
          "random",
          [](nb::handle config, uint64_t seed) {
            const fc::Af3Config cfg = af3_config_arg(config, "pairformer");
            Pairformer p;
            compute(0, [&] {
              p.stack = fc::PairformerStack::random(cfg, seed);
              return fc::Status::OK();
            });
            return p;
          },
          "config"_a = nb::none(), "seed"_a = 0)
      .def_prop_ro("config", [](const Pairformer& p) { return af3_config_dict(p.stack.config()); })
      .def("state_dict",
           [](const Pairformer& p) {
             fc::TensorFile f;
             p.stack.export_weights(&f);
             return state_dict_of(f);
           })
      .def("__call__", &pairformer_call, "s"_a, "z"_a, "mask"_a = nb::none(), nb::kw_only(),
           "chunk"_a = nb::none(), "threads"_a = nb::none(), "dtype"_a = "fp32")
      .def("train_step", &pairformer_train_step, "s"_a, "z"_a, "grad_s"_a, "grad_z"_a,
           nb::kw_only(), "mask"_a = nb::none(), "policy"_a = "none", "dropout"_a = false,
           "seed"_a = 0, "chunk"_a = nb::none(), "threads"_a = nb::none(), "dtype"_a = "fp32");

  nb::class_<MsaModulePy>(mod, "MsaModule")
      .def_static(
          "load",
          [](const std::filesystem::path& path) {
            fc::Af3Config cfg;
            const fc::TensorFile f = read_af3(path, "msa_module", &cfg);
            MsaModulePy p;
            compute(0, [&] { return fc::MsaModule::load(cfg, f, &p.module); });
            return p;
          },
          "path"_a)
      .def_static(
          "random",
          [](nb::handle config, uint64_t seed) {
            const fc::Af3Config cfg = af3_config_arg(config, "msa_module");
            MsaModulePy p;
            compute(0, [&] {
              p.module = fc::MsaModule::random(cfg, seed);
              return fc::Status::OK();
            });
            return p;
          },
          "config"_a = nb::none(), "seed"_a = 0)
      .def_prop_ro("config",
                   [](const MsaModulePy& p) { return af3_config_dict(p.module.config()); })
      .def("state_dict",
           [](const MsaModulePy& p) {
             fc::TensorFile f;
             p.module.export_weights(&f);
             return state_dict_of(f);
           })
      .def("__call__", &msa_module_call, "z"_a, "emb"_a, "msa_feat"_a, "msa_mask"_a = nb::none(),
           "token_mask"_a = nb::none(), nb::kw_only(), "chunk"_a = nb::none(),
           "threads"_a = nb::none(), "dtype"_a = "fp32")
      .def("train_step", &msa_module_train_step, "z"_a, "emb"_a, "msa_feat"_a, "grad_z"_a,
           nb::kw_only(), "msa_mask"_a = nb::none(), "token_mask"_a = nb::none(),
           "policy"_a = "none", "dropout"_a = false, "seed"_a = 0, "chunk"_a = nb::none(),
           "threads"_a = nb::none(), "dtype"_a = "fp32");
  mod.def("af3_msa_features", &af3_msa_features, "msa"_a, "has_deletion"_a, "deletion_value"_a,
          "msa_paired"_a);

  nb::class_<AlphaFold>(mod, "AlphaFold")
      .def_static(
          "load",
          [](const std::filesystem::path& path) {
            auto a = std::make_unique<AlphaFold>();
            compute(0, [&] { return fc::load_alphafold(path.string(), &a->model); });
            return a.release();
          },
          "path"_a, nb::rv_policy::take_ownership)
      .def("predict", &alphafold_predict, "features"_a, nb::kw_only(), "recycles"_a = nb::none(),
           "recycle_tolerance"_a = 0.0, "chunk"_a = nb::none(), "threads"_a = nb::none(),
           "dtype"_a = "fp32");

  mod.def("features", &features_fn, "fasta"_a, "msa"_a, nb::kw_only(), "seed"_a = 0,
          "deterministic"_a = false, "decisions"_a = nb::none(), "max_msa_clusters"_a = 512,
          "max_extra_msa"_a = 5120, "recycles"_a = 3);
  mod.def("fold", &fold_fn, "fasta"_a, "params"_a, "out"_a, nb::kw_only(), "msa"_a = nb::none(),
          "models"_a = std::vector<int>(), "recycles"_a = 3, "recycle_tolerance"_a = 0.0,
          "seed"_a = 0, "chunk"_a = nb::none(), "cache"_a = nb::none(), "threads"_a = nb::none(),
          "dtype"_a = "fp32");

  nb::class_<PyMemoryScope>(mod, "MemoryScope")
      .def(nb::init<>())
      .def("__enter__",
           [](nb::handle self) {
             PyMemoryScope& s = nb::cast<PyMemoryScope&>(self);
             s.scope = std::make_unique<fc::MemoryScope>();
             s.start = s.scope->start_live();
             s.peak = s.start;
             return nb::borrow(self);
           })
      .def("__exit__",
           [](PyMemoryScope& s, nb::args) {
             if (s.scope) s.peak = s.scope->peak();
             s.scope.reset();
           })
      .def_prop_ro("start_bytes", [](const PyMemoryScope& s) { return s.start; })
      .def_prop_ro("peak_bytes",
                   [](const PyMemoryScope& s) { return s.scope ? s.scope->peak() : s.peak; });
  mod.def("memory_stats", [] {
    const fc::MemStats m = fc::mem_stats();
    nb::dict d;
    d["live_bytes"] = m.live_bytes;
    d["peak_bytes"] = m.peak_bytes;
    d["total_allocs"] = m.total_allocs;
    d["peak_rss_bytes"] = fc::peak_rss_bytes();
    return d;
  });
  mod.def(
      "read_file",
      [](const std::filesystem::path& path) {
        fc::TensorFile f;
        compute(0, [&] { return fc::read_tensor_file(path.string(), &f); });
        nb::dict meta;
        for (const auto& [k, v] : f.metadata) meta[k.c_str()] = v;
        nb::dict tensors;
        for (const std::string& n : f.names) tensors[n.c_str()] = to_numpy(f.tensors.at(n));
        return nb::make_tuple(tensors, meta);
      },
      "path"_a);
  mod.def("_request_cancel", &fc::request_cancel);  // tests: cancel the running call
  mod.def("set_num_threads", &fc::set_num_threads, "n"_a);
  mod.def("num_threads", &fc::num_threads);
  mod.def(
      "configure_allocator",
      [](bool reuse_large_blocks) {
        fc::configure_allocator({.reuse_large_blocks = reuse_large_blocks});
      },
      nb::kw_only(), "reuse_large_blocks"_a,
      "Process-wide allocator tuning, as the CLI does (call once, early): reuse_large_blocks=True "
      "serves large tensors from the heap and never trims it, so repeated calls do not pay fresh "
      "pages (faster repeated calls; RSS does not shrink after the peak). Off by default.");
}
