// Status: the error value for user mistakes (bad files, wrong shapes, bad flags).
// Bugs (violated invariants) use FC_CHECK, which aborts loudly with file:line.
#pragma once

#include <string>
#include <utility>

namespace fc {

class Status {
 public:
  enum class Code {
    kOk = 0,
    kInvalidArgument,
    kNotFound,
    kIOError,
    kOutOfMemory,
    kInternal,
    kCancelled  // the caller asked to stop (foldcube/runtime.h: request_cancel)
  };

  Status() = default;
  static Status OK() { return Status(); }
  static Status InvalidArgument(std::string msg) {
    return Status(Code::kInvalidArgument, std::move(msg));
  }
  static Status NotFound(std::string msg) { return Status(Code::kNotFound, std::move(msg)); }
  static Status IOError(std::string msg) { return Status(Code::kIOError, std::move(msg)); }
  static Status OutOfMemory(std::string msg) { return Status(Code::kOutOfMemory, std::move(msg)); }
  static Status Internal(std::string msg) { return Status(Code::kInternal, std::move(msg)); }
  static Status Cancelled(std::string msg) { return Status(Code::kCancelled, std::move(msg)); }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return msg_; }
  // "invalid argument: <message>" or "OK".
  std::string ToString() const;
  // The same error with "<context>: " before its message (OK stays OK).
  Status WithContext(const std::string& context) const {
    return ok() ? *this : Status(code_, context + ": " + msg_);
  }

 private:
  Status(Code c, std::string m) : code_(c), msg_(std::move(m)) {}
  Code code_ = Code::kOk;
  std::string msg_;
};

}  // namespace fc

#define FC_RETURN_IF_ERROR(expr)     \
  do {                               \
    ::fc::Status _fc_st = (expr);    \
    if (!_fc_st.ok()) return _fc_st; \
  } while (0)

namespace fc::detail {
[[noreturn]] void check_failed(const char* file, int line, const char* cond,
                               const std::string& msg);
}

// Invariant check for bugs: always on (also in release builds), aborts with file:line.
#define FC_CHECK(cond)                                                      \
  do {                                                                      \
    if (!(cond)) ::fc::detail::check_failed(__FILE__, __LINE__, #cond, ""); \
  } while (0)
#define FC_CHECK_MSG(cond, msg)                                                \
  do {                                                                         \
    if (!(cond)) ::fc::detail::check_failed(__FILE__, __LINE__, #cond, (msg)); \
  } while (0)
