// The per-layer dispatch of the inference path's workspace formulas and chunk reports over the
// block tables (the formulas are the layer units', src/layers/).
#include "model/modules.h"

#include <string>

#include "foldcube/status.h"
#include "layers/swiglu_transition.h"
#include "model/block_table.h"

namespace fc {

int64_t layer_workspace_bytes(const LayerDesc& l, const BlockContext& ctx) {
  const int64_t r = ctx.r;
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
      return msa_row_attention_bytes(ctx);
    case LayerKind::kMsaColumnAttention:
      return msa_column_attention_bytes(ctx);
    case LayerKind::kMsaColumnGlobalAttention:
      return msa_column_global_attention_bytes(ctx);
    case LayerKind::kTriangleAttention:
      return triangle_attention_bytes(ctx);
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition: {
      const int64_t c = stream_channels(ctx, l.updates);
      return transition_bytes(ctx, stream_rows(ctx, l.updates), c, ctx.cfg->transition_n * c);
    }
    case LayerKind::kSwiGluTransition: {
      const int64_t c = stream_channels(ctx, l.updates);
      return swiglu_transition_bytes(ctx, stream_rows(ctx, l.updates), c,
                                     ctx.cfg->transition_n * c);
    }
    case LayerKind::kOuterProductMean:
      return outer_product_mean_shard_bytes(ctx, r, 1);
    case LayerKind::kTriangleMultiplication:
      return triangle_multiplication_shard_bytes(ctx, r, 1);
  }
  return 0;
}

namespace {
// The layer module_workspace_bytes / module_chunking mean by `module`: an Evoformer layer by its
// trace name, or "msa_att_col_global" for the ExtraMSA column attention.
const LayerDesc& module_layer(const char* module) {
  const bool global = std::string(module) == "msa_att_col_global";
  const LayerDesc* l =
      global ? find_layer(kExtraMsaBlock, "msa_att_col") : find_layer(kEvoformerBlock, module);
  FC_CHECK_MSG(l != nullptr, std::string("unknown module ") + module);
  return *l;
}
}  // namespace

int64_t module_workspace_bytes(const char* module, const BlockContext& ctx) {
  return layer_workspace_bytes(module_layer(module), ctx);
}

namespace {
const char* chunk_axis_name(ChunkAxis a) {
  switch (a) {
    case ChunkAxis::kMsaRows:
      return "s (MSA rows)";
    case ChunkAxis::kMsaColumns:
      return "r (MSA columns)";
    case ChunkAxis::kMsaPositions:
      return "s*r (MSA positions)";
    case ChunkAxis::kPairRows:
      return "r (pair rows)";
    case ChunkAxis::kPairColumns:
      return "r (pair columns)";
    case ChunkAxis::kPairPositions:
      return "r*r (pair positions)";
  }
  return "?";
}
}  // namespace

std::vector<ChunkLoop> layer_chunking(const LayerDesc& l, const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, cm = cfg.c_m, cz = cfg.c_z;
  const int64_t bias_rows = pair_bias_chunk(ctx, r);  // pair_bias_heads
  const char* axis = chunk_axis_name(l.chunk);
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
      return {{"r (pair bias rows)", r, bias_rows},
              {axis, s, attention_chunk(ctx, cfg.no_heads_msa, cfg.c_hidden_msa_att, s, r, cm)}};
    case LayerKind::kMsaColumnAttention:
      return {{axis, r, attention_chunk(ctx, cfg.no_heads_msa, cfg.c_hidden_msa_att, r, s, cm)}};
    case LayerKind::kMsaColumnGlobalAttention:
      return {{axis, r, global_attention_chunk(ctx)}};
    case LayerKind::kTriangleAttention:
      return {{"r (pair bias rows)", r, bias_rows},
              {axis, r, attention_chunk(ctx, cfg.no_heads_pair, cfg.c_hidden_pair_att, r, r, cz)}};
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition: {
      const int64_t c = stream_channels(ctx, l.updates), rows = stream_rows(ctx, l.updates);
      return {{axis, rows, transition_chunk(ctx, rows, c, cfg.transition_n * c)}};
    }
    case LayerKind::kSwiGluTransition: {
      const int64_t c = stream_channels(ctx, l.updates), rows = stream_rows(ctx, l.updates);
      return {{axis, rows, swiglu_transition_chunk(ctx, rows, c, cfg.transition_n * c)}};
    }
    case LayerKind::kOuterProductMean:
      return {{"s (MSA rows, projections)", s, opm_projection_chunk(ctx, r)},
              {"r (pair rows, outer product)", r, opm_outer_chunk(ctx, r)}};
    case LayerKind::kTriangleMultiplication: {
      const TriMulPhase1 p = tri_mul_phase1(ctx, r, 1);
      return {{"c_t (channel groups)", cfg.c_hidden_mul, p.cg},
              {"r (pair rows, projections)", r, p.ch},
              {"r (pair rows, output)", r, tri_mul_output_chunk(ctx, r)}};
    }
  }
  return {};
}

std::vector<ChunkLoop> module_chunking(const char* module, const BlockContext& ctx) {
  return layer_chunking(module_layer(module), ctx);
}

}  // namespace fc
