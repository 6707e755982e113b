// The whole AlphaFold2 model under Dynamic Axial Parallelism (docs/model.md, "Across ranks"):
// every rank of a communicator embeds, runs and reads only its own shards of m and z; no rank
// holds the whole MSA or pair representation during the forward.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "dist/comm.h"
#include "foldcube/alphafold.h"

namespace fc {

struct AlphaFoldDapStats {
  int64_t forward_peak_bytes = 0;  // tracked peak of this rank during the forward (absolute)
  int64_t shard_bytes = 0;         // this rank's Evoformer shards of m and z (last pass)
  int64_t output_peak_bytes = 0;   // tracked peak while the outputs are gathered (absolute)
  dist::CommStats comm;            // this rank's collectives during the forward
};

// AlphaFold::forward over the ranks of comm, each holding the same model and features. Layouts
// are those of docs/dap.md with s = the Evoformer's S + T rows (the extra-MSA stack: E rows):
//   input / recycling embedders  z rows [r_loc, r_pad, c_z], m sequences [s_loc, r_pad, c_m]
//   template pair stack          each template's pair rows [r_loc, r_pad, c_t] (DAP blocks);
//                                pointwise attention on the local pair positions
//   extra-MSA embedder + stack   extra rows [e_loc, r_pad, c_e] (DAP blocks)
//   Evoformer                    DAP blocks; s = linear(m[0]) broadcast from rank 0 ([r, c_s])
//   structure module             every rank on the whole single; the IPA pair bias and o_pair
//                                of its pair rows all-gathered (af2::PairRows)
//   heads                        distogram (+ its transpose by all-to-all), TM logits, PAE,
//                                masked MSA on the shards; pTM as the max over ranks
// After the forward the root (rank 0) gathers the outputs into *out, one tensor at a time (the
// pair-sized outputs are whole there only then); other ranks' *out is left empty. Not supported:
// trace, pad_to. opts.stats receives this rank's per-stage entries.
Status alphafold_dap_forward(const AlphaFold& model, const dist::Communicator& comm,
                             const FeatureDict& features, std::map<std::string, Tensor>* out,
                             const AlphaFoldOptions& opts = {}, AlphaFoldDapStats* stats = nullptr);

}  // namespace fc
