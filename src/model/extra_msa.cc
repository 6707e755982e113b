// ExtraMsaStack: load / random init / forward of OpenFold's ExtraMSAStack; its block is the table
// kExtraMsaBlock (src/model/block_table.cc).
#include "foldcube/extra_msa.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>

#include "core/rng.h"
#include "foldcube/runtime.h"
#include "kernels/kernels.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "model/weights.h"

namespace fc {

ExtraMsaStack::ExtraMsaStack() = default;
ExtraMsaStack::~ExtraMsaStack() = default;
ExtraMsaStack::ExtraMsaStack(ExtraMsaStack&&) noexcept = default;
ExtraMsaStack& ExtraMsaStack::operator=(ExtraMsaStack&&) noexcept = default;

namespace {
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
  return StackAccess::load_blocks(cfg, weights, {}, out);
}

Status StackAccess::load_blocks(const EvoformerConfig& cfg, const TensorFile& weights,
                                const std::function<bool(int)>& keep, ExtraMsaStack* out) {
  FC_RETURN_IF_ERROR(cfg.validate());
  FC_RETURN_IF_ERROR(check_block_count(cfg, weights));
  EvoformerConfig held = cfg;  // the blocks loaded, for the coverage check
  held.no_blocks = 0;
  for (int i = 0; i < cfg.no_blocks; ++i) held.no_blocks += !keep || keep(i);
  FC_RETURN_IF_ERROR(check_weights_cover_config(held, weights));
  ExtraMsaStack st;
  st.cfg_ = cfg;
  FC_RETURN_IF_ERROR(read_extra_msa_metadata(weights, &st.eps_global_));
  for (int i = 0; i < cfg.no_blocks; ++i) {
    auto w = std::make_unique<ExtraMsaBlockWeights>();
    if (!keep || keep(i)) {
      allocate_extra_msa_block(cfg, w.get());
      FC_RETURN_IF_ERROR(load_params(named_params(*w, block_prefix(i)), weights));
    }
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
  FC_RETURN_IF_ERROR(check_forward_dtype(opts));
  StackInputs in;
  FC_RETURN_IF_ERROR(prepare_inputs(cfg, m, z, msa_mask_in, pair_mask_in, &in));
  BlockContext ctx = make_context(cfg, in, opts.chunk, opts.chunk_target_bytes);
  ctx.global_eps = eps_global_;
  ctx.fused = opts.fused;
  ctx.dtype = opts.dtype;

  float* mp = m.f32();
  float* zp = z.f32();
  for (int b = 0; b < static_cast<int>(blocks_.size()); ++b)
    for (const LayerDesc& l : kExtraMsaBlock) {
      if (cancel_requested()) return Status::Cancelled("ExtraMSA forward interrupted");
      layer_forward(l, blocks_[b].get(), ctx, mp, zp);
      if (opts.trace)
        opts.trace(b, l.name, l.updates == Stream::kM ? "m" : "z", l.updates == Stream::kM ? m : z);
    }
  return Status::OK();
}

}  // namespace fc
