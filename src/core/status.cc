#include "foldcube/status.h"

#include <cstdio>
#include <cstdlib>

namespace fc {

std::string Status::ToString() const {
  const char* p = "OK";
  switch (code_) {
    case Code::kOk:
      return "OK";
    case Code::kInvalidArgument:
      p = "invalid argument";
      break;
    case Code::kNotFound:
      p = "not found";
      break;
    case Code::kIOError:
      p = "I/O error";
      break;
    case Code::kOutOfMemory:
      p = "out of memory";
      break;
    case Code::kInternal:
      p = "internal error";
      break;
    case Code::kCancelled:
      p = "cancelled";
      break;
  }
  return std::string(p) + ": " + msg_;
}

namespace detail {
void check_failed(const char* file, int line, const char* cond, const std::string& msg) {
  std::fprintf(stderr, "foldcube: internal check failed at %s:%d: %s%s%s\n", file, line, cond,
               msg.empty() ? "" : " -- ", msg.c_str());
  std::fflush(stderr);
  std::abort();
}
}  // namespace detail

}  // namespace fc
