// Per-layer timers of the sharded executors (docs/planner.md, "Where the time goes"): for each
// layer of a block table, summed over blocks and timed passes, the wall time of its layout changes
// (the reshards the executor makes before the layer, and after its last use of a stream in the
// block) and of the layer itself, each with the time this rank spent inside collectives during it
// (the dist layer's seconds). Off unless started; one process-wide table (the executors run one
// step at a time, on the main thread).
#pragma once

#include <chrono>
#include <vector>

#include "dist/comm.h"

namespace fc {

// Forward, backward (a module rebuild included), and the forward a block recompute runs again.
enum class LayerPhase : int { kForward, kBackward, kRecompute };
constexpr int kLayerPhases = 3;
const char* layer_phase_name(LayerPhase p);  // "forward" | "backward" | "recompute"

struct LayerTime {
  double change_ms = 0, change_comm_ms = 0;  // layout changes, and the collectives in them
  double layer_ms = 0, layer_comm_ms = 0;    // the layer, and its own collectives / partial sums
  // Process CPU time of the same, outside the collectives and inside them (a waiting rank's MPI
  // polls: on a loaded machine the CPU time outside the collectives is the steadier figure).
  double change_cpu_ms = 0, change_comm_cpu_ms = 0;
  double layer_cpu_ms = 0, layer_comm_cpu_ms = 0;
};
// Per phase, one entry per layer of the table, and one more (index `layers`): the block's
// parameter-gradient all-reduce over the DAP group (backward).
struct LayerTimeTable {
  int layers = 0;
  std::vector<LayerTime> t[kLayerPhases];
};

// Zeroes the table for a block table of `layers` layers and starts timing.
void layer_times_start(int layers);
// Stops timing; the table keeps its sums.
void layer_times_stop();
bool layer_times_on();
const LayerTimeTable& layer_times();
// The phase the executor's laps go to (the training driver sets it; forward by default).
void layer_times_phase(LayerPhase p);
LayerPhase layer_times_current_phase();

// Laps of one layer: change() adds the time since the previous lap (or construction) to the
// layer's layout changes, layer() to the layer itself; each adds comm's collective seconds of the
// same interval. Nothing is recorded while timing is off.
class LayerClock {
 public:
  LayerClock(int layer, const dist::Communicator& comm);
  void change() { lap(true); }
  void layer() { lap(false); }
  // Restarts the interval without recording it (work that is neither, e.g. a trace).
  void skip();

 private:
  void lap(bool change);
  int layer_;
  const dist::Communicator& comm_;
  bool on_;
  std::chrono::steady_clock::time_point t_;
  double comm_s_ = 0, cpu_s_ = 0, comm_cpu_s_ = 0;
};

}  // namespace fc
