// numpy .npz reader: a zip archive of .npy arrays (DeepMind's params_model_*.npz is one).
// The zip layer is libzip (central directory, zip64, deflate, CRC); this file checks what libzip
// reports against the archive size and parses each .npy header itself. Nothing is allocated for
// a member before its header is validated and its byte count matches the member's size, and the
// members' sizes together are bounded by the archive size, so memory use is bounded by the file.
#include <zip.h>

#include <algorithm>
#include <bit>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "foldcube/io.h"
#include "io/io_util.h"

namespace fc {
namespace {

static_assert(std::endian::native == std::endian::little,
              ".npy data are read as little endian; a big-endian host would need byte swapping");

using io::printable;

constexpr uint64_t kMaxNpyHeaderBytes = uint64_t{1} << 20;
constexpr size_t kMaxRank = 64;
// Deflate cannot expand data more than ~1032:1; a member claiming more is lying about its size.
constexpr uint64_t kDeflateMaxRatio = 1032;
constexpr uint64_t kDeflateSlack = 1024;
constexpr uint64_t kMinZipBytes = 22;              // the end-of-central-directory record
constexpr size_t kConvertChunk = size_t{1} << 16;  // bytes per read when converting dtypes

// The .npy element types read, and the tensor dtype each becomes (exactly representable).
enum class NpyType : uint8_t { kF16, kF32, kF64, kU8, kBool, kI32, kI64 };
struct NpyDtype {
  const char* descr;
  NpyType type;
  size_t size;
  DType out;
  bool direct;  // the bytes are the tensor's (no conversion)
};
constexpr NpyDtype kNpyDtypes[] = {
    {"<f4", NpyType::kF32, 4, DType::F32, true},   {"<f8", NpyType::kF64, 8, DType::F64, true},
    {"<i4", NpyType::kI32, 4, DType::I32, true},   {"<i8", NpyType::kI64, 8, DType::I64, true},
    {"<f2", NpyType::kF16, 2, DType::F32, false},  {"|u1", NpyType::kU8, 1, DType::F32, false},
    {"|b1", NpyType::kBool, 1, DType::F32, false},
};
constexpr const char* kSupportedDescrs = "'<f4', '<f8', '<i4', '<i8', '<f2', '|u1', '|b1'";

struct NpyHeader {
  const NpyDtype* dtype = nullptr;
  bool fortran_order = false;
  Shape shape;
};

// Parses the header dict of a .npy file, a Python literal such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (22, 32), }
// followed by spaces and a newline. Exactly the three keys, each once; strings without escapes;
// shape a tuple of non-negative integers (an 'L' suffix is accepted). Returns false with `error`.
class NpyHeaderParser {
 public:
  explicit NpyHeaderParser(const std::string& text) : s_(text) {}

  bool parse(NpyHeader* out, std::string* error) {
    bool has_descr = false, has_fortran = false, has_shape = false;
    std::string descr;
    skip_ws();
    if (!eat('{')) return fail("header is not a dict", error);
    while (true) {
      skip_ws();
      if (eat('}')) break;
      std::string key;
      if (!string(&key)) return fail("bad key in the header dict", error);
      skip_ws();
      if (!eat(':')) return fail("expected ':' after " + printable(key), error);
      skip_ws();
      if (key == "descr") {
        if (has_descr) return fail("duplicate key 'descr'", error);
        has_descr = true;
        if (peek() == '[') return fail("structured dtypes are not supported", error);
        if (!string(&descr)) return fail("'descr' is not a string", error);
      } else if (key == "fortran_order") {
        if (has_fortran) return fail("duplicate key 'fortran_order'", error);
        has_fortran = true;
        if (word("True")) {
          out->fortran_order = true;
        } else if (word("False")) {
          out->fortran_order = false;
        } else {
          return fail("'fortran_order' is not True or False", error);
        }
      } else if (key == "shape") {
        if (has_shape) return fail("duplicate key 'shape'", error);
        has_shape = true;
        std::string why;
        if (!tuple(&out->shape, &why)) return fail(why, error);
      } else {
        return fail("unexpected key " + printable(key) + " in the header dict", error);
      }
      skip_ws();
      if (eat(',')) continue;
      if (eat('}')) break;
      return fail("expected ',' or '}' in the header dict", error);
    }
    skip_ws();
    if (p_ != s_.size()) return fail("trailing characters after the header dict", error);
    if (!has_descr || !has_fortran || !has_shape)
      return fail("header dict lacks 'descr', 'fortran_order' or 'shape'", error);
    for (const NpyDtype& d : kNpyDtypes)
      if (descr == d.descr) out->dtype = &d;
    if (out->dtype == nullptr)
      return fail(
          "unsupported dtype " + printable(descr) + " (supported: " + kSupportedDescrs + ")",
          error);
    return true;
  }

 private:
  static bool fail(const std::string& why, std::string* error) {
    *error = why;
    return false;
  }
  char peek() const { return p_ < s_.size() ? s_[p_] : '\0'; }
  bool eat(char c) {
    if (peek() != c) return false;
    ++p_;
    return true;
  }
  void skip_ws() {
    while (p_ < s_.size() && (s_[p_] == ' ' || s_[p_] == '\n' || s_[p_] == '\t' || s_[p_] == '\r'))
      ++p_;
  }
  bool word(const char* w) {
    const size_t n = std::strlen(w);
    if (s_.compare(p_, n, w) != 0) return false;
    p_ += n;
    return true;
  }
  bool string(std::string* out) {
    const char q = peek();
    if (q != '\'' && q != '"') return false;
    const size_t end = s_.find(q, p_ + 1);
    if (end == std::string::npos) return false;
    *out = s_.substr(p_ + 1, end - p_ - 1);
    if (out->find('\\') != std::string::npos) return false;
    p_ = end + 1;
    return true;
  }
  bool integer(int64_t* v, std::string* why) {
    if (peek() == '-') return fail("'shape' has a negative dimension", why);
    if (peek() < '0' || peek() > '9') return fail("'shape' is not a tuple of integers", why);
    uint64_t x = 0;
    while (peek() >= '0' && peek() <= '9') {
      const uint64_t digit = static_cast<uint64_t>(s_[p_++] - '0');
      if (x > (static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) - digit) / 10)
        return fail("'shape' has an absurd dimension", why);
      x = x * 10 + digit;
    }
    eat('L');
    *v = static_cast<int64_t>(x);
    return true;
  }
  bool tuple(Shape* shape, std::string* why) {
    if (!eat('(')) return fail("'shape' is not a tuple", why);
    skip_ws();
    while (!eat(')')) {
      if (shape->size() >= kMaxRank)
        return fail("'shape' has more than " + std::to_string(kMaxRank) + " dimensions", why);
      int64_t d = 0;
      if (!integer(&d, why)) return false;
      shape->push_back(d);
      skip_ws();
      if (eat(',')) {
        skip_ws();
        continue;
      }
      if (eat(')')) break;
      return fail("'shape' is not a tuple of integers", why);
    }
    return true;
  }

  const std::string& s_;
  size_t p_ = 0;
};

// IEEE binary16 -> binary32 (exact: every half is a float).
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0 && mant == 0) {
    bits = sign;
  } else if (exp == 0) {  // subnormal: normalise
    uint32_t e = 113;     // exponent of 2^-14 in binary32, lowered once per shift
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3FFu) << 13);
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf, NaN (payload kept)
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

// Converts n elements of a non-direct type `t` from src into dst (F32).
void convert(NpyType t, const uint8_t* src, size_t n, float* dst) {
  for (size_t i = 0; i < n; ++i) {
    switch (t) {
      case NpyType::kF16: {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = half_to_float(h);
        break;
      }
      case NpyType::kU8:
        dst[i] = static_cast<float>(src[i]);
        break;
      case NpyType::kBool:
        dst[i] = src[i] != 0 ? 1.f : 0.f;
        break;
      default:
        FC_CHECK_MSG(false, "direct dtypes are not converted");
    }
  }
}

struct ZipDiscard {
  void operator()(zip_t* z) const { zip_discard(z); }
};
struct ZipFileClose {
  void operator()(zip_file_t* f) const { zip_fclose(f); }
};
using ZipPtr = std::unique_ptr<zip_t, ZipDiscard>;
using ZipFilePtr = std::unique_ptr<zip_file_t, ZipFileClose>;

// One member as the central directory describes it, checked against the archive.
struct Member {
  zip_uint64_t index;
  std::string key;  // the name without ".npy"
  uint64_t size;    // uncompressed bytes
};

// Reads exactly n bytes of an open member; on failure a reason ("CRC error", "ends early").
bool read_exact(zip_file_t* zf, void* dst, uint64_t n, std::string* why) {
  char* p = static_cast<char*>(dst);
  while (n > 0) {
    const zip_uint64_t want = std::min<uint64_t>(n, uint64_t{1} << 30);
    const zip_int64_t got = zip_fread(zf, p, want);
    if (got < 0) {
      *why = zip_file_strerror(zf);
      return false;
    }
    if (got == 0) {
      *why = "data end " + std::to_string(n) + " bytes before the declared size";
      return false;
    }
    p += got;
    n -= static_cast<uint64_t>(got);
  }
  return true;
}

// Reads one .npy member into a tensor (validated header first, then one allocation).
Status read_member(zip_t* za, const Member& m, const std::string& where, Tensor* out) {
  const std::string label = where + "member " + printable(m.key) + ": ";
  ZipFilePtr zf(zip_fopen_index(za, m.index, 0));
  if (!zf) return Status::InvalidArgument(label + "cannot open (" + zip_strerror(za) + ")");
  std::string why;
  auto bad = [&](const std::string& what) { return Status::InvalidArgument(label + what); };

  unsigned char pre[12];
  if (m.size < 10) return bad("too short for a .npy header (" + std::to_string(m.size) + " bytes)");
  if (!read_exact(zf.get(), pre, 10, &why)) return bad(why);
  if (std::memcmp(pre, "\x93NUMPY", 6) != 0) return bad("not a .npy array (bad magic)");
  const int major = pre[6], minor = pre[7];
  if (major < 1 || major > 3 || minor != 0)
    return bad("unsupported .npy format version " + std::to_string(major) + "." +
               std::to_string(minor));
  uint64_t prefix = 10, header_len = static_cast<uint64_t>(pre[8]) | (uint64_t{pre[9]} << 8);
  if (major >= 2) {
    if (m.size < 12) return bad("too short for a .npy v2 header");
    if (!read_exact(zf.get(), pre + 10, 2, &why)) return bad(why);
    prefix = 12;
    header_len |= (uint64_t{pre[10]} << 16) | (uint64_t{pre[11]} << 24);
  }
  if (header_len > kMaxNpyHeaderBytes)
    return bad("header length " + std::to_string(header_len) + " exceeds the " +
               std::to_string(kMaxNpyHeaderBytes) + "-byte limit");
  if (header_len > m.size - prefix)
    return bad("header length " + std::to_string(header_len) + " exceeds the member (" +
               std::to_string(m.size) + " bytes)");
  std::string text(header_len, '\0');
  if (!read_exact(zf.get(), text.data(), header_len, &why)) return bad(why);
  NpyHeader h;
  if (!NpyHeaderParser(text).parse(&h, &why)) return bad(why);

  // The product of the non-zero dims must fit in int64 (numel and strides never overflow).
  int64_t nonzero = 1;
  for (int64_t d : h.shape)
    if (d != 0 && __builtin_mul_overflow(nonzero, d, &nonzero))
      return bad("absurdly large shape " + shape_str(h.shape));
  const uint64_t numel = static_cast<uint64_t>(shape_numel(h.shape));
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<uint64_t>(h.dtype->size), &nbytes))
    return bad("absurdly large shape " + shape_str(h.shape));
  const uint64_t data_bytes = m.size - prefix - header_len;
  if (nbytes != data_bytes)
    return bad(std::string(h.dtype->descr) + " " + shape_str(h.shape) + " needs " +
               std::to_string(nbytes) + " bytes but the member holds " +
               std::to_string(data_bytes) + " after its header");

  // Fortran order: the bytes are the C-order array of the reversed shape.
  Shape stored = h.shape;
  if (h.fortran_order) std::reverse(stored.begin(), stored.end());
  Tensor t = Tensor::empty(stored, h.dtype->out);
  if (h.dtype->direct) {
    if (!read_exact(zf.get(), t.data<char>(), nbytes, &why)) return bad(why);
  } else {
    std::vector<uint8_t> chunk(std::min<uint64_t>(nbytes, kConvertChunk));  // [bytes]
    const size_t per = chunk.size() / h.dtype->size;
    for (uint64_t done = 0; done < numel;) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(per, numel - done));
      if (!read_exact(zf.get(), chunk.data(), n * h.dtype->size, &why)) return bad(why);
      convert(h.dtype->type, chunk.data(), n, t.data<float>() + done);
      done += n;
    }
  }
  // Reading past the end verifies the CRC and that no data follow the declared size.
  char extra;
  const zip_int64_t tail = zip_fread(zf.get(), &extra, 1);
  if (tail < 0) return bad(zip_file_strerror(zf.get()));
  if (tail > 0) return bad("more data than the declared size");
  if (h.fortran_order) {
    std::vector<int> rev(stored.size());
    for (size_t i = 0; i < rev.size(); ++i) rev[i] = static_cast<int>(rev.size() - 1 - i);
    t = t.permute(rev).contiguous();
  }
  *out = std::move(t);
  return Status::OK();
}

// Lists and checks the members: names (unique after dropping ".npy"), no encryption, stored or
// deflated, sizes consistent with the archive size.
Status list_members(zip_t* za, uint64_t archive_size, const std::string& where,
                    std::vector<Member>* out) {
  const zip_int64_t n = zip_get_num_entries(za, 0);
  if (n < 0) return Status::InvalidArgument(where + "cannot count the zip entries");
  std::unordered_set<std::string> seen;
  uint64_t total_compressed = 0;
  constexpr zip_uint64_t kNeeded = ZIP_STAT_NAME | ZIP_STAT_SIZE | ZIP_STAT_COMP_SIZE |
                                   ZIP_STAT_COMP_METHOD | ZIP_STAT_ENCRYPTION_METHOD;
  for (zip_int64_t i = 0; i < n; ++i) {
    zip_stat_t st;
    zip_stat_init(&st);
    const zip_uint64_t index = static_cast<zip_uint64_t>(i);
    if (zip_stat_index(za, index, ZIP_FL_ENC_RAW, &st) != 0 || (st.valid & kNeeded) != kNeeded)
      return Status::InvalidArgument(where + "cannot read zip entry " + std::to_string(i) + " (" +
                                     zip_strerror(za) + ")");
    std::string key = st.name;
    const std::string label = where + "member " + printable(key) + ": ";
    if (key.size() >= 4 && key.compare(key.size() - 4, 4, ".npy") == 0) key.resize(key.size() - 4);
    if (key.empty() || key.back() == '/')
      return Status::InvalidArgument(label + "not an array name (empty or a directory)");
    if (!seen.insert(key).second)
      return Status::InvalidArgument(label + "duplicate array name " + printable(key));
    if (st.encryption_method != ZIP_EM_NONE)
      return Status::InvalidArgument(label + "encrypted members are not supported");
    if (st.comp_method == ZIP_CM_STORE) {
      if (st.size != st.comp_size)
        return Status::InvalidArgument(label + "stored member with size " +
                                       std::to_string(st.size) + " != compressed size " +
                                       std::to_string(st.comp_size));
    } else if (st.comp_method == ZIP_CM_DEFLATE) {
      if (st.comp_size >
              (std::numeric_limits<uint64_t>::max() - kDeflateSlack) / kDeflateMaxRatio ||
          st.size > st.comp_size * kDeflateMaxRatio + kDeflateSlack)
        return Status::InvalidArgument(label + "claims " + std::to_string(st.size) +
                                       " bytes from " + std::to_string(st.comp_size) +
                                       " deflated bytes, more than deflate can expand");
    } else {
      return Status::InvalidArgument(label + "compression method " +
                                     std::to_string(st.comp_method) +
                                     " is not supported (stored or deflate only)");
    }
    // Members cannot share bytes: together they fit in the archive.
    if (__builtin_add_overflow(total_compressed, st.comp_size, &total_compressed) ||
        total_compressed > archive_size)
      return Status::InvalidArgument(label + "the members claim more bytes than the archive (" +
                                     std::to_string(archive_size) +
                                     " bytes) holds: overlapping or truncated");
    out->push_back(Member{index, std::move(key), st.size});
  }
  return Status::OK();
}

using MemberFn = std::function<Status(const std::string& key, Tensor t)>;

// Opens `src` (taking ownership) as a zip archive of `archive_size` bytes and passes every member
// to fn as it is read.
Status parse_archive_each(zip_source_t* src, uint64_t archive_size, const std::string& where,
                          const MemberFn& fn) {
  if (archive_size < kMinZipBytes) {  // libzip opens an empty source as an empty archive
    zip_source_free(src);
    return Status::InvalidArgument(where + "not a readable zip archive (" +
                                   std::to_string(archive_size) +
                                   " bytes, shorter than a zip end record)");
  }
  zip_error_t ze;
  zip_error_init(&ze);
  ZipPtr za(zip_open_from_source(src, ZIP_RDONLY | ZIP_CHECKCONS, &ze));
  if (!za) {
    const std::string why = zip_error_strerror(&ze);
    zip_error_fini(&ze);
    zip_source_free(src);
    return Status::InvalidArgument(where + "not a readable zip archive (" + why + ")");
  }
  zip_error_fini(&ze);
  std::vector<Member> members;
  FC_RETURN_IF_ERROR(list_members(za.get(), archive_size, where, &members));
  for (const Member& m : members) {
    Tensor t;
    FC_RETURN_IF_ERROR(read_member(za.get(), m, where, &t));
    FC_RETURN_IF_ERROR(fn(m.key, std::move(t)));
  }
  return Status::OK();
}

// Every member into *out (untouched on error).
Status parse_archive(zip_source_t* src, uint64_t archive_size, const std::string& where,
                     TensorFile* out) {
  TensorFile result;
  FC_RETURN_IF_ERROR(
      parse_archive_each(src, archive_size, where, [&](const std::string& key, Tensor t) {
        result.put(key, t);
        return Status::OK();
      }));
  *out = std::move(result);
  return Status::OK();
}

// The archive at path as a zip source, with its size.
Status open_archive(const std::string& path, zip_source_t** src, uint64_t* size) {
  const std::string where = path + ": ";
  FC_RETURN_IF_ERROR(io::check_regular_file(path));
  std::error_code ec;
  *size = std::filesystem::file_size(path, ec);
  if (ec) return Status::IOError(where + "cannot tell size: " + ec.message());
  zip_error_t ze;
  zip_error_init(&ze);
  *src = zip_source_file_create(path.c_str(), 0, 0, &ze);
  if (*src == nullptr) {
    const std::string why = zip_error_strerror(&ze);
    zip_error_fini(&ze);
    return Status::IOError(where + "cannot open (" + why + ")");
  }
  zip_error_fini(&ze);
  return Status::OK();
}

bool is_zip_magic(const unsigned char* b, size_t n) {
  return n >= 4 && b[0] == 'P' && b[1] == 'K' &&
         ((b[2] == 3 && b[3] == 4) || (b[2] == 5 && b[3] == 6));
}

}  // namespace

Status parse_npz_bytes(const uint8_t* data, size_t size, const std::string& label,
                       TensorFile* out) {
  const std::string where = label + ": ";
  zip_error_t ze;
  zip_error_init(&ze);
  zip_source_t* src = zip_source_buffer_create(size > 0 ? data : nullptr, size, 0, &ze);
  if (src == nullptr) {
    const std::string why = zip_error_strerror(&ze);
    zip_error_fini(&ze);
    return Status::Internal(where + "cannot wrap the bytes (" + why + ")");
  }
  zip_error_fini(&ze);
  return parse_archive(src, size, where, out);
}

Status read_npz(const std::string& path, TensorFile* out) {
  zip_source_t* src = nullptr;
  uint64_t size = 0;
  FC_RETURN_IF_ERROR(open_archive(path, &src, &size));
  return parse_archive(src, size, path + ": ", out);
}

Status io::read_npz_each(const std::string& path, const MemberFn& fn) {
  zip_source_t* src = nullptr;
  uint64_t size = 0;
  FC_RETURN_IF_ERROR(open_archive(path, &src, &size));
  return parse_archive_each(src, size, path + ": ", fn);
}

bool io::starts_like_zip(const std::string& path) {
  unsigned char magic[4] = {0, 0, 0, 0};
  size_t n = 0;
  if (FILE* f = std::fopen(path.c_str(), "rb")) {
    n = std::fread(magic, 1, sizeof magic, f);
    std::fclose(f);
  }
  return is_zip_magic(magic, n);
}

Status read_tensor_file(const std::string& path, TensorFile* out) {
  FC_RETURN_IF_ERROR(io::check_regular_file(path));
  return io::starts_like_zip(path) ? read_npz(path, out) : read_safetensors(path, out);
}

}  // namespace fc
