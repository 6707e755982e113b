// Block tables: each block type described ONCE as data — its layers in order, the stream each
// updates and what it reads, its dropout, its chunk axis and where its parameters live. Forward
// (Evoformer, ExtraMSA), training (policies, saved inputs, dropout), the memory model, the
// inference plan and chunking reports iterate a table; nothing else spells a block's layer order.
//
// A new block type is a new table (plus, where it needs them, new layer kinds): see
// docs/architecture.md, "Block tables", with the ExtraMSA block as the example.
#pragma once

#include <cstdint>
#include <vector>

#include "model/modules.h"
#include "model/weights.h"

namespace fc {

// The streams of a trunk block.
enum class Stream : uint8_t { kNone, kM, kZ };

// What a layer computes; each kind is one unit in src/model (forward, training forward,
// backward, workspace formula, chunk loops).
enum class LayerKind : uint8_t {
  kMsaRowAttention,           // m += GatedAttention(LN(m)) over residues, pair bias from z
  kMsaColumnAttention,        // m += GatedAttention(LN(m)) over sequences
  kMsaColumnGlobalAttention,  // m += GlobalAttention(LN(m)) over sequences (ExtraMSA)
  kTransition,                // x += Linear(relu(Linear(LN(x))))
  kMaskedTransition,          // m += Transition(m) * msa_mask (ExtraMSA)
  kOuterProductMean,          // z += OuterProductMean(m, msa_mask)
  kTriangleMultiplication,    // z += TriMul(z, pair_mask); transposed = incoming
  kTriangleAttention,         // z += TriAtt(z, pair_mask); transposed = ending node
  kSwiGluTransition,          // x += fc3(silu(fc1(LN(x))) * fc2(LN(x))) (AF3, src/layers/)
};
constexpr int kLayerKinds = 9;

// Training-mode dropout of a layer's update (OpenFold DropoutRowwise / DropoutColumnwise).
enum class DropoutRate : uint8_t { kNone, kMsa, kPair };  // cfg.msa_dropout / cfg.pair_dropout
enum class DropoutShare : uint8_t {
  kNone,
  kRows,     // one mask over (columns, channels), shared by every row of the stream
  kColumns,  // one mask over (rows, channels), shared by every column
  // Boltz (AF3): one draw per row (per column), shared over that row's (column's) elements.
  kPerRow,
  kPerColumn,
};

// The batch-like axis a layer's main chunk loop runs over.
enum class ChunkAxis : uint8_t {
  kMsaRows,        // s
  kMsaColumns,     // r
  kMsaPositions,   // s*r
  kPairRows,       // r (rows i of z)
  kPairColumns,    // r (columns j of z)
  kPairPositions,  // r*r
};

struct LayerDesc {
  const char* name;  // golden trace name (metadata module_order)
  LayerKind kind;
  Stream updates;      // the stream the layer adds its update to
  Stream reads;        // the other stream it reads (kNone: only its own)
  bool transposed;     // incoming (triangle multiplication), ending node (triangle attention)
  DropoutRate rate;    // training-mode dropout of the update
  DropoutShare share;  // ... and the axis its mask is shared along
  ChunkAxis chunk;
  // The layer's parameters inside the block's weight struct (the struct of the table's block
  // type; the kind says the parameter type: see layer_params).
  const void* (*params)(const void* block);
  // The stream it updates is a single representation (AF3's s [n, c_s], the m stream of a one-row
  // MSA): DAP shards it by tokens, and its attention runs with the shard's tokens as the queries.
  bool single = false;
  // Bias-only logits (AF3 pair-weighted averaging: no query / key projection; the weights say the
  // same, GatedAttentionW::bias_logits): the cost model counts no q.k work.
  bool bias_logits = false;
};

struct BlockTable {
  const char* name;  // "evoformer", "extra_msa", "pairformer", "msa_module"
  const LayerDesc* layers;
  int count;
  // AF3 (Boltz) parameters: the projections have no bias (except the fused storage's zero biases
  // and the ones Boltz has); the memory model counts the gradient structs accordingly.
  bool bias_free = false;
  const LayerDesc* begin() const { return layers; }
  const LayerDesc* end() const { return layers + count; }
};

// OpenFold EvoformerBlock (AF2 monomer order, opm_first = false); weights: BlockWeights.
extern const BlockTable kEvoformerBlock;
// OpenFold ExtraMSABlock; weights: ExtraMsaBlockWeights.
extern const BlockTable kExtraMsaBlock;
// AF2 template pair stack block: pair layers only, attention first; weights: BlockWeights (the
// MSA layers' part unused), m not read (nullptr).
extern const BlockTable kTemplatePairBlock;
// Boltz-2 PairformerLayer (AF3 Pairformer block); weights: PairformerBlockWeights. The single
// stream s [n, c_s] is the table's m stream with s = 1 (a one-row MSA, c_m = c_s), so the single
// attention with pair bias is the MSA row attention unit.
extern const BlockTable kPairformerBlock;
// Boltz-2 MSALayer (AF3 MSA-module block, Boltz's order: PWA, MSA transition, OPM, pair stack);
// weights: MsaModuleBlockWeights. Pair-weighted averaging is the row attention unit with zero
// query/key projections.
extern const BlockTable kMsaModuleBlock;

// The layer named `name` in `table`, or nullptr.
const LayerDesc* find_layer(const BlockTable& table, const char* name);

// The layer's parameters of the kind's type (T must match l.kind; checked).
template <typename T>
const T& layer_params(const LayerDesc& l, const void* block);
template <typename T>
T& layer_params(const LayerDesc& l, void* block) {
  return const_cast<T&>(layer_params<T>(l, static_cast<const void*>(block)));
}

// Rows and channels of a stream viewed as [rows, c]: m [s*r, c_m], z [r*r, c_z].
int64_t stream_rows(const BlockContext& ctx, Stream st);
int64_t stream_channels(const BlockContext& ctx, Stream st);

// The stream inputs a layer's backward reads, as copies taken before the layer runs (training
// policies none and module): the stream it updates, unless its backward does not read it (the
// OPM reads only m), and the stream it reads when a later layer of the block updates it. A read
// stream that no later layer updates is the block's output (m for the Evoformer's OPM, z for the
// Pairformer's single attention), which the training driver keeps as the next block's input.
struct SavedInputs {
  bool updated = false, read = false;
};
SavedInputs saved_inputs(const BlockTable& t, int i);
// The layer whose saved copy of stream x is the block's input x (the first copy in layer order),
// or -1 when no layer keeps one.
int block_input_layer(const BlockTable& t, Stream x);
// True when a layer reads stream x after the block's last update of x (its backward reads the
// block's output x).
bool reads_block_output(const BlockTable& t, Stream x);
// block_input_layer(t, Stream::kM), checked to exist.
int block_input_m_layer(const BlockTable& t);

// ---- Per-layer dispatch (inference) ------------------------------------------------------------
// Runs the layer on the streams m [s, r, c_m], z [r, r, c_z]; `block` is the table's weight struct.
void layer_forward(const LayerDesc& l, const void* block, const BlockContext& ctx, float* m,
                   float* z);
// Peak bytes the layer allocates on top of the streams (checked against the allocator).
int64_t layer_workspace_bytes(const LayerDesc& l, const BlockContext& ctx);
// The chunk loops the layer runs at this context (the formulas its code uses).
std::vector<ChunkLoop> layer_chunking(const LayerDesc& l, const BlockContext& ctx);

}  // namespace fc
