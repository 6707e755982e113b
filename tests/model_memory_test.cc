// The inference memory model: each module's stated workspace equals what the tracking allocator
// sees (fused and unfused paths, f32 and bf16 GEMM inputs), and a whole block stays within the
// issue's bound of 6 x bytes(m + z).
#include <gtest/gtest.h>

#include <map>
#include <optional>
#include <string>

#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/runtime.h"
#include "model/modules.h"

namespace fc {
namespace {

EvoformerConfig small_af2_like() {
  EvoformerConfig cfg;  // AF2 widths, fewer channels where it keeps the test fast
  cfg.c_m = 64;
  cfg.c_z = 32;
  cfg.c_hidden_msa_att = 8;
  cfg.c_hidden_pair_att = 8;
  cfg.c_hidden_opm = 8;
  cfg.c_hidden_mul = 32;
  cfg.c_s = 48;
  cfg.no_blocks = 2;
  return cfg;
}

struct MemCase {
  int64_t s, r, chunk;
};

std::string MemName(const MemCase& c) {
  return "s" + std::to_string(c.s) + "_r" + std::to_string(c.r) + "_chunk" +
         std::to_string(c.chunk);
}
// Test parameters print as their readable name (gtest would print the raw struct bytes).
void PrintTo(const MemCase& p, std::ostream* os) { *os << MemName(p); }

class ModuleMemory : public ::testing::TestWithParam<MemCase> {};

TEST_P(ModuleMemory, WorkspaceMatchesTrackedPeak) {
  const MemCase mc = GetParam();
  const EvoformerConfig cfg = small_af2_like();
  EvoformerStack stack = EvoformerStack::random(cfg, 3);
  Tensor m = Tensor::full({mc.s, mc.r, cfg.c_m}, 0.1f);
  Tensor z = Tensor::full({mc.r, mc.r, cfg.c_z}, 0.2f);

  struct Mode {
    bool fused;
    DType dtype;
  };
  for (const Mode mode :
       {Mode{true, DType::F32}, Mode{false, DType::F32}, Mode{true, DType::BF16}}) {
    const bool fused = mode.fused;
    BlockContext ctx;
    ctx.cfg = &cfg;
    ctx.s = mc.s;
    ctx.r = mc.r;
    ctx.chunk = mc.chunk;
    ctx.chunk_target_bytes = default_chunk_target_bytes(cfg, mc.s, mc.r);
    ctx.threads = num_threads();
    ctx.fused = fused;
    ctx.dtype = mode.dtype;

    // Block 1 modules are measured between trace callbacks (block 0's first module would also
    // see the per-forward mask buffers).
    std::map<std::string, int64_t> measured;
    std::optional<MemoryScope> scope;
    ForwardOptions opts;
    opts.chunk = mc.chunk;
    opts.fused = fused;
    opts.dtype = mode.dtype;
    opts.trace = [&](int block, const std::string& module, const std::string&, const Tensor&) {
      if (block == 1) measured[module] = scope->peak() - scope->start_live();
      scope.reset();
      scope.emplace();
    };
    scope.emplace();
    ASSERT_TRUE(stack.forward(m, z, Tensor(), Tensor(), nullptr, opts).ok());
    scope.reset();
    ASSERT_EQ(measured.size(), 9u);
    for (const auto& [module, bytes] : measured)
      EXPECT_EQ(bytes, module_workspace_bytes(module.c_str(), ctx))
          << module << (fused ? " fused " : " unfused ") << dtype_name(mode.dtype);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, ModuleMemory,
                         ::testing::Values(MemCase{8, 12, 0}, MemCase{16, 40, 0}, MemCase{5, 33, 3},
                                           MemCase{16, 40, 1}, MemCase{6, 20, 5},
                                           MemCase{6, 20, 31}, MemCase{4, 160, 0}),
                         [](const auto& info) { return MemName(info.param); });

// Issue bound: a block's inference peak (above weights and inputs) <= 6 x bytes(m + z), at AF2
// dimensions on a shape small enough for the default suite.
TEST(BlockMemory, PeakWithinSixTimesStreams) {
  EvoformerConfig cfg;
  cfg.no_blocks = 1;
  EvoformerStack stack = EvoformerStack::random(cfg, 5);
  const int64_t s = 32, r = 64;
  Tensor m = Tensor::full({s, r, cfg.c_m}, 0.1f);
  Tensor z = Tensor::full({r, r, cfg.c_z}, 0.2f);
  const int64_t mz = static_cast<int64_t>(m.nbytes() + z.nbytes());
  MemoryScope scope;
  Tensor s_out;
  ASSERT_TRUE(stack.forward(m, z, Tensor(), Tensor(), &s_out, {}).ok());
  EXPECT_LE(scope.peak() - scope.start_live() + mz, 6 * mz);
}

}  // namespace
}  // namespace fc
