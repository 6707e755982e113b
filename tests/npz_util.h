// Test helpers: .npy and zip (npz) archives built byte by byte, so that tests can also build
// archives that lie (sizes, offsets, versions) in ways a real writer never would.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "foldcube/io.h"
#include "foldcube/tensor.h"

namespace fc::test {

inline uint32_t crc32(const std::string& s) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char b : s) c = table[(c ^ b) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

inline void put_le(std::string* s, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

// A .npy file: magic, version, header length, `header` padded with spaces and a newline so that
// the data start at a multiple of 64 (as numpy writes), then `data`.
inline std::string npy_raw(const std::string& header, const std::string& data, int major = 1) {
  const size_t prefix = major == 1 ? 10 : 12;
  std::string h = header;
  while ((prefix + h.size() + 1) % 64 != 0) h.push_back(' ');
  h.push_back('\n');
  std::string s = "\x93NUMPY";
  s.push_back(static_cast<char>(major));
  s.push_back(0);
  put_le(&s, h.size(), major == 1 ? 2 : 4);
  return s + h + data;
}

// A .npy file of `descr` and a Python shape tuple such as "(2, 3)" or "()".
inline std::string npy(const std::string& descr, const std::string& shape, const std::string& data,
                       bool fortran = false, int major = 1) {
  return npy_raw("{'descr': '" + descr + "', 'fortran_order': " + (fortran ? "True" : "False") +
                     ", 'shape': " + shape + ", }",
                 data, major);
}

template <typename T>
std::string bytes_of(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

constexpr uint64_t kAuto = ~uint64_t{0};

// One zip member as written (data are the stored or compressed bytes); every header field can be
// overridden to build lying archives.
struct ZipEntry {
  std::string name;
  std::string data;
  uint16_t method = 0;  // 0 stored, 8 deflate, ...
  uint16_t flags = 0;
  uint64_t size = kAuto;       // declared uncompressed size (default: data.size())
  uint64_t comp_size = kAuto;  // declared compressed size (default: data.size())
  uint32_t crc = 0;            // with crc_set
  bool crc_set = false;
  uint64_t offset = kAuto;    // declared local-header offset in the central directory
  bool central_only = false;  // no local header and data written: only the central entry
};

// A local file header (no zip64 extra) for a member of `data`, stored.
inline std::string local_header(const std::string& name, const std::string& data) {
  std::string out;
  put_le(&out, 0x04034b50, 4);
  put_le(&out, 20, 2);
  put_le(&out, 0, 2);
  put_le(&out, 0, 2);
  put_le(&out, 0, 4);
  put_le(&out, crc32(data), 4);
  put_le(&out, data.size(), 4);
  put_le(&out, data.size(), 4);
  put_le(&out, name.size(), 2);
  put_le(&out, 0, 2);
  return out + name;
}

// A zip archive of `entries` (local headers and data, central directory, end records). With
// zip64 every size and offset also goes to zip64 extra fields (0xFFFFFFFF in the 32-bit fields)
// and a zip64 end record and locator are written, as numpy does for large files.
inline std::string build_zip(const std::vector<ZipEntry>& entries, bool zip64 = false) {
  std::string out, central;
  for (const ZipEntry& e : entries) {
    const uint64_t size = e.size == kAuto ? e.data.size() : e.size;
    const uint64_t comp = e.comp_size == kAuto ? e.data.size() : e.comp_size;
    const uint32_t crc = e.crc_set ? e.crc : crc32(e.method == 0 ? e.data : std::string());
    const uint64_t local_offset = out.size();
    const uint64_t offset = e.offset == kAuto ? local_offset : e.offset;
    const uint16_t version = zip64 ? 45 : 20;
    // Local header.
    if (!e.central_only) {
      put_le(&out, 0x04034b50, 4);
      put_le(&out, version, 2);
      put_le(&out, e.flags, 2);
      put_le(&out, e.method, 2);
      put_le(&out, 0, 4);  // time, date
      put_le(&out, crc, 4);
      put_le(&out, zip64 ? 0xFFFFFFFFu : comp, 4);
      put_le(&out, zip64 ? 0xFFFFFFFFu : size, 4);
      put_le(&out, e.name.size(), 2);
      put_le(&out, zip64 ? 20 : 0, 2);
      out += e.name;
      if (zip64) {
        put_le(&out, 0x0001, 2);
        put_le(&out, 16, 2);
        put_le(&out, size, 8);
        put_le(&out, comp, 8);
      }
      out += e.data;
    }
    // Central directory entry.
    put_le(&central, 0x02014b50, 4);
    put_le(&central, version, 2);
    put_le(&central, version, 2);
    put_le(&central, e.flags, 2);
    put_le(&central, e.method, 2);
    put_le(&central, 0, 4);
    put_le(&central, crc, 4);
    put_le(&central, zip64 ? 0xFFFFFFFFu : comp, 4);
    put_le(&central, zip64 ? 0xFFFFFFFFu : size, 4);
    put_le(&central, e.name.size(), 2);
    put_le(&central, zip64 ? 28 : 0, 2);
    put_le(&central, 0, 2);  // comment length
    put_le(&central, 0, 2);  // disk
    put_le(&central, 0, 2);  // internal attributes
    put_le(&central, 0, 4);  // external attributes
    put_le(&central, zip64 ? 0xFFFFFFFFu : offset, 4);
    central += e.name;
    if (zip64) {
      put_le(&central, 0x0001, 2);
      put_le(&central, 24, 2);
      put_le(&central, size, 8);
      put_le(&central, comp, 8);
      put_le(&central, offset, 8);
    }
  }
  const uint64_t cd_offset = out.size(), cd_size = central.size(), n = entries.size();
  out += central;
  if (zip64) {
    const uint64_t eocd64 = out.size();
    put_le(&out, 0x06064b50, 4);
    put_le(&out, 44, 8);
    put_le(&out, 45, 2);
    put_le(&out, 45, 2);
    put_le(&out, 0, 4);
    put_le(&out, 0, 4);
    put_le(&out, n, 8);
    put_le(&out, n, 8);
    put_le(&out, cd_size, 8);
    put_le(&out, cd_offset, 8);
    put_le(&out, 0x07064b50, 4);
    put_le(&out, 0, 4);
    put_le(&out, eocd64, 8);
    put_le(&out, 1, 4);
  }
  put_le(&out, 0x06054b50, 4);
  put_le(&out, 0, 4);  // disks
  put_le(&out, zip64 ? 0xFFFF : n, 2);
  put_le(&out, zip64 ? 0xFFFF : n, 2);
  put_le(&out, zip64 ? 0xFFFFFFFFu : cd_size, 4);
  put_le(&out, zip64 ? 0xFFFFFFFFu : cd_offset, 4);
  put_le(&out, 0, 2);
  return out;
}

// An npz of F32 tensors (C order), members "<name>.npy" in names order.
inline std::string npz_of(const TensorFile& f, bool zip64 = false) {
  std::vector<ZipEntry> entries;
  for (const std::string& name : f.names) {
    const Tensor t = f.tensors.at(name).contiguous();
    std::string shape = "(";  // Python tuple: "()", "(5,)", "(2, 3)"
    for (int i = 0; i < t.ndim(); ++i) shape += (i ? ", " : "") + std::to_string(t.dim(i));
    shape += t.ndim() == 1 ? ",)" : ")";
    const std::string data(t.data<char>(), t.nbytes());
    entries.push_back({name + ".npy", npy(t.dtype() == DType::F64 ? "<f8" : "<f4", shape, data)});
  }
  return build_zip(entries, zip64);
}

}  // namespace fc::test
