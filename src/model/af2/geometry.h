// Geometry of the AlphaFold2 structure module (AF2 supplement, Algorithms 23-24 and section 1.8):
// backbone quaternion updates, the eight rigid-group frames from torsion angles, atom14 and atom37
// coordinates. Float32 math on plain arrays; residue types are validated by the caller (0..20).
#pragma once

#include <cstdint>

namespace fc::af2 {

// Rotation matrix R [3, 3] (row-major) of the quaternion q = (w, x, y, z); q is used as given
// (the structure module keeps it normalised).
void quat_to_rot(const float q[4], float R[9]);

// Backbone update of one residue (Algorithm 23): quaternion q (w, x, y, z) and translation t are
// updated by u = (b, c, d, t_x, t_y, t_z): t += R(q) (t_x, t_y, t_z) with the OLD rotation, then
// q = normalize(q + q * (0, b, c, d)) (Hamilton product). t and u share one unit (nm in AF2).
void backbone_update(float q[4], float t[3], const float u[6]);

// The eight rigid-group frames to global of r residues (Algorithm 24): aatype [r], backbone
// rotations rot [r, 3, 3] and translations trans [r, 3] (Angstrom), angles [r, 7, 2] as
// (sin, cos) of pre-omega, phi, psi, chi1..chi4 -> frames [r, 8, 4, 4] as [[R, t], [0, 1]].
// Group 0 is the backbone itself; chi2..chi4 are chained onto chi1..chi3.
void torsion_angles_to_frames(const int64_t* aatype, const float* rot, const float* trans,
                              const float* angles, int64_t r, float* frames);

// Atom14 coordinates pos14 [r, 14, 3] from the group frames [r, 8, 4, 4]: each atom's idealised
// position mapped by its group's frame; zero for the empty slots of a residue.
void frames_to_atom14(const int64_t* aatype, const float* frames, int64_t r, float* pos14);

// Atom37 coordinates pos37 [r, 37, 3] (zero where the residue has no such atom) and, if non-null,
// mask37 [r, 37] (1 where it has) from pos14 [r, 14, 3].
void atom14_to_atom37(const int64_t* aatype, const float* pos14, int64_t r, float* pos37,
                      float* mask37);

// Pseudo-beta positions pb [r, 3]: CA for glycine, CB otherwise, from pos37 [r, 37, 3].
void pseudo_beta(const int64_t* aatype, const float* pos37, int64_t r, float* pb);

}  // namespace fc::af2
