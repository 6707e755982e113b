// The AF3 trunk (Boltz golden, shared/golden README "AF3 trunk cases"): SwiGLU kernels against
// their references, Pairformer and MSA-module outputs and block-0 traces at several chunk sizes.
#include "foldcube/af3.h"

#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/runtime.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"
#include "model/af3_weights.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/train.h"
#include "plan/memory_model.h"
#include "test_util.h"

namespace fc {
namespace {

using test::masked_err;

Tensor get(const TensorFile& f, const std::string& name) {
  Tensor t;
  EXPECT_TRUE(f.get_f32(name, {}, &t).ok()) << name;
  return t.clone();
}

TEST(SwiGluKernel, MatchesReference) {
  const int64_t rows = 37, n = 29, ld = 2 * n + 3;
  std::vector<float> a(rows * ld), b(rows * ld), dy(rows * n);
  for (size_t i = 0; i < a.size(); ++i) {
    a[i] = std::sin(0.37f * i) * 6.f;
    b[i] = std::cos(0.11f * i) * 2.f;
  }
  for (size_t i = 0; i < dy.size(); ++i) dy[i] = std::sin(0.7f * i);
  std::vector<float> fa = a, ra = a;
  kern::swiglu(fa.data(), ld, b.data() + 1, ld, rows, n);
  kern::ref::swiglu(ra.data(), ld, b.data() + 1, ld, rows, n);
  EXPECT_LT(test::max_abs_diff(fa.data(), ra.data(), rows * ld), 1e-5);
  // Contiguous rows (one long vector) and a size that takes the threaded path.
  for (const int64_t big_rows : {int64_t{3}, int64_t{2000}}) {
    std::vector<float> x(big_rows * n), y(big_rows * n);
    for (size_t i = 0; i < x.size(); ++i) {
      x[i] = std::sin(0.013f * i) * 9.f;
      y[i] = std::cos(0.05f * i);
    }
    std::vector<float> fx = x, rx = x;
    kern::swiglu(fx.data(), n, y.data(), n, big_rows, n);
    kern::ref::swiglu(rx.data(), n, y.data(), n, big_rows, n);
    EXPECT_LT(test::max_abs_diff(fx.data(), rx.data(), big_rows * n), 1e-5) << big_rows;
  }
  std::vector<float> fda(rows * n), fdb(rows * n), rda(rows * n), rdb(rows * n);
  kern::swiglu_backward(a.data(), ld, b.data() + 1, ld, dy.data(), n, fda.data(), n, fdb.data(), n,
                        rows, n);
  kern::ref::swiglu_backward(a.data(), ld, b.data() + 1, ld, dy.data(), n, rda.data(), n,
                             rdb.data(), n, rows, n);
  EXPECT_LT(test::max_abs_diff(fda.data(), rda.data(), rows * n), 1e-5);
  EXPECT_LT(test::max_abs_diff(fdb.data(), rdb.data(), rows * n), 1e-5);
  // The reference backward against central differences of the reference forward.
  for (int64_t i : {0, 5, 17, 100}) {
    const int64_t r = i / n, j = i % n;
    auto f = [&](double da, double db) {
      float x = static_cast<float>(a[r * ld + j] + da),
            y = static_cast<float>(b[r * ld + j + 1] + db);
      kern::ref::swiglu(&x, 1, &y, 1, 1, 1);
      return static_cast<double>(x);
    };
    const double h = 1e-2;
    EXPECT_NEAR((f(h, 0) - f(-h, 0)) / (2 * h) * dy[i], rda[i], 2e-3 * (1 + std::abs(rda[i])));
    EXPECT_NEAR((f(0, h) - f(0, -h)) / (2 * h) * dy[i], rdb[i], 2e-3 * (1 + std::abs(rdb[i])));
  }
}

struct Af3Case {
  std::string file;
  int64_t chunk;  // 0 = automatic
};
std::string CaseName(const Af3Case& c) {
  return c.file.substr(0, c.file.find('.')) + "_chunk" + std::to_string(c.chunk);
}
void PrintTo(const Af3Case& p, std::ostream* os) { *os << CaseName(p); }

class GoldenPairformer : public ::testing::TestWithParam<Af3Case> {};

TEST_P(GoldenPairformer, OutputsAndBlock0Traces) {
  const std::string path = test::golden_path(GetParam().file);
  if (path.empty()) GTEST_SKIP() << GetParam().file << " not present (shared/golden)";
  TensorFile f;
  ASSERT_TRUE(read_safetensors(path, &f).ok());
  Af3Config cfg;
  Status st = Af3Config::from_weights(f, &cfg);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(cfg.kind, "pairformer");
  PairformerStack stack;
  st = PairformerStack::load(cfg, f, &stack);
  ASSERT_TRUE(st.ok()) << st.ToString();
  Tensor s = get(f, "input.s"), z = get(f, "input.z"), mask = get(f, "input.mask");
  const Tensor pair_mask = get(f, "input.pair_mask");
  std::map<std::string, Tensor> traces;
  ForwardOptions opts;
  opts.chunk = GetParam().chunk;
  opts.trace = [&](int block, const std::string& module, const std::string& stream,
                   const Tensor& v) {
    if (block == 0) traces["trace.block0." + module + "." + stream] = v.clone();
  };
  st = stack.forward(s, z, mask, opts);
  ASSERT_TRUE(st.ok()) << st.ToString();
  int checked = 0;
  for (const std::string& name : f.names) {
    if (name.rfind("trace.block0.", 0) != 0) continue;
    ASSERT_TRUE(traces.count(name)) << name;
    const bool is_s = name.back() == 's';
    EXPECT_LT(masked_err(traces[name], f.tensors.at(name), is_s ? mask : pair_mask), 1e-4) << name;
    ++checked;
  }
  EXPECT_EQ(checked, 7);
  EXPECT_LT(masked_err(s, f.tensors.at("output.s"), mask), 1e-4);
  EXPECT_LT(masked_err(z, f.tensors.at("output.z"), pair_mask), 1e-4);
  EXPECT_TRUE(test::all_finite(s) && test::all_finite(z));
}

INSTANTIATE_TEST_SUITE_P(Cases, GoldenPairformer,
                         ::testing::Values(Af3Case{"pairformer_tiny.safetensors", 0},
                                           Af3Case{"pairformer_tiny.safetensors", 1},
                                           Af3Case{"pairformer_tiny.safetensors", 3},
                                           Af3Case{"pairformer_af3dims.safetensors", 0},
                                           Af3Case{"pairformer_af3dims.safetensors", 3}),
                         [](const auto& info) { return CaseName(info.param); });

class GoldenMsaModule : public ::testing::TestWithParam<Af3Case> {};

TEST_P(GoldenMsaModule, OutputsAndBlock0Traces) {
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path(GetParam().file), &f).ok());
  Af3Config cfg;
  Status st = Af3Config::from_weights(f, &cfg);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(cfg.kind, "msa_module");
  MsaModule mod;
  st = MsaModule::load(cfg, f, &mod);
  ASSERT_TRUE(st.ok()) << st.ToString();
  Tensor z = get(f, "input.z"), emb = get(f, "input.emb"), msa_mask = get(f, "input.msa_mask");
  const Tensor tok = get(f, "input.token_pad_mask"), pair_mask = get(f, "input.pair_mask");
  Tensor feat;
  st = msa_features(f.tensors.at("input.msa"), get(f, "input.has_deletion"),
                    get(f, "input.deletion_value"), get(f, "input.msa_paired"), &feat);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(test::golden_err(feat, f.tensors.at("input.msa_feat")), 0.0);
  std::map<std::string, Tensor> traces;
  ForwardOptions opts;
  opts.chunk = GetParam().chunk;
  opts.trace = [&](int block, const std::string& module, const std::string& stream,
                   const Tensor& v) {
    if (block == -1) traces["trace." + module + "." + stream] = v.clone();
    if (block == 0) traces["trace.block0." + module + "." + stream] = v.clone();
  };
  st = mod.forward(z, emb, feat, msa_mask, tok, opts);
  ASSERT_TRUE(st.ok()) << st.ToString();
  int checked = 0;
  for (const std::string& name : f.names) {
    if (name.rfind("trace.", 0) != 0) continue;
    ASSERT_TRUE(traces.count(name)) << name;
    const bool is_m = name.back() == 'm';
    EXPECT_LT(masked_err(traces[name], f.tensors.at(name), is_m ? msa_mask : pair_mask), 1e-4)
        << name;
    ++checked;
  }
  EXPECT_EQ(checked, 9);
  EXPECT_LT(masked_err(z, f.tensors.at("output.z"), pair_mask), 1e-4);
  EXPECT_TRUE(test::all_finite(z));
}

INSTANTIATE_TEST_SUITE_P(Cases, GoldenMsaModule,
                         ::testing::Values(Af3Case{"msa_module_tiny.safetensors", 0},
                                           Af3Case{"msa_module_tiny.safetensors", 1},
                                           Af3Case{"msa_module_tiny.safetensors", 3}),
                         [](const auto& info) { return CaseName(info.param); });

// ---- Training: every gradient against the golden, per policy and chunking ----------------------

struct Af3TrainCase {
  std::string file;
  std::string policy;  // none | module | block, or "<block 0>_<block 1>" (2-block cases)
  int64_t chunk;       // 0 = automatic
};
std::string CaseName(const Af3TrainCase& c) {
  return c.file.substr(0, c.file.find('.')) + "_" + c.policy + "_chunk" + std::to_string(c.chunk);
}
void PrintTo(const Af3TrainCase& p, std::ostream* os) { *os << CaseName(p); }

// Checks every grad.* tensor of f (README limit 2e-4, compared everywhere) against `got`.
void expect_grads(const TensorFile& f, const std::map<std::string, Tensor>& got) {
  ASSERT_EQ(f.metadata.at("mode").rfind("eval", 0), 0u) << "golden gradients must be dropout-free";
  int checked = 0;
  for (const std::string& name : f.names) {
    if (name.rfind("grad.", 0) != 0) continue;
    auto it = got.find(name);
    ASSERT_TRUE(it != got.end()) << "no gradient produced for " << name;
    EXPECT_LT(test::golden_err(it->second, f.tensors.at(name)), 2e-4) << name;
    ++checked;
  }
  EXPECT_EQ(checked, static_cast<int>(got.size()));
}

class GoldenAf3Training : public ::testing::TestWithParam<Af3TrainCase> {};

TEST_P(GoldenAf3Training, EveryGradient) {
  const Af3TrainCase& tc = GetParam();
  const std::string path = test::golden_path(tc.file);
  if (path.empty()) GTEST_SKIP() << tc.file << " not present (shared/golden)";
  TensorFile f;
  ASSERT_TRUE(read_safetensors(path, &f).ok());
  Af3Config cfg;
  ASSERT_TRUE(Af3Config::from_weights(f, &cfg).ok());
  TrainOptions opts;
  for (const std::string& p :
       {tc.policy.substr(0, tc.policy.find('_')), tc.policy.substr(tc.policy.find('_') + 1)}) {
    opts.policy.emplace_back();
    ASSERT_TRUE(parse_recompute(p, &opts.policy.back()).ok()) << p;
  }
  if (tc.policy.find('_') == std::string::npos) opts.policy.resize(1);
  opts.chunk = tc.chunk;
  TrainResult res;
  std::map<std::string, Tensor> got;
  if (cfg.kind == "pairformer") {
    PairformerStack stack;
    ASSERT_TRUE(PairformerStack::load(cfg, f, &stack).ok());
    Tensor s = get(f, "input.s"), z = get(f, "input.z");
    const Status st = stack.train_step(s, z, get(f, "input.mask"), get(f, "probe.s"),
                                       get(f, "probe.z"), opts, &res);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_LT(masked_err(s, f.tensors.at("output.s"), get(f, "input.mask")), 1e-4);
    EXPECT_LT(masked_err(z, f.tensors.at("output.z"), get(f, "input.pair_mask")), 1e-4);
    got["grad.input.s"] = res.grad_m;
  } else {
    MsaModule mod;
    ASSERT_TRUE(MsaModule::load(cfg, f, &mod).ok());
    Tensor z = get(f, "input.z"), grad_emb;
    const Status st =
        mod.train_step(z, get(f, "input.emb"), get(f, "input.msa_feat"), get(f, "input.msa_mask"),
                       get(f, "input.token_pad_mask"), get(f, "probe.z"), opts, &res, &grad_emb);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_LT(masked_err(z, f.tensors.at("output.z"), get(f, "input.pair_mask")), 1e-4);
    got["grad.input.emb"] = grad_emb;
    got["grad.trace.embed.m"] = res.grad_m;
  }
  got["grad.input.z"] = res.grad_z;
  for (const auto& [name, t] : res.grad_params) got["grad.param." + name] = t;
  expect_grads(f, got);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, GoldenAf3Training,
    ::testing::Values(Af3TrainCase{"pairformer_tiny.safetensors", "none", 0},
                      Af3TrainCase{"pairformer_tiny.safetensors", "module", 0},
                      Af3TrainCase{"pairformer_tiny.safetensors", "block", 0},
                      Af3TrainCase{"pairformer_tiny.safetensors", "none", 1},
                      Af3TrainCase{"pairformer_tiny.safetensors", "module", 3},
                      Af3TrainCase{"pairformer_tiny.safetensors", "none_block", 0},
                      Af3TrainCase{"pairformer_tiny.safetensors", "module_block", 2},
                      Af3TrainCase{"pairformer_af3dims.safetensors", "module", 0},
                      Af3TrainCase{"pairformer_af3dims.safetensors", "none", 3},
                      Af3TrainCase{"msa_module_tiny.safetensors", "none", 0},
                      Af3TrainCase{"msa_module_tiny.safetensors", "module", 0},
                      Af3TrainCase{"msa_module_tiny.safetensors", "block", 0},
                      Af3TrainCase{"msa_module_tiny.safetensors", "none", 1},
                      Af3TrainCase{"msa_module_tiny.safetensors", "none_block", 0},
                      Af3TrainCase{"msa_module_tiny.safetensors", "module", 3}),
    [](const auto& info) { return CaseName(info.param); });

// ---- Dropout: Boltz's axes, reproduced by recompute ------------------------------------------

// Each pair layer of the Pairformer in training mode: the update of every row i (column j for
// tri_att_end) is either dropped whole or scaled whole by 1/(1-p), and both happen.
TEST(Af3Dropout, OneDrawPerRowOrColumn) {
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path("pairformer_tiny.safetensors"), &f).ok());
  EvoformerConfig cfg = test::small_config();
  cfg.c_m = 24, cfg.no_heads_msa = 4, cfg.c_hidden_msa_att = 6, cfg.c_hidden_mul = 16;
  cfg.pair_dropout = 0.4f;
  PairformerBlockWeights w;
  allocate_pairformer_block(cfg, &w);
  ASSERT_TRUE(load_named(boltz_params(w, "layers.0."), f).ok());
  const Tensor z0 = get(f, "input.z");
  const int64_t n = z0.dim(0), cz = cfg.c_z;
  StackInputs in;
  ASSERT_TRUE(prepare_inputs(cfg, Tensor::zeros({1, n, cfg.c_m}), z0, Tensor(),
                             get(f, "input.pair_mask"), &in)
                  .ok());
  BlockContext ctx = make_context(cfg, in, 0);
  ctx.table = &kPairformerBlock;
  ctx.dropout_key = 12345;
  for (const char* name : {"tri_mul_out", "tri_mul_in", "tri_att_start", "tri_att_end"}) {
    const LayerDesc& l = *find_layer(kPairformerBlock, name);
    const bool by_column = l.share == DropoutShare::kPerColumn;
    Tensor ref = z0.clone(), drop = z0.clone();
    ctx.dropout = false;
    layer_train(l, &w, ctx, nullptr, ref.f32(), nullptr);
    ctx.dropout = true;
    layer_train(l, &w, ctx, nullptr, drop.f32(), nullptr);
    int dropped = 0, kept = 0;
    for (int64_t a = 0; a < n; ++a) {
      double lo = 1e30, hi = -1e30;  // the ratio of the updates over the item's elements
      for (int64_t b = 0; b < n; ++b)
        for (int64_t c = 0; c < cz; ++c) {
          const int64_t i = by_column ? b : a, j = by_column ? a : b, e = (i * n + j) * cz + c;
          const double u = ref.f32()[e] - z0.f32()[e], ud = drop.f32()[e] - z0.f32()[e];
          if (std::abs(u) < 1e-3) continue;
          lo = std::min(lo, ud / u);
          hi = std::max(hi, ud / u);
        }
      const bool is_dropped = std::abs(lo) < 1e-3 && std::abs(hi) < 1e-3;
      const bool is_kept = std::abs(lo - 1 / 0.6) < 1e-2 && std::abs(hi - 1 / 0.6) < 1e-2;
      EXPECT_TRUE(is_dropped || is_kept) << name << " item " << a << ": " << lo << " .. " << hi;
      dropped += is_dropped;
      kept += is_kept;
    }
    EXPECT_GT(dropped, 0) << name;
    EXPECT_GT(kept, 0) << name;
  }
}

// Gradients with dropout on do not depend on the recompute policy (the masks are recomputed).
TEST(Af3Dropout, PoliciesAgree) {
  for (const char* file : {"pairformer_tiny.safetensors", "msa_module_tiny.safetensors"}) {
    TensorFile f;
    ASSERT_TRUE(read_safetensors(test::data_path(file), &f).ok());
    Af3Config cfg;
    ASSERT_TRUE(Af3Config::from_weights(f, &cfg).ok());
    std::vector<TrainResult> res(3);
    std::vector<Tensor> out(3);
    const Recompute policies[3] = {Recompute::kNone, Recompute::kModule, Recompute::kBlock};
    for (int p = 0; p < 3; ++p) {
      TrainOptions opts;
      opts.policy = {policies[p]};
      opts.dropout = true;
      opts.seed = 99;
      Tensor z = get(f, "input.z");
      if (cfg.kind == "pairformer") {
        PairformerStack st;
        ASSERT_TRUE(PairformerStack::load(cfg, f, &st).ok());
        Tensor s = get(f, "input.s");
        ASSERT_TRUE(st.train_step(s, z, get(f, "input.mask"), get(f, "probe.s"), get(f, "probe.z"),
                                  opts, &res[p])
                        .ok());
      } else {
        MsaModule mod;
        ASSERT_TRUE(MsaModule::load(cfg, f, &mod).ok());
        Tensor ge;
        ASSERT_TRUE(mod.train_step(z, get(f, "input.emb"), get(f, "input.msa_feat"),
                                   get(f, "input.msa_mask"), get(f, "input.token_pad_mask"),
                                   get(f, "probe.z"), opts, &res[p], &ge)
                        .ok());
      }
      out[p] = z;
    }
    // Dropout changed the result...
    EXPECT_GT(test::golden_err(out[0], f.tensors.at("output.z")), 1e-3) << file;
    // ...identically under every policy.
    for (int p = 1; p < 3; ++p) {
      EXPECT_LT(test::golden_err(out[p], out[0]), 1e-6) << file;
      EXPECT_LT(test::golden_err(res[p].grad_z, res[0].grad_z), 1e-5) << file;
      ASSERT_EQ(res[p].grad_params.size(), res[0].grad_params.size());
      for (size_t i = 0; i < res[0].grad_params.size(); ++i)
        EXPECT_LT(test::golden_err(res[p].grad_params[i].second, res[0].grad_params[i].second),
                  1e-5)
            << file << " " << res[0].grad_params[i].first;
    }
  }
}

// ---- Memory model: activations and step peak of the AF3 stacks against the allocator ---------

struct Af3MemCase {
  std::string kind;  // pairformer | msa_module
  std::vector<Recompute> policy;
  int64_t chunk;
  DType store = DType::F32;  // TrainOptions::dtype (BF16: bf16 kept inputs and GEMM inputs)
};
std::string CaseName(const Af3MemCase& c) {
  std::string n = c.kind + "_chunk" + std::to_string(c.chunk);
  for (Recompute p : c.policy) n += std::string("_") + recompute_name(p);
  return n + (c.store == DType::BF16 ? "_bf16" : "");
}
void PrintTo(const Af3MemCase& p, std::ostream* os) { *os << CaseName(p); }

class Af3TrainMemory : public ::testing::TestWithParam<Af3MemCase> {};

TEST_P(Af3TrainMemory, ActivationsAndPeakMatchAllocator) {
  const Af3MemCase& c = GetParam();
  Af3Config cfg;
  const bool af3dims = c.kind == "pairformer_af3dims";
  cfg.kind = af3dims ? "pairformer" : c.kind;
  if (!af3dims) {
    cfg.c_s = 24, cfg.c_z = 16, cfg.c_m = 8, cfg.no_heads_single = 4, cfg.no_heads_pair = 2;
    cfg.c_hidden_pair = 8, cfg.pwa_heads = 4, cfg.pwa_head_dim = 8, cfg.c_hidden_opm = 8;
  }
  cfg.no_blocks = af3dims ? 2 : 3;
  ASSERT_TRUE(cfg.validate().ok());
  const int64_t n = af3dims ? 40 : 11, N = 5;
  const EvoformerConfig trunk = af3_trunk_config(cfg);
  TrainOptions opts;
  opts.policy = c.policy;
  opts.chunk = c.chunk;
  opts.dtype = c.store;
  TrainResult res;
  Tensor z = Tensor::full({n, n, cfg.c_z}, 0.2f), gz = Tensor::full(z.shape(), 1.f);
  const BlockTable& t = cfg.kind == "pairformer" ? kPairformerBlock : kMsaModuleBlock;
  const int64_t s = cfg.kind == "pairformer" ? 1 : N;
  if (cfg.kind == "pairformer") {
    const PairformerStack st = PairformerStack::random(cfg, 5);
    Tensor x = Tensor::full({n, cfg.c_s}, -0.3f), gx = Tensor::full(x.shape(), 1.f);
    ASSERT_TRUE(st.train_step(x, z, Tensor(), gx, gz, opts, &res).ok());
  } else {
    const MsaModule mod = MsaModule::random(cfg, 5);
    Tensor feat = Tensor::full({N, n, cfg.msa_feat}, 0.1f), emb = Tensor::full({n, cfg.c_s}, 0.5f);
    Tensor ge;
    ASSERT_TRUE(mod.train_step(z, emb, feat, Tensor(), Tensor(), gz, opts, &res, &ge).ok());
  }
  const int64_t target = default_train_chunk_target_bytes(trunk, s, n);
  EXPECT_EQ(res.activation_bytes, stack_activation_bytes(t, trunk, s, n, cfg.no_blocks, c.policy, 4,
                                                         c.chunk, target, c.store));
  const int64_t peak = stack_step_peak_bytes(t, trunk, s, n, cfg.no_blocks, c.policy, num_threads(),
                                             4, c.chunk, target, c.store);
  EXPECT_EQ(res.peak_bytes, peak);
  if (c.store == DType::BF16) {  // a model that ignored the dtype would give the fp32 peak
    EXPECT_NE(peak, stack_step_peak_bytes(t, trunk, s, n, cfg.no_blocks, c.policy, num_threads(), 4,
                                          c.chunk, target));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Policies, Af3TrainMemory,
    ::testing::Values(
        Af3MemCase{"pairformer_af3dims", {Recompute::kModule}, 0},
        Af3MemCase{"pairformer", {Recompute::kNone}, 0},
        Af3MemCase{"pairformer", {Recompute::kModule}, 0},
        Af3MemCase{"pairformer", {Recompute::kBlock}, 0},
        Af3MemCase{"pairformer", {Recompute::kNone}, 3},
        Af3MemCase{"pairformer", {Recompute::kBlock, Recompute::kNone, Recompute::kModule}, 2},
        Af3MemCase{"msa_module", {Recompute::kNone}, 0},
        Af3MemCase{"msa_module", {Recompute::kModule}, 0},
        Af3MemCase{"msa_module", {Recompute::kBlock}, 0},
        Af3MemCase{"msa_module", {Recompute::kModule}, 3},
        Af3MemCase{"msa_module", {Recompute::kNone, Recompute::kBlock, Recompute::kModule}, 2},
        Af3MemCase{"pairformer_af3dims", {Recompute::kNone}, 0, DType::BF16},
        Af3MemCase{"pairformer", {Recompute::kModule}, 0, DType::BF16},
        Af3MemCase{"pairformer",
                   {Recompute::kBlock, Recompute::kNone, Recompute::kModule},
                   2,
                   DType::BF16},
        Af3MemCase{"msa_module", {Recompute::kNone}, 0, DType::BF16},
        Af3MemCase{"msa_module", {Recompute::kModule}, 3, DType::BF16},
        Af3MemCase{"msa_module", {Recompute::kBlock}, 0, DType::BF16}),
    [](const auto& info) { return CaseName(info.param); });

// The inference peak formula and the weight bytes against the tracking allocator.
TEST(Af3ForwardMemory, PeakAndWeightsMatchAllocator) {
  int bf16_differs = 0;  // bf16 cases whose peak is not the fp32 one
  for (const DType dtype : {DType::F32, DType::BF16})
    for (const char* kind : {"pairformer", "msa_module"})
      for (int64_t chunk : {0, 1, 4}) {
        SCOPED_TRACE(dtype == DType::BF16 ? "bf16" : "fp32");
        Af3Config cfg;
        cfg.kind = kind;
        cfg.c_s = 24, cfg.c_z = 16, cfg.c_m = 8, cfg.no_heads_single = 4, cfg.no_heads_pair = 2;
        cfg.c_hidden_pair = 8, cfg.pwa_heads = 4, cfg.pwa_head_dim = 8, cfg.c_hidden_opm = 8;
        cfg.no_blocks = 2;
        const int64_t n = 13, N = 6;
        Af3PlanRequest q;
        q.cfg = cfg;
        q.n = n;
        q.n_msa = N;
        q.threads = num_threads();
        Af3Plan plan;
        ASSERT_TRUE(af3_plan(q, &plan).ok());
        const int64_t live0 = mem_stats().live_bytes;
        Tensor z = Tensor::full({n, n, cfg.c_z}, 0.2f);
        ForwardOptions opts;
        opts.chunk = chunk;
        opts.dtype = dtype;
        const int64_t predicted = af3_forward_peak_bytes(cfg, n, N, chunk, 0, num_threads(), dtype);
        // the bf16 GEMM-input copies of the weights and rows (where the peak falls in a layer)
        if (dtype == DType::BF16)
          bf16_differs += predicted != af3_forward_peak_bytes(cfg, n, N, chunk, 0, num_threads());
        if (cfg.kind == "pairformer") {
          const PairformerStack st = PairformerStack::random(cfg, 3);
          EXPECT_EQ(mem_stats().live_bytes - live0 - z.nbytes(), plan.rows[0].param_bytes);
          Tensor x = Tensor::full({n, cfg.c_s}, 0.1f);
          MemoryScope scope;
          ASSERT_TRUE(st.forward(x, z, Tensor(), opts).ok());
          EXPECT_EQ(scope.peak() - scope.start_live(), predicted) << kind << " chunk " << chunk;
        } else {
          const MsaModule mod = MsaModule::random(cfg, 3);
          EXPECT_EQ(mem_stats().live_bytes - live0 - z.nbytes(), plan.rows[0].param_bytes);
          Tensor feat = Tensor::full({N, n, cfg.msa_feat}, 0.1f),
                 emb = Tensor::full({n, cfg.c_s}, 1.f);
          MemoryScope scope;
          ASSERT_TRUE(mod.forward(z, emb, feat, Tensor(), Tensor(), opts).ok());
          EXPECT_EQ(scope.peak() - scope.start_live(), predicted) << kind << " chunk " << chunk;
        }
      }
  EXPECT_GT(bf16_differs, 0);
}

TEST(Af3Plan, ChoosesLeastRecomputeThatFits) {
  Af3PlanRequest q;
  q.cfg.no_blocks = 4;
  q.n = 64;
  q.train = true;
  Af3Plan all;
  ASSERT_TRUE(af3_plan(q, &all).ok());
  ASSERT_EQ(all.rows.size(), 3u);
  EXPECT_EQ(all.chosen, 0);
  EXPECT_GT(all.rows[0].peak_bytes, all.rows[1].peak_bytes);
  EXPECT_GT(all.rows[0].activation_bytes, all.rows[1].activation_bytes);
  EXPECT_GT(all.rows[1].activation_bytes, all.rows[2].activation_bytes);
  // A budget between the module and none peaks picks module.
  q.memory_bytes = all.rows[0].param_bytes + all.input_bytes + all.rows[1].peak_bytes;
  Af3Plan some;
  ASSERT_TRUE(af3_plan(q, &some).ok());
  EXPECT_EQ(some.chosen, 1);
  q.memory_bytes = 1;
  ASSERT_TRUE(af3_plan(q, &some).ok());
  EXPECT_EQ(some.chosen, -1);
}

// ---- CLI: `foldcube run --stack pairformer|msa_module` with the golden files as inputs ---------

struct Af3CliCase {
  std::string file;
  std::string flags;  // stack / training flags
};
std::string CaseName(const Af3CliCase& c) {
  std::string n = c.file.substr(0, c.file.find('.'));
  if (c.flags.empty()) n += "_auto";
  for (char ch : c.flags)
    if (std::isalnum(static_cast<unsigned char>(ch)))
      n += ch;
    else if (ch == ' ')
      n += '_';
  return n;
}
void PrintTo(const Af3CliCase& p, std::ostream* os) { *os << CaseName(p); }

class Af3Cli : public ::testing::TestWithParam<Af3CliCase> {};

// The golden file serves as weights, inputs and grad outputs (its probe.* tensors); the output
// file holds every golden output and gradient under the golden names.
TEST_P(Af3Cli, WritesGoldenNames) {
  const Af3CliCase& c = GetParam();
  const std::string golden = test::data_path(c.file);
  test::TempDir dir;
  const std::string out = dir.file("out.safetensors");
  const bool training = c.flags.find("--grad-outputs") != std::string::npos;
  const test::Result r =
      test::run_cli("run --weights " + golden + " --inputs " + golden + " --out " + out + " " +
                    c.flags + (training ? " " + golden : "") + " --report " + dir.file("r.json"));
  ASSERT_EQ(r.code, 0) << r.out;
  TensorFile f, o;
  ASSERT_TRUE(read_safetensors(golden, &f).ok());
  ASSERT_TRUE(read_safetensors(out, &o).ok());
  const bool pf = f.metadata.at("kind") == "pairformer";
  const Tensor pm = get(f, "input.pair_mask");
  EXPECT_LT(masked_err(o.tensors.at("output.z"), f.tensors.at("output.z"), pm), 1e-4);
  if (pf) {
    EXPECT_LT(masked_err(o.tensors.at("output.s"), f.tensors.at("output.s"), get(f, "input.mask")),
              1e-4);
  }
  int grads = 0;
  for (const std::string& name : f.names) {
    if (name.rfind("grad.", 0) != 0 || !training) continue;
    ASSERT_TRUE(o.has(name)) << name;
    EXPECT_LT(test::golden_err(o.tensors.at(name), f.tensors.at(name)), 2e-4) << name;
    ++grads;
  }
  EXPECT_EQ(grads > 0, training);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, Af3Cli,
    ::testing::Values(Af3CliCase{"pairformer_tiny.safetensors", ""},
                      Af3CliCase{"pairformer_tiny.safetensors",
                                 "--stack pairformer --policy module --chunk 3 --grad-outputs"},
                      Af3CliCase{"msa_module_tiny.safetensors", "--stack msa_module --chunk 1"},
                      Af3CliCase{"msa_module_tiny.safetensors",
                                 "--stack msa_module --policy block --grad-outputs"}),
    [](const auto& info) { return CaseName(info.param); });

TEST(Af3Cli, PlanPairformerTraining) {
  const test::Result r =
      test::run_cli("plan --stack pairformer --r 32 --blocks 2 --train --json --weights " +
                    test::data_path("pairformer_tiny.safetensors"));
  ASSERT_EQ(r.code, 0) << r.out;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["stack"], "pairformer");
  ASSERT_EQ(j["rows"].size(), 3u);
  EXPECT_EQ(j["rows"][0]["policy"], "none");
  EXPECT_EQ(j["chosen"], 0);
}

// plan --dtype bf16: the memory plan of the bf16 step (kept state in bf16: fewer activation bytes
// under every policy), the dtype in the JSON; a dtype the engine does not run is one message.
TEST(Af3Cli, PlanBf16Training) {
  auto plan = [](const std::string& dtype) {
    const test::Result r = test::run_cli(
        "plan --stack msa_module --r 24 --s 8 --blocks 2 --train --json --dtype " + dtype);
    EXPECT_EQ(r.code, 0) << r.out;
    return nlohmann::json::parse(r.out);
  };
  const nlohmann::json f32 = plan("fp32"), bf16 = plan("bf16");
  EXPECT_EQ(f32["dtype"], "fp32");
  EXPECT_EQ(bf16["dtype"], "bf16");
  ASSERT_EQ(bf16["rows"].size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_LT(bf16["rows"][i]["activation_bytes"].get<int64_t>(),
              f32["rows"][i]["activation_bytes"].get<int64_t>())
        << i;
  }
  const test::Result bad = test::run_cli("plan --stack pairformer --r 24 --train --dtype fp16");
  EXPECT_EQ(bad.code, 1) << bad.out;
  EXPECT_NE(bad.out.find("expected 'fp32' or 'bf16'"), std::string::npos) << bad.out;
}

// run --train: AF3 dropout (Boltz's axes) in the training step, reproducible from --seed and
// different from the eval-mode step.
TEST(Af3CliDropout, TrainIsSeededDropout) {
  test::TempDir dir;
  auto grad_z = [&](const std::string& flags, const std::string& name) {
    const std::string out = dir.file(name);
    const test::Result r = test::run_cli("run --stack pairformer --r 16 --blocks 1 --seed 7 " +
                                         flags + " --out " + out);
    EXPECT_EQ(r.code, 0) << r.out;
    TensorFile f;
    EXPECT_TRUE(read_safetensors(out, &f).ok());
    return f.tensors.count("grad.input.z") ? f.tensors.at("grad.input.z") : Tensor();
  };
  const Tensor a = grad_z("--train", "a.safetensors"), b = grad_z("--train", "b.safetensors");
  const Tensor eval = grad_z("--backward", "c.safetensors");
  ASSERT_TRUE(a.defined() && b.defined() && eval.defined());
  EXPECT_EQ(test::max_abs_diff(a.f32(), b.f32(), a.numel()), 0.0);
  EXPECT_GT(test::max_abs_diff(a.f32(), eval.f32(), a.numel()), 1e-3);
}

TEST(Af3CliErrors, StackMismatchIsAUserError) {
  const std::string golden = test::data_path("pairformer_tiny.safetensors");
  const test::Result r =
      test::run_cli("run --stack msa_module --weights " + golden + " --inputs " + golden);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("holds a Boltz pairformer state dict, not a msa_module"), std::string::npos)
      << r.out;
}

}  // namespace
}  // namespace fc

namespace fc {
namespace {

// run --stack ... --memory-budget: the planned peak of the whole run equals the allocator's,
// stays under the budget, forces chunking (inference) or recompute (training) when tight, and
// a budget nothing fits is a user error naming the least that would.
struct Af3BudgetCase {
  std::string stack;
  bool training;
  DType dtype = DType::F32;  // Af3RunSpec::dtype (BF16: the bf16 plan, forward or training)
};
std::string BudgetName(const Af3BudgetCase& c) {
  return c.stack + (c.training ? "_training" : "_forward") +
         (c.dtype == DType::BF16 ? "_bf16" : "");
}
void PrintTo(const Af3BudgetCase& c, std::ostream* os) { *os << BudgetName(c); }

class Af3Budget : public ::testing::TestWithParam<Af3BudgetCase> {};

TEST_P(Af3Budget, PlannedPeakEqualsMeasuredUnderTheBudget) {
  const Af3BudgetCase& c = GetParam();
  Af3RunSpec spec;
  spec.stack = c.stack;
  spec.n = c.stack == "pairformer" && !c.training ? 64 : 40;
  spec.n_msa = 16;
  spec.blocks = 2;
  spec.training = c.training;
  spec.dtype = c.dtype;
  Af3RunReport free_run;
  spec.memory_bytes = int64_t{1} << 40;  // a budget that does not bind: the default plan
  ASSERT_TRUE(af3_run(spec, &free_run).ok());
  // Inference: the plan counts the caller's masks as inputs and the forward's all-ones masks
  // too; neither was given here, so depending on where the peak falls it is above the allocator
  // by up to the masks' bytes.
  // Training: above by at most the gathered triangle-multiplication gradients (af3_plan).
  const int64_t masks = c.training
                            ? spec.blocks * 8 * 128 * 128 * 4
                            : (spec.n + (c.stack == "pairformer" ? 0 : spec.n_msa * spec.n)) * 4;
  auto expect_planned = [&](const Af3RunReport& rep) {
    EXPECT_GE(rep.planned_peak_bytes, rep.measured_peak_bytes);
    EXPECT_LE(rep.planned_peak_bytes, rep.measured_peak_bytes + masks);
  };
  expect_planned(free_run);
  ASSERT_LT(free_run.least_budget_bytes, free_run.measured_peak_bytes);
  // Only the output compared below stays live (the report's gradients count against a budget).
  const std::string out = c.stack == "pairformer" ? "output.s" : "output.z";
  const Tensor free_out = free_run.out.tensors.at(out);
  free_run.out = TensorFile{};
  // Half way between the least and the unconstrained peak (plus the output kept here, which
  // the run counts): a smaller chunk target, or more recompute.
  spec.memory_bytes = (free_run.least_budget_bytes + free_run.measured_peak_bytes) / 2 +
                      static_cast<int64_t>(free_out.nbytes());
  Af3RunReport tight;
  const Status st = af3_run(spec, &tight);
  ASSERT_TRUE(st.ok()) << st.ToString();
  expect_planned(tight);
  EXPECT_LE(tight.measured_peak_bytes, spec.memory_bytes);
  if (c.training)
    EXPECT_NE(tight.policy, free_run.policy);
  else
    EXPECT_LT(tight.chunk_target_bytes, free_run.chunk_target_bytes);
  // The outputs do not depend on the plan beyond rounding.
  EXPECT_LT(test::golden_err(tight.out.tensors.at(out), free_out), 1e-5);
  spec.memory_bytes = 1 << 20;
  const Status small = af3_run(spec, &tight);
  EXPECT_EQ(small.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(small.message().find("needs at least"), std::string::npos) << small.message();
}

INSTANTIATE_TEST_SUITE_P(Stacks, Af3Budget,
                         ::testing::Values(Af3BudgetCase{"pairformer", false},
                                           Af3BudgetCase{"pairformer", true},
                                           Af3BudgetCase{"msa_module", false},
                                           Af3BudgetCase{"msa_module", true},
                                           Af3BudgetCase{"pairformer", false, DType::BF16},
                                           Af3BudgetCase{"pairformer", true, DType::BF16},
                                           Af3BudgetCase{"msa_module", false, DType::BF16},
                                           Af3BudgetCase{"msa_module", true, DType::BF16}),
                         [](const auto& info) { return BudgetName(info.param); });

}  // namespace
}  // namespace fc
