// Per-layer partition lists for the DAP tests (tests/dap_partition_test.cc, dap_bf16_test.cc).
#pragma once

#include <string>
#include <vector>

#include "exec/partition.h"
#include "foldcube/partition.h"
#include "foldcube/status.h"
#include "model/block_table.h"

namespace fc::test {

// "heads" | "channels" | "replicated": that split for every layer that has it, dap elsewhere;
// "mixed": a different split per layer, rotated from block to block.
inline StackPartition partition_for(const std::string& policy, int blocks,
                                    const BlockTable& table = kEvoformerBlock) {
  StackPartition p;
  const Split cycle[] = {Split::kHeads, Split::kReplicated, Split::kChannels, Split::kDap};
  for (int b = 0; b < blocks; ++b) {
    std::vector<LayerSplit> list;
    int k = b;
    for (const LayerDesc& ly : table) {
      Split s = Split::kDap;
      if (policy == "mixed") {
        for (int t = 0; t < 4; ++t, ++k)
          if (split_supported(ly, cycle[k % 4])) break;
        s = cycle[k % 4];
        ++k;
      } else {
        Split want = Split::kDap;
        FC_CHECK(parse_split(policy, &want).ok());
        if (split_supported(ly, want)) s = want;
      }
      list.push_back({ly.name, s});
    }
    p.push_back(list);
  }
  return p;
}

}  // namespace fc::test
