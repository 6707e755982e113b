#include "model/af2/structure_module.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/kernels.h"
#include "model/af2/block_sizes.h"
#include "model/af2/geometry.h"
#include "model/af2/residue_constants.h"
#include "model/common.h"

namespace fc::af2 {
namespace {

constexpr int64_t kAngles = 7;

// relu(x) into a new [rows, c] tensor.
Tensor relu_copy(const float* x, int64_t rows, int64_t c) {
  Tensor t = Tensor::empty({rows, c});
  std::memcpy(t.f32(), x, rows * c * sizeof(float));
  kern::relu_inplace(t.f32(), c, rows, c);
  return t;
}

struct Frames {
  const float* rot;    // [r, 3, 3]
  const float* trans;  // [r, 3] (nm)
};

// Local points of the projection raw [r, 3*H*P] (three blocks x, y, z of H*P values, index
// h*P + p) mapped to global: pts [r, H*P, 3] = R raw + t.
void to_global(const float* raw, int64_t r, int64_t hp, const Frames& fr, float* pts) {
#pragma omp parallel for
  for (int64_t i = 0; i < r; ++i) {
    const float* R = fr.rot + 9 * i;
    const float* t = fr.trans + 3 * i;
    for (int64_t k = 0; k < hp; ++k) {
      const float x = raw[i * 3 * hp + k], y = raw[i * 3 * hp + hp + k],
                  z = raw[i * 3 * hp + 2 * hp + k];
      for (int d = 0; d < 3; ++d)
        pts[(i * hp + k) * 3 + d] = R[3 * d] * x + R[3 * d + 1] * y + R[3 * d + 2] * z + t[d];
    }
  }
}

// The IPA pair bias of the rows of pv, b [rows, ld, H] = Linear_b(LN_z(z rows)), the same for
// every layer: LN_z over blocks of `block` rows, so the normalised pair is never held whole.
void ipa_pair_bias(const StructureModuleWeights& w, const StructureModuleConfig& c,
                   const PairRows& pv, int64_t block, float* b) {
  const int64_t cz = c.c_z, H = c.no_heads_ipa, ld = pv.ld;
  Tensor zl = Tensor::empty({block, ld, cz});  // [block, ld, c_z] LN_z of a block of rows
  for (int64_t i0 = 0; i0 < pv.rows; i0 += block) {
    const int64_t n = std::min(block, pv.rows - i0);
    apply_layernorm(w.ln_z, pv.z + i0 * ld * cz, n * ld, cz, zl.f32());
    apply_linear(w.b, zl.f32(), n * ld, b + i0 * ld * H);
  }
}

// Invariant point attention (Algorithm 22): out [r, c_s] from s [r, c_s], the pair rows pv
// (normalised here by blocks of `rows` rows) and the pair bias b [r, ldb, H] of every row
// (ipa_pair_bias, gathered under DAP). With pv.gather, o_pair is computed on pv's rows and
// all-gathered.
void invariant_point_attention(const StructureModuleWeights& w, const StructureModuleConfig& c,
                               const float* s, const PairRows& pv, const float* b, int64_t ldb,
                               const Frames& fr, const float* mask, int64_t r, int64_t rows,
                               float* out) {
  const int64_t H = c.no_heads_ipa, C = c.c_ipa, Pq = c.no_qk_points, Pv = c.no_v_points;
  const int64_t cz = c.c_z, Pkv = Pq + Pv;
  Tensor q = Tensor::empty({r, H * C});       // [r, H, C]
  Tensor kv = Tensor::empty({r, 2 * H * C});  // [r, H, 2C]: k | v per head
  apply_linear(w.q, s, r, q.f32());
  apply_linear(w.kv, s, r, kv.f32());
  Tensor qp = Tensor::empty({r, H * Pq, 3});    // global query points
  Tensor kvp = Tensor::empty({r, H * Pkv, 3});  // global key (p < Pq) and value points
  {
    Tensor raw = Tensor::empty({r, 3 * H * Pkv});  // [r, 3, H*(Pq+Pv)] local
    apply_linear(w.q_pts, s, r, raw.f32());
    to_global(raw.f32(), r, H * Pq, fr, qp.f32());
    apply_linear(w.kv_pts, s, r, raw.f32());
    to_global(raw.f32(), r, H * Pkv, fr, kvp.f32());
  }
  const int64_t width = H * (C + 4 * Pv + cz);
  Tensor cat = Tensor::zeros({r, width});  // [o | op_x | op_y | op_z | |op| | o_pair]
  Tensor a = Tensor::empty({H, r, r});     // [H, r, r] attention weights
  Tensor vp = Tensor::empty({r, Pv * 3});  // [r, Pv, 3] value points of one head
  Tensor og = Tensor::empty({r, Pv * 3});  // [r, Pv, 3] attended value points (global)
  const float scale_qk = std::sqrt(1.0f / (3.0f * C)), scale_b = std::sqrt(1.0f / 3.0f);
  for (int64_t h = 0; h < H; ++h) {
    const float hw = w.head_weights.f32()[h];
    const float softplus = hw > 20.0f ? hw : std::log1p(std::exp(hw));
    const float wh = softplus * std::sqrt(1.0f / (3.0f * (Pq * 9.0f / 2.0f)));
    float* A = a.f32() + h * r * r;
    kern::gemm(false, true, r, r, C, scale_qk, q.f32() + h * C, H * C, kv.f32() + h * 2 * C,
               2 * H * C, 0.0f, A, r);
#pragma omp parallel for
    for (int64_t i = 0; i < r; ++i) {
      const float* qi = qp.f32() + (i * H * Pq + h * Pq) * 3;
      for (int64_t j = 0; j < r; ++j) {
        const float* kj = kvp.f32() + (j * H * Pkv + h * Pkv) * 3;
        float d2 = 0;
        for (int64_t p = 0; p < 3 * Pq; ++p) d2 += (qi[p] - kj[p]) * (qi[p] - kj[p]);
        A[i * r + j] += scale_b * b[(i * ldb + j) * H + h] - 0.5f * wh * d2 +
                        c.inf * (mask[i] * mask[j] - 1.0f);
      }
    }
    kern::softmax_rows(A, r, r, r);
    // o = A v
    kern::gemm(false, false, r, C, r, 1.0f, A, r, kv.f32() + h * 2 * C + C, 2 * H * C, 0.0f,
               cat.f32() + h * C, width);
    for (int64_t j = 0; j < r; ++j)
      std::memcpy(vp.f32() + j * Pv * 3, kvp.f32() + (j * H * Pkv + h * Pkv + Pq) * 3,
                  Pv * 3 * sizeof(float));
    kern::gemm(false, false, r, Pv * 3, r, 1.0f, A, r, vp.f32(), Pv * 3, 0.0f, og.f32(), Pv * 3);
#pragma omp parallel for
    for (int64_t i = 0; i < r; ++i) {
      const float* R = fr.rot + 9 * i;
      const float* t = fr.trans + 3 * i;
      float* row = cat.f32() + i * width + H * C;
      for (int64_t p = 0; p < Pv; ++p) {
        const float* g = og.f32() + (i * Pv + p) * 3;
        const float d[3] = {g[0] - t[0], g[1] - t[1], g[2] - t[2]};
        float l[3];  // R^T (g - t)
        for (int e = 0; e < 3; ++e) l[e] = R[e] * d[0] + R[3 + e] * d[1] + R[6 + e] * d[2];
        for (int e = 0; e < 3; ++e) row[e * H * Pv + h * Pv + p] = l[e];
        row[3 * H * Pv + h * Pv + p] = std::sqrt(l[0] * l[0] + l[1] * l[1] + l[2] * l[2] + c.eps);
      }
    }
  }
  // o_pair[i, h] = sum_j A[h, i, j] LN_z(z)[i, j, :] for pv's rows i < r, over blocks of rows:
  // into cat directly, or (sharded) into op [pv.rows, H*c_z], all-gathered into cat's rows.
  const int64_t ld = pv.ld, valid = std::clamp<int64_t>(r - pv.row0, 0, pv.rows);
  const int64_t hz = H * cz, off = H * (C + 4 * Pv);
  Tensor op = pv.gather.fn ? Tensor::zeros({pv.rows, hz}) : Tensor();  // [rows, H*c_z]
  float* dst = pv.gather.fn ? op.f32() : cat.f32() + off;
  const int64_t ldd = pv.gather.fn ? hz : width;
  Tensor zl =
      Tensor::empty({std::min(rows, std::max<int64_t>(valid, 1)), ld, cz});  // [rows, ld, c_z]
  for (int64_t i0 = 0; i0 < valid; i0 += rows) {
    const int64_t n = std::min(rows, valid - i0);
    apply_layernorm(w.ln_z, pv.z + i0 * ld * cz, n * ld, cz, zl.f32());
    for (int64_t h = 0; h < H; ++h)
      kern::gemm_batched(n, false, false, 1, cz, r, 1.0f, a.f32() + (h * r + pv.row0 + i0) * r, r,
                         r, zl.f32(), cz, ld * cz, 0.0f, dst + i0 * ldd + h * cz, ldd, ldd);
  }
  if (pv.gather.fn) {
    Tensor all = Tensor::empty({pv.rows * pv.gather.parts, hz});  // [parts*rows, H*c_z]
    pv.gather.fn(op.f32(), pv.rows * hz, all.f32());
    op = Tensor();
    for (int64_t i = 0; i < r; ++i)
      std::memcpy(cat.f32() + i * width + off, all.f32() + i * hz, hz * sizeof(float));
  }
  apply_linear(w.out, cat.f32(), r, out);
}

// s [r, c_s] += the transition layers, then LayerNorm.
void single_transition(const StructureModuleWeights& w, const StructureModuleConfig& c, float* s,
                       int64_t r) {
  const int64_t cs = c.c_s;
  Tensor h1 = Tensor::empty({r, cs}), h2 = Tensor::empty({r, cs}),
         h3 = Tensor::empty({r, cs});  // [r, c_s] each
  for (size_t l = 0; l + 2 < w.transition.size(); l += 3) {
    apply_linear(w.transition[l], s, r, h1.f32());
    kern::relu_inplace(h1.f32(), cs, r, cs);
    apply_linear(w.transition[l + 1], h1.f32(), r, h2.f32());
    kern::relu_inplace(h2.f32(), cs, r, cs);
    apply_linear(w.transition[l + 2], h2.f32(), r, h3.f32());
    kern::add_inplace(s, cs, h3.f32(), cs, r, cs);
  }
  apply_layernorm(w.ln_transition, s, r, cs, s);
}

// Angle ResNet: unnormalised [r, 7, 2] and normalised angles from s and s_initial [r, c_s].
void angle_resnet(const StructureModuleWeights& w, const StructureModuleConfig& c, const float* s,
                  const float* s0, int64_t r, float* un, float* ang) {
  const int64_t cr = c.c_resnet;
  Tensor x = Tensor::empty({r, cr}), t = Tensor::empty({r, cr});  // [r, c_resnet]
  {
    Tensor rs = relu_copy(s, r, c.c_s), rs0 = relu_copy(s0, r, c.c_s);  // [r, c_s]
    apply_linear(w.ar_in, rs.f32(), r, x.f32());
    apply_linear(w.ar_initial, rs0.f32(), r, t.f32());
    kern::add_inplace(x.f32(), cr, t.f32(), cr, r, cr);
  }
  Tensor u = Tensor::empty({r, cr});  // [r, c_resnet]
  for (size_t k = 0; k + 1 < w.ar_blocks.size(); k += 2) {
    std::memcpy(u.f32(), x.f32(), r * cr * sizeof(float));
    kern::relu_inplace(u.f32(), cr, r, cr);
    apply_linear(w.ar_blocks[k], u.f32(), r, t.f32());
    kern::relu_inplace(t.f32(), cr, r, cr);
    apply_linear(w.ar_blocks[k + 1], t.f32(), r, u.f32());
    kern::add_inplace(x.f32(), cr, u.f32(), cr, r, cr);
  }
  kern::relu_inplace(x.f32(), cr, r, cr);
  apply_linear(w.ar_out, x.f32(), r, un);
  for (int64_t k = 0; k < r * kAngles; ++k) {
    const float a = un[2 * k], b = un[2 * k + 1];
    const float inv = 1.0f / std::sqrt(std::max(a * a + b * b, c.eps));
    ang[2 * k] = a * inv;
    ang[2 * k + 1] = b * inv;
  }
}

Status check_inputs(const StructureModuleConfig& cfg, const Tensor& s, const Tensor& z,
                    const int64_t* aatype, const float* mask) {
  if (!s.defined() || s.ndim() != 2 || s.dim(1) != cfg.c_s || s.dtype() != DType::F32)
    return Status::InvalidArgument("structure module: single must be F32 [r, " +
                                   std::to_string(cfg.c_s) + "]");
  const int64_t r = s.dim(0);
  FC_RETURN_IF_ERROR(expect_shape("structure module pair", z, {r, r, cfg.c_z}));
  if (z.dtype() != DType::F32 || !s.is_contiguous() || !z.is_contiguous())
    return Status::InvalidArgument("structure module: inputs must be contiguous F32");
  for (int64_t i = 0; i < r; ++i) {
    if (aatype[i] < 0 || aatype[i] >= kRestypes)
      return Status::InvalidArgument("structure module: aatype[" + std::to_string(i) + "] = " +
                                     std::to_string(aatype[i]) + " is not a residue type 0..20");
    if (mask[i] != 0.0f && mask[i] != 1.0f)
      return Status::InvalidArgument("structure module: mask must be 0/1");
  }
  for (const Tensor* t : {&s, &z})
    for (int64_t k = 0; k < t->numel(); ++k)
      if (!std::isfinite(t->f32()[k]))
        return Status::InvalidArgument("structure module: non-finite input value");
  return Status::OK();
}

}  // namespace

Status load_linear(const TensorFile& f, const std::string& name, int64_t out, int64_t in, bool bias,
                   LinearW* w) {
  FC_RETURN_IF_ERROR(f.get_f32(name + ".weight", {out, in}, &w->w));
  FC_RETURN_IF_ERROR(check_finite(name + ".weight", w->w));
  if (!bias) return Status::OK();
  FC_RETURN_IF_ERROR(f.get_f32(name + ".bias", {out}, &w->b));
  return check_finite(name + ".bias", w->b);
}

Status load_layernorm(const TensorFile& f, const std::string& name, int64_t c, LayerNormW* w) {
  FC_RETURN_IF_ERROR(f.get_f32(name + ".weight", {c}, &w->w));
  FC_RETURN_IF_ERROR(f.get_f32(name + ".bias", {c}, &w->b));
  FC_RETURN_IF_ERROR(check_finite(name + ".weight", w->w));
  return check_finite(name + ".bias", w->b);
}

void apply_linear(const LinearW& w, const float* x, int64_t rows, float* y, bool accumulate) {
  const int64_t out = w.w.dim(0), in = w.w.dim(1);
  kern::linear(x, in, rows, in, w.w.f32(), w.b.defined() ? w.b.f32() : nullptr, out, y, out,
               accumulate);
}

void apply_layernorm(const LayerNormW& w, const float* x, int64_t rows, int64_t c, float* y) {
  kern::layernorm(x, c, y, c, rows, c, w.w.f32(), w.b.f32(), 1e-5f);
}

Status structure_module_config_from_weights(const TensorShapes& f, const std::string& prefix,
                                            StructureModuleConfig* cfg) {
  StructureModuleConfig c = *cfg;
  c.c_s = f.dim(prefix + "layer_norm_s.weight", 0);
  c.c_z = f.dim(prefix + "layer_norm_z.weight", 0);
  c.no_heads_ipa = f.dim(prefix + "ipa.head_weights", 0);
  c.c_resnet = f.dim(prefix + "angle_resnet.linear_in.weight", 0);
  const int64_t hc = f.dim(prefix + "ipa.linear_q.weight", 0);
  const int64_t qp = f.dim(prefix + "ipa.linear_q_points.linear.weight", 0);
  const int64_t kvp = f.dim(prefix + "ipa.linear_kv_points.linear.weight", 0);
  if (c.c_s <= 0 || c.c_z <= 0 || c.no_heads_ipa <= 0 || c.c_resnet <= 0 || hc <= 0 || qp <= 0 ||
      kvp <= 0 || hc % c.no_heads_ipa || qp % (3 * c.no_heads_ipa) || kvp % (3 * c.no_heads_ipa))
    return Status::InvalidArgument("structure module: parameters under '" + prefix +
                                   "' are missing or have inconsistent shapes");
  c.c_ipa = hc / c.no_heads_ipa;
  c.no_qk_points = qp / (3 * c.no_heads_ipa);
  c.no_v_points = kvp / (3 * c.no_heads_ipa) - c.no_qk_points;
  c.no_transition_layers = 0;
  while (f.has(prefix + "transition.layers." + std::to_string(c.no_transition_layers) +
               ".linear_1.weight"))
    ++c.no_transition_layers;
  c.no_resnet_blocks = 0;
  while (f.has(prefix + "angle_resnet.layers." + std::to_string(c.no_resnet_blocks) +
               ".linear_1.weight"))
    ++c.no_resnet_blocks;
  if (c.no_v_points <= 0)
    return Status::InvalidArgument("structure module: no value points in '" + prefix + "'");
  *cfg = c;
  return Status::OK();
}

Status load_structure_module(const TensorFile& f, const std::string& p,
                             const StructureModuleConfig& c, StructureModuleWeights* w) {
  const int64_t H = c.no_heads_ipa, C = c.c_ipa, Pq = c.no_qk_points, Pv = c.no_v_points;
  const int64_t cs = c.c_s, cr = c.c_resnet;
  StructureModuleWeights x;
  FC_RETURN_IF_ERROR(load_layernorm(f, p + "layer_norm_s", cs, &x.ln_s));
  FC_RETURN_IF_ERROR(load_layernorm(f, p + "layer_norm_z", c.c_z, &x.ln_z));
  FC_RETURN_IF_ERROR(load_layernorm(f, p + "layer_norm_ipa", cs, &x.ln_ipa));
  FC_RETURN_IF_ERROR(load_layernorm(f, p + "transition.layer_norm", cs, &x.ln_transition));
  FC_RETURN_IF_ERROR(load_linear(f, p + "linear_in", cs, cs, true, &x.linear_in));
  FC_RETURN_IF_ERROR(load_linear(f, p + "ipa.linear_q", H * C, cs, true, &x.q));
  FC_RETURN_IF_ERROR(load_linear(f, p + "ipa.linear_kv", 2 * H * C, cs, true, &x.kv));
  FC_RETURN_IF_ERROR(
      load_linear(f, p + "ipa.linear_q_points.linear", 3 * H * Pq, cs, true, &x.q_pts));
  FC_RETURN_IF_ERROR(
      load_linear(f, p + "ipa.linear_kv_points.linear", 3 * H * (Pq + Pv), cs, true, &x.kv_pts));
  FC_RETURN_IF_ERROR(load_linear(f, p + "ipa.linear_b", H, c.c_z, true, &x.b));
  FC_RETURN_IF_ERROR(
      load_linear(f, p + "ipa.linear_out", cs, H * (C + 4 * Pv + c.c_z), true, &x.out));
  FC_RETURN_IF_ERROR(f.get_f32(p + "ipa.head_weights", {H}, &x.head_weights));
  FC_RETURN_IF_ERROR(check_finite(p + "ipa.head_weights", x.head_weights));
  for (int64_t l = 0; l < c.no_transition_layers; ++l)
    for (const char* n : {"linear_1", "linear_2", "linear_3"}) {
      x.transition.emplace_back();
      FC_RETURN_IF_ERROR(load_linear(f, p + "transition.layers." + std::to_string(l) + "." + n, cs,
                                     cs, true, &x.transition.back()));
    }
  FC_RETURN_IF_ERROR(load_linear(f, p + "bb_update.linear", 6, cs, true, &x.bb_update));
  FC_RETURN_IF_ERROR(load_linear(f, p + "angle_resnet.linear_in", cr, cs, true, &x.ar_in));
  FC_RETURN_IF_ERROR(
      load_linear(f, p + "angle_resnet.linear_initial", cr, cs, true, &x.ar_initial));
  for (int64_t k = 0; k < c.no_resnet_blocks; ++k)
    for (const char* n : {"linear_1", "linear_2"}) {
      x.ar_blocks.emplace_back();
      FC_RETURN_IF_ERROR(load_linear(f, p + "angle_resnet.layers." + std::to_string(k) + "." + n,
                                     cr, cr, true, &x.ar_blocks.back()));
    }
  FC_RETURN_IF_ERROR(
      load_linear(f, p + "angle_resnet.linear_out", 2 * kAngles, cr, true, &x.ar_out));
  *w = std::move(x);
  return Status::OK();
}

Status structure_module_forward(const StructureModuleWeights& w, const StructureModuleConfig& c,
                                const Tensor& s_in, const Tensor& z, const int64_t* aatype,
                                const float* mask, StructureModuleOutput* out,
                                const StructureTraceFn& trace, int64_t pair_block_bytes) {
  FC_RETURN_IF_ERROR(check_inputs(c, s_in, z, aatype, mask));
  if (trace) {
    const int64_t r = s_in.dim(0);
    Tensor zl = Tensor::empty({r, r, c.c_z});  // [r, r, c_z] LN_z(z), only to be traced
    apply_layernorm(w.ln_z, z.f32(), r * r, c.c_z, zl.f32());
    trace("sm.pair_ln", -1, zl);
  }
  return structure_module_rows(w, c, s_in, PairRows{z.f32(), 0, s_in.dim(0), s_in.dim(0), {}},
                               aatype, mask, out, trace, pair_block_bytes);
}

Status structure_module_rows(const StructureModuleWeights& w, const StructureModuleConfig& c,
                             const Tensor& s_in, const PairRows& pv, const int64_t* aatype,
                             const float* mask, StructureModuleOutput* out,
                             const StructureTraceFn& trace, int64_t pair_block_bytes) {
  const int64_t r = s_in.dim(0), cs = c.c_s, L = c.no_blocks, H = c.no_heads_ipa;
  auto emit = [&](const char* stage, int layer, const Tensor& t) {
    if (trace) trace(stage, layer, t);
  };
  Tensor s0 = Tensor::empty({r, cs});  // [r, c_s] s_initial = LN_s(s)
  Tensor s = Tensor::empty({r, cs});   // [r, c_s] the running single
  apply_layernorm(w.ln_s, s_in.f32(), r, cs, s0.f32());
  const int64_t rows = pair_block_rows(r, c.c_z, pair_block_bytes);
  // The IPA pair bias of every row, b [r, ldb, H] (one process: [r, r, H]; sharded: each rank's
  // rows all-gathered, [parts*rows, ld, H], padded rows and columns unused).
  Tensor b;
  if (!pv.gather.fn) {
    b = Tensor::empty({r * r, H});  // [r, r, H]
    ipa_pair_bias(w, c, pv, rows, b.f32());
  } else {
    Tensor mine = Tensor::empty({pv.rows * pv.ld, H});          // [rows, ld, H]
    b = Tensor::empty({pv.gather.parts * pv.rows * pv.ld, H});  // [parts*rows, ld, H]
    ipa_pair_bias(w, c, pv, rows, mine.f32());
    pv.gather.fn(mine.f32(), pv.rows * pv.ld * H, b.f32());
  }
  const int64_t ldb = pv.gather.fn ? pv.ld : r;
  apply_linear(w.linear_in, s0.f32(), r, s.f32());
  emit("sm.single_ln", -1, s0);
  emit("sm.single_in", -1, s);

  StructureModuleOutput o;
  o.frames = Tensor::empty({L, r, 7});
  o.sidechain_frames = Tensor::empty({L, r, kRigidGroups, 4, 4});
  o.unnormalized_angles = Tensor::empty({L, r, kAngles, 2});
  o.angles = Tensor::empty({L, r, kAngles, 2});
  o.positions = Tensor::empty({L, r, kAtom14, 3});
  o.states = Tensor::empty({L, r, cs});
  std::vector<float> quat(r * 4, 0.0f), trans(r * 3, 0.0f);  // [r, 4], [r, 3] (nm)
  std::vector<float> rot(r * 9), trans_a(r * 3);             // [r, 3, 3], [r, 3] (A)
  for (int64_t i = 0; i < r; ++i) quat[4 * i] = 1.0f;
  Tensor ipa = Tensor::empty({r, cs});  // [r, c_s]
  Tensor upd = Tensor::empty({r, 6});   // [r, 6]
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t i = 0; i < r; ++i) quat_to_rot(&quat[4 * i], &rot[9 * i]);
    invariant_point_attention(w, c, s.f32(), pv, b.f32(), ldb, Frames{rot.data(), trans.data()},
                              mask, r, rows, ipa.f32());
    emit("sm.ipa", static_cast<int>(l), ipa);
    kern::add_inplace(s.f32(), cs, ipa.f32(), cs, r, cs);
    apply_layernorm(w.ln_ipa, s.f32(), r, cs, s.f32());
    single_transition(w, c, s.f32(), r);
    apply_linear(w.bb_update, s.f32(), r, upd.f32());
    emit("sm.bb_update", static_cast<int>(l), upd);
    float* fr = o.frames.f32() + l * r * 7;
    for (int64_t i = 0; i < r; ++i) {
      backbone_update(&quat[4 * i], &trans[3 * i], upd.f32() + 6 * i);
      quat_to_rot(&quat[4 * i], &rot[9 * i]);
      for (int k = 0; k < 3; ++k) trans_a[3 * i + k] = c.trans_scale_factor * trans[3 * i + k];
      std::memcpy(fr + 7 * i, &quat[4 * i], 4 * sizeof(float));
      std::memcpy(fr + 7 * i + 4, &trans_a[3 * i], 3 * sizeof(float));
    }
    float* un = o.unnormalized_angles.f32() + l * r * kAngles * 2;
    float* ang = o.angles.f32() + l * r * kAngles * 2;
    angle_resnet(w, c, s.f32(), s0.f32(), r, un, ang);
    float* sc = o.sidechain_frames.f32() + l * r * kRigidGroups * 16;
    torsion_angles_to_frames(aatype, rot.data(), trans_a.data(), ang, r, sc);
    frames_to_atom14(aatype, sc, r, o.positions.f32() + l * r * kAtom14 * 3);
    std::memcpy(o.states.f32() + l * r * cs, s.f32(), r * cs * sizeof(float));
  }
  o.single = s;
  *out = std::move(o);
  return Status::OK();
}

}  // namespace fc::af2
