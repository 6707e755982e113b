// The AlphaFold2 structure module (AF2 supplement Algorithm 20, inference): invariant point
// attention, the single transition, backbone quaternion updates and the angle ResNet, with weights
// shared over its layers; per layer the backbone frames, torsion angles, rigid-group frames and
// atom14 coordinates. Parameters under OpenFold state_dict names (prefix "structure_module.").
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "foldcube/io.h"
#include "foldcube/status.h"
#include "foldcube/tensor.h"
#include "model/modules.h"
#include "model/weights.h"

namespace fc::af2 {

// Parameters and their application shared by the AF2 model's parts: a Linear (weight [out, in],
// bias [out] when `bias`) or LayerNorm [c] under `name`: present, F32, of that shape and finite.
Status load_linear(const TensorFile& f, const std::string& name, int64_t out, int64_t in, bool bias,
                   LinearW* w);
Status load_layernorm(const TensorFile& f, const std::string& name, int64_t c, LayerNormW* w);
// y [rows, out] = x [rows, in] W^T + b (accumulate: y +=); y = LN(x) over rows of c (eps 1e-5).
void apply_linear(const LinearW& w, const float* x, int64_t rows, float* y,
                  bool accumulate = false);
void apply_layernorm(const LayerNormW& w, const float* x, int64_t rows, int64_t c, float* y);

struct StructureModuleConfig {
  int64_t c_s = 384, c_z = 128;
  int64_t c_ipa = 16, no_heads_ipa = 12, no_qk_points = 4, no_v_points = 8;
  int64_t c_resnet = 128, no_resnet_blocks = 2, no_transition_layers = 1;
  int64_t no_blocks = 8;             // layers (one set of weights shared by all)
  float inf = 1e5f;                  // IPA mask bias
  float eps = 1e-8f;                 // IPA point norm and angle normalisation
  float trans_scale_factor = 10.0f;  // frames are in nm inside, Angstrom outside
};

// Dimensions from the parameter shapes under `prefix` (e.g. "structure_module."; shapes_of a
// state dict, or a filtered read's TensorShapes); the layer count is not in the weights and is
// kept from *cfg.
Status structure_module_config_from_weights(const TensorShapes& f, const std::string& prefix,
                                            StructureModuleConfig* cfg);

struct StructureModuleWeights {
  LayerNormW ln_s, ln_z, ln_ipa, ln_transition;
  LinearW linear_in;  // [c_s, c_s]
  // IPA
  LinearW q, kv;                    // [H*C, c_s], [2*H*C, c_s]
  LinearW q_pts, kv_pts;            // [3*H*Pq, c_s], [3*H*(Pq+Pv), c_s]
  LinearW b;                        // [H, c_z]
  LinearW out;                      // [c_s, H*(C + 4*Pv + c_z)]
  Tensor head_weights;              // [H]
  std::vector<LinearW> transition;  // 3 per transition layer: [c_s, c_s]
  LinearW bb_update;                // [6, c_s]
  // Angle ResNet
  LinearW ar_in, ar_initial;       // [c_resnet, c_s]
  std::vector<LinearW> ar_blocks;  // 2 per block: [c_resnet, c_resnet]
  LinearW ar_out;                  // [14, c_resnet]
};

// Every parameter under `prefix` must be present, F32 and of the shape cfg implies.
Status load_structure_module(const TensorFile& f, const std::string& prefix,
                             const StructureModuleConfig& cfg, StructureModuleWeights* w);

struct StructureModuleOutput {
  Tensor frames;               // [L, r, 7] quaternion (w, x, y, z), translation (A)
  Tensor sidechain_frames;     // [L, r, 8, 4, 4] rigid-group frames to global (A)
  Tensor unnormalized_angles;  // [L, r, 7, 2] (sin, cos) from the angle ResNet
  Tensor angles;               // [L, r, 7, 2] normalised
  Tensor positions;            // [L, r, 14, 3] atom14 coordinates (A)
  Tensor states;               // [L, r, c_s] single representation after each layer
  Tensor single;               // [r, c_s] = states[L-1]
};

// Intermediate values by golden trace name ("sm.single_ln", "sm.pair_ln", "sm.single_in" with
// layer -1; "sm.ipa", "sm.bb_update" per layer).
using StructureTraceFn =
    std::function<void(const std::string& stage, int layer, const Tensor& value)>;

// s [r, c_s] (Evoformer single), z [r, r, c_z] (pair), aatype [r] in 0..20, mask [r] 0/1 (the
// sequence mask). Inputs are validated (shapes, finiteness, residue types).
Status structure_module_forward(const StructureModuleWeights& w, const StructureModuleConfig& cfg,
                                const Tensor& s, const Tensor& z, const int64_t* aatype,
                                const float* mask, StructureModuleOutput* out,
                                const StructureTraceFn& trace = {}, int64_t pair_block_bytes = 0);

// Rows row0 .. row0+rows of the pair z, stored [rows, ld, c_z] (columns r .. ld unused). Without
// gather they are the whole pair (row0 0, rows = ld = r). With gather (row shards of DAP: every
// rank of `gather.parts` holds `rows` rows, rank k rows k*rows ..), the pair bias and o_pair of
// the local rows are all-gathered, so no rank holds the whole pair.
struct PairRows {
  const float* z = nullptr;
  int64_t row0 = 0, rows = 0, ld = 0;
  ShardGather gather;
};
// structure_module_forward on the pair rows pv (inputs not validated; no sm.pair_ln trace). Every
// rank of a sharded call gets the whole output.
Status structure_module_rows(const StructureModuleWeights& w, const StructureModuleConfig& cfg,
                             const Tensor& s, const PairRows& pv, const int64_t* aatype,
                             const float* mask, StructureModuleOutput* out,
                             const StructureTraceFn& trace = {}, int64_t pair_block_bytes = 0);

}  // namespace fc::af2
