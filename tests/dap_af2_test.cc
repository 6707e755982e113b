// The whole AlphaFold2 model under DAP in process (foldcube_dap_tests, run by CTest under
// `mpirun -np 2` and `-np 4`): the per-rank memory model against the allocator byte for byte;
// traces gathered to the root, pad_to and bf16 against one process and OpenFold.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "dist/comm.h"
#include "exec/af2_dap.h"
#include "foldcube/alphafold.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/runtime.h"
#include "io/param_names.h"
#include "layers/outer_product_mean.h"
#include "npz_util.h"
#include "test_util.h"

namespace fc {
namespace {

using test::golden_path;

struct Golden {
  AlphaFold model;
  FeatureDict feats;
};

// The golden file as both the model and the features (false when it is not found).
bool load_golden(const std::string& name, Golden* g) {
  const std::string path = golden_path(name + ".safetensors");
  if (path.empty()) return false;
  TensorFile f;
  EXPECT_TRUE(read_safetensors(path, &f).ok()) << path;
  AlphaFoldConfig cfg;
  EXPECT_TRUE(alphafold_config_from_weights(f, &cfg).ok()) << path;
  EXPECT_TRUE(AlphaFold::load(cfg, f, &g->model).ok()) << path;
  for (const std::string& n : f.names)
    if (n.rfind("feature.", 0) == 0) g->feats[n.substr(8)] = f.tensors.at(n);
  return true;
}

// Every rank in one communicator of its own (the model's collectives do not see the test's).
dist::Communicator model_comm() {
  return dist::Communicator::world().split(0, dist::Communicator::world().rank());
}

bool structure_group(const std::string& name) {
  for (const char* s : {"sm.frames", "sm.sidechain_frames", "sm.positions", "sm.angles",
                        "final_atom_positions", "final_affine_tensor"})
    if (name.find(s) != std::string::npos) return true;
  return false;
}

// Every f32 output of `ref` is in `got` within `tol` of it (golden metric; `tol_structure` for
// the structure group).
void expect_outputs_near(const std::map<std::string, Tensor>& got,
                         const std::map<std::string, Tensor>& ref, double tol,
                         double tol_structure) {
  for (const auto& [name, t] : ref) {
    if (t.dtype() != DType::F32) continue;
    ASSERT_TRUE(got.count(name)) << name;
    EXPECT_LT(test::golden_err(got.at(name), t), structure_group(name) ? tol_structure : tol)
        << name;
  }
}

// A golden case with the knobs the memory model follows.
struct MemCase {
  std::string name;
  int64_t chunk = 0;             // items per chunk in the stacks (0: from the chunk target)
  int64_t chunk_target = 0;      // bytes (0: the DAP default)
  int64_t pair_block_bytes = 0;  // 0: 4 MiB; 1: one row per block
  DType dtype = DType::F32;
  bool sharded = false;  // stack block weights sharded over the ranks (shard_alphafold_weights)
  int64_t pad = 0;       // > 0: AlphaFoldOptions::pad_to = r + pad
};
std::string MemCaseName(const ::testing::TestParamInfo<MemCase>& p) {
  return p.param.name + "_chunk" + std::to_string(p.param.chunk) + "_target" +
         std::to_string(p.param.chunk_target) + "_pairblock" +
         std::to_string(p.param.pair_block_bytes) + (p.param.dtype == DType::BF16 ? "_bf16" : "") +
         (p.param.sharded ? "_sharded" : "") +
         (p.param.pad > 0 ? "_pad" + std::to_string(p.param.pad) : "");
}

class DapAf2Memory : public ::testing::TestWithParam<MemCase> {};

// Every stage of every pass on this rank: the bytes at its start and its peak, and the forward's
// peak, as replayed by alphafold_dap_forward_memory, equal the tracked allocator's to the byte.
// Sharded cases: the per-stack block buffer is part of the stages (a model without it misses
// every stack stage's peak by its bytes).
TEST_P(DapAf2Memory, EveryStageOfEveryRankMatchesTheAllocator) {
  Golden g;
  if (!load_golden(GetParam().name, &g)) GTEST_SKIP() << "golden file not found";
  const dist::Communicator comm = model_comm();
  if (GetParam().sharded) {
    ASSERT_TRUE(shard_alphafold_weights(&g.model, comm.size(), comm.rank()).ok());
  }
  AlphaFoldOptions opts;
  opts.chunk = GetParam().chunk;
  opts.chunk_target_bytes = GetParam().chunk_target;
  opts.pair_block_bytes = GetParam().pair_block_bytes;
  opts.dtype = GetParam().dtype;
  std::vector<AlphaFoldStageStat> stats;
  opts.stats = &stats;
  AlphaFoldDims dims;
  ASSERT_TRUE(alphafold_dims(g.model.config(), g.feats, &dims).ok());
  if (GetParam().pad > 0) {  // the bucket; the features keep their residues
    dims.r_features = dims.r;
    dims.r += GetParam().pad;
    opts.pad_to = dims.r;
  }
  AlphaFoldMemory mem;
  const Status ms =
      alphafold_dap_forward_memory(g.model.config(), dims, opts, num_threads(), comm.size(),
                                   comm.rank(), &mem, GetParam().sharded);
  ASSERT_TRUE(ms.ok()) << ms.ToString();
  const int64_t live0 = mem_stats().live_bytes;
  AlphaFoldDapOutputs out;
  AlphaFoldDapStats ds;
  const Status st = alphafold_dap_forward(g.model, comm, g.feats, &out, opts, &ds);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(stats.size(), mem.stages.size());
  for (size_t i = 0; i < stats.size(); ++i) {
    const AlphaFoldStageStat &got = stats[i], &want = mem.stages[i];
    EXPECT_EQ(got.pass, want.pass) << i;
    EXPECT_EQ(got.stage, want.stage) << i;
    EXPECT_EQ(got.entry_bytes, want.entry_bytes)
        << "rank " << comm.rank() << " pass " << got.pass << " " << got.stage << " entry";
    EXPECT_EQ(got.peak_bytes, want.peak_bytes)
        << "rank " << comm.rank() << " pass " << got.pass << " " << got.stage << " peak";
  }
  EXPECT_EQ(ds.forward_peak_bytes - live0, mem.peak_bytes) << "rank " << comm.rank();
}

INSTANTIATE_TEST_SUITE_P(
    Golden, DapAf2Memory,
    ::testing::Values(MemCase{"af2_model_tiny"}, MemCase{"af2_model_tiny", 1},
                      MemCase{"af2_model_tiny", 0, 4096, 1}, MemCase{"af2_model_af2dims"},
                      MemCase{"af2_model_af2dims", 5, 0, 1},
                      MemCase{"af2_model_tiny", 0, 0, 0, DType::BF16},
                      MemCase{"af2_model_af2dims", 0, 0, 0, DType::BF16},
                      MemCase{"af2_model_af2dims", 5, 0, 1, DType::BF16},
                      MemCase{"af2_model_tiny", 0, 0, 0, DType::F32, true},
                      MemCase{"af2_model_tiny", 1, 0, 0, DType::F32, true},
                      MemCase{"af2_model_af2dims", 0, 0, 0, DType::F32, true},
                      MemCase{"af2_model_af2dims", 5, 0, 1, DType::BF16, true},
                      MemCase{"af2_model_tiny", 0, 0, 0, DType::F32, false, 3},
                      MemCase{"af2_model_tiny", 1, 0, 1, DType::F32, true, 5},
                      MemCase{"af2_model_af2dims", 0, 0, 0, DType::F32, true, 7}),
    MemCaseName);

// A traced run is not modelled: the per-rank memory model refuses it with one message naming the
// trace hook (the planner never passes one).
TEST(DapAf2MemoryModel, RefusesATracedRun) {
  const AlphaFoldConfig cfg = alphafold_model_1_ptm();
  AlphaFoldDims dims;
  dims.r = 16, dims.S = 4, dims.E = 8, dims.T = 2;
  AlphaFoldOptions opts;
  AlphaFoldMemory mem;
  ASSERT_TRUE(alphafold_dap_forward_memory(cfg, dims, opts, 1, 2, 0, &mem).ok());
  opts.trace = [](int, const std::string&, int, const Tensor&) {};
  const Status st = alphafold_dap_forward_memory(cfg, dims, opts, 1, 2, 0, &mem);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find("traced run"), std::string::npos) << st.message();
}

// Rank 0's outputs of two sharded forwards gathered: every output present in both, byte for byte.
void expect_bit_identical(const AlphaFoldDapOutputs& a, const AlphaFoldDapOutputs& b,
                          const dist::Communicator& comm) {
  std::map<std::string, Tensor> want, got;
  gather_alphafold_dap_outputs(a, comm, &want);
  gather_alphafold_dap_outputs(b, comm, &got);
  if (comm.rank() != 0) return;
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [name, y] : want) {
    ASSERT_TRUE(got.count(name)) << name;
    const Tensor& x = got.at(name);
    ASSERT_EQ(x.shape(), y.shape()) << name;
    ASSERT_EQ(x.nbytes(), y.nbytes()) << name;
    EXPECT_EQ(std::memcmp(x.contiguous().data<char>(), y.contiguous().data<char>(), x.nbytes()), 0)
        << name << " differs from the replicated run";
  }
}

class DapAf2Sharded : public ::testing::TestWithParam<std::string> {};

// Weight sharding: each rank releases exactly alphafold_released_weight_bytes (its share of the
// stack blocks kept), the sharded run's outputs are bit-identical to the replicated run's on the
// same ranks, in fp32 and bf16, and every stack block's weights travel by broadcast (the bytes
// each rank sent grow by its blocks' buffers). A sharded model is refused by the one-process
// forward and by sharding it again.
TEST_P(DapAf2Sharded, OutputsBitIdenticalToTheReplicatedRun) {
  Golden g;
  if (!load_golden(GetParam(), &g)) GTEST_SKIP() << "golden file not found";
  const dist::Communicator comm = model_comm();
  const int n = comm.size(), me = comm.rank();
  const AlphaFoldConfig cfg = g.model.config();
  for (DType dtype : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dtype));
    Golden s;  // the same model, sharded
    ASSERT_TRUE(load_golden(GetParam(), &s));
    const int64_t before = mem_stats().live_bytes;
    ASSERT_TRUE(shard_alphafold_weights(&s.model, n, me).ok());
    EXPECT_EQ(before - mem_stats().live_bytes, alphafold_released_weight_bytes(cfg, n, me));
    AlphaFoldOptions opts;
    opts.dtype = dtype;
    opts.passes = dtype == DType::BF16 ? 1 : 0;
    AlphaFoldDapOutputs a, b;
    AlphaFoldDapStats sa, sb;
    ASSERT_TRUE(alphafold_dap_forward(g.model, comm, g.feats, &a, opts, &sa).ok());
    const Status st = alphafold_dap_forward(s.model, comm, s.feats, &b, opts, &sb);
    ASSERT_TRUE(st.ok()) << st.ToString();
    // Over the ranks: each block's buffer sent to n - 1 ranks, per pass (per template too).
    AlphaFoldDims dims;
    ASSERT_TRUE(alphafold_dims(cfg, g.feats, &dims).ok());
    const int64_t passes = opts.passes > 0 ? std::min(opts.passes, dims.passes) : dims.passes;
    const int64_t per_pass =
        cfg.evoformer.no_blocks * dap_block_buffer_bytes(kEvoformerBlock, cfg.evoformer) +
        cfg.extra_msa.no_blocks * dap_block_buffer_bytes(kExtraMsaBlock, cfg.extra_msa) +
        (cfg.templates ? dims.T : 0) * cfg.template_pair.no_blocks *
            dap_block_buffer_bytes(kTemplatePairBlock, cfg.template_pair);
    int64_t more = 0;
    for (int64_t v : comm.all_gather_i64(sb.comm.total_bytes() - sa.comm.total_bytes())) more += v;
    EXPECT_EQ(more, (n - 1) * passes * per_pass);
    expect_bit_identical(a, b, comm);
    std::map<std::string, Tensor> one;
    EXPECT_EQ(s.model.forward(s.feats, &one).code(), Status::Code::kInvalidArgument);
    EXPECT_FALSE(shard_alphafold_weights(&s.model, n, me).ok());
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, DapAf2Sharded,
                         ::testing::Values("af2_model_tiny", "af2_model_af2dims"),
                         [](const auto& info) { return info.param; });

// Loading sharded from the start (load_alphafold_sharded, the CLI's path under --dap), from a
// safetensors state dict and from an AlphaFold .npz of a random model with 5 Evoformer, 3
// Extra-MSA and 3 template blocks: each rank ends up holding exactly the replicated model less
// alphafold_released_weight_bytes, its tracked peak while loading stays below the replicated
// load's (the blocks it does not own are never read into memory: the config comes from the
// file's shapes), and the forward's outputs equal the replicated run's bit for bit.
TEST(DapAf2ShardedLoad, ReadsOnlyItsShareAndRunsBitIdentical) {
  TensorFile tiny;
  ASSERT_TRUE(read_safetensors(golden_path("af2_model_tiny.safetensors"), &tiny).ok());
  AlphaFoldConfig cfg;
  ASSERT_TRUE(alphafold_config_from_weights(tiny, &cfg).ok());
  cfg.evoformer.no_blocks = 5;
  cfg.extra_msa.no_blocks = 3;
  cfg.template_pair.no_blocks = 3;
  const dist::Communicator comm = model_comm();
  const int n = comm.size(), me = comm.rank();
  std::string dir;  // the root's temporary directory, shared by every rank
  if (me == 0) {
    std::string tmpl = ::testing::TempDir() + "foldcube_dap_load_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir = tmpl;
    const TensorFile sd = AlphaFold::random_weights(cfg, 11);
    ASSERT_TRUE(write_safetensors(dir + "/w.safetensors", sd).ok());
    TensorFile af2;
    ASSERT_TRUE(openfold_to_af2(sd, cfg.template_att_heads, &af2).ok());
    std::ofstream(dir + "/w.npz", std::ios::binary) << test::npz_of(af2);
  }
  comm.broadcast_string(&dir, 0);
  const FeatureDict feats = random_alphafold_features(12, 3, 5, 2, 2, 5);
  for (const char* file : {"/w.safetensors", "/w.npz"}) {
    SCOPED_TRACE(file);
    const std::string path = dir + file;
    auto load = [&](bool sharded, AlphaFold* m, int64_t* held, int64_t* peak) {
      const int64_t live0 = mem_stats().live_bytes;
      MemoryScope scope;
      const Status st = sharded ? load_alphafold_sharded(path, n, me, m) : load_alphafold(path, m);
      ASSERT_TRUE(st.ok()) << st.ToString();
      *held = mem_stats().live_bytes - live0;
      *peak = scope.peak() - live0;
    };
    AlphaFold full, part;
    int64_t full_held = 0, full_peak = 0, part_held = 0, part_peak = 0;
    load(false, &full, &full_held, &full_peak);
    load(true, &part, &part_held, &part_peak);
    EXPECT_EQ(part_held, full_held - alphafold_released_weight_bytes(full.config(), n, me));
    EXPECT_LT(part_peak, full_peak);
    if (me == 0)
      std::printf("%s rank 0 of %d: held %lld of %lld bytes, load peak %lld of %lld\n", file, n,
                  static_cast<long long>(part_held), static_cast<long long>(full_held),
                  static_cast<long long>(part_peak), static_cast<long long>(full_peak));
    AlphaFoldDapOutputs a, b;
    ASSERT_TRUE(alphafold_dap_forward(full, comm, feats, &a).ok());
    const Status st = alphafold_dap_forward(part, comm, feats, &b);
    ASSERT_TRUE(st.ok()) << st.ToString();
    expect_bit_identical(a, b, comm);
  }
  comm.barrier();
  if (me == 0) std::filesystem::remove_all(dir);
}

// Traces by golden name (trace.iter<pass>.<stage>), indexed ones (templates, structure-module
// layers) stacked along a new first axis as in the golden files.
struct Traces {
  std::map<std::string, Tensor> whole;
  std::map<std::string, std::vector<Tensor>> parts;
  decltype(AlphaFoldOptions::trace) fn() {
    return [this](int pass, const std::string& stage, int index, const Tensor& v) {
      const std::string name = "trace.iter" + std::to_string(pass) + "." + stage;
      if (index < 0)
        whole[name] = v.clone();
      else
        parts[name].push_back(v.clone());
    };
  }
  std::map<std::string, Tensor> all() const {
    std::map<std::string, Tensor> out = whole;
    for (const auto& [name, p] : parts) {
      Shape shape = p[0].shape();
      shape.insert(shape.begin(), static_cast<int64_t>(p.size()));
      Tensor t = Tensor::empty(shape);
      for (size_t i = 0; i < p.size(); ++i) t.select(0, static_cast<int64_t>(i)).copy_from(p[i]);
      out[name] = t;
    }
    return out;
  }
};

class DapAf2Trace : public ::testing::TestWithParam<std::string> {};

// AlphaFoldOptions::trace under DAP: the root receives every trace the one-process forward gives
// (same names, shapes), each within 1e-5 of it (1e-4 for the structure group: the angle
// normalisation amplifies summation-order noise, 3.3e-5 in sm.angles) and within the golden
// tolerance of OpenFold (1e-4, 5e-4 for the structure group), every golden trace among them; the
// outputs of the traced run are those of the one-process run.
TEST_P(DapAf2Trace, GatheredTracesEqualOneProcessAndOpenFold) {
  Golden g;
  if (!load_golden(GetParam(), &g)) GTEST_SKIP() << "golden file not found";
  TensorFile f;
  ASSERT_TRUE(read_safetensors(golden_path(GetParam() + ".safetensors"), &f).ok());
  const dist::Communicator comm = model_comm();
  Traces one, dap;
  AlphaFoldOptions opts;
  opts.trace = one.fn();
  std::map<std::string, Tensor> ref;
  ASSERT_TRUE(g.model.forward(g.feats, &ref, opts).ok());
  opts.trace = dap.fn();
  AlphaFoldDapOutputs outs;
  const Status st = alphafold_dap_forward(g.model, comm, g.feats, &outs, opts);
  ASSERT_TRUE(st.ok()) << st.ToString();
  std::map<std::string, Tensor> got;
  gather_alphafold_dap_outputs(outs, comm, &got);
  if (comm.rank() != 0) {
    EXPECT_TRUE(dap.whole.empty() && dap.parts.empty()) << "traces on rank " << comm.rank();
    return;
  }
  const std::map<std::string, Tensor> a = one.all(), b = dap.all();
  std::set<std::string> names_a, names_b;
  for (const auto& [n, t] : a) names_a.insert(n);
  for (const auto& [n, t] : b) names_b.insert(n);
  EXPECT_EQ(names_a, names_b);
  double worst = 0, worst_golden = 0;
  std::string worst_name;
  for (const auto& [name, t] : b) {
    if (!a.count(name)) continue;
    ASSERT_EQ(t.shape(), a.at(name).shape()) << name;
    const double e = test::golden_err(t, a.at(name));
    EXPECT_LT(e, structure_group(name) ? 1e-4 : 1e-5) << name << " vs one process";
    if (e > worst) worst = e, worst_name = name;
    if (f.has(name)) {
      const double eg = test::golden_err(t, f.tensors.at(name));
      EXPECT_LT(eg, structure_group(name) ? 5e-4 : 1e-4) << name << " vs OpenFold";
      worst_golden = std::max(worst_golden, eg);
    }
  }
  for (const std::string& n : f.names) {
    if (n.rfind("trace.", 0) == 0 && !b.count(n)) ADD_FAILURE() << "golden trace not given: " << n;
  }
  expect_outputs_near(got, ref, 1e-5, 1e-4);
  std::printf("%s on %d ranks: %zu traces, worst vs one process %.3g (%s), vs OpenFold %.3g\n",
              GetParam().c_str(), comm.size(), b.size(), worst, worst_name.c_str(), worst_golden);
}

INSTANTIATE_TEST_SUITE_P(Golden, DapAf2Trace,
                         ::testing::Values("af2_model_tiny", "af2_model_af2dims"),
                         [](const auto& info) { return info.param; });

// AlphaFoldOptions::pad_to under DAP (every row count padded again over the ranks): the outputs
// have the unpadded shapes and equal the unpadded DAP run's within 1e-5 (pTM over the real
// residues), for buckets r + 3 and 2r + 1; a bucket below r is refused on every rank.
TEST(DapAf2PadTo, PaddedRunEqualsTheUnpaddedRun) {
  Golden g;
  ASSERT_TRUE(load_golden("af2_model_tiny", &g));
  const dist::Communicator comm = model_comm();
  const int64_t r = g.feats.at("aatype").dim(0);
  AlphaFoldDapOutputs plain;
  ASSERT_TRUE(alphafold_dap_forward(g.model, comm, g.feats, &plain).ok());
  std::map<std::string, Tensor> want;
  gather_alphafold_dap_outputs(plain, comm, &want);
  for (int64_t bucket : {r + 3, 2 * r + 1}) {
    SCOPED_TRACE("bucket " + std::to_string(bucket));
    AlphaFoldOptions opts;
    opts.pad_to = bucket;
    AlphaFoldDapOutputs outs;
    const Status st = alphafold_dap_forward(g.model, comm, g.feats, &outs, opts);
    ASSERT_TRUE(st.ok()) << st.ToString();
    std::map<std::string, Tensor> got;
    gather_alphafold_dap_outputs(outs, comm, &got);
    if (comm.rank() != 0) continue;
    ASSERT_EQ(got.size(), want.size());
    for (const auto& [name, t] : want) {
      ASSERT_TRUE(got.count(name)) << name;
      ASSERT_EQ(got.at(name).shape(), t.shape()) << name;
      if (t.dtype() == DType::I64) {
        EXPECT_EQ(got.at(name).data<int64_t>()[0], t.data<int64_t>()[0]) << name;
        continue;
      }
      EXPECT_LT(test::golden_err(got.at(name), t), 1e-5) << name;
    }
  }
  AlphaFoldOptions small;
  small.pad_to = r - 1;
  AlphaFoldDapOutputs outs;
  EXPECT_FALSE(alphafold_dap_forward(g.model, comm, g.feats, &outs, small).ok());
}

class DapAf2Bf16 : public ::testing::TestWithParam<std::string> {};

// AlphaFoldOptions::dtype BF16 under DAP, first pass, against the one-process bf16 run with the
// Af2ModelBf16 tolerances: every gathered first-pass trace within a normwise 2e-2 of the
// one-process bf16 trace, the CA atoms within 0.25 A RMS; and the DAP bf16 run differs from the
// DAP fp32 run (the stacks did take bf16 inputs).
TEST_P(DapAf2Bf16, FirstPassWithinTheBf16TolerancesOfOneProcess) {
  Golden g;
  if (!load_golden(GetParam(), &g)) GTEST_SKIP() << "golden file not found";
  const dist::Communicator comm = model_comm();
  AlphaFoldOptions opts;
  opts.passes = 1;
  opts.dtype = DType::BF16;
  Traces one, dap;
  opts.trace = one.fn();
  std::map<std::string, Tensor> ref;
  ASSERT_TRUE(g.model.forward(g.feats, &ref, opts).ok());
  opts.trace = dap.fn();
  AlphaFoldDapOutputs outs;
  Status st = alphafold_dap_forward(g.model, comm, g.feats, &outs, opts);
  ASSERT_TRUE(st.ok()) << st.ToString();
  std::map<std::string, Tensor> got, fp32;
  gather_alphafold_dap_outputs(outs, comm, &got);
  opts.trace = nullptr;
  opts.dtype = DType::F32;
  st = alphafold_dap_forward(g.model, comm, g.feats, &outs, opts);
  ASSERT_TRUE(st.ok()) << st.ToString();
  gather_alphafold_dap_outputs(outs, comm, &fp32);
  if (comm.rank() != 0) return;
  const std::map<std::string, Tensor> a = one.all(), b = dap.all();
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  std::string worst_name;
  for (const auto& [name, t] : b) {
    ASSERT_TRUE(a.count(name)) << name;
    const double e = test::normwise_err(t, a.at(name));
    EXPECT_LT(e, 2e-2) << name;
    if (e > worst) worst = e, worst_name = name;
  }
  auto ca_rms = [](const Tensor& x, const Tensor& y) {  // [r, 37, 3]
    double sq = 0;
    for (int64_t i = 0; i < x.dim(0); ++i)
      for (int c = 0; c < 3; ++c) {
        const double d = x.f32()[(i * 37 + 1) * 3 + c] - y.f32()[(i * 37 + 1) * 3 + c];
        sq += d * d;
      }
    return std::sqrt(sq / static_cast<double>(x.dim(0)));
  };
  const double rms = ca_rms(got.at("final_atom_positions"), ref.at("final_atom_positions"));
  EXPECT_LT(rms, 0.25);
  EXPECT_GT(test::golden_err(got.at("pair"), fp32.at("pair")), 0.0) << "bf16 changed nothing";
  std::printf("%s bf16 on %d ranks: worst normwise vs one-process bf16 %.3g (%s), CA RMS %.4f A\n",
              GetParam().c_str(), comm.size(), worst, worst_name.c_str(), rms);
}

INSTANTIATE_TEST_SUITE_P(Golden, DapAf2Bf16,
                         ::testing::Values("af2_model_tiny", "af2_model_af2dims"),
                         [](const auto& info) { return info.param; });

class DapAf2OpmChunks : public ::testing::TestWithParam<std::string> {};

// The outer product mean under DAP in chunks of MSA rows (opm_msa_row_chunk < s: forced chunk 2,
// so the Extra-MSA and Evoformer OPMs both run in several chunks): every output within the golden
// tolerances of OpenFold (1e-4, 5e-4 for the structure group) and of the one-process run with the
// same chunking (1e-5, 1e-4 for the structure group). The chunks sum in another order than one
// process, so the results are not bit-identical.
TEST_P(DapAf2OpmChunks, ChunkedOuterProductMeanWithinTheGoldenTolerances) {
  Golden g;
  if (!load_golden(GetParam(), &g)) GTEST_SKIP() << "golden file not found";
  TensorFile f;
  ASSERT_TRUE(read_safetensors(golden_path(GetParam() + ".safetensors"), &f).ok());
  const dist::Communicator comm = model_comm();
  AlphaFoldOptions opts;
  opts.chunk = 2;
  AlphaFoldDims dims;
  ASSERT_TRUE(alphafold_dims(g.model.config(), g.feats, &dims).ok());
  BlockContext ctx;  // the extra-MSA stack's shard context
  ctx.cfg = &g.model.config().extra_msa;
  ctx.s = dap_layout(dims.E, dims.r, comm.size(), comm.rank()).s_pad;
  ctx.chunk = opts.chunk;
  ASSERT_LT(opm_msa_row_chunk(ctx, 1, comm.size()), ctx.s);
  std::map<std::string, Tensor> ref;
  ASSERT_TRUE(g.model.forward(g.feats, &ref, opts).ok());
  AlphaFoldDapOutputs outs;
  const Status st = alphafold_dap_forward(g.model, comm, g.feats, &outs, opts);
  ASSERT_TRUE(st.ok()) << st.ToString();
  std::map<std::string, Tensor> got;
  gather_alphafold_dap_outputs(outs, comm, &got);
  if (comm.rank() != 0) return;
  expect_outputs_near(got, ref, 1e-5, 1e-4);
  int golden_outputs = 0;
  double worst = 0;
  for (const auto& [name, t] : got) {
    const std::string golden = "output." + name;
    if (t.dtype() != DType::F32 || !f.has(golden)) continue;
    ++golden_outputs;
    const double e = test::golden_err(t, f.tensors.at(golden));
    EXPECT_LT(e, structure_group(name) ? 5e-4 : 1e-4) << name << " vs OpenFold";
    worst = std::max(worst, e);
  }
  EXPECT_GT(golden_outputs, 5);
  std::printf("%s, OPM in chunks of 2 MSA rows on %d ranks: worst output vs OpenFold %.3g\n",
              GetParam().c_str(), comm.size(), worst);
}

INSTANTIATE_TEST_SUITE_P(Golden, DapAf2OpmChunks,
                         ::testing::Values("af2_model_tiny", "af2_model_af2dims"),
                         [](const auto& info) { return info.param; });

// Automatic chunking with a deep extra MSA (160 rows; 4 c_z = 64 rows per chunk at the tiny
// widths, a 4 KiB chunk target): the Extra-MSA OPM runs in 3 chunks of MSA rows, the outputs are
// within 1e-4 of one process (1e-3 for the structure group), and the per-rank memory model still
// equals the allocator, stage by stage, pass by pass.
TEST(DapAf2OpmChunks, DeepExtraMsaChunkedAutomaticallyAndModelledExactly) {
  Golden g;
  ASSERT_TRUE(load_golden("af2_model_tiny", &g));
  const dist::Communicator comm = model_comm();
  const FeatureDict feats = random_alphafold_features(14, 5, 160, 2, 2, 23);
  AlphaFoldOptions opts;
  opts.chunk_target_bytes = 4096;
  std::vector<AlphaFoldStageStat> stats;
  opts.stats = &stats;
  AlphaFoldDims dims;
  ASSERT_TRUE(alphafold_dims(g.model.config(), feats, &dims).ok());
  const DapLayout lx = dap_layout(dims.E, dims.r, comm.size(), comm.rank());
  BlockContext ctx;
  ctx.cfg = &g.model.config().extra_msa;
  ctx.s = lx.s_pad;
  ctx.r = lx.r_pad;
  ctx.chunk_target_bytes = opts.chunk_target_bytes;
  const int64_t sc = opm_msa_row_chunk(ctx, lx.r_loc, comm.size());
  EXPECT_EQ(sc, 4 * ctx.cfg->c_z);
  EXPECT_LT(sc, ctx.s);
  AlphaFoldMemory mem;
  ASSERT_TRUE(alphafold_dap_forward_memory(g.model.config(), dims, opts, num_threads(), comm.size(),
                                           comm.rank(), &mem)
                  .ok());
  const int64_t live0 = mem_stats().live_bytes;
  AlphaFoldDapOutputs outs;
  AlphaFoldDapStats ds;
  const Status st = alphafold_dap_forward(g.model, comm, feats, &outs, opts, &ds);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(stats.size(), mem.stages.size());
  for (size_t i = 0; i < stats.size(); ++i)
    EXPECT_EQ(stats[i].peak_bytes, mem.stages[i].peak_bytes)
        << "rank " << comm.rank() << " pass " << stats[i].pass << " " << stats[i].stage;
  EXPECT_EQ(ds.forward_peak_bytes - live0, mem.peak_bytes) << "rank " << comm.rank();
  std::map<std::string, Tensor> got, ref;
  gather_alphafold_dap_outputs(outs, comm, &got);
  opts.stats = nullptr;
  ASSERT_TRUE(g.model.forward(feats, &ref, opts).ok());
  if (comm.rank() == 0) expect_outputs_near(got, ref, 1e-4, 1e-3);
}

}  // namespace
}  // namespace fc
