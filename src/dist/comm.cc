#include "dist/comm.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#ifdef FOLDCUBE_HAVE_MPI
#include <mpi.h>
#endif

namespace fc::dist {

namespace {
bool g_initialized = false;  // init() succeeded (MPI runs, started by us or the host)
bool g_started = false;      // init() called MPI_Init_thread: finalize() ends MPI
std::atomic<int64_t> g_max_count{INT_MAX};

#ifdef FOLDCUBE_HAVE_MPI
// MPI counts are int; every call below passes at most piece_elems() elements.
int to_count(int64_t n) {
  FC_CHECK_MSG(n >= 0 && n <= INT_MAX,
               "MPI message of " + std::to_string(n) + " elements exceeds the int count limit");
  return static_cast<int>(n);
}

// Elements of `elem_bytes` bytes in one call: the limit, and at most INT_MAX bytes (a derived
// type or a message of more bytes than an int holds is where MPI libraries break).
int64_t piece_elems(int64_t elem_bytes) {
  return std::min<int64_t>(g_max_count.load(), INT_MAX / elem_bytes);
}

// Calls f(off, len) for the consecutive pieces [off, off + len) of [0, count), each at most
// piece_elems(elem_bytes) elements (none when count is 0).
template <typename F>
void for_pieces(int64_t count, int64_t elem_bytes, F f) {
  const int64_t step = piece_elems(elem_bytes);
  for (int64_t off = 0; off < count; off += step) f(off, std::min(step, count - off));
}

// One rank's part of a piece of a block-strided buffer: `len` floats with an extent of `stride`
// floats, so element p of a count-1 collective is floats [p*stride, p*stride + len) past the
// piece's start (the extent is an MPI_Aint: no int limit on the stride).
class BlockType {
 public:
  BlockType(int64_t len, int64_t stride) {
    MPI_Datatype run;
    MPI_Type_contiguous(to_count(len), MPI_FLOAT, &run);
    MPI_Type_create_resized(run, 0, static_cast<MPI_Aint>(stride) * MPI_Aint{sizeof(float)}, &t_);
    MPI_Type_commit(&t_);
    MPI_Type_free(&run);
  }
  ~BlockType() { MPI_Type_free(&t_); }
  BlockType(const BlockType&) = delete;
  BlockType& operator=(const BlockType&) = delete;
  MPI_Datatype get() const { return t_; }

 private:
  MPI_Datatype t_;
};
#endif
}  // namespace

int64_t max_message_count() { return g_max_count.load(); }

void set_max_message_count(int64_t n) {
  FC_CHECK_MSG(n >= 1 && n <= INT_MAX, "max message count must be in [1, INT_MAX]");
  g_max_count.store(n);
}

struct Communicator::Impl {
  int rank = 0, size = 1;
#ifdef FOLDCUBE_HAVE_MPI
  MPI_Comm comm = MPI_COMM_NULL;
  bool owned = false;  // created by split: freed with the last copy while MPI runs
  ~Impl() {
    int done = 0;
    if (owned && comm != MPI_COMM_NULL) {
      MPI_Finalized(&done);
      if (!done) MPI_Comm_free(&comm);
    }
  }
#endif
  CommStats stats;
};

bool have_mpi() {
#ifdef FOLDCUBE_HAVE_MPI
  return true;
#else
  return false;
#endif
}

int launched_world_size() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"})
    if (const char* v = std::getenv(var)) return std::max(1, std::atoi(v));
  return 1;
}

Status init(int* argc, char*** argv) {
  if (g_initialized) return Status::OK();
#ifdef FOLDCUBE_HAVE_MPI
  int already = 0, provided = 0;
  MPI_Initialized(&already);
  if (already) {  // the host program started MPI: use it, never finalize it
    MPI_Query_thread(&provided);
  } else {
    if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
      return Status::Internal("MPI_Init_thread failed");
    g_started = true;
  }
  if (provided < MPI_THREAD_FUNNELED)
    return Status::Internal("the MPI library does not support MPI_THREAD_FUNNELED");
  g_initialized = true;
  return Status::OK();
#else
  (void)argc;
  (void)argv;
  return Status::InvalidArgument(
      "this foldcube was built without MPI (CMake FOLDCUBE_MPI=OFF or MPI not found)");
#endif
}

bool initialized() { return g_initialized; }
bool started_mpi() { return g_started; }

void finalize() {
#ifdef FOLDCUBE_HAVE_MPI
  if (g_started) MPI_Finalize();
#endif
  g_initialized = false;
  g_started = false;
}

void abort_job(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
#ifdef FOLDCUBE_HAVE_MPI
  if (g_initialized) MPI_Abort(MPI_COMM_WORLD, code);
#endif
  std::_Exit(code);
}

const char* op_name(Op op) {
  switch (op) {
    case Op::kAllToAll:
      return "all_to_all";
    case Op::kAllGather:
      return "all_gather";
    case Op::kReduceScatter:
      return "reduce_scatter";
    case Op::kAllReduce:
      return "all_reduce";
    case Op::kBroadcast:
      return "broadcast";
    case Op::kScatter:
      return "scatter";
    case Op::kGather:
      return "gather";
    case Op::kCount:
      break;
  }
  return "?";
}

int64_t CommStats::total_bytes() const {
  int64_t n = 0;
  for (int64_t b : bytes) n += b;
  return n;
}

double CommStats::total_seconds() const {
  double t = 0;
  for (double x : seconds) t += x;
  return t;
}

CommStats CommStats::since(const CommStats& before) const {
  CommStats d;
  for (int k = 0; k < static_cast<int>(Op::kCount); ++k) {
    d.bytes[k] = bytes[k] - before.bytes[k];
    d.calls[k] = calls[k] - before.calls[k];
    d.seconds[k] = seconds[k] - before.seconds[k];
  }
  d.cpu_seconds = cpu_seconds - before.cpu_seconds;
  return d;
}

double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

struct Communicator::Timer {
  Timer(const Communicator& c, Op op)
      : c(c), op(op), t0(std::chrono::steady_clock::now()), cpu0(process_cpu_seconds()) {}
  ~Timer() {
    c.impl_->stats.seconds[static_cast<int>(op)] +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    c.impl_->stats.cpu_seconds += process_cpu_seconds() - cpu0;
  }
  const Communicator& c;
  Op op;
  std::chrono::steady_clock::time_point t0;
  double cpu0;
};

Communicator::Communicator() : impl_(std::make_shared<Impl>()) {}
Communicator::Communicator(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

Communicator Communicator::world() {
  auto impl = std::make_shared<Impl>();
#ifdef FOLDCUBE_HAVE_MPI
  if (g_initialized) {
    impl->comm = MPI_COMM_WORLD;
    MPI_Comm_rank(MPI_COMM_WORLD, &impl->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &impl->size);
  }
#endif
  return Communicator(std::move(impl));
}

int Communicator::rank() const { return impl_->rank; }
int Communicator::size() const { return impl_->size; }

Communicator Communicator::split(int color, int key) const {
  auto impl = std::make_shared<Impl>();
#ifdef FOLDCUBE_HAVE_MPI
  if (impl_->comm != MPI_COMM_NULL) {
    MPI_Comm_split(impl_->comm, color, key, &impl->comm);
    impl->owned = true;
    MPI_Comm_rank(impl->comm, &impl->rank);
    MPI_Comm_size(impl->comm, &impl->size);
  }
#else
  (void)color;
  (void)key;
#endif
  return Communicator(std::move(impl));
}

Communicator Communicator::dap_group(int n) const {
  FC_CHECK_MSG(n >= 1 && size() % n == 0, "DAP group size must divide the communicator size");
  return split(rank() / n, rank() % n);
}

Communicator Communicator::dp_group(int n) const {
  FC_CHECK_MSG(n >= 1 && size() % n == 0, "DAP group size must divide the communicator size");
  return split(rank() % n, rank() / n);
}

void Communicator::tally(Op op, int64_t floats) const {
  impl_->stats.bytes[static_cast<int>(op)] += floats * static_cast<int64_t>(sizeof(float));
  impl_->stats.calls[static_cast<int>(op)] += 1;
}

CommStats Communicator::stats() const { return impl_->stats; }
void Communicator::reset_stats() const { impl_->stats = CommStats(); }

// Without MPI (or on a one-rank communicator) each collective is the copy it reduces to.
#ifdef FOLDCUBE_HAVE_MPI
#define FC_LOCAL_ONLY (impl_->comm == MPI_COMM_NULL)
#else
#define FC_LOCAL_ONLY true
#endif

void Communicator::all_to_all(const float* send, float* recv, int64_t count) const {
  const int n = size();
  tally(Op::kAllToAll, (n - 1) * count);
  const Timer timer(*this, Op::kAllToAll);
  if (FC_LOCAL_ONLY) {
    std::memcpy(recv, send, count * sizeof(float));
    return;
  }
#ifdef FOLDCUBE_HAVE_MPI
  if (count <= piece_elems(sizeof(float))) {
    MPI_Alltoall(send, to_count(count), MPI_FLOAT, recv, to_count(count), MPI_FLOAT, impl_->comm);
    return;
  }
  for_pieces(count, sizeof(float), [&](int64_t off, int64_t len) {
    const BlockType block(len, count);
    MPI_Alltoall(send + off, 1, block.get(), recv + off, 1, block.get(), impl_->comm);
  });
#endif
}

void Communicator::all_gather(const float* mine, float* all, int64_t count) const {
  const int n = size();
  tally(Op::kAllGather, (n - 1) * count);
  const Timer timer(*this, Op::kAllGather);
  if (FC_LOCAL_ONLY) {
    if (all != mine) std::memcpy(all, mine, count * sizeof(float));
    return;
  }
#ifdef FOLDCUBE_HAVE_MPI
  if (count <= piece_elems(sizeof(float))) {
    MPI_Allgather(mine, to_count(count), MPI_FLOAT, all, to_count(count), MPI_FLOAT, impl_->comm);
    return;
  }
  for_pieces(count, sizeof(float), [&](int64_t off, int64_t len) {
    const BlockType block(len, count);
    MPI_Allgather(mine + off, to_count(len), MPI_FLOAT, all + off, 1, block.get(), impl_->comm);
  });
#endif
}

void Communicator::reduce_scatter(const float* all, float* mine, int64_t count) const {
  const int n = size();
  tally(Op::kReduceScatter, (n - 1) * count);
  const Timer timer(*this, Op::kReduceScatter);
  if (FC_LOCAL_ONLY) {
    if (all != mine) std::memcpy(mine, all, count * sizeof(float));
    return;
  }
#ifdef FOLDCUBE_HAVE_MPI
  if (count <= piece_elems(sizeof(float))) {
    MPI_Reduce_scatter_block(all, mine, to_count(count), MPI_FLOAT, MPI_SUM, impl_->comm);
    return;
  }
  // Pieces: one reduction to each rank in turn (reductions on strided derived datatypes are not
  // portable). Over more than two ranks MPI may add the terms in another order than the unsplit
  // call; over two ranks the sum is the same bit for bit.
  for_pieces(count, sizeof(float), [&](int64_t off, int64_t len) {
    for (int p = 0; p < n; ++p)
      MPI_Reduce(all + p * count + off, p == rank() ? mine + off : nullptr, to_count(len),
                 MPI_FLOAT, MPI_SUM, p, impl_->comm);
  });
#endif
}

void Communicator::all_reduce(float* data, int64_t count) const {
  const int n = size();
  tally(Op::kAllReduce, 2 * (n - 1) * count / n);
  const Timer timer(*this, Op::kAllReduce);
  if (FC_LOCAL_ONLY) return;
#ifdef FOLDCUBE_HAVE_MPI
  for_pieces(count, sizeof(float), [&](int64_t off, int64_t len) {
    MPI_Allreduce(MPI_IN_PLACE, data + off, to_count(len), MPI_FLOAT, MPI_SUM, impl_->comm);
  });
#endif
}

void Communicator::broadcast(float* data, int64_t count, int root) const {
  tally(Op::kBroadcast, rank() == root ? (size() - 1) * count : 0);
  const Timer timer(*this, Op::kBroadcast);
  if (FC_LOCAL_ONLY) return;
#ifdef FOLDCUBE_HAVE_MPI
  for_pieces(count, sizeof(float), [&](int64_t off, int64_t len) {
    MPI_Bcast(data + off, to_count(len), MPI_FLOAT, root, impl_->comm);
  });
#endif
}

void Communicator::scatter(const float* all, float* mine, int64_t count, int root) const {
  tally(Op::kScatter, rank() == root ? (size() - 1) * count : 0);
  const Timer timer(*this, Op::kScatter);
  if (FC_LOCAL_ONLY) {
    if (all != mine) std::memcpy(mine, all, count * sizeof(float));
    return;
  }
#ifdef FOLDCUBE_HAVE_MPI
  if (count <= piece_elems(sizeof(float))) {
    MPI_Scatter(all, to_count(count), MPI_FLOAT, mine, to_count(count), MPI_FLOAT, root,
                impl_->comm);
    return;
  }
  for_pieces(count, sizeof(float), [&](int64_t off, int64_t len) {  // `all` is read on root only
    const BlockType block(len, count);
    MPI_Scatter(rank() == root ? all + off : nullptr, 1, block.get(), mine + off, to_count(len),
                MPI_FLOAT, root, impl_->comm);
  });
#endif
}

void Communicator::gather(const float* mine, float* all, int64_t count, int root) const {
  tally(Op::kGather, rank() == root ? 0 : count);
  const Timer timer(*this, Op::kGather);
  if (FC_LOCAL_ONLY) {
    if (all != mine) std::memcpy(all, mine, count * sizeof(float));
    return;
  }
#ifdef FOLDCUBE_HAVE_MPI
  if (count <= piece_elems(sizeof(float))) {
    MPI_Gather(mine, to_count(count), MPI_FLOAT, all, to_count(count), MPI_FLOAT, root,
               impl_->comm);
    return;
  }
  for_pieces(count, sizeof(float), [&](int64_t off, int64_t len) {  // `all` is written on root only
    const BlockType block(len, count);
    MPI_Gather(mine + off, to_count(len), MPI_FLOAT, rank() == root ? all + off : nullptr, 1,
               block.get(), root, impl_->comm);
  });
#endif
}

void Communicator::broadcast_bytes(void* data, int64_t bytes, int root) const {
  if (FC_LOCAL_ONLY) return;
#ifdef FOLDCUBE_HAVE_MPI
  for_pieces(bytes, 1, [&](int64_t off, int64_t len) {
    MPI_Bcast(static_cast<char*>(data) + off, to_count(len), MPI_BYTE, root, impl_->comm);
  });
#else
  (void)data;
  (void)bytes;
  (void)root;
#endif
}

void Communicator::broadcast_string(std::string* s, int root) const {
  int64_t n = static_cast<int64_t>(s->size());
  broadcast_bytes(&n, sizeof(n), root);
  s->resize(static_cast<size_t>(n));
  broadcast_bytes(s->data(), n, root);
}

std::vector<int64_t> Communicator::all_gather_i64(int64_t value) const {
  std::vector<int64_t> all(static_cast<size_t>(size()), value);
  if (FC_LOCAL_ONLY) return all;
#ifdef FOLDCUBE_HAVE_MPI
  MPI_Allgather(&value, 1, MPI_INT64_T, all.data(), 1, MPI_INT64_T, impl_->comm);
#endif
  return all;
}

bool Communicator::all_equal(uint64_t value) const {
  if (FC_LOCAL_ONLY) return true;
#ifdef FOLDCUBE_HAVE_MPI
  uint64_t lo = value, hi = value;
  MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_UINT64_T, MPI_MIN, impl_->comm);
  MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_UINT64_T, MPI_MAX, impl_->comm);
  return lo == hi;
#else
  (void)value;
  return true;
#endif
}

void Communicator::barrier() const {
  if (FC_LOCAL_ONLY) return;
#ifdef FOLDCUBE_HAVE_MPI
  MPI_Barrier(impl_->comm);
#endif
}

#undef FC_LOCAL_ONLY

}  // namespace fc::dist
