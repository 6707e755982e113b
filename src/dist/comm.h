// The dist layer: the only code of foldcube that talks to MPI. A Communicator is a group of ranks
// with the collectives the parallel executors need (src/exec/dap.cc), on float buffers.
//
// Built without MPI (CMake FOLDCUBE_MPI=OFF, or MPI not found) every communicator has one rank
// and every collective is a local copy, so single-process code runs the same path.
//
// Collectives block until this rank's part is done; every rank of the group must call them in the
// same order with the same counts. Counts are int64_t: a message longer than one MPI call may
// carry (MPI counts are int; see max_message_count) moves in consecutive pieces (strided pieces
// through a derived datatype), so any size the planner returns can run. MPI errors are fatal for
// the whole job (MPI's default), so a failing rank never leaves the others waiting.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "foldcube/status.h"

namespace fc::dist {

// True when this build has MPI.
bool have_mpi();
// Number of ranks the MPI launcher (mpirun) started this process among, from its environment;
// 1 when the process was not started by a launcher.
int launched_world_size();

// Starts MPI once per process (thread level FUNNELED: only the main thread communicates; OpenMP
// threads only compute) unless the host program already did (MPI_Initialized): then its MPI is
// used as it is (it must provide FUNNELED or more) and never finalized here. A user error when
// the build has no MPI.
Status init(int* argc, char*** argv);
bool initialized();
// True when init() started MPI itself (and finalize() will end it).
bool started_mpi();
// Ends MPI when init() started it; otherwise (the host's MPI, or none) only forgets it. No
// collective may follow.
void finalize();
// Ends the whole job with exit code `code`: MPI_Abort on all ranks when MPI is running, otherwise
// this process. Never returns.
[[noreturn]] void abort_job(int code);

// One MPI call carries at most min(max_message_count(), INT_MAX bytes / element size) elements
// (INT_MAX by default, so 2^29 - 1 floats). set_max_message_count lowers it, for every
// communicator of the process, so tests run the split paths on small data; n in [1, INT_MAX].
// Only between collectives, and with the same value on every rank.
int64_t max_message_count();
void set_max_message_count(int64_t n);

// Collective kinds, for the byte counters.
enum class Op : int {
  kAllToAll,
  kAllGather,
  kReduceScatter,
  kAllReduce,
  kBroadcast,
  kScatter,
  kGather,
  kCount
};
const char* op_name(Op op);  // "all_to_all", ...

// What this rank handed to other ranks, per collective kind: the logical payload of the direct
// algorithm (bytes addressed to another rank; what stays on this rank is not counted):
//   all_to_all(count)      (N-1)*count floats      all_gather(count)  (N-1)*count floats
//   reduce_scatter(count)  (N-1)*count floats      all_reduce(count)  2*(N-1)*count/N floats
//   broadcast(count)       root: (N-1)*count       scatter(count)     root: (N-1)*count
//   gather(count)          non-root: count
// (count as in each function's contract; 4 bytes per float; calls counted on every rank.)
// seconds: wall time this rank spent inside the collective (waiting for slower ranks included).
struct CommStats {
  int64_t bytes[static_cast<int>(Op::kCount)] = {};
  int64_t calls[static_cast<int>(Op::kCount)] = {};
  double seconds[static_cast<int>(Op::kCount)] = {};
  double cpu_seconds = 0;  // process CPU time (all threads) inside the collectives
  int64_t total_bytes() const;
  double total_seconds() const;
  // this - before, per kind (the counters of a region).
  CommStats since(const CommStats& before) const;
};

// Process CPU time (all threads), seconds.
double process_cpu_seconds();

class Communicator {
 public:
  // The trivial one-rank communicator (no MPI involved).
  Communicator();
  // All ranks of the job (MPI_COMM_WORLD once init() ran, else the trivial communicator).
  static Communicator world();

  int rank() const;
  int size() const;

  // Sub-communicator of the ranks that pass the same color, ordered by key (collective).
  Communicator split(int color, int key) const;
  // With size() = D*N ranks: DAP group g holds ranks [g*N, (g+1)*N) (one model replica), and DP
  // group k holds the ranks with DAP index k of every replica (collective; N must divide size()).
  Communicator dap_group(int n) const;
  Communicator dp_group(int n) const;

  // recv [size*count] gets block p = send block `rank` of rank p; send [size*count] holds block q
  // for rank q. send and recv must not overlap.
  void all_to_all(const float* send, float* recv, int64_t count) const;
  // all [size*count] gets every rank's mine [count], in rank order.
  void all_gather(const float* mine, float* all, int64_t count) const;
  // mine [count] = sum over ranks p of block `rank` of rank p's all [size*count].
  void reduce_scatter(const float* all, float* mine, int64_t count) const;
  // data [count] = sum over ranks of data (in place).
  void all_reduce(float* data, int64_t count) const;
  // data [count] on every rank = data of root.
  void broadcast(float* data, int64_t count, int root) const;
  // mine [count] on rank p = block p of all [size*count] on root (all is read on root only).
  void scatter(const float* all, float* mine, int64_t count, int root) const;
  // all [size*count] on root = every rank's mine, in rank order (all is written on root only).
  void gather(const float* mine, float* all, int64_t count, int root) const;

  // Small control messages (not counted): raw bytes and strings from root, and integer
  // agreement.
  void broadcast_bytes(void* data, int64_t bytes, int root) const;
  void broadcast_string(std::string* s, int root) const;
  std::vector<int64_t> all_gather_i64(int64_t value) const;
  bool all_equal(uint64_t value) const;  // true when every rank passed the same value
  void barrier() const;

  CommStats stats() const;  // counters of this communicator (shared by its copies)
  void reset_stats() const;

 private:
  struct Impl;
  explicit Communicator(std::shared_ptr<Impl> impl);
  struct Timer;  // adds the wall time of a collective to its kind
  void tally(Op op, int64_t floats) const;
  std::shared_ptr<Impl> impl_;
};

}  // namespace fc::dist
