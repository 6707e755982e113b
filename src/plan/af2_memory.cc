// Memory model of AlphaFold::forward (src/model/af2/alphafold.cc) and the whole-model budget
// plan: a replay of the forward's tracked allocations in the order the model code makes them.
// Any change to the allocations of a stage must change its replay here; tests/af2_memory_test.cc
// compares every stage of both against the allocator byte for byte.
#include <algorithm>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "foldcube/alphafold.h"
#include "model/af2/block_sizes.h"
#include "model/block_table.h"
#include "model/common.h"
#include "plan/af2_memory_internal.h"
#include "plan/memory_model.h"

namespace fc {
namespace {

constexpr int64_t kF = 4, kI = 8;  // bytes of F32 and I64
constexpr int64_t kAtom37 = 37, kAtom14 = 14, kRigidGroups = 8, kAngles = 7;

// Bytes of one pass of each feature the model reads, in the order pass_features copies them
// (template_mask last, apart); each entry is (numel, element bytes).
std::vector<std::pair<int64_t, int64_t>> pass_features(const AlphaFoldConfig& cfg,
                                                       const AlphaFoldDims& d, int64_t r) {
  const int64_t S = d.S, E = d.E, T = d.T;
  std::vector<std::pair<int64_t, int64_t>> f = {
      {r, kI}, {r, kI},     {r * 22, kF}, {S * r * 49, kF}, {S * r, kF},
      {r, kF}, {E * r, kI}, {E * r, kF},  {E * r, kF},      {E * r, kF}};
  if (cfg.templates && d.templates_given)
    for (auto e : {std::pair{T * r, kI},
                   {T * r * kAtom37 * 3, kF},
                   {T * r * kAtom37, kF},
                   {T * r * 3, kF},
                   {T * r, kF},
                   {T * r * 14, kF},
                   {T * r * 14, kF},
                   {T * r * 7, kF}})
      f.push_back(e);
  return f;
}

}  // namespace

int64_t af2_sm_output_bytes(const AlphaFoldConfig& cfg, int64_t r) {
  return cfg.structure_layers * r *
         (7 + kRigidGroups * 16 + 2 * kAngles * 2 + kAtom14 * 3 + cfg.evoformer.c_s) * kF;
}

int64_t af2_sm_layer_bytes(const AlphaFoldConfig& cfg, int64_t r, int64_t o_pair) {
  const int64_t H = cfg.ipa_heads, C = cfg.ipa_hidden, Pq = cfg.ipa_qk_points;
  const int64_t Pv = cfg.ipa_v_points, cr = cfg.c_resnet, cs = cfg.evoformer.c_s;
  const int64_t width = H * (C + 4 * Pv + cfg.evoformer.c_z);
  const int64_t ipa_in = r * (3 * H * C + 3 * H * Pq + 3 * H * (Pq + Pv)) * kF;
  const int64_t ipa = ipa_in + std::max(r * 3 * H * (Pq + Pv) * kF,
                                        (r * width + H * r * r + 2 * r * Pv * 3) * kF + o_pair);
  const int64_t resnet = (2 * r * cr + std::max(2 * r * cs, r * cr)) * kF;
  return std::max({ipa, 3 * r * cs * kF, resnet});
}

void af2_plddt_head(const AlphaFoldConfig& cfg, int64_t r, Af2Replay* m) {
  const int64_t ch = cfg.plddt_hidden, cs = cfg.evoformer.c_s;
  m->alloc((r * cs + 2 * r * ch + r * cfg.plddt_bins + r) * kF);
  m->free((r * cs + 2 * r * ch) * kF);  // the hidden layers
}

int64_t af2_padded_feature_bytes(const AlphaFoldConfig& cfg, const AlphaFoldDims& d) {
  const int64_t R = d.feature_passes > 0 ? d.feature_passes : d.passes;
  int64_t b = 0;
  for (auto [numel, elem] : pass_features(cfg, d, d.r)) b += numel * elem * R;
  return b;
}

int64_t af2_pass_feature_bytes(const AlphaFoldConfig& cfg, const AlphaFoldDims& d) {
  const int64_t R = d.feature_passes > 0 ? d.feature_passes : d.passes;
  if (R <= 1) return 0;
  int64_t b = 0;
  for (auto [numel, elem] : pass_features(cfg, d, d.r)) b += numel > 1 ? numel * elem : 0;
  if (cfg.templates && d.templates_given && d.T > 1) b += d.T * kF;  // template_mask
  return b;
}

Status alphafold_dims(const AlphaFoldConfig& cfg, const FeatureDict& f, AlphaFoldDims* out) {
  auto dim = [&](const char* name, int axis, int64_t* v) -> Status {
    auto it = f.find(name);
    if (it == f.end() || !it->second.defined())
      return Status::NotFound(std::string("feature '") + name + "' is missing");
    if (it->second.ndim() <= axis)
      return Status::InvalidArgument(std::string("feature '") + name + "' has too few axes");
    *v = it->second.dim(axis);
    return Status::OK();
  };
  AlphaFoldDims d;
  int64_t R = 0;
  FC_RETURN_IF_ERROR(dim("aatype", 0, &d.r));
  FC_RETURN_IF_ERROR(dim("aatype", 1, &R));
  FC_RETURN_IF_ERROR(dim("msa_feat", 0, &d.S));
  FC_RETURN_IF_ERROR(dim("extra_msa", 0, &d.E));
  d.templates_given = cfg.templates && f.count("template_aatype");
  if (d.templates_given) FC_RETURN_IF_ERROR(dim("template_aatype", 0, &d.T));
  if (d.r < 1 || d.S < 1 || d.E < 1 || R < 1)
    return Status::InvalidArgument("features: r, S, E and the recycling passes must be >= 1");
  d.passes = d.feature_passes = static_cast<int>(R);
  *out = d;
  return Status::OK();
}

Status alphafold_forward_memory(const AlphaFoldConfig& cfg, const AlphaFoldDims& d,
                                const AlphaFoldOptions& opts, int threads, AlphaFoldMemory* out) {
  const int64_t chunk = opts.chunk, target = opts.chunk_target_bytes;
  FC_RETURN_IF_ERROR(cfg.evoformer.validate());
  if (opts.dtype != DType::F32 && opts.dtype != DType::BF16)
    return Status::InvalidArgument("alphafold memory: dtype must be F32 or BF16");
  if (d.r < 1 || d.S < 1 || d.E < 1 || d.T < 0 || d.passes < 1 || chunk < 0 || target < 0 ||
      opts.pair_block_bytes < 0 || threads < 1)
    return Status::InvalidArgument(
        "alphafold memory: r, S, E, passes and threads must be >= 1, T, chunk and the chunk "
        "target >= 0");
  const EvoformerConfig& ev = cfg.evoformer;
  const int64_t r = d.r, S = d.S, E = d.E, rr = r * r, cm = ev.c_m, cz = ev.c_z, cs = ev.c_s;
  const int64_t T = cfg.templates ? d.T : 0;
  const int64_t rows = af2::pair_block_rows(r, cz, opts.pair_block_bytes);
  AlphaFoldMemory mem;
  Af2Replay m;
  auto stage = [&](int pass, const char* name) {
    mem.stages.push_back({pass, name, 0.0, m.entry, m.stage_peak});
  };
  const int64_t pf = af2_pass_feature_bytes(cfg, d);
  const int64_t prev = (r * cm + rr * cz + r * kAtom37 * 3) * kF;  // m_prev, z_prev, x_prev
  const bool padded = d.r_features > 0 && d.r_features < d.r;
  if (padded) {
    // pad_residues: a copy of every feature the model reads at r residues, all R passes
    m.alloc(af2_padded_feature_bytes(cfg, d));
  }
  for (int k = 0; k < d.passes; ++k) {
    m.alloc(pf);
    if (k == 0) m.alloc(prev);
    m.alloc((S * r * cm + rr * cz) * kF);  // m, z
    // input embedder: a_i, a_j, the relative-position table, the target_feat projection
    m.begin();
    m.transient((2 * r * cz + (2 * cfg.relpos_k + 1) * cz + r * cm) * kF);
    stage(k, "input_embedder");
    // recycling embedder: pseudo-beta, LN(m_prev), a block of rows of the recycled pair
    m.begin();
    m.transient((r * 3 + r * cm + rows * r * cz) * kF);
    stage(k, "recycling_embedder");
    m.alloc(rr * kF);    // pair_mask
    int64_t single = 0;  // template MSA rows
    if (T > 0) {
      const EvoformerConfig& tc = cfg.template_pair;
      const int64_t H = cfg.template_att_heads, hc = H * cfg.template_att_hidden;
      const int64_t blk = af2::template_block_positions(rr, hc, opts.pair_block_bytes);
      m.begin();
      const int64_t base = (2 * rr + rr * hc + 2 * rr * H) * kF;  // mask biases, o, den, mx
      m.alloc(base);
      const int64_t act = rr * tc.c_z * kF;  // one template's pair activations
      const int64_t ws =
          stack_workspace_bytes(kTemplatePairBlock, tc, 1, r, chunk, target, threads, opts.dtype);
      m.transient(act + std::max({rr * 88 * kF, ws, blk * 3 * hc * kF}));
      m.transient(blk * cz * kF);  // a block of the output projection
      single = T * r * cm * kF;
      m.transient((T * r * 57 + T * r * cm) * kF + single);  // angle features, hidden, single
      m.free(base);
      m.alloc(single);
      stage(k, "template_embedder");
    }
    {
      // extra-MSA stack: embedded rows with their features, then the stack's masks and layers
      const EvoformerConfig& xc = cfg.extra_msa;
      const int64_t a = E * r * xc.c_m * kF;
      m.begin();
      m.transient(a + E * r * 25 * kF);
      m.transient(
          a + 2 * (E * r + rr) * kF +
          stack_workspace_bytes(kExtraMsaBlock, xc, E, r, chunk, target, threads, opts.dtype));
      stage(k, "extra_msa_stack");
    }
    // m_all and mask_all while m and the template rows are alive, then those freed
    m.alloc((S + T) * r * (cm + 1) * kF);
    m.free(S * r * cm * kF + single);
    m.begin();
    m.transient(forward_peak_bytes(ev, S + T, r, true, chunk, target, threads, opts.dtype));
    m.alloc(r * cs * kF);  // s
    stage(k, "evoformer");
    // structure module
    const int64_t H = cfg.ipa_heads, outs = af2_sm_output_bytes(cfg, r);
    m.begin();
    m.alloc((2 * r * cs + rr * H) * kF);  // s0, s, pair bias
    m.transient(rows * r * cz * kF);      // a block of LN_z(z) rows for the pair bias
    m.alloc(outs + (r * cs + r * 6) * kF);
    m.transient(af2_sm_layer_bytes(cfg, r, rows * r * cz * kF));  // o_pair: a block of LN_z(z)
    m.free((2 * r * cs + rr * H + r * 6) * kF);  // s0, pair bias, ipa, upd; s is an output
    stage(k, "structure_module");
    m.alloc((r * kAtom37 * 3 + r * kAtom37) * kF);  // x37, mask37
    if (k + 1 == d.passes) {
      m.begin();
      const int64_t db = cfg.distogram_bins, tb = cfg.tm_bins;
      af2_plddt_head(cfg, r, &m);
      m.alloc((rr * db + S * r * 23 + r * kAtom37) * kF);
      if (cfg.ptm) m.alloc((2 * rr * tb + rr + 2) * kF);
      stage(k, "heads");
      m.alloc(kI);  // num_recycles
    } else {
      // next pass: a copy of m_all's first row becomes m_prev, z and x37 become z_prev and
      // x_prev, and the rest of the pass is freed
      m.alloc(r * cm * kF);
      m.free(prev);
      m.free(pf + (S + T) * r * (cm + 1) * kF + rr * kF + 2 * r * cs * kF + outs +
             r * kAtom37 * kF);
    }
  }
  if (padded) {
    // the outputs cropped to the features' residues, made while the padded ones are alive
    const int64_t n = d.r_features, L = cfg.structure_layers;
    int64_t o = n * kAtom37 * 4 + n * 7 + n * cs + S * n * cm + n * n * cz + n * cs;
    o += L * n * (7 + kRigidGroups * 16 + 2 * kAngles * 2 + kAtom14 * 3 + cs);
    o += n * cfg.plddt_bins + n + n * n * cfg.distogram_bins + S * n * 23 + n * kAtom37;
    if (cfg.ptm) o += 2 * n * n * cfg.tm_bins + n * n + 2;
    m.transient(o * kF + kI);
  }
  mem.peak_bytes = m.peak;
  *out = std::move(mem);
  return Status::OK();
}

Status plan_alphafold(const AlphaFoldConfig& cfg, const AlphaFoldDims& d, int64_t base_bytes,
                      int64_t budget_bytes, int threads, AlphaFoldPlan* out, DType dtype) {
  if (base_bytes < 0 || budget_bytes < 1)
    return Status::InvalidArgument("plan_alphafold: base bytes must be >= 0 and the budget >= 1");
  // One knob: the stacks' chunk target, which also caps the pair blocks of the other stages.
  auto options = [dtype](int64_t target) {
    AlphaFoldOptions o;
    o.dtype = dtype;
    o.chunk_target_bytes = target;
    o.pair_block_bytes = target > 0 && target < (int64_t{4} << 20) ? target : 0;
    return o;
  };
  auto peak = [&](int64_t target, AlphaFoldMemory* mem) {
    return alphafold_forward_memory(cfg, d, options(target), threads, mem);
  };
  auto mib = [](int64_t b) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(b) / 1048576.0);
    return std::string(buf);
  };
  auto top_stage = [](const AlphaFoldMemory& mem) {
    const AlphaFoldStageStat* best = &mem.stages.front();
    for (const AlphaFoldStageStat& s : mem.stages)
      if (s.peak_bytes > best->peak_bytes) best = &s;
    return best->stage;
  };
  AlphaFoldMemory mem;
  FC_RETURN_IF_ERROR(peak(0, &mem));
  if (base_bytes + mem.peak_bytes <= budget_bytes) {
    *out = {0, 0, base_bytes + mem.peak_bytes, top_stage(mem)};
    return Status::OK();
  }
  const int64_t hi0 = std::max({default_chunk_target_bytes(cfg.evoformer, d.S + d.T, d.r),
                                default_chunk_target_bytes(cfg.extra_msa, d.E, d.r),
                                default_chunk_target_bytes(cfg.template_pair, 1, d.r)});
  FC_RETURN_IF_ERROR(peak(1, &mem));
  if (base_bytes + mem.peak_bytes > budget_bytes)
    return Status::OutOfMemory(
        "memory budget " + mib(budget_bytes) + " is too small for AlphaFold2 at r=" +
        std::to_string(d.r) + ", " + std::to_string(d.S) + " clusters, " + std::to_string(d.E) +
        " extra sequences: even the finest chunking peaks at " + mib(base_bytes + mem.peak_bytes) +
        " in the " + top_stage(mem) + " (weights and features " + mib(base_bytes) +
        "); the smallest feasible budget is " + mib(base_bytes + mem.peak_bytes));
  int64_t lo = 1, hi = hi0;  // lo fits; the peak never grows as the target shrinks
  FC_RETURN_IF_ERROR(peak(hi, &mem));
  if (base_bytes + mem.peak_bytes <= budget_bytes) lo = hi;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    FC_RETURN_IF_ERROR(peak(mid, &mem));
    (base_bytes + mem.peak_bytes <= budget_bytes ? lo : hi) = mid;
  }
  FC_RETURN_IF_ERROR(peak(lo, &mem));
  *out = {lo, options(lo).pair_block_bytes, base_bytes + mem.peak_bytes, top_stage(mem)};
  return Status::OK();
}

}  // namespace fc
