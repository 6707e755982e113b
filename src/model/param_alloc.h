// Layer parameter storage, described once per layer kind: the same description allocates a
// block's weights, its zero-filled gradient structs, and counts the elements the memory model
// charges for them (counting mode allocates nothing).
#pragma once

#include <cstdint>

#include "foldcube/config.h"
#include "model/block_table.h"

namespace fc {

struct ParamAlloc {
  // AF3 (Boltz) tables: projections whose bias only AF2's files carry get none (fused storage
  // keeps its zero biases; BlockTable::bias_free).
  bool bias_free = false;
  bool zeros = false;        // zero-filled (AF3 weights before loading, gradient sums)
  int64_t* count = nullptr;  // counting mode: adds the elements to *count, allocates nothing
};

// Allocates (or counts) the parameters of layer l inside `block`, the table's weight struct;
// in counting mode `block` may be a scratch struct of the right type (layer_param_elems).
void allocate_layer(const ParamAlloc& a, const EvoformerConfig& cfg, const LayerDesc& l,
                    void* block);
// Every layer of table t inside `block` (the table's weight struct), in table order.
void allocate_table(const ParamAlloc& a, const EvoformerConfig& cfg, const BlockTable& t,
                    void* block);

// Elements of layer l's parameters (also its gradient struct's).
int64_t layer_param_elems(const EvoformerConfig& cfg, const LayerDesc& l, bool bias_free);
// Elements of one block's parameters of table t.
int64_t table_param_elems(const EvoformerConfig& cfg, const BlockTable& t);

}  // namespace fc
