#include "model/af2/residue_constants.h"

#include <cmath>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "foldcube/status.h"

namespace fc::af2 {
namespace {

struct AtomSite {
  const char* residue;  // three-letter name
  const char* atom;
  int group;       // rigid group whose frame the position is given in
  double x, y, z;  // Angstrom
};

// Idealised atom positions of the 20 residues in their rigid-group frames (Angstrom):
// residue, atom, rigid group, x, y, z.
const AtomSite kAtomSites[] = {
    {"ALA", "N", 0, -0.525, 1.363, 0.000},    {"ALA", "CA", 0, 0.000, 0.000, 0.000},
    {"ALA", "C", 0, 1.526, -0.000, -0.000},   {"ALA", "CB", 0, -0.529, -0.774, -1.205},
    {"ALA", "O", 3, 0.627, 1.062, 0.000},     {"ARG", "N", 0, -0.524, 1.362, -0.000},
    {"ARG", "CA", 0, 0.000, 0.000, 0.000},    {"ARG", "C", 0, 1.525, -0.000, -0.000},
    {"ARG", "CB", 0, -0.524, -0.778, -1.209}, {"ARG", "O", 3, 0.626, 1.062, 0.000},
    {"ARG", "CG", 4, 0.616, 1.390, -0.000},   {"ARG", "CD", 5, 0.564, 1.414, 0.000},
    {"ARG", "NE", 6, 0.539, 1.357, -0.000},   {"ARG", "NH1", 7, 0.206, 2.301, 0.000},
    {"ARG", "NH2", 7, 2.078, 0.978, -0.000},  {"ARG", "CZ", 7, 0.758, 1.093, -0.000},
    {"ASN", "N", 0, -0.536, 1.357, 0.000},    {"ASN", "CA", 0, 0.000, 0.000, 0.000},
    {"ASN", "C", 0, 1.526, -0.000, -0.000},   {"ASN", "CB", 0, -0.531, -0.787, -1.200},
    {"ASN", "O", 3, 0.625, 1.062, 0.000},     {"ASN", "CG", 4, 0.584, 1.399, 0.000},
    {"ASN", "ND2", 5, 0.593, -1.188, 0.001},  {"ASN", "OD1", 5, 0.633, 1.059, 0.000},
    {"ASP", "N", 0, -0.525, 1.362, -0.000},   {"ASP", "CA", 0, 0.000, 0.000, 0.000},
    {"ASP", "C", 0, 1.527, 0.000, -0.000},    {"ASP", "CB", 0, -0.526, -0.778, -1.208},
    {"ASP", "O", 3, 0.626, 1.062, -0.000},    {"ASP", "CG", 4, 0.593, 1.398, -0.000},
    {"ASP", "OD1", 5, 0.610, 1.091, 0.000},   {"ASP", "OD2", 5, 0.592, -1.101, -0.003},
    {"CYS", "N", 0, -0.522, 1.362, -0.000},   {"CYS", "CA", 0, 0.000, 0.000, 0.000},
    {"CYS", "C", 0, 1.524, 0.000, 0.000},     {"CYS", "CB", 0, -0.519, -0.773, -1.212},
    {"CYS", "O", 3, 0.625, 1.062, -0.000},    {"CYS", "SG", 4, 0.728, 1.653, 0.000},
    {"GLN", "N", 0, -0.526, 1.361, -0.000},   {"GLN", "CA", 0, 0.000, 0.000, 0.000},
    {"GLN", "C", 0, 1.526, 0.000, 0.000},     {"GLN", "CB", 0, -0.525, -0.779, -1.207},
    {"GLN", "O", 3, 0.626, 1.062, -0.000},    {"GLN", "CG", 4, 0.615, 1.393, 0.000},
    {"GLN", "CD", 5, 0.587, 1.399, -0.000},   {"GLN", "NE2", 6, 0.593, -1.189, -0.001},
    {"GLN", "OE1", 6, 0.634, 1.060, 0.000},   {"GLU", "N", 0, -0.528, 1.361, 0.000},
    {"GLU", "CA", 0, 0.000, 0.000, 0.000},    {"GLU", "C", 0, 1.526, -0.000, -0.000},
    {"GLU", "CB", 0, -0.526, -0.781, -1.207}, {"GLU", "O", 3, 0.626, 1.062, 0.000},
    {"GLU", "CG", 4, 0.615, 1.392, 0.000},    {"GLU", "CD", 5, 0.600, 1.397, 0.000},
    {"GLU", "OE1", 6, 0.607, 1.095, -0.000},  {"GLU", "OE2", 6, 0.589, -1.104, -0.001},
    {"GLY", "N", 0, -0.572, 1.337, 0.000},    {"GLY", "CA", 0, 0.000, 0.000, 0.000},
    {"GLY", "C", 0, 1.517, -0.000, -0.000},   {"GLY", "O", 3, 0.626, 1.062, -0.000},
    {"HIS", "N", 0, -0.527, 1.360, 0.000},    {"HIS", "CA", 0, 0.000, 0.000, 0.000},
    {"HIS", "C", 0, 1.525, 0.000, 0.000},     {"HIS", "CB", 0, -0.525, -0.778, -1.208},
    {"HIS", "O", 3, 0.625, 1.063, 0.000},     {"HIS", "CG", 4, 0.600, 1.370, -0.000},
    {"HIS", "CD2", 5, 0.889, -1.021, 0.003},  {"HIS", "ND1", 5, 0.744, 1.160, -0.000},
    {"HIS", "CE1", 5, 2.030, 0.851, 0.002},   {"HIS", "NE2", 5, 2.145, -0.466, 0.004},
    {"ILE", "N", 0, -0.493, 1.373, -0.000},   {"ILE", "CA", 0, 0.000, 0.000, 0.000},
    {"ILE", "C", 0, 1.527, -0.000, -0.000},   {"ILE", "CB", 0, -0.536, -0.793, -1.213},
    {"ILE", "O", 3, 0.627, 1.062, -0.000},    {"ILE", "CG1", 4, 0.534, 1.437, -0.000},
    {"ILE", "CG2", 4, 0.540, -0.785, -1.199}, {"ILE", "CD1", 5, 0.619, 1.391, 0.000},
    {"LEU", "N", 0, -0.520, 1.363, 0.000},    {"LEU", "CA", 0, 0.000, 0.000, 0.000},
    {"LEU", "C", 0, 1.525, -0.000, -0.000},   {"LEU", "CB", 0, -0.522, -0.773, -1.214},
    {"LEU", "O", 3, 0.625, 1.063, -0.000},    {"LEU", "CG", 4, 0.678, 1.371, 0.000},
    {"LEU", "CD1", 5, 0.530, 1.430, -0.000},  {"LEU", "CD2", 5, 0.535, -0.774, 1.200},
    {"LYS", "N", 0, -0.526, 1.362, -0.000},   {"LYS", "CA", 0, 0.000, 0.000, 0.000},
    {"LYS", "C", 0, 1.526, 0.000, 0.000},     {"LYS", "CB", 0, -0.524, -0.778, -1.208},
    {"LYS", "O", 3, 0.626, 1.062, -0.000},    {"LYS", "CG", 4, 0.619, 1.390, 0.000},
    {"LYS", "CD", 5, 0.559, 1.417, 0.000},    {"LYS", "CE", 6, 0.560, 1.416, 0.000},
    {"LYS", "NZ", 7, 0.554, 1.387, 0.000},    {"MET", "N", 0, -0.521, 1.364, -0.000},
    {"MET", "CA", 0, 0.000, 0.000, 0.000},    {"MET", "C", 0, 1.525, 0.000, 0.000},
    {"MET", "CB", 0, -0.523, -0.776, -1.210}, {"MET", "O", 3, 0.625, 1.062, -0.000},
    {"MET", "CG", 4, 0.613, 1.391, -0.000},   {"MET", "SD", 5, 0.703, 1.695, 0.000},
    {"MET", "CE", 6, 0.320, 1.786, -0.000},   {"PHE", "N", 0, -0.518, 1.363, 0.000},
    {"PHE", "CA", 0, 0.000, 0.000, 0.000},    {"PHE", "C", 0, 1.524, 0.000, -0.000},
    {"PHE", "CB", 0, -0.525, -0.776, -1.212}, {"PHE", "O", 3, 0.626, 1.062, -0.000},
    {"PHE", "CG", 4, 0.607, 1.377, 0.000},    {"PHE", "CD1", 5, 0.709, 1.195, -0.000},
    {"PHE", "CD2", 5, 0.706, -1.196, 0.000},  {"PHE", "CE1", 5, 2.102, 1.198, -0.000},
    {"PHE", "CE2", 5, 2.098, -1.201, -0.000}, {"PHE", "CZ", 5, 2.794, -0.003, -0.001},
    {"PRO", "N", 0, -0.566, 1.351, -0.000},   {"PRO", "CA", 0, 0.000, 0.000, 0.000},
    {"PRO", "C", 0, 1.527, -0.000, 0.000},    {"PRO", "CB", 0, -0.546, -0.611, -1.293},
    {"PRO", "O", 3, 0.621, 1.066, 0.000},     {"PRO", "CG", 4, 0.382, 1.445, 0.000},
    {"PRO", "CD", 5, 0.477, 1.424, 0.000},    {"SER", "N", 0, -0.529, 1.360, -0.000},
    {"SER", "CA", 0, 0.000, 0.000, 0.000},    {"SER", "C", 0, 1.525, -0.000, -0.000},
    {"SER", "CB", 0, -0.518, -0.777, -1.211}, {"SER", "O", 3, 0.626, 1.062, -0.000},
    {"SER", "OG", 4, 0.503, 1.325, 0.000},    {"THR", "N", 0, -0.517, 1.364, 0.000},
    {"THR", "CA", 0, 0.000, 0.000, 0.000},    {"THR", "C", 0, 1.526, 0.000, -0.000},
    {"THR", "CB", 0, -0.516, -0.793, -1.215}, {"THR", "O", 3, 0.626, 1.062, 0.000},
    {"THR", "CG2", 4, 0.550, -0.718, -1.228}, {"THR", "OG1", 4, 0.472, 1.353, 0.000},
    {"TRP", "N", 0, -0.521, 1.363, 0.000},    {"TRP", "CA", 0, 0.000, 0.000, 0.000},
    {"TRP", "C", 0, 1.525, -0.000, 0.000},    {"TRP", "CB", 0, -0.523, -0.776, -1.212},
    {"TRP", "O", 3, 0.627, 1.062, 0.000},     {"TRP", "CG", 4, 0.609, 1.370, -0.000},
    {"TRP", "CD1", 5, 0.824, 1.091, 0.000},   {"TRP", "CD2", 5, 0.854, -1.148, -0.005},
    {"TRP", "CE2", 5, 2.186, -0.678, -0.007}, {"TRP", "CE3", 5, 0.622, -2.530, -0.007},
    {"TRP", "NE1", 5, 2.140, 0.690, -0.004},  {"TRP", "CH2", 5, 3.028, -2.890, -0.013},
    {"TRP", "CZ2", 5, 3.283, -1.543, -0.011}, {"TRP", "CZ3", 5, 1.715, -3.389, -0.011},
    {"TYR", "N", 0, -0.522, 1.362, 0.000},    {"TYR", "CA", 0, 0.000, 0.000, 0.000},
    {"TYR", "C", 0, 1.524, -0.000, -0.000},   {"TYR", "CB", 0, -0.522, -0.776, -1.213},
    {"TYR", "O", 3, 0.627, 1.062, -0.000},    {"TYR", "CG", 4, 0.607, 1.382, -0.000},
    {"TYR", "CD1", 5, 0.716, 1.195, -0.000},  {"TYR", "CD2", 5, 0.713, -1.194, -0.001},
    {"TYR", "CE1", 5, 2.107, 1.200, -0.002},  {"TYR", "CE2", 5, 2.104, -1.201, -0.003},
    {"TYR", "OH", 5, 4.168, -0.002, -0.005},  {"TYR", "CZ", 5, 2.791, -0.001, -0.003},
    {"VAL", "N", 0, -0.494, 1.373, -0.000},   {"VAL", "CA", 0, 0.000, 0.000, 0.000},
    {"VAL", "C", 0, 1.527, -0.000, -0.000},   {"VAL", "CB", 0, -0.533, -0.795, -1.213},
    {"VAL", "O", 3, 0.627, 1.062, -0.000},    {"VAL", "CG1", 4, 0.540, 1.429, -0.000},
    {"VAL", "CG2", 4, 0.533, -0.776, 1.203},
};

// Atom14 slot names per residue (space separated, in slot order).
const char* const kAtom14Names[20] = {
    "N CA C O CB",                                     // ALA
    "N CA C O CB CG CD NE CZ NH1 NH2",                 // ARG
    "N CA C O CB CG OD1 ND2",                          // ASN
    "N CA C O CB CG OD1 OD2",                          // ASP
    "N CA C O CB SG",                                  // CYS
    "N CA C O CB CG CD OE1 NE2",                       // GLN
    "N CA C O CB CG CD OE1 OE2",                       // GLU
    "N CA C O",                                        // GLY
    "N CA C O CB CG ND1 CD2 CE1 NE2",                  // HIS
    "N CA C O CB CG1 CG2 CD1",                         // ILE
    "N CA C O CB CG CD1 CD2",                          // LEU
    "N CA C O CB CG CD CE NZ",                         // LYS
    "N CA C O CB CG SD CE",                            // MET
    "N CA C O CB CG CD1 CD2 CE1 CE2 CZ",               // PHE
    "N CA C O CB CG CD",                               // PRO
    "N CA C O CB OG",                                  // SER
    "N CA C O CB OG1 CG2",                             // THR
    "N CA C O CB CG CD1 CD2 NE1 CE2 CE3 CZ2 CZ3 CH2",  // TRP
    "N CA C O CB CG CD1 CD2 CE1 CE2 CZ OH",            // TYR
    "N CA C O CB CG1 CG2",                             // VAL
};

// The four atoms defining each chi angle (space separated, chi1 | chi2 | ...).
const char* const kChiAtoms[20] = {
    "",                                                      // ALA
    "N CA CB CG | CA CB CG CD | CB CG CD NE | CG CD NE CZ",  // ARG
    "N CA CB CG | CA CB CG OD1",                             // ASN
    "N CA CB CG | CA CB CG OD1",                             // ASP
    "N CA CB SG",                                            // CYS
    "N CA CB CG | CA CB CG CD | CB CG CD OE1",               // GLN
    "N CA CB CG | CA CB CG CD | CB CG CD OE1",               // GLU
    "",                                                      // GLY
    "N CA CB CG | CA CB CG ND1",                             // HIS
    "N CA CB CG1 | CA CB CG1 CD1",                           // ILE
    "N CA CB CG | CA CB CG CD1",                             // LEU
    "N CA CB CG | CA CB CG CD | CB CG CD CE | CG CD CE NZ",  // LYS
    "N CA CB CG | CA CB CG SD | CB CG SD CE",                // MET
    "N CA CB CG | CA CB CG CD1",                             // PHE
    "N CA CB CG | CA CB CG CD",                              // PRO
    "N CA CB OG",                                            // SER
    "N CA CB OG1",                                           // THR
    "N CA CB CG | CA CB CG CD1",                             // TRP
    "N CA CB CG | CA CB CG CD1",                             // TYR
    "N CA CB CG1",                                           // VAL
};

const char* const kNames3[kRestypes] = {"ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU",
                                        "GLY", "HIS", "ILE", "LEU", "LYS", "MET", "PHE",
                                        "PRO", "SER", "THR", "TRP", "TYR", "VAL", "UNK"};

std::vector<std::string> words(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

struct Vec3 {
  double x, y, z;
};
Vec3 sub(Vec3 a, Vec3 b) { return {a.x - b.x, a.y - b.y, a.z - b.z}; }
double dot(Vec3 a, Vec3 b) { return a.x * b.x + a.y * b.y + a.z * b.z; }
Vec3 scale(Vec3 a, double s) { return {a.x * s, a.y * s, a.z * s}; }
Vec3 divide(Vec3 a, double s) { return {a.x / s, a.y / s, a.z / s}; }
Vec3 cross(Vec3 a, Vec3 b) {
  return {a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x};
}

// The frame whose x axis points along ex, whose y axis is ey made orthogonal to ex, at origin t
// (AF2 supplement, Algorithm 21 applied to three atoms), as a 4x4 [[R, t], [0, 1]].
void frame_from_axes(Vec3 ex, Vec3 ey, Vec3 t, float out[4][4]) {
  ex = divide(ex, std::sqrt(dot(ex, ex)));
  ey = sub(ey, scale(ex, dot(ey, ex)));
  ey = divide(ey, std::sqrt(dot(ey, ey)));
  const Vec3 ez = cross(ex, ey);
  const Vec3 cols[4] = {ex, ey, ez, t};
  for (int c = 0; c < 4; ++c) {
    out[0][c] = static_cast<float>(cols[c].x);
    out[1][c] = static_cast<float>(cols[c].y);
    out[2][c] = static_cast<float>(cols[c].z);
    out[3][c] = c == 3 ? 1.0f : 0.0f;
  }
}

void set_identity(float m[4][4]) {
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) m[i][j] = i == j ? 1.0f : 0.0f;
}

ResidueTables build() {
  ResidueTables t;
  std::memset(&t, 0, sizeof(t));
  for (int rt = 0; rt < 20; ++rt) {
    const std::string name = kNames3[rt];
    const std::vector<std::string> slots = words(kAtom14Names[rt]);
    FC_CHECK(slots.size() <= kAtom14);
    std::vector<std::pair<std::string, Vec3>> pos;  // atom -> position in its group frame
    for (const AtomSite& a : kAtomSites) {
      if (name != a.residue) continue;
      const int a37 = atom37_index(a.atom);
      int a14 = -1;
      for (size_t k = 0; k < slots.size(); ++k)
        if (slots[k] == a.atom) a14 = static_cast<int>(k);
      FC_CHECK(a37 >= 0 && a14 >= 0);
      t.atom37_mask[rt][a37] = 1.0f;
      t.atom14_mask[rt][a14] = 1.0f;
      t.atom14_to_group[rt][a14] = a.group;
      t.atom14_group_positions[rt][a14][0] = static_cast<float>(a.x);
      t.atom14_group_positions[rt][a14][1] = static_cast<float>(a.y);
      t.atom14_group_positions[rt][a14][2] = static_cast<float>(a.z);
      t.atom14_to_atom37[rt][a14] = a37;
      t.atom37_to_atom14[rt][a37] = a14;
      pos.push_back({a.atom, Vec3{a.x, a.y, a.z}});  // frames are built in double
    }
    auto at = [&](const std::string& atom) {
      for (const auto& p : pos)
        if (p.first == atom) return p.second;
      FC_CHECK_MSG(false, "residue constants: " + name + " has no atom " + atom);
      return Vec3{};
    };
    set_identity(t.default_frame[rt][0]);
    set_identity(t.default_frame[rt][1]);
    frame_from_axes(sub(at("N"), at("CA")), Vec3{1, 0, 0}, at("N"), t.default_frame[rt][2]);
    frame_from_axes(sub(at("C"), at("CA")), sub(at("CA"), at("N")), at("C"),
                    t.default_frame[rt][3]);
    std::string chis = kChiAtoms[rt];
    std::vector<std::vector<std::string>> chi;
    for (size_t start = 0; !chis.empty() && start <= chis.size();) {
      const size_t bar = chis.find('|', start);
      chi.push_back(words(chis.substr(start, bar == std::string::npos ? bar : bar - start)));
      if (bar == std::string::npos) break;
      start = bar + 1;
    }
    for (size_t k = 0; k < chi.size(); ++k) {
      FC_CHECK(chi[k].size() == 4);
      t.chi_mask[rt][k] = 1.0f;
      if (k == 0) {
        const Vec3 b0 = at(chi[0][0]), b1 = at(chi[0][1]), b2 = at(chi[0][2]);
        frame_from_axes(sub(b2, b1), sub(b0, b1), b2, t.default_frame[rt][4]);
      } else {
        // chi(k+1) rotates about the bond from the origin of the chi(k) frame to the chi's third
        // atom, whose position is given in the chi(k) frame.
        const Vec3 axis_end = at(chi[k][2]);
        frame_from_axes(axis_end, Vec3{-1, 0, 0}, axis_end, t.default_frame[rt][4 + k]);
      }
    }
  }
  return t;
}

}  // namespace

const char* const kAtom37Names[kAtom37] = {
    "N",   "CA",  "C",   "CB",  "O",   "CG", "CG1", "CG2", "OG",  "OG1", "SG", "CD",  "CD1",
    "CD2", "ND1", "ND2", "OD1", "OD2", "SD", "CE",  "CE1", "CE2", "CE3", "NE", "NE1", "NE2",
    "OE1", "OE2", "CH2", "NH1", "NH2", "OH", "CZ",  "CZ2", "CZ3", "NZ",  "OXT"};

int atom37_index(const char* name) {
  for (int i = 0; i < kAtom37; ++i)
    if (std::strcmp(kAtom37Names[i], name) == 0) return i;
  return -1;
}

const char* restype_name(int restype) {
  return restype >= 0 && restype < kRestypes ? kNames3[restype] : "UNK";
}

const ResidueTables& residue_tables() {
  static const ResidueTables tables = build();
  return tables;
}

}  // namespace fc::af2
