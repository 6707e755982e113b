// Reading parameter files: an AlphaFold .npz (libzip + .npy headers + CRC) against the same
// parameters as safetensors, and the .npz read plus the AF2 -> OpenFold name map. The files are
// af2_model_af2dims.npz (AF2 model_1_ptm widths, 27.5 MB) from FOLDCUBE_GOLDEN_DIR (default
// /work/shared/golden) or, without it, af2_model_tiny.npz; the safetensors twin is written to a
// temporary file first. Bytes/s counts the parameter bytes.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "foldcube/io.h"

namespace {

std::string npz_path() {
  const char* dir = std::getenv("FOLDCUBE_GOLDEN_DIR");
  const std::string golden =
      std::string(dir ? dir : "/work/shared/golden") + "/af2_model_af2dims.npz";
  if (std::filesystem::exists(golden)) return golden;
  return std::string(FOLDCUBE_TEST_DATA_DIR) + "/af2_model_tiny.npz";
}

struct Files {
  std::string npz, safetensors;
  int64_t bytes = 0;
  Files() : npz(npz_path()) {
    fc::TensorFile f;
    if (!fc::read_weights(npz, &f).ok()) std::abort();
    for (const auto& [name, t] : f.tensors) bytes += static_cast<int64_t>(t.nbytes());
    safetensors =
        (std::filesystem::temp_directory_path() / "foldcube_io_bench.safetensors").string();
    if (!fc::write_safetensors(safetensors, f).ok()) std::abort();
  }
  ~Files() { std::filesystem::remove(safetensors); }
};
const Files& files() {
  static const Files f;
  return f;
}

void BM_ReadNpz(benchmark::State& state) {
  for (auto _ : state) {
    fc::TensorFile f;
    if (!fc::read_npz(files().npz, &f).ok()) state.SkipWithError("read_npz failed");
  }
  state.SetBytesProcessed(state.iterations() * files().bytes);
}
void BM_ReadNpzMapped(benchmark::State& state) {
  for (auto _ : state) {
    fc::TensorFile f;
    if (!fc::read_weights(files().npz, &f).ok()) state.SkipWithError("read_weights failed");
  }
  state.SetBytesProcessed(state.iterations() * files().bytes);
}
void BM_ReadSafetensors(benchmark::State& state) {
  for (auto _ : state) {
    fc::TensorFile f;
    if (!fc::read_safetensors(files().safetensors, &f).ok()) state.SkipWithError("read failed");
  }
  state.SetBytesProcessed(state.iterations() * files().bytes);
}
BENCHMARK(BM_ReadNpz)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ReadNpzMapped)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ReadSafetensors)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
