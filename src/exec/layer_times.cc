// Per-layer timers of the sharded executors (src/exec/layer_times.h).
#include "exec/layer_times.h"

namespace fc {

namespace {
LayerTimeTable g_table;
bool g_on = false;
LayerPhase g_phase = LayerPhase::kForward;
}  // namespace

const char* layer_phase_name(LayerPhase p) {
  switch (p) {
    case LayerPhase::kForward:
      return "forward";
    case LayerPhase::kBackward:
      return "backward";
    case LayerPhase::kRecompute:
      return "recompute";
  }
  return "?";
}

void layer_times_start(int layers) {
  g_table.layers = layers;
  for (std::vector<LayerTime>& v : g_table.t) v.assign(layers + 1, LayerTime());
  g_phase = LayerPhase::kForward;
  g_on = true;
}
void layer_times_stop() { g_on = false; }
bool layer_times_on() { return g_on; }
const LayerTimeTable& layer_times() { return g_table; }
void layer_times_phase(LayerPhase p) { g_phase = p; }
LayerPhase layer_times_current_phase() { return g_phase; }

LayerClock::LayerClock(int layer, const dist::Communicator& comm)
    : layer_(layer), comm_(comm), on_(g_on && layer >= 0 && layer <= g_table.layers) {
  if (!on_) return;
  skip();
}

void LayerClock::skip() {
  if (!on_) return;
  t_ = std::chrono::steady_clock::now();
  const dist::CommStats st = comm_.stats();
  comm_s_ = st.total_seconds();
  comm_cpu_s_ = st.cpu_seconds;
  cpu_s_ = dist::process_cpu_seconds();
}

void LayerClock::lap(bool change) {
  if (!on_) return;
  const auto now = std::chrono::steady_clock::now();
  const dist::CommStats st = comm_.stats();
  const double cpu = dist::process_cpu_seconds();
  const double ms = std::chrono::duration<double, std::milli>(now - t_).count();
  const double cms = (st.total_seconds() - comm_s_) * 1e3;
  const double ccpu = (st.cpu_seconds - comm_cpu_s_) * 1e3;
  const double out = (cpu - cpu_s_) * 1e3 - ccpu;  // CPU outside the collectives
  LayerTime& e = g_table.t[static_cast<int>(g_phase)][layer_];
  if (change)
    e.change_ms += ms, e.change_comm_ms += cms, e.change_cpu_ms += out,
        e.change_comm_cpu_ms += ccpu;
  else
    e.layer_ms += ms, e.layer_comm_ms += cms, e.layer_cpu_ms += out, e.layer_comm_cpu_ms += ccpu;
  t_ = now;
  comm_s_ = st.total_seconds();
  comm_cpu_s_ = st.cpu_seconds;
  cpu_s_ = cpu;
}

}  // namespace fc
