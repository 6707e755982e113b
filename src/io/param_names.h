// Parameter names: from the names a file uses to the OpenFold state_dict names the engine loads.
//  (a) OpenFold state dicts (`AlphaFold`, `EvoformerStack`, ...): the identity.
//  (b) DeepMind AlphaFold2 .npz keys ("alphafold/alphafold_iteration/<module path>//<name>"):
//      renamed, reshaped/transposed, and split along the leading block axis of stacked layers.
//  (c) Boltz (AF3 trunk Pairformer / MSA module) state dicts: the identity; the names a module
//      uses are listed so that a file can be checked for the first missing one.
// The mappings are tables (param_names.cc), expanded once; nothing here is per-name code.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "foldcube/io.h"
#include "foldcube/status.h"

namespace fc {

// How one AlphaFold array (per block: the stacked axis removed) becomes its OpenFold parameter.
enum class Af2Transform : uint8_t {
  kIdentity,   // same shape: LayerNorm scale/offset, biases, IPA trainable_point_weights
  kLinear,     // [in, out] -> [out, in]: Linear `weights`, feat_2d_weights, global key_w/value_w
  kHeadsIn,    // [c_in, H, C] -> [H*C, c_in]: attention query_w, key_w, value_w, gating_w
  kHeadsBias,  // [H, C] -> [H*C]: attention gating_b
  kHeadsOut,   // [H, C, c_out] -> [c_out, H*C]: attention output_w
  kOpmOut,     // [C, C, c_z] -> [c_z, C*C]: outer product mean output_w
};

struct Af2Param {
  std::string af2;       // npz key, "alphafold/alphafold_iteration/...//weights"
  std::string openfold;  // OpenFold `AlphaFold` state_dict name; "{i}" = block index if stacked
  bool stacked = false;  // the array has a leading block axis
  Af2Transform transform = Af2Transform::kIdentity;
  // For the kHeads* transforms, the OpenFold parameter (with "{i}") whose dim 0 is the head count
  // H, needed to go back from OpenFold to AF2; empty when no parameter carries H (the template
  // pointwise attention: the caller gives it).
  std::string heads_of;
};

// Every parameter of the AlphaFold2 monomer model (with pTM head and templates): input,
// recycling, template and extra-MSA embedders, template pair stack and pointwise attention,
// extra-MSA stack, Evoformer, structure module, heads. Built once from the module tables.
const std::vector<Af2Param>& af2_param_table();

// True when the file holds AlphaFold .npz keys (any name under "alphafold/").
bool is_af2_npz(const TensorFile& f);

// AlphaFold keys -> OpenFold `AlphaFold` state dict. Consumes `npz` (each array is released once
// mapped, so the two never coexist in full; identity mappings share the array's memory). Every
// tensor of `out` is contiguous. User errors (naming `label` and the key): an unknown key, an
// array of the wrong rank, an empty stack.
Status af2_to_openfold(TensorFile&& npz, const std::string& label, TensorFile* out);

// OpenFold `AlphaFold` state dict -> AlphaFold keys, stacked layers re-stacked along axis 0.
// Parameters absent from `state_dict` (e.g. no pTM head, no templates) are skipped; a name the
// table does not know is an error. `template_pointwise_heads` is used only when the template
// pointwise attention is present.
Status openfold_to_af2(const TensorFile& state_dict, int64_t template_pointwise_heads,
                       TensorFile* out);

// Which optional parts an AlphaFold2 model has, and its stack depths.
struct Af2ModelLayout {
  int evoformer_blocks = 48;
  int extra_msa_blocks = 4;
  int template_blocks = 2;
  bool templates = true;  // template embedder (single + pair + pointwise attention)
  bool tm_head = true;    // pTM / PAE head (the _ptm parameter sets)
};

// The OpenFold `AlphaFold` state_dict names of a model with this layout (table order).
std::vector<std::string> openfold_param_names(const Af2ModelLayout& layout);

// Boltz modules whose golden state dicts foldcube reads (names are used as they are).
enum class BoltzModuleKind : uint8_t { kPairformer, kMsaModule };

// The Boltz-2 state_dict names of a PairformerModule (v2) or MSAModule with `blocks` layers, in
// state_dict order.
std::vector<std::string> boltz_param_names(BoltzModuleKind kind, int blocks);

// User error naming the first of `names` missing from `f` (label = the file).
Status check_param_names(const TensorFile& f, const std::vector<std::string>& names,
                         const std::string& label);

// The state dict of one submodule of a whole-model state dict: the names under "<prefix>."
// without it ("evoformer.blocks.0.x" -> "blocks.0.x"), metadata kept. A file with no name under
// the prefix is returned unchanged (it already holds the submodule alone).
TensorFile submodule_state_dict(TensorFile&& f, const std::string& prefix);
// The same on names and shapes.
TensorShapes submodule_shapes(const TensorShapes& f, const std::string& prefix);

}  // namespace fc
