#include "io/io_util.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>

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

Status write_file_atomic(const std::string& path, const std::function<Status(std::FILE*)>& write) {
  namespace fs = std::filesystem;
  const std::string where = path + ": ";
  auto errno_text = [] { return std::string(std::strerror(errno)); };
  struct Closer {
    void operator()(FILE* f) const {
      if (f) std::fclose(f);
    }
  };
  using FilePtr = std::unique_ptr<FILE, Closer>;
  std::error_code ec;
  const fs::file_status target = fs::status(path, ec);
  if (fs::is_directory(target)) return Status::InvalidArgument(where + "is a directory");
  if (fs::exists(target) && !fs::is_regular_file(target)) {
    // A device or FIFO: written in place, since renaming over it would replace the node.
    FilePtr f(std::fopen(path.c_str(), "wb"));
    if (!f) return Status::IOError(where + "cannot open: " + errno_text());
    FC_RETURN_IF_ERROR(write(f.get()));
    if (std::fflush(f.get()) != 0) return Status::IOError(where + "cannot flush: " + errno_text());
    if (std::fclose(f.release()) != 0)
      return Status::IOError(where + "cannot close: " + errno_text());
    return Status::OK();
  }
  // The temporary sits in the target's directory, so the rename stays on one file system.
  static std::atomic<uint64_t> serial{0};
  const std::string tmp =
      path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(serial++);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) return Status::IOError(where + "cannot create " + tmp + ": " + errno_text());
  FILE* raw = ::fdopen(fd, "wb");
  if (raw == nullptr) {
    const std::string reason = errno_text();
    ::close(fd);
    std::remove(tmp.c_str());
    return Status::IOError(where + "cannot open " + tmp + ": " + reason);
  }
  FilePtr f(raw);
  Status st = write(f.get());
  if (st.ok() && std::fflush(f.get()) != 0)
    st = Status::IOError(where + "cannot write " + tmp + " (disk full?): " + errno_text());
  if (st.ok() && ::fsync(::fileno(f.get())) != 0)
    st = Status::IOError(where + "cannot sync " + tmp + ": " + errno_text());
  if (std::fclose(f.release()) != 0 && st.ok())
    st = Status::IOError(where + "cannot close " + tmp + ": " + errno_text());
  if (st.ok() && std::rename(tmp.c_str(), path.c_str()) != 0)
    st = Status::IOError(where + "cannot rename " + tmp + " to the final name: " + errno_text());
  if (!st.ok()) {
    std::remove(tmp.c_str());
    return st;
  }
  // Make the rename itself durable (best effort: the file is complete and in place either way).
  std::string dir = fs::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  if (const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return Status::OK();
}

bool parse_block_name(const std::string& name, std::string* stack, int64_t* block) {
  const std::string key = "blocks.";
  for (size_t pos = name.find(key); pos != std::string::npos; pos = name.find(key, pos + 1)) {
    if (pos > 0 && name[pos - 1] != '.') continue;
    size_t end = pos + key.size();
    int64_t i = 0;
    const size_t digits = end;
    while (end < name.size() && name[end] >= '0' && name[end] <= '9' && end - digits < 18)
      i = i * 10 + (name[end++] - '0');
    if (end == digits || end >= name.size() || name[end] != '.') continue;
    *stack = name.substr(0, pos);
    *block = i;
    return true;
  }
  return false;
}

}  // namespace fc::io
