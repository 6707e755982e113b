// The many-process drivers of the public API (foldcube/parallel.h): DAP inference, DAP/DP
// training and the DP gradient average. Every fallible step is followed by an agreement on the
// world communicator (Comm::agree), so an error on any rank of any group ends the driver on every
// rank with the same Status, and no rank is left waiting in a collective.
#include <algorithm>
#include <chrono>

#include "dist/comm_api.h"
#include "exec/dap.h"
#include "exec/dap_train.h"
#include "foldcube/memory.h"
#include "foldcube/parallel.h"
#include "foldcube/runtime.h"

namespace fc {

Status average_gradients(const Comm& dp, TrainResult* grads) {
  for (const auto& [name, t] : grads->grad_params)
    if (!t.is_contiguous()) return Status::Internal("gradient " + name + " is not contiguous");
  if (dp.size() == 1) return Status::OK();
  const float inv = 1.f / static_cast<float>(dp.size());
  for (auto& [name, t] : grads->grad_params) {
    dp.all_reduce(t.f32(), t.numel());
    float* p = t.f32();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] *= inv;
  }
  return Status::OK();
}

namespace {
using Clock = std::chrono::steady_clock;

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  for (size_t p = 0, q; p <= s.size(); p = q + 1) {
    q = s.find(',', p);
    if (q == std::string::npos) q = s.size();
    out.push_back(s.substr(p, q - p));
  }
  return out;
}

// Every rank's value of a duration in ms, exchanged as whole microseconds.
std::vector<double> gather_ms(const dist::Communicator& comm, double seconds) {
  std::vector<double> out;
  for (int64_t us : comm.all_gather_i64(static_cast<int64_t>(seconds * 1e6)))
    out.push_back(us / 1e3);
  return out;
}

// Every rank's job->kind from world rank 0's, and the stack of that kind copied from rank 0.
Status share_job_stack(const Comm& world, Job* job) {
  const dist::Communicator& comm = CommAccess::get(world);
  job->kind = static_cast<StackKind>(comm.all_gather_i64(static_cast<int64_t>(job->kind))[0]);
  return world.agree(job->kind == StackKind::kExtraMsa ? dap_share_stack(comm, &job->extra_stack)
                                                       : dap_share_stack(comm, &job->stack),
                     true);
}

const EvoformerConfig& job_config(const Job& job) {
  return job.kind == StackKind::kExtraMsa ? job.extra_stack.config() : job.stack.config();
}

// Rank 0 loads the job (Evoformer or ExtraMSA stack) and every rank gets its weights.
Status load_shared_job(const Comm& world, const JobSpec& spec, Job* job) {
  Status st;
  if (world.rank() == 0) st = load_job(spec, job);
  FC_RETURN_IF_ERROR(world.agree(st, true));
  return share_job_stack(world, job);
}

void fill_forward_figures(const dist::Communicator& comm, const DapStats& stats, int64_t peak,
                          int64_t work_peak, DapForwardReport* out) {
  out->rank_peak_tracked_bytes = comm.all_gather_i64(peak);
  out->rank_work_peak_bytes = comm.all_gather_i64(work_peak);
  out->rank_peak_rss_bytes = comm.all_gather_i64(peak_rss_bytes());
  out->rank_shard_bytes = comm.all_gather_i64(stats.shard_bytes);
  out->rank_block_collective_ms = gather_ms(comm, stats.blocks.total_seconds());
  const DapLayout l = dap_layout(out->s, out->r, comm.size(), 0);
  out->s_pad = l.s_pad;
  out->r_pad = l.r_pad;
  const DapBlockVolume model = dap_block_volume(out->cfg, l);
  out->block_sent_bytes = stats.blocks.total_bytes() / std::max<int64_t>(out->cfg.no_blocks, 1);
  out->block_all_to_all_bytes_model = model.all_to_all_bytes;
  out->block_all_gather_bytes_model = model.all_gather_bytes;
  out->block_sent_bytes_model = model.total();
}
}  // namespace

Status run_dap(const Comm& world, const JobSpec& spec, const RunOptions& o, DapForwardReport* out) {
  const dist::Communicator& comm = CommAccess::get(world);
  const bool root = comm.rank() == 0;
  Job job;
  FC_RETURN_IF_ERROR(load_shared_job(world, spec, &job));
  out->cfg = job_config(job);
  out->kind = job.kind;
  if (root) out->s = job.m.dim(0), out->r = job.m.dim(1);
  out->s = comm.all_gather_i64(out->s)[0];  // rank 0's sizes on every rank
  out->r = comm.all_gather_i64(out->r)[0];
  DapOptions opts;
  opts.chunk = o.chunk;
  opts.chunk_target_bytes = o.chunk_target_bytes;
  opts.dtype = o.dtype;
  DapStats stats;
  int64_t peak = 0, work_peak = 0;
  const int passes = o.warmup + o.repeats;
  for (int it = 0; it < passes; ++it) {
    if (root) {
      const bool last = it + 1 == passes;
      out->m = last ? std::move(job.m) : job.m.clone();
      out->z = last ? std::move(job.z) : job.z.clone();
    }
    comm.barrier();
    const auto t0 = Clock::now();
    const Status st = job.kind == StackKind::kExtraMsa
                          ? dap_forward(job.extra_stack, comm, out->m, out->z, job.msa_mask,
                                        job.pair_mask, opts, &stats)
                          : dap_forward(job.stack, comm, out->m, out->z, job.msa_mask,
                                        job.pair_mask, &out->s_out, opts, &stats);
    const auto t1 = Clock::now();
    FC_RETURN_IF_ERROR(world.agree(st, true));
    peak = std::max(peak, stats.peak_bytes);
    work_peak = std::max(work_peak, stats.work_peak_bytes);
    if (it >= o.warmup)
      out->times_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  out->time_ms = median(out->times_ms);
  fill_forward_figures(comm, stats, peak, work_peak, out);
  return Status::OK();
}

namespace {
// The root of DAP group grp loads protein grp: its entry of the input and upstream-gradient
// lists, or random ones from seed (spec.seed + grp).
Status load_protein(const JobSpec& spec, int dp, int grp, uint64_t seed, Job* job, Tensor* gm,
                    Tensor* gz) {
  const std::vector<std::string> inputs = split_list(spec.inputs);
  const std::vector<std::string> gouts = split_list(spec.grad_outputs);
  for (const auto* l : {&inputs, &gouts})
    if (l->size() != 1 && static_cast<int>(l->size()) != dp)
      return Status::InvalidArgument("--inputs and --grad-outputs take one file or --dp (" +
                                     std::to_string(dp) + ") comma-separated files, got " +
                                     std::to_string(l->size()));
  JobSpec g = spec;
  g.inputs = inputs.size() == 1 ? inputs[0] : inputs[grp];
  g.grad_outputs = gouts.size() == 1 ? gouts[0] : gouts[grp];
  g.seed = seed;
  FC_RETURN_IF_ERROR(load_job(g, job));
  return load_grad_outputs(g, *job, gm, gz);
}

void fill_train_figures(const dist::Communicator& world, const DapTrainStats& stats,
                        const std::vector<Recompute>& policy, int dap, DapTrainReport* out) {
  out->rank_activation_bytes = world.all_gather_i64(stats.activation_bytes);
  out->rank_step_peak_bytes = world.all_gather_i64(stats.peak_bytes);
  out->rank_shard_bytes = world.all_gather_i64(stats.shard_bytes);
  out->rank_peak_rss_bytes = world.all_gather_i64(peak_rss_bytes());
  out->rank_forward_collective_ms = gather_ms(world, stats.forward.total_seconds());
  out->rank_backward_collective_ms =
      gather_ms(world, stats.backward.total_seconds() + stats.grad_reduce.total_seconds());
  const DapLayout l = dap_layout(out->s, out->r, dap, 0);
  out->s_pad = l.s_pad;
  out->r_pad = l.r_pad;
  const EvoformerConfig& cfg = out->cfg;
  out->forward_sent_bytes = stats.forward.total_bytes();
  out->forward_sent_bytes_model =
      std::max<int64_t>(cfg.no_blocks, 1) * dap_block_volume(cfg, l).total();
  out->backward_sent_bytes = stats.backward.total_bytes();
  TrainOptions o;
  o.policy = policy;
  out->backward_sent_bytes_model = 0;
  for (int b = 0; b < cfg.no_blocks; ++b)
    out->backward_sent_bytes_model += dap_block_backward_volume(cfg, l, policy_of(o, b)).total();
  out->grad_all_reduce_bytes = stats.grad_reduce.total_bytes();
}
}  // namespace

Status run_dap_training(const Comm& world_h, int dap, int dp, const JobSpec& spec,
                        const RunOptions& o, DapTrainReport* out) {
  const dist::Communicator& world = CommAccess::get(world_h);
  if (dap < 1 || dp < 1 || dap * dp != world.size())
    return Status::InvalidArgument("dap x dp must equal the number of ranks");
  const int grp = world.rank() / dap;
  const dist::Communicator dapc = world.dap_group(dap);
  const Comm dpc = CommAccess::wrap(world.dp_group(dap));
  TrainOptions opts;
  opts.chunk = o.chunk;
  opts.chunk_target_bytes = o.chunk_target_bytes;
  opts.dropout = o.dropout;
  opts.seed = spec.seed + static_cast<uint64_t>(grp);
  opts.policy = o.policy;
  opts.dtype = o.dtype;
  Job job;
  Tensor gm, gz;  // the group root's upstream gradients
  Status st;
  if (dapc.rank() == 0) st = load_protein(spec, dp, grp, opts.seed, &job, &gm, &gz);
  FC_RETURN_IF_ERROR(world_h.agree(st, true));
  FC_RETURN_IF_ERROR(share_job_stack(world_h, &job));
  out->cfg = job_config(job);
  out->kind = job.kind;
  if (world.rank() == 0) out->s = job.m.dim(0), out->r = job.m.dim(1);
  DapTrainStats stats;
  const int passes = o.warmup + o.repeats;
  for (int it = 0; it < passes; ++it) {
    if (dapc.rank() == 0) {
      const bool last = it + 1 == passes;
      out->m = last ? std::move(job.m) : job.m.clone();
      out->z = last ? std::move(job.z) : job.z.clone();
    }
    world.barrier();
    st = job.kind == StackKind::kExtraMsa
             ? dap_train_step(job.extra_stack, dapc, out->m, out->z, job.msa_mask, job.pair_mask,
                              gm, gz, opts, &stats, &out->result)
             : dap_train_step(job.stack, dapc, out->m, out->z, job.msa_mask, job.pair_mask, gm, gz,
                              opts, &stats, &out->result);
    FC_RETURN_IF_ERROR(world_h.agree(st, true));  // one group's failure reaches every group
    if (it >= o.warmup) {
      out->forward_ms.push_back(out->result.forward_ms);
      out->backward_ms.push_back(out->result.backward_ms);
      out->total_ms.push_back(out->result.forward_ms + out->result.backward_ms);
    }
  }
  FC_RETURN_IF_ERROR(world_h.agree(average_gradients(dpc, &out->result), true));
  out->s = world.all_gather_i64(out->s)[0];  // world rank 0's sizes on every rank
  out->r = world.all_gather_i64(out->r)[0];
  fill_train_figures(world, stats, opts.policy, dap, out);
  return Status::OK();
}

}  // namespace fc
