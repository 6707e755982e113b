// FASTA, A3M and Stockholm parsers (contracts in foldcube/features.h). One pass over the text,
// each byte looked at a bounded number of times; a line longer than kMaxLine is refused before
// its end is searched for, so a 2 GB line costs kMaxLine bytes of scanning.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>
#include <unordered_map>

#include "foldcube/features.h"

namespace fc {
namespace {

constexpr size_t kMaxLine = size_t{1} << 24;  // 16 MiB: far above any real sequence line

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\v' || c == '\f'; }
bool is_upper(char c) { return c >= 'A' && c <= 'Z'; }
bool is_lower(char c) { return c >= 'a' && c <= 'z'; }

std::string_view strip(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

// "'c'" for printable ASCII, else "byte 0xNN".
std::string char_label(char c) {
  const unsigned char u = static_cast<unsigned char>(c);
  char buf[24];
  if (u >= 0x21 && u < 0x7F)
    std::snprintf(buf, sizeof buf, "'%c'", c);
  else
    std::snprintf(buf, sizeof buf, "byte 0x%02x", u);
  return buf;
}

// Splits text into lines ending at \n, \r\n or \r (universal newlines), stripped.
class LineReader {
 public:
  LineReader(std::string_view text, const std::string& name) : text_(text), name_(name) {}

  // False at the end of the text or on error (then status() is set).
  bool next(std::string_view* line) {
    if (pos_ >= text_.size()) return false;
    const size_t limit = std::min(text_.size() - pos_, kMaxLine + 1);
    const char* begin = text_.data() + pos_;
    size_t n = 0;
    while (n < limit && begin[n] != '\n' && begin[n] != '\r') ++n;
    ++line_no_;
    if (n > kMaxLine) {
      status_ = error("line longer than " + std::to_string(kMaxLine >> 20) + " MiB");
      return false;
    }
    pos_ += n;
    if (pos_ < text_.size()) {  // consume the line end
      if (text_[pos_] == '\r' && pos_ + 1 < text_.size() && text_[pos_ + 1] == '\n') ++pos_;
      ++pos_;
    }
    *line = strip(std::string_view(begin, n));
    return true;
  }
  int64_t line_no() const { return line_no_; }
  const Status& status() const { return status_; }
  Status error(const std::string& what) const { return error_at(line_no_, what); }
  Status error_at(int64_t line, const std::string& what) const {
    return Status::InvalidArgument(name_ + ":" + std::to_string(line) + ": " + what);
  }

 private:
  std::string_view text_;
  const std::string& name_;
  size_t pos_ = 0;
  int64_t line_no_ = 0;
  Status status_;
};

// Description bytes: anything but NUL (a NUL is a sign of a binary file).
Status check_description(const LineReader& lr, std::string_view d) {
  if (d.find('\0') != std::string_view::npos) return lr.error("NUL byte in a description");
  return Status::OK();
}

// The whole file, memory-mapped read-only (empty files give an empty view).
class MappedFile {
 public:
  ~MappedFile() {
    if (data_ != nullptr) munmap(data_, size_);
  }
  Status open(const std::string& path) {
    // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
      if (errno == ENOENT) return Status::NotFound(path + ": no such file");
      return Status::IOError(path + ": cannot open: " + std::strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      return Status::InvalidArgument(path + ": not a regular file");
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        return Status::IOError(path + ": cannot map: " + std::strerror(errno));
      }
      data_ = p;
    }
    ::close(fd);
    return Status::OK();
  }
  std::string_view view() const {
    return data_ ? std::string_view(static_cast<const char*>(data_), size_) : std::string_view();
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace

Status parse_fasta(std::string_view text, const std::string& name, std::vector<FastaRecord>* out) {
  out->clear();
  LineReader lr(text, name);
  std::string_view line;
  while (lr.next(&line)) {
    if (line.empty() || line[0] == '#') continue;
    if (line[0] == '>') {
      if (!out->empty() && out->back().sequence.empty())
        return lr.error_at(out->back().line, "record without a sequence");
      FC_RETURN_IF_ERROR(check_description(lr, line.substr(1)));
      out->push_back(FastaRecord{std::string(line.substr(1)), "", lr.line_no()});
      continue;
    }
    if (out->empty()) return lr.error("sequence before the first '>' header (not a FASTA file?)");
    for (char c : line)
      if (!is_upper(c))
        return lr.error("invalid character " + char_label(c) +
                        " in a sequence (expected upper-case letters A-Z)");
    out->back().sequence.append(line);
  }
  FC_RETURN_IF_ERROR(lr.status());
  if (out->empty()) return lr.error_at(1, "no '>' record (empty or not a FASTA file)");
  if (out->back().sequence.empty())
    return lr.error_at(out->back().line, "record without a sequence");
  return Status::OK();
}

Status parse_a3m(std::string_view text, const std::string& name, Msa* out) {
  *out = Msa();
  LineReader lr(text, name);
  std::string_view line;
  int64_t width = -1;   // aligned length, known once the query record has ended
  int64_t aligned = 0;  // aligned columns of the current record
  int32_t pending = 0;  // insertions since the last aligned column
  int64_t record_line = 0;
  auto end_record = [&]() -> Status {
    if (out->descriptions.empty()) return Status::OK();
    if (width < 0) {
      if (aligned == 0) return lr.error_at(record_line, "the query record has no aligned column");
      width = aligned;
    } else if (aligned != width) {
      return lr.error_at(record_line, "record " + std::to_string(out->num_records()) + " has " +
                                          std::to_string(aligned) +
                                          " aligned columns, the query has " +
                                          std::to_string(width));
    }
    return Status::OK();
  };
  while (lr.next(&line)) {
    if (line.empty() || line[0] == '#') continue;
    if (line[0] == '>') {
      FC_RETURN_IF_ERROR(end_record());
      FC_RETURN_IF_ERROR(check_description(lr, line.substr(1)));
      out->descriptions.emplace_back(line.substr(1));
      out->lines.push_back(lr.line_no());
      record_line = lr.line_no();
      aligned = 0;
      pending = 0;
      continue;
    }
    if (out->descriptions.empty())
      return lr.error("sequence before the first '>' header (not an A3M file?)");
    for (char c : line) {
      if (is_lower(c)) {
        if (pending == INT32_MAX) return lr.error("insertion longer than 2^31 letters");
        ++pending;
      } else if (is_upper(c) || c == '-') {
        if (width >= 0 && aligned == width)
          return lr.error("record " + std::to_string(out->num_records()) +
                          " has more aligned columns than the query (" + std::to_string(width) +
                          ")");
        out->letters.push_back(c);
        out->deletions.push_back(pending);
        pending = 0;
        ++aligned;
      } else {
        return lr.error("invalid character " + char_label(c) +
                        " in an aligned sequence (expected A-Z, a-z or '-')");
      }
    }
  }
  FC_RETURN_IF_ERROR(lr.status());
  if (out->descriptions.empty()) return lr.error_at(1, "no '>' record (empty or not an A3M file)");
  FC_RETURN_IF_ERROR(end_record());
  out->width = width;
  return Status::OK();
}

Status parse_stockholm(std::string_view text, const std::string& name, Msa* out) {
  *out = Msa();
  LineReader lr(text, name);
  std::string_view line;
  std::vector<std::string> rows;  // full-width rows in first-appearance order
  std::unordered_map<std::string, size_t> index;
  std::string rf;  // #=GC RF, if present (only checked for width)
  int64_t rf_line = 0;
  while (lr.next(&line)) {
    if (line.empty()) continue;
    if (line.substr(0, 2) == "//") break;
    if (line[0] == '#') {
      if (line.substr(0, 7) == "#=GC RF" && line.size() > 7 && is_space(line[7])) {
        rf.append(strip(line.substr(7)));
        rf_line = lr.line_no();
      }
      continue;
    }
    size_t sp = 0;
    while (sp < line.size() && !is_space(line[sp])) ++sp;
    const std::string_view seq_name = line.substr(0, sp);
    const std::string_view seq = strip(line.substr(sp));
    if (seq.empty() || seq.find_first_of(" \t\v\f") != std::string_view::npos)
      return lr.error("expected '<name> <aligned sequence>' (two fields)");
    if (seq_name.find('\0') != std::string_view::npos) return lr.error("NUL byte in a name");
    for (char c : seq)
      if (!is_upper(c) && !is_lower(c) && c != '-' && c != '.')
        return lr.error("invalid character " + char_label(c) +
                        " in an aligned sequence (expected letters, '-' or '.')");
    auto [it, inserted] = index.try_emplace(std::string(seq_name), rows.size());
    if (inserted) {
      rows.emplace_back();
      out->descriptions.emplace_back(seq_name);
      out->lines.push_back(lr.line_no());
    }
    rows[it->second].append(seq);
  }
  FC_RETURN_IF_ERROR(lr.status());
  if (rows.empty()) return lr.error_at(1, "no sequence lines (empty or not a Stockholm file)");
  const std::string& query = rows[0];
  if (!rf.empty() && rf.size() != query.size())
    return lr.error_at(rf_line, "#=GC RF has " + std::to_string(rf.size()) +
                                    " columns, the alignment " + std::to_string(query.size()));
  auto is_gap = [](char c) { return c == '-' || c == '.'; };
  int64_t width = 0;
  for (char c : query) width += !is_gap(c);
  if (width == 0) return lr.error_at(out->lines[0], "the query row has no residue");
  out->width = width;
  out->letters.reserve(rows.size() * width);
  out->deletions.reserve(rows.size() * width);
  for (size_t i = 0; i < rows.size(); ++i) {
    const std::string& row = rows[i];
    if (row.size() != query.size())
      return lr.error_at(out->lines[i], "sequence " + std::to_string(i) + " has " +
                                            std::to_string(row.size()) + " columns, the query " +
                                            std::to_string(query.size()));
    int32_t pending = 0;
    for (size_t c = 0; c < row.size(); ++c) {
      const char r = row[c];
      if (is_gap(query[c])) {
        pending += !is_gap(r);  // a residue where the query has none: a deletion
        continue;
      }
      out->letters.push_back(is_gap(r) ? '-' : (is_lower(r) ? static_cast<char>(r - 32) : r));
      out->deletions.push_back(pending);
      pending = 0;
    }
  }
  return Status::OK();
}

Status read_fasta(const std::string& path, std::vector<FastaRecord>* out) {
  MappedFile f;
  FC_RETURN_IF_ERROR(f.open(path));
  return parse_fasta(f.view(), path, out);
}

Status read_msa(const std::string& path, Msa* out) {
  MappedFile f;
  FC_RETURN_IF_ERROR(f.open(path));
  auto ends_with = [&](const std::string& ext) {
    return path.size() >= ext.size() &&
           path.compare(path.size() - ext.size(), ext.size(), ext) == 0;
  };
  if (ends_with(".sto") || ends_with(".stockholm")) return parse_stockholm(f.view(), path, out);
  return parse_a3m(f.view(), path, out);
}

}  // namespace fc
