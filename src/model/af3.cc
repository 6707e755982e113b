// The AF3 trunk stacks (include/foldcube/af3.h): loading Boltz state dicts onto the block
// structs, and the forward passes over the Pairformer and MSA-module block tables.
#include "foldcube/af3.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "kernels/backward.h"
#include "kernels/kernels.h"
#include "model/af3_access.h"
#include "model/af3_weights.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "model/train.h"

namespace fc {

namespace {
// Masked keys of the single attention and the pair-weighted averaging get -1e6 (Boltz), the
// triangle attention -1e9 (cfg.inf).
constexpr float kInfSingle = 1e6f;

std::string layer_prefix(int i) { return "layers." + std::to_string(i) + "."; }

}  // namespace

EvoformerConfig af3_trunk_config(const Af3Config& a) {
  EvoformerConfig c;
  const bool pf = a.kind == "pairformer";
  c.c_m = pf ? a.c_s : a.c_m;
  c.c_z = a.c_z;
  c.no_heads_msa = pf ? a.no_heads_single : a.pwa_heads;
  c.c_hidden_msa_att = pf ? a.c_s / std::max<int64_t>(a.no_heads_single, 1) : a.pwa_head_dim;
  c.no_heads_pair = a.no_heads_pair;
  c.c_hidden_pair_att = a.c_hidden_pair;
  c.c_hidden_opm = a.c_hidden_opm;
  c.c_hidden_mul = a.c_z;
  c.transition_n = a.transition_n;
  c.no_blocks = a.no_blocks;
  c.c_s = a.c_s;
  c.pair_dropout = a.pair_dropout;
  c.msa_dropout = a.msa_dropout;
  return c;
}

namespace {

// Seeded init of one named parameter (LayerNorm weights near 1, as random_fill does for OpenFold
// names).
void random_named(const NamedParam& p, uint64_t seed) {
  const bool ln =
      p.name.find("norm") != std::string::npos || p.name.find("proj_z.0") != std::string::npos;
  Tensor t = Tensor::empty(named_shape(p));
  random_fill(ln ? "layer_norm:" + p.name : p.name, t, seed);
  TensorFile f;
  f.put(p.name, t);
  FC_CHECK(load_named({p}, f).ok());
}

// mask [n] -> pair mask [n, n] = mask[i] * mask[j].
Tensor outer_mask(const Tensor& mask) {
  const int64_t n = mask.dim(0);
  Tensor pm = Tensor::empty({n, n});
  const float* mp = mask.f32();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) pm.f32()[i * n + j] = mp[i] * mp[j];
  return pm;
}

// The key mask bias of the single attention / PWA: msa_bias [s, r] = 1e6 * (mask[j] - 1) on every
// row (and its transpose), replacing prepare_inputs' inf * (msa_mask - 1).
void set_key_bias(const Tensor& token_mask, StackInputs* in) {
  const int64_t s = in->s, r = in->r;
  const float* tm = token_mask.f32();
  for (int64_t i = 0; i < s; ++i)
    for (int64_t j = 0; j < r; ++j) {
      const float v = kInfSingle * (tm[j] - 1.f);
      in->msa_bias.f32()[i * r + j] = v;
      in->msa_bias_t.f32()[j * s + i] = v;
    }
}

Status optional_mask(const std::string& name, const Tensor& t, const Shape& shape, Tensor* out) {
  *out = t.defined() ? t : Tensor::full(shape, 1.f);
  return check_mask(name, *out, shape);
}

int64_t count_layers(const TensorFile& w) {
  int64_t blocks = 0;
  for (const std::string& name : w.names)
    if (name.rfind("layers.", 0) == 0)
      blocks = std::max<int64_t>(blocks, std::strtol(name.c_str() + 7, nullptr, 10) + 1);
  return blocks;
}

Status check_layer_count(const Af3Config& cfg, const TensorFile& w) {
  if (count_layers(w) > cfg.no_blocks)
    return Status::InvalidArgument(
        "weights hold layers." + std::to_string(count_layers(w) - 1) +
        ".* but the config has no_blocks=" + std::to_string(cfg.no_blocks));
  return Status::OK();
}
}  // namespace

// ---- Config ----------------------------------------------------------------------------------

Status Af3Config::validate() const {
  if (kind != "pairformer" && kind != "msa_module")
    return Status::InvalidArgument("af3 config: kind must be pairformer or msa_module, got '" +
                                   kind + "'");
  if (kind == "pairformer" && (no_heads_single < 1 || c_s % no_heads_single != 0))
    return Status::InvalidArgument(
        "af3 config: c_s=" + std::to_string(c_s) +
        " is not a multiple of no_heads_single=" + std::to_string(no_heads_single));
  if (msa_feat < 1 || msa_feat > 4096)
    return Status::InvalidArgument("af3 config: msa_feat must be in [1, 4096]");
  return af3_trunk_config(*this).validate();
}

Status Af3Config::from_weights(const TensorFile& w, Af3Config* out) {
  auto dim = [&](const std::string& name, int d, int64_t* v) -> Status {
    auto it = w.tensors.find(name);
    if (it == w.tensors.end() || it->second.ndim() <= d)
      return Status::InvalidArgument("cannot infer the AF3 config: weights lack '" + name + "'");
    *v = it->second.dim(d);
    return Status::OK();
  };
  Af3Config c;
  int64_t rows = 0, fc1 = 0;
  if (w.has("msa_proj.weight")) {
    c.kind = "msa_module";
    const std::string b = "layers.0.", pl = b + "pairformer_layer.";
    FC_RETURN_IF_ERROR(dim("msa_proj.weight", 0, &c.c_m));
    FC_RETURN_IF_ERROR(dim("msa_proj.weight", 1, &c.msa_feat));
    FC_RETURN_IF_ERROR(dim("s_proj.weight", 1, &c.c_s));
    FC_RETURN_IF_ERROR(dim(b + "pair_weighted_averaging.norm_z.weight", 0, &c.c_z));
    FC_RETURN_IF_ERROR(dim(b + "pair_weighted_averaging.proj_z.weight", 0, &c.pwa_heads));
    FC_RETURN_IF_ERROR(dim(b + "pair_weighted_averaging.proj_m.weight", 0, &rows));
    if (c.pwa_heads < 1 || rows % c.pwa_heads)
      return Status::InvalidArgument("cannot infer the AF3 config: inconsistent PWA shapes");
    c.pwa_head_dim = rows / c.pwa_heads;
    FC_RETURN_IF_ERROR(dim(b + "outer_product_mean.proj_a.weight", 0, &c.c_hidden_opm));
    FC_RETURN_IF_ERROR(dim(pl + "tri_att_start.linear.weight", 0, &c.no_heads_pair));
    FC_RETURN_IF_ERROR(dim(pl + "tri_att_start.mha.linear_q.weight", 0, &rows));
    FC_RETURN_IF_ERROR(dim(b + "msa_transition.fc1.weight", 0, &fc1));
    c.transition_n = c.c_m > 0 ? fc1 / c.c_m : 0;
  } else {
    c.kind = "pairformer";
    const std::string b = "layers.0.";
    FC_RETURN_IF_ERROR(dim(b + "pre_norm_s.weight", 0, &c.c_s));
    FC_RETURN_IF_ERROR(dim(b + "tri_mul_out.norm_in.weight", 0, &c.c_z));
    FC_RETURN_IF_ERROR(dim(b + "attention.proj_z.1.weight", 0, &c.no_heads_single));
    FC_RETURN_IF_ERROR(dim(b + "tri_att_start.linear.weight", 0, &c.no_heads_pair));
    FC_RETURN_IF_ERROR(dim(b + "tri_att_start.mha.linear_q.weight", 0, &rows));
    FC_RETURN_IF_ERROR(dim(b + "transition_z.fc1.weight", 0, &fc1));
    c.transition_n = c.c_z > 0 ? fc1 / c.c_z : 0;
  }
  if (c.no_heads_pair < 1 || rows % c.no_heads_pair)
    return Status::InvalidArgument("cannot infer the AF3 config: inconsistent triangle shapes");
  c.c_hidden_pair = rows / c.no_heads_pair;
  c.no_blocks = count_layers(w);
  if (auto it = w.metadata.find("constructor_kwargs"); it != w.metadata.end()) {
    const nlohmann::json j = nlohmann::json::parse(it->second, nullptr, false);
    auto rate = [&](const char* key, float* v) {
      if (j.is_object() && j.contains(key) && j[key].is_number()) *v = j[key].get<float>();
    };
    rate("dropout", &c.pair_dropout);
    rate("z_dropout", &c.pair_dropout);
    rate("msa_dropout", &c.msa_dropout);
  }
  FC_RETURN_IF_ERROR(c.validate());
  *out = c;
  return Status::OK();
}

// ---- Pairformer ------------------------------------------------------------------------------

struct PairformerStack::Impl {
  Af3Config cfg;
  EvoformerConfig trunk;
  std::vector<std::unique_ptr<PairformerBlockWeights>> blocks;
};

PairformerStack::PairformerStack() = default;
PairformerStack::~PairformerStack() = default;
PairformerStack::PairformerStack(PairformerStack&&) noexcept = default;
PairformerStack& PairformerStack::operator=(PairformerStack&&) noexcept = default;
const Af3Config& PairformerStack::config() const { return impl_->cfg; }

Status PairformerStack::load(const Af3Config& cfg, const TensorFile& weights,
                             PairformerStack* out) {
  FC_RETURN_IF_ERROR(cfg.validate());
  if (cfg.kind != "pairformer")
    return Status::InvalidArgument("PairformerStack: config kind is " + cfg.kind);
  FC_RETURN_IF_ERROR(check_layer_count(cfg, weights));
  auto impl = std::make_unique<Impl>();
  impl->cfg = cfg;
  impl->trunk = af3_trunk_config(cfg);
  for (int i = 0; i < cfg.no_blocks; ++i) {
    auto w = std::make_unique<PairformerBlockWeights>();
    allocate_pairformer_block(impl->trunk, w.get());
    FC_RETURN_IF_ERROR(load_named(boltz_params(*w, layer_prefix(i)), weights));
    impl->blocks.push_back(std::move(w));
  }
  out->impl_ = std::move(impl);
  return Status::OK();
}

PairformerStack PairformerStack::random(const Af3Config& cfg, uint64_t seed) {
  PairformerStack st;
  st.impl_ = std::make_unique<Impl>();
  st.impl_->cfg = cfg;
  st.impl_->trunk = af3_trunk_config(cfg);
  for (int i = 0; i < cfg.no_blocks; ++i) {
    auto w = std::make_unique<PairformerBlockWeights>();
    allocate_pairformer_block(st.impl_->trunk, w.get());
    for (const NamedParam& p : boltz_params(*w, layer_prefix(i))) random_named(p, seed);
    st.impl_->blocks.push_back(std::move(w));
  }
  return st;
}

void PairformerStack::export_weights(TensorFile* out) const {
  for (size_t i = 0; i < impl_->blocks.size(); ++i)
    for (const NamedParam& p : boltz_params(*impl_->blocks[i], layer_prefix(static_cast<int>(i))))
      out->put(p.name, gather_named(p));
}

namespace {
// Validated Pairformer inputs: the single stream as a one-row MSA [1, n, c_s].
Status pairformer_inputs(const EvoformerConfig& cfg, const Tensor& s, const Tensor& z,
                         const Tensor& mask, StackInputs* in) {
  if (!s.defined() || s.ndim() != 2 || s.dim(0) < 1)
    return Status::InvalidArgument("input s must have shape [n, c_s=" + std::to_string(cfg.c_m) +
                                   "]");
  const int64_t n = s.dim(0);
  FC_RETURN_IF_ERROR(check_input("input.s", s, {n, cfg.c_m}));
  Tensor tm;
  FC_RETURN_IF_ERROR(optional_mask("input.mask", mask, {n}, &tm));
  FC_RETURN_IF_ERROR(
      prepare_inputs(cfg, s.reshape({1, n, cfg.c_m}), z, tm.reshape({1, n}), outer_mask(tm), in));
  set_key_bias(tm, in);
  return Status::OK();
}
}  // namespace

Status PairformerStack::forward(Tensor& s, Tensor& z, const Tensor& mask,
                                const ForwardOptions& opts) const {
  const EvoformerConfig& cfg = impl_->trunk;
  FC_RETURN_IF_ERROR(check_forward_dtype(opts));
  StackInputs in;
  FC_RETURN_IF_ERROR(pairformer_inputs(cfg, s, z, mask, &in));
  BlockContext ctx = make_context(cfg, in, opts.chunk, opts.chunk_target_bytes);
  ctx.fused = opts.fused;
  ctx.dtype = opts.dtype;
  for (int b = 0; b < static_cast<int>(impl_->blocks.size()); ++b)
    for (const LayerDesc& l : kPairformerBlock) {
      layer_forward(l, impl_->blocks[b].get(), ctx, s.f32(), z.f32());
      if (opts.trace)
        opts.trace(b, l.name, l.updates == Stream::kM ? "s" : "z", l.updates == Stream::kM ? s : z);
    }
  return Status::OK();
}

// ---- MSA module ------------------------------------------------------------------------------

struct MsaModule::Impl {
  Af3Config cfg;
  EvoformerConfig trunk;
  Tensor s_proj, msa_proj;  // [c_m, c_s], [c_m, msa_feat]
  std::vector<std::unique_ptr<MsaModuleBlockWeights>> blocks;
};

MsaModule::MsaModule() = default;
MsaModule::~MsaModule() = default;
MsaModule::MsaModule(MsaModule&&) noexcept = default;
MsaModule& MsaModule::operator=(MsaModule&&) noexcept = default;
const Af3Config& MsaModule::config() const { return impl_->cfg; }

Status MsaModule::load(const Af3Config& cfg, const TensorFile& weights, MsaModule* out) {
  FC_RETURN_IF_ERROR(cfg.validate());
  if (cfg.kind != "msa_module")
    return Status::InvalidArgument("MsaModule: config kind is " + cfg.kind);
  FC_RETURN_IF_ERROR(check_layer_count(cfg, weights));
  auto impl = std::make_unique<Impl>();
  impl->cfg = cfg;
  impl->trunk = af3_trunk_config(cfg);
  impl->s_proj = Tensor::empty({cfg.c_m, cfg.c_s});
  impl->msa_proj = Tensor::empty({cfg.c_m, cfg.msa_feat});
  FC_RETURN_IF_ERROR(load_named(
      {{"s_proj.weight", {impl->s_proj}}, {"msa_proj.weight", {impl->msa_proj}}}, weights));
  for (int i = 0; i < cfg.no_blocks; ++i) {
    auto w = std::make_unique<MsaModuleBlockWeights>();
    allocate_msa_module_block(impl->trunk, w.get());
    FC_RETURN_IF_ERROR(load_named(boltz_params(*w, layer_prefix(i)), weights));
    impl->blocks.push_back(std::move(w));
  }
  out->impl_ = std::move(impl);
  return Status::OK();
}

MsaModule MsaModule::random(const Af3Config& cfg, uint64_t seed) {
  MsaModule st;
  st.impl_ = std::make_unique<Impl>();
  Impl& im = *st.impl_;
  im.cfg = cfg;
  im.trunk = af3_trunk_config(cfg);
  im.s_proj = Tensor::empty({cfg.c_m, cfg.c_s});
  im.msa_proj = Tensor::empty({cfg.c_m, cfg.msa_feat});
  random_fill("s_proj.weight", im.s_proj, seed);
  random_fill("msa_proj.weight", im.msa_proj, seed);
  for (int i = 0; i < cfg.no_blocks; ++i) {
    auto w = std::make_unique<MsaModuleBlockWeights>();
    allocate_msa_module_block(im.trunk, w.get());
    for (const NamedParam& p : boltz_params(*w, layer_prefix(i))) random_named(p, seed);
    im.blocks.push_back(std::move(w));
  }
  return st;
}

void MsaModule::export_weights(TensorFile* out) const {
  out->put("s_proj.weight", impl_->s_proj);
  out->put("msa_proj.weight", impl_->msa_proj);
  for (size_t i = 0; i < impl_->blocks.size(); ++i)
    for (const NamedParam& p : boltz_params(*impl_->blocks[i], layer_prefix(static_cast<int>(i))))
      out->put(p.name, gather_named(p));
}

namespace {
// Validated MSA-module inputs; m receives the MSA embedding [N, n, c_m].
Status msa_module_inputs(const Af3Config& a, const EvoformerConfig& cfg, const Tensor& s_proj,
                         const Tensor& msa_proj, const Tensor& z, const Tensor& emb,
                         const Tensor& msa_feat, const Tensor& msa_mask, const Tensor& token_mask,
                         Tensor* m, StackInputs* in) {
  if (!msa_feat.defined() || msa_feat.ndim() != 3 || msa_feat.dim(0) < 1 || msa_feat.dim(1) < 1)
    return Status::InvalidArgument("input msa_feat must have shape [N_msa, n, " +
                                   std::to_string(a.msa_feat) + "]");
  const int64_t N = msa_feat.dim(0), n = msa_feat.dim(1), cm = cfg.c_m;
  FC_RETURN_IF_ERROR(check_input("input.msa_feat", msa_feat, {N, n, a.msa_feat}));
  FC_RETURN_IF_ERROR(check_input("input.emb", emb, {n, a.c_s}));
  Tensor tm, mm;
  FC_RETURN_IF_ERROR(optional_mask("input.token_pad_mask", token_mask, {n}, &tm));
  FC_RETURN_IF_ERROR(optional_mask("input.msa_mask", msa_mask, {N, n}, &mm));
  // m[s, i] = msa_proj(msa_feat[s, i]) + s_proj(emb[i])
  *m = Tensor::empty({N, n, cm});
  {
    Tensor e = Tensor::empty({n, cm});  // s_proj(emb)
    kern::linear(emb.f32(), a.c_s, n, a.c_s, s_proj.f32(), nullptr, cm, e.f32(), cm);
    kern::linear(msa_feat.f32(), a.msa_feat, N * n, a.msa_feat, msa_proj.f32(), nullptr, cm,
                 m->f32(), cm);
    for (int64_t s = 0; s < N; ++s)
      kern::add_inplace(m->f32() + s * n * cm, cm, e.f32(), cm, n, cm);
  }
  FC_RETURN_IF_ERROR(prepare_inputs(cfg, *m, z, mm, outer_mask(tm), in));
  set_key_bias(tm, in);
  return Status::OK();
}
}  // namespace

Status MsaModule::forward(Tensor& z, const Tensor& emb, const Tensor& msa_feat,
                          const Tensor& msa_mask, const Tensor& token_mask,
                          const ForwardOptions& opts) const {
  const Impl& im = *impl_;
  const EvoformerConfig& cfg = im.trunk;
  FC_RETURN_IF_ERROR(check_forward_dtype(opts));
  StackInputs in;
  Tensor m;  // [N, n, c_m]
  FC_RETURN_IF_ERROR(msa_module_inputs(im.cfg, cfg, im.s_proj, im.msa_proj, z, emb, msa_feat,
                                       msa_mask, token_mask, &m, &in));
  if (opts.trace) opts.trace(-1, "embed", "m", m);
  BlockContext ctx = make_context(cfg, in, opts.chunk, opts.chunk_target_bytes);
  ctx.fused = opts.fused;
  ctx.dtype = opts.dtype;
  for (int b = 0; b < static_cast<int>(im.blocks.size()); ++b)
    for (const LayerDesc& l : kMsaModuleBlock) {
      layer_forward(l, im.blocks[b].get(), ctx, m.f32(), z.f32());
      if (opts.trace)
        opts.trace(b, l.name, l.updates == Stream::kM ? "m" : "z", l.updates == Stream::kM ? m : z);
    }
  return Status::OK();
}

// ---- Training ------------------------------------------------------------------------------

namespace {

// Block weight and gradient pointers for train_blocks (grads allocated by train_blocks' callback).
template <typename W>
void block_pointers(const std::vector<std::unique_ptr<W>>& blocks,
                    std::vector<std::unique_ptr<W>>* grads, std::vector<const void*>* w,
                    std::vector<void*>* g) {
  const size_t nb = blocks.size();
  grads->resize(nb);
  w->resize(nb);
  g->resize(nb);
  for (size_t b = 0; b < nb; ++b) {
    (*w)[b] = blocks[b].get();
    (*grads)[b] = std::make_unique<W>();
    (*g)[b] = (*grads)[b].get();
  }
}

template <typename W>
void append_grads(const std::vector<std::unique_ptr<W>>& grads, TrainResult* out) {
  for (size_t b = 0; b < grads.size(); ++b)
    for (const NamedParam& p : boltz_params(*grads[b], layer_prefix(static_cast<int>(b))))
      out->grad_params.emplace_back(p.name, gather_named(p));
}
}  // namespace

Status PairformerStack::train_step(Tensor& s, Tensor& z, const Tensor& mask,
                                   const Tensor& grad_out_s, const Tensor& grad_out_z,
                                   const TrainOptions& opts, TrainResult* out) const {
  const Impl& im = *impl_;
  const EvoformerConfig& cfg = im.trunk;
  const int nb = static_cast<int>(im.blocks.size());
  FC_RETURN_IF_ERROR(check_train_options(opts, nb));
  StackInputs in;
  FC_RETURN_IF_ERROR(pairformer_inputs(cfg, s, z, mask, &in));
  FC_RETURN_IF_ERROR(check_input("grad.output.s", grad_out_s, s.shape()));
  FC_RETURN_IF_ERROR(check_input("grad.output.z", grad_out_z, z.shape()));
  std::vector<std::unique_ptr<PairformerBlockWeights>> grads;
  std::vector<const void*> w;
  std::vector<void*> g;
  block_pointers(im.blocks, &grads, &w, &g);
  auto alloc = [&](int b) { allocate_pairformer_block(cfg, grads[b].get()); };
  const int64_t n = s.dim(0);
  Tensor s3 = s.reshape({1, n, cfg.c_m});  // the single stream as the table's m stream
  BlockContext ctx = train_context(cfg, in, opts);
  ctx.table = &kPairformerBlock;  // Boltz's dropout
  FC_RETURN_IF_ERROR(train_blocks(kPairformerBlock, w, g, alloc, ctx, opts, s3, z,
                                  grad_out_s.reshape({1, n, cfg.c_m}), grad_out_z, out));
  out->grad_m = out->grad_m.reshape({n, cfg.c_m});
  out->grad_params.clear();
  append_grads(grads, out);
  return Status::OK();
}

Status MsaModule::train_step(Tensor& z, const Tensor& emb, const Tensor& msa_feat,
                             const Tensor& msa_mask, const Tensor& token_mask,
                             const Tensor& grad_out_z, const TrainOptions& opts, TrainResult* out,
                             Tensor* grad_emb) const {
  const Impl& im = *impl_;
  const Af3Config& a = im.cfg;
  const EvoformerConfig& cfg = im.trunk;
  const int nb = static_cast<int>(im.blocks.size());
  FC_RETURN_IF_ERROR(check_train_options(opts, nb));
  StackInputs in;
  Tensor m;  // [N, n, c_m]
  FC_RETURN_IF_ERROR(msa_module_inputs(a, cfg, im.s_proj, im.msa_proj, z, emb, msa_feat, msa_mask,
                                       token_mask, &m, &in));
  FC_RETURN_IF_ERROR(check_input("grad.output.z", grad_out_z, z.shape()));
  std::vector<std::unique_ptr<MsaModuleBlockWeights>> grads;
  std::vector<const void*> w;
  std::vector<void*> g;
  block_pointers(im.blocks, &grads, &w, &g);
  auto alloc = [&](int b) { allocate_msa_module_block(cfg, grads[b].get()); };
  const Tensor dm_out = Tensor::zeros(m.shape());  // the module returns only z
  BlockContext ctx = train_context(cfg, in, opts);
  ctx.table = &kMsaModuleBlock;  // Boltz's dropout
  FC_RETURN_IF_ERROR(
      train_blocks(kMsaModuleBlock, w, g, alloc, ctx, opts, m, z, dm_out, grad_out_z, out));
  out->grad_params.clear();
  Af3Access::msa_module_embed_backward(*this, emb, msa_feat, out->grad_m, grad_emb, out);
  append_grads(grads, out);
  return Status::OK();
}

// ---- Af3Access (src/model/af3_access.h) ------------------------------------------------------

const EvoformerConfig& Af3Access::trunk(const PairformerStack& st) { return st.impl_->trunk; }
const EvoformerConfig& Af3Access::trunk(const MsaModule& st) { return st.impl_->trunk; }

std::vector<const void*> Af3Access::blocks(const PairformerStack& st) {
  std::vector<const void*> out;
  for (const auto& b : st.impl_->blocks) out.push_back(b.get());
  return out;
}

std::vector<const void*> Af3Access::blocks(const MsaModule& st) {
  std::vector<const void*> out;
  for (const auto& b : st.impl_->blocks) out.push_back(b.get());
  return out;
}

Status Af3Access::pairformer_inputs(const PairformerStack& st, const Tensor& s, const Tensor& z,
                                    const Tensor& mask, StackInputs* in) {
  return fc::pairformer_inputs(st.impl_->trunk, s, z, mask, in);
}

Status Af3Access::msa_module_inputs(const MsaModule& st, const Tensor& z, const Tensor& emb,
                                    const Tensor& msa_feat, const Tensor& msa_mask,
                                    const Tensor& token_mask, Tensor* m, StackInputs* in) {
  const MsaModule::Impl& im = *st.impl_;
  return fc::msa_module_inputs(im.cfg, im.trunk, im.s_proj, im.msa_proj, z, emb, msa_feat, msa_mask,
                               token_mask, m, in);
}

void Af3Access::msa_module_embed_backward(const MsaModule& st, const Tensor& emb,
                                          const Tensor& msa_feat, const Tensor& grad_m,
                                          Tensor* grad_emb, TrainResult* out) {
  // Backward of the embedding m[s, i] = msa_proj(msa_feat[s, i]) + s_proj(emb[i]).
  const MsaModule::Impl& im = *st.impl_;
  const Af3Config& a = im.cfg;
  const int64_t N = msa_feat.dim(0), n = msa_feat.dim(1), cm = im.trunk.c_m;
  Tensor g_msa = Tensor::zeros({cm, a.msa_feat}), g_s = Tensor::zeros({cm, a.c_s});
  kern::linear_backward(msa_feat.f32(), a.msa_feat, N * n, a.msa_feat, im.msa_proj.f32(), cm,
                        grad_m.f32(), cm, nullptr, a.msa_feat, g_msa.f32(), nullptr);
  {
    Tensor de = Tensor::zeros({n, cm});  // dL/d s_proj(emb): the sum over the MSA rows
    for (int64_t r = 0; r < N; ++r)
      kern::add_inplace(de.f32(), cm, grad_m.f32() + r * n * cm, cm, n, cm);
    *grad_emb = Tensor::empty({n, a.c_s});
    kern::linear_backward(emb.f32(), a.c_s, n, a.c_s, im.s_proj.f32(), cm, de.f32(), cm,
                          grad_emb->f32(), a.c_s, g_s.f32(), nullptr);
  }
  out->grad_params.emplace_back("s_proj.weight", g_s);
  out->grad_params.emplace_back("msa_proj.weight", g_msa);
}

Status msa_features(const Tensor& msa, const Tensor& has_deletion, const Tensor& deletion_value,
                    const Tensor& msa_paired, Tensor* out) {
  if (!msa.defined() || msa.ndim() != 2 || msa.dtype() != DType::I64)
    return Status::InvalidArgument("input.msa must be an I64 tensor [N_msa, n]");
  const int64_t N = msa.dim(0), n = msa.dim(1);
  FC_RETURN_IF_ERROR(check_input("input.has_deletion", has_deletion, {N, n}));
  FC_RETURN_IF_ERROR(check_input("input.deletion_value", deletion_value, {N, n}));
  FC_RETURN_IF_ERROR(check_input("input.msa_paired", msa_paired, {N, n}));
  const Tensor cls = msa.contiguous();
  const int64_t* cp = cls.data<int64_t>();  // [N*n]
  constexpr int64_t kClasses = 33, kF = kClasses + 3;
  Tensor f = Tensor::zeros({N, n, kF});
  for (int64_t i = 0; i < N * n; ++i) {
    if (cp[i] < 0 || cp[i] >= kClasses)
      return Status::InvalidArgument("input.msa holds class " + std::to_string(cp[i]) +
                                     " at flat index " + std::to_string(i) + " (expected 0..32)");
    float* row = f.f32() + i * kF;
    row[cp[i]] = 1.f;
    row[kClasses] = has_deletion.f32()[i];
    row[kClasses + 1] = deletion_value.f32()[i];
    row[kClasses + 2] = msa_paired.f32()[i];
  }
  *out = f;
  return Status::OK();
}

}  // namespace fc
