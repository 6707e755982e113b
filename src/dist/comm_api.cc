// fc::Comm and the MPI lifecycle of the public API over the dist layer (no MPI calls here).
#include "dist/comm_api.h"

namespace fc {

bool mpi_available() { return dist::have_mpi(); }
int mpi_launched_world_size() { return dist::launched_world_size(); }
Status mpi_init(int* argc, char*** argv) { return dist::init(argc, argv); }
void mpi_finalize() { dist::finalize(); }

Comm::Comm() : impl_(std::make_shared<Impl>()) {}
Comm::Comm(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
Comm Comm::world() { return CommAccess::wrap(dist::Communicator::world()); }
int Comm::rank() const { return impl_->comm.rank(); }
int Comm::size() const { return impl_->comm.size(); }
Comm Comm::dap_group(int n) const { return CommAccess::wrap(impl_->comm.dap_group(n)); }
Comm Comm::dp_group(int n) const { return CommAccess::wrap(impl_->comm.dp_group(n)); }
void Comm::barrier() const { impl_->comm.barrier(); }
bool Comm::all_equal(uint64_t value) const { return impl_->comm.all_equal(value); }
std::vector<int64_t> Comm::all_gather_i64(int64_t value) const {
  return impl_->comm.all_gather_i64(value);
}
void Comm::broadcast_string(std::string* s, int root) const {
  impl_->comm.broadcast_string(s, root);
}
void Comm::all_reduce(float* data, int64_t count) const { impl_->comm.all_reduce(data, count); }

namespace {
Status with_code(Status::Code code, std::string msg) {
  switch (code) {
    case Status::Code::kOk:
      return Status::OK();
    case Status::Code::kInvalidArgument:
      return Status::InvalidArgument(std::move(msg));
    case Status::Code::kNotFound:
      return Status::NotFound(std::move(msg));
    case Status::Code::kIOError:
      return Status::IOError(std::move(msg));
    case Status::Code::kOutOfMemory:
      return Status::OutOfMemory(std::move(msg));
    case Status::Code::kCancelled:
      return Status::Cancelled(std::move(msg));
    case Status::Code::kInternal:
      break;
  }
  return Status::Internal(std::move(msg));
}
}  // namespace

Status Comm::agree(const Status& mine, bool name_rank) const {
  const std::vector<int64_t> codes = all_gather_i64(static_cast<int64_t>(mine.code()));
  int first = -1;
  for (int k = 0; k < size() && first < 0; ++k)
    if (codes[k] != 0) first = k;
  if (first < 0) return Status::OK();
  std::string msg = mine.message();
  broadcast_string(&msg, first);
  if (name_rank) msg = "rank " + std::to_string(first) + ": " + msg;
  return with_code(static_cast<Status::Code>(codes[first]), std::move(msg));
}

}  // namespace fc
