#include "model/block_table.h"

#include <cstring>

#include "foldcube/status.h"
#include "layers/swiglu_transition.h"
#include "model/af3_weights.h"

namespace fc {

namespace {
using K = LayerKind;
using S = Stream;
using R = DropoutRate;
using D = DropoutShare;
using A = ChunkAxis;

// Parameter accessors: the field `f` of the block weight struct `W`.
#define FC_PARAMS(W, f) [](const void* b) -> const void* { return &static_cast<const W*>(b)->f; }

// The AF2 Evoformer block. This is the one place that states its layer order.
constexpr LayerDesc kEvoformerLayers[] = {
    {"msa_att_row", K::kMsaRowAttention, S::kM, S::kZ, false, R::kMsa, D::kRows, A::kMsaRows,
     FC_PARAMS(BlockWeights, msa_att_row)},
    {"msa_att_col", K::kMsaColumnAttention, S::kM, S::kNone, false, R::kNone, D::kNone,
     A::kMsaColumns, FC_PARAMS(BlockWeights, msa_att_col)},
    {"msa_transition", K::kTransition, S::kM, S::kNone, false, R::kNone, D::kNone, A::kMsaPositions,
     FC_PARAMS(BlockWeights, msa_transition)},
    {"outer_product_mean", K::kOuterProductMean, S::kZ, S::kM, false, R::kNone, D::kNone,
     A::kPairRows, FC_PARAMS(BlockWeights, outer_product_mean)},
    {"tri_mul_out", K::kTriangleMultiplication, S::kZ, S::kNone, false, R::kPair, D::kRows,
     A::kPairRows, FC_PARAMS(BlockWeights, tri_mul_out)},
    {"tri_mul_in", K::kTriangleMultiplication, S::kZ, S::kNone, true, R::kPair, D::kRows,
     A::kPairRows, FC_PARAMS(BlockWeights, tri_mul_in)},
    {"tri_att_start", K::kTriangleAttention, S::kZ, S::kNone, false, R::kPair, D::kRows,
     A::kPairRows, FC_PARAMS(BlockWeights, tri_att_start)},
    {"tri_att_end", K::kTriangleAttention, S::kZ, S::kNone, true, R::kPair, D::kColumns,
     A::kPairColumns, FC_PARAMS(BlockWeights, tri_att_end)},
    {"pair_transition", K::kTransition, S::kZ, S::kNone, false, R::kNone, D::kNone,
     A::kPairPositions, FC_PARAMS(BlockWeights, pair_transition)},
};

// The ExtraMSA block: the Evoformer order with global column attention and a masked MSA
// transition. Its dropout is OpenFold's: rowwise on the row attention, none on the global one.
constexpr LayerDesc kExtraMsaLayers[] = {
    {"msa_att_row", K::kMsaRowAttention, S::kM, S::kZ, false, R::kMsa, D::kRows, A::kMsaRows,
     FC_PARAMS(ExtraMsaBlockWeights, msa_att_row)},
    {"msa_att_col", K::kMsaColumnGlobalAttention, S::kM, S::kNone, false, R::kNone, D::kNone,
     A::kMsaColumns, FC_PARAMS(ExtraMsaBlockWeights, msa_att_col)},
    {"msa_transition", K::kMaskedTransition, S::kM, S::kNone, false, R::kNone, D::kNone,
     A::kMsaPositions, FC_PARAMS(ExtraMsaBlockWeights, msa_transition)},
    {"outer_product_mean", K::kOuterProductMean, S::kZ, S::kM, false, R::kNone, D::kNone,
     A::kPairRows, FC_PARAMS(ExtraMsaBlockWeights, outer_product_mean)},
    {"tri_mul_out", K::kTriangleMultiplication, S::kZ, S::kNone, false, R::kPair, D::kRows,
     A::kPairRows, FC_PARAMS(ExtraMsaBlockWeights, tri_mul_out)},
    {"tri_mul_in", K::kTriangleMultiplication, S::kZ, S::kNone, true, R::kPair, D::kRows,
     A::kPairRows, FC_PARAMS(ExtraMsaBlockWeights, tri_mul_in)},
    {"tri_att_start", K::kTriangleAttention, S::kZ, S::kNone, false, R::kPair, D::kRows,
     A::kPairRows, FC_PARAMS(ExtraMsaBlockWeights, tri_att_start)},
    {"tri_att_end", K::kTriangleAttention, S::kZ, S::kNone, true, R::kPair, D::kColumns,
     A::kPairColumns, FC_PARAMS(ExtraMsaBlockWeights, tri_att_end)},
    {"pair_transition", K::kTransition, S::kZ, S::kNone, false, R::kNone, D::kNone,
     A::kPairPositions, FC_PARAMS(ExtraMsaBlockWeights, pair_transition)},
};
// The AF2 template pair block (OpenFold TemplatePairStackBlock): the pair layers in the template
// order, attention first; weights: BlockWeights (its MSA layers unused).
constexpr LayerDesc kTemplatePairLayers[] = {
    {"tri_att_start", K::kTriangleAttention, S::kZ, S::kNone, false, R::kPair, D::kRows,
     A::kPairRows, FC_PARAMS(BlockWeights, tri_att_start)},
    {"tri_att_end", K::kTriangleAttention, S::kZ, S::kNone, true, R::kPair, D::kColumns,
     A::kPairColumns, FC_PARAMS(BlockWeights, tri_att_end)},
    {"tri_mul_out", K::kTriangleMultiplication, S::kZ, S::kNone, false, R::kPair, D::kRows,
     A::kPairRows, FC_PARAMS(BlockWeights, tri_mul_out)},
    {"tri_mul_in", K::kTriangleMultiplication, S::kZ, S::kNone, true, R::kPair, D::kRows,
     A::kPairRows, FC_PARAMS(BlockWeights, tri_mul_in)},
    {"pair_transition", K::kTransition, S::kZ, S::kNone, false, R::kNone, D::kNone,
     A::kPairPositions, FC_PARAMS(BlockWeights, pair_transition)},
};
// The Boltz-2 Pairformer block: the pair stack first, then the single stream (which reads the
// updated z). Dropout as Boltz applies it in training.
constexpr LayerDesc kPairformerLayers[] = {
    {"tri_mul_out", K::kTriangleMultiplication, S::kZ, S::kNone, false, R::kPair, D::kPerRow,
     A::kPairRows, FC_PARAMS(PairformerBlockWeights, tri_mul_out)},
    {"tri_mul_in", K::kTriangleMultiplication, S::kZ, S::kNone, true, R::kPair, D::kPerRow,
     A::kPairRows, FC_PARAMS(PairformerBlockWeights, tri_mul_in)},
    {"tri_att_start", K::kTriangleAttention, S::kZ, S::kNone, false, R::kPair, D::kPerRow,
     A::kPairRows, FC_PARAMS(PairformerBlockWeights, tri_att_start)},
    {"tri_att_end", K::kTriangleAttention, S::kZ, S::kNone, true, R::kPair, D::kPerColumn,
     A::kPairColumns, FC_PARAMS(PairformerBlockWeights, tri_att_end)},
    {"transition_z", K::kSwiGluTransition, S::kZ, S::kNone, false, R::kNone, D::kNone,
     A::kPairPositions, FC_PARAMS(PairformerBlockWeights, transition_z)},
    {"attention", K::kMsaRowAttention, S::kM, S::kZ, false, R::kNone, D::kNone, A::kMsaRows,
     FC_PARAMS(PairformerBlockWeights, attention), true},
    {"transition_s", K::kSwiGluTransition, S::kM, S::kNone, false, R::kNone, D::kNone,
     A::kMsaPositions, FC_PARAMS(PairformerBlockWeights, transition_s), true},
};
// The Boltz-2 MSA-module block (differs from AF3 Algorithm 8, which runs the OPM first).
constexpr LayerDesc kMsaModuleLayers[] = {
    {"pair_weighted_averaging", K::kMsaRowAttention, S::kM, S::kZ, false, R::kMsa, D::kPerRow,
     A::kMsaRows, FC_PARAMS(MsaModuleBlockWeights, pair_weighted_averaging), false, true},
    {"msa_transition", K::kSwiGluTransition, S::kM, S::kNone, false, R::kNone, D::kNone,
     A::kMsaPositions, FC_PARAMS(MsaModuleBlockWeights, msa_transition)},
    {"outer_product_mean", K::kOuterProductMean, S::kZ, S::kM, false, R::kNone, D::kNone,
     A::kPairRows, FC_PARAMS(MsaModuleBlockWeights, outer_product_mean)},
    {"tri_mul_out", K::kTriangleMultiplication, S::kZ, S::kNone, false, R::kPair, D::kPerRow,
     A::kPairRows, FC_PARAMS(MsaModuleBlockWeights, tri_mul_out)},
    {"tri_mul_in", K::kTriangleMultiplication, S::kZ, S::kNone, true, R::kPair, D::kPerRow,
     A::kPairRows, FC_PARAMS(MsaModuleBlockWeights, tri_mul_in)},
    {"tri_att_start", K::kTriangleAttention, S::kZ, S::kNone, false, R::kPair, D::kPerRow,
     A::kPairRows, FC_PARAMS(MsaModuleBlockWeights, tri_att_start)},
    {"tri_att_end", K::kTriangleAttention, S::kZ, S::kNone, true, R::kPair, D::kPerColumn,
     A::kPairColumns, FC_PARAMS(MsaModuleBlockWeights, tri_att_end)},
    {"transition_z", K::kSwiGluTransition, S::kZ, S::kNone, false, R::kNone, D::kNone,
     A::kPairPositions, FC_PARAMS(MsaModuleBlockWeights, transition_z)},
};
#undef FC_PARAMS

template <typename T, size_t N>
constexpr int count_of(const T (&)[N]) {
  return static_cast<int>(N);
}
}  // namespace

const BlockTable kEvoformerBlock = {"evoformer", kEvoformerLayers, count_of(kEvoformerLayers)};
const BlockTable kExtraMsaBlock = {"extra_msa", kExtraMsaLayers, count_of(kExtraMsaLayers)};
const BlockTable kTemplatePairBlock = {"template_pair", kTemplatePairLayers,
                                       count_of(kTemplatePairLayers)};
const BlockTable kPairformerBlock = {"pairformer", kPairformerLayers, count_of(kPairformerLayers),
                                     true};
const BlockTable kMsaModuleBlock = {"msa_module", kMsaModuleLayers, count_of(kMsaModuleLayers),
                                    true};

const LayerDesc* find_layer(const BlockTable& table, const char* name) {
  for (const LayerDesc& l : table)
    if (std::strcmp(l.name, name) == 0) return &l;
  return nullptr;
}

#define FC_LAYER_PARAMS(T, cond)                                                   \
  template <>                                                                      \
  const T& layer_params<T>(const LayerDesc& l, const void* block) {                \
    FC_CHECK_MSG(cond, std::string("layer ") + l.name + " has no " #T " weights"); \
    return *static_cast<const T*>(l.params(block));                                \
  }
FC_LAYER_PARAMS(MsaRowAttentionW, l.kind == K::kMsaRowAttention)
FC_LAYER_PARAMS(MsaColumnAttentionW, l.kind == K::kMsaColumnAttention)
FC_LAYER_PARAMS(MsaColumnGlobalAttentionW, l.kind == K::kMsaColumnGlobalAttention)
FC_LAYER_PARAMS(TransitionW, l.kind == K::kTransition || l.kind == K::kMaskedTransition)
FC_LAYER_PARAMS(OuterProductMeanW, l.kind == K::kOuterProductMean)
FC_LAYER_PARAMS(TriangleMultiplicationW, l.kind == K::kTriangleMultiplication)
FC_LAYER_PARAMS(TriangleAttentionW, l.kind == K::kTriangleAttention)
FC_LAYER_PARAMS(SwiGluTransitionW, l.kind == K::kSwiGluTransition)
#undef FC_LAYER_PARAMS

int64_t stream_rows(const BlockContext& ctx, Stream st) {
  return st == Stream::kM ? ctx.s * ctx.r : ctx.r * ctx.r;
}

int64_t stream_channels(const BlockContext& ctx, Stream st) {
  return st == Stream::kM ? ctx.cfg->c_m : ctx.cfg->c_z;
}

SavedInputs saved_inputs(const BlockTable& t, int i) {
  const LayerDesc& l = t.layers[i];
  SavedInputs in;
  in.updated = l.kind != LayerKind::kOuterProductMean;
  if (l.reads != Stream::kNone)
    for (int j = i + 1; j < t.count; ++j) in.read = in.read || t.layers[j].updates == l.reads;
  return in;
}

int block_input_layer(const BlockTable& t, Stream x) {
  for (int i = 0; i < t.count; ++i) {
    const SavedInputs in = saved_inputs(t, i);
    if ((in.updated && t.layers[i].updates == x) || (in.read && t.layers[i].reads == x)) return i;
  }
  return -1;
}

bool reads_block_output(const BlockTable& t, Stream x) {
  for (int i = 0; i < t.count; ++i)
    if (t.layers[i].reads == x && !saved_inputs(t, i).read) return true;
  return false;
}

int block_input_m_layer(const BlockTable& t) {
  const int i = block_input_layer(t, Stream::kM);
  FC_CHECK_MSG(i >= 0, std::string(t.name) + ": no layer keeps the block's input m");
  return i;
}

void layer_forward(const LayerDesc& l, const void* block, const BlockContext& ctx, float* m,
                   float* z) {
  float* x = l.updates == Stream::kM ? m : z;
  switch (l.kind) {
    case K::kMsaRowAttention:
      return msa_row_attention(layer_params<MsaRowAttentionW>(l, block), ctx, m, z);
    case K::kMsaColumnAttention:
      return msa_column_attention(layer_params<MsaColumnAttentionW>(l, block), ctx, m);
    case K::kMsaColumnGlobalAttention:
      return msa_column_global_attention(layer_params<MsaColumnGlobalAttentionW>(l, block), ctx,
                                         ctx.global_eps, m);
    case K::kTransition:
      return transition(layer_params<TransitionW>(l, block), ctx, x, stream_rows(ctx, l.updates),
                        stream_channels(ctx, l.updates));
    case K::kMaskedTransition:
      return masked_msa_transition(layer_params<TransitionW>(l, block), ctx, m);
    case K::kOuterProductMean:
      return outer_product_mean(layer_params<OuterProductMeanW>(l, block), ctx, m, z);
    case K::kTriangleMultiplication:
      return triangle_multiplication(layer_params<TriangleMultiplicationW>(l, block), ctx,
                                     !l.transposed, z);
    case K::kTriangleAttention:
      return triangle_attention(layer_params<TriangleAttentionW>(l, block), ctx, l.transposed, z);
    case K::kSwiGluTransition:
      return swiglu_transition(layer_params<SwiGluTransitionW>(l, block), ctx, x,
                               stream_rows(ctx, l.updates), stream_channels(ctx, l.updates));
  }
}

}  // namespace fc
