// Inference triangle multiplication over channel groups (src/layers/triangle_multiplication.cc):
// the output does not depend on the group size nor on whether LN_in(z) is kept whole or recomputed
// per group, bit for bit; smaller groups lower the tracked peak, which the stated workspace matches
// exactly.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "foldcube/memory.h"
#include "model/common.h"
#include "test_util.h"

namespace fc {
namespace {

// Runs one triangle multiplication on a fixed random problem with the given chunk (which sets
// both the row chunk and the channel group: c_t = 32 channels in groups of `chunk`, or all 32
// at once when chunk = 0). target > 0 replaces the automatic chunk target; a tiny one makes the
// groups recompute LN_in(z) (and, with chunk = 0, gives groups of one channel). Returns the updated
// z; *peak receives the module's tracked workspace.
Tensor run_tri_mul(bool outgoing, int64_t chunk, int64_t target, int64_t* peak) {
  EvoformerConfig cfg;
  cfg.c_z = 16, cfg.c_hidden_mul = 32, cfg.no_blocks = 1;
  const int64_t s = 3, r = 23;
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1.5f, 1.5f);
  std::bernoulli_distribution zero(0.2);
  Tensor m = Tensor::full({s, r, cfg.c_m}, 0.f);
  Tensor z = Tensor::empty({r, r, cfg.c_z});
  for (int64_t i = 0; i < z.numel(); ++i) z.f32()[i] = u(rng);
  Tensor pair_mask = Tensor::empty({r, r});
  for (int64_t i = 0; i < pair_mask.numel(); ++i) pair_mask.f32()[i] = zero(rng) ? 0.f : 1.f;
  StackInputs in;
  const Status st = prepare_inputs(cfg, m, z, Tensor(), pair_mask, &in);
  EXPECT_TRUE(st.ok()) << st.ToString();
  BlockContext ctx = make_context(cfg, in, chunk);
  if (target > 0) ctx.chunk_target_bytes = target;
  BlockWeights w;
  allocate_block(cfg, &w);
  for (auto& [name, t] : named_params(w, block_prefix(0))) random_fill(name, t, 5);
  const TriangleMultiplicationW& tw = outgoing ? w.tri_mul_out : w.tri_mul_in;
  MemoryScope scope;
  triangle_multiplication(tw, ctx, outgoing, z.f32());
  *peak = scope.peak() - scope.start_live();
  EXPECT_EQ(*peak, module_workspace_bytes(outgoing ? "tri_mul_out" : "tri_mul_in", ctx));
  return z;
}

TEST(TriMulGroups, BitIdenticalAcrossGroupSizes) {
  struct Case {
    int64_t chunk, target;
  };
  for (bool outgoing : {true, false}) {
    int64_t peak0 = 0, peak = 0;
    const Tensor ref = run_tri_mul(outgoing, 0, 0, &peak0);  // one group of all 32 channels
    // Forced groups of 1, 5, 31 (+1), LN_in(z) kept; forced groups of 5 recomputing it;
    // automatic groups of 1 (recomputing) and of 16 (9 rounded to 16, kept).
    for (const Case c :
         {Case{1, 0}, Case{5, 0}, Case{31, 0}, Case{5, 1}, Case{0, 1}, Case{0, 40000}}) {
      const Tensor z = run_tri_mul(outgoing, c.chunk, c.target, &peak);
      EXPECT_TRUE(test::all_finite(z));
      EXPECT_EQ(std::memcmp(z.f32(), ref.f32(), z.nbytes()), 0)
          << (outgoing ? "outgoing" : "incoming") << " chunk " << c.chunk << " target " << c.target;
      EXPECT_LT(peak, peak0) << "chunk " << c.chunk << " target " << c.target;
    }
  }
}

}  // namespace
}  // namespace fc
