// The cost model against the measured time per module of one AF3-dims Pairformer block (n tokens)
// and one MSA-module block (n tokens, N_msa rows): inference (trace-timed forward) and the
// training step under policy none (TrainOptions::profile), minimum over rounds, beside
// table_module_costs with this machine's profile (cached, else calibrated). Prints est / meas per
// module and per block, and the load average before and after (ratios are same-run).
// The same run times one AF2-dims Evoformer block at (s = n_msa, r = n) against
// block_module_costs (the cost model checked within 10 % on an idle machine, docs/benchmarks.md):
// each AF3 module's est/meas over the Evoformer block's est/meas ("rel") cancels the load and the
// profile's age, so rel = 1 +- 0.1 says the AF3 formula is as right as the Evoformer's.
// Usage: af3_modules_bench [n] [n_msa] [rounds]   (default 256 128 3). For a load-robust run:
// OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive (a 1-thread profile is cached or calibrated).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "bench_util.h"
#include "core/rng.h"
#include "foldcube/af3.h"
#include "foldcube/model.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"
#include "layers/gated_attention.h"
#include "model/af3_weights.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/train.h"
#include "plan/table_cost.h"

namespace {
using Clock = std::chrono::steady_clock;

fc::Tensor random_tensor(const fc::Shape& shape, uint64_t seed) {
  fc::Tensor t = fc::Tensor::empty(shape);  // shape as given
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = fc::uniform_pm1(seed, i);
  return t;
}

double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

using Times = std::map<std::string, double>;  // module -> minimum ms

void keep_min(Times* t, const std::string& module, double ms) {
  auto it = t->find(module);
  if (it == t->end() || ms < it->second) (*t)[module] = ms;
}

// Prints est / meas per module and for the block, and rel = (est / meas) / ref (ref: the same
// run's Evoformer block est / meas; 0: no rel column). Returns the block's est / meas.
double print_table(const char* title, const std::vector<fc::ModuleCost>& est, const Times& meas,
                   bool training, double ref) {
  std::printf("\n%s\n\n| module | est ms | meas ms | est/meas |%s\n|---|---|---|---|%s\n", title,
              ref > 0 ? " rel |" : "", ref > 0 ? "---|" : "");
  double se = 0, sm = 0;
  auto row = [&](const std::string& name, double e, double m) {
    const double q = m > 0 ? e / m : 0.0;
    std::printf("| %s | %.1f | %.1f | %.2f |", name.c_str(), e, m, q);
    if (ref > 0) std::printf(" %.2f |", q / ref);
    std::printf("\n");
  };
  for (const fc::ModuleCost& c : est) {
    const double e = c.forward_ms + (training ? c.backward_ms : 0.0);
    const auto it = meas.find(c.name);
    const double m = it == meas.end() ? 0.0 : it->second;
    se += e;
    sm += m;
    row(c.name, e, m);
  }
  row("**block**", se, sm);
  return sm > 0 ? se / sm : 0.0;
}
// The pair-weighted averaging (AF3 dims, N_msa x n) with its bias-only logits against the same
// weights running the q.k products on their zero query / key projections (as before the mode):
// minimum ms over the rounds of inference and of a training forward + backward, interleaved.
void compare_pwa(int64_t n, int64_t n_msa, int rounds) {
  fc::Af3Config a;
  a.kind = "msa_module";
  const fc::EvoformerConfig cfg = fc::af3_trunk_config(a);
  fc::MsaModuleBlockWeights w, g;
  fc::allocate_msa_module_block(cfg, &w);
  fc::allocate_msa_module_block(cfg, &g);
  for (const fc::NamedParam& p : fc::boltz_params(w, ""))
    for (const fc::Tensor& part : p.parts) fc::random_fill(p.name, part, 7);
  const fc::MsaRowAttentionW& on = w.pair_weighted_averaging;
  fc::MsaRowAttentionW off = on;
  off.mha.bias_logits = false;
  const fc::Tensor m0 = random_tensor({n_msa, n, cfg.c_m}, 1);  // [N, n, c_m]
  const fc::Tensor z = random_tensor({n, n, cfg.c_z}, 2);       // [n, n, c_z]
  const fc::Tensor dout = fc::Tensor::full({n_msa, n, cfg.c_m}, 1.f);
  fc::StackInputs in;
  if (!fc::prepare_inputs(cfg, m0, z, fc::Tensor(), fc::Tensor(), &in).ok()) return;
  fc::BlockContext ctx = fc::make_context(cfg, in, 0, 0);
  ctx.table = &fc::kMsaModuleBlock;
  ctx.threads = fc::num_threads();
  Times t;
  for (int round = 0; round <= rounds; ++round)
    for (const fc::MsaRowAttentionW* wt : {&on, static_cast<const fc::MsaRowAttentionW*>(&off)}) {
      const std::string tag = wt == &on ? "bias-only" : "q.k on zeros";
      fc::Tensor m = m0.clone();
      Clock::time_point t0 = Clock::now();
      fc::msa_row_attention(*wt, ctx, m.f32(), z.f32());
      if (round > 0) keep_min(&t, "inference, " + tag, ms_since(t0));
      m = m0.clone();
      fc::Tensor dm = dout.clone(), dz = fc::Tensor::zeros({n, n, cfg.c_z});
      t0 = Clock::now();
      fc::AttentionState st;
      fc::msa_row_attention_train(*wt, ctx, m.f32(), z.f32(), &st);
      fc::msa_row_attention_backward(*wt, &g.pair_weighted_averaging, ctx, m0.f32(), z.f32(), &st,
                                     dm.f32(), dz.f32());
      if (round > 0) keep_min(&t, "training, " + tag, ms_since(t0));
    }
  std::printf("\nPair-weighted averaging, N_msa = %lld, n = %lld (minimum ms, interleaved):\n",
              static_cast<long long>(n_msa), static_cast<long long>(n));
  for (const char* mode : {"inference", "training"}) {
    const double b = t[std::string(mode) + ", bias-only"],
                 q = t[std::string(mode) + ", q.k on zeros"];
    std::printf("  %s: bias-only %.1f ms, q.k on zeros %.1f ms, ratio %.2f\n", mode, b, q, b / q);
  }
}
}  // namespace

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 256;
  const int64_t n_msa = argc > 2 ? std::atoll(argv[2]) : 128;
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 3;
  if (n < 8 || n_msa < 1 || rounds < 1) {
    std::fprintf(stderr, "usage: af3_modules_bench [n >= 8] [n_msa >= 1] [rounds >= 1]\n");
    return 2;
  }
  std::printf("af3_modules_bench: n = %lld, N_msa = %lld, %d rounds, %d threads\n",
              static_cast<long long>(n), static_cast<long long>(n_msa), rounds, fc::num_threads());
  std::printf("load average before: %s\n", fc::bench::loadavg().c_str());
  fc::DeviceProfile dev;
  if (fc::Status st = fc::load_or_calibrate_profile("", false, &dev); !st.ok()) {
    std::fprintf(stderr, "af3_modules_bench: %s\n", st.ToString().c_str());
    return 1;
  }
  std::printf("profile: %s\n", dev.name.c_str());
  // The three stacks take turns every round (round 0: warm-up), so that load changes hit them
  // alike. The reference: one Evoformer block (AF2 dims) at s = n_msa, r = n.
  struct Stack {
    std::function<fc::Status(const fc::ForwardOptions&)> forward;
    std::function<fc::Status(const fc::TrainOptions&, fc::TrainResult*)> train;
    Times fwd, train_ms;
  };
  fc::EvoformerConfig ecfg;
  ecfg.no_blocks = 1;
  const fc::EvoformerStack evo = fc::EvoformerStack::random(ecfg, 2);
  const fc::Tensor em0 = random_tensor({n_msa, n, ecfg.c_m}, 6);       // [s, r, c_m]
  const fc::Tensor ez0 = random_tensor({n, n, ecfg.c_z}, 7);           // [r, r, c_z]
  const fc::Tensor egm = fc::Tensor::full({n_msa, n, ecfg.c_m}, 1.f);  // [s, r, c_m]
  fc::Af3Config pcfg, mcfg;                                            // Boltz-2 / AF3 dims
  pcfg.no_blocks = mcfg.no_blocks = 1;
  mcfg.kind = "msa_module";
  const fc::Tensor z0 = random_tensor({n, n, pcfg.c_z}, 4);           // [n, n, c_z]
  const fc::Tensor s0 = random_tensor({n, pcfg.c_s}, 3);              // [n, c_s]
  const fc::Tensor f0 = random_tensor({n_msa, n, mcfg.msa_feat}, 5);  // [N, n, msa_feat]
  const fc::Tensor gz = fc::Tensor::full({n, n, pcfg.c_z}, 1.f);      // [n, n, c_z] (both dims)
  const fc::Tensor gs = fc::Tensor::full({n, pcfg.c_s}, 1.f);         // [n, c_s]
  const fc::PairformerStack pstack = fc::PairformerStack::random(pcfg, 1);
  const fc::MsaModule mstack = fc::MsaModule::random(mcfg, 1);
  Stack stacks[3];
  stacks[0].forward = [&](const fc::ForwardOptions& o) {
    fc::Tensor m = em0.clone(), z = ez0.clone();
    return evo.forward(m, z, fc::Tensor(), fc::Tensor(), nullptr, o);
  };
  stacks[0].train = [&](const fc::TrainOptions& o, fc::TrainResult* tr) {
    fc::Tensor m = em0.clone(), z = ez0.clone();
    return evo.train_step(m, z, fc::Tensor(), fc::Tensor(), egm, gz, o, tr);
  };
  stacks[1].forward = [&](const fc::ForwardOptions& o) {
    fc::Tensor z = z0.clone(), s = s0.clone();
    return pstack.forward(s, z, fc::Tensor(), o);
  };
  stacks[1].train = [&](const fc::TrainOptions& o, fc::TrainResult* tr) {
    fc::Tensor z = z0.clone(), s = s0.clone();
    return pstack.train_step(s, z, fc::Tensor(), gs, gz, o, tr);
  };
  stacks[2].forward = [&](const fc::ForwardOptions& o) {
    fc::Tensor z = z0.clone();
    return mstack.forward(z, s0, f0, fc::Tensor(), fc::Tensor(), o);
  };
  stacks[2].train = [&](const fc::TrainOptions& o, fc::TrainResult* tr) {
    fc::Tensor z = z0.clone(), g_emb;  // g_emb [n, c_s] dL/d emb
    return mstack.train_step(z, s0, f0, fc::Tensor(), fc::Tensor(), gz, o, tr, &g_emb);
  };
  for (int round = 0; round <= rounds; ++round)
    for (Stack& st : stacks) {
      fc::ForwardOptions opts;
      Clock::time_point mark = Clock::now();
      opts.trace = [&](int, const std::string& module, const std::string&, const fc::Tensor&) {
        if (round > 0) keep_min(&st.fwd, module, ms_since(mark));
        mark = Clock::now();
      };
      fc::Status status = st.forward(opts);
      fc::TrainOptions to;
      to.policy = {fc::Recompute::kNone};
      to.profile = true;
      fc::TrainResult tr;
      if (status.ok()) status = st.train(to, &tr);
      if (!status.ok()) {
        std::fprintf(stderr, "af3_modules_bench: %s\n", status.ToString().c_str());
        return 1;
      }
      if (round > 0)
        for (const fc::ModuleTime& t : tr.module_ms)
          keep_min(&st.train_ms, t.module, t.forward_ms + t.backward_ms);
    }
  const std::string ewhat = "evoformer (reference), one block, s = " + std::to_string(n_msa) +
                            ", r = " + std::to_string(n);
  const double ref_fwd = print_table(("Inference: " + ewhat).c_str(),
                                     fc::block_module_costs(ecfg, n_msa, n, 0, 0, false, dev),
                                     stacks[0].fwd, false, 0);
  const double ref_train = print_table(("Training step, policy none: " + ewhat).c_str(),
                                       fc::block_module_costs(ecfg, n_msa, n, 0, 0, true, dev),
                                       stacks[0].train_ms, true, 0);
  for (int k = 1; k < 3; ++k) {
    const bool pf = k == 1;
    const fc::EvoformerConfig trunk = fc::af3_trunk_config(pf ? pcfg : mcfg);
    const fc::BlockTable& table = pf ? fc::kPairformerBlock : fc::kMsaModuleBlock;
    const int64_t s_rows = pf ? 1 : n_msa;
    const std::string what = std::string(pf ? "pairformer" : "msa_module") +
                             ", one block, n = " + std::to_string(n) +
                             (pf ? "" : ", N_msa = " + std::to_string(n_msa));
    print_table(("Inference: " + what).c_str(),
                fc::table_module_costs(table, trunk, s_rows, n, 0, 0, false, dev), stacks[k].fwd,
                false, ref_fwd);
    print_table(("Training step, policy none (forward + backward): " + what).c_str(),
                fc::table_module_costs(table, trunk, s_rows, n, 0, 0, true, dev),
                stacks[k].train_ms, true, ref_train);
  }
  compare_pwa(n, n_msa, rounds);
  std::printf("\nload average after: %s\n", fc::bench::loadavg().c_str());
  return 0;
}
