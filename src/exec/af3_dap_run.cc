// af3_dap_run (src/exec/af3_dap.h): the AF3 stacks from files under DAP, as af3_run runs them in
// one process. Every fallible step is followed by Comm::agree, so no rank waits in a collective
// that another rank never reaches.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <initializer_list>
#include <optional>
#include <string>

#include "dist/comm_api.h"
#include "exec/af3_dap.h"
#include "exec/af3_runner.h"
#include "foldcube/memory.h"
#include "foldcube/runtime.h"
#include "model/block_table.h"
#include "plan/af3_dap_plan.h"

namespace fc {

namespace {
using Clock = std::chrono::steady_clock;

int64_t bytes_of(std::initializer_list<Tensor> ts) {
  int64_t b = 0;
  for (const Tensor& t : ts) b += t.defined() ? static_cast<int64_t>(t.nbytes()) : 0;
  return b;
}

std::string mib(int64_t bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f MiB", bytes / 1048576.0);
  return b;
}

// The per-rank plan of the run (af3_dap_plan) under spec.memory_bytes: the rank's chunk target
// and (training without --policy) the least recompute that fits, its estimates in rep; a budget
// nothing fits is a user error naming the least that would.
Status af3_dap_budget(const Af3Config& cfg, const Af3RunSpec& spec, int ranks, int64_t n,
                      int64_t n_msa, int64_t root_streams, int64_t root_held, DapOptions* fopts,
                      TrainOptions* topts, Af3DapRunReport* rep) {
  Af3DapPlanRequest req;
  req.q.cfg = cfg;
  req.q.n = n;
  req.q.n_msa = n_msa;
  req.q.train = spec.training;
  req.q.policy = spec.policy;
  req.q.chunk = spec.chunk;
  req.q.chunk_target_bytes = spec.chunk_target_bytes;
  req.q.memory_bytes = spec.memory_bytes;
  req.q.threads = num_threads();
  req.q.dtype = spec.dtype;
  req.ranks = ranks;
  req.root_stream_bytes = root_streams;
  req.root_held_bytes = root_held;
  Af3DapPlan plan;
  FC_RETURN_IF_ERROR(af3_dap_plan(req, &plan));
  rep->run.least_budget_bytes = plan.least_bytes;
  if (plan.chosen < 0)
    return Status::InvalidArgument(
        "--memory-budget " + mib(spec.memory_bytes) + ": the " + cfg.kind +
        (spec.training ? " training step" : " forward") + " at n=" + std::to_string(n) + " over " +
        std::to_string(ranks) + " DAP ranks needs at least " + mib(plan.least_bytes) + " per rank");
  const Af3PlanRow& row = plan.rows[plan.chosen];
  fopts->chunk_target_bytes = row.chunk_target_bytes;
  topts->chunk_target_bytes = row.chunk_target_bytes;
  if (spec.training && topts->policy.empty()) topts->policy = {row.policy};
  rep->run.planned_peak_bytes = row.peak_bytes;
  rep->run.chunk_target_bytes = row.chunk_target_bytes;
  if (spec.training) rep->run.policy = recompute_name(topts->policy.front());
  rep->rank_planned_bytes.assign(ranks, row.peak_bytes);  // rank 0's, the largest
  return Status::OK();
}
}  // namespace

Status af3_dap_run(const Af3RunSpec& spec, const Comm& world, Af3DapRunReport* rep) {
  *rep = Af3DapRunReport{};
  const dist::Communicator& comm = CommAccess::get(world);
  const bool root = world.rank() == 0;
  if (spec.repeats > 1)
    return Status::InvalidArgument("the AF3 stacks under --dap do not support --repeats yet");
  TensorFile w, in, g;
  Af3Config cfg;
  FC_RETURN_IF_ERROR(world.agree(af3_load_weights(spec, &w, &cfg), true));
  if (root) {
    Status st = spec.inputs.empty() ? af3_random_inputs(cfg, spec, &in)
                                    : read_safetensors(spec.inputs, &in);
    if (st.ok() && spec.training && !spec.grad_outputs.empty())
      st = read_safetensors(spec.grad_outputs, &g);
    FC_RETURN_IF_ERROR(world.agree(st, true));
  } else {
    FC_RETURN_IF_ERROR(world.agree(Status::OK(), true));
  }
  const TensorFile* gp = spec.training && !spec.grad_outputs.empty() ? &g : nullptr;
  Af3RunReport& run = rep->run;
  run.stack = cfg.kind;
  af3_output_metadata(cfg.kind, &run.out);
  TrainOptions topts = af3_train_options(spec);
  DapOptions fopts;
  fopts.chunk = spec.chunk;
  fopts.chunk_target_bytes = spec.chunk_target_bytes;
  fopts.dtype = spec.dtype;
  // With a budget: every rank plans from rank 0's shapes and input bytes (the same plan, so a
  // budget too small is the same error on every rank, before any collective of the stack).
  auto plan = [&](int64_t n, int64_t n_msa, int64_t streams, int64_t held) -> Status {
    if (spec.memory_bytes <= 0) return Status::OK();
    const std::vector<int64_t> shape = world.all_gather_i64(root ? n : 0);
    const std::vector<int64_t> msa = world.all_gather_i64(root ? n_msa : 0);
    const std::vector<int64_t> sb = world.all_gather_i64(root ? streams : 0);
    const std::vector<int64_t> hb = world.all_gather_i64(root ? held : 0);
    return af3_dap_budget(cfg, spec, world.size(), shape[0], std::max<int64_t>(msa[0], 1), sb[0],
                          hb[0], &fopts, &topts, rep);
  };
  std::optional<MemoryScope> scope;  // the stack call
  TrainResult tr;
  DapStats fs;
  DapTrainStats ts;
  Status st;
  double ms = 0;
  if (cfg.kind == "pairformer") {
    PairformerStack stack;
    FC_RETURN_IF_ERROR(
        world.agree(PairformerStack::load(cfg, w, &stack).WithContext(spec.weights), true));
    w = TensorFile{};
    Tensor s, z, mask, gs, gz;  // rank 0: inputs [n, c_s], [n, n, c_z], [n]; dL/d outputs
    if (root) {
      st = in.get_f32("input.s", {}, &s).WithContext(spec.inputs);
      if (st.ok()) st = in.get_f32("input.z", {}, &z).WithContext(spec.inputs);
      if (st.ok()) st = af3_optional_input(in, "input.mask", &mask).WithContext(spec.inputs);
      if (st.ok()) {
        s = s.clone(), z = z.clone(), mask = mask.defined() ? mask.clone() : mask;
        run.n = s.ndim() == 2 ? s.dim(0) : 0;
      }
      if (st.ok() && spec.training) st = af3_grad_output(gp, "s", s.shape(), &gs);
      if (st.ok() && spec.training) st = af3_grad_output(gp, "z", z.shape(), &gz);
      in = g = TensorFile{};
    }
    FC_RETURN_IF_ERROR(world.agree(st, true));
    FC_RETURN_IF_ERROR(plan(run.n, 1, bytes_of({s, z}), bytes_of({mask, gs, gz})));
    world.barrier();
    scope.emplace();
    const auto t0 = Clock::now();
    st = spec.training ? dap_train_step(stack, comm, s, z, mask, gs, gz, topts, &ts, &tr)
                       : dap_forward(stack, comm, s, z, mask, fopts, &fs);
    ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    FC_RETURN_IF_ERROR(world.agree(st, true));
    if (root) {
      if (spec.training) {
        run.out.put("grad.input.s", tr.grad_m);
        run.out.put("grad.input.z", tr.grad_z);
      }
      run.out.put("output.s", s);
      run.out.put("output.z", z);
    }
  } else {
    MsaModule mod;
    FC_RETURN_IF_ERROR(world.agree(MsaModule::load(cfg, w, &mod).WithContext(spec.weights), true));
    w = TensorFile{};
    Tensor z, emb, feat, msa_mask, tok, gz;  // rank 0
    if (root) {
      st = in.get_f32("input.z", {}, &z).WithContext(spec.inputs);
      if (st.ok()) st = in.get_f32("input.emb", {}, &emb).WithContext(spec.inputs);
      if (st.ok())
        st = af3_optional_input(in, "input.msa_mask", &msa_mask).WithContext(spec.inputs);
      if (st.ok())
        st = af3_optional_input(in, "input.token_pad_mask", &tok).WithContext(spec.inputs);
      if (st.ok()) st = af3_msa_feat(in, spec.inputs, &feat);
      if (st.ok()) {
        z = z.clone(), emb = emb.clone(), feat = feat.clone();
        msa_mask = msa_mask.defined() ? msa_mask.clone() : msa_mask;
        tok = tok.defined() ? tok.clone() : tok;
        run.n = z.ndim() == 3 ? z.dim(0) : 0;
        run.n_msa = feat.ndim() == 3 ? feat.dim(0) : 0;
      }
      if (st.ok() && spec.training) st = af3_grad_output(gp, "z", z.shape(), &gz);
      in = g = TensorFile{};
    }
    FC_RETURN_IF_ERROR(world.agree(st, true));
    FC_RETURN_IF_ERROR(
        plan(run.n, run.n_msa, bytes_of({z}), bytes_of({emb, feat, msa_mask, tok, gz})));
    world.barrier();
    Tensor g_emb;
    scope.emplace();
    const auto t0 = Clock::now();
    st = spec.training
             ? dap_train_step(mod, comm, z, emb, feat, msa_mask, tok, gz, topts, &ts, &tr, &g_emb)
             : dap_forward(mod, comm, z, emb, feat, msa_mask, tok, fopts, &fs);
    ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    FC_RETURN_IF_ERROR(world.agree(st, true));
    if (root) {
      if (spec.training) {
        run.out.put("grad.input.z", tr.grad_z);
        run.out.put("grad.input.emb", g_emb);
        run.out.put("grad.trace.embed.m", tr.grad_m);
      }
      run.out.put("output.z", z);
    }
  }
  if (root && spec.training) af3_put_grads(tr, &run.out);
  run.time_ms = ms;
  run.forward_ms = tr.forward_ms;
  run.backward_ms = tr.backward_ms;
  run.activation_bytes = tr.activation_bytes;
  run.n = world.all_gather_i64(run.n)[0];
  run.n_msa = world.all_gather_i64(run.n_msa)[0];
  rep->rank_peak_bytes = world.all_gather_i64(scope->peak());
  rep->rank_work_peak_bytes = world.all_gather_i64(scope->peak_above_start());
  rep->rank_shard_bytes = world.all_gather_i64(spec.training ? ts.shard_bytes : fs.shard_bytes);
  rep->rank_sent_bytes =
      world.all_gather_i64(spec.training ? ts.forward.total_bytes() + ts.backward.total_bytes() +
                                               ts.grad_reduce.total_bytes()
                                         : fs.blocks.total_bytes());
  rep->rank_activation_bytes = world.all_gather_i64(ts.activation_bytes);
  const bool pf = cfg.kind == "pairformer";
  rep->blocks = cfg.no_blocks;
  rep->block_sent_bytes_model =
      dap_table_volume(pf ? kPairformerBlock : kMsaModuleBlock, af3_trunk_config(cfg),
                       dap_layout(pf ? 1 : run.n_msa, run.n, world.size(), 0))
          .total();
  run.peak_tracked_bytes = rep->rank_work_peak_bytes[0];
  if (run.planned_peak_bytes > 0)
    run.measured_peak_bytes =
        *std::max_element(rep->rank_peak_bytes.begin(), rep->rank_peak_bytes.end());
  return Status::OK();
}

}  // namespace fc
