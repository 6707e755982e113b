// The parameter-name tables: AlphaFold2 module paths -> OpenFold module prefixes (the mapping of
// OpenFold's import_weights, written here as data from the AF2/OpenFold module structure), leaf
// names per layer kind, and the Boltz module layouts.
#include "io/param_names.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <span>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "io/io_util.h"

namespace fc {
namespace {

// ---- AlphaFold2 -> OpenFold ---------------------------------------------------------------------

// What a row of a module table is: a layer whose leaves follow from its kind, or one array.
enum class Kind : uint8_t {
  kLinear,           // weights, bias
  kLayerNorm,        // scale, offset
  kGatedAttention,   // query_w, key_w, value_w, gating_w, gating_b, output_w, output_b
  kAttention,        // as gated, without gating_* (template pointwise attention)
  kGlobalAttention,  // as gated, key_w/value_w plain Linear weights (one shared head)
  kWeight,           // one array, Linear-transposed (feat_2d_weights)
  kOpmWeight,        // one array, outer product mean output_w
  kParam,            // one array, as it is (output_b, trainable_point_weights)
};

struct Leaf {
  const char* af2;
  const char* openfold;
  Af2Transform transform;
};

using T = Af2Transform;
constexpr Leaf kLinearLeaves[] = {{"weights", "weight", T::kLinear},
                                  {"bias", "bias", T::kIdentity}};
constexpr Leaf kLayerNormLeaves[] = {{"scale", "weight", T::kIdentity},
                                     {"offset", "bias", T::kIdentity}};
constexpr Leaf kGatedAttentionLeaves[] = {
    {"query_w", "linear_q.weight", T::kHeadsIn},  {"key_w", "linear_k.weight", T::kHeadsIn},
    {"value_w", "linear_v.weight", T::kHeadsIn},  {"gating_w", "linear_g.weight", T::kHeadsIn},
    {"gating_b", "linear_g.bias", T::kHeadsBias}, {"output_w", "linear_o.weight", T::kHeadsOut},
    {"output_b", "linear_o.bias", T::kIdentity},
};
constexpr Leaf kAttentionLeaves[] = {
    {"query_w", "linear_q.weight", T::kHeadsIn}, {"key_w", "linear_k.weight", T::kHeadsIn},
    {"value_w", "linear_v.weight", T::kHeadsIn}, {"output_w", "linear_o.weight", T::kHeadsOut},
    {"output_b", "linear_o.bias", T::kIdentity},
};
constexpr Leaf kGlobalAttentionLeaves[] = {
    {"query_w", "linear_q.weight", T::kHeadsIn},  {"key_w", "linear_k.weight", T::kLinear},
    {"value_w", "linear_v.weight", T::kLinear},   {"gating_w", "linear_g.weight", T::kHeadsIn},
    {"gating_b", "linear_g.bias", T::kHeadsBias}, {"output_w", "linear_o.weight", T::kHeadsOut},
    {"output_b", "linear_o.bias", T::kIdentity},
};

std::span<const Leaf> leaves(Kind k) {
  switch (k) {
    case Kind::kLinear:
      return kLinearLeaves;
    case Kind::kLayerNorm:
      return kLayerNormLeaves;
    case Kind::kGatedAttention:
      return kGatedAttentionLeaves;
    case Kind::kAttention:
      return kAttentionLeaves;
    case Kind::kGlobalAttention:
      return kGlobalAttentionLeaves;
    default:
      return {};
  }
}

// One row: AF2 path below the module ("//name" for a single array) -> OpenFold name below the
// module. heads_of (attention rows): the OpenFold parameter whose dim 0 is H, relative to the
// module, or to the enclosing block when it starts with "../"; nullptr: the caller gives H.
struct Row {
  const char* af2;
  const char* openfold;
  Kind kind;
  const char* heads_of = nullptr;
};

struct Module {
  const char* af2;       // AF2 module path below the enclosing prefix
  const char* openfold;  // OpenFold module prefix below the enclosing prefix
  std::span<const Row> rows;
};

// Modules of the Evoformer-style blocks.
constexpr Row kMsaRowAttention[] = {
    {"query_norm", "layer_norm_m", Kind::kLayerNorm},
    {"feat_2d_norm", "layer_norm_z", Kind::kLayerNorm},
    {"//feat_2d_weights", "linear_z.weight", Kind::kWeight},
    {"attention", "mha", Kind::kGatedAttention, "linear_z.weight"},
};
constexpr Row kMsaColumnAttention[] = {
    {"query_norm", "layer_norm_m", Kind::kLayerNorm},
    {"attention", "mha", Kind::kGatedAttention, "../msa_att_row.linear_z.weight"},
};
constexpr Row kMsaColumnGlobalAttention[] = {
    {"query_norm", "layer_norm_m", Kind::kLayerNorm},
    {"attention", "global_attention", Kind::kGlobalAttention, "../msa_att_row.linear_z.weight"},
};
constexpr Row kTransition[] = {
    {"input_layer_norm", "layer_norm", Kind::kLayerNorm},
    {"transition1", "linear_1", Kind::kLinear},
    {"transition2", "linear_2", Kind::kLinear},
};
constexpr Row kOuterProductMean[] = {
    {"layer_norm_input", "layer_norm", Kind::kLayerNorm},
    {"left_projection", "linear_1", Kind::kLinear},
    {"right_projection", "linear_2", Kind::kLinear},
    {"//output_w", "linear_out.weight", Kind::kOpmWeight},
    {"//output_b", "linear_out.bias", Kind::kParam},
};
constexpr Row kTriangleMultiplicationOutgoing[] = {
    {"layer_norm_input", "layer_norm_in", Kind::kLayerNorm},
    {"left_projection", "linear_a_p", Kind::kLinear},
    {"right_projection", "linear_b_p", Kind::kLinear},
    {"left_gate", "linear_a_g", Kind::kLinear},
    {"right_gate", "linear_b_g", Kind::kLinear},
    {"center_layer_norm", "layer_norm_out", Kind::kLayerNorm},
    {"output_projection", "linear_z", Kind::kLinear},
    {"gating_linear", "linear_g", Kind::kLinear},
};
// Incoming: AF2's left/right are OpenFold's b/a (OpenFold swaps the operands instead).
constexpr Row kTriangleMultiplicationIncoming[] = {
    {"layer_norm_input", "layer_norm_in", Kind::kLayerNorm},
    {"left_projection", "linear_b_p", Kind::kLinear},
    {"right_projection", "linear_a_p", Kind::kLinear},
    {"left_gate", "linear_b_g", Kind::kLinear},
    {"right_gate", "linear_a_g", Kind::kLinear},
    {"center_layer_norm", "layer_norm_out", Kind::kLayerNorm},
    {"output_projection", "linear_z", Kind::kLinear},
    {"gating_linear", "linear_g", Kind::kLinear},
};
constexpr Row kTriangleAttention[] = {
    {"query_norm", "layer_norm", Kind::kLayerNorm},
    {"//feat_2d_weights", "linear.weight", Kind::kWeight},
    {"attention", "mha", Kind::kGatedAttention, "linear.weight"},
};

// Blocks (module order = AF2's; the table order does not matter for the mapping).
constexpr Module kEvoformerBlock[] = {
    {"msa_row_attention_with_pair_bias", "msa_att_row", kMsaRowAttention},
    {"msa_column_attention", "msa_att_col._msa_att", kMsaColumnAttention},
    {"msa_transition", "msa_transition", kTransition},
    {"outer_product_mean", "outer_product_mean", kOuterProductMean},
    {"triangle_multiplication_outgoing", "pair_stack.tri_mul_out", kTriangleMultiplicationOutgoing},
    {"triangle_multiplication_incoming", "pair_stack.tri_mul_in", kTriangleMultiplicationIncoming},
    {"triangle_attention_starting_node", "pair_stack.tri_att_start", kTriangleAttention},
    {"triangle_attention_ending_node", "pair_stack.tri_att_end", kTriangleAttention},
    {"pair_transition", "pair_stack.pair_transition", kTransition},
};
constexpr Module kExtraMsaBlock[] = {
    {"msa_row_attention_with_pair_bias", "msa_att_row", kMsaRowAttention},
    {"msa_column_global_attention", "msa_att_col", kMsaColumnGlobalAttention},
    {"msa_transition", "msa_transition", kTransition},
    {"outer_product_mean", "outer_product_mean", kOuterProductMean},
    {"triangle_multiplication_outgoing", "pair_stack.tri_mul_out", kTriangleMultiplicationOutgoing},
    {"triangle_multiplication_incoming", "pair_stack.tri_mul_in", kTriangleMultiplicationIncoming},
    {"triangle_attention_starting_node", "pair_stack.tri_att_start", kTriangleAttention},
    {"triangle_attention_ending_node", "pair_stack.tri_att_end", kTriangleAttention},
    {"pair_transition", "pair_stack.pair_transition", kTransition},
};
constexpr Module kTemplatePairBlock[] = {
    {"triangle_attention_starting_node", "tri_att_start", kTriangleAttention},
    {"triangle_attention_ending_node", "tri_att_end", kTriangleAttention},
    {"triangle_multiplication_outgoing", "tri_mul_out", kTriangleMultiplicationOutgoing},
    {"triangle_multiplication_incoming", "tri_mul_in", kTriangleMultiplicationIncoming},
    {"pair_transition", "pair_transition", kTransition},
};

// Layers outside the stacks, below "alphafold/alphafold_iteration/".
constexpr Row kInputEmbedder[] = {
    {"preprocess_1d", "linear_tf_m", Kind::kLinear},
    {"preprocess_msa", "linear_msa_m", Kind::kLinear},
    {"left_single", "linear_tf_z_i", Kind::kLinear},
    {"right_single", "linear_tf_z_j", Kind::kLinear},
    {"pair_activiations", "linear_relpos", Kind::kLinear},  // sic
};
constexpr Row kRecyclingEmbedder[] = {
    {"prev_pos_linear", "linear", Kind::kLinear},
    {"prev_msa_first_row_norm", "layer_norm_m", Kind::kLayerNorm},
    {"prev_pair_norm", "layer_norm_z", Kind::kLayerNorm},
};
constexpr Row kTemplateSingleEmbedder[] = {
    {"template_single_embedding", "linear_1", Kind::kLinear},
    {"template_projection", "linear_2", Kind::kLinear},
};
constexpr Row kTemplateEmbedder[] = {
    {"single_template_embedding/embedding2d", "template_pair_embedder.linear", Kind::kLinear},
    {"single_template_embedding/output_layer_norm", "template_pair_stack.layer_norm",
     Kind::kLayerNorm},
    {"attention", "template_pointwise_att.mha", Kind::kAttention},
};
constexpr Row kExtraMsaEmbedder[] = {{"extra_msa_activations", "linear", Kind::kLinear}};
constexpr Row kEvoformerOutput[] = {{"single_activations", "linear", Kind::kLinear}};
constexpr Row kStructureModule[] = {
    {"single_layer_norm", "layer_norm_s", Kind::kLayerNorm},
    {"initial_projection", "linear_in", Kind::kLinear},
    {"pair_layer_norm", "layer_norm_z", Kind::kLayerNorm},
    {"fold_iteration/invariant_point_attention/q_scalar", "ipa.linear_q", Kind::kLinear},
    {"fold_iteration/invariant_point_attention/kv_scalar", "ipa.linear_kv", Kind::kLinear},
    {"fold_iteration/invariant_point_attention/q_point_local", "ipa.linear_q_points.linear",
     Kind::kLinear},
    {"fold_iteration/invariant_point_attention/kv_point_local", "ipa.linear_kv_points.linear",
     Kind::kLinear},
    {"fold_iteration/invariant_point_attention/attention_2d", "ipa.linear_b", Kind::kLinear},
    {"fold_iteration/invariant_point_attention/output_projection", "ipa.linear_out", Kind::kLinear},
    {"fold_iteration/invariant_point_attention//trainable_point_weights", "ipa.head_weights",
     Kind::kParam},
    {"fold_iteration/attention_layer_norm", "layer_norm_ipa", Kind::kLayerNorm},
    {"fold_iteration/transition", "transition.layers.0.linear_1", Kind::kLinear},
    {"fold_iteration/transition_1", "transition.layers.0.linear_2", Kind::kLinear},
    {"fold_iteration/transition_2", "transition.layers.0.linear_3", Kind::kLinear},
    {"fold_iteration/transition_layer_norm", "transition.layer_norm", Kind::kLayerNorm},
    {"fold_iteration/affine_update", "bb_update.linear", Kind::kLinear},
    {"fold_iteration/rigid_sidechain/input_projection", "angle_resnet.linear_in", Kind::kLinear},
    {"fold_iteration/rigid_sidechain/input_projection_1", "angle_resnet.linear_initial",
     Kind::kLinear},
    {"fold_iteration/rigid_sidechain/resblock1", "angle_resnet.layers.0.linear_1", Kind::kLinear},
    {"fold_iteration/rigid_sidechain/resblock2", "angle_resnet.layers.0.linear_2", Kind::kLinear},
    {"fold_iteration/rigid_sidechain/resblock1_1", "angle_resnet.layers.1.linear_1", Kind::kLinear},
    {"fold_iteration/rigid_sidechain/resblock2_1", "angle_resnet.layers.1.linear_2", Kind::kLinear},
    {"fold_iteration/rigid_sidechain/unnormalized_angles", "angle_resnet.linear_out",
     Kind::kLinear},
};
constexpr Row kPlddtHead[] = {
    {"input_layer_norm", "layer_norm", Kind::kLayerNorm},
    {"act_0", "linear_1", Kind::kLinear},
    {"act_1", "linear_2", Kind::kLinear},
    {"logits", "linear_3", Kind::kLinear},
};
constexpr Row kDistogramHead[] = {{"half_logits", "linear", Kind::kLinear}};
constexpr Row kLogitsHead[] = {{"logits", "linear", Kind::kLinear}};

// What a part of the model is, for Af2ModelLayout: always present, templates only, pTM only.
enum class Part : uint8_t { kCore, kTemplates, kTmHead };

struct TopModule {
  Module module;
  Part part;
};
constexpr TopModule kTopModules[] = {
    {{"evoformer", "input_embedder", kInputEmbedder}, Part::kCore},
    {{"evoformer", "recycling_embedder", kRecyclingEmbedder}, Part::kCore},
    {{"evoformer", "template_embedder.template_single_embedder", kTemplateSingleEmbedder},
     Part::kTemplates},
    {{"evoformer/template_embedding", "template_embedder", kTemplateEmbedder}, Part::kTemplates},
    {{"evoformer", "extra_msa_embedder", kExtraMsaEmbedder}, Part::kCore},
    {{"evoformer", "evoformer", kEvoformerOutput}, Part::kCore},
    {{"structure_module", "structure_module", kStructureModule}, Part::kCore},
    {{"predicted_lddt_head", "aux_heads.plddt", kPlddtHead}, Part::kCore},
    {{"distogram_head", "aux_heads.distogram", kDistogramHead}, Part::kCore},
    {{"experimentally_resolved_head", "aux_heads.experimentally_resolved", kLogitsHead},
     Part::kCore},
    {{"masked_msa_head", "aux_heads.masked_msa", kLogitsHead}, Part::kCore},
    {{"predicted_aligned_error_head", "aux_heads.tm", kLogitsHead}, Part::kTmHead},
};

// Stacked layers: every array under the AF2 path has a leading block axis.
enum class Stack : uint8_t { kEvoformer, kExtraMsa, kTemplatePair };
struct StackSpec {
  const char* af2;
  const char* openfold;  // the block prefix, "{i}" = block index
  std::span<const Module> block;
  Stack stack;
};
constexpr StackSpec kStacks[] = {
    {"evoformer/evoformer_iteration", "evoformer.blocks.{i}", kEvoformerBlock, Stack::kEvoformer},
    {"evoformer/extra_msa_stack", "extra_msa_stack.blocks.{i}", kExtraMsaBlock, Stack::kExtraMsa},
    {"evoformer/template_embedding/single_template_embedding/template_pair_stack/"
     "__layer_stack_no_state",
     "template_embedder.template_pair_stack.blocks.{i}", kTemplatePairBlock, Stack::kTemplatePair},
};

constexpr const char* kAf2Root = "alphafold/alphafold_iteration/";

// One expanded table entry with where it belongs (for openfold_param_names).
struct Entry {
  Af2Param param;
  Part part;
  int stack;  // index into kStacks, -1 when not stacked
};

void expand_module(const Module& m, const std::string& af2_prefix, const std::string& of_prefix,
                   const std::string& block_prefix, bool stacked, Part part, int stack,
                   std::vector<Entry>* out) {
  const std::string af2_module = af2_prefix + m.af2;
  const std::string of_module = of_prefix + m.openfold;
  for (const Row& r : m.rows) {
    const bool single = r.af2[0] == '/';
    const std::string af2 = af2_module + (single ? "" : "/") + r.af2;
    const std::string of = of_module + "." + r.openfold;
    std::string heads;
    if (r.heads_of != nullptr) {
      const std::string h = r.heads_of;
      heads = h.rfind("../", 0) == 0 ? block_prefix + h.substr(3) : of_module + "." + h;
    }
    auto add = [&](std::string a, std::string o, Af2Transform t) {
      const bool per_head = t == T::kHeadsIn || t == T::kHeadsBias || t == T::kHeadsOut;
      out->push_back(Entry{Af2Param{std::move(a), std::move(o), stacked, t, per_head ? heads : ""},
                           part, stack});
    };
    switch (r.kind) {
      case Kind::kWeight:
        add(af2, of, T::kLinear);
        break;
      case Kind::kOpmWeight:
        add(af2, of, T::kOpmOut);
        break;
      case Kind::kParam:
        add(af2, of, T::kIdentity);
        break;
      default:
        for (const Leaf& l : leaves(r.kind))
          add(af2 + "//" + l.af2, of + "." + l.openfold, l.transform);
    }
  }
}

const std::vector<Entry>& entries() {
  static const std::vector<Entry> table = [] {
    std::vector<Entry> t;
    for (const TopModule& tm : kTopModules)
      expand_module(tm.module, kAf2Root, "", "", false, tm.part, -1, &t);
    for (int s = 0; s < static_cast<int>(std::size(kStacks)); ++s) {
      const StackSpec& st = kStacks[s];
      const std::string block = std::string(st.openfold) + ".";
      for (const Module& m : st.block)
        expand_module(m, std::string(kAf2Root) + st.af2 + "/", block, block, true,
                      st.stack == Stack::kTemplatePair ? Part::kTemplates : Part::kCore, s, &t);
    }
    return t;
  }();
  return table;
}

std::string with_block(const std::string& name, int64_t i) {
  const size_t p = name.find("{i}");
  if (p == std::string::npos) return name;
  return name.substr(0, p) + std::to_string(i) + name.substr(p + 3);
}

// The OpenFold shape of an AF2 array (one block) of shape a, its rank checked: forward_transform's
// output shape, without the data (the blocks a filtered read leaves out).
Status forward_shape(const std::string& where, const Af2Param& p, const Shape& a, Shape* out) {
  auto need = [&](size_t rank) {
    return a.size() == rank
               ? Status::OK()
               : Status::InvalidArgument(where + io::printable(p.af2) + " has shape " +
                                         shape_str(a) + (p.stacked ? " per block" : "") +
                                         ", expected rank " + std::to_string(rank));
  };
  switch (p.transform) {
    case T::kIdentity:
      *out = a;
      return Status::OK();
    case T::kLinear:
      FC_RETURN_IF_ERROR(need(2));
      *out = {a[1], a[0]};
      return Status::OK();
    case T::kHeadsIn:  // [c_in, H, C] -> [H*C, c_in]
      FC_RETURN_IF_ERROR(need(3));
      *out = {a[1] * a[2], a[0]};
      return Status::OK();
    case T::kHeadsBias:  // [H, C] -> [H*C]
      FC_RETURN_IF_ERROR(need(2));
      *out = {a[0] * a[1]};
      return Status::OK();
    case T::kHeadsOut:  // [H, C, c_out] -> [c_out, H*C]
    case T::kOpmOut:    // [C, C, c_z] -> [c_z, C*C]
      FC_RETURN_IF_ERROR(need(3));
      *out = {a[2], a[0] * a[1]};
      return Status::OK();
  }
  return Status::Internal("unknown transform");
}

// AF2 array (one block) -> OpenFold parameter, contiguous (of forward_shape's shape).
Status forward_transform(const std::string& where, const Af2Param& p, const Tensor& a,
                         Tensor* out) {
  Shape shape;
  FC_RETURN_IF_ERROR(forward_shape(where, p, a.shape(), &shape));
  switch (p.transform) {
    case T::kIdentity:
      *out = a.contiguous();
      return Status::OK();
    case T::kLinear:
      *out = a.transpose(0, 1).contiguous();
      return Status::OK();
    case T::kHeadsIn:
      *out = a.contiguous().reshape({a.dim(0), a.dim(1) * a.dim(2)}).transpose(0, 1).contiguous();
      return Status::OK();
    case T::kHeadsBias:
      *out = a.contiguous().reshape(shape);
      return Status::OK();
    case T::kHeadsOut:
    case T::kOpmOut:
      *out = a.contiguous().reshape({a.dim(0) * a.dim(1), a.dim(2)}).transpose(0, 1).contiguous();
      return Status::OK();
  }
  return Status::Internal("unknown transform");
}

// OpenFold parameter -> AF2 array (one block), contiguous. `heads` is H for the kHeads* kinds.
Status inverse_transform(const Af2Param& p, const Tensor& t, int64_t heads, Tensor* out) {
  const std::string where = "OpenFold parameter " + io::printable(with_block(p.openfold, 0)) + " ";
  auto need = [&](int rank) {
    return t.ndim() == rank ? Status::OK()
                            : Status::InvalidArgument(where + "has shape " + shape_str(t.shape()) +
                                                      ", expected rank " + std::to_string(rank));
  };
  auto split = [&](int64_t hc, int64_t* c) {
    if (heads <= 0 || hc % heads != 0)
      return Status::InvalidArgument(where + "has " + std::to_string(hc) +
                                     " channels, not a multiple of " + std::to_string(heads) +
                                     " heads");
    *c = hc / heads;
    return Status::OK();
  };
  int64_t c = 0;
  switch (p.transform) {
    case T::kIdentity:
      *out = t.contiguous();
      return Status::OK();
    case T::kLinear:
      FC_RETURN_IF_ERROR(need(2));
      *out = t.transpose(0, 1).contiguous();
      return Status::OK();
    case T::kHeadsIn:  // [H*C, c_in] -> [c_in, H, C]
      FC_RETURN_IF_ERROR(need(2));
      FC_RETURN_IF_ERROR(split(t.dim(0), &c));
      *out = t.transpose(0, 1).contiguous().reshape({t.dim(1), heads, c});
      return Status::OK();
    case T::kHeadsBias:  // [H*C] -> [H, C]
      FC_RETURN_IF_ERROR(need(1));
      FC_RETURN_IF_ERROR(split(t.dim(0), &c));
      *out = t.contiguous().reshape({heads, c});
      return Status::OK();
    case T::kHeadsOut:  // [c_out, H*C] -> [H, C, c_out]
      FC_RETURN_IF_ERROR(need(2));
      FC_RETURN_IF_ERROR(split(t.dim(1), &c));
      *out = t.transpose(0, 1).contiguous().reshape({heads, c, t.dim(0)});
      return Status::OK();
    case T::kOpmOut: {  // [c_z, C*C] -> [C, C, c_z]
      FC_RETURN_IF_ERROR(need(2));
      const int64_t cc = t.dim(1);
      c = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(cc))));
      if (c * c != cc)
        return Status::InvalidArgument(where + "has " + std::to_string(cc) +
                                       " input channels, not a square C*C");
      *out = t.transpose(0, 1).contiguous().reshape({c, c, t.dim(0)});
      return Status::OK();
    }
  }
  return Status::Internal("unknown transform");
}

// ---- Boltz --------------------------------------------------------------------------------------

enum class BoltzKind : uint8_t { kLayerNorm, kLinear, kLinearNoBias };
struct BoltzRow {
  const char* name;
  BoltzKind kind;
};
struct BoltzModule {
  const char* name;
  std::span<const BoltzRow> rows;
};

constexpr BoltzRow kBoltzSingleAttention[] = {
    {"proj_q", BoltzKind::kLinear},       {"proj_k", BoltzKind::kLinearNoBias},
    {"proj_v", BoltzKind::kLinearNoBias}, {"proj_g", BoltzKind::kLinearNoBias},
    {"proj_z.0", BoltzKind::kLayerNorm},  {"proj_z.1", BoltzKind::kLinearNoBias},
    {"proj_o", BoltzKind::kLinearNoBias},
};
constexpr BoltzRow kBoltzTriangleMultiplication[] = {
    {"norm_in", BoltzKind::kLayerNorm},  {"p_in", BoltzKind::kLinearNoBias},
    {"g_in", BoltzKind::kLinearNoBias},  {"norm_out", BoltzKind::kLayerNorm},
    {"p_out", BoltzKind::kLinearNoBias}, {"g_out", BoltzKind::kLinearNoBias},
};
constexpr BoltzRow kBoltzTriangleAttention[] = {
    {"layer_norm", BoltzKind::kLayerNorm},      {"linear", BoltzKind::kLinearNoBias},
    {"mha.linear_q", BoltzKind::kLinearNoBias}, {"mha.linear_k", BoltzKind::kLinearNoBias},
    {"mha.linear_v", BoltzKind::kLinearNoBias}, {"mha.linear_o", BoltzKind::kLinearNoBias},
    {"mha.linear_g", BoltzKind::kLinearNoBias},
};
constexpr BoltzRow kBoltzTransition[] = {
    {"norm", BoltzKind::kLayerNorm},
    {"fc1", BoltzKind::kLinearNoBias},
    {"fc2", BoltzKind::kLinearNoBias},
    {"fc3", BoltzKind::kLinearNoBias},
};
constexpr BoltzRow kBoltzPreNorm[] = {{"", BoltzKind::kLayerNorm}};
constexpr BoltzRow kBoltzPairWeightedAveraging[] = {
    {"norm_m", BoltzKind::kLayerNorm},    {"norm_z", BoltzKind::kLayerNorm},
    {"proj_m", BoltzKind::kLinearNoBias}, {"proj_g", BoltzKind::kLinearNoBias},
    {"proj_z", BoltzKind::kLinearNoBias}, {"proj_o", BoltzKind::kLinearNoBias},
};
constexpr BoltzRow kBoltzOuterProductMean[] = {
    {"norm", BoltzKind::kLayerNorm},
    {"proj_a", BoltzKind::kLinearNoBias},
    {"proj_b", BoltzKind::kLinearNoBias},
    {"proj_o", BoltzKind::kLinear},
};
constexpr BoltzRow kBoltzProjection[] = {{"", BoltzKind::kLinearNoBias}};

// PairformerLayer (v2), in state_dict order.
constexpr BoltzModule kBoltzPairformerLayer[] = {
    {"pre_norm_s", kBoltzPreNorm},
    {"attention", kBoltzSingleAttention},
    {"tri_mul_out", kBoltzTriangleMultiplication},
    {"tri_mul_in", kBoltzTriangleMultiplication},
    {"tri_att_start", kBoltzTriangleAttention},
    {"tri_att_end", kBoltzTriangleAttention},
    {"transition_s", kBoltzTransition},
    {"transition_z", kBoltzTransition},
};
// MSALayer, in state_dict order; its pair stack is a PairformerNoSeqLayer.
constexpr BoltzModule kBoltzMsaLayer[] = {
    {"msa_transition", kBoltzTransition},
    {"pair_weighted_averaging", kBoltzPairWeightedAveraging},
    {"pairformer_layer.tri_mul_out", kBoltzTriangleMultiplication},
    {"pairformer_layer.tri_mul_in", kBoltzTriangleMultiplication},
    {"pairformer_layer.tri_att_start", kBoltzTriangleAttention},
    {"pairformer_layer.tri_att_end", kBoltzTriangleAttention},
    {"pairformer_layer.transition_z", kBoltzTransition},
    {"outer_product_mean", kBoltzOuterProductMean},
};
// MSAModule parameters before its layers.
constexpr BoltzModule kBoltzMsaModuleHead[] = {
    {"s_proj", kBoltzProjection},
    {"msa_proj", kBoltzProjection},
};

void expand_boltz(std::span<const BoltzModule> modules, const std::string& prefix,
                  std::vector<std::string>* out) {
  for (const BoltzModule& m : modules)
    for (const BoltzRow& r : m.rows) {
      const std::string base = prefix + m.name + (r.name[0] ? std::string(".") + r.name : "");
      out->push_back(base + ".weight");
      if (r.kind != BoltzKind::kLinearNoBias) out->push_back(base + ".bias");
    }
}

}  // namespace

const std::vector<Af2Param>& af2_param_table() {
  static const std::vector<Af2Param> table = [] {
    std::vector<Af2Param> t;
    for (const Entry& e : entries()) t.push_back(e.param);
    return t;
  }();
  return table;
}

bool is_af2_npz(const TensorFile& f) {
  return std::any_of(f.names.begin(), f.names.end(),
                     [](const std::string& n) { return n.rfind("alphafold/", 0) == 0; });
}

namespace {
// One AlphaFold array `name` into its OpenFold parameter(s) in *result (the stacked ones split
// per block, those keep rejects dropped; `where` = "<label>: "); shapes (optional) receives every
// parameter's OpenFold name and shape, dropped ones included.
Status af2_member_to_openfold(const std::string& where, const std::string& name, const Tensor& a,
                              const BlockFilter* keep, TensorFile* result,
                              TensorShapes* shapes = nullptr) {
  static const std::unordered_map<std::string, const Af2Param*> index = [] {
    std::unordered_map<std::string, const Af2Param*> m;
    for (const Af2Param& p : af2_param_table()) m.emplace(p.af2, &p);
    return m;
  }();
  auto it = index.find(name);
  if (it == index.end())
    return Status::InvalidArgument(where + "unknown AlphaFold parameter " + io::printable(name) +
                                   " (not an AlphaFold2 monomer parameter file?)");
  const Af2Param& p = *it->second;
  auto record = [&](const std::string& of, const Shape& shape) {
    if (shapes == nullptr) return;
    if (shapes->shapes.insert_or_assign(of, shape).second) shapes->names.push_back(of);
  };
  if (!p.stacked) {
    Tensor t;
    FC_RETURN_IF_ERROR(forward_transform(where, p, a, &t));
    record(p.openfold, t.shape());
    result->put(p.openfold, t);
    return Status::OK();
  }
  if (a.ndim() < 1 || a.dim(0) < 1)
    return Status::InvalidArgument(where + io::printable(name) + " has shape " +
                                   shape_str(a.shape()) + ": no leading block axis");
  for (int64_t i = 0; i < a.dim(0); ++i) {
    const std::string of = with_block(p.openfold, i);
    std::string stack;
    int64_t block = 0;
    if (keep && io::parse_block_name(of, &stack, &block) && !(*keep)(stack, block, a.dim(0))) {
      Shape shape;
      FC_RETURN_IF_ERROR(
          forward_shape(where, p, Shape(a.shape().begin() + 1, a.shape().end()), &shape));
      record(of, shape);
      continue;
    }
    Tensor t;
    FC_RETURN_IF_ERROR(forward_transform(where, p, a.select(0, i), &t));
    record(of, t.shape());
    result->put(of, t);
  }
  return Status::OK();
}

// The head count of the template pointwise attention is in the AF2 array's shape [c_z, H, C]
// only; the state dict flattens it, so it is kept as metadata for the config.
const char kTemplateQuery[] =
    "alphafold/alphafold_iteration/evoformer/template_embedding/attention//query_w";
}  // namespace

Status af2_to_openfold(TensorFile&& npz, const std::string& label, TensorFile* out) {
  const std::string where = label + ": ";
  TensorFile result;
  result.metadata = npz.metadata;
  const std::vector<std::string> names = std::move(npz.names);
  for (const std::string& name : names) {
    auto node = npz.tensors.extract(name);
    const Tensor a = std::move(node.mapped());
    FC_RETURN_IF_ERROR(af2_member_to_openfold(where, name, a, nullptr, &result));
  }
  *out = std::move(result);
  return Status::OK();
}

Status openfold_to_af2(const TensorFile& state_dict, int64_t template_pointwise_heads,
                       TensorFile* out) {
  TensorFile result;
  std::unordered_set<std::string> used;
  auto heads_for = [&](const Af2Param& p, int64_t block, int64_t* h) {
    *h = 0;
    if (p.transform != T::kHeadsIn && p.transform != T::kHeadsBias && p.transform != T::kHeadsOut)
      return Status::OK();
    if (p.heads_of.empty()) {
      if (template_pointwise_heads <= 0)
        return Status::InvalidArgument("the head count of " +
                                       io::printable(with_block(p.openfold, block)) +
                                       " is not in the parameters: give it");
      *h = template_pointwise_heads;
      return Status::OK();
    }
    auto it = state_dict.tensors.find(with_block(p.heads_of, block));
    if (it == state_dict.tensors.end() || it->second.ndim() < 1)
      return Status::InvalidArgument("the head count of " +
                                     io::printable(with_block(p.openfold, block)) + " needs " +
                                     io::printable(with_block(p.heads_of, block)));
    *h = it->second.dim(0);
    return Status::OK();
  };
  for (const Af2Param& p : af2_param_table()) {
    int64_t blocks = 0;
    if (p.stacked) {
      while (state_dict.has(with_block(p.openfold, blocks))) ++blocks;
    } else {
      blocks = state_dict.has(p.openfold) ? 1 : 0;
    }
    std::vector<Tensor> parts;  // one per block
    for (int64_t i = 0; i < blocks; ++i) {
      const std::string name = with_block(p.openfold, i);
      int64_t h = 0;
      FC_RETURN_IF_ERROR(heads_for(p, i, &h));
      Tensor t;
      FC_RETURN_IF_ERROR(inverse_transform(p, state_dict.tensors.at(name), h, &t));
      if (!parts.empty() && (t.shape() != parts[0].shape() || t.dtype() != parts[0].dtype()))
        return Status::InvalidArgument("OpenFold parameter " + io::printable(name) +
                                       " differs in shape or dtype from block 0");
      parts.push_back(std::move(t));
      used.insert(name);
    }
    if (parts.empty()) continue;
    if (!p.stacked) {
      result.put(p.af2, parts[0]);
      continue;
    }
    Shape shape = parts[0].shape();  // [blocks, ...per block]
    shape.insert(shape.begin(), blocks);
    Tensor stacked = Tensor::empty(shape, parts[0].dtype());
    for (int64_t i = 0; i < blocks; ++i) {
      Tensor dst = stacked.select(0, i);
      dst.copy_from(parts[static_cast<size_t>(i)]);
    }
    result.put(p.af2, stacked);
  }
  for (const std::string& name : state_dict.names)
    if (!used.count(name))
      return Status::InvalidArgument("OpenFold parameter " + io::printable(name) +
                                     " has no AlphaFold key");
  *out = std::move(result);
  return Status::OK();
}

std::vector<std::string> openfold_param_names(const Af2ModelLayout& layout) {
  const int blocks[] = {layout.evoformer_blocks, layout.extra_msa_blocks, layout.template_blocks};
  std::vector<std::string> names;
  for (const Entry& e : entries()) {
    if ((e.part == Part::kTemplates && !layout.templates) ||
        (e.part == Part::kTmHead && !layout.tm_head))
      continue;
    const int n = e.stack < 0 ? 1 : blocks[e.stack];
    for (int i = 0; i < n; ++i) names.push_back(with_block(e.param.openfold, i));
  }
  return names;
}

std::vector<std::string> boltz_param_names(BoltzModuleKind kind, int blocks) {
  std::vector<std::string> names;
  if (kind == BoltzModuleKind::kMsaModule) expand_boltz(kBoltzMsaModuleHead, "", &names);
  for (int i = 0; i < blocks; ++i)
    expand_boltz(kind == BoltzModuleKind::kPairformer
                     ? std::span<const BoltzModule>(kBoltzPairformerLayer)
                     : kBoltzMsaLayer,
                 "layers." + std::to_string(i) + ".", &names);
  return names;
}

Status check_param_names(const TensorFile& f, const std::vector<std::string>& names,
                         const std::string& label) {
  for (const std::string& n : names)
    if (!f.has(n))
      return Status::InvalidArgument(label + ": parameter " + io::printable(n) + " is missing");
  return Status::OK();
}

TensorFile submodule_state_dict(TensorFile&& f, const std::string& prefix) {
  const std::string p = prefix + ".";
  const bool whole = std::any_of(f.names.begin(), f.names.end(),
                                 [&](const std::string& n) { return n.rfind(p, 0) == 0; });
  if (!whole) return std::move(f);
  TensorFile sub;
  sub.metadata = std::move(f.metadata);
  for (const std::string& n : f.names)
    if (n.rfind(p, 0) == 0) sub.put(n.substr(p.size()), f.tensors.at(n));
  return sub;
}

TensorShapes submodule_shapes(const TensorShapes& f, const std::string& prefix) {
  const std::string p = prefix + ".";
  const bool whole = std::any_of(f.names.begin(), f.names.end(),
                                 [&](const std::string& n) { return n.rfind(p, 0) == 0; });
  if (!whole) return f;
  TensorShapes sub;
  sub.metadata = f.metadata;
  for (const std::string& n : f.names)
    if (n.rfind(p, 0) == 0) {
      sub.names.push_back(n.substr(p.size()));
      sub.shapes[sub.names.back()] = f.shapes.at(n);
    }
  return sub;
}

Status read_weights(const std::string& path, TensorFile* out) {
  TensorFile f;
  FC_RETURN_IF_ERROR(read_tensor_file(path, &f));
  if (!is_af2_npz(f)) {
    *out = std::move(f);
    return Status::OK();
  }
  const std::string q = kTemplateQuery;
  int64_t heads = 0;
  if (f.has(q) && f.tensors.at(q).ndim() == 3) heads = f.tensors.at(q).dim(1);
  FC_RETURN_IF_ERROR(af2_to_openfold(std::move(f), path, out));
  if (heads > 0) out->metadata["template_pointwise_attention_heads"] = std::to_string(heads);
  return Status::OK();
}

Status read_weights(const std::string& path, TensorFile* out, const BlockFilter& keep,
                    TensorShapes* shapes) {
  FC_RETURN_IF_ERROR(io::check_regular_file(path));
  if (!io::starts_like_zip(path)) return io::read_safetensors_filtered(path, keep, out, shapes);
  // AlphaFold keys converted (and filtered) member by member; other keys kept for a plain .npz.
  const std::string where = path + ": ";
  TensorFile af2, plain;
  TensorShapes af2_shapes;
  int64_t heads = 0;
  FC_RETURN_IF_ERROR(io::read_npz_each(path, [&](const std::string& key, Tensor a) -> Status {
    if (key.rfind("alphafold/", 0) != 0) {
      plain.put(key, a);
      return Status::OK();
    }
    if (key == kTemplateQuery && a.ndim() == 3) heads = a.dim(1);
    return af2_member_to_openfold(where, key, a, &keep, &af2, &af2_shapes);
  }));
  if (!af2.names.empty()) {
    if (!plain.names.empty())
      return Status::InvalidArgument(where + "unknown AlphaFold parameter " +
                                     io::printable(plain.names[0]) +
                                     " (not an AlphaFold2 monomer parameter file?)");
    if (heads > 0) af2.metadata["template_pointwise_attention_heads"] = std::to_string(heads);
    if (shapes != nullptr) {
      af2_shapes.metadata = af2.metadata;
      *shapes = std::move(af2_shapes);
    }
    *out = std::move(af2);
    return Status::OK();
  }
  // A plain .npz: read whole, then filtered (each stack's block count from its names).
  std::map<std::string, int64_t> blocks;
  std::string stack;
  int64_t block = 0;
  for (const std::string& n : plain.names)
    if (io::parse_block_name(n, &stack, &block)) blocks[stack] = std::max(blocks[stack], block + 1);
  if (shapes != nullptr) *shapes = shapes_of(plain);
  TensorFile result;
  result.metadata = plain.metadata;
  for (const std::string& n : plain.names)
    if (!io::parse_block_name(n, &stack, &block) || keep(stack, block, blocks[stack]))
      result.put(n, plain.tensors.at(n));
  *out = std::move(result);
  return Status::OK();
}

}  // namespace fc
