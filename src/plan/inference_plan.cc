// Inference memory plan: chunk sizes from the exact workspace model of the modules.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <string>

#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "plan/memory_model.h"

namespace fc {

namespace {
std::string mib(int64_t bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / 1048576.0);
  return buf;
}
}  // namespace

int64_t stack_workspace_bytes(const BlockTable& t, const EvoformerConfig& cfg, int64_t s, int64_t r,
                              int64_t chunk, int64_t chunk_target_bytes, int threads, DType dtype) {
  BlockContext ctx = shape_context(cfg, s, r, chunk, chunk_target_bytes, threads);
  ctx.dtype = dtype;
  int64_t ws = 0;
  for (const LayerDesc& l : t) ws = std::max(ws, layer_workspace_bytes(l, ctx));
  return ws;
}

namespace {
// prepare_inputs: the mask biases and their transposes (and all-ones masks when not given).
int64_t mask_input_bytes(int64_t s, int64_t r, bool masks_given) {
  constexpr int64_t kF = sizeof(float);
  return (masks_given ? 0 : s * r + r * r) * kF + 2 * (s * r + r * r) * kF;
}
}  // namespace

int64_t forward_peak_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, bool masks_given,
                           int64_t chunk, int64_t chunk_target_bytes, int threads, DType dtype) {
  const int64_t out_s = r * cfg.c_s * static_cast<int64_t>(sizeof(float));  // after the blocks
  return mask_input_bytes(s, r, masks_given) +
         std::max(out_s, stack_workspace_bytes(kEvoformerBlock, cfg, s, r, chunk,
                                               chunk_target_bytes, threads, dtype));
}

int64_t extra_msa_forward_peak_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                     bool masks_given, int64_t chunk, int64_t chunk_target_bytes,
                                     int threads, DType dtype) {
  return mask_input_bytes(s, r, masks_given) + stack_workspace_bytes(kExtraMsaBlock, cfg, s, r,
                                                                     chunk, chunk_target_bytes,
                                                                     threads, dtype);
}

Status plan_inference(const EvoformerConfig& cfg, int64_t s, int64_t r, bool masks_given,
                      int64_t base_bytes, int64_t budget_bytes, int threads, InferencePlan* out,
                      DType dtype) {
  MemoryQuery q;
  q.cfg = cfg;
  q.s = s;
  q.r = r;
  q.threads = threads;
  FC_RETURN_IF_ERROR(q.validate());
  if (base_bytes < 0) return Status::InvalidArgument("plan_inference: base_bytes must be >= 0");
  auto peak = [&](int64_t target) {
    return base_bytes + forward_peak_bytes(cfg, s, r, masks_given, 0, target, threads, dtype);
  };
  int64_t hi = default_chunk_target_bytes(cfg, s, r);
  if (peak(hi) <= budget_bytes) {
    *out = {hi, peak(hi)};
    return Status::OK();
  }
  if (peak(1) > budget_bytes)
    return Status::OutOfMemory("memory budget " + mib(budget_bytes) +
                               " is too small for s=" + std::to_string(s) +
                               " r=" + std::to_string(r) + ": even one item per chunk needs " +
                               mib(peak(1)) + " (weights and inputs " + mib(base_bytes) +
                               "); the smallest feasible budget is " + mib(peak(1)));
  int64_t lo = 1;  // peak(lo) fits, peak(hi) does not; the peak never grows as the target shrinks
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (peak(mid) <= budget_bytes ? lo : hi) = mid;
  }
  *out = {lo, peak(lo)};
  return Status::OK();
}

Status parse_bytes(const std::string& text, int64_t* out) {
  size_t i = 0;
  double v = 0;
  try {
    v = std::stod(text, &i);
  } catch (...) {
    return Status::InvalidArgument("cannot read a size from '" + text + "' (e.g. 6GiB, 512MiB)");
  }
  std::string unit = text.substr(i);
  unit.erase(
      std::remove_if(unit.begin(), unit.end(), [](unsigned char c) { return std::isspace(c); }),
      unit.end());
  for (char& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  double mult = 1;
  if (unit.empty() || unit == "B")
    mult = 1;
  else if (unit == "K" || unit == "KIB")
    mult = 1024.0;
  else if (unit == "M" || unit == "MIB")
    mult = 1048576.0;
  else if (unit == "G" || unit == "GIB")
    mult = 1073741824.0;
  else if (unit == "T" || unit == "TIB")
    mult = 1099511627776.0;
  else if (unit == "KB")
    mult = 1e3;
  else if (unit == "MB")
    mult = 1e6;
  else if (unit == "GB")
    mult = 1e9;
  else if (unit == "TB")
    mult = 1e12;
  else
    return Status::InvalidArgument("unknown size unit in '" + text + "'");
  const double bytes = v * mult;
  if (!std::isfinite(bytes) || bytes <= 0 || bytes > 9.0e18)
    return Status::InvalidArgument("size '" + text + "' out of range");
  *out = static_cast<int64_t>(bytes);
  return Status::OK();
}

}  // namespace fc
