// Per-layer partition choices of a sharded stack (docs/planner.md, "Per-layer partitioning"):
// each layer of a block runs over the N ranks of a DAP group in one of four ways.
//   dap        the DAP axis (docs/dap.md): each rank holds 1/N of m and z (sequences, residues,
//              pair rows) and the layer runs on its shard.
//   heads      attention layers: each rank holds the whole stream(s) the layer uses and computes
//              its 1/N of the heads; the partial output projections are summed (all-reduce).
//   channels   transitions: column-parallel first linear (1/N of the hidden channels per rank),
//              row-parallel second linear, partial outputs summed (all-reduce); triangle
//              multiplication: 1/N of the c_t channels of a, b, the products and LN_out (its
//              statistics all-reduced), row-parallel linear_z; outer product mean: 1/N of a's
//              channels (b whole), row-parallel linear_out.
//   replicated every rank runs the whole layer on the whole stream(s) (no communication).
// The executor inserts the layout changes between layers (all-gather to whole streams, a local
// slice back to a shard, all-to-alls between DAP layouts) from the per-layer list.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "foldcube/status.h"

namespace fc {

enum class Split : uint8_t { kDap, kHeads, kChannels, kReplicated };
constexpr int kSplits = 4;

const char* split_name(Split s);  // "dap" | "heads" | "channels" | "replicated"
Status parse_split(const std::string& name, Split* out);

// One layer's choice: the layer's golden trace name (block table) and its split.
struct LayerSplit {
  std::string layer;
  Split split = Split::kDap;
  bool operator==(const LayerSplit& o) const { return layer == o.layer && split == o.split; }
};
// One list per block (layers not listed use dap); empty: pure DAP everywhere. A single list
// applies to every block.
using StackPartition = std::vector<std::vector<LayerSplit>>;

}  // namespace fc
