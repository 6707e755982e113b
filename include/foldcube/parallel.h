// Many processes: the MPI lifecycle, a communicator handle, and the drivers that run a job over
// Dynamic Axial Parallelism (DAP, one protein sharded over N ranks) and data parallelism (DP, D
// groups of N ranks, one protein each). The drivers are collective: every rank of `world` calls
// them with the same arguments, and every rank returns the same Status (an error on any rank
// reaches every rank; no rank is left waiting in a collective). MPI itself stays inside the
// library (src/dist); built without MPI, every communicator has one rank.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/model.h"
#include "foldcube/planner.h"
#include "foldcube/runner.h"
#include "foldcube/status.h"
#include "foldcube/tensor.h"

namespace fc {

// True when this build has MPI.
bool mpi_available();
// Ranks the MPI launcher (mpirun) started this process among (its environment); 1 without one.
int mpi_launched_world_size();
// Starts MPI unless it is running already: a host program (e.g. Python with mpi4py) that
// initialised MPI keeps it, and mpi_finalize() then leaves it running. A user error without MPI.
Status mpi_init(int* argc = nullptr, char*** argv = nullptr);
// Ends MPI only when mpi_init started it. No driver or collective may follow.
void mpi_finalize();

// A group of ranks (a handle to the library's communicator; copies share it). Collectives block
// until this rank's part is done; every rank of the group calls them in the same order.
class Comm {
 public:
  Comm();               // the trivial one-rank group (no MPI involved)
  static Comm world();  // all ranks once mpi_init ran, else the one-rank group
  int rank() const;
  int size() const;
  // With size() = D*N: DAP group g = ranks [g*N, (g+1)*N); DP group k = the ranks with DAP index
  // k of every DAP group (collective).
  Comm dap_group(int n) const;
  Comm dp_group(int n) const;

  void barrier() const;
  bool all_equal(uint64_t value) const;  // every rank passed the same value
  std::vector<int64_t> all_gather_i64(int64_t value) const;
  void broadcast_string(std::string* s, int root) const;
  // data [count] = sum over ranks (in place).
  void all_reduce(float* data, int64_t count) const;
  // Error agreement: every rank passes its own status and every rank gets the same one back: OK
  // when all are OK, else the lowest failing rank's code and message (prefixed "rank K: " with
  // name_rank).
  Status agree(const Status& mine, bool name_rank = false) const;

 private:
  struct Impl;
  explicit Comm(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
  friend struct CommAccess;  // src/dist/comm_api.h: the library's view of the handle
};

// Averages every parameter gradient of *grads over the ranks of dp (collective on dp; every rank
// holds the same names and shapes). A DP step: the DDP average of the replicas' gradients.
Status average_gradients(const Comm& dp, TrainResult* grads);

// ---- DAP inference ----------------------------------------------------------------------------
// Figures of every rank (index = rank of world), gathered on every rank.
struct DapForwardReport {
  EvoformerConfig cfg;
  StackKind kind = StackKind::kEvoformer;
  int64_t s = 0, r = 0, s_pad = 0, r_pad = 0;  // real and padded sizes
  Tensor m, z, s_out;            // rank 0: the outputs [s, r, c_m], [r, r, c_z], [r, c_s]
  std::vector<double> times_ms;  // per timed pass (this rank's wall time)
  double time_ms = 0;            // median
  std::vector<int64_t> rank_peak_tracked_bytes, rank_work_peak_bytes, rank_peak_rss_bytes,
      rank_shard_bytes;
  std::vector<double> rank_block_collective_ms;  // time inside the blocks' collectives, last pass
  int64_t block_sent_bytes = 0;                  // per block, rank 0, measured
  // The analytic volume per block and rank (docs/dap.md).
  int64_t block_all_to_all_bytes_model = 0, block_all_gather_bytes_model = 0,
          block_sent_bytes_model = 0;
};
// The Evoformer stack over the world.size() ranks of world: rank 0 loads the job (load_job; an
// ExtraMSA stack is refused), shares the weights, and every rank runs its shard. opts: chunk,
// chunk_target_bytes, warmup, repeats (memory_budget and profile are not supported).
Status run_dap(const Comm& world, const JobSpec& spec, const RunOptions& opts,
               DapForwardReport* out);

// ---- DAP/DP training --------------------------------------------------------------------------
struct DapTrainReport {
  EvoformerConfig cfg;
  StackKind kind = StackKind::kEvoformer;
  int64_t s = 0, r = 0, s_pad = 0, r_pad = 0;  // protein 0
  Tensor m, z;                                 // world rank 0: protein 0's outputs
  TrainResult result;  // world rank 0: protein 0's input gradients; every rank: the averaged
                       // parameter gradients
  std::vector<double> forward_ms, backward_ms, total_ms;  // per timed pass (this rank)
  std::vector<int64_t> rank_activation_bytes, rank_step_peak_bytes, rank_shard_bytes,
      rank_peak_rss_bytes;
  std::vector<double> rank_forward_collective_ms, rank_backward_collective_ms;  // last pass
  // This rank's bytes sent in the last pass, and the analytic model (all blocks).
  int64_t forward_sent_bytes = 0, forward_sent_bytes_model = 0;
  int64_t backward_sent_bytes = 0, backward_sent_bytes_model = 0;
  int64_t grad_all_reduce_bytes = 0;
};
// One training step (warmup + repeats passes) on dp groups of dap ranks (dap * dp =
// world.size()): the root of group g loads protein g (spec.inputs / spec.grad_outputs: one file,
// or dp comma-separated files; random ones seeded by spec.seed + g, as one process with that
// seed; dropout seeded likewise), world rank 0's weights go to every rank, each group runs the
// DAP step, and the parameter gradients are averaged over the groups.
Status run_dap_training(const Comm& world, int dap, int dp, const JobSpec& spec,
                        const RunOptions& opts, DapTrainReport* out);

// ---- Running a plan ---------------------------------------------------------------------------
// Measured figures of one planned run (medians over the timed passes, peaks over all passes).
// Where a DAP group's time goes, per layer (PlanRunOptions::layer_times): for one phase
// ("forward", "backward", "recompute": a block recompute's forward) and one layer of the block
// table (or "grad_all_reduce": the backward's parameter-gradient all-reduce), ms per timed pass
// summed over the blocks: the layout changes the executor makes for the layer, the layer itself,
// and the time inside collectives during each.
struct LayerTimeRow {
  std::string phase, layer;
  double change_ms = 0, change_comm_ms = 0, layer_ms = 0, layer_comm_ms = 0;
  // Process CPU time outside the collectives and inside them (MPI's copies, and its polling
  // while a rank waits for the others).
  double change_cpu_ms = 0, change_comm_cpu_ms = 0, layer_cpu_ms = 0, layer_comm_cpu_ms = 0;
};
struct PlanMeasurement {
  double time_ms = 0, forward_ms = 0, backward_ms = 0;
  double cpu_ms = 0;                 // process CPU time (all threads) per timed pass, median
  int64_t peak_tracked_bytes = 0;    // absolute tracked peak: weights, inputs, masks, work
  int64_t activation_bytes = 0;      // training: kept from forward for backward
  std::vector<LayerTimeRow> layers;  // with PlanRunOptions::layer_times and dap > 1 (max: per
                                     // entry the max over ranks)
};
struct PlanRunOptions {
  uint64_t seed = 0;  // random weights (every rank) and protein g's inputs (seed + g)
  int warmup = 0, repeats = 1;
  bool layer_times = false;  // time every layer of the DAP executors (PlanMeasurement::layers)
  // Test hook: called on every rank before each pass's step; a non-OK status is this rank's
  // step failing (the drivers must still end on every rank with that status).
  std::function<Status(int rank, int pass)> inject_failure;
};
// Runs a plan with plan.dap x plan.dp = world.size() ranks (world = Comm() for one process) on
// random weights and inputs: DAP groups run the sharded step (one-rank groups the single-process
// forward or step with all-ones masks); training with dp > 1 averages the parameter gradients
// (timed with the backward). `mine` gets this rank's figures, `all` every rank's, `max` their
// maximum (either may be null).
Status run_plan_dap(const Plan& plan, const Comm& world, const PlanRunOptions& opts,
                    PlanMeasurement* mine, std::vector<PlanMeasurement>* all = nullptr,
                    PlanMeasurement* max = nullptr);
// Times an all-to-all and an all-gather of a DAP block's message sizes at (s, r) over the ranks
// of world (collective; the slowest rank, best of 8 after a warm-up), and fits time = latency +
// bytes sent and received / rate: the row (ranks, GB/s, latency us) of
// DeviceProfile::link_by_ranks. One rank: {1, 0, 0}.
struct LinkPoint {
  const char* op;  // "all_to_all" | "all_gather"
  double bytes;    // sent + received by a rank
  double seconds;  // the slowest rank's, best of 8
};
std::array<double, 3> calibrate_link(const Comm& world, const EvoformerConfig& cfg, int64_t s,
                                     int64_t r, std::vector<LinkPoint>* points = nullptr);
// Collective. Rank 0 reads the profile at path (empty: this machine's, calibrated and cached);
// when it is calibrated and has no link_by_ranks row for world's size (or remeasure), every rank
// measures it (calibrate_link at (s, r)) and rank 0 adds it and, with save, writes the profile
// back to path (the cache), unless a rank got less than 60 % of a core during the measurement (a
// busy machine: the row is used, marked in the profile's name, not written). *out (may be null):
// rank 0's profile (others: unset).
Status measure_profile_link(const Comm& world, const std::string& path, int64_t s, int64_t r,
                            bool remeasure, bool save, DeviceProfile* out,
                            std::vector<LinkPoint>* points = nullptr);
// Puts row into dev->link_by_ranks (replacing the row of the same rank count; ranks ascending).
void set_link_row(const std::array<double, 3>& row, DeviceProfile* dev);
// The link for `ranks` ranks on this node: the profile's measured row of link_by_ranks for that
// count; else, when the profile has no link, link_gbps = stream_gbps / 2 (mem_gbps / 2 without a
// sweep rate), 5 us per collective call (docs/planner.md). devices = max(devices, ranks). A
// calibrated profile with more ranks x threads than cores gets every rate x the core share
// (recorded in core_share; applied once).
void profile_for_ranks(int ranks, DeviceProfile* dev);
// The profile a plan for `devices` devices is made with (both front ends): `path` through
// load_or_calibrate_profile, and for this machine's calibrated profile, which has no link rate,
// profile_for_ranks(devices) when devices > 1.
Status load_plan_profile(const std::string& path, bool recalibrate, int devices,
                         DeviceProfile* out);
// The fastest plan that uses all `ranks` ranks: inference runs DAP over all of them; training
// tries every split dap x dp = ranks (ties: more DAP). req.dap / req.dp are overwritten.
Status make_plan_for_ranks(PlanRequest req, int ranks, Plan* out);

}  // namespace fc
