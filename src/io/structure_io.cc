#include "foldcube/structure_io.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/io_util.h"
#include "model/af2/residue_constants.h"

namespace fc {
namespace {

constexpr int kAtoms = af2::kAtom37;

// PDB atom name field: four columns, names shorter than four start in column 14.
std::string pdb_atom_name(const std::string& name) {
  return name.size() >= 4 ? name.substr(0, 4) : " " + name + std::string(3 - name.size(), ' ');
}

// Present atoms in residue order: (residue, atom37 index).
std::vector<std::pair<int64_t, int>> present_atoms(const ProteinStructure& p) {
  std::vector<std::pair<int64_t, int>> out;
  for (size_t i = 0; i < p.aatype.size(); ++i)
    for (int a = 0; a < kAtoms; ++a)
      if (p.mask[i * kAtoms + a] > 0.5f) out.push_back({static_cast<int64_t>(i), a});
  return out;
}

float bfactor(const ProteinStructure& p, int64_t i) {
  return p.b_factors.empty() ? 0.0f : p.b_factors[i];
}

}  // namespace

Status check_structure(const ProteinStructure& p) {
  const size_t r = p.aatype.size();
  if (r == 0) return Status::InvalidArgument("structure has no residues");
  if (p.residue_index.size() != r || p.positions.size() != r * kAtoms * 3 ||
      p.mask.size() != r * kAtoms || (!p.b_factors.empty() && p.b_factors.size() != r))
    return Status::InvalidArgument("structure arrays disagree in size (r = " + std::to_string(r) +
                                   ")");
  for (size_t i = 0; i < r; ++i) {
    if (p.aatype[i] < 0 || p.aatype[i] > 20)
      return Status::InvalidArgument("residue " + std::to_string(i) + " has aatype " +
                                     std::to_string(p.aatype[i]));
    if (!p.b_factors.empty() && !std::isfinite(p.b_factors[i]))
      return Status::InvalidArgument("residue " + std::to_string(i) + " has a non-finite B-factor");
  }
  for (const auto& [i, a] : present_atoms(p))
    for (int c = 0; c < 3; ++c) {
      const float x = p.positions[(i * kAtoms + a) * 3 + c];
      if (!std::isfinite(x) || std::abs(x) >= 9999.0f)
        return Status::InvalidArgument("residue " + std::to_string(i) + " atom " +
                                       af2::kAtom37Names[a] +
                                       " has a coordinate outside the PDB columns");
    }
  return Status::OK();
}

Status to_pdb(const ProteinStructure& p, std::string* out) {
  FC_RETURN_IF_ERROR(check_structure(p));
  std::string s = "MODEL        1\n";
  char line[96];
  int serial = 1;
  int64_t last = 0;
  for (const auto& [i, a] : present_atoms(p)) {
    const std::string name = af2::kAtom37Names[a];
    const float* x = &p.positions[(i * kAtoms + a) * 3];
    std::snprintf(line, sizeof(line),
                  "%-6s%5d %-4s%1s%3s %1c%4lld%1s   %8.3f%8.3f%8.3f%6.2f%6.2f          %2s%2s\n",
                  "ATOM", serial++ % 100000, pdb_atom_name(name).c_str(), "",
                  af2::restype_name(static_cast<int>(p.aatype[i])), p.chain_id,
                  static_cast<long long>(p.residue_index[i] % 10000), "", x[0], x[1], x[2], 1.0,
                  bfactor(p, i), name.substr(0, 1).c_str(), "");
    s += line;
    last = i;
  }
  std::snprintf(line, sizeof(line), "%-6s%5d      %3s %1c%4lld\n", "TER", serial % 100000,
                af2::restype_name(static_cast<int>(p.aatype[last])), p.chain_id,
                static_cast<long long>(p.residue_index[last] % 10000));
  s += line;
  s += "ENDMDL\nEND\n";
  *out = std::move(s);
  return Status::OK();
}

Status to_mmcif(const ProteinStructure& p, const std::string& name, std::string* out) {
  FC_RETURN_IF_ERROR(check_structure(p));
  std::string id;
  for (char c : name) id += (std::isalnum(static_cast<unsigned char>(c)) || c == '_') ? c : '_';
  if (id.empty()) id = "foldcube";
  std::string s = "data_" + id + "\n#\n_entry.id " + id + "\n#\n";
  s += "loop_\n_entity_poly_seq.entity_id\n_entity_poly_seq.num\n_entity_poly_seq.mon_id\n";
  for (size_t i = 0; i < p.aatype.size(); ++i)
    s += "1 " + std::to_string(i + 1) + " " + af2::restype_name(static_cast<int>(p.aatype[i])) +
         "\n";
  s += "#\nloop_\n";
  for (const char* f : {"group_PDB", "id", "type_symbol", "label_atom_id", "label_alt_id",
                        "label_comp_id", "label_asym_id", "label_entity_id", "label_seq_id",
                        "pdbx_PDB_ins_code", "Cartn_x", "Cartn_y", "Cartn_z", "occupancy",
                        "B_iso_or_equiv", "auth_seq_id", "auth_asym_id", "pdbx_PDB_model_num"})
    s += std::string("_atom_site.") + f + "\n";
  char line[160];
  int serial = 1;
  for (const auto& [i, a] : present_atoms(p)) {
    const std::string atom = af2::kAtom37Names[a];
    const float* x = &p.positions[(i * kAtoms + a) * 3];
    std::snprintf(line, sizeof(line),
                  "ATOM %d %c %s . %s %c 1 %lld ? %.3f %.3f %.3f 1.00 %.2f %lld %c 1\n", serial++,
                  atom[0], atom.c_str(), af2::restype_name(static_cast<int>(p.aatype[i])),
                  p.chain_id, static_cast<long long>(i + 1), x[0], x[1], x[2], bfactor(p, i),
                  static_cast<long long>(p.residue_index[i]), p.chain_id);
    s += line;
  }
  s += "#\n";
  *out = std::move(s);
  return Status::OK();
}

std::string confidence_json(const std::vector<float>& plddt, const std::vector<float>& pae,
                            float max_pae, float ptm) {
  nlohmann::json j;
  double mean = 0;
  for (float v : plddt) mean += v;
  j["plddt"] = plddt;
  j["mean_plddt"] = plddt.empty() ? 0.0 : mean / plddt.size();
  if (!pae.empty()) {
    const size_t r = plddt.size();
    std::vector<std::vector<float>> rows(r);
    for (size_t i = 0; i < r; ++i) rows[i].assign(pae.begin() + i * r, pae.begin() + (i + 1) * r);
    j["ptm"] = ptm;
    j["max_pae"] = max_pae;
    j["pae"] = rows;
  }
  return j.dump();
}

Status write_text_atomic(const std::string& path, const std::string& text) {
  return io::write_file_atomic(path, [&](FILE* f) {
    if (std::fwrite(text.data(), 1, text.size(), f) != text.size())
      return Status::IOError("cannot write " + path + " (disk full?)");
    return Status::OK();
  });
}

}  // namespace fc
