// The whole AlphaFold2 model's tracked peak per rank under DAP against one process, from the two
// memory models (src/plan/af2_memory.cc and af2_dap_memory.cc, each equal to the tracked
// allocator byte for byte: tests Af2Memory.*, DapAf2Memory.*). The model's seeded random weights
// and random features of the given shape are built and measured (every rank holds the features,
// and all weights or, sharded, its share of the stack blocks); the forward is not run, so shapes
// too large for this machine can be tabulated too.
//
//   build/af2_dap_memory_bench [--r 256] [--s 128] [--extra 1024] [--templates 4] [--blocks 48]
//                              [--recycles 3] [--ranks 2,4] [--threads 1]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "exec/af2_dap.h"
#include "foldcube/alphafold.h"
#include "foldcube/memory.h"

namespace {

double mib(int64_t b) { return static_cast<double>(b) / 1048576.0; }

}  // namespace

int main(int argc, char** argv) {
  int64_t r = 256, s = 128, extra = 1024, templates = 4, blocks = 48, recycles = 3, threads = 1;
  std::vector<int> ranks = {2, 4};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const char* v = argv[i + 1];
    if (k == "--r")
      r = std::atoll(v);
    else if (k == "--s")
      s = std::atoll(v);
    else if (k == "--extra")
      extra = std::atoll(v);
    else if (k == "--templates")
      templates = std::atoll(v);
    else if (k == "--blocks")
      blocks = std::atoll(v);
    else if (k == "--recycles")
      recycles = std::atoll(v);
    else if (k == "--threads")
      threads = std::atoll(v);
    else if (k == "--ranks") {
      ranks.clear();
      std::stringstream ss(v);
      for (std::string t; std::getline(ss, t, ',');) ranks.push_back(std::atoi(t.c_str()));
    } else {
      std::fprintf(stderr, "af2_dap_memory_bench: unknown flag %s\n", k.c_str());
      return 2;
    }
  }
  fc::AlphaFoldConfig cfg = fc::alphafold_model_1_ptm();
  cfg.evoformer.no_blocks = static_cast<int>(blocks);
  fc::AlphaFold model;
  fc::Status st = fc::AlphaFold::load(cfg, fc::AlphaFold::random_weights(cfg, 1), &model);
  if (!st.ok()) return std::fprintf(stderr, "%s\n", st.ToString().c_str()), 1;
  const int64_t weights = fc::mem_stats().live_bytes;
  const fc::FeatureDict feats =
      fc::random_alphafold_features(r, s, extra, templates, static_cast<int>(recycles + 1), 8);
  const int64_t base = fc::mem_stats().live_bytes;  // weights and features, on every rank
  fc::AlphaFoldDims dims;
  st = fc::alphafold_dims(model.config(), feats, &dims);
  if (!st.ok()) return std::fprintf(stderr, "%s\n", st.ToString().c_str()), 1;
  fc::AlphaFoldMemory one;
  st = fc::alphafold_forward_memory(model.config(), dims, {}, static_cast<int>(threads), &one);
  if (!st.ok()) return std::fprintf(stderr, "%s\n", st.ToString().c_str()), 1;
  std::printf(
      "AlphaFold2 model_1_ptm, r=%lld, %lld clusters, %lld extra, %lld templates, %lld blocks, "
      "%lld passes, %lld thread(s) per rank, default chunking\n",
      static_cast<long long>(r), static_cast<long long>(s), static_cast<long long>(extra),
      static_cast<long long>(templates), static_cast<long long>(blocks),
      static_cast<long long>(recycles + 1), static_cast<long long>(threads));
  std::printf("weights %.1f MiB, features %.1f MiB (held by every rank)\n", mib(weights),
              mib(base - weights));
  std::printf("%-22s %14s %16s %10s %14s\n", "run", "peak (MiB)", "above held (MiB)", "ratio",
              "ratio above");
  std::printf("%-22s %14.1f %16.1f %10.3f %14.3f\n", "1 process", mib(base + one.peak_bytes),
              mib(one.peak_bytes), 1.0, 1.0);
  // Replicated weights (--replicate-weights) and sharded ones (the default under --dap): a rank
  // then holds the base less the stack blocks it does not own, plus one block buffer per stage.
  for (bool sharded : {false, true})
    for (int n : ranks) {
      for (int k = 0; k < n; ++k) {
        fc::AlphaFoldMemory mem;
        st = fc::alphafold_dap_forward_memory(model.config(), dims, {}, static_cast<int>(threads),
                                              n, k, &mem, sharded);
        if (!st.ok()) return std::fprintf(stderr, "%s\n", st.ToString().c_str()), 1;
        const int64_t held =
            base - (sharded ? fc::alphafold_released_weight_bytes(model.config(), n, k) : 0);
        char name[48];
        std::snprintf(name, sizeof name, "%d ranks:%d %s", n, k,
                      sharded ? "sharded" : "replicated");
        std::printf("%-22s %14.1f %16.1f %10.3f %14.3f\n", name, mib(held + mem.peak_bytes),
                    mib(mem.peak_bytes),
                    static_cast<double>(held + mem.peak_bytes) / (base + one.peak_bytes),
                    static_cast<double>(mem.peak_bytes) / one.peak_bytes);
      }
    }
  return 0;
}
