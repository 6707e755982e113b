// `foldcube profile fit` (issue 20): fits a device profile's free parameters to a table of
// measured rows (src/plan/profile_fit.h) and writes the fitted profile for `plan --profile`.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <memory>

#include "commands.h"
#include "foldcube/parallel.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"
#include "plan/profile_fit.h"

namespace fc::app {

namespace {

struct ProfileArgs {
  std::string table, out, start, config, predict, params, report;
  double prior = 0;
  int fit_devices = 0;  // fit on the rows with this device count only; predict the others
  int fit_threads = 0;  // fit on the rows with this thread count only (0: any); predict the others
  std::string fit_stack = "any";  // fit on this stack's rows only (evoformer|extra_msa|any)
  std::vector<std::string> thread_profiles;  // start profiles at other thread counts
  // profile link
  std::string link_profile;  // empty: this machine's cached profile
  int64_t s = 128, r = 256;
  int threads = 0;
};

// `mpirun -np N foldcube profile link`: this machine's collectives over N ranks, measured and
// written into the calibrated profile (link_by_ranks), which `plan` and `run --plan` then use.
int link_command(const ProfileArgs& a) {
  set_num_threads(a.threads);
  if (mpi_launched_world_size() < 2)
    return fail(Status::InvalidArgument(
        "profile link measures the collectives between ranks: run it under mpirun -np N (N >= 2)"));
  Status st = mpi_init();
  if (!st.ok()) return fail(st);
  const Comm world = Comm::world();
  DeviceProfile dev;
  std::vector<LinkPoint> pts;
  st = measure_profile_link(world, a.link_profile, a.s, a.r, true, true, &dev, &pts);
  if (world.rank() == 0) {
    if (!st.ok()) {
      fail(st);
    } else {
      for (const LinkPoint& q : pts)
        std::printf("  %-10s %10.3f MB sent + received  %9.3f ms  %6.2f GB/s\n", q.op,
                    q.bytes / 1e6, q.seconds * 1e3, q.bytes / q.seconds * 1e-9);
      for (const auto& row : dev.link_by_ranks)
        if (row[0] == world.size())
          std::printf("link over %d ranks: %.2f GB/s (bytes sent + received), %.1f us per call\n",
                      world.size(), row[1], row[2]);
      if (!dev.calibrated) std::printf("(not a calibrated profile: nothing measured)\n");
    }
  }
  mpi_finalize();
  return st.ok() ? 0 : 1;
}

Status fit_command(const ProfileArgs& a) {
  std::vector<FitRow> all, rows, extra;
  FC_RETURN_IF_ERROR(read_fit_table(a.table, &all));
  DeviceProfile start;  // empty path: this machine's, calibrated and cached
  FC_RETURN_IF_ERROR(load_or_calibrate_profile(a.start, false, &start));
  for (const FitRow& w : all) {
    const int threads = w.threads > 0 ? w.threads : start.threads;
    const bool fitted = (a.fit_devices == 0 || w.devices == a.fit_devices) &&
                        (a.fit_threads == 0 || threads == a.fit_threads) &&
                        (a.fit_stack == "any" || w.extra_msa == (a.fit_stack == "extra_msa"));
    (fitted ? rows : extra).push_back(w);
  }
  if (rows.empty())
    return Status::InvalidArgument(a.table + ": no row with " + std::to_string(a.fit_devices) +
                                   " device(s), " + std::to_string(a.fit_threads) +
                                   " thread(s) (0: any) and stack " + a.fit_stack + " to fit on");
  if (!a.predict.empty()) {
    std::vector<FitRow> more;
    FC_RETURN_IF_ERROR(read_fit_table(a.predict, &more));
    extra.insert(extra.end(), more.begin(), more.end());
  }
  EvoformerConfig cfg;
  if (!a.config.empty()) FC_RETURN_IF_ERROR(EvoformerConfig::from_json_file(a.config, &cfg));
  FitOptions opts;
  opts.params = split(a.params, ',');
  opts.prior_weight = a.prior;
  for (const std::string& path : a.thread_profiles) {
    DeviceProfile t;
    FC_RETURN_IF_ERROR(load_or_calibrate_profile(path, false, &t));
    opts.thread_profiles.push_back(t);
  }
  FitResult r;
  FC_RETURN_IF_ERROR(fit_profile(cfg, start, rows, opts, &r));
  r.profile.name = "fitted to " + a.table + " from " + (start.name.empty() ? "?" : start.name);
  std::ostringstream rep;
  rep << "fit: " << rows.size() << " rows, " << r.iterations << " iterations, rms relative time "
      << "error " << 100 * r.rms_relative
      << " %\n\n| parameter | start | fitted |\n|---|---|---|\n";
  for (const FitParameter& p : r.params)
    rep << "| " << p.name << " | " << p.start << " | " << p.value
        << (p.determined ? "" : " (no row depends on it)") << " |\n";
  rep << "\nFitted rows:\n\n" << fit_report(rows, r.predictions);
  if (!extra.empty()) {
    std::vector<RowPrediction> pred(extra.size());
    for (size_t i = 0; i < extra.size(); ++i) {
      DeviceProfile d;
      FC_RETURN_IF_ERROR(row_profile(r.profile, r.thread_profiles, extra[i], &d));
      Plan p;
      FC_RETURN_IF_ERROR(resolve_row_plan(cfg, d, extra[i], &p));
      FC_RETURN_IF_ERROR(predict_row(d, extra[i], p, &pred[i]));
    }
    rep << "\nPredicted rows (not fitted on):\n\n" << fit_report(extra, pred);
  }
  std::fputs(rep.str().c_str(), stdout);
  if (!a.report.empty()) {
    std::ofstream f(a.report);
    f << rep.str();
    if (!f) return Status::IOError("cannot write " + a.report);
  }
  std::ofstream f(a.out);
  f << r.profile.to_json() << "\n";
  if (!f) return Status::IOError("cannot write " + a.out);
  return Status::OK();
}

}  // namespace

std::function<int()> add_profile_command(CLI::App& app) {
  auto a = std::make_shared<ProfileArgs>();
  CLI::App* cmd = app.add_subcommand(
      "profile", "Device profiles: fit one to measured rows; measure the link between ranks");
  cmd->require_subcommand(1);
  CLI::App* fit = cmd->add_subcommand(
      "fit",
      "fit a profile's rate scales, link bandwidth/latency and per-module overhead to a CSV of "
      "measured rows (least squares on relative time error); prints the residual per row");
  fit->add_option("--table", a->table,
                  "CSV: s,r,blocks,train,policy,devices,dap,dtype,time_ms,peak_mb,activation_mb"
                  "[,threads[,stack]]")
      ->required();
  fit->add_option("--out", a->out, "write the fitted profile JSON here (for plan --profile)")
      ->required();
  fit->add_option("--start", a->start,
                  "start profile JSON (default: this machine's, calibrated and cached)");
  fit->add_option("--config", a->config, "model config JSON (default AF2 model_1)");
  fit->add_option("--params", a->params,
                  "comma-separated parameters to fit (default all: gemm, gemm_bwd, batched, "
                  "attention, attention_bwd, mem, mem_bwd, link_gbps, link_latency_us, "
                  "module_overhead_us, attention_len_exp; also the tied scales compute (every "
                  "FLOP rate) and memory (every memory-bound rate), forward and backward alike)");
  fit->add_option("--prior", a->prior,
                  "weight of log(p / p_start) prior rows (keeps weakly determined parameters "
                  "near the start; default 0)")
      ->check(CLI::Range(0.0, 1e6));
  fit->add_option("--predict", a->predict, "also predict this table's rows with the fit");
  fit->add_option("--fit-devices", a->fit_devices,
                  "fit on the --table rows with this many devices only and predict the others")
      ->check(CLI::Range(1, 4096));
  fit->add_option("--report", a->report, "also write the printed report here (Markdown)");
  fit->add_option("--fit-threads", a->fit_threads,
                  "fit on the rows with this many threads only (empty cell: the start profile's) "
                  "and predict the others")
      ->check(CLI::Range(1, 4096));
  fit->add_option("--fit-stack", a->fit_stack,
                  "fit on this stack's rows only and predict the others (default any)")
      ->check(CLI::IsMember({"evoformer", "extra_msa", "any"}));
  fit->add_option("--thread-profile", a->thread_profiles,
                  "a profile calibrated at another thread count (repeatable): rows with that "
                  "threads cell use it, with the fitted parameters applied");
  CLI::App* link = cmd->add_subcommand(
      "link",
      "under mpirun -np N: time an all-to-all and an all-gather of a DAP block's message sizes "
      "and store the fitted rate and per-call latency in this machine's calibrated profile");
  link->add_option("--profile", a->link_profile,
                   "a calibrated profile JSON to update (default: this machine's cached one)");
  link->add_option("--s", a->s, "the block's sequences (message sizes; default 128)")
      ->check(CLI::Range(1, 1 << 20));
  link->add_option("--r", a->r, "the block's residues (message sizes; default 256)")
      ->check(CLI::Range(1, 1 << 20));
  link->add_option("--threads", a->threads, "threads per rank (the profile of that count)");
  return [cmd, fit, link, a]() -> int {
    if (!*cmd) return -1;
    if (*fit) {
      const Status st = fit_command(*a);
      return st.ok() ? 0 : fail(st);
    }
    if (*link) return link_command(*a);
    return 2;
  };
}

}  // namespace fc::app
