// safetensors read/write. Layout: u64 little-endian N | N bytes of JSON header | data section.
// The reader treats the file as hostile: the header is parsed with a streaming (SAX) parser that
// stops at the first unexpected token, and every size and offset is checked against the file size
// before any tensor memory is allocated, so memory use is bounded by the file size.

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include "foldcube/io.h"
#include "io/io_util.h"

namespace fc {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors data are little endian; a big-endian host would need byte swapping");

using json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;  // same cap as the reference reader
constexpr size_t kMaxRank = 64;
constexpr int kMaxSkipDepth = 32;  // nesting allowed inside ignored entry fields

using io::printable;

// "[json.exception.parse_error.101] parse error at ..." -> "parse error at ..."
std::string json_error_text(const std::exception& e) {
  const std::string what = e.what();
  const size_t p = what.find("] ");
  return p == std::string::npos ? what : what.substr(p + 2);
}

std::string tensor_label(const std::string& name) { return "tensor " + printable(name); }

struct RawEntry {
  std::string name;
  std::string dtype;
  Shape shape;
  std::vector<uint64_t> offsets;  // [begin, end) relative to the data section
  bool has_dtype = false, has_shape = false, has_offsets = false;
};

// Streams the header JSON into entries and metadata. Every handler returns false (which aborts
// the parse at once) on anything but the expected structure:
//   {"__metadata__": {str: str, ...} | null,
//    name: {"dtype": str, "shape": [uint, ...], "data_offsets": [uint, uint], other: any}, ...}
class HeaderParser : public nlohmann::json_sax<json> {
 public:
  std::vector<RawEntry> entries;
  std::map<std::string, std::string> metadata;
  std::string error;         // set when a handler rejected the input
  std::string syntax_error;  // set by the JSON parser

  bool null() override {
    if (state_ == State::kRoot && key_ == "__metadata__") return true;  // "no metadata"
    return scalar("null");
  }
  bool boolean(bool) override { return scalar("a boolean"); }
  bool number_integer(number_integer_t v) override {
    if (v >= 0) return number_unsigned(static_cast<number_unsigned_t>(v));  // "-0"
    if (state_ == State::kShape)
      return fail(entry_label() + " has a negative dimension (" + std::to_string(v) + ")");
    if (state_ == State::kOffsets) return fail(entry_label() + " has a negative data offset");
    return scalar("a number");
  }
  bool number_unsigned(number_unsigned_t v) override {
    if (state_ == State::kShape) {
      if (cur_.shape.size() >= kMaxRank)
        return fail(entry_label() + " has more than " + std::to_string(kMaxRank) + " dimensions");
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        return fail(entry_label() + " has an absurd dimension (" + std::to_string(v) + ")");
      cur_.shape.push_back(static_cast<int64_t>(v));
      return true;
    }
    if (state_ == State::kOffsets) {
      if (cur_.offsets.size() >= 2)
        return fail(entry_label() + ": data_offsets must have 2 entries");
      cur_.offsets.push_back(v);
      return true;
    }
    return scalar("a number");
  }
  bool number_float(number_float_t, const string_t&) override {
    if (state_ == State::kShape || state_ == State::kOffsets)
      return fail(entry_label() + ": " + field_ + " entries must be non-negative integers");
    return scalar("a number");
  }
  bool string(string_t& s) override {
    if (state_ == State::kMeta) {
      metadata[key_] = s;
      return true;
    }
    if (state_ == State::kEntry && field_ == "dtype") {
      cur_.dtype = s;
      return true;
    }
    return scalar("a string");
  }
  bool binary(binary_t&) override { return scalar("binary"); }

  bool start_object(std::size_t) override {
    switch (state_) {
      case State::kStart:
        state_ = State::kRoot;
        return true;
      case State::kRoot:
        if (key_ == "__metadata__") {
          state_ = State::kMeta;
        } else {
          cur_ = RawEntry();
          cur_.name = key_;
          state_ = State::kEntry;
        }
        return true;
      case State::kEntry:
        return known_field() ? scalar("an object") : start_skip();
      case State::kSkip:
        return nest_skip();
      default:
        return scalar("an object");
    }
  }
  bool start_array(std::size_t) override {
    switch (state_) {
      case State::kEntry:
        if (field_ == "shape") {
          state_ = State::kShape;
          return true;
        }
        if (field_ == "data_offsets") {
          state_ = State::kOffsets;
          return true;
        }
        return known_field() ? scalar("an array") : start_skip();
      case State::kSkip:
        return nest_skip();
      default:
        return scalar("an array");
    }
  }
  bool end_array() override {
    switch (state_) {
      case State::kShape:
        state_ = State::kEntry;
        return true;
      case State::kOffsets:
        if (cur_.offsets.size() != 2)
          return fail(entry_label() + ": data_offsets must have 2 entries");
        state_ = State::kEntry;
        return true;
      case State::kSkip:
        return unnest_skip();
      default:  // unreachable: arrays are only entered in the states above
        return fail("unexpected end of array");
    }
  }
  bool key(string_t& k) override {
    switch (state_) {
      case State::kRoot:
        if (!seen_.insert(k).second)
          return fail("duplicate key " + printable(k) + " in the header");
        key_ = k;
        return true;
      case State::kMeta:
        if (metadata.count(k)) return fail("duplicate __metadata__ key " + printable(k));
        key_ = k;
        return true;
      case State::kEntry: {
        field_ = k;
        bool* has = k == "dtype"          ? &cur_.has_dtype
                    : k == "shape"        ? &cur_.has_shape
                    : k == "data_offsets" ? &cur_.has_offsets
                                          : nullptr;
        if (has != nullptr && *has)
          return fail(entry_label() + " has a duplicate '" + k + "' field");
        if (has != nullptr) *has = true;
        return true;
      }
      default:
        return true;  // keys inside skipped values
    }
  }
  bool end_object() override {
    switch (state_) {
      case State::kRoot:
        state_ = State::kDone;
        return true;
      case State::kMeta:
        state_ = State::kRoot;
        return true;
      case State::kEntry:
        if (!cur_.has_dtype) return fail(entry_label() + " has no 'dtype'");
        if (!cur_.has_shape) return fail(entry_label() + " has no 'shape'");
        if (!cur_.has_offsets) return fail(entry_label() + " has no 'data_offsets'");
        entries.push_back(std::move(cur_));
        state_ = State::kRoot;
        return true;
      case State::kSkip:
        return unnest_skip();
      default:  // unreachable: objects are only entered in the states above
        return fail("unexpected end of object");
    }
  }
  bool parse_error(std::size_t, const std::string&,
                   const nlohmann::detail::exception& ex) override {
    syntax_error = json_error_text(ex);
    return false;
  }

 private:
  enum class State { kStart, kRoot, kMeta, kEntry, kShape, kOffsets, kSkip, kDone };

  bool fail(std::string msg) {
    if (error.empty()) error = std::move(msg);
    return false;
  }
  std::string entry_label() const { return tensor_label(cur_.name); }
  bool known_field() const {
    return field_ == "dtype" || field_ == "shape" || field_ == "data_offsets";
  }
  // A value of a kind the current position does not allow.
  bool scalar(const char* kind) {
    switch (state_) {
      case State::kStart:
        return fail(std::string("header is ") + kind + ", not a JSON object");
      case State::kRoot:
        if (key_ == "__metadata__")
          return fail(std::string("__metadata__ is ") + kind + ", not an object");
        return fail(tensor_label(key_) + " is " + kind + ", not an object");
      case State::kMeta:
        return fail("__metadata__ value for " + printable(key_) + " is " + kind + ", not a string");
      case State::kEntry:
        if (field_ == "dtype") return fail(entry_label() + ": dtype is " + kind + ", not a string");
        if (field_ == "shape" || field_ == "data_offsets")
          return fail(entry_label() + ": " + field_ + " is " + kind + ", not an array");
        return true;  // unknown field with a scalar value: ignored
      case State::kShape:
      case State::kOffsets:
        return fail(entry_label() + ": " + field_ + " contains " + kind +
                    ", expected non-negative integers");
      case State::kSkip:
        return true;
      case State::kDone:
        break;
    }
    return fail("unexpected value after the header object");
  }
  bool start_skip() {
    state_ = State::kSkip;
    skip_depth_ = 1;
    return true;
  }
  bool nest_skip() {
    if (++skip_depth_ > kMaxSkipDepth)
      return fail(entry_label() + ": field '" + field_ + "' nests too deeply");
    return true;
  }
  bool unnest_skip() {
    if (--skip_depth_ == 0) state_ = State::kEntry;
    return true;
  }

  State state_ = State::kStart;
  std::string key_;    // current key in the root or metadata object
  std::string field_;  // current field of the entry
  RawEntry cur_;
  std::unordered_set<std::string> seen_;
  int skip_depth_ = 0;
};

struct FileCloser {
  void operator()(FILE* f) const { std::fclose(f); }
};
using FilePtr = std::unique_ptr<FILE, FileCloser>;

std::string errno_text() { return std::strerror(errno); }

// A validated entry: where its bytes are and what they become.
struct Placed {
  const RawEntry* raw;
  DType dtype;
  uint64_t begin, end;
};

// Checks dtype, shape and offsets of one entry against the data section size.
Status place_entry(const std::string& where, const RawEntry& e, uint64_t data_size, Placed* out) {
  const std::string label = where + tensor_label(e.name);
  DType dtype;
  if (e.dtype == "F32") {
    dtype = DType::F32;
  } else if (e.dtype == "F64") {
    dtype = DType::F64;
  } else if (e.dtype == "I64") {
    dtype = DType::I64;
  } else if (e.dtype == "I32") {
    dtype = DType::I32;
  } else {
    return Status::InvalidArgument(label + " has unsupported dtype " + printable(e.dtype) +
                                   " (supported: F32, F64, I64, I32)");
  }
  // The product of the non-zero dims must fit in int64, so that numel and strides never overflow
  // (even for a shape containing a zero).
  int64_t nonzero_product = 1;
  for (int64_t d : e.shape) {
    if (d != 0 && __builtin_mul_overflow(nonzero_product, d, &nonzero_product))
      return Status::InvalidArgument(label + " has an absurdly large shape " + shape_str(e.shape));
  }
  const uint64_t numel = static_cast<uint64_t>(shape_numel(e.shape));
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(dtype)), &nbytes))
    return Status::InvalidArgument(label + " has an absurdly large shape " + shape_str(e.shape));
  const uint64_t begin = e.offsets[0], end = e.offsets[1];
  const std::string offs =
      "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "]";
  if (begin > end) return Status::InvalidArgument(label + " has " + offs + " with begin > end");
  if (end - begin != nbytes)
    return Status::InvalidArgument(label + " has " + offs + " (" + std::to_string(end - begin) +
                                   " bytes) but " + e.dtype + " " + shape_str(e.shape) + " needs " +
                                   std::to_string(nbytes) + " bytes");
  if (end > data_size)
    return Status::InvalidArgument(label + " has " + offs + " beyond the data section (" +
                                   std::to_string(data_size) + " bytes; file truncated?)");
  *out = Placed{&e, dtype, begin, end};
  return Status::OK();
}

}  // namespace

void TensorFile::put(const std::string& name, const Tensor& t) {
  if (tensors.insert_or_assign(name, t).second) names.push_back(name);
}

Status TensorFile::get_f32(const std::string& name, const Shape& shape, Tensor* out) const {
  auto it = tensors.find(name);
  if (it == tensors.end())
    return Status::NotFound("tensor '" + name + "' not found in the tensor file (" +
                            std::to_string(tensors.size()) + " tensors)");
  const Tensor& t = it->second;
  if (t.dtype() != DType::F32)
    return Status::InvalidArgument("tensor '" + name + "' has dtype " + dtype_name(t.dtype()) +
                                   ", expected F32");
  if (!shape.empty()) FC_RETURN_IF_ERROR(expect_shape(name, t, shape));
  *out = t;
  return Status::OK();
}

int64_t TensorShapes::dim(const std::string& name, int d) const {
  auto it = shapes.find(name);
  if (it == shapes.end()) return -1;
  const int64_t n = static_cast<int64_t>(it->second.size());
  const int64_t i = d < 0 ? n + d : d;
  return i < 0 || i >= n ? -1 : it->second[static_cast<size_t>(i)];
}

TensorShapes shapes_of(const TensorFile& f) {
  TensorShapes s;
  s.names = f.names;
  for (const auto& [name, t] : f.tensors) s.shapes[name] = t.shape();
  s.metadata = f.metadata;
  return s;
}

namespace {

// Reads the next n bytes of the file (sequentially from its start) into dst; false on a short read.
using ReadFn = std::function<bool(void* dst, size_t n)>;

// The whole reader over a source of file_size bytes; `where` ("path: ") prefixes every message.
// keep (optional): the stack blocks to materialise (io::read_safetensors_filtered).
Status parse_source(const std::string& where, uint64_t file_size, const ReadFn& read,
                    TensorFile* out, const BlockFilter* keep = nullptr,
                    TensorShapes* shapes = nullptr) {
  if (file_size < 8)
    return Status::InvalidArgument(where + "file is " + std::to_string(file_size) +
                                   " bytes, too short for a safetensors header");

  unsigned char len_bytes[8];
  if (!read(len_bytes, 8)) return Status::IOError(where + "cannot read the header length");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len > file_size - 8)
    return Status::InvalidArgument(where + "header length " + std::to_string(header_len) +
                                   " exceeds the file size (" + std::to_string(file_size) +
                                   " bytes): not a safetensors file or truncated");
  if (header_len > kMaxHeaderBytes)
    return Status::InvalidArgument(where + "header length " + std::to_string(header_len) +
                                   " exceeds the " + std::to_string(kMaxHeaderBytes) +
                                   "-byte limit");

  std::string header(header_len, '\0');
  if (header_len > 0 && !read(header.data(), header_len))
    return Status::IOError(where + "cannot read the " + std::to_string(header_len) +
                           "-byte header");

  HeaderParser hp;
  bool parsed = false;
  try {
    parsed = json::sax_parse(header, &hp, json::input_format_t::json, /*strict=*/true);
  } catch (const std::exception& e) {  // bad_alloc, or a parser exception despite the SAX mode
    return Status::InvalidArgument(where + "cannot parse the header: " + e.what());
  }
  if (!parsed) {
    if (!hp.error.empty()) return Status::InvalidArgument(where + hp.error);
    return Status::InvalidArgument(where + "header is not valid JSON (" + hp.syntax_error + ")");
  }

  // Validate every entry, then the layout: sorted by offset, the tensors must tile the data
  // section exactly (no overlap, no hole, nothing after the last one).
  const uint64_t data_size = file_size - 8 - header_len;
  std::vector<Placed> placed(hp.entries.size());
  for (size_t i = 0; i < hp.entries.size(); ++i)
    FC_RETURN_IF_ERROR(place_entry(where, hp.entries[i], data_size, &placed[i]));
  std::vector<Placed> by_offset = placed;
  std::stable_sort(by_offset.begin(), by_offset.end(), [](const Placed& a, const Placed& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  const Placed* prev = nullptr;
  for (const Placed& p : by_offset) {
    if (p.begin < expected)
      return Status::InvalidArgument(where + tensor_label(p.raw->name) + " overlaps " +
                                     tensor_label(prev->raw->name) + " in the data section");
    if (p.begin > expected)
      return Status::InvalidArgument(where + "hole of " + std::to_string(p.begin - expected) +
                                     " bytes in the data section before " +
                                     tensor_label(p.raw->name));
    expected = p.end;
    prev = &p;
  }
  if (expected != data_size)
    return Status::InvalidArgument(where + std::to_string(data_size - expected) +
                                   " bytes of data after the last tensor are not in the header");

  // With a filter: each stack's block count (largest index + 1), and the tensors it keeps.
  std::map<std::string, int64_t> blocks;
  std::string stack;
  int64_t block = 0;
  if (keep)
    for (const Placed& p : placed)
      if (io::parse_block_name(p.raw->name, &stack, &block))
        blocks[stack] = std::max(blocks[stack], block + 1);
  auto kept = [&](const std::string& name) {
    return !keep || !io::parse_block_name(name, &stack, &block) ||
           (*keep)(stack, block, blocks[stack]);
  };
  // Everything is consistent: allocate (at most data_size bytes in total) and read in file order;
  // a tensor not kept is read through a small scratch buffer and dropped.
  TensorFile result;
  std::vector<char> scratch;
  for (const Placed& p : by_offset) {
    if (!kept(p.raw->name)) {
      scratch.resize(std::min<uint64_t>(p.end - p.begin, uint64_t{1} << 20));
      for (uint64_t left = p.end - p.begin; left > 0;) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(left, scratch.size()));
        if (!read(scratch.data(), n))
          return Status::IOError(where + "cannot read the data of " + tensor_label(p.raw->name) +
                                 " (file changed while reading?)");
        left -= n;
      }
      continue;
    }
    Tensor t;
    FC_RETURN_IF_ERROR(
        Tensor::try_empty(p.raw->shape, p.dtype, where + tensor_label(p.raw->name), &t));
    const size_t n = p.end - p.begin;
    if (n > 0 && !read(t.data<char>(), n))
      return Status::IOError(where + "cannot read the data of " + tensor_label(p.raw->name) +
                             " (file changed while reading?)");
    result.tensors.emplace(p.raw->name, std::move(t));
  }
  result.names.reserve(placed.size());
  for (const Placed& p : placed)
    if (result.tensors.count(p.raw->name)) result.names.push_back(p.raw->name);
  result.metadata = std::move(hp.metadata);
  if (shapes != nullptr) {
    TensorShapes sh;
    for (const Placed& p : placed) {
      sh.names.push_back(p.raw->name);
      sh.shapes[p.raw->name] = p.raw->shape;
    }
    sh.metadata = result.metadata;
    *shapes = std::move(sh);
  }
  *out = std::move(result);
  return Status::OK();
}

}  // namespace

Status parse_safetensors_bytes(std::string_view bytes, const std::string& name, TensorFile* out) {
  size_t pos = 0;  // next unread byte of `bytes`
  auto read = [&](void* dst, size_t n) {
    if (n > bytes.size() - pos) return false;
    std::memcpy(dst, bytes.data() + pos, n);
    pos += n;
    return true;
  };
  return parse_source(name + ": ", bytes.size(), read, out);
}

namespace {
Status read_file(const std::string& path, TensorFile* out, const BlockFilter* keep,
                 TensorShapes* shapes = nullptr) {
  const std::string where = path + ": ";
  // Not a regular file (directory, FIFO, device): refused rather than blocking or reading forever.
  FC_RETURN_IF_ERROR(io::check_regular_file(path));

  FilePtr f(std::fopen(path.c_str(), "rb"));
  if (!f) return Status::IOError(where + "cannot open: " + errno_text());
  if (fseeko(f.get(), 0, SEEK_END) != 0)
    return Status::IOError(where + "cannot seek: " + errno_text());
  const off_t size_or_err = ftello(f.get());
  if (size_or_err < 0) return Status::IOError(where + "cannot tell size: " + errno_text());
  std::rewind(f.get());
  auto read = [&](void* dst, size_t n) { return std::fread(dst, 1, n, f.get()) == n; };
  return parse_source(where, static_cast<uint64_t>(size_or_err), read, out, keep, shapes);
}

}  // namespace

Status read_safetensors(const std::string& path, TensorFile* out) {
  return read_file(path, out, nullptr);
}

Status io::read_safetensors_filtered(const std::string& path, const BlockFilter& keep,
                                     TensorFile* out, TensorShapes* shapes) {
  return read_file(path, out, &keep, shapes);
}

Status write_safetensors(const std::string& path, const TensorFile& file) {
  const std::string where = path + ": ";
  std::vector<const Tensor*> data;  // in names order
  data.reserve(file.names.size());
  std::unordered_set<std::string> listed;
  for (const std::string& name : file.names) {
    const std::string label = where + tensor_label(name);
    if (!listed.insert(name).second)
      return Status::InvalidArgument(label + " is listed twice in names");
    if (name == "__metadata__") return Status::InvalidArgument(label + " is a reserved name");
    auto it = file.tensors.find(name);
    if (it == file.tensors.end())
      return Status::InvalidArgument(label + " is listed in names but has no tensor");
    const Tensor& t = it->second;
    if (!t.defined()) return Status::InvalidArgument(label + " is undefined");
    if (t.dtype() == DType::BF16)
      return Status::InvalidArgument(label + " has unsupported dtype " + dtype_name(t.dtype()) +
                                     " (supported: F32, F64, I64, I32)");
    data.push_back(&t);
  }
  for (const auto& kv : file.tensors)
    if (!listed.count(kv.first))
      return Status::InvalidArgument(where + tensor_label(kv.first) + " is not listed in names");

  std::vector<TensorSpec> specs;  // in names order
  specs.reserve(data.size());
  for (size_t i = 0; i < data.size(); ++i)
    specs.push_back({file.names[i], data[i]->dtype(), data[i]->shape()});
  return write_safetensors_streamed(
      path, file.metadata, specs, [&](size_t i, const ByteSink& sink) {
        const Tensor c = data[i]->contiguous();  // a copy only for a strided view, one at a time
        return sink(c.data<char>(), c.nbytes());
      });
}

Status write_safetensors_streamed(const std::string& path,
                                  const std::map<std::string, std::string>& metadata,
                                  const std::vector<TensorSpec>& specs,
                                  const std::function<Status(size_t, const ByteSink&)>& fill) {
  const std::string where = path + ": ";
  // Header: __metadata__ first, then the tensors back to back; padded with spaces to 8 bytes.
  std::string header = "{";
  uint64_t offset = 0;
  std::vector<uint64_t> sizes;  // [specs] bytes of each tensor
  try {
    if (!metadata.empty()) header += "\"__metadata__\":" + json(metadata).dump();
    for (const TensorSpec& sp : specs) {
      json shape = json::array();
      int64_t numel = 1;
      for (int64_t d : sp.shape) {
        shape.push_back(d);
        numel *= d;
      }
      const uint64_t nbytes = static_cast<uint64_t>(numel) * dtype_size(sp.dtype);
      sizes.push_back(nbytes);
      if (header.size() > 1) header += ",";
      header += json(sp.name).dump() + ":{\"dtype\":\"" + dtype_name(sp.dtype) +
                "\",\"shape\":" + shape.dump() + ",\"data_offsets\":[" + std::to_string(offset) +
                "," + std::to_string(offset + nbytes) + "]}";
      offset += nbytes;
    }
  } catch (const json::exception& e) {  // invalid UTF-8 in a name or metadata
    return Status::InvalidArgument(where + "cannot encode the header: " + json_error_text(e));
  }
  header += "}";
  header.resize((header.size() + 7) / 8 * 8, ' ');

  unsigned char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>(header.size() >> (8 * i));

  // Writes the whole file to f; on failure the message names `dest`.
  auto write_all = [&](FILE* f, const std::string& dest) -> Status {
    if (std::fwrite(len_bytes, 1, 8, f) != 8 ||
        std::fwrite(header.data(), 1, header.size(), f) != header.size())
      return Status::IOError(where + "cannot write the header to " + dest + ": " + errno_text());
    for (size_t i = 0; i < specs.size(); ++i) {
      uint64_t written = 0;
      const ByteSink sink = [&](const void* bytes, size_t n) -> Status {
        if (written + n > sizes[i])
          return Status::Internal(where + tensor_label(specs[i].name) +
                                  ": more bytes than its shape");
        if (n > 0 && std::fwrite(bytes, 1, n, f) != n)
          return Status::IOError(where + "cannot write " + tensor_label(specs[i].name) + " to " +
                                 dest + ": " + errno_text());
        written += n;
        return Status::OK();
      };
      FC_RETURN_IF_ERROR(fill(i, sink));
      if (written != sizes[i])
        return Status::Internal(where + tensor_label(specs[i].name) + ": " +
                                std::to_string(written) + " bytes written, its shape has " +
                                std::to_string(sizes[i]));
    }
    if (std::fflush(f) != 0)
      return Status::IOError(where + "cannot flush " + dest + ": " + errno_text());
    return Status::OK();
  };

  return io::write_file_atomic(path, [&](FILE* f) { return write_all(f, path); });
}

}  // namespace fc
