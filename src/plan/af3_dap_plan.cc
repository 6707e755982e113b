// af3_dap_plan (src/plan/af3_dap_plan.h): the per-rank decomposition of the AF3 stacks' DAP peak.
#include "plan/af3_dap_plan.h"

#include <algorithm>

#include "foldcube/model.h"
#include "layers/context.h"
#include "layers/triangle_multiplication.h"
#include "model/block_table.h"
#include "model/common.h"
#include "plan/memory_model.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// What every rank holds in full (see the header), bytes.
int64_t replicated_bytes(const EvoformerConfig& t, bool pairformer, int64_t s, int64_t r, int ranks,
                         int64_t target, int64_t chunk, DType dtype) {
  const int64_t sl = ceil_div(s, ranks), rl = ceil_div(r, ranks), sp = sl * ranks, rp = rl * ranks;
  const int64_t masks = 3 * sp * rp + sp * rl + 4 * rp * rp;  // DapShards
  const int64_t H = pairformer ? t.no_heads_pair : std::max(t.no_heads_pair, t.no_heads_msa);
  const BlockContext full = shape_context(t, sp, rp, chunk, target, 1);
  const int64_t group = tri_mul_train_chunks(full, rl, ranks).group;
  // The bf16 forward's copies of the largest SwiGLU transition's weights (fc1 | fc2 and fc3, made
  // per call on every rank; the one-process work counts them once, not per rank).
  const int64_t c = std::max(t.c_m, t.c_z);
  const int64_t swiglu = dtype == DType::BF16 ? 3 * t.transition_n * c * c * 2 : 0;
  return (masks + 2 * H * rp * rp + 2 * group * rp * rp) * kF + target + swiglu;
}
}  // namespace

Status af3_dap_plan(const Af3DapPlanRequest& req, Af3DapPlan* out) {
  *out = Af3DapPlan{};
  const Af3PlanRequest& q = req.q;
  const int N = req.ranks;
  if (N < 1 || req.root_stream_bytes < 0 || req.root_held_bytes < 0)
    return Status::InvalidArgument("af3 DAP plan: ranks must be >= 1, root bytes >= 0");
  const Af3Config& c = q.cfg;
  const bool pf = c.kind == "pairformer";
  const EvoformerConfig t = af3_trunk_config(c);
  const int64_t s = pf ? 1 : q.n_msa, r = q.n;
  const int64_t blocks = q.blocks > 0 ? q.blocks : c.no_blocks;
  const int64_t sl = ceil_div(s, N), rl = ceil_div(r, N), rp = rl * N;
  // The rank's default target: 1/8 of its shards of m and z, at least 1 MiB (make_dap_shards).
  const int64_t shard_bytes = (sl * rp * t.c_m + rl * rp * t.c_z) * kF;
  const int64_t auto_target = std::max<int64_t>(shard_bytes / 8, 1 << 20);
  const int64_t grads =
      q.train ? blocks * block_param_elems(t, pf ? kPairformerBlock : kMsaModuleBlock) * kF : 0;
  // The MSA module's embedding m [N, n, c_m] (built on rank 0, scattered; training: dL/d m
  // gathered).
  const int64_t m_bytes = pf ? 0 : s * r * t.c_m * kF;
  // Rank 0's peak for the rank target `target` and the one-process row `row` at N x target.
  auto rank_peak = [&](const Af3PlanRow& row, int64_t target) {
    const int64_t rep =
        replicated_bytes(t, pf, s, r, N, target, q.chunk, q.train ? DType::F32 : q.dtype);
    const int64_t work = (row.peak_bytes - grads) / N + grads + rep;
    const int64_t ends = (q.train ? 2 : 1) * req.root_stream_bytes + m_bytes + shard_bytes + rep;
    return row.param_bytes + req.root_held_bytes + std::max(ends, work + work * 6 / 100);
  };
  auto one_process = [&](int64_t target, const std::vector<Recompute>& policy, Af3Plan* p) {
    Af3PlanRequest o = q;
    o.memory_bytes = 0;
    o.chunk_target_bytes = target * N;
    o.policy = policy;
    return af3_plan(o, p);
  };
  const bool budget = q.memory_bytes > 0;
  if (!q.train) {
    auto peak_at = [&](int64_t target, Af3PlanRow* row) -> Status {
      Af3Plan p;
      FC_RETURN_IF_ERROR(one_process(target, {}, &p));
      *row = p.rows[0];
      row->chunk_target_bytes = target;
      row->peak_bytes = rank_peak(p.rows[0], target);
      return Status::OK();
    };
    int64_t hi = q.chunk_target_bytes > 0 ? q.chunk_target_bytes : auto_target;
    Af3PlanRow row, low;
    FC_RETURN_IF_ERROR(peak_at(hi, &row));
    FC_RETURN_IF_ERROR(peak_at(q.chunk_target_bytes > 0 || q.chunk > 0 ? hi : 1, &low));
    out->least_bytes = low.peak_bytes;
    if (budget && row.peak_bytes > q.memory_bytes && q.chunk == 0 && q.chunk_target_bytes == 0 &&
        low.peak_bytes <= q.memory_bytes) {
      int64_t lo = 1;  // fits at lo, not at hi
      while (hi - lo > 1) {
        const int64_t mid = lo + (hi - lo) / 2;
        Af3PlanRow m;
        FC_RETURN_IF_ERROR(peak_at(mid, &m));
        (m.peak_bytes <= q.memory_bytes ? lo : hi) = mid;
      }
      FC_RETURN_IF_ERROR(peak_at(lo, &row));
    }
    row.fits = !budget || row.peak_bytes <= q.memory_bytes;
    out->rows.push_back(row);
    out->chosen = row.fits ? 0 : -1;
    return Status::OK();
  }
  const int64_t target = q.chunk_target_bytes > 0 ? q.chunk_target_bytes : auto_target;
  std::vector<std::vector<Recompute>> candidates;
  if (q.policy.empty())
    candidates = {{Recompute::kNone}, {Recompute::kModule}, {Recompute::kBlock}};
  else
    candidates = {q.policy};
  out->least_bytes = INT64_MAX;
  for (const std::vector<Recompute>& p : candidates) {
    Af3Plan one;
    FC_RETURN_IF_ERROR(one_process(target, p, &one));
    Af3PlanRow row = one.rows[0];
    row.chunk_target_bytes = target;
    row.activation_bytes = ceil_div(row.activation_bytes, N);
    row.peak_bytes = rank_peak(one.rows[0], target);
    row.fits = !budget || row.peak_bytes <= q.memory_bytes;
    out->least_bytes = std::min(out->least_bytes, row.peak_bytes);
    if (row.fits && out->chosen < 0) out->chosen = static_cast<int>(out->rows.size());
    out->rows.push_back(row);
  }
  return Status::OK();
}

}  // namespace fc
