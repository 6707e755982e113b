// Running a plan (foldcube/parallel.h): one process, or DAP groups x DP replicas over MPI, on
// random weights and inputs, measured against the plan's estimates by the caller.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <thread>

#include "dist/comm_api.h"
#include "exec/dap.h"
#include "exec/dap_train.h"
#include "exec/layer_times.h"
#include "foldcube/extra_msa.h"
#include "foldcube/memory.h"
#include "foldcube/parallel.h"
#include "foldcube/runtime.h"
#include "plan/profile_fit.h"

namespace fc {

namespace {
using Clock = std::chrono::steady_clock;

double cpu_now_ms() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return (u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e3 +
         (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e3;
}

double upper_median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// What one replica (DAP group) of a planned run holds: the random stack (every rank), its
// protein's inputs and upstream gradients (the group root), all-ones masks for one-rank groups.
struct Replica {
  Replica(const Plan& p, const Comm& w)
      : plan(p), world(w), dp(w.dp_group(p.dap)), dap(CommAccess::get(w).dap_group(p.dap)) {}
  const Plan& plan;
  Comm world, dp;
  dist::Communicator dap;
  int group = 0;
  bool root = false;
  uint64_t seed = 0;           // protein seed: opts.seed + group
  EvoformerStack stack;        // plan.extra_msa: undefined
  ExtraMsaStack extra;         // plan.extra_msa: the ExtraMSA stack instead
  Tensor msa_mask, pair_mask;  // [s, r], [r, r] ones when dap == 1
  Tensor gm, gz;               // [s, r, c_m], [r, r, c_z] on the root (training)
};

// One pass's figures (this rank).
struct Pass {
  double fwd = 0, bwd = 0, tot = 0, cpu = 0;
  int64_t peak = 0, activation_bytes = 0;
};

// One pass: fresh inputs (untimed, outside the measurement), then the timed step.
Status step(Replica& R, const PlanRunOptions& opts, int pass, Pass* out) {
  const Plan& plan = R.plan;
  const int64_t s = plan.s, r = plan.r;
  Tensor m, z;  // the group root's inputs [s, r, c_m], [r, r, c_z]; undefined elsewhere
  Status st;
  if (R.root) {
    st = random_tensor({s, r, plan.cfg.c_m}, R.seed * 2 + 1, "input.m", &m);
    if (st.ok()) st = random_tensor({r, r, plan.cfg.c_z}, R.seed * 2 + 2, "input.z", &z);
  }
  FC_RETURN_IF_ERROR(R.world.agree(st));
  R.world.barrier();
  MemoryScope scope;
  const double c0 = cpu_now_ms();
  auto measured = [&] {
    out->cpu = cpu_now_ms() - c0;
    out->peak = scope.peak();
  };
  // The replica's step status: the same on every rank of the group (the executors share the
  // root's errors; the hook is asked per group).
  st = opts.inject_failure ? opts.inject_failure(R.group, pass) : Status::OK();
  if (plan.training) {
    TrainOptions o = to_train_options(plan);
    o.seed = R.seed;
    TrainResult res;
    DapTrainStats stats;
    if (st.ok() && plan.extra_msa)
      st = plan.dap > 1 ? dap_train_step(R.extra, R.dap, m, z, Tensor(), Tensor(), R.gm, R.gz, o,
                                         plan.partitions, &stats, &res)
                        : R.extra.train_step(m, z, R.msa_mask, R.pair_mask, R.gm, R.gz, o, &res);
    else if (st.ok())
      st = plan.dap > 1 ? dap_train_step(R.stack, R.dap, m, z, Tensor(), Tensor(), R.gm, R.gz, o,
                                         plan.partitions, &stats, &res)
                        : R.stack.train_step(m, z, R.msa_mask, R.pair_mask, R.gm, R.gz, o, &res);
    // Every replica learns of any replica's failure before the gradient all-reduce (defect 3: a
    // failed replica used to wait in the status agreement while the others reduced gradients).
    FC_RETURN_IF_ERROR(R.world.agree(st));
    const auto t0 = Clock::now();
    FC_RETURN_IF_ERROR(R.world.agree(average_gradients(R.dp, &res)));
    const double reduce_ms = ms_since(t0);
    out->fwd = res.forward_ms;
    out->bwd = res.backward_ms + reduce_ms;
    out->tot = res.forward_ms + res.backward_ms + reduce_ms;
    out->activation_bytes = res.activation_bytes;
    measured();
    return Status::OK();
  }
  DapOptions o;
  o.chunk = plan.chunk;
  o.chunk_target_bytes = plan.chunk_target_bytes;
  o.partitions = plan.partitions;
  o.dtype = to_forward_options(plan).dtype;
  Tensor s_out;  // [r, c_s] on the group root
  const auto t0 = Clock::now();
  if (st.ok() && plan.extra_msa)
    st = plan.dap > 1 ? dap_forward(R.extra, R.dap, m, z, Tensor(), Tensor(), o)
                      : R.extra.forward(m, z, R.msa_mask, R.pair_mask, to_forward_options(plan));
  else if (st.ok())
    st = plan.dap > 1
             ? dap_forward(R.stack, R.dap, m, z, Tensor(), Tensor(), &s_out, o)
             : R.stack.forward(m, z, R.msa_mask, R.pair_mask, &s_out, to_forward_options(plan));
  out->fwd = out->tot = ms_since(t0);
  measured();
  return R.world.agree(st);
}

// The layer timers' table (layer_times) per timed pass, rows of the phases that ran.
std::vector<LayerTimeRow> layer_time_rows(const BlockTable& t, int passes) {
  const LayerTimeTable& tt = layer_times();
  std::vector<LayerTimeRow> rows;
  for (int ph = 0; ph < kLayerPhases; ++ph) {
    double any = 0;
    for (const LayerTime& e : tt.t[ph]) any += e.change_ms + e.layer_ms;
    if (any <= 0) continue;
    for (int i = 0; i <= tt.layers; ++i) {
      const LayerTime& e = tt.t[ph][i];
      rows.push_back({layer_phase_name(static_cast<LayerPhase>(ph)),
                      i < t.count ? t.layers[i].name : "grad_all_reduce", e.change_ms / passes,
                      e.change_comm_ms / passes, e.layer_ms / passes, e.layer_comm_ms / passes,
                      e.change_cpu_ms / passes, e.change_comm_cpu_ms / passes,
                      e.layer_cpu_ms / passes, e.layer_comm_cpu_ms / passes});
    }
  }
  return rows;
}

// Every rank's figures and their maximum.
void gather_measured(const Comm& world, const PlanMeasurement& mine,
                     std::vector<PlanMeasurement>* all, PlanMeasurement* max) {
  auto us = [](double ms) { return static_cast<int64_t>(std::llround(ms * 1e3)); };
  // Layer times (the same rows on every rank of a DAP run): per entry the max over ranks.
  const std::vector<int64_t> nrows = world.all_gather_i64(static_cast<int64_t>(mine.layers.size()));
  const bool rows =
      std::all_of(nrows.begin(), nrows.end(), [&](int64_t n) { return n == nrows[0] && n > 0; });
  std::vector<LayerTimeRow> top = rows ? mine.layers : std::vector<LayerTimeRow>();
  for (LayerTimeRow& row : top)
    for (double* v :
         {&row.change_ms, &row.change_comm_ms, &row.layer_ms, &row.layer_comm_ms,
          &row.change_cpu_ms, &row.change_comm_cpu_ms, &row.layer_cpu_ms, &row.layer_comm_cpu_ms}) {
      const std::vector<int64_t> x = world.all_gather_i64(us(*v));
      *v = *std::max_element(x.begin(), x.end()) / 1e3;
    }
  const std::vector<int64_t> t = world.all_gather_i64(us(mine.time_ms));
  const std::vector<int64_t> f = world.all_gather_i64(us(mine.forward_ms));
  const std::vector<int64_t> b = world.all_gather_i64(us(mine.backward_ms));
  const std::vector<int64_t> c = world.all_gather_i64(us(mine.cpu_ms));
  const std::vector<int64_t> p = world.all_gather_i64(mine.peak_tracked_bytes);
  const std::vector<int64_t> act = world.all_gather_i64(mine.activation_bytes);
  all->assign(world.size(), PlanMeasurement());
  *max = PlanMeasurement();
  for (int k = 0; k < world.size(); ++k) {
    PlanMeasurement& m = (*all)[k];
    m.time_ms = t[k] / 1e3, m.forward_ms = f[k] / 1e3, m.backward_ms = b[k] / 1e3;
    m.cpu_ms = c[k] / 1e3, m.peak_tracked_bytes = p[k], m.activation_bytes = act[k];
    max->time_ms = std::max(max->time_ms, m.time_ms);
    max->forward_ms = std::max(max->forward_ms, m.forward_ms);
    max->backward_ms = std::max(max->backward_ms, m.backward_ms);
    max->cpu_ms = std::max(max->cpu_ms, m.cpu_ms);
    max->peak_tracked_bytes = std::max(max->peak_tracked_bytes, m.peak_tracked_bytes);
    max->activation_bytes = std::max(max->activation_bytes, m.activation_bytes);
  }
  (*all)[world.rank()].layers = mine.layers;
  max->layers = std::move(top);
}
}  // namespace

Status run_plan_dap(const Plan& plan, const Comm& world, const PlanRunOptions& opts,
                    PlanMeasurement* mine, std::vector<PlanMeasurement>* all,
                    PlanMeasurement* max) {
  if (plan.dap < 1 || plan.dp < 1 || plan.dap * plan.dp != world.size())
    return Status::InvalidArgument("the plan has dap=" + std::to_string(plan.dap) +
                                   ", dp=" + std::to_string(plan.dp) + ": it runs on " +
                                   std::to_string(plan.dap * plan.dp) + " rank(s), not " +
                                   std::to_string(world.size()));
  const int N = plan.dap;
  Replica R(plan, world);
  R.group = world.rank() / N;
  R.root = R.dap.rank() == 0;
  R.seed = opts.seed + static_cast<uint64_t>(R.group);
  if (plan.extra_msa)
    R.extra = ExtraMsaStack::random(plan.cfg, opts.seed);
  else
    R.stack = EvoformerStack::random(plan.cfg, opts.seed);
  const int64_t s = plan.s, r = plan.r;
  if (N == 1) R.msa_mask = Tensor::full({s, r}, 1.f), R.pair_mask = Tensor::full({r, r}, 1.f);
  Status st;
  if (plan.training && R.root) {
    st = random_tensor({s, r, plan.cfg.c_m}, R.seed * 2 + 3, "grad.output.m", &R.gm);
    if (st.ok()) st = random_tensor({r, r, plan.cfg.c_z}, R.seed * 2 + 4, "grad.output.z", &R.gz);
  }
  FC_RETURN_IF_ERROR(world.agree(st));
  PlanMeasurement me;
  std::vector<double> tot, fwd, bwd, cpu;
  // The heap is grown to the plan's peak before the passes: the first step of a process would
  // otherwise pay a first-touch page fault for every new page of its peak (12 % of an Extra-MSA
  // step's CPU time), a one-time cost the estimates (a step of a running job) leave out.
  prefault_heap(plan.peak_bytes - mem_stats().live_bytes);
  const BlockTable& table = plan.extra_msa ? kExtraMsaBlock : kEvoformerBlock;
  const bool timing = opts.layer_times && N > 1;
  for (int it = 0; it < opts.warmup + opts.repeats; ++it) {
    if (timing && it == opts.warmup) layer_times_start(table.count);
    Pass p;
    const Status ps = step(R, opts, it, &p);
    if (timing) layer_times_stop();
    FC_RETURN_IF_ERROR(ps);
    if (it >= opts.warmup) {
      tot.push_back(p.tot), fwd.push_back(p.fwd), cpu.push_back(p.cpu);
      if (plan.training) bwd.push_back(p.bwd);
    }
    if (plan.training) me.activation_bytes = p.activation_bytes;
    me.peak_tracked_bytes = std::max(me.peak_tracked_bytes, p.peak);
  }
  me.cpu_ms = upper_median(cpu);
  me.time_ms = upper_median(tot);
  me.forward_ms = upper_median(fwd);
  me.backward_ms = upper_median(bwd);
  if (timing) me.layers = layer_time_rows(table, opts.repeats);
  if (mine != nullptr) *mine = me;
  std::vector<PlanMeasurement> every;
  PlanMeasurement top;
  gather_measured(world, me, &every, &top);
  if (all != nullptr) *all = std::move(every);
  if (max != nullptr) *max = top;
  return Status::OK();
}

std::array<double, 3> calibrate_link(const Comm& world, const EvoformerConfig& cfg, int64_t s,
                                     int64_t r, std::vector<LinkPoint>* points) {
  const dist::Communicator& c = CommAccess::get(world);
  const int n = c.size();
  if (n < 2) return {1, 0, 0};
  const DapLayout l = dap_layout(s, r, n, c.rank());
  // Per-peer floats of a DAP block's collectives (docs/dap.md): the all-to-alls of z's and m's
  // shards (sh / n each), and the all-gathers of a bias [H, r_loc, r_pad] and of the OPM's right
  // projection [s_pad, r_loc, c_o]; a tiny message for the latency.
  const int64_t a2a[] = {l.r_loc * l.r_pad * cfg.c_z / n, l.s_loc * l.r_pad * cfg.c_m / n, 256};
  const int64_t gat[] = {cfg.no_heads_pair * l.r_loc * l.r_pad,
                         l.s_pad * l.r_loc * cfg.c_hidden_opm, 256};
  int64_t most = 0;
  for (int64_t k : a2a) most = std::max(most, k);
  for (int64_t k : gat) most = std::max(most, k);
  std::vector<float> send(static_cast<size_t>(n * most), 1.f);  // [n * most]
  std::vector<float> recv(static_cast<size_t>(n * most), 0.f);  // [n * most]
  std::vector<LinkPoint> pts;
  auto time_op = [&](bool gather, int64_t count) {
    double best = 1e30;
    for (int rep = 0; rep < 9; ++rep) {
      c.barrier();
      const auto t0 = std::chrono::steady_clock::now();
      if (gather)
        c.all_gather(send.data(), recv.data(), count);
      else
        c.all_to_all(send.data(), recv.data(), count);
      const double ns =
          std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
      int64_t slowest = 0;
      for (int64_t v : c.all_gather_i64(static_cast<int64_t>(ns))) slowest = std::max(slowest, v);
      if (rep > 0) best = std::min(best, slowest * 1e-9);
    }
    pts.push_back(
        {gather ? "all_gather" : "all_to_all", 2.0 * (n - 1) * count * sizeof(float), best});
  };
  for (int64_t k : a2a) time_op(false, k);
  for (int64_t k : gat) time_op(true, k);
  // t = latency + bytes / rate by least squares; a non-positive latency: the rate through the
  // largest messages alone.
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (const auto& [op, x, y] : pts) sx += x, sy += y, sxx += x * x, sxy += x * y;
  const double m = static_cast<double>(pts.size());
  const double slope = (m * sxy - sx * sy) / (m * sxx - sx * sx);
  double lat = (sy - slope * sx) / m;
  double gbps = slope > 0 ? 1 / slope * 1e-9 : 0;
  if (!(lat > 0) || !(gbps > 0)) {
    lat = std::max(lat, 0.0);
    double bx = 0, by = 0;
    for (const auto& [op, x, y] : pts) bx += x, by += std::max(y - lat, 1e-12);
    gbps = bx / by * 1e-9;
  }
  if (points != nullptr) *points = pts;
  return {static_cast<double>(n), gbps, std::max(lat * 1e6, 0.1)};
}

void set_link_row(const std::array<double, 3>& row, DeviceProfile* dev) {
  auto& t = dev->link_by_ranks;
  auto it = std::find_if(t.begin(), t.end(), [&](const auto& e) { return e[0] >= row[0]; });
  if (it != t.end() && (*it)[0] == row[0])
    *it = row;
  else
    t.insert(it, row);
}

Status measure_profile_link(const Comm& world, const std::string& path, int64_t s, int64_t r,
                            bool remeasure, bool save, DeviceProfile* out,
                            std::vector<LinkPoint>* points) {
  DeviceProfile dev;
  Status st;
  int64_t need = 0;
  const std::string file = path.empty() ? default_profile_path() : path;
  if (world.rank() == 0) {
    st = load_or_calibrate_profile(path, false, &dev);
    const bool has = std::any_of(dev.link_by_ranks.begin(), dev.link_by_ranks.end(),
                                 [&](const auto& e) { return e[0] == world.size(); });
    need = st.ok() && dev.calibrated && world.size() > 1 && (remeasure || !has);
  }
  st = world.agree(st);
  if (!st.ok()) return st;
  if (world.all_gather_i64(need)[0] == 0) {
    if (out != nullptr) *out = dev;
    return Status::OK();
  }
  // As a calibration: ranks that did not get their cores (other processes running) measure the
  // load, not the link; such a row is used for this run and not cached.
  const auto t0 = std::chrono::steady_clock::now();
  const double cpu0 = process_cpu_ms();
  const std::array<double, 3> row = calibrate_link(world, EvoformerConfig{}, s, r, points);
  const double wall =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const auto shares = world.all_gather_i64(
      static_cast<int64_t>(1000 * (process_cpu_ms() - cpu0) / std::max(wall, 1e-9)));
  const bool busy = *std::min_element(shares.begin(), shares.end()) < 600;
  if (world.rank() == 0) {
    set_link_row(row, &dev);
    if (busy) {
      char note[96];
      std::snprintf(note, sizeof note, " [link over %d ranks measured busy: not cached]",
                    world.size());
      dev.name += note;
    }
    // Only into a file that holds the profile (a calibration not cached, on a busy machine, is
    // not written here either).
    if (save && !busy && std::ifstream(file).good()) st = write_profile(file, dev);
  }
  if (out != nullptr) *out = dev;
  return world.agree(st);
}

void profile_for_ranks(int ranks, DeviceProfile* dev) {
  dev->devices = std::max(dev->devices, ranks);
  // The collectives measured on this node with this many ranks (calibrate_link) are the link;
  // they ran with the ranks sharing the cores as they do here, so no core share applies to them.
  const std::array<double, 3>* measured = nullptr;
  for (const auto& row : dev->link_by_ranks)
    if (static_cast<int>(row[0]) == ranks) measured = &row;
  if (measured != nullptr) {
    dev->link_gbps = (*measured)[1];
    dev->link_latency_us = (*measured)[2];
  } else if (dev->devices > 1 && dev->link_gbps <= 0) {
    // Each byte a rank sends is copied into the shared segment and out of it (a DRAM read and
    // write each, at the sweep rate): sent + received bytes at half of stream_gbps.
    dev->link_gbps = (dev->stream_gbps > 0 ? dev->stream_gbps : dev->mem_gbps) / 2;
    dev->link_latency_us = 5;
  }
  // This machine's calibrated profile describes ranks on this node: more ranks x threads than
  // cores (mpirun --oversubscribe) share the cores, each getting cores / (ranks x threads) of the
  // time its threads were calibrated with, so every rate scales by that share.
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  const int wanted = ranks * std::max(dev->threads, 1);
  if (dev->calibrated && cores > 0 && wanted > cores && dev->core_share <= 0) {
    const double share = static_cast<double>(cores) / wanted;
    DeviceProfile shared;
    const Status st =
        apply_fit_parameters(*dev, {{"compute", share, share}, {"memory", share, share}}, &shared);
    if (st.ok()) {
      shared.chunk_overhead_us /= share;
      shared.module_overhead_us /= share;
      // The collectives' copies run on the shared cores too (a measured link already did).
      if (measured == nullptr) shared.link_gbps *= share;
      shared.core_share = share;
      char note[96];
      std::snprintf(note, sizeof note, " [%d ranks x %d threads on %d cores: rates x %.2f]", ranks,
                    std::max(dev->threads, 1), cores, share);
      shared.name += note;
      *dev = shared;
    }
  }
}

Status load_plan_profile(const std::string& path, bool recalibrate, int devices,
                         DeviceProfile* out) {
  FC_RETURN_IF_ERROR(load_or_calibrate_profile(path, recalibrate, out));
  if (out->calibrated && devices > 1) profile_for_ranks(devices, out);
  return Status::OK();
}

Status make_plan_for_ranks(PlanRequest req, int ranks, Plan* out) {
  Status last;
  bool found = false;
  for (int d = ranks; d >= 1; --d) {
    if (ranks % d != 0 || (!req.training && d != ranks)) continue;
    req.dap = d;
    req.dp = ranks / d;
    Plan p;
    const Status st = make_plan(req, &p);
    if (!st.ok()) {
      if (!found && last.ok()) last = st;
      continue;
    }
    if (!found || p.time_per_protein_ms < out->time_per_protein_ms) *out = std::move(p);
    found = true;
  }
  return found ? Status::OK() : last;
}

}  // namespace fc
