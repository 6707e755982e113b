#include "model/af2/geometry.h"

#include <cmath>

#include "foldcube/status.h"
#include "model/af2/residue_constants.h"

namespace fc::af2 {
namespace {

// A rigid transform x -> R x + t.
struct Rigid {
  float R[9];  // [3, 3] row-major
  float t[3];
};

Rigid from_4x4(const float m[4][4]) {
  Rigid g;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) g.R[3 * i + j] = m[i][j];
    g.t[i] = m[i][3];
  }
  return g;
}

// a o b: x -> a(b(x)).
Rigid compose(const Rigid& a, const Rigid& b) {
  Rigid c;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j)
      c.R[3 * i + j] =
          a.R[3 * i] * b.R[j] + a.R[3 * i + 1] * b.R[3 + j] + a.R[3 * i + 2] * b.R[6 + j];
    c.t[i] = a.R[3 * i] * b.t[0] + a.R[3 * i + 1] * b.t[1] + a.R[3 * i + 2] * b.t[2] + a.t[i];
  }
  return c;
}

void store_4x4(const Rigid& g, float* m) {
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) m[4 * i + j] = g.R[3 * i + j];
    m[4 * i + 3] = g.t[i];
  }
  m[12] = m[13] = m[14] = 0.0f;
  m[15] = 1.0f;
}

int checked_restype(int64_t a) {
  FC_CHECK_MSG(a >= 0 && a < kRestypes, "aatype out of range: " + std::to_string(a));
  return static_cast<int>(a);
}

}  // namespace

void quat_to_rot(const float q[4], float R[9]) {
  const float a = q[0], b = q[1], c = q[2], d = q[3];
  R[0] = a * a + b * b - c * c - d * d;
  R[1] = 2 * (b * c - a * d);
  R[2] = 2 * (b * d + a * c);
  R[3] = 2 * (b * c + a * d);
  R[4] = a * a - b * b + c * c - d * d;
  R[5] = 2 * (c * d - a * b);
  R[6] = 2 * (b * d - a * c);
  R[7] = 2 * (c * d + a * b);
  R[8] = a * a - b * b - c * c + d * d;
}

void backbone_update(float q[4], float t[3], const float u[6]) {
  float R[9];
  quat_to_rot(q, R);
  for (int i = 0; i < 3; ++i) t[i] += R[3 * i] * u[3] + R[3 * i + 1] * u[4] + R[3 * i + 2] * u[5];
  const float w = q[0], x = q[1], y = q[2], z = q[3];
  const float b = u[0], c = u[1], d = u[2];
  // q * (0, b, c, d)
  float n[4] = {w - x * b - y * c - z * d, x + w * b + y * d - z * c, y + w * c - x * d + z * b,
                z + w * d + x * c - y * b};
  const float inv = 1.0f / std::sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2] + n[3] * n[3]);
  for (int i = 0; i < 4; ++i) q[i] = n[i] * inv;
}

void torsion_angles_to_frames(const int64_t* aatype, const float* rot, const float* trans,
                              const float* angles, int64_t r, float* frames) {
  const ResidueTables& T = residue_tables();
  for (int64_t i = 0; i < r; ++i) {
    const int rt = checked_restype(aatype[i]);
    Rigid bb;
    for (int k = 0; k < 9; ++k) bb.R[k] = rot[9 * i + k];
    for (int k = 0; k < 3; ++k) bb.t[k] = trans[3 * i + k];
    Rigid local[kRigidGroups];
    for (int g = 0; g < kRigidGroups; ++g) {
      // Rotation about x by the group's torsion: [[1, 0, 0], [0, cos, -sin], [0, sin, cos]].
      const float s = g == 0 ? 0.0f : angles[(i * 7 + g - 1) * 2];
      const float c = g == 0 ? 1.0f : angles[(i * 7 + g - 1) * 2 + 1];
      const Rigid rx = {{1, 0, 0, 0, c, -s, 0, s, c}, {0, 0, 0}};
      local[g] = compose(from_4x4(T.default_frame[rt][g]), rx);
    }
    for (int g = 5; g < kRigidGroups; ++g) local[g] = compose(local[g - 1], local[g]);
    for (int g = 0; g < kRigidGroups; ++g)
      store_4x4(compose(bb, local[g]), frames + (i * kRigidGroups + g) * 16);
  }
}

void frames_to_atom14(const int64_t* aatype, const float* frames, int64_t r, float* pos14) {
  const ResidueTables& T = residue_tables();
  for (int64_t i = 0; i < r; ++i) {
    const int rt = checked_restype(aatype[i]);
    for (int a = 0; a < kAtom14; ++a) {
      const float* m = frames + (i * kRigidGroups + T.atom14_to_group[rt][a]) * 16;
      const float* p = T.atom14_group_positions[rt][a];
      float* out = pos14 + (i * kAtom14 + a) * 3;
      for (int k = 0; k < 3; ++k)
        out[k] = (m[4 * k] * p[0] + m[4 * k + 1] * p[1] + m[4 * k + 2] * p[2] + m[4 * k + 3]) *
                 T.atom14_mask[rt][a];
    }
  }
}

void atom14_to_atom37(const int64_t* aatype, const float* pos14, int64_t r, float* pos37,
                      float* mask37) {
  const ResidueTables& T = residue_tables();
  for (int64_t i = 0; i < r; ++i) {
    const int rt = checked_restype(aatype[i]);
    for (int a = 0; a < kAtom37; ++a) {
      const float* src = pos14 + (i * kAtom14 + T.atom37_to_atom14[rt][a]) * 3;
      const float m = T.atom37_mask[rt][a];
      for (int k = 0; k < 3; ++k) pos37[(i * kAtom37 + a) * 3 + k] = src[k] * m;
      if (mask37) mask37[i * kAtom37 + a] = m;
    }
  }
}

void pseudo_beta(const int64_t* aatype, const float* pos37, int64_t r, float* pb) {
  constexpr int kCA = 1, kCB = 3, kGly = 7;
  for (int64_t i = 0; i < r; ++i) {
    const int a = checked_restype(aatype[i]) == kGly ? kCA : kCB;
    for (int k = 0; k < 3; ++k) pb[3 * i + k] = pos37[(i * kAtom37 + a) * 3 + k];
  }
}

}  // namespace fc::af2
