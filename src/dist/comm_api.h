// The library's view of the public communicator handle (foldcube/parallel.h): fc::Comm wraps a
// dist::Communicator.
#pragma once

#include "dist/comm.h"
#include "foldcube/parallel.h"

namespace fc {

struct Comm::Impl {
  dist::Communicator comm;
};

struct CommAccess {
  static const dist::Communicator& get(const Comm& c) { return c.impl_->comm; }
  static Comm wrap(dist::Communicator c) {
    return Comm(std::make_shared<Comm::Impl>(Comm::Impl{std::move(c)}));
  }
};

}  // namespace fc
