#include "io/io_util.h"

#include <cstdio>
#include <filesystem>

namespace fc::io {

std::string printable(const std::string& s) {
  std::string out = "'";
  size_t chars = 0;
  for (unsigned char c : s) {
    if ((c & 0xC0) != 0x80 && ++chars > 100) {  // count UTF-8 sequences, cut between them
      out += "...";
      break;
    }
    if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "'";
}

Status check_regular_file(const std::string& path) {
  namespace fs = std::filesystem;
  const std::string where = path + ": ";
  std::error_code ec;
  const fs::file_status fst = fs::status(path, ec);
  if (fst.type() == fs::file_type::not_found) return Status::NotFound(where + "no such file");
  if (ec) return Status::IOError(where + "cannot stat: " + ec.message());
  if (!fs::is_regular_file(fst)) return Status::InvalidArgument(where + "not a regular file");
  return Status::OK();
}

}  // namespace fc::io
