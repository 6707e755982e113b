// The table-driven DAP communication volume (dap_table_volume, src/exec/af3_dap.h): for the
// Evoformer block it is the docs/dap.md formula (dap_block_volume); for the Pairformer the single
// stream never changes layout (4 all-to-alls, all of z). The counted bytes of real runs equal it
// (tests/dap_af3_cli_test.cc).
#include <gtest/gtest.h>

#include "exec/af3_dap.h"
#include "foldcube/af3.h"
#include "model/block_table.h"

namespace fc {
namespace {

TEST(DapTableVolume, EvoformerEqualsTheFormula) {
  EvoformerConfig cfg;
  for (int n : {2, 3, 4})
    for (const auto& [s, r] : {std::pair<int64_t, int64_t>{5, 7}, {128, 256}}) {
      const DapLayout l = dap_layout(s, r, n, 0);
      const DapBlockVolume a = dap_table_volume(kEvoformerBlock, cfg, l);
      const DapBlockVolume b = dap_block_volume(cfg, l);
      EXPECT_EQ(a.all_to_all_bytes, b.all_to_all_bytes) << n << " " << s << " " << r;
      EXPECT_EQ(a.all_gather_bytes, b.all_gather_bytes) << n << " " << s << " " << r;
    }
}

TEST(DapTableVolume, PairformerMovesOnlyZAndGathersLnS) {
  Af3Config a;  // AF3 dims: c_s 384, c_z 128, 4 pair heads
  const EvoformerConfig cfg = af3_trunk_config(a);
  const DapLayout l = dap_layout(1, 256, 2, 0);
  const DapBlockVolume v = dap_table_volume(kPairformerBlock, cfg, l);
  const int64_t rl = 128, rp = 256, F = 4;
  EXPECT_EQ(v.all_to_all_bytes, 4 * rl * rl * cfg.c_z * F);
  EXPECT_EQ(v.all_gather_bytes, (2 * cfg.c_z * rl * rp + 2 * 4 * rl * rp + rl * cfg.c_s) * F);
  // 65.19 MiB per rank and block at n = 256 on 2 ranks (measured: 130.4 MiB for 2 blocks).
  EXPECT_NEAR(v.total() / 1048576.0, 65.19, 0.01);
}

}  // namespace
}  // namespace fc
