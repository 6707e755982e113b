// Residue constants of the AlphaFold2 structure module: the 21 residue types (20 amino acids and
// X), the atom37 and atom14 atom orders, and the rigid-group tables derived from the published
// idealised side-chain geometry (AF2 supplementary section 1.8, Table 2). Built once on first use.
#pragma once

#include <cstdint>

namespace fc::af2 {

inline constexpr int kRestypes = 21;  // 20 amino acids in AF2 order, then X (unknown)
inline constexpr int kAtom37 = 37;
inline constexpr int kAtom14 = 14;
inline constexpr int kRigidGroups = 8;  // backbone, pre-omega, phi, psi, chi1..chi4

// "ARNDCQEGHILKMFPSTWYVX"[restype].
inline constexpr char kRestypeLetters[] = "ARNDCQEGHILKMFPSTWYVX";
// Three-letter name of a residue type ("ALA" ... "VAL", "UNK" for X and anything out of range).
const char* restype_name(int restype);
// Atom names in atom37 order (N, CA, C, CB, O, CG, ...).
extern const char* const kAtom37Names[kAtom37];
// Atom37 index of an atom name, or -1.
int atom37_index(const char* name);

struct ResidueTables {
  // Frame of rigid group g in the frame it hangs from (backbone for g <= 4, chi(g-1) for g > 4),
  // as a 4x4 [[R, t], [0, 1]]; identity for groups 0 and 1; all zero for X (no atoms).
  float default_frame[kRestypes][kRigidGroups][4][4];
  int64_t atom14_to_group[kRestypes][kAtom14];          // rigid group of each atom14 slot
  float atom14_mask[kRestypes][kAtom14];                // 1 where the slot holds an atom
  float atom14_group_positions[kRestypes][kAtom14][3];  // in its group's frame (Angstrom)
  int64_t atom14_to_atom37[kRestypes][kAtom14];         // 0 for empty slots
  int64_t atom37_to_atom14[kRestypes][kAtom37];         // 0 for absent atoms
  float atom37_mask[kRestypes][kAtom37];                // 1 where the residue has the atom
  float chi_mask[kRestypes][4];                         // 1 where chi angle k exists
};

// The tables (computed in double from the idealised geometry, stored as float like AF2's).
const ResidueTables& residue_tables();

}  // namespace fc::af2
