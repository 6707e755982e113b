// `foldcube run --stack pairformer|msa_module`: an AF3 trunk stack (Boltz state dict) on one
// process; the library call is af3_run (foldcube/af3.h).
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "foldcube/af3.h"
#include "foldcube/memory.h"
#include "foldcube/plan.h"
#include "foldcube/runtime.h"

namespace fc::app {

namespace {
Status af3_spec(const RunArgs& a, Af3RunSpec* spec) {
  if (a.dap > 0 || a.dp > 1 || !a.plan.empty() || !a.memory_budget.empty() || a.train)
    return Status::InvalidArgument(
        "the AF3 stacks run on one process without --dap, --dp, --plan, --memory-budget or "
        "--train (dropout) yet");
  spec->stack = a.stack;
  spec->weights = a.weights;
  spec->inputs = a.inputs;
  spec->training = a.backward || !a.grad_outputs.empty() || !a.policy.empty();
  spec->grad_outputs = a.grad_outputs;
  spec->chunk = a.chunk;
  if (!a.chunk_target.empty())
    FC_RETURN_IF_ERROR(parse_bytes(a.chunk_target, &spec->chunk_target_bytes));
  for (const std::string& p : split(a.policy, ',')) {
    Recompute r;
    FC_RETURN_IF_ERROR(parse_recompute(p, &r));
    spec->policy.push_back(r);
  }
  return Status::OK();
}

Status write_report(const std::string& path, const Af3RunReport& rep, bool training) {
  nlohmann::json j;
  j["stack"] = rep.stack;
  j["n"] = rep.n;
  if (rep.stack == "msa_module") j["n_msa"] = rep.n_msa;
  j["training"] = training;
  j["time_ms"] = rep.time_ms;
  if (training) {
    j["forward_ms"] = rep.forward_ms;
    j["backward_ms"] = rep.backward_ms;
    j["activation_bytes"] = rep.activation_bytes;
  }
  j["peak_tracked_bytes"] = rep.peak_tracked_bytes;
  j["peak_rss_bytes"] = peak_rss_bytes();
  j["threads"] = num_threads();
  std::ofstream f(path);
  f << j.dump(2) << "\n";
  if (!f) return Status::IOError("cannot write report " + path);
  return Status::OK();
}
}  // namespace

bool is_af3_run(const RunArgs& a) {
  if (a.stack == "pairformer" || a.stack == "msa_module") return true;
  if (a.stack != "auto" || a.weights.empty()) return false;
  std::string kind;
  return af3_stack_of_file(a.weights, &kind).ok() && !kind.empty();
}

int run_af3(const RunArgs& a) {
  set_num_threads(a.threads);
  Af3RunSpec spec;
  if (Status st = af3_spec(a, &spec); !st.ok()) return fail(st);
  Af3RunReport rep;
  if (Status st = af3_run(spec, &rep); !st.ok()) return fail(st);
  if (!a.out.empty())
    if (Status st = write_safetensors(a.out, rep.out); !st.ok()) return fail(st);
  if (!a.quiet) {
    std::printf("foldcube run: %s, n=%lld%s, %s, %d thread(s)\n", rep.stack.c_str(),
                static_cast<long long>(rep.n),
                rep.stack == "msa_module" ? (", N_msa=" + std::to_string(rep.n_msa)).c_str() : "",
                spec.training ? "training step" : "forward", num_threads());
    std::printf("  time        %10.1f ms\n", rep.time_ms);
    if (spec.training)
      std::printf("  forward %.1f ms, backward %.1f ms, activations %.1f MiB\n", rep.forward_ms,
                  rep.backward_ms, rep.activation_bytes / 1048576.0);
    std::printf("  tracked peak %9.1f MiB\n  peak RSS    %9.1f MiB\n",
                rep.peak_tracked_bytes / 1048576.0, peak_rss_bytes() / 1048576.0);
    if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
  }
  if (!a.report.empty())
    if (Status st = write_report(a.report, rep, spec.training); !st.ok()) return fail(st);
  return 0;
}

}  // namespace fc::app
