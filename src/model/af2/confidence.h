// Confidence measures from the AlphaFold2 heads' logits (AF2 supplement 1.9.6 and 1.9.7):
// pLDDT, the predicted aligned error (PAE) and pTM. Float32 math on plain arrays.
#pragma once

#include <cstdint>

namespace fc::af2 {

// pLDDT [r] in 0..100 from lddt_logits [r, bins]: 100 * sum_b softmax_b (b + 0.5) / bins.
void plddt_from_logits(const float* logits, int64_t r, int64_t bins, float* plddt);

// Bin centres [bins] of the aligned-error head: the bins - 1 edges are linspace(0, max_bin,
// bins - 1); centres are the edges plus half a step, and the last bin's centre is the last edge
// plus half a step as well (31.75 A for AF2's 64 bins up to 31 A).
void aligned_error_centres(int64_t bins, float max_bin, float* centres);

// From tm_logits [r, r, bins]: probs [r, r, bins] = softmax over bins (nullptr: not stored), the
// PAE [r, r] = sum_b probs * centre_b, and the largest value the PAE can take (the last centre).
void predicted_aligned_error(const float* tm_logits, int64_t r, int64_t bins, float max_bin,
                             float* probs, float* pae, float* max_pae);
// The same over n positions [n, bins] (probs, pae [n]; e.g. a DAP rank's rows), without max_pae.
void aligned_error_positions(const float* tm_logits, int64_t n, int64_t bins, float max_bin,
                             float* probs, float* pae);

// pTM from tm_logits [r, r, bins] with residue weights w [r] (nullptr = all ones):
// max_i sum_j w_j / (sum w + 1e-8) sum_b p_ijb / (1 + (c_b / d0)^2),
// d0 = 1.24 (max(r, 19) - 15)^(1/3) - 1.8.
float predicted_tm_score(const float* tm_logits, const float* w, int64_t r, int64_t bins,
                         float max_bin);
// The max over `rows` rows [rows, ld, bins] (e.g. a DAP rank's rows of the pair; columns r .. ld
// unused) of the pTM row term above, for r residues; the pTM is the max over every row.
float predicted_tm_rows(const float* tm_logits, const float* w, int64_t rows, int64_t r, int64_t ld,
                        int64_t bins, float max_bin);

}  // namespace fc::af2
