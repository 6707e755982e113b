// Writing predicted structures: PDB and mmCIF (pLDDT in the B-factor column) and the confidence
// summary JSON, in the conventions of AlphaFold's and ColabFold's outputs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "foldcube/status.h"

namespace fc {

// One predicted protein chain in atom37 layout.
struct ProteinStructure {
  std::vector<int64_t> aatype;         // [r] 0..19 (AF2 order), 20 = X
  std::vector<int64_t> residue_index;  // [r] residue numbers as written (1-based for predictions)
  std::vector<float> positions;        // [r, 37, 3] Angstrom
  std::vector<float> mask;             // [r, 37] 1 where the atom exists
  std::vector<float> b_factors;        // [r] per residue (pLDDT), or empty (0)
  char chain_id = 'A';
};

// Validates sizes and values (aatype range, finite coordinates of present atoms); a user error
// names what is wrong.
Status check_structure(const ProteinStructure& p);

// PDB text: MODEL 1, one ATOM record per present atom (atom37 order within a residue), TER,
// ENDMDL, END. Coordinates must fit the fixed columns (|x| < 10^4 A).
Status to_pdb(const ProteinStructure& p, std::string* out);

// mmCIF text (data block `name`): entity and sequence, and an _atom_site loop with label and auth
// numbering, occupancy 1 and the B-factors.
Status to_mmcif(const ProteinStructure& p, const std::string& name, std::string* out);

// {"plddt": [r], "mean_plddt", "ptm" (when pae non-empty), "max_pae", "pae": [[r x r]]}.
std::string confidence_json(const std::vector<float>& plddt, const std::vector<float>& pae,
                            float max_pae, float ptm);

// Writes text to path atomically (a temporary file in the same directory, then rename).
Status write_text_atomic(const std::string& path, const std::string& text);

}  // namespace fc
