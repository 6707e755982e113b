#include <cmath>
#include <cstring>
#include <string>

#include "core/rng.h"
#include "foldcube/model.h"
#include "foldcube/runtime.h"
#include "kernels/kernels.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "model/weights.h"

namespace fc {

EvoformerStack::EvoformerStack() = default;
EvoformerStack::~EvoformerStack() = default;
EvoformerStack::EvoformerStack(EvoformerStack&&) noexcept = default;
EvoformerStack& EvoformerStack::operator=(EvoformerStack&&) noexcept = default;

Status EvoformerStack::load(const EvoformerConfig& cfg, const TensorFile& weights,
                            EvoformerStack* out) {
  return StackAccess::load_blocks(cfg, weights, {}, out);
}

Status StackAccess::load_blocks(const EvoformerConfig& cfg, const TensorFile& weights,
                                const std::function<bool(int)>& keep, EvoformerStack* out) {
  FC_RETURN_IF_ERROR(cfg.validate());
  FC_RETURN_IF_ERROR(check_block_count(cfg, weights));
  EvoformerConfig held = cfg;  // the blocks loaded, for the coverage check
  held.no_blocks = 0;
  for (int i = 0; i < cfg.no_blocks; ++i) held.no_blocks += !keep || keep(i);
  FC_RETURN_IF_ERROR(check_weights_cover_config(held, weights));
  EvoformerStack st;
  st.cfg_ = cfg;
  for (int i = 0; i < cfg.no_blocks; ++i) {
    auto w = std::make_unique<BlockWeights>();
    if (!keep || keep(i)) {
      allocate_block(cfg, w.get());
      FC_RETURN_IF_ERROR(load_params(named_params(*w, block_prefix(i)), weights));
    }
    st.blocks_.push_back(std::move(w));
  }
  FC_RETURN_IF_ERROR(weights.get_f32("linear.weight", {cfg.c_s, cfg.c_m}, &st.linear_w_));
  FC_RETURN_IF_ERROR(weights.get_f32("linear.bias", {cfg.c_s}, &st.linear_b_));
  st.linear_w_ = st.linear_w_.clone();
  st.linear_b_ = st.linear_b_.clone();
  *out = std::move(st);
  return Status::OK();
}

EvoformerStack EvoformerStack::random(const EvoformerConfig& cfg, uint64_t seed) {
  EvoformerStack st;
  st.cfg_ = cfg;
  for (int i = 0; i < cfg.no_blocks; ++i) {
    auto w = std::make_unique<BlockWeights>();
    allocate_block(cfg, w.get());
    for (auto& [name, view] : named_params(*w, block_prefix(i))) random_fill(name, view, seed);
    st.blocks_.push_back(std::move(w));
  }
  st.linear_w_ = Tensor::empty({cfg.c_s, cfg.c_m});
  st.linear_b_ = Tensor::empty({cfg.c_s});
  random_fill("linear.weight", st.linear_w_, seed);
  random_fill("linear.bias", st.linear_b_, seed);
  return st;
}

int64_t EvoformerStack::param_bytes() const {
  int64_t n = static_cast<int64_t>(linear_w_.nbytes() + linear_b_.nbytes());
  for (size_t i = 0; i < blocks_.size(); ++i)
    for (auto& [name, t] : named_params(*blocks_[i], "")) n += static_cast<int64_t>(t.nbytes());
  return n;
}

void EvoformerStack::export_weights(TensorFile* out) const {
  for (size_t i = 0; i < blocks_.size(); ++i)
    for (auto& [name, t] : named_params(*blocks_[i], block_prefix(static_cast<int>(i))))
      out->put(name, t);
  out->put("linear.weight", linear_w_);
  out->put("linear.bias", linear_b_);
}

Status EvoformerStack::forward(Tensor& m, Tensor& z, const Tensor& msa_mask_in,
                               const Tensor& pair_mask_in, Tensor* s_out,
                               const ForwardOptions& opts) const {
  const EvoformerConfig& cfg = cfg_;
  FC_RETURN_IF_ERROR(check_forward_dtype(opts));
  StackInputs in;
  FC_RETURN_IF_ERROR(prepare_inputs(cfg, m, z, msa_mask_in, pair_mask_in, &in));
  const int64_t r = in.r;
  BlockContext ctx = make_context(cfg, in, opts.chunk, opts.chunk_target_bytes);
  ctx.fused = opts.fused;
  ctx.dtype = opts.dtype;

  float* mp = m.f32();
  float* zp = z.f32();
  for (int b = 0; b < static_cast<int>(blocks_.size()); ++b)
    for (const LayerDesc& l : kEvoformerBlock) {
      if (cancel_requested()) return Status::Cancelled("Evoformer forward interrupted");
      layer_forward(l, blocks_[b].get(), ctx, mp, zp);
      if (opts.trace)
        opts.trace(b, l.name, l.updates == Stream::kM ? "m" : "z", l.updates == Stream::kM ? m : z);
    }
  if (s_out != nullptr) {
    *s_out = Tensor::empty({r, cfg.c_s});
    kern::linear(mp, cfg.c_m, r, cfg.c_m, linear_w_.f32(), linear_b_.f32(), cfg.c_s, s_out->f32(),
                 cfg.c_s);
  }
  return Status::OK();
}

Status parse_compute_dtype(const std::string& name, DType* out) {
  if (name == "fp32" || name == "bf16") {
    *out = name == "bf16" ? DType::BF16 : DType::F32;
    return Status::OK();
  }
  return Status::InvalidArgument("dtype: expected 'fp32' or 'bf16', got '" + name + "'");
}

Status check_forward_dtype(const ForwardOptions& opts) {
  if (opts.dtype == DType::F32) return Status::OK();
  if (opts.dtype != DType::BF16)
    return Status::InvalidArgument(std::string("forward: unsupported dtype ") +
                                   dtype_name(opts.dtype) + " (F32 or BF16)");
  if (!opts.fused) return Status::InvalidArgument("forward: dtype BF16 needs the fused path");
  return Status::OK();
}

int64_t default_chunk_target_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r) {
  const int64_t mz = (s * r * cfg.c_m + r * r * cfg.c_z) * static_cast<int64_t>(sizeof(float));
  return std::max<int64_t>(mz / 8, 4 << 20);
}

int64_t default_train_chunk_target_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r) {
  return 4 * default_chunk_target_bytes(cfg, s, r);
}

Status infer_config_from_weights(const TensorFile& w, EvoformerConfig* out) {
  return infer_config_from_shapes(shapes_of(w), out);
}

Status infer_config_from_shapes(const TensorShapes& w, EvoformerConfig* out) {
  auto dim = [&](const std::string& name, int d, int64_t* v) -> Status {
    *v = w.dim(name, d);
    if (*v < 0)
      return Status::InvalidArgument("cannot infer the config: weights lack '" + name + "'");
    return Status::OK();
  };
  EvoformerConfig c;
  const std::string b = "blocks.0.";
  int64_t qrows = 0, prows = 0, t1 = 0;
  FC_RETURN_IF_ERROR(dim(b + "msa_att_row.layer_norm_m.weight", 0, &c.c_m));
  FC_RETURN_IF_ERROR(dim(b + "msa_att_row.layer_norm_z.weight", 0, &c.c_z));
  FC_RETURN_IF_ERROR(dim(b + "msa_att_row.linear_z.weight", 0, &c.no_heads_msa));
  FC_RETURN_IF_ERROR(dim(b + "msa_att_row.mha.linear_q.weight", 0, &qrows));
  FC_RETURN_IF_ERROR(dim(b + "pair_stack.tri_att_start.linear.weight", 0, &c.no_heads_pair));
  FC_RETURN_IF_ERROR(dim(b + "pair_stack.tri_att_start.mha.linear_q.weight", 0, &prows));
  FC_RETURN_IF_ERROR(dim(b + "outer_product_mean.linear_1.weight", 0, &c.c_hidden_opm));
  FC_RETURN_IF_ERROR(dim(b + "pair_stack.tri_mul_out.linear_a_p.weight", 0, &c.c_hidden_mul));
  FC_RETURN_IF_ERROR(dim(b + "msa_transition.linear_1.weight", 0, &t1));
  if (w.has("linear.weight")) FC_RETURN_IF_ERROR(dim("linear.weight", 0, &c.c_s));  // not ExtraMSA
  if (c.no_heads_msa <= 0 || c.no_heads_pair <= 0 || c.c_m <= 0 || qrows % c.no_heads_msa ||
      prows % c.no_heads_pair || t1 % c.c_m)
    return Status::InvalidArgument("cannot infer the config: inconsistent parameter shapes");
  c.c_hidden_msa_att = qrows / c.no_heads_msa;
  c.c_hidden_pair_att = prows / c.no_heads_pair;
  c.transition_n = t1 / c.c_m;
  int64_t blocks = 0;
  for (const std::string& name : w.names)
    if (name.rfind("blocks.", 0) == 0)
      blocks = std::max<int64_t>(blocks, std::strtol(name.c_str() + 7, nullptr, 10) + 1);
  c.no_blocks = blocks;
  FC_RETURN_IF_ERROR(c.validate());
  *out = c;
  return Status::OK();
}

double evoformer_block_flops(const EvoformerConfig& c, int64_t s_, int64_t r_) {
  const double S = s_, R = r_, cm = c.c_m, cz = c.c_z, n = c.transition_n;
  const double hm = c.no_heads_msa * c.c_hidden_msa_att, hp = c.no_heads_pair * c.c_hidden_pair_att;
  const double co = c.c_hidden_opm, ct = c.c_hidden_mul;
  const double R2 = R * R;
  double f = 0;
  f += 2 * R2 * cz * c.no_heads_msa + 2 * S * R * cm * 4 * hm + 4 * S * R2 * hm +
       2 * S * R * hm * cm;
  f += 2 * S * R * cm * 4 * hm + 4 * R * S * S * hm + 2 * S * R * hm * cm;
  f += 4 * S * R * cm * n * cm;
  f += 2 * S * R * cm * 2 * co + 2 * R2 * S + 2 * R2 * co * co * S + 2 * R2 * co * co * cz;
  f += 2 * (2 * R2 * cz * 4 * ct + 2 * R2 * R * ct + 2 * R2 * ct * cz + 2 * R2 * cz * cz);
  f += 2 *
       (2 * R2 * cz * c.no_heads_pair + 2 * R2 * cz * 4 * hp + 4 * R * R2 * hp + 2 * R2 * hp * cz);
  f += 4 * R2 * cz * n * cz;
  return f;
}

}  // namespace fc
