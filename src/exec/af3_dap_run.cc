// af3_dap_run (src/exec/af3_dap.h): the AF3 stacks from files under DAP, as af3_run runs them in
// one process. Every fallible step is followed by Comm::agree, so no rank waits in a collective
// that another rank never reaches.
#include <chrono>
#include <optional>

#include "dist/comm_api.h"
#include "exec/af3_dap.h"
#include "exec/af3_runner.h"
#include "foldcube/memory.h"
#include "foldcube/runtime.h"
#include "model/block_table.h"

namespace fc {

namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

Status af3_dap_run(const Af3RunSpec& spec, const Comm& world, Af3DapRunReport* rep) {
  *rep = Af3DapRunReport{};
  const dist::Communicator& comm = CommAccess::get(world);
  const bool root = world.rank() == 0;
  if (spec.memory_bytes > 0 || spec.repeats > 1)
    return Status::InvalidArgument(
        "the AF3 stacks under --dap support neither --memory-budget nor --repeats yet");
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
  const TrainOptions topts = af3_train_options(spec);
  DapOptions fopts;
  fopts.chunk = spec.chunk;
  fopts.chunk_target_bytes = spec.chunk_target_bytes;
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
  return Status::OK();
}

}  // namespace fc
