// foldcube command line: `foldcube run` (Evoformer inference) and `foldcube bench`.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>

#include "commands.h"
#include "foldcube/memory.h"
#include "foldcube/parallel.h"
#include "foldcube/runtime.h"

namespace {
CLI::App* add_run(CLI::App& app, fc::app::RunArgs& ra) {
  CLI::App* run = app.add_subcommand(
      "run",
      "Evoformer stack forward pass. Without --weights/--inputs it uses seeded random "
      "weights and inputs at AF2 model_1 dimensions (the embedded default job).");
  run->add_option("--weights", ra.weights,
                  "OpenFold state dict (safetensors) or AlphaFold parameters (.npz)");
  run->add_option("--inputs", ra.inputs,
                  "safetensors with input.m, input.z [, input.msa_mask, input.pair_mask]");
  run->add_option("--config", ra.config,
                  "model config JSON (default: weights metadata, else inferred from shapes); with "
                  "--model af2 also a preset name model_1 ... model_5[_ptm]");
  run->add_option("--out", ra.out, "write output.m, output.z, output.s (F32) here");
  run->add_option("--report", ra.report, "write time and memory as JSON here");
  run->add_option("--s", ra.s, "random inputs: number of sequences")->check(CLI::Range(1, 1 << 20));
  run->add_option("--r", ra.r, "random inputs: number of residues")->check(CLI::Range(1, 1 << 20));
  run->add_option("--blocks", ra.blocks, "random weights: number of Evoformer blocks")
      ->check(CLI::Range(1, 1024));
  run->add_option("--seed", ra.seed, "seed for random weights and inputs");
  run->add_option("--threads", ra.threads, "threads (default: OMP_NUM_THREADS or all cores)")
      ->check(CLI::Range(1, 4096));
  run->add_option("--chunk", ra.chunk,
                  "force batch items per chunk in every module (0 = automatic)")
      ->check(CLI::Range(0, 1 << 30));
  run->add_option("--chunk-target", ra.chunk_target,
                  "automatic chunking: bytes each module's chunk buffers aim at, e.g. 64MiB "
                  "(default: bytes(m+z)/8, at least 4 MiB)");
  run->add_option("--repeats", ra.repeats, "timed forward passes (median reported)")
      ->check(CLI::Range(1, 1000));
  run->add_option("--warmup", ra.warmup, "untimed forward passes first")
      ->check(CLI::Range(0, 1000));
  run->add_flag("--quiet", ra.quiet, "no human summary");
  run->add_option("--stack", ra.stack,
                  "evoformer | extra_msa | pairformer | msa_module | auto (default: the weights' "
                  "metadata 'kind' or a Boltz state dict's names, else evoformer)");
  run->add_option("--memory-budget", ra.memory_budget,
                  "inference: keep the tracked peak (weights, inputs, work) under this size, e.g. "
                  "6GiB; chunk sizes come from the memory model; refuses if nothing fits");
  run->add_option("--dap", ra.dap,
                  "Dynamic Axial Parallelism (inference and training) over N MPI ranks: mpirun "
                  "-np N foldcube run ... --dap N; rank 0 reads and writes the files")
      ->check(CLI::Range(1, 65536));
  run->add_option("--dp", ra.dp,
                  "training: data parallelism over D DAP groups (mpirun -np D*N ... --dp D --dap "
                  "N): group g trains protein g (--inputs/--grad-outputs list D files, or random "
                  "inputs seeded by --seed + g); parameter gradients averaged over the groups")
      ->check(CLI::Range(1, 65536));
  run->add_option("--plan", ra.plan,
                  "auto: plan for this shape, threads and --memory-budget (make_plan), or a plan "
                  "JSON from `foldcube plan --out`; runs it on random weights and reports the "
                  "estimates beside the measured time and memory");
  run->add_option(
      "--plan-profile", ra.plan_profile,
      "device profile JSON for --plan (default: this machine's, calibrated and cached)");
  run->add_flag("--profile", ra.profile,
                "print time per module (summed over blocks); with --plan of a DAP plan: per layer "
                "the estimate beside the wall and CPU time of the layer and its layout changes");
  run->add_flag("--unfused", ra.unfused,
                "inference: run the unfused LayerNorm/Linear/transition reference path");
  run->add_option("--dtype", ra.dtype,
                  "inference GEMM inputs: fp32 (default) | bf16 (bf16 inputs, f32 accumulation "
                  "and storage; the stacks, also under --dap and --plan, and --model af2); "
                  "training (Evoformer, ExtraMSA, also under --dap and --plan): the layer inputs "
                  "kept for the backward in bf16")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  run->add_option("--model", ra.model,
                  "af2: the whole AlphaFold2 model (inference) from --weights (OpenFold AlphaFold "
                  "state dict) and --features (feature.<name> tensors with the recycling axis); "
                  "--out receives output.<name>")
      ->check(CLI::IsMember({"af2"}));
  run->add_option("--features", ra.features, "--model af2: safetensors with feature.<name>");
  run->add_option("--extra", ra.extra, "--model af2, random features: extra sequences")
      ->check(CLI::Range(1, 1 << 20));
  run->add_option("--templates", ra.templates, "--model af2, random features: templates")
      ->check(CLI::Range(0, 64));
  run->add_option("--recycle-tolerance", ra.recycle_tolerance,
                  "--model af2: stop recycling once the CA distance matrix changes by less than "
                  "this (RMS, Angstrom) between passes (0 = run every pass)")
      ->check(CLI::Range(0.0, 1e6));
  run->add_flag("--replicate-weights", ra.replicate_weights,
                "--model af2 --dap N: every rank holds all stack weights (default: each rank "
                "holds every N-th block and receives the others by broadcast as they run)");
  run->add_option("--recycles", ra.recycles,
                  "--model af2: recycling iterations (default: as many as the features hold)")
      ->check(CLI::Range(0, 1000));
  run->add_flag(
      "--backward", ra.backward,
      "training step: forward and backward (random upstream gradients unless --grad-outputs)");
  run->add_option("--grad-outputs", ra.grad_outputs,
                  "safetensors with grad.output.m and grad.output.z (implies --backward)");
  run->add_flag("--train", ra.train,
                "training mode: AF2 dropout (seeded by --seed; implies --backward)");
  run->add_option("--policy", ra.policy,
                  "recompute policy none|module|block, or a comma-separated list per block "
                  "(implies --backward)");
  return run;
}

CLI::App* add_bench(CLI::App& app, fc::app::BenchArgs& ba) {
  CLI::App* bench = app.add_subcommand(
      "bench",
      "Evoformer forward benchmark table with same-run SGEMM peak (--train: training-step table)");
  bench->add_option("--threads", ba.threads, "threads (default: OMP_NUM_THREADS or all cores)")
      ->check(CLI::Range(1, 4096));
  bench
      ->add_option("--repeats", ba.repeats,
                   "timed repeats per row, median reported (default 3; 1 with --train)")
      ->check(CLI::Range(1, 100));
  bench->add_option("--shapes", ba.shapes,
                    "comma-separated s:r list (default 128:256,512:256; 128:256 with --train)");
  bench->add_option("--blocks", ba.blocks,
                    "comma-separated block counts (default 1,4; 2,4 with --train)");
  bench->add_option("--json", ba.out_json, "also write the table as JSON here");
  bench
      ->add_option("--dtype", ba.dtype,
                   "forward table: GEMM inputs of every row, fp32 (default) | bf16 (run --dtype)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  bench->add_flag(
      "--long", ba.long_seq,
      "long-sequence table: one block at s=128, r from --shapes (default 512,1024,2048) "
      "under a 2.5 x (m+z) budget, and the largest r in 16 GiB");
  bench->add_flag("--chunks", ba.chunks,
                  "chunking-overhead table: one block at one s:r (default 128:256) unchunked, "
                  "automatic, under shrinking budgets and with forced --chunk sizes");
  bench->add_flag("--dap", ba.dap,
                  "DAP table: one block per s:r (default 128:256) in one process and under "
                  "mpirun -np N --dap N for N in --ranks: time, per-rank peaks, bytes per block");
  bench->add_option("--ranks", ba.ranks, "with --dap: comma-separated rank counts (default 1,2,4)");
  bench->add_flag("--plan", ba.plan,
                  "planner table (issue 6): training step at --shapes (default "
                  "128:256,512:256,512:384), --blocks N (default 2), under a budget that forces "
                  "choices: the planner's plan and the fixed policies, estimated vs measured");
  bench->add_flag("--modules", ba.modules,
                  "cost model per training module (estimate vs measured forward and backward) at "
                  "one s:r (default 128:256) for each chunk target of --targets");
  bench->add_flag("--extra-msa", ba.extra,
                  "with --modules: the ExtraMSA block (c_e = 64, 8 heads of 8) instead of the "
                  "Evoformer's");
  bench->add_option("--targets", ba.targets,
                    "with --modules: training chunk targets (default 1MiB,4MiB,16MiB,64MiB,1GiB)");
  bench->add_option("--memory", ba.memory, "--plan: the memory budget (default: forcing)");
  bench->add_option("--profile", ba.profile,
                    "--plan: device profile JSON (default: this machine's, calibrated and cached)");
  bench->add_flag("--train", ba.train,
                  "training step (forward + backward) per recompute policy none/small/large: "
                  "measured peak and activation memory and time beside the memory model's "
                  "predictions, and the model at 48 blocks (fp32, fp16)");
  return bench;
}

CLI::App* add_plan(CLI::App& app, fc::app::PlanArgs& pa) {
  CLI::App* plan = app.add_subcommand(
      "plan", "Schedule planner: fastest plan under a memory limit, with its estimates");
  plan->add_option("--s", pa.s, "number of sequences")->check(CLI::Range(1, 1 << 20));
  plan->add_option("--r", pa.r, "number of residues")->check(CLI::Range(1, 1 << 20));
  plan->add_option("--blocks", pa.blocks, "Evoformer blocks")->check(CLI::Range(1, 1024));
  plan->add_flag("--train", pa.train, "plan a training step (forward + backward)");
  plan->add_option("--devices", pa.devices, "devices (default: the profile's)")
      ->check(CLI::Range(1, 4096));
  plan->add_option("--memory", pa.memory, "memory limit per device, e.g. 40GB, 6GiB");
  plan->add_option("--profile", pa.profile,
                   "device profile JSON (default: this machine, calibrated once and cached)");
  plan->add_flag("--calibrate", pa.calibrate, "re-calibrate this machine's profile");
  plan->add_option("--dtype", pa.dtype,
                   "fp32 | bf16 | fp16 (default: the profile's); on the engine's layout bf16 is "
                   "`run --dtype bf16`: f32 buffers, the kept layer inputs in bf16");
  plan->add_option("--element-bytes", pa.element_bytes,
                   "bytes of every device buffer: 0 = foldcube's engine (f32, kept inputs in the "
                   "dtype), 2 = every buffer in 2 bytes (the seeds' fp16 GPUs), 4 (default: the "
                   "profile's element_bytes)")
      ->check(CLI::IsMember({0, 2, 4}));
  plan->add_option("--policy", pa.policy,
                   "evaluate this recompute policy (none|module|block) for every block");
  plan->add_option("--chunk", pa.chunk, "force batch items per chunk")
      ->check(CLI::Range(0, 1 << 30));
  plan->add_option("--chunk-target", pa.chunk_target,
                   "force the chunk target (bytes per module's chunk buffers, e.g. 32MiB)");
  plan->add_option("--dap", pa.dap, "force the DAP degree")->check(CLI::Range(1, 4096));
  plan->add_option("--dp", pa.dp, "force the data-parallel degree")->check(CLI::Range(1, 4096));
  plan->add_option("--split-policy", pa.split,
                   "dap: pure DAP; auto: choose each layer's partition (heads, channels, "
                   "replicated or dap) for the DAP degree")
      ->check(CLI::IsMember({"dap", "auto"}));
  plan->add_flag("--explain-splits", pa.explain_splits,
                 "print each layer's non-DAP splits and the fastest list as step-time terms "
                 "relative to pure DAP (compute, link bytes, link latency, memory)");
  plan->add_flag("--bucket", pa.bucket, "pad r up to the next bucket (AF3 list by default)");
  plan->add_option("--buckets", pa.buckets, "comma-separated bucket list (implies --bucket)");
  plan->add_option("--config", pa.config, "model config JSON (default AF2 model_1)");
  plan->add_option("--cache", pa.cache, "plan cache directory");
  plan->add_option("--out", pa.out, "also write the plan JSON here");
  plan->add_flag("--json", pa.json, "print the plan as JSON");
  plan->add_option(
          "--stack", pa.stack,
          "evoformer | extra_msa | pairformer | msa_module (extra_msa: the ExtraMSA stack, "
          "inference or training, DAP/DP, --config with c_m = c_e, default AF2's c_e = 64, 8 "
          "heads of 8; AF3: a memory plan, --r tokens, --s MSA rows, AF3 dims or "
          "--weights' dims)")
      ->check(CLI::IsMember({"evoformer", "extra_msa", "pairformer", "msa_module"}));
  plan->add_option("--weights", pa.weights, "AF3 stacks: the dims of this Boltz state dict");
  return plan;
}

}  // namespace

// OpenMP threads that spin while they wait collapse when another process holds a core (an
// Evoformer forward on 2 threads ran 5x slower than on 1 under load; docs/benchmarks.md,
// "OpenMP waiting"). libgomp reads its wait policy when it is loaded, before main, so when the
// user chose neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT the process re-executes itself once with
// OMP_WAIT_POLICY=passive. If the exec fails, the run goes on with libgomp's default.
void use_passive_openmp_wait(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr || std::getenv("GOMP_SPINCOUNT") != nullptr) return;
  if (::setenv("OMP_WAIT_POLICY", "passive", 1) != 0) return;
  ::execv("/proc/self/exe", argv);
}

// Runs the command through run_shielded (its threads block signals; an idle watcher thread takes
// Ctrl-C): the first stops the command at its next module, block or stage
// boundary and exits with 130, no output of an unfinished job written (outputs are written to a
// temporary file and renamed); a second ends the process at once.
int run_interruptible(const std::function<int()>& command) {
  static const char kNotice[] =
      "\nfoldcube: Ctrl-C: stopping at the next module boundary (Ctrl-C again to quit now)\n";
  fc::SigintCancelScope scope(kNotice);
  int rc = 2;
  const fc::Status st = fc::run_shielded([&]() -> fc::Status {
    rc = command();
    return fc::Status::OK();
  });
  if (scope.interrupted()) {
    std::fprintf(stderr, "foldcube: interrupted; outputs of unfinished jobs were not written\n");
    return 130;
  }
  return st.ok() ? rc : 1;
}

int main(int argc, char** argv) {
  use_passive_openmp_wait(argv);
  // Large tensors are reused from the heap rather than mapped afresh (foldcube/memory.h).
  fc::configure_allocator({.reuse_large_blocks = true});
  CLI::App app{"foldcube: AlphaFold-family trunks (Evoformer) on the CPU"};
  app.require_subcommand(1);

  fc::app::RunArgs ra;
  fc::app::BenchArgs ba;
  fc::app::PlanArgs pa;
  CLI::App* run = add_run(app, ra);
  CLI::App* bench = add_bench(app, ba);
  CLI::App* plan = add_plan(app, pa);

  std::function<int()> features = fc::app::add_features_command(app);
  std::function<int()> fold = fc::app::add_fold_command(app);
  std::function<int()> profile = fc::app::add_profile_command(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "foldcube: error: %s (see --help)\n", e.what());
    return 2;
  }
  ra.blocks_given = run->count("--blocks") > 0;
  ra.dtype_given = run->count("--dtype") > 0;
  const auto command = [&]() -> int {
    if (*run) return fc::app::run_command(ra);
    if (*bench) return fc::app::bench_command(ba, argv[0]);
    if (*plan) return fc::app::plan_command(pa);
    if (const int rc = features(); rc >= 0) return rc;
    if (const int rc = fold(); rc >= 0) return rc;
    if (const int rc = profile(); rc >= 0) return rc;
    return 2;
  };
  // Under mpirun a Ctrl-C keeps its default action: ranks would stop at different blocks and
  // wait for each other in a collective. Otherwise it stops the command at its next cancel check.
  if (fc::mpi_launched_world_size() > 1) return command();
  return run_interruptible(command);
}
