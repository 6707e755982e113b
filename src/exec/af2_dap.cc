// The whole AlphaFold2 model under DAP (src/exec/af2_dap.h): the model's stages on row ranges
// (src/model/af2/alphafold_impl.h), the stacks through the DAP executor (dap_run_blocks), and the
// only communication through the dist layer.
#include "exec/af2_dap.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

#include "exec/dap.h"
#include "foldcube/memory.h"
#include "foldcube/runtime.h"
#include "kernels/kernels.h"
#include "model/af2/alphafold_impl.h"
#include "model/af2/block_sizes.h"
#include "model/af2/confidence.h"
#include "model/af2/geometry.h"
#include "model/af2/residue_constants.h"
#include "model/block_table.h"

namespace fc {
namespace {

constexpr int64_t kF = sizeof(float);

// Rows of this rank's shard that are real: rows k*loc .. of `total`.
int64_t valid_rows(int64_t total, int64_t loc, int rank) {
  return std::clamp<int64_t>(total - rank * loc, 0, loc);
}

// The padded masks of one pass: pair [r_pad, r_pad], the Evoformer's MSA [s_pad, r_pad] (cluster
// rows, then the template rows' psi masks) and the extra MSA's [e_pad, r_pad]; zeros beyond.
struct PaddedMasks {
  Tensor pair, msa, extra;
};
PaddedMasks padded_masks(const PassFeatures& f, int64_t T, const DapLayout& le,
                         const DapLayout& lx) {
  const int64_t r = f.r, rp = le.r_pad;
  PaddedMasks p;
  p.pair = Tensor::zeros({rp, rp});
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j)
      p.pair.f32()[i * rp + j] = f.seq_mask.f32()[i] * f.seq_mask.f32()[j];
  p.msa = Tensor::zeros({le.s_pad, rp});
  for (int64_t s = 0; s < f.S; ++s)
    std::memcpy(p.msa.f32() + s * rp, f.msa_mask.f32() + s * r, r * kF);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < r; ++j)
      p.msa.f32()[(f.S + t) * rp + j] = f.t_tors_mask.f32()[(t * r + j) * 7 + 2];
  p.extra = Tensor::zeros({lx.s_pad, rp});
  for (int64_t e = 0; e < f.E; ++e)
    std::memcpy(p.extra.f32() + e * rp, f.extra_msa_mask.f32() + e * r, r * kF);
  return p;
}

// Row shards [loc, w, c] of every rank gathered on the root and cropped to [rows, cols, c]
// (undefined on other ranks).
Tensor gather_rows(const Tensor& shard, int64_t rows, int64_t cols,
                   const dist::Communicator& comm) {
  const int me = comm.rank();
  const int64_t loc = shard.dim(0), w = shard.dim(1), c = shard.numel() / (loc * w);
  Tensor all = me == 0 ? Tensor::empty({loc * comm.size(), w, c}) : Tensor();  // [n*loc, w, c]
  comm.gather(shard.f32(), me == 0 ? all.f32() : nullptr, shard.numel(), 0);
  if (me != 0) return Tensor();
  return crop3(all, rows, cols);
}

// The stacks' contexts run in the forward's dtype (bf16 GEMM inputs, as one process).
void set_dtype(DapShards* sh, DType dtype) {
  for (BlockContext* c : {&sh->row, &sh->col, &sh->full}) c->dtype = dtype;
}

// The sharded forward on features of r residues; keep > 0: the outputs are those of the first
// `keep` residues (a pad_to run: pTM over them, every output cropped to them).
Status dap_forward_impl(const AlphaFold& model, const dist::Communicator& comm,
                        const FeatureDict& feats, AlphaFoldDapOutputs* out,
                        const AlphaFoldOptions& opts, AlphaFoldDapStats* stats, int64_t keep) {
  const AlphaFold::Impl& M = AlphaFoldAccess::impl(model);
  const AlphaFoldConfig& cfg = M.cfg;
  auto it = feats.find("aatype");
  if (it == feats.end()) return Status::NotFound("feature 'aatype' is missing");
  if (!it->second.defined() || it->second.ndim() != 2 || it->second.dim(1) < 1)
    return Status::InvalidArgument("feature 'aatype' must be [r, R] with R >= 1");
  const int64_t R = it->second.dim(1);
  const int passes =
      opts.passes > 0 ? static_cast<int>(std::min<int64_t>(opts.passes, R)) : static_cast<int>(R);
  const int n = comm.size(), me = comm.rank();
  const bool sharded = M.weight_ranks > 1;  // checked: sharded over these n ranks
  const int64_t cm = cfg.evoformer.c_m, cz = cfg.evoformer.c_z, cs = cfg.evoformer.c_s;
  const int64_t live0 = mem_stats().live_bytes;  // weights and features
  MemoryScope fwd_scope;
  const dist::CommStats comm0 = comm.stats();
  const ShardGather gather{
      n, [&](const float* mine, int64_t count, float* all) { comm.all_gather(mine, all, count); }};
  // Traces: whole tensors on the root; sharded ones gathered to it on a communicator of their own
  // (so the stats count only the forward's traffic).
  const bool tracing = static_cast<bool>(opts.trace);
  const dist::Communicator trace_comm = tracing ? comm.split(0, me) : comm;

  Tensor m_prev;                         // [r, c_m] on the root: m[0] of the previous pass
  Tensor z_prev;                         // [r_loc, r_pad, c_z] this rank's rows of the previous z
  Tensor x_prev;                         // [r, 37, 3]
  std::map<std::string, Tensor> result;  // outputs whole on every rank (small)
  std::map<std::string, Tensor> pair_shards, msa_shards;  // row shards of the other outputs
  int64_t r = 0, S = 0, shard_bytes = 0;
  for (int k = 0; k < passes; ++k) {
    PassFeatures f;
    FC_RETURN_IF_ERROR(af2::pass_features(feats, cfg.templates, k, R, &f));
    r = f.r;
    S = f.S;
    const int64_t T = cfg.templates ? f.T : 0, E = f.E;
    const DapLayout le = dap_layout(S + T, r, n, me);  // Evoformer rows S + T
    const DapLayout lx = dap_layout(E, r, n, me);      // extra-MSA rows
    const int64_t rl = le.r_loc, rp = le.r_pad, sl = le.s_loc, i0 = me * rl;
    const int64_t nrow = valid_rows(r, rl, me);  // real pair rows of this rank
    if (k == 0) {
      if (me == 0) m_prev = Tensor::zeros({r, cm});
      z_prev = Tensor::zeros({rl, rp, cz});
      x_prev = Tensor::zeros({r, af2::kAtom37, 3});
    }
    // The root traces a tensor every rank holds whole, or the first rows x cols of the row
    // shards [loc, w, c] of every rank, gathered.
    auto trace_whole = [&](const std::string& name, int index, const Tensor& v) {
      if (tracing && me == 0) opts.trace(k, name, index, v);
    };
    auto trace_rows = [&](const std::string& name, int index, const Tensor& shard, int64_t rows,
                          int64_t cols) {
      if (!tracing) return;
      const Tensor all = gather_rows(shard, rows, cols, trace_comm);  // [rows, cols, c] on the root
      if (me == 0) opts.trace(k, name, index, all);
    };
    AlphaFold::Impl::Emit emit_root;  // the root's trace of whole tensors
    if (tracing && me == 0)
      emit_root.fn = [&opts, k](const std::string& name, int index, const Tensor& v) {
        opts.trace(k, name, index, v);
      };
    auto stage = [&](const char* name, auto&& fn) -> Status {
      if (cancel_requested())
        return Status::Cancelled(std::string("AlphaFold interrupted before ") + name);
      MemoryScope scope;
      const auto t0 = std::chrono::steady_clock::now();
      Status st = fn();
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (opts.stats)
        opts.stats->push_back({k, name, ms, scope.start_live() - live0, scope.peak() - live0});
      if (st.ok() && opts.progress) opts.progress(k, name);
      return st;
    };
    const PaddedMasks pm = padded_masks(f, T, le, lx);
    // The Evoformer rows of m are embedded at the start of the Evoformer stage, so that they are
    // not alive during the extra-MSA stack (the largest stage); until then only the template
    // single rows are kept.
    Tensor m;                                // [s_loc, r_pad, c_m] Evoformer rows of this rank
    Tensor tmpl_single;                      // [T, r, c_m] the template rows S .. S+T of m
    Tensor z = Tensor::zeros({rl, rp, cz});  // [r_loc, r_pad, c_z] pair rows of this rank
    FC_RETURN_IF_ERROR(stage("input_embedder", [&] {
      const AlphaFold::Impl::InputTables t = M.input_tables(f);
      M.embed_pair_rows(f, t, i0, nrow, rp, z.f32());
      return Status::OK();
    }));
    trace_rows("input_embedder.z", -1, z, r, r);
    trace_whole("recycling_embedder.in_m", -1, m_prev);
    trace_rows("recycling_embedder.in_z", -1, z_prev, r, r);
    FC_RETURN_IF_ERROR(stage("recycling_embedder", [&] {
      Tensor pb = Tensor::empty({r, 3});  // [r, 3]
      af2::pseudo_beta(f.aatype.data<int64_t>(), x_prev.f32(), r, pb.f32());
      trace_whole("recycling_embedder.in_pseudo_beta", -1, pb);
      // Traced: all of this rank's recycled rows at once, [r_loc, r_pad, c_z].
      const int64_t rows =
          tracing ? std::max<int64_t>(rl, 1) : af2::pair_block_rows(r, cz, opts.pair_block_bytes);
      Tensor blk = tracing ? Tensor::zeros({rl, rp, cz})
                           : Tensor::empty({std::min(rows, std::max<int64_t>(nrow, 1)), rp, cz});
      for (int64_t a = 0; a < nrow; a += rows) {
        const int64_t nb = std::min(rows, nrow - a);
        M.recycled_pair_rows(pb.f32(), r, z_prev.f32() + a * rp * cz, i0 + a, nb, rp, blk.f32());
        kern::add_inplace(z.f32() + a * rp * cz, cz, blk.f32(), cz, nb * rp, cz);
      }
      trace_rows("recycling_embedder.z", -1, blk, r, r);
      z_prev = Tensor();
      return Status::OK();
    }));
    if (T > 0) {
      trace_rows("template.in_z", -1, z, r, r);
      FC_RETURN_IF_ERROR(stage("template_embedder", [&] {
        const EvoformerConfig& tc = cfg.template_pair;
        const int64_t ct = tc.c_z, H = cfg.template_att_heads, hc = H * cfg.template_att_hidden;
        const DapLayout lt = dap_layout(n, r, n, me);  // pair-only: one dummy sequence per rank
        DapShards sh = make_dap_shards(tc, lt, Tensor::zeros({lt.s_pad, rp}), pm.pair, opts.chunk,
                                       opts.chunk_target_bytes, num_threads());
        set_dtype(&sh, opts.dtype);
        std::vector<const void*> blocks;
        for (const TemplateBlock& b : M.tmpl_blocks) blocks.push_back(&b.w);
        const int64_t npos = rl * rp;
        const int64_t block = af2::template_block_positions(r * r, hc, opts.pair_block_bytes);
        Tensor o = Tensor::zeros({npos, hc});            // [r_loc*r_pad, H*C]
        Tensor den = Tensor::zeros({npos, H});           // [r_loc*r_pad, H]
        Tensor mx = Tensor::full({npos, H}, -INFINITY);  // [r_loc*r_pad, H]
        DapBlockBuffer buf;  // sharded weights: one template block from its owner
        if (sharded) allocate_dap_block_buffer(kTemplatePairBlock, tc, &buf);
        for (int64_t t = 0; t < T; ++t) {
          Tensor act = Tensor::empty({rl, rp, ct});  // [r_loc, r_pad, c_t]
          {
            Tensor feat = Tensor::zeros({rl, rp, 88});  // [r_loc, r_pad, 88]
            af2::template_pair_feat(f, t, i0, nrow, rp, feat.f32());
            trace_rows("template.pair_feat", static_cast<int>(t), feat, r, r);
            af2::apply_linear(M.tmpl_pair_lin, feat.f32(), npos, act.f32());
          }
          trace_rows("template.pair_act", static_cast<int>(t), act, r, r);
          dap_run_sharded_blocks(kTemplatePairBlock, blocks, sharded ? &buf : nullptr, sh, comm,
                                 nullptr, &act);
          af2::apply_layernorm(M.tmpl_ln, act.f32(), npos, ct, act.f32());
          trace_rows("template.pair_stack", static_cast<int>(t), act, r, r);
          const float mask_bias = cfg.template_att_inf * (f.t_mask.f32()[t] - 1.0f);
          M.template_attention_update(z.f32(), act.f32(), npos, block, mask_bias, o.f32(),
                                      den.f32(), mx.f32());
        }
        M.template_attention_normalise(o.f32(), den.f32(), npos);
        float any = 0.0f;
        for (int64_t t = 0; t < T; ++t) any += f.t_mask.f32()[t];
        if (tracing) {  // as one process when traced: the whole local projection, then added
          Tensor att = Tensor::empty({rl, rp, cz});  // [r_loc, r_pad, c_z]
          af2::apply_linear(M.tmpl_o, o.f32(), npos, att.f32());
          trace_rows("template.pointwise_att", -1, att, r, r);
          if (!(any > 0.0f)) std::fill(att.f32(), att.f32() + att.numel(), 0.0f);
          trace_rows("template.template_pair_embedding", -1, att, r, r);
          kern::add_inplace(z.f32(), cz, att.f32(), cz, npos, cz);
        } else if (any > 0.0f) {
          M.template_attention_add(o.f32(), npos, block, z.f32());
        }
        tmpl_single = M.template_single(f, emit_root);
        return Status::OK();
      }));
    }
    FC_RETURN_IF_ERROR(stage("extra_msa_stack", [&] {
      const int64_t ce = cfg.extra_msa.c_m, el = lx.s_loc;
      Tensor a = Tensor::zeros({el, rp, ce});  // [e_loc, r_pad, c_e] extra rows of this rank
      Tensor xf = tracing ? Tensor::zeros({el, rp, 25}) : Tensor();  // [e_loc, r_pad, 25] traced
      for (int64_t i = 0; i < valid_rows(E, el, me); ++i) {
        AlphaFold::Impl::Emit row_feat;  // [1, r, 25] into row i of xf
        if (tracing)
          row_feat.fn = [&, i](const std::string&, int, const Tensor& v) {
            std::memcpy(xf.f32() + i * rp * 25, v.f32(), v.numel() * kF);
          };
        M.extra_embedding_rows(f, me * el + i, 1, a.f32() + i * rp * ce, row_feat);
      }
      trace_rows("extra_msa.feat", -1, xf, E, r);
      xf = Tensor();
      trace_rows("extra_msa.embedding", -1, a, E, r);
      trace_rows("extra_msa_stack.in_z", -1, z, r, r);
      DapShards sh = make_dap_shards(cfg.extra_msa, lx, pm.extra, pm.pair, opts.chunk,
                                     opts.chunk_target_bytes, num_threads());
      set_dtype(&sh, opts.dtype);
      for (BlockContext* c : {&sh.row, &sh.col, &sh.full}) c->global_eps = M.extra.global_eps();
      std::vector<const void*> blocks;
      for (int b = 0; b < cfg.extra_msa.no_blocks; ++b)
        blocks.push_back(&StackAccess::block(M.extra, b));
      DapBlockBuffer buf;  // sharded weights: one Extra-MSA block from its owner
      if (sharded) allocate_dap_block_buffer(kExtraMsaBlock, cfg.extra_msa, &buf);
      dap_run_sharded_blocks(kExtraMsaBlock, blocks, sharded ? &buf : nullptr, sh, comm, &a, &z);
      trace_rows("extra_msa_stack.z", -1, z, r, r);
      return Status::OK();
    }));
    Tensor s = Tensor::empty({r, cs});  // [r, c_s] on every rank
    FC_RETURN_IF_ERROR(stage("evoformer", [&] {
      // This rank's Evoformer rows: clusters (input embedder), m[0] += LN(m_prev) (recycling
      // embedder; m[0] is the root's first row), the template rows among them.
      m = Tensor::zeros({sl, rp, cm});
      M.embed_msa_rows(f, me * sl, valid_rows(S, sl, me), rp, m.f32());
      trace_rows("input_embedder.m", -1, m, S, r);
      if (me == 0) {
        Tensor rm = Tensor::empty({r, cm});  // [r, c_m]
        af2::apply_layernorm(M.rec_ln_m, m_prev.f32(), r, cm, rm.f32());
        trace_whole("recycling_embedder.m", -1, rm);
        kern::add_inplace(m.f32(), cm, rm.f32(), cm, r, cm);
      }
      for (int64_t i = 0; i < sl; ++i) {
        const int64_t g = me * sl + i - S;
        if (g >= 0 && g < T)
          std::memcpy(m.f32() + i * rp * cm, tmpl_single.f32() + g * r * cm, r * cm * kF);
      }
      tmpl_single = Tensor();
      trace_rows("evoformer.in_m", -1, m, S + T, r);
      trace_rows("evoformer.in_z", -1, z, r, r);
      DapShards sh = make_dap_shards(cfg.evoformer, le, pm.msa, pm.pair, opts.chunk,
                                     opts.chunk_target_bytes, num_threads());
      set_dtype(&sh, opts.dtype);
      for (BlockContext* c : {&sh.row, &sh.col, &sh.full})
        c->global_eps = ExtraMsaStack::kDefaultGlobalEps;
      std::vector<const void*> blocks;
      for (int b = 0; b < cfg.evoformer.no_blocks; ++b)
        blocks.push_back(&StackAccess::block(M.evoformer, b));
      DapBlockBuffer buf;  // sharded weights: one Evoformer block from its owner
      if (sharded) allocate_dap_block_buffer(kEvoformerBlock, cfg.evoformer, &buf);
      dap_run_sharded_blocks(kEvoformerBlock, blocks, sharded ? &buf : nullptr, sh, comm, &m, &z);
      if (me == 0)
        kern::linear(m.f32(), cm, r, cm, M.evoformer.linear_weight().f32(),
                     M.evoformer.linear_bias().f32(), cs, s.f32(), cs);
      comm.broadcast(s.f32(), r * cs, 0);
      return Status::OK();
    }));
    trace_rows("evoformer.m", -1, m, S + T, r);
    trace_rows("evoformer.z", -1, z, r, r);
    trace_whole("evoformer.s", -1, s);
    shard_bytes = (m.numel() + z.numel()) * kF;
    af2::StructureModuleOutput sm_out;
    FC_RETURN_IF_ERROR(stage("structure_module", [&] {
      if (tracing) {                              // LN_z(z) of this rank's rows, only to be traced
        Tensor zl = Tensor::empty({rl, rp, cz});  // [r_loc, r_pad, c_z]
        af2::apply_layernorm(M.sm.ln_z, z.f32(), rl * rp, cz, zl.f32());
        trace_rows("sm.pair_ln", -1, zl, r, r);
      }
      const af2::PairRows pv{z.f32(), i0, rl, rp, gather};
      return af2::structure_module_rows(M.sm, M.sm_cfg, s, pv, f.aatype.data<int64_t>(),
                                        f.seq_mask.f32(), &sm_out, emit_root.structure(),
                                        opts.pair_block_bytes);
    }));
    emit_root.structure_outputs(sm_out);
    const int64_t L = M.sm_cfg.no_blocks;
    Tensor x37 = Tensor::empty({r, af2::kAtom37, 3});  // [r, 37, 3]
    Tensor mask37 = Tensor::empty({r, af2::kAtom37});  // [r, 37]
    af2::atom14_to_atom37(f.aatype.data<int64_t>(),
                          sm_out.positions.f32() + (L - 1) * r * af2::kAtom14 * 3, r, x37.f32(),
                          mask37.f32());
    trace_whole("final_atom_positions", -1, x37);
    // The root decides the early stop (every rank computed the same structure).
    int converged = opts.recycle_tolerance > 0 && k > 0 &&
                    af2::ca_distance_change(x_prev, x37, f.seq_mask) < opts.recycle_tolerance;
    comm.broadcast_bytes(&converged, sizeof(converged), 0);
    if (k + 1 == passes || converged) {
      FC_RETURN_IF_ERROR(stage("heads", [&] {
        M.plddt_head(sm_out.single, &result);
        const int64_t db = M.distogram.w.dim(0);
        Tensor dist = Tensor::empty({rl, rp, db});  // [r_loc, r_pad, 64] then symmetrised
        af2::apply_linear(M.distogram, z.f32(), rl * rp, dist.f32());
        {
          Tensor dt = pair_transpose(dist.clone(), le, comm);  // rows of the logits' transpose
          kern::add_inplace(dist.f32(), db, dt.f32(), db, rl * rp, db);
        }
        pair_shards["distogram_logits"] = dist;
        Tensor mm = Tensor::empty({sl, rp, 23});  // [s_loc, r_pad, 23]
        af2::apply_linear(M.masked_msa, m.f32(), sl * rp, mm.f32());
        msa_shards["masked_msa_logits"] = mm;
        Tensor er = Tensor::empty({r, af2::kAtom37});  // [r, 37] from the Evoformer single
        af2::apply_linear(M.exp_resolved, s.f32(), r, er.f32());
        result["experimentally_resolved_logits"] = er;
        if (cfg.ptm) {
          const int64_t tb = M.tm.w.dim(0);
          Tensor logits = Tensor::empty({rl, rp, tb});  // [r_loc, r_pad, 64]
          af2::apply_linear(M.tm, z.f32(), rl * rp, logits.f32());
          Tensor probs = Tensor::empty({rl, rp, tb}), pae = Tensor::empty({rl, rp, 1});
          af2::aligned_error_positions(logits.f32(), rl * rp, tb, 31.0f, probs.f32(), pae.f32());
          const int64_t rk = keep > 0 ? keep : r;  // pTM over the kept residues
          float mine = af2::predicted_tm_rows(logits.f32(), nullptr, valid_rows(rk, rl, me), rk, rp,
                                              tb, 31.0f);
          std::vector<float> all(n);  // [n] each rank's best row
          comm.all_gather(&mine, all.data(), 1);
          std::vector<float> centres(tb);  // [bins]
          af2::aligned_error_centres(tb, 31.0f, centres.data());
          Tensor max_pae = Tensor::empty({}), ptm = Tensor::empty({});
          max_pae.f32()[0] = centres[tb - 1];
          ptm.f32()[0] = *std::max_element(all.begin(), all.end());
          pair_shards["tm_logits"] = logits;
          pair_shards["aligned_confidence_probs"] = probs;
          pair_shards["predicted_aligned_error"] = pae;
          result["max_predicted_aligned_error"] = max_pae;
          result["ptm_score"] = ptm;
        }
        return Status::OK();
      }));
      af2::put_last_pass_outputs(sm_out, x37, mask37, s, k + 1, &result);
      pair_shards["pair"] = z;
      msa_shards["msa"] = m;
      break;
    }
    if (me == 0) {  // m[0] without the padded columns
      m_prev = Tensor::empty({r, cm});
      std::memcpy(m_prev.f32(), m.f32(), r * cm * kF);
    }
    z_prev = z;
    x_prev = x37;
  }
  m_prev = Tensor();
  z_prev = Tensor();
  if (stats != nullptr) {
    stats->forward_peak_bytes = fwd_scope.peak();
    stats->shard_bytes = shard_bytes;
    stats->comm = comm.stats().since(comm0);
  }
  const int64_t rk = keep > 0 ? keep : r;  // the residues the outputs keep
  AlphaFoldDapOutputs o;
  o.whole = std::move(result);
  if (rk < r)
    for (auto& [name, t] : o.whole) {
      for (int a : af2::output_residue_axes(name)) t = t.slice(a, 0, rk);
      t = t.contiguous();
    }
  for (auto& [name, t] : pair_shards)
    o.rows[name] = {t, rk,
                    name == "predicted_aligned_error" ? Shape{rk, rk} : Shape{rk, rk, t.dim(2)}};
  for (auto& [name, t] : msa_shards) o.rows[name] = {t, S, Shape{S, rk, t.dim(2)}};
  *out = std::move(o);
  return Status::OK();
}

}  // namespace

Status alphafold_dap_forward(const AlphaFold& model, const dist::Communicator& comm,
                             const FeatureDict& feats, AlphaFoldDapOutputs* out,
                             const AlphaFoldOptions& opts, AlphaFoldDapStats* stats) {
  ForwardOptions stack_opts;  // the stacks' dtype rule (fused path)
  stack_opts.dtype = opts.dtype;
  FC_RETURN_IF_ERROR(check_forward_dtype(stack_opts).WithContext("AlphaFold DAP"));
  const AlphaFold::Impl& M = AlphaFoldAccess::impl(model);
  // Sharded weights need the same ranks on every rank (both collectives run on every rank).
  const bool same_ranks = comm.all_equal(static_cast<uint64_t>(M.weight_ranks));
  const bool mine_ok =
      M.weight_ranks == 1 || (M.weight_ranks == comm.size() && M.weight_rank == comm.rank());
  const bool all_ok = comm.all_equal(static_cast<uint64_t>(mine_ok)) && mine_ok;
  if (!same_ranks || !all_ok)
    return Status::InvalidArgument(
        "AlphaFold DAP forward: block weights sharded over " + std::to_string(M.weight_ranks) +
        " ranks here, the run has " + std::to_string(comm.size()) +
        ": shard them with shard_alphafold_weights over the run's ranks on every rank, or on none");
  if (!comm.all_equal(static_cast<bool>(opts.trace)))
    return Status::InvalidArgument(
        "AlphaFoldOptions::trace must be set on every rank of a DAP forward or on none");
  auto it = feats.find("aatype");
  if (opts.pad_to > 0 && it != feats.end() && it->second.defined() && it->second.ndim() == 2 &&
      opts.pad_to != it->second.dim(0)) {
    // Size bucket, as one process: every rank pads its features, the outputs are cropped back.
    const int64_t r = it->second.dim(0);
    FeatureDict padded;
    FC_RETURN_IF_ERROR(af2::pad_residues(feats, r, opts.pad_to, &padded));
    AlphaFoldOptions o = opts;
    o.pad_to = 0;
    return dap_forward_impl(model, comm, padded, out, o, stats, r);
  }
  return dap_forward_impl(model, comm, feats, out, opts, stats, 0);
}

void gather_alphafold_dap_outputs(const AlphaFoldDapOutputs& outs, const dist::Communicator& comm,
                                  std::map<std::string, Tensor>* out) {
  std::map<std::string, Tensor> res;
  if (comm.rank() == 0) res = outs.whole;
  for (const auto& [name, x] : outs.rows) {
    Tensor g = gather_rows(x.shard, x.rows, x.shape[1], comm);  // [rows, r, c] on the root
    if (comm.rank() == 0) res[name] = g.reshape(x.shape);
  }
  if (comm.rank() == 0) *out = std::move(res);
}

Status write_alphafold_dap_outputs(const std::string& path,
                                   const std::map<std::string, std::string>& metadata,
                                   const AlphaFoldDapOutputs& outs, const dist::Communicator& comm,
                                   int64_t* peak_bytes) {
  MemoryScope scope;
  const int n = comm.size(), me = comm.rank();
  // File order: every output by name (the one-process writer's order). A sharded output is
  // broadcast from each rank in turn (one shard at a time) and the root writes its real rows.
  std::map<std::string, std::pair<const Tensor*, const AlphaFoldDapOutputs::Rows*>> all;
  for (const auto& [name, t] : outs.whole) all["output." + name] = {&t, nullptr};
  for (const auto& [name, x] : outs.rows) all["output." + name] = {nullptr, &x};
  std::vector<TensorSpec> specs;
  for (const auto& [name, v] : all)
    specs.push_back(v.first ? TensorSpec{name, v.first->dtype(), v.first->shape()}
                            : TensorSpec{name, DType::F32, v.second->shape});
  // The broadcasts in a fixed order; the root runs those the writer did not (after an I/O
  // error) so that no rank waits.
  std::vector<const AlphaFoldDapOutputs::Rows*> sharded;
  for (const auto& [name, v] : all)
    if (v.second) sharded.push_back(v.second);
  size_t done = 0;  // broadcast steps (tensor, rank) run so far
  auto step = [&](const AlphaFoldDapOutputs::Rows& x, int k, const ByteSink* sink) -> Status {
    const int64_t loc = x.shard.dim(0), w = x.shard.dim(1), c = x.shard.numel() / (loc * w);
    Tensor buf = me == k ? x.shard.contiguous() : Tensor::empty(x.shard.shape());  // [loc, w, c]
    comm.broadcast(buf.f32(), buf.numel(), k);
    ++done;
    if (sink == nullptr) return Status::OK();
    const int64_t r = x.shape[1];  // columns
    for (int64_t i = 0; i < valid_rows(x.rows, loc, k); ++i)
      FC_RETURN_IF_ERROR((*sink)(buf.f32() + i * w * c, r * c * kF));
    return Status::OK();
  };
  Status st;
  if (me == 0) {
    st = write_safetensors_streamed(path, metadata, specs, [&](size_t i, const ByteSink& sink) {
      const auto& v = std::next(all.begin(), static_cast<long>(i))->second;
      if (v.first) return sink(v.first->contiguous().data<char>(), v.first->nbytes());
      for (int k = 0; k < n; ++k) FC_RETURN_IF_ERROR(step(*v.second, k, &sink));
      return Status::OK();
    });
  }
  for (size_t s = 0; s < sharded.size() * n; ++s)
    if (s >= done) step(*sharded[s / n], static_cast<int>(s % n), nullptr);
  std::string err = st.ok() ? "" : st.message();
  comm.broadcast_string(&err, 0);
  if (peak_bytes) *peak_bytes = scope.peak();
  return err.empty() ? Status::OK() : Status::IOError(err);
}

}  // namespace fc
