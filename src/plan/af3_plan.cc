// The AF3 stacks' memory plan (af3_plan, include/foldcube/af3.h): the inference peak from the
// layers' workspace formulas, the training step from the memory model's replay of the block
// tables.
#include <algorithm>

#include "foldcube/af3.h"
#include "foldcube/model.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "plan/memory_model.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);

bool is_pairformer(const Af3Config& c) { return c.kind == "pairformer"; }

// Rows of the table's m stream: 1 (the single stream) or the MSA rows.
int64_t m_rows(const Af3Config& c, int64_t n_msa) { return is_pairformer(c) ? 1 : n_msa; }

// The stack's weights: the blocks' structs (as the gradient structs the memory model counts) and
// the MSA module's two projections.
int64_t param_bytes(const Af3Config& c, int64_t blocks) {
  const EvoformerConfig t = af3_trunk_config(c);
  const int64_t proj = is_pairformer(c) ? 0 : c.c_m * (c.c_s + c.msa_feat);
  return (blocks * block_param_elems(t, is_pairformer(c) ? kPairformerBlock : kMsaModuleBlock) +
          proj) *
         kF;
}

// The caller's inputs: s and z, or z, emb, msa_feat and the masks.
int64_t input_bytes(const Af3Config& c, int64_t n, int64_t n_msa) {
  if (is_pairformer(c)) return (n * c.c_s + n * n * c.c_z + n) * kF;
  return (n * n * c.c_z + n * c.c_s + n_msa * n * (c.msa_feat + 1) + n) * kF;
}

// The pair mask and the key and pair mask biases with their transposes (prepare_inputs).
int64_t mask_bias_bytes(int64_t s, int64_t r) { return (r * r + 2 * (s * r + r * r)) * kF; }

// What a training step holds beside the block driver's own peak (stack_step_peak_bytes) while
// the blocks run: the all-ones token mask and the biases (Pairformer); the all-ones MSA mask,
// the biases, the MSA embedding m [N, n, c_m] and the zero dL/d output m (MSA module).
int64_t train_step_inputs_bytes(const Af3Config& c, int64_t n, int64_t n_msa) {
  const int64_t s = m_rows(c, n_msa), r = n;
  if (is_pairformer(c)) return r * kF + mask_bias_bytes(s, r);
  return s * r * kF + mask_bias_bytes(s, r) + 2 * s * r * c.c_m * kF;
}
}  // namespace

int64_t af3_forward_peak_bytes(const Af3Config& c, int64_t n, int64_t n_msa, int64_t chunk,
                               int64_t chunk_target_bytes, int threads, DType dtype) {
  const EvoformerConfig cfg = af3_trunk_config(c);
  const int64_t s = m_rows(c, n_msa), r = n;
  BlockContext ctx = shape_context(cfg, s, r, chunk, chunk_target_bytes, threads);
  ctx.dtype = dtype;
  const BlockTable& t = is_pairformer(c) ? kPairformerBlock : kMsaModuleBlock;
  int64_t work = 0;
  for (const LayerDesc& l : t) work = std::max(work, layer_workspace_bytes(l, ctx));
  // The mask biases; the all-ones token mask (Pairformer: it is the key mask the context keeps;
  // MSA module: alive until the blocks start) and the all-ones MSA mask.
  const int64_t biases = mask_bias_bytes(s, r);
  if (is_pairformer(c)) return r * kF + biases + work;
  // The MSA embedding m [N, n, c_m] lives through the blocks; s_proj(emb) [n, c_m] only while it
  // is built, the token mask until the inputs are prepared.
  const int64_t m = s * r * cfg.c_m * kF, msa_mask = s * r * kF, tok = r * kF;
  const int64_t embed = tok + msa_mask + m + r * cfg.c_m * kF;
  return std::max({embed, tok + msa_mask + m + biases, msa_mask + m + biases + work});
}

Status af3_plan(const Af3PlanRequest& q, Af3Plan* out) {
  *out = Af3Plan{};
  const Af3Config& c = q.cfg;
  FC_RETURN_IF_ERROR(c.validate());
  const int64_t blocks = q.blocks > 0 ? q.blocks : c.no_blocks;
  if (q.n < 1 || q.n_msa < 1 || blocks < 1 || q.threads < 1 || q.chunk < 0 ||
      q.chunk_target_bytes < 0 || q.memory_bytes < 0)
    return Status::InvalidArgument(
        "af3 plan: n, n_msa, blocks and threads must be >= 1; chunk, chunk target and memory "
        ">= 0");
  if (q.dtype != DType::F32 && q.dtype != DType::BF16)
    return Status::InvalidArgument("af3 plan: dtype must be fp32 or bf16");
  if (!q.policy.empty() && q.policy.size() != 1 && static_cast<int64_t>(q.policy.size()) != blocks)
    return Status::InvalidArgument("af3 plan: " + std::to_string(q.policy.size()) +
                                   " recompute policies for " + std::to_string(blocks) + " blocks");
  const double elems = (double(q.n) * q.n + double(q.n_msa) * q.n) *
                       std::max({c.c_s, c.c_z, c.c_m, c.c_hidden_opm * c.c_hidden_opm}) * 8;
  if (elems * blocks * kF > 9e18)
    return Status::InvalidArgument("af3 plan: shape too large to count in bytes");
  const EvoformerConfig t = af3_trunk_config(c);
  const int64_t s = m_rows(c, q.n_msa), r = q.n;
  const int64_t params = param_bytes(c, blocks);
  out->input_bytes = input_bytes(c, q.n, q.n_msa);
  const int64_t base = params + out->input_bytes;
  auto fits = [&](int64_t peak) { return q.memory_bytes == 0 || base + peak <= q.memory_bytes; };
  if (!q.train) {
    Af3PlanRow row;
    row.param_bytes = params;
    auto peak = [&](int64_t target) {
      return af3_forward_peak_bytes(c, q.n, q.n_msa, q.chunk, target, q.threads, q.dtype);
    };
    int64_t hi =
        q.chunk_target_bytes > 0 ? q.chunk_target_bytes : default_chunk_target_bytes(t, s, r);
    if (!fits(peak(hi)) && q.chunk == 0 && q.chunk_target_bytes == 0 && fits(peak(1))) {
      int64_t lo = 1;  // fits at lo, not at hi; the peak never grows as the target shrinks
      while (hi - lo > 1) {
        const int64_t mid = lo + (hi - lo) / 2;
        (fits(peak(mid)) ? lo : hi) = mid;
      }
      hi = lo;
    }
    row.chunk_target_bytes = hi;
    row.peak_bytes = peak(hi);
    row.fits = fits(row.peak_bytes);
    out->rows.push_back(row);
    out->chosen = row.fits ? 0 : -1;
    return Status::OK();
  }
  const BlockTable& table = is_pairformer(c) ? kPairformerBlock : kMsaModuleBlock;
  const int64_t target =
      q.chunk_target_bytes > 0 ? q.chunk_target_bytes : default_train_chunk_target_bytes(t, s, r);
  std::vector<std::vector<Recompute>> candidates;
  if (q.policy.empty())
    candidates = {{Recompute::kNone}, {Recompute::kModule}, {Recompute::kBlock}};
  else
    candidates = {q.policy};
  for (const std::vector<Recompute>& p : candidates) {
    Af3PlanRow row;
    row.policy = p.front();
    row.chunk_target_bytes = target;
    row.param_bytes = params;
    row.activation_bytes =
        stack_activation_bytes(table, t, s, r, blocks, p, kF, q.chunk, target, q.dtype);
    // After the blocks, the Boltz-named gradients of the triangle multiplications' p_in and
    // g_in are gathered from two row ranges each (copies: 8 c_z^2 floats per block), beside the
    // step's other outputs; counted on top of the blocks' peak, so the row is an upper bound by
    // at most those copies (exact when the peak falls inside the blocks, as it does with
    // recompute none).
    const int64_t gathered = blocks * 8 * c.c_z * c.c_z * kF;
    row.peak_bytes =
        train_step_inputs_bytes(c, q.n, q.n_msa) + gathered +
        stack_step_peak_bytes(table, t, s, r, blocks, p, q.threads, kF, q.chunk, target, q.dtype);
    row.fits = fits(row.peak_bytes);
    if (row.fits && out->chosen < 0) out->chosen = static_cast<int>(out->rows.size());
    out->rows.push_back(row);
  }
  return Status::OK();
}

}  // namespace fc
