// Confidence and MSA pictures as PNG files (cairo), as ColabFold users expect them: pLDDT per
// residue, the PAE heatmap and the MSA coverage. Files are written atomically.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "foldcube/status.h"

namespace fc {

// pLDDT [r] of one or more models (one line each, labelled) over the AlphaFold confidence bands.
Status plot_plddt(const std::string& path, const std::vector<std::vector<float>>& plddt,
                  const std::vector<std::string>& labels);

// PAE [r, r] (Angstrom) as a heatmap from 0 to max_pae, with a colour bar; row = scored residue.
Status plot_pae(const std::string& path, const std::vector<float>& pae, int64_t r, float max_pae);

// MSA coverage: msa [n, r] residue tokens with row 0 the query, `gap` the gap token. Rows sorted by
// sequence identity to the query (over the query's aligned positions), coloured by it, white where
// a row has a gap; a black line gives the number of non-gap rows per position.
Status plot_msa_coverage(const std::string& path, const std::vector<int8_t>& msa, int64_t n,
                         int64_t r, int8_t gap);

}  // namespace fc
