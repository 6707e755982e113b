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
  dist::CommStats comm;            // this rank's collectives during the forward
};

// The outputs of a sharded forward on one rank: the small ones whole (the same on every rank)
// and this rank's rows of the pair- and MSA-sized ones.
struct AlphaFoldDapOutputs {
  std::map<std::string, Tensor> whole;
  struct Rows {
    Tensor shard;  // [loc, w, c]: rows k*loc .. of rank k (rows >= `rows` and columns >= r unused)
    int64_t rows = 0;  // real rows (r for the pair outputs, S for the MSA ones)
    Shape shape;       // the whole output's shape ([rows, r, c], or [r, r] for the PAE)
  };
  std::map<std::string, Rows> rows;
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
// Not supported: trace, pad_to. opts.stats receives this rank's per-stage entries.
Status alphafold_dap_forward(const AlphaFold& model, const dist::Communicator& comm,
                             const FeatureDict& features, AlphaFoldDapOutputs* out,
                             const AlphaFoldOptions& opts = {}, AlphaFoldDapStats* stats = nullptr);

// Collective: the root's *out receives every output whole (gathered one at a time; the pair-sized
// ones are then whole on the root); other ranks' *out is left empty.
void gather_alphafold_dap_outputs(const AlphaFoldDapOutputs& outs, const dist::Communicator& comm,
                                  std::map<std::string, Tensor>* out);

// Collective: the root writes every output as `output.<name>` to a safetensors file (the
// one-process layout) with the given metadata, receiving one rank's shard at a time, so no rank
// holds a whole pair- or MSA-sized output. Every rank returns the root's status.
Status write_alphafold_dap_outputs(const std::string& path,
                                   const std::map<std::string, std::string>& metadata,
                                   const AlphaFoldDapOutputs& outs, const dist::Communicator& comm,
                                   int64_t* peak_bytes = nullptr);

}  // namespace fc
