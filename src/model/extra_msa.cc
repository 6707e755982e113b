// ExtraMsaStack: load / random init / forward of OpenFold's ExtraMSAStack. The shared modules come
// from modules.cc; this file adds the masked MSA transition and the stack around them.
#include "foldcube/extra_msa.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>

#include "core/rng.h"
#include "foldcube/runtime.h"
#include "kernels/kernels.h"
#include "model/common.h"
#include "model/modules.h"
#include "model/weights.h"

namespace fc {

ExtraMsaStack::ExtraMsaStack() = default;
ExtraMsaStack::~ExtraMsaStack() = default;
ExtraMsaStack::ExtraMsaStack(ExtraMsaStack&&) noexcept = default;
ExtraMsaStack& ExtraMsaStack::operator=(ExtraMsaStack&&) noexcept = default;

namespace {
constexpr int64_t kF = sizeof(float);

// m [s*r, c_e] += Transition(m) * msa_mask (one mask value per row). The chunk buffers are those
// of transition(), so module_workspace_bytes("msa_transition") is its workspace too.
void masked_msa_transition(const TransitionW& w, const BlockContext& ctx, float* m) {
  const int64_t rows = ctx.s * ctx.r, c = ctx.cfg->c_m, nc = w.l1.w.dim(0);
  const int64_t ch = pick_chunk(ctx, rows, (c + nc) * kF);
  Tensor t = Tensor::empty({ch, c});   // LN(m) chunk, then the masked update
  Tensor h = Tensor::empty({ch, nc});  // hidden chunk
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    kern::layernorm(m + r0 * c, c, t.f32(), c, n, c, w.ln.w.f32(), w.ln.b.f32(), ctx.cfg->eps_ln);
    kern::linear(t.f32(), c, n, c, w.l1.w.f32(), w.l1.b.f32(), nc, h.f32(), nc);
    kern::relu_inplace(h.f32(), nc, n, nc);
    kern::linear(h.f32(), nc, n, nc, w.l2.w.f32(), w.l2.b.f32(), c, t.f32(), c);
    kern::scale_rows(t.f32(), c, ctx.msa_mask + r0, n, c);
    kern::add_inplace(m + r0 * c, c, t.f32(), c, n, c);
  }
}

// Parses metadata entry `key` as a JSON object into *out; absent key: *out stays null.
Status metadata_object(const TensorFile& f, const std::string& key, nlohmann::json* out) {
  auto it = f.metadata.find(key);
  if (it == f.metadata.end()) return Status::OK();
  *out = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  if (!out->is_object())
    return Status::InvalidArgument("metadata '" + key + "' is not a JSON object");
  return Status::OK();
}

// The global-attention eps and unsupported variants, from the metadata of an ExtraMSA file.
Status read_extra_msa_metadata(const TensorFile& f, float* eps) {
  nlohmann::json constants, config;
  FC_RETURN_IF_ERROR(metadata_object(f, "constants", &constants));
  FC_RETURN_IF_ERROR(metadata_object(f, "config", &config));
  auto find = [](const nlohmann::json& obj, const char* key) -> const nlohmann::json* {
    if (!obj.is_object()) return nullptr;
    auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;  // null counts as absent
  };
  if (const nlohmann::json* o = find(config, "opm_first"); o && o->is_boolean() && o->get<bool>())
    return Status::InvalidArgument(
        "metadata 'config' has opm_first=true (outer product mean first); only the AF2 monomer "
        "order is supported");
  const nlohmann::json* v = find(constants, "global_attention_eps");
  if (v == nullptr) v = find(config, "eps");
  if (v == nullptr) return Status::OK();
  // eps > 0 keeps the mean of a fully masked column finite (0 / eps).
  const float e = v->is_number() ? static_cast<float>(v->get<double>()) : 0.f;
  if (!std::isfinite(e) || !(e > 0.f))
    return Status::InvalidArgument("metadata: global attention eps must be a positive float");
  *eps = e;
  return Status::OK();
}
}  // namespace

Status ExtraMsaStack::load(const EvoformerConfig& cfg, const TensorFile& weights,
                           ExtraMsaStack* out) {
  FC_RETURN_IF_ERROR(cfg.validate());
  FC_RETURN_IF_ERROR(check_block_count(cfg, weights));
  FC_RETURN_IF_ERROR(check_weights_cover_config(cfg, weights));
  ExtraMsaStack st;
  st.cfg_ = cfg;
  FC_RETURN_IF_ERROR(read_extra_msa_metadata(weights, &st.eps_global_));
  for (int i = 0; i < cfg.no_blocks; ++i) {
    auto w = std::make_unique<ExtraMsaBlockWeights>();
    allocate_extra_msa_block(cfg, w.get());
    FC_RETURN_IF_ERROR(load_params(named_params(*w, block_prefix(i)), weights));
    st.blocks_.push_back(std::move(w));
  }
  *out = std::move(st);
  return Status::OK();
}

ExtraMsaStack ExtraMsaStack::random(const EvoformerConfig& cfg, uint64_t seed) {
  ExtraMsaStack st;
  st.cfg_ = cfg;
  for (int i = 0; i < cfg.no_blocks; ++i) {
    auto w = std::make_unique<ExtraMsaBlockWeights>();
    allocate_extra_msa_block(cfg, w.get());
    for (auto& [name, view] : named_params(*w, block_prefix(i))) random_fill(name, view, seed);
    st.blocks_.push_back(std::move(w));
  }
  return st;
}

int64_t ExtraMsaStack::param_bytes() const {
  int64_t n = 0;
  for (const auto& b : blocks_)
    for (auto& [name, t] : named_params(*b, "")) n += static_cast<int64_t>(t.nbytes());
  return n;
}

void ExtraMsaStack::export_weights(TensorFile* out) const {
  for (size_t i = 0; i < blocks_.size(); ++i)
    for (auto& [name, t] : named_params(*blocks_[i], block_prefix(static_cast<int>(i))))
      out->put(name, t);
}

Status ExtraMsaStack::forward(Tensor& m, Tensor& z, const Tensor& msa_mask_in,
                              const Tensor& pair_mask_in, const ForwardOptions& opts) const {
  const EvoformerConfig& cfg = cfg_;
  StackInputs in;
  FC_RETURN_IF_ERROR(prepare_inputs(cfg, m, z, msa_mask_in, pair_mask_in, &in));
  const BlockContext ctx = make_context(cfg, in, opts.chunk, opts.chunk_target_bytes);

  float* mp = m.f32();
  float* zp = z.f32();
  auto trace = [&](int b, const char* name, bool is_m) {
    if (opts.trace) opts.trace(b, name, is_m ? "m" : "z", is_m ? m : z);
  };
  for (int b = 0; b < static_cast<int>(blocks_.size()); ++b) {
    const ExtraMsaBlockWeights& w = *blocks_[b];
    msa_row_attention(w.msa_att_row, ctx, mp, zp);
    trace(b, "msa_att_row", true);
    msa_column_global_attention(w.msa_att_col, ctx, eps_global_, mp);
    trace(b, "msa_att_col", true);
    masked_msa_transition(w.msa_transition, ctx, mp);
    trace(b, "msa_transition", true);
    outer_product_mean(w.outer_product_mean, ctx, mp, zp);
    trace(b, "outer_product_mean", false);
    triangle_multiplication(w.tri_mul_out, ctx, true, zp);
    trace(b, "tri_mul_out", false);
    triangle_multiplication(w.tri_mul_in, ctx, false, zp);
    trace(b, "tri_mul_in", false);
    triangle_attention(w.tri_att_start, ctx, false, zp);
    trace(b, "tri_att_start", false);
    triangle_attention(w.tri_att_end, ctx, true, zp);
    trace(b, "tri_att_end", false);
    transition(w.pair_transition, ctx, zp, in.r * in.r, cfg.c_z);
    trace(b, "pair_transition", false);
  }
  return Status::OK();
}

}  // namespace fc
