#include "model/common.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "core/rng.h"
#include "foldcube/model.h"
#include "foldcube/runtime.h"

namespace fc {

std::string block_prefix(int i) { return "blocks." + std::to_string(i) + "."; }

Status check_finite(const std::string& name, const Tensor& t) {
  const float* p = t.f32();
  const int64_t n = t.numel();
  int64_t bad = -1;
#pragma omp parallel for reduction(max : bad)
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) bad = std::max(bad, i);
  if (bad >= 0)
    return Status::InvalidArgument("tensor '" + name + "' has a non-finite value at flat index " +
                                   std::to_string(bad));
  return Status::OK();
}

Status check_input(const std::string& name, const Tensor& t, const Shape& shape) {
  FC_RETURN_IF_ERROR(expect_shape(name, t, shape));
  if (t.dtype() != DType::F32)
    return Status::InvalidArgument("tensor '" + name + "' has dtype " + dtype_name(t.dtype()) +
                                   ", expected F32");
  if (!t.is_contiguous()) return Status::InvalidArgument("tensor '" + name + "' is not contiguous");
  return check_finite(name, t);
}

Status check_mask(const std::string& name, const Tensor& t, const Shape& shape) {
  FC_RETURN_IF_ERROR(check_input(name, t, shape));
  const float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i)
    if (p[i] != 0.f && p[i] != 1.f)
      return Status::InvalidArgument("mask '" + name + "' must hold only 0 and 1 (found " +
                                     std::to_string(p[i]) + " at flat index " + std::to_string(i) +
                                     ")");
  return Status::OK();
}

Status check_block_count(const EvoformerConfig& cfg, const TensorFile& weights) {
  for (const std::string& name : weights.names) {
    if (name.rfind("blocks.", 0) != 0) continue;
    const long idx = std::strtol(name.c_str() + 7, nullptr, 10);
    if (idx >= cfg.no_blocks)
      return Status::InvalidArgument("weights hold '" + name + "' but the config has no_blocks=" +
                                     std::to_string(cfg.no_blocks));
  }
  return Status::OK();
}

Status check_weights_cover_config(const EvoformerConfig& cfg, const TensorFile& weights) {
  // In double: with sizes up to the validate() limits the products overflow int64.
  const double cm = cfg.c_m, cz = cfg.c_z, n = cfg.transition_n, co = cfg.c_hidden_opm;
  const double ct = cfg.c_hidden_mul;
  const double hm = static_cast<double>(cfg.no_heads_msa) * cfg.c_hidden_msa_att;
  const double hp = static_cast<double>(cfg.no_heads_pair) * cfg.c_hidden_pair_att;
  // MSA and pair transitions, OPM output, both triangle multiplications (a_p, a_g, b_p, b_g,
  // z), both triangle attentions (q, k, v, o), MSA row attention (q, k, v, o).
  const double block_elems =
      2 * n * cm * cm + 2 * n * cz * cz + co * co * cz + 10 * ct * cz + 8 * hp * cz + 4 * hm * cm;
  const double need = 4.0 * block_elems * static_cast<double>(cfg.no_blocks);
  double have = 0;
  for (const auto& [name, t] : weights.tensors)
    if (name.rfind("blocks.", 0) == 0 && t.dtype() == DType::F32)
      have += static_cast<double>(t.nbytes());
  if (need > have) {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "the parameter shapes of the config (c_m=%lld, c_z=%lld, no_blocks=%lld) need at "
                  "least %.4g MB, the weights hold %.4g MB of block parameters",
                  static_cast<long long>(cfg.c_m), static_cast<long long>(cfg.c_z),
                  static_cast<long long>(cfg.no_blocks), need / 1e6, have / 1e6);
    return Status::InvalidArgument(std::string("config and weights do not match: ") + buf);
  }
  return Status::OK();
}

Status load_params(const std::vector<std::pair<std::string, Tensor>>& params,
                   const TensorFile& weights) {
  for (const auto& [name, view] : params) {
    Tensor t;
    FC_RETURN_IF_ERROR(weights.get_f32(name, view.shape(), &t));
    FC_RETURN_IF_ERROR(check_finite(name, t));
    Tensor dst = view;
    dst.copy_from(t);
  }
  return Status::OK();
}

Status prepare_inputs(const EvoformerConfig& cfg, const Tensor& m, const Tensor& z,
                      const Tensor& msa_mask, const Tensor& pair_mask, StackInputs* out) {
  if (!m.defined() || m.ndim() != 3)
    return Status::InvalidArgument("input m must have shape [s, r, c_m=" + std::to_string(cfg.c_m) +
                                   "], got " + (m.defined() ? shape_str(m.shape()) : "nothing"));
  const int64_t s = m.dim(0), r = m.dim(1);
  if (s < 1 || r < 1) return Status::InvalidArgument("input m has an empty dimension");
  FC_RETURN_IF_ERROR(check_input("input.m", m, {s, r, cfg.c_m}));
  FC_RETURN_IF_ERROR(check_input("input.z", z, {r, r, cfg.c_z}));
  StackInputs in;
  in.s = s;
  in.r = r;
  in.msa_mask = msa_mask.defined() ? msa_mask : Tensor::full({s, r}, 1.f);
  in.pair_mask = pair_mask.defined() ? pair_mask : Tensor::full({r, r}, 1.f);
  FC_RETURN_IF_ERROR(check_mask("input.msa_mask", in.msa_mask, {s, r}));
  FC_RETURN_IF_ERROR(check_mask("input.pair_mask", in.pair_mask, {r, r}));
  in.msa_bias = Tensor::empty({s, r});
  in.msa_bias_t = Tensor::empty({r, s});
  in.pair_bias = Tensor::empty({r, r});
  in.pair_bias_t = Tensor::empty({r, r});
  for (int64_t i = 0; i < s; ++i)
    for (int64_t j = 0; j < r; ++j) {
      const float v = cfg.inf * (in.msa_mask.f32()[i * r + j] - 1.f);
      in.msa_bias.f32()[i * r + j] = v;
      in.msa_bias_t.f32()[j * s + i] = v;
    }
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) {
      const float v = cfg.inf * (in.pair_mask.f32()[i * r + j] - 1.f);
      in.pair_bias.f32()[i * r + j] = v;
      in.pair_bias_t.f32()[j * r + i] = v;
    }
  *out = std::move(in);
  return Status::OK();
}

BlockContext shape_context(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t chunk,
                           int64_t chunk_target_bytes, int threads) {
  BlockContext ctx;
  ctx.cfg = &cfg;
  ctx.s = s;
  ctx.r = r;
  ctx.chunk = chunk;
  ctx.chunk_target_bytes =
      chunk_target_bytes > 0 ? chunk_target_bytes : default_chunk_target_bytes(cfg, s, r);
  ctx.threads = std::max(threads, 1);
  return ctx;
}

BlockContext make_context(const EvoformerConfig& cfg, const StackInputs& in, int64_t chunk,
                          int64_t chunk_target_bytes) {
  BlockContext ctx = shape_context(cfg, in.s, in.r, chunk, chunk_target_bytes, num_threads());
  ctx.msa_mask = in.msa_mask.f32();
  ctx.msa_bias = in.msa_bias.f32();
  ctx.msa_bias_t = in.msa_bias_t.f32();
  ctx.pair_mask = in.pair_mask.f32();
  ctx.pair_bias = in.pair_bias.f32();
  ctx.pair_bias_t = in.pair_bias_t.f32();
  return ctx;
}

void random_fill(const std::string& name, Tensor t, uint64_t seed) {
  uint64_t h = seed;
  for (char ch : name) h = splitmix64(h ^ static_cast<unsigned char>(ch));
  const bool is_bias = name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
  const bool is_ln = name.find("layer_norm") != std::string::npos;
  const float scale = is_bias || is_ln ? 0.1f : std::sqrt(3.f / static_cast<float>(t.dim(-1)));
  const float offset = is_ln && !is_bias ? 1.f : 0.f;
  Tensor tmp = Tensor::empty(t.shape());
  float* p = tmp.f32();
  for (int64_t i = 0; i < tmp.numel(); ++i) p[i] = offset + scale * uniform_pm1(h, i);
  t.copy_from(tmp);
}

}  // namespace fc
