// DAP over MPI, run by CTest under `mpirun -np 2` and `mpirun -np 4 --oversubscribe`: the dist
// collectives and their byte counters, and the sharded Evoformer forward against the
// single-process forward (1e-5) and the OpenFold golden outputs (golden tolerances), with and
// without padding. Every rank runs every test; collectives stay in lock-step, so checks happen
// after the collective work of a test (an early return would leave the other ranks waiting).
#include "exec/dap.h"

#include <gtest/gtest.h>
#include <mpi.h>
#include <unistd.h>

#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "core/rng.h"
#include "dist/comm.h"
#include "exec/dap_train.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/parallel.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"
#include "layers/outer_product_mean.h"
#include "layers/triangle_multiplication.h"
#include "model/train.h"
#include "model/weights.h"
#include "test_util.h"

namespace fc {
namespace {

dist::Communicator world() { return dist::Communicator::world(); }

TEST(DistComm, CollectivesAndByteCounts) {
  const dist::Communicator comm = world().split(0, world().rank());  // fresh counters
  const int n = comm.size(), me = comm.rank();
  const int64_t c = 5;
  std::vector<float> send(n * c), recv(n * c), all(n * c), mine(c);
  for (int q = 0; q < n; ++q)
    for (int64_t i = 0; i < c; ++i) send[q * c + i] = 1000.f * me + 10.f * q + i;
  comm.all_to_all(send.data(), recv.data(), c);
  for (int p = 0; p < n; ++p)
    for (int64_t i = 0; i < c; ++i) EXPECT_EQ(recv[p * c + i], 1000.f * p + 10.f * me + i);

  for (int64_t i = 0; i < c; ++i) mine[i] = 100.f * me + i;
  comm.all_gather(mine.data(), all.data(), c);
  for (int p = 0; p < n; ++p)
    for (int64_t i = 0; i < c; ++i) EXPECT_EQ(all[p * c + i], 100.f * p + i);

  comm.reduce_scatter(send.data(), mine.data(), c);  // sum_p (1000 p + 10 me + i)
  for (int64_t i = 0; i < c; ++i)
    EXPECT_EQ(mine[i], 1000.f * n * (n - 1) / 2 + n * (10.f * me + i));

  std::vector<float> red(c, static_cast<float>(me + 1));
  comm.all_reduce(red.data(), c);
  for (float v : red) EXPECT_EQ(v, n * (n + 1) / 2.f);

  std::vector<float> b(c, me == 0 ? 7.f : 0.f);
  comm.broadcast(b.data(), c, 0);
  for (float v : b) EXPECT_EQ(v, 7.f);

  comm.scatter(me == 0 ? send.data() : nullptr, mine.data(), c, 0);
  for (int64_t i = 0; i < c; ++i) EXPECT_EQ(mine[i], 10.f * me + i);
  comm.gather(mine.data(), me == 0 ? all.data() : nullptr, c, 0);
  if (me == 0) {
    for (int p = 0; p < n; ++p)
      for (int64_t i = 0; i < c; ++i) EXPECT_EQ(all[p * c + i], 10.f * p + i);
  }

  const dist::CommStats st = comm.stats();
  auto bytes = [&](dist::Op op) { return st.bytes[static_cast<int>(op)]; };
  const int64_t F = 4, root = me == 0;
  EXPECT_EQ(bytes(dist::Op::kAllToAll), (n - 1) * c * F);
  EXPECT_EQ(bytes(dist::Op::kAllGather), (n - 1) * c * F);
  EXPECT_EQ(bytes(dist::Op::kReduceScatter), (n - 1) * c * F);
  EXPECT_EQ(bytes(dist::Op::kAllReduce), 2 * (n - 1) * c / n * F);
  EXPECT_EQ(bytes(dist::Op::kBroadcast), root * (n - 1) * c * F);
  EXPECT_EQ(bytes(dist::Op::kScatter), root * (n - 1) * c * F);
  EXPECT_EQ(bytes(dist::Op::kGather), (1 - root) * c * F);
  for (int k = 0; k < static_cast<int>(dist::Op::kCount); ++k) EXPECT_EQ(st.calls[k], 1);

  EXPECT_TRUE(comm.all_equal(42));
  EXPECT_EQ(comm.all_equal(me == 0 ? 1 : 2), n == 1);
  const std::vector<int64_t> ids = comm.all_gather_i64(me * 3);
  for (int p = 0; p < n; ++p) EXPECT_EQ(ids[p], p * 3);
}

// Restores the default message limit when a test ends (also on a failed assertion).
struct MaxCountGuard {
  explicit MaxCountGuard(int64_t n) { dist::set_max_message_count(n); }
  ~MaxCountGuard() { dist::set_max_message_count(INT_MAX); }
};

// Every collective with messages longer than the limit (pieces of 3 elements, a short last piece)
// gives the unsplit result bit for bit. Integer-valued data: the sums are exact in any order.
TEST(DistComm, SplitMessagesMatchUnsplit) {
  const dist::Communicator comm = world();
  const int n = comm.size(), me = comm.rank();
  const int64_t c = 11;  // elements per rank block: 3 + 3 + 3 + 2 with max count 3
  auto fill = [&](int64_t len, int salt) {
    std::vector<float> v(len);  // [len]
    for (int64_t i = 0; i < len; ++i) v[i] = static_cast<float>((me * 37 + salt * 11 + i * 7) % 97);
    return v;
  };
  struct Out {
    std::vector<float> a2a, ag, rs, ar, bc, sc, ga;  // each [n*c] or [c]
    std::string str;
  };
  auto run = [&]() {
    Out o;
    const std::vector<float> send = fill(n * c, 1), mine = fill(c, 2);
    o.a2a.assign(n * c, -1.f);
    comm.all_to_all(send.data(), o.a2a.data(), c);
    o.ag.assign(n * c, -1.f);
    comm.all_gather(mine.data(), o.ag.data(), c);
    o.rs.assign(c, -1.f);
    comm.reduce_scatter(send.data(), o.rs.data(), c);
    o.ar = fill(c, 3);
    comm.all_reduce(o.ar.data(), c);
    o.bc = fill(c, 4);
    comm.broadcast(o.bc.data(), c, n - 1);
    o.sc.assign(c, -1.f);
    comm.scatter(me == 0 ? send.data() : nullptr, o.sc.data(), c, 0);
    o.ga.assign(n * c, -1.f);
    comm.gather(mine.data(), me == 0 ? o.ga.data() : nullptr, c, 0);
    o.str = me == 0 ? std::string("a control message longer than three bytes") : std::string();
    comm.broadcast_string(&o.str, 0);
    return o;
  };
  const Out whole = run();
  Out split;
  {
    const MaxCountGuard guard(3);
    split = run();
  }
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  EXPECT_TRUE(same(whole.a2a, split.a2a));
  EXPECT_TRUE(same(whole.ag, split.ag));
  EXPECT_TRUE(same(whole.rs, split.rs));
  EXPECT_TRUE(same(whole.ar, split.ar));
  EXPECT_TRUE(same(whole.bc, split.bc));
  EXPECT_TRUE(same(whole.sc, split.sc));
  if (me == 0) {
    EXPECT_TRUE(same(whole.ga, split.ga));
  }
  EXPECT_EQ(split.str, "a control message longer than three bytes");
  // Spot checks that the unsplit results are the collectives' (not two equal wrong answers).
  for (int p = 0; p < n; ++p)
    EXPECT_EQ(whole.ag[p * c + 4], static_cast<float>((p * 37 + 22 + 28) % 97));
  EXPECT_EQ(whole.sc[2], static_cast<float>((0 * 37 + 11 + (me * c + 2) * 7) % 97));
}

TEST(DistComm, DapAndDpGroups) {
  const dist::Communicator w = world();
  const int n = w.size() % 2 == 0 ? 2 : 1;  // DAP groups of 2 ranks (D = size/2 replicas)
  const dist::Communicator dap = w.dap_group(n), dp = w.dp_group(n);
  EXPECT_EQ(dap.size(), n);
  EXPECT_EQ(dap.rank(), w.rank() % n);
  EXPECT_EQ(dp.size(), w.size() / n);
  EXPECT_EQ(dp.rank(), w.rank() / n);
  float v = static_cast<float>(w.rank());
  dap.all_reduce(&v, 1);  // ranks g*n .. g*n+n-1
  const int g = w.rank() / n;
  EXPECT_EQ(v, static_cast<float>(n * g * n + n * (n - 1) / 2));
}

// Random O(1) inputs and 0/1 masks with ~15 % zeros but two ones in every row and column.
Tensor random_tensor(const Shape& shape, uint64_t seed) {
  Tensor t = Tensor::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = uniform_pm1(seed, i);
  return t;
}
Tensor random_mask(int64_t a, int64_t b, uint64_t seed) {
  Tensor t = Tensor::empty({a, b});
  for (int64_t i = 0; i < a; ++i)
    for (int64_t j = 0; j < b; ++j)
      t.f32()[i * b + j] =
          (j == i % b || j == (i + 1) % b || uniform_pm1(seed, i * b + j) > -0.7f) ? 1.f : 0.f;
  return t;
}

// max |x - ref| / max(rms(ref), 1): the golden metric (relative for O(1)+ tensors).
double rel_err(const Tensor& x, const Tensor& ref) { return test::golden_err(x, ref); }

struct Case {
  EvoformerStack stack;  // the root's stack (shared with the others by dap_share_stack)
  Tensor m, z, msa_mask, pair_mask;
};

// Runs the root's case through dap_forward on `comm` and, on the root, the single-process
// forward; returns the max rel_err of m, z, s (root only; 0 elsewhere). trace: as
// DapOptions::trace.
double dap_vs_single(const dist::Communicator& comm, Case& c, int64_t chunk,
                     Tensor* m_out = nullptr, Tensor* z_out = nullptr, Tensor* s_out = nullptr,
                     DapStats* stats = nullptr, const TraceFn& trace = nullptr) {
  EXPECT_TRUE(dap_share_stack(comm, &c.stack).ok());
  Tensor m, z, s;
  if (comm.rank() == 0) {
    m = c.m.clone();
    z = c.z.clone();
  }
  DapOptions opts;
  opts.chunk = chunk;
  opts.trace = trace;
  const Status st = dap_forward(c.stack, comm, m, z, c.msa_mask, c.pair_mask, &s, opts, stats);
  EXPECT_TRUE(st.ok()) << st.ToString();
  if (comm.rank() != 0 || !st.ok()) return 0;
  Tensor m1 = c.m.clone(), z1 = c.z.clone(), s1;
  ForwardOptions fo;
  fo.chunk = chunk;
  EXPECT_TRUE(c.stack.forward(m1, z1, c.msa_mask, c.pair_mask, &s1, fo).ok());
  if (m_out) *m_out = m;
  if (z_out) *z_out = z;
  if (s_out) *s_out = s;
  return std::max({rel_err(m, m1), rel_err(z, z1), rel_err(s, s1)});
}

class DapGolden : public ::testing::TestWithParam<std::pair<std::string, int64_t>> {};

TEST_P(DapGolden, MatchesSingleProcessAndOpenFold) {
  const dist::Communicator comm = world();
  Case c;
  TensorFile f;
  int ok = 1;  // the root's file reading; shared so that no rank waits for a root that failed
  if (comm.rank() == 0) {
    EvoformerConfig cfg;
    ok = read_safetensors(test::data_path(GetParam().first), &f).ok() &&
         EvoformerConfig::from_metadata(f.metadata, &cfg).ok() &&
         EvoformerStack::load(cfg, f, &c.stack).ok() && f.get_f32("input.m", {}, &c.m).ok() &&
         f.get_f32("input.z", {}, &c.z).ok() && f.get_f32("input.msa_mask", {}, &c.msa_mask).ok() &&
         f.get_f32("input.pair_mask", {}, &c.pair_mask).ok();
  }
  comm.broadcast_bytes(&ok, sizeof(ok), 0);
  ASSERT_TRUE(ok) << "rank 0 could not read " << GetParam().first;
  Tensor m, z, s;
  std::map<std::string, Tensor> traces;  // block 0, gathered on the root
  const TraceFn trace = [&](int block, const std::string& module, const std::string& stream,
                            const Tensor& v) {
    if (block == 0) traces["trace.block0." + module + "." + stream] = v.clone();
  };
  const double err = dap_vs_single(comm, c, GetParam().second, &m, &z, &s, nullptr, trace);
  if (comm.rank() != 0) return;
  int checked = 0;
  for (const std::string& name : f.names) {
    if (name.rfind("trace.block0.", 0) != 0) continue;
    ASSERT_TRUE(traces.count(name)) << "no trace produced for " << name;
    EXPECT_LT(test::golden_err(traces[name], f.tensors.at(name)), 1e-4) << name;
    ++checked;
  }
  EXPECT_EQ(checked, 9);
  std::printf("[ info ] N=%d %s: DAP vs single process %.2e\n", comm.size(),
              GetParam().first.c_str(), err);
  EXPECT_LT(err, 1e-5);
  EXPECT_LT(test::golden_err(m, f.tensors.at("output.m")), 1e-4);
  EXPECT_LT(test::golden_err(z, f.tensors.at("output.z")), 1e-4);
  EXPECT_LT(test::golden_err(s, f.tensors.at("output.s")), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Cases, DapGolden,
                         ::testing::Values(std::make_pair("evo_tiny.safetensors", 0),
                                           std::make_pair("evo_tiny.safetensors", 1),
                                           std::make_pair("evo_af2dims.safetensors", 0),
                                           std::make_pair("evo_af2dims.safetensors", 3)),
                         [](const auto& info) {
                           const std::string& f = info.param.first;
                           return f.substr(0, f.find('.')) + "_chunk" +
                                  std::to_string(info.param.second);
                         });

EvoformerConfig small_config(int64_t blocks) {
  EvoformerConfig cfg;
  cfg.c_m = 16;
  cfg.c_z = 8;
  cfg.c_hidden_msa_att = 4;
  cfg.no_heads_msa = 3;
  cfg.c_hidden_pair_att = 4;
  cfg.no_heads_pair = 2;
  cfg.c_hidden_opm = 4;
  cfg.c_hidden_mul = 8;
  cfg.transition_n = 2;
  cfg.no_blocks = blocks;
  cfg.c_s = 6;
  return cfg;
}

Case random_case(const EvoformerConfig& cfg, int64_t s, int64_t r, bool masks, uint64_t seed) {
  Case c;
  c.stack = EvoformerStack::random(cfg, seed);
  c.m = random_tensor({s, r, cfg.c_m}, seed + 1);
  c.z = random_tensor({r, r, cfg.c_z}, seed + 2);
  if (masks) {
    c.msa_mask = random_mask(s, r, seed + 3);
    c.pair_mask = random_mask(r, r, seed + 4);
  }
  return c;
}

// s and r not multiples of the rank count: padded with masked sequences/residues.
TEST(Dap, PaddingKeepsResults) {
  const dist::Communicator comm = world();
  const EvoformerConfig cfg = small_config(2);
  for (const auto& [s, r, masks] : {std::tuple{5, 7, true}, std::tuple{3, 9, false},
                                    std::tuple{1, 2, false}, std::tuple{6, 5, true}}) {
    Case c = random_case(cfg, s, r, masks, 17 + s * 31 + r);
    for (int64_t chunk : {0, 2}) {
      const double err = dap_vs_single(comm, c, chunk);
      if (comm.rank() == 0) {
        EXPECT_LT(err, 1e-5) << "s=" << s << " r=" << r << " chunk=" << chunk;
      }
    }
  }
}

// The sharded forward with every message split into pieces of 7 elements gives the unsplit
// outputs bit for bit (the forward moves data only: no reductions).
TEST(Dap, SplitMessagesKeepResultsBitForBit) {
  const dist::Communicator comm = world();
  const EvoformerConfig cfg = small_config(2);
  Case c = random_case(cfg, 5, 7, true, 123);
  Tensor m0, z0, s0, m1, z1, s1;
  dap_vs_single(comm, c, 0, &m0, &z0, &s0);
  {
    const MaxCountGuard guard(7);
    dap_vs_single(comm, c, 0, &m1, &z1, &s1);
  }
  if (comm.rank() != 0) return;
  for (const auto& [a, b] : {std::pair{&m0, &m1}, std::pair{&z0, &z1}, std::pair{&s0, &s1}}) {
    ASSERT_TRUE(a->defined() && b->defined());
    ASSERT_EQ(a->shape(), b->shape());
    EXPECT_TRUE(test::all_finite(*a));
    EXPECT_EQ(std::memcmp(a->f32(), b->f32(), a->nbytes()), 0);
  }
}

// Bytes the blocks send per rank equal the analytic volume (docs/dap.md); 6 all-to-alls per block.
TEST(Dap, CommunicationVolumeMatchesModel) {
  const dist::Communicator comm = world().split(0, world().rank());
  const EvoformerConfig cfg = small_config(3);
  for (const auto& [s, r] : {std::pair{8, 12}, std::pair{5, 7}}) {
    Case c = random_case(cfg, s, r, true, 5);
    DapStats st;
    dap_vs_single(comm, c, 0, nullptr, nullptr, nullptr, &st);
    const DapBlockVolume v = dap_block_volume(cfg, dap_layout(s, r, comm.size(), comm.rank()));
    auto at = [](const dist::CommStats& x, dist::Op op, bool calls) {
      return (calls ? x.calls : x.bytes)[static_cast<int>(op)];
    };
    EXPECT_EQ(at(st.blocks, dist::Op::kAllToAll, false), cfg.no_blocks * v.all_to_all_bytes);
    EXPECT_EQ(at(st.blocks, dist::Op::kAllGather, false), cfg.no_blocks * v.all_gather_bytes);
    EXPECT_EQ(at(st.blocks, dist::Op::kAllToAll, true), cfg.no_blocks * 6);
    EXPECT_GE(at(st.blocks, dist::Op::kAllGather, true), cfg.no_blocks * 6);
    EXPECT_EQ(st.blocks.total_bytes(), cfg.no_blocks * v.total());
  }
}

// Each rank reports its tracked peak (printed for the record; inputs and outputs live on the root
// only, so the other ranks show the sharded working set).
TEST(Dap, PerRankPeakReported) {
  const dist::Communicator comm = world();
  const EvoformerConfig cfg = small_config(1);
  Case c = random_case(cfg, 16, 32, false, 9);
  DapStats st;
  dap_vs_single(comm, c, 0, nullptr, nullptr, nullptr, &st);
  const std::vector<int64_t> peaks = comm.all_gather_i64(st.work_peak_bytes);
  if (comm.rank() == 0) {
    std::string line = "per-rank tracked peak above the call's start (bytes):";
    for (int64_t p : peaks) line += " " + std::to_string(p);
    std::printf("[ info ] N=%d %s\n", comm.size(), line.c_str());
  }
  EXPECT_GT(st.peak_bytes, 0);
  const DapLayout l = dap_layout(16, 32, comm.size(), comm.rank());
  EXPECT_EQ(st.shard_bytes, (l.s_loc * l.r_pad * cfg.c_m + l.r_loc * l.r_pad * cfg.c_z) * 4);
}

// ---- DAP training: sharded module forward + adjoint backward against one process -------------

// x [a, b, c] padded with zeros to [ap, bp, c]; transposed: x^T [b, a, c] padded to [bp, ap, c].
Tensor pad_copy(const Tensor& x, int64_t ap, int64_t bp, bool transposed) {
  const int64_t a = x.dim(0), b = x.dim(1), c = x.numel() / (a * b);
  Tensor out = transposed ? Tensor::zeros({bp, ap, c}) : Tensor::zeros({ap, bp, c});
  for (int64_t i = 0; i < a; ++i)
    for (int64_t j = 0; j < b; ++j)
      for (int64_t k = 0; k < c; ++k)
        out.f32()[((transposed ? j * ap + i : i * bp + j)) * c + k] = x.f32()[(i * b + j) * c + k];
  return out;
}
// Rows [row0, row0 + rows) of x [R, ...].
Tensor rows_of(const Tensor& x, int64_t row0, int64_t rows) {
  Shape sh = x.shape();
  const int64_t per = x.numel() / sh[0];
  sh[0] = rows;
  Tensor out = Tensor::empty(sh);
  std::memcpy(out.f32(), x.f32() + row0 * per, rows * per * sizeof(float));
  return out;
}
// Every rank's row shard gathered [N*rows, ...] and cropped to [a, b, c] (transposed: stored
// as x^T, returned as x).
Tensor gather_rows(const dist::Communicator& comm, const Tensor& shard, int64_t a, int64_t b,
                   bool transposed) {
  Shape sh = shard.shape();
  const int64_t bp = sh[1], c = sh[2], ap_ = sh[0] * comm.size();
  Tensor all = Tensor::empty({ap_, bp, c});
  comm.all_gather(shard.f32(), all.f32(), shard.numel());
  Tensor out = Tensor::empty(transposed ? Shape{b, a, c} : Shape{a, b, c});
  const int64_t oa = transposed ? b : a, ob = transposed ? a : b;
  for (int64_t i = 0; i < oa; ++i)
    for (int64_t j = 0; j < ob; ++j)
      for (int64_t k = 0; k < c; ++k)
        out.f32()[(i * ob + j) * c + k] =
            transposed ? all.f32()[(j * bp + i) * c + k] : all.f32()[(i * bp + j) * c + k];
  return out;
}

double worst_grad_err(const BlockWeights& got, const BlockWeights& ref) {
  const auto a = named_params(got, ""), b = named_params(ref, "");
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, rel_err(a[i].second.contiguous(), b[i].second.contiguous()));
  return worst;
}

// MSA row attention and triangle attention (starting, ending) with dropout, padding (s, r not
// multiples of N) and masks, policies none (state kept) and module (recomputed): outputs, input
// gradients and all-reduced parameter gradients equal one process within 1e-5.
TEST(DapTrain, BiasedAttentionModulesMatchSingleProcess) {
  const dist::Communicator comm = world();
  const EvoformerConfig cfg = small_config(1);
  const int64_t s = 5, r = 7;
  const uint64_t key = 1234;
  Case c = random_case(cfg, s, r, true, 77);
  const Tensor gm = random_tensor({s, r, cfg.c_m}, 91), gz = random_tensor({r, r, cfg.c_z}, 92);
  const BlockWeights& w = StackAccess::block(c.stack, 0);
  // One process: the shards of a one-rank layout are the whole (unpadded) streams.
  DapShards one = make_dap_shards(cfg, dap_layout(s, r, 1, 0), c.msa_mask, c.pair_mask, 0, 0, 1);
  set_dap_dropout(&one, true, key);
  const DapLayout l = dap_layout(s, r, comm.size(), comm.rank());
  const Tensor msa_p = pad_copy(c.msa_mask.reshape({s, r, 1}), l.s_pad, l.r_pad, false);
  const Tensor pair_p = pad_copy(c.pair_mask.reshape({r, r, 1}), l.r_pad, l.r_pad, false);
  DapShards sh = make_dap_shards(cfg, l, msa_p.reshape({l.s_pad, l.r_pad}),
                                 pair_p.reshape({l.r_pad, l.r_pad}), 0, 0, 1);
  set_dap_dropout(&sh, true, key);
  const int64_t sl = l.s_loc, rl = l.r_loc;
  for (int module = 0; module < 3; ++module) {
    for (bool keep : {true, false}) {
      const bool ending = module == 2, on_m = module == 0;
      // Reference.
      Tensor m1 = c.m.clone(), z1 = c.z.clone(), dm1 = gm.clone(), dz1 = gz.clone();
      BlockWeights g1;
      allocate_block_grads(cfg, &g1);
      AttentionState st1;
      if (on_m) {
        msa_row_attention_train(w.msa_att_row, one.full, m1.f32(), z1.f32(), keep ? &st1 : nullptr);
        msa_row_attention_backward(w.msa_att_row, &g1.msa_att_row, one.full, c.m.f32(), c.z.f32(),
                                   &st1, dm1.f32(), dz1.f32());
      } else {
        const TriangleAttentionW& tw = ending ? w.tri_att_end : w.tri_att_start;
        TriangleAttentionW* tg = ending ? &g1.tri_att_end : &g1.tri_att_start;
        triangle_attention_train(tw, one.full, ending, z1.f32(), keep ? &st1 : nullptr);
        triangle_attention_backward(tw, tg, one.full, ending, c.z.f32(), &st1, dz1.f32());
      }
      // DAP: m by sequences, z by rows (z^T by rows for the ending node).
      const Tensor mp = pad_copy(c.m, l.s_pad, l.r_pad, false);
      const Tensor zp = pad_copy(c.z, l.r_pad, l.r_pad, ending);
      const Tensor gmp = pad_copy(gm, l.s_pad, l.r_pad, false);
      const Tensor gzp = pad_copy(gz, l.r_pad, l.r_pad, ending);
      const Tensor m_in = rows_of(mp, l.rank * sl, sl), z_in = rows_of(zp, l.rank * rl, rl);
      Tensor m2 = m_in.clone(), z2 = z_in.clone();
      Tensor dm2 = rows_of(gmp, l.rank * sl, sl), dz2 = rows_of(gzp, l.rank * rl, rl);
      BlockWeights g2;
      allocate_block_grads(cfg, &g2);
      AttentionState st2;
      if (on_m) {
        dap_msa_row_attention_train(w.msa_att_row, sh, comm, m2.f32(), z2.f32(),
                                    keep ? &st2 : nullptr);
        dap_msa_row_attention_backward(w.msa_att_row, &g2.msa_att_row, sh, comm, m_in.f32(),
                                       z_in.f32(), &st2, dm2.f32(), dz2.f32());
      } else {
        const TriangleAttentionW& tw = ending ? w.tri_att_end : w.tri_att_start;
        TriangleAttentionW* tg = ending ? &g2.tri_att_end : &g2.tri_att_start;
        dap_triangle_attention_train(tw, sh, comm, ending, z2.f32(), keep ? &st2 : nullptr);
        dap_triangle_attention_backward(tw, tg, sh, comm, ending, z_in.f32(), &st2, dz2.f32());
      }
      dap_all_reduce_grads(comm, &g2);
      const Tensor m_out = gather_rows(comm, m2, s, r, false);
      const Tensor z_out = gather_rows(comm, z2, r, r, ending);
      const Tensor dm_out = gather_rows(comm, dm2, s, r, false);
      const Tensor dz_out = gather_rows(comm, dz2, r, r, ending);
      const std::string what = "module " + std::to_string(module) + (keep ? " none" : " module");
      EXPECT_LT(rel_err(m_out, m1), 1e-5) << what;
      EXPECT_LT(rel_err(z_out, z1), 1e-5) << what;
      EXPECT_LT(rel_err(dm_out, dm1), 1e-5) << what;
      EXPECT_LT(rel_err(dz_out, dz1), 1e-5) << what;
      EXPECT_LT(worst_grad_err(g2, g1), 1e-5) << what;
    }
  }
}

// Columns [col0, col0 + cols) of x [a, b, c]: [a, cols, c].
Tensor cols_of(const Tensor& x, int64_t col0, int64_t cols) {
  const int64_t a = x.dim(0), b = x.dim(1), c = x.dim(2);
  Tensor out = Tensor::empty({a, cols, c});
  for (int64_t i = 0; i < a; ++i)
    std::memcpy(out.f32() + i * cols * c, x.f32() + (i * b + col0) * c, cols * c * sizeof(float));
  return out;
}
// Every rank's column shard [a_p, cols, c] gathered and cropped to [a, b, c].
Tensor gather_cols(const dist::Communicator& comm, const Tensor& shard, int64_t a, int64_t b) {
  const int64_t ap_ = shard.dim(0), cols = shard.dim(1), c = shard.dim(2);
  Tensor all = Tensor::empty({comm.size(), ap_, cols, c});
  comm.all_gather(shard.f32(), all.f32(), shard.numel());
  Tensor out = Tensor::empty({a, b, c});
  for (int64_t i = 0; i < a; ++i)
    for (int64_t j = 0; j < b; ++j)
      std::memcpy(out.f32() + (i * b + j) * c,
                  all.f32() + (((j / cols) * ap_ + i) * cols + j % cols) * c, c * sizeof(float));
  return out;
}

// Outer product mean, m by residues and z by rows, padding and masks, state kept or rebuilt.
TEST(DapTrain, OuterProductMeanMatchesSingleProcess) {
  const dist::Communicator comm = world();
  const EvoformerConfig cfg = small_config(1);
  const int64_t s = 5, r = 7;
  Case c = random_case(cfg, s, r, true, 78);
  const Tensor gm = random_tensor({s, r, cfg.c_m}, 93), gz = random_tensor({r, r, cfg.c_z}, 94);
  const OuterProductMeanW& w = StackAccess::block(c.stack, 0).outer_product_mean;
  DapShards one = make_dap_shards(cfg, dap_layout(s, r, 1, 0), c.msa_mask, c.pair_mask, 0, 0, 1);
  const DapLayout l = dap_layout(s, r, comm.size(), comm.rank());
  const Tensor msa_p = pad_copy(c.msa_mask.reshape({s, r, 1}), l.s_pad, l.r_pad, false);
  const Tensor pair_p = pad_copy(c.pair_mask.reshape({r, r, 1}), l.r_pad, l.r_pad, false);
  DapShards sh = make_dap_shards(cfg, l, msa_p.reshape({l.s_pad, l.r_pad}),
                                 pair_p.reshape({l.r_pad, l.r_pad}), 0, 0, 1);
  const int64_t rl = l.r_loc;
  for (bool rebuild : {false, true}) {
    Tensor z1 = c.z.clone(), dm1 = gm.clone();
    BlockWeights g1;
    allocate_block_grads(cfg, &g1);
    OuterProductMeanState st1;
    outer_product_mean_train(w, one.full, c.m.f32(), z1.f32(), &st1);
    if (rebuild) outer_product_mean_train(w, one.full, c.m.f32(), nullptr, &st1);
    outer_product_mean_backward(w, &g1.outer_product_mean, one.full, c.m.f32(), st1, gz.f32(),
                                dm1.f32());

    const Tensor m_in = cols_of(pad_copy(c.m, l.s_pad, l.r_pad, false), l.rank * rl, rl);
    Tensor z2 = rows_of(pad_copy(c.z, l.r_pad, l.r_pad, false), l.rank * rl, rl);
    Tensor dm2 = cols_of(pad_copy(gm, l.s_pad, l.r_pad, false), l.rank * rl, rl);
    const Tensor dz2 = rows_of(pad_copy(gz, l.r_pad, l.r_pad, false), l.rank * rl, rl);
    BlockWeights g2;
    allocate_block_grads(cfg, &g2);
    OuterProductMeanState st2;
    dap_outer_product_mean_train(w, sh, comm, m_in.f32(), z2.f32(), &st2);
    if (rebuild) dap_outer_product_mean_train(w, sh, comm, m_in.f32(), nullptr, &st2);
    dap_outer_product_mean_backward(w, &g2.outer_product_mean, sh, comm, m_in.f32(), st2, dz2.f32(),
                                    dm2.f32());
    dap_all_reduce_grads(comm, &g2);
    EXPECT_LT(rel_err(gather_rows(comm, z2, r, r, false), z1), 1e-5);
    EXPECT_LT(rel_err(gather_cols(comm, dm2, s, r), dm1), 1e-5);
    EXPECT_LT(worst_grad_err(g2, g1), 1e-5);
  }
}

// bf16 inference forms of the products on shards (DapBf16: also CTest dap_mpi_np3): the outer
// product mean (m by residues, z by rows) and both triangle multiplications (z rows, z^T rows;
// automatic and forced channel groups) with bf16 GEMM inputs, padding and masks, against the
// one-process bf16 layer. The shards round a, b (and A, B) where one process does and multiply
// the gathered bf16 values in the one-process product's shape, so the difference is only the
// f32 summation order of GEMMs of other shapes (kDapBf16ProductTol; the f32 products of the
// tenth session differed by the bf16 rounding itself, ~1e-2).
constexpr double kDapBf16ProductTol = 1e-5;
DapShards padded_shards(const EvoformerConfig& cfg, const Case& c, const DapLayout& l,
                        int64_t chunk) {
  const int64_t s = c.m.dim(0), r = c.m.dim(1);
  const Tensor msa_p = pad_copy(c.msa_mask.reshape({s, r, 1}), l.s_pad, l.r_pad, false);
  const Tensor pair_p = pad_copy(c.pair_mask.reshape({r, r, 1}), l.r_pad, l.r_pad, false);
  DapShards sh = make_dap_shards(cfg, l, msa_p.reshape({l.s_pad, l.r_pad}),
                                 pair_p.reshape({l.r_pad, l.r_pad}), chunk, 0, 1);
  for (BlockContext* ctx : {&sh.row, &sh.col, &sh.full}) ctx->dtype = DType::BF16;
  return sh;
}
ShardGather all_gather_hook(const dist::Communicator& comm) {
  return {comm.size(), [&comm](const float* mine, int64_t count, float* all) {
            comm.all_gather(mine, all, count);
          }};
}

TEST(DapBf16, ShardProductsMatchOneProcessBf16) {
  const dist::Communicator comm = world();
  EvoformerConfig cfg = small_config(1);
  cfg.c_hidden_mul = 16, cfg.c_hidden_opm = 8;
  const int64_t s = 5, r = 7;
  Case c = random_case(cfg, s, r, true, 81);
  const BlockWeights& w = StackAccess::block(c.stack, 0);
  const DapLayout l = dap_layout(s, r, comm.size(), comm.rank());
  const int64_t rl = l.r_loc;
  const ShardGather gather = all_gather_hook(comm);
  for (int64_t chunk : {0, 3}) {
    DapShards one =
        make_dap_shards(cfg, dap_layout(s, r, 1, 0), c.msa_mask, c.pair_mask, chunk, 0, 1);
    one.full.dtype = DType::BF16;
    const DapShards sh = padded_shards(cfg, c, l, chunk);
    const std::string what = "chunk " + std::to_string(chunk);
    {
      Tensor z1 = c.z.clone(), z1f = c.z.clone();
      outer_product_mean(w.outer_product_mean, one.full, c.m.f32(), z1.f32());
      BlockContext f32 = one.full;
      f32.dtype = DType::F32;
      outer_product_mean(w.outer_product_mean, f32, c.m.f32(), z1f.f32());
      const Tensor m_in = cols_of(pad_copy(c.m, l.s_pad, l.r_pad, false), l.rank * rl, rl);
      Tensor z2 = rows_of(pad_copy(c.z, l.r_pad, l.r_pad, false), l.rank * rl, rl);
      outer_product_mean_shard(w.outer_product_mean, sh.full, m_in.f32(), l.rank * rl, rl,
                               sh.msa_mask_cols.f32(), gather, z2.f32());
      const Tensor got = gather_rows(comm, z2, r, r, false);
      const double err = rel_err(got, z1), bf16_effect = rel_err(z1f, z1);
      if (comm.rank() == 0)
        std::printf("[ info ] N=%d OPM %s: shards vs one process bf16 %.2e (bf16 vs f32 %.2e)\n",
                    comm.size(), what.c_str(), err, bf16_effect);
      EXPECT_LT(err, kDapBf16ProductTol) << "OPM " << what;
      EXPECT_GT(bf16_effect, 100 * kDapBf16ProductTol) << "OPM " << what;
    }
    for (bool incoming : {false, true}) {
      const TriangleMultiplicationW& tw = incoming ? w.tri_mul_in : w.tri_mul_out;
      Tensor z1 = c.z.clone();
      triangle_multiplication(tw, one.full, !incoming, z1.f32());
      Tensor z2 = rows_of(pad_copy(c.z, l.r_pad, l.r_pad, incoming), l.rank * rl, rl);
      triangle_multiplication_shard(
          tw, sh.full, incoming, rl,
          (incoming ? sh.pair_mask_t : sh.pair_mask).f32() + l.rank * rl * l.r_pad, gather,
          z2.f32());
      const double err = rel_err(gather_rows(comm, z2, r, r, incoming), z1);
      if (comm.rank() == 0)
        std::printf("[ info ] N=%d tri_mul %s %s: shards vs one process bf16 %.2e\n", comm.size(),
                    incoming ? "incoming" : "outgoing", what.c_str(), err);
      EXPECT_LT(err, kDapBf16ProductTol) << (incoming ? "incoming " : "outgoing ") << what;
    }
  }
}

// Triangle multiplication outgoing (z rows) and incoming (z^T rows) with dropout, padding and
// masks, state kept or rebuilt; forced channel groups of 3 (several gathers per module).
TEST(DapTrain, TriangleMultiplicationMatchesSingleProcess) {
  const dist::Communicator comm = world();
  const EvoformerConfig cfg = small_config(1);
  const int64_t s = 4, r = 7;
  Case c = random_case(cfg, s, r, true, 79);
  const Tensor gz = random_tensor({r, r, cfg.c_z}, 95);
  const BlockWeights& w = StackAccess::block(c.stack, 0);
  for (int64_t chunk : {0, 3}) {
    DapShards one =
        make_dap_shards(cfg, dap_layout(s, r, 1, 0), c.msa_mask, c.pair_mask, chunk, 0, 1);
    set_dap_dropout(&one, true, 99);
    const DapLayout l = dap_layout(s, r, comm.size(), comm.rank());
    const Tensor msa_p = pad_copy(c.msa_mask.reshape({s, r, 1}), l.s_pad, l.r_pad, false);
    const Tensor pair_p = pad_copy(c.pair_mask.reshape({r, r, 1}), l.r_pad, l.r_pad, false);
    DapShards sh = make_dap_shards(cfg, l, msa_p.reshape({l.s_pad, l.r_pad}),
                                   pair_p.reshape({l.r_pad, l.r_pad}), chunk, 0, 1);
    set_dap_dropout(&sh, true, 99);
    const int64_t rl = l.r_loc;
    for (bool incoming : {false, true}) {
      for (bool keep : {true, false}) {
        const TriangleMultiplicationW& tw = incoming ? w.tri_mul_in : w.tri_mul_out;
        Tensor z1 = c.z.clone(), dz1 = gz.clone();
        BlockWeights g1;
        allocate_block_grads(cfg, &g1);
        TriangleMultiplicationState st1;
        triangle_multiplication_train(tw, one.full, !incoming, z1.f32(), keep ? &st1 : nullptr);
        triangle_multiplication_backward(tw, incoming ? &g1.tri_mul_in : &g1.tri_mul_out, one.full,
                                         !incoming, c.z.f32(), &st1, dz1.f32());

        const Tensor z_in = rows_of(pad_copy(c.z, l.r_pad, l.r_pad, incoming), l.rank * rl, rl);
        Tensor z2 = z_in.clone();
        Tensor dz2 = rows_of(pad_copy(gz, l.r_pad, l.r_pad, incoming), l.rank * rl, rl);
        BlockWeights g2;
        allocate_block_grads(cfg, &g2);
        TriangleMultiplicationState st2;
        dap_triangle_multiplication_train(tw, sh, comm, incoming, z2.f32(), keep ? &st2 : nullptr);
        dap_triangle_multiplication_backward(tw, incoming ? &g2.tri_mul_in : &g2.tri_mul_out, sh,
                                             comm, incoming, z_in.f32(), &st2, dz2.f32());
        dap_all_reduce_grads(comm, &g2);
        const std::string what = std::string(incoming ? "incoming" : "outgoing") +
                                 (keep ? " none" : " module") + " chunk " + std::to_string(chunk);
        EXPECT_LT(rel_err(gather_rows(comm, z2, r, r, incoming), z1), 1e-5) << what;
        EXPECT_LT(rel_err(gather_rows(comm, dz2, r, r, incoming), dz1), 1e-5) << what;
        EXPECT_LT(worst_grad_err(g2, g1), 1e-5) << what;
      }
    }
  }
}

// The whole training step over DAP vs one process on the root: outputs, input gradients and
// every parameter gradient within 1e-5, max over all. grads_out: the DAP result (root).
double dap_train_vs_single(const dist::Communicator& comm, Case& c, const Tensor& gm,
                           const Tensor& gz, const TrainOptions& opts,
                           TrainResult* dap_out = nullptr, DapTrainStats* stats = nullptr) {
  EXPECT_TRUE(dap_share_stack(comm, &c.stack).ok());
  Tensor m, z;
  if (comm.rank() == 0) m = c.m.clone(), z = c.z.clone();
  TrainResult r2;
  const Status st =
      dap_train_step(c.stack, comm, m, z, c.msa_mask, c.pair_mask, gm, gz, opts, stats, &r2);
  EXPECT_TRUE(st.ok()) << st.ToString();
  if (comm.rank() != 0 || !st.ok()) return 0;
  Tensor m1 = c.m.clone(), z1 = c.z.clone();
  TrainResult r1;
  EXPECT_TRUE(c.stack.train_step(m1, z1, c.msa_mask, c.pair_mask, gm, gz, opts, &r1).ok());
  double worst = std::max({rel_err(m, m1), rel_err(z, z1), rel_err(r2.grad_m, r1.grad_m),
                           rel_err(r2.grad_z, r1.grad_z)});
  EXPECT_EQ(r1.grad_params.size(), r2.grad_params.size());
  for (size_t i = 0; i < r1.grad_params.size() && i < r2.grad_params.size(); ++i) {
    EXPECT_EQ(r1.grad_params[i].first, r2.grad_params[i].first);
    worst = std::max(worst, rel_err(r2.grad_params[i].second.contiguous(),
                                    r1.grad_params[i].second.contiguous()));
  }
  if (dap_out) *dap_out = r2;
  return worst;
}

// Every policy (and a mixed plan), dropout on, s and r not multiples of N, masks.
TEST(DapTrain, StepMatchesSingleProcessEveryPolicy) {
  const dist::Communicator comm = world();
  const EvoformerConfig cfg = small_config(2);
  const int64_t s = 5, r = 7;
  Case c = random_case(cfg, s, r, true, 80);
  const Tensor gm = comm.rank() == 0 ? random_tensor({s, r, cfg.c_m}, 96) : Tensor();
  const Tensor gz = comm.rank() == 0 ? random_tensor({r, r, cfg.c_z}, 97) : Tensor();
  const std::vector<std::vector<Recompute>> plans = {{Recompute::kNone},
                                                     {Recompute::kModule},
                                                     {Recompute::kBlock},
                                                     {Recompute::kBlock, Recompute::kModule}};
  for (const auto& plan : plans) {
    for (bool dropout : {false, true}) {
      TrainOptions o;
      o.policy = plan;
      o.dropout = dropout;
      o.seed = 5;
      const double err = dap_train_vs_single(comm, c, gm, gz, o);
      if (comm.rank() == 0) {
        EXPECT_LT(err, 1e-5) << recompute_name(plan[0]) << " dropout " << dropout;
      }
    }
  }
}

// Golden gradients (OpenFold, eval mode) within the golden tolerance, and one process within 1e-5.
TEST(DapTrain, GoldenGradients) {
  const dist::Communicator comm = world();
  for (const char* file : {"evo_tiny.safetensors", "evo_af2dims.safetensors"}) {
    Case c;
    TensorFile f;
    Tensor gm, gz;
    int ok = 1;
    if (comm.rank() == 0) {
      EvoformerConfig cfg;
      ok = read_safetensors(test::data_path(file), &f).ok() &&
           EvoformerConfig::from_metadata(f.metadata, &cfg).ok() &&
           EvoformerStack::load(cfg, f, &c.stack).ok() && f.get_f32("input.m", {}, &c.m).ok() &&
           f.get_f32("input.z", {}, &c.z).ok() &&
           f.get_f32("input.msa_mask", {}, &c.msa_mask).ok() &&
           f.get_f32("input.pair_mask", {}, &c.pair_mask).ok() &&
           f.get_f32("probe.m", {}, &gm).ok() && f.get_f32("probe.z", {}, &gz).ok();
    }
    comm.broadcast_bytes(&ok, sizeof(ok), 0);
    ASSERT_TRUE(ok) << "rank 0 could not read " << file;
    TrainOptions o;
    o.policy = {Recompute::kModule};
    TrainResult r;
    const double err = dap_train_vs_single(comm, c, gm, gz, o, &r);
    if (comm.rank() != 0) continue;
    std::printf("[ info ] N=%d %s: DAP training vs single process %.2e\n", comm.size(), file, err);
    EXPECT_LT(err, 1e-5) << file;
    double worst = std::max(test::golden_err(r.grad_m, f.tensors.at("grad.input.m")),
                            test::golden_err(r.grad_z, f.tensors.at("grad.input.z")));
    int checked = 0;
    for (const auto& [name, t] : r.grad_params) {
      const std::string ref = "grad.param." + name;
      if (!f.tensors.count(ref)) continue;
      worst = std::max(worst, test::golden_err(t.contiguous(), f.tensors.at(ref)));
      ++checked;
    }
    EXPECT_GT(checked, 0);
    EXPECT_LT(worst, 2e-4) << file;
  }
}

// Bytes the training step's blocks send per rank, per collective kind, equal the analytic volume
// (dap_block_volume forward, dap_block_backward_volume per policy), padded and unpadded.
TEST(DapTrain, CommunicationVolumeMatchesModel) {
  const dist::Communicator comm = world().split(0, world().rank());
  const EvoformerConfig cfg = small_config(2);
  for (const auto& [s, r] : {std::pair{8, 12}, std::pair{5, 7}}) {
    Case c = random_case(cfg, s, r, true, 6);
    const Tensor gm = comm.rank() == 0 ? random_tensor({s, r, cfg.c_m}, 1) : Tensor();
    const Tensor gz = comm.rank() == 0 ? random_tensor({r, r, cfg.c_z}, 2) : Tensor();
    const DapLayout l = dap_layout(s, r, comm.size(), comm.rank());
    for (Recompute p : {Recompute::kNone, Recompute::kModule, Recompute::kBlock}) {
      TrainOptions o;
      o.policy = {p};
      o.chunk = 2;  // several channel groups in the triangle multiplications
      DapTrainStats st;
      dap_train_vs_single(comm, c, gm, gz, o, nullptr, &st);
      const DapBlockVolume f = dap_block_volume(cfg, l), b = dap_block_backward_volume(cfg, l, p);
      auto at = [](const dist::CommStats& x, dist::Op op) { return x.bytes[static_cast<int>(op)]; };
      const int64_t nb = cfg.no_blocks;
      const std::string what = std::string(recompute_name(p)) + " s=" + std::to_string(s);
      EXPECT_EQ(at(st.forward, dist::Op::kAllToAll), nb * f.all_to_all_bytes) << what;
      EXPECT_EQ(at(st.forward, dist::Op::kAllGather), nb * f.all_gather_bytes) << what;
      EXPECT_EQ(st.forward.total_bytes(), nb * f.total()) << what;
      EXPECT_EQ(at(st.backward, dist::Op::kAllToAll), nb * b.all_to_all_bytes) << what;
      EXPECT_EQ(at(st.backward, dist::Op::kAllGather), nb * b.all_gather_bytes) << what;
      EXPECT_EQ(at(st.backward, dist::Op::kReduceScatter), nb * b.reduce_scatter_bytes) << what;
      EXPECT_EQ(st.backward.total_bytes(), nb * b.total()) << what;
      EXPECT_GT(st.activation_bytes, 0);
    }
  }
}

// Ranks with different training options (here the dropout seed) or invalid inputs on the root all
// get the same error instead of hanging.
TEST(DapTrain, MismatchedOptionsAndBadInputsAreRefusedOnEveryRank) {
  const dist::Communicator comm = world();
  const EvoformerConfig cfg = small_config(1);
  Case c = random_case(cfg, 4, 6, false, 3);
  ASSERT_TRUE(dap_share_stack(comm, &c.stack).ok());
  const Tensor gm = comm.rank() == 0 ? random_tensor({4, 6, cfg.c_m}, 1) : Tensor();
  const Tensor gz = comm.rank() == 0 ? random_tensor({6, 6, cfg.c_z}, 2) : Tensor();
  TrainOptions o;
  o.dropout = true;
  o.seed = comm.size() > 1 ? static_cast<uint64_t>(comm.rank()) : 0;
  Tensor m = comm.rank() == 0 ? c.m.clone() : Tensor(),
         z = comm.rank() == 0 ? c.z.clone() : Tensor();
  TrainResult r;
  Status st = dap_train_step(c.stack, comm, m, z, Tensor(), Tensor(), gm, gz, o, nullptr, &r);
  if (comm.size() > 1) {
    EXPECT_FALSE(st.ok());
    EXPECT_NE(st.message().find("different model configurations or training options"),
              std::string::npos)
        << st.message();
  }
  o.seed = 0;
  const Tensor bad = comm.rank() == 0 ? random_tensor({4, 5, cfg.c_m}, 1) : Tensor();
  m = comm.rank() == 0 ? c.m.clone() : Tensor();
  z = comm.rank() == 0 ? c.z.clone() : Tensor();
  st = dap_train_step(c.stack, comm, m, z, Tensor(), Tensor(), bad, gz, o, nullptr, &r);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("grad.output.m"), std::string::npos) << st.message();
}

// ---- The public drivers (foldcube/parallel.h) ------------------------------------------------

// Comm::agree: every rank gets the lowest failing rank's status (code and message).
TEST(DapDriver, AgreementGivesEveryRankTheSameStatus) {
  const Comm w = Comm::world();
  EXPECT_TRUE(w.agree(Status::OK()).ok());
  const int bad = w.size() - 1;
  const Status mine =
      w.rank() == bad ? Status::NotFound("missing p" + std::to_string(w.rank())) : Status::OK();
  const Status st = w.agree(mine, true);
  EXPECT_EQ(st.code(), Status::Code::kNotFound);
  EXPECT_EQ(st.message(), "rank " + std::to_string(bad) + ": missing p" + std::to_string(bad));
}

// Defect 3: a planned DAP/DP training step whose replica 1 fails (injected) must end on every
// rank of every replica with that status, not leave replica 0 in the gradient all-reduce while
// replica 1 waits elsewhere. The watchdog turns a hang into a failed run (alarm ends the job).
// Afterwards the ranks are still in step: the same plan runs to the end.
TEST(DapDriver, FailingReplicaEndsEveryRank) {
  const Comm w = Comm::world();
  if (w.size() % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  Plan plan;
  plan.cfg = small_config(1);
  plan.s = 4;
  plan.r = plan.r_real = 6;
  plan.training = true;
  plan.policy = {Recompute::kNone};
  plan.dap = w.size() / 2;
  plan.dp = 2;
  PlanRunOptions o;
  o.seed = 3;
  o.warmup = 0;
  o.repeats = 2;
  o.inject_failure = [](int group, int pass) {
    return group == 1 && pass == 1 ? Status::Internal("injected failure in replica 1")
                                   : Status::OK();
  };
  alarm(60);
  PlanMeasurement mine;
  Status st = run_plan_dap(plan, w, o, &mine);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("injected failure in replica 1"), std::string::npos) << st.message();
  o.inject_failure = nullptr;
  std::vector<PlanMeasurement> all;
  st = run_plan_dap(plan, w, o, &mine, &all);
  alarm(0);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(static_cast<int>(all.size()), w.size());
}

// MPI started by the host program (this binary's main): the library uses it and never ends it.
TEST(DapDriver, HostStartedMpiIsNotOwned) { EXPECT_FALSE(dist::started_mpi()); }

}  // namespace
}  // namespace fc

// Prints failed assertions with the rank, nothing else.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed())
      std::printf("rank %d: %s:%d: %s\n", rank_, r.file_name() ? r.file_name() : "?",
                  r.line_number(), r.summary());
  }

 private:
  int rank_;
};

// The test binary starts MPI itself, as a host program (e.g. Python with mpi4py) would: the
// library's init must find it running and its finalize must leave it running.
int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  int provided = 0;
  if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) return 1;
  const fc::Status st = fc::mpi_init(&argc, &argv);
  if (!st.ok()) {
    std::fprintf(stderr, "dap tests: %s\n", st.ToString().c_str());
    return 1;
  }
  fc::set_num_threads(1);
  const int rank = fc::dist::Communicator::world().rank();
  if (rank != 0) {  // other ranks print their failures only
    ::testing::TestEventListeners& ls = ::testing::UnitTest::GetInstance()->listeners();
    delete ls.Release(ls.default_result_printer());
    ls.Append(new RankFailurePrinter(rank));
  }
  int rc = RUN_ALL_TESTS();
  fc::mpi_finalize();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) {
    std::fprintf(stderr, "rank %d: the library finalized MPI it did not start\n", rank);
    return 1;
  }
  MPI_Barrier(MPI_COMM_WORLD);  // MPI still works after the library let go of it
  MPI_Finalize();
  return rc;
}
