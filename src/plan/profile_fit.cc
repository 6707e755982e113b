// Fitted device profiles: the measured-row table, row predictions and the Levenberg-Marquardt fit
// of a profile's free parameters (src/plan/profile_fit.h, docs/planner.md "Fitted profiles").
#include "plan/profile_fit.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

namespace fc {

namespace {

// The header's columns: the first 11 are required (the original header), the later ones may be
// left off from the end (a table with the 11-column header is read as before).
const std::vector<std::string> kColumns = {
    "s",         "r",       "blocks",  "train",         "policy",  "devices", "dap",
    "dtype",     "time_ms", "peak_mb", "activation_mb", "threads", "stack",   "chunk_launches",
    "ckpt_chunk"};
constexpr int kRequired = 11;

std::string header_of(size_t n) {
  std::string h;
  for (size_t i = 0; i < n; ++i) h += (i ? "," : "") + kColumns[i];
  return h;
}
constexpr double kMiB = 1024.0 * 1024.0;

std::vector<std::string> split_cells(const std::string& line, char sep = ',') {
  std::vector<std::string> out(1);
  for (char ch : line) {
    if (ch == sep)
      out.emplace_back();
    else
      out.back() += ch;
  }
  return out;
}

// printable (at most 24 characters) quote of a cell for error messages
std::string quote(const std::string& cell) {
  std::string q;
  for (char ch : cell.substr(0, 24)) q += (ch >= 32 && ch < 127) ? ch : '?';
  return "'" + q + (cell.size() > 24 ? "...'" : "'");
}

Status cell_error(const std::string& where, const char* column, const std::string& cell,
                  const char* what) {
  return Status::InvalidArgument(where + ": column " + column + ": " + quote(cell) + " " + what);
}

Status parse_int(const std::string& where, const char* column, const std::string& cell, int64_t lo,
                 int64_t hi, int64_t* out) {
  if (cell.empty()) return cell_error(where, column, cell, "is empty (required)");
  int64_t v = 0;
  const auto [p, ec] = std::from_chars(cell.data(), cell.data() + cell.size(), v);
  if (ec != std::errc() || p != cell.data() + cell.size())
    return cell_error(where, column, cell, "is not an integer");
  if (v < lo || v > hi)
    return cell_error(
        where, column, cell,
        ("is out of range [" + std::to_string(lo) + ", " + std::to_string(hi) + "]").c_str());
  *out = v;
  return Status::OK();
}

Status parse_measure(const std::string& where, const char* column, const std::string& cell,
                     std::optional<double>* out) {
  if (cell.empty()) return Status::OK();
  double v = 0;
  const auto [p, ec] = std::from_chars(cell.data(), cell.data() + cell.size(), v);
  if (ec != std::errc() || p != cell.data() + cell.size())
    return cell_error(where, column, cell, "is not a number");
  if (!std::isfinite(v) || v < 0 || v >= 1e12)
    return cell_error(where, column, cell, "must be finite, >= 0 and < 1e12");
  *out = v;
  return Status::OK();
}

// A mix of policies, e.g. none:38+block:10 (the counts sum to the blocks; checked by the caller
// once blocks is known).
Status parse_policy_counts(const std::string& where, const std::string& cell, FitRow* row) {
  for (const std::string& part : split_cells(cell, '+')) {
    const size_t colon = part.find(':');
    Recompute rc;
    int64_t n = 0;
    if (colon == std::string::npos || !parse_recompute(part.substr(0, colon), &rc).ok())
      return cell_error(where, "policy", cell, "is not a mix like none:38+block:10");
    FC_RETURN_IF_ERROR(parse_int(where, "policy", part.substr(colon + 1), 1, 1024, &n));
    row->policy_counts.push_back({rc, n});
  }
  return Status::OK();
}

Status parse_line(const std::string& where, const std::string& line, int cells, FitRow* row) {
  const std::vector<std::string> c = split_cells(line);
  if (static_cast<int>(c.size()) != cells)
    return Status::InvalidArgument(where + ": expected " + std::to_string(cells) +
                                   " cells, found " + std::to_string(c.size()));
  int64_t v = 0;
  FC_RETURN_IF_ERROR(parse_int(where, "s", c[0], 1, 1 << 20, &row->s));
  FC_RETURN_IF_ERROR(parse_int(where, "r", c[1], 1, 1 << 20, &row->r));
  FC_RETURN_IF_ERROR(parse_int(where, "blocks", c[2], 1, 1024, &row->blocks));
  FC_RETURN_IF_ERROR(parse_int(where, "train", c[3], 0, 1, &v));
  row->train = v == 1;
  if (c[4].find(':') != std::string::npos) {
    FC_RETURN_IF_ERROR(parse_policy_counts(where, c[4], row));
  } else if (!c[4].empty()) {
    Recompute rc;
    if (!parse_recompute(c[4], &rc).ok())
      return cell_error(where, "policy", c[4],
                        "is not none|module|block (small|large; a mix like none:38+block:10; or "
                        "empty)");
    row->policy = rc;
  }
  if (!row->policy_counts.empty()) {
    int64_t total = 0;
    for (const auto& pc : row->policy_counts) total += pc.second;
    if (total != row->blocks || !row->train)
      return cell_error(where, "policy", c[4], "must count every block of a training row");
  }
  FC_RETURN_IF_ERROR(parse_int(where, "devices", c[5], 1, 4096, &v));
  row->devices = static_cast<int>(v);
  if (!c[6].empty()) {
    FC_RETURN_IF_ERROR(parse_int(where, "dap", c[6], 1, 4096, &v));
    if (v > row->devices || row->devices % v != 0)
      return cell_error(where, "dap", c[6], "must divide the devices");
    row->dap = static_cast<int>(v);
  }
  if (!row->policy_counts.empty() && row->dap == 0)
    return cell_error(where, "dap", c[6], "must be given with a policy mix");
  if (!c[7].empty()) {
    DType t;
    if (!parse_plan_dtype(c[7], &t).ok())
      return cell_error(where, "dtype", c[7], "is not fp32|bf16|fp16 (or empty)");
    row->dtype = t;
  }
  FC_RETURN_IF_ERROR(parse_measure(where, "time_ms", c[8], &row->time_ms));
  FC_RETURN_IF_ERROR(parse_measure(where, "peak_mb", c[9], &row->peak_mb));
  FC_RETURN_IF_ERROR(parse_measure(where, "activation_mb", c[10], &row->activation_mb));
  if (cells > 11 && !c[11].empty()) {
    FC_RETURN_IF_ERROR(parse_int(where, "threads", c[11], 1, 4096, &v));
    row->threads = static_cast<int>(v);
  }
  if (cells > 12 && !c[12].empty()) {
    if (c[12] != "evoformer" && c[12] != "extra_msa")
      return cell_error(where, "stack", c[12], "is not evoformer|extra_msa (or empty)");
    row->extra_msa = c[12] == "extra_msa";
  }
  if (cells > 13 && !c[13].empty()) {
    std::optional<double> n;
    FC_RETURN_IF_ERROR(parse_measure(where, "chunk_launches", c[13], &n));
    row->chunk_launches = *n;
  }
  if (cells > 14 && !c[14].empty()) {
    FC_RETURN_IF_ERROR(parse_int(where, "ckpt_chunk", c[14], 1, 1 << 20, &row->ckpt_chunk));
    if (!row->train)
      return cell_error(where, "ckpt_chunk", c[14], "is for training rows (empty otherwise)");
  }
  return Status::OK();
}

// ---- Parameters --------------------------------------------------------------------------------

const std::vector<std::string> kParams = {
    "gemm",    "gemm_bwd",  "batched",         "attention",          "attention_bwd",    "mem",
    "mem_bwd", "link_gbps", "link_latency_us", "module_overhead_us", "attention_len_exp"};

// Tied scales, not in the default set (they overlap the per-class ones): `compute` scales every
// FLOP rate (projections, narrow and batched products, attention, their backward, the per-score
// rates), `memory` every memory-bound rate (forward, backward, streams, by size, so also the
// unfused attention's score passes): one efficiency per resource, forward and backward alike, so
// the fit cannot move time between the forward and the backward that the rows do not separate.
const std::vector<std::string> kTied = {"compute", "memory"};

bool known_parameter(const std::string& name) {
  return std::find(kParams.begin(), kParams.end(), name) != kParams.end() ||
         std::find(kTied.begin(), kTied.end(), name) != kTied.end();
}

bool is_scale(const std::string& name) {
  return name != "link_gbps" && name != "link_latency_us" && name != "module_overhead_us" &&
         name != "attention_len_exp";
}

// The fit runs on log p, except for the exponent, which may be any sign (fitted as is).
bool is_log(const std::string& name) { return name != "attention_len_exp"; }
double to_theta(const std::string& name, double v) { return is_log(name) ? std::log(v) : v; }
double from_theta(const std::string& name, double t) { return is_log(name) ? std::exp(t) : t; }

void scale_column(std::vector<std::array<double, 3>>* t, int col, double k) {
  for (auto& row : *t) row[col] *= k;
}

Status apply_one(const std::string& name, double v, DeviceProfile* d) {
  if (name == "attention_len_exp") {  // clamped: the fit may wander where no row constrains it
    if (!std::isfinite(v))
      return Status::InvalidArgument("profile fit: attention_len_exp must be finite");
    d->attention_len_exp = std::clamp(v, -4.0, 4.0);
    return Status::OK();
  }
  if (!(v > 0) || !std::isfinite(v))
    return Status::InvalidArgument("profile fit: parameter " + name + " must be finite and > 0");
  if (name == "compute") {
    for (const char* k : {"gemm", "gemm_bwd", "batched", "attention", "attention_bwd"})
      FC_RETURN_IF_ERROR(apply_one(k, v, d));
    d->attention_score_gps *= v;
    d->attention_bwd_score_gps *= v;
  } else if (name == "memory") {
    FC_RETURN_IF_ERROR(apply_one("mem_bwd", v, d));  // first: an unset backward rate is mem_gbps
    FC_RETURN_IF_ERROR(apply_one("mem", v, d));
  } else if (name == "gemm") {
    d->gemm_gflops *= v;
    scale_column(&d->gemm_by_rows, 1, v);
    scale_column(&d->narrow_gemm, 1, v);
  } else if (name == "gemm_bwd") {
    d->gemm_bwd_gflops *= v;
    scale_column(&d->gemm_by_rows, 2, v);
    scale_column(&d->narrow_gemm, 2, v);
  } else if (name == "batched") {
    d->batched_gflops *= v;
  } else if (name == "attention") {
    d->attention_gflops *= v;
  } else if (name == "attention_bwd") {
    d->attention_bwd_gflops *= v;
  } else if (name == "mem") {
    d->mem_gbps *= v;
    if (d->stream_gbps > 0) d->stream_gbps *= v;
    scale_column(&d->mem_by_size, 1, v);
  } else if (name == "mem_bwd") {
    if (d->mem_bwd_gbps <= 0) d->mem_bwd_gbps = d->mem_gbps;
    d->mem_bwd_gbps *= v;
    scale_column(&d->mem_by_size, 2, v);
  } else if (name == "link_gbps") {
    d->link_gbps = v;
  } else if (name == "link_latency_us") {
    d->link_latency_us = v;
  } else if (name == "module_overhead_us") {
    d->module_overhead_us = v;
  } else {
    return Status::InvalidArgument("profile fit: unknown parameter '" + name + "'");
  }
  return Status::OK();
}

double start_value(const std::string& name, const DeviceProfile& d) {
  if (name == "link_gbps") return d.link_gbps > 0 ? d.link_gbps : 100.0;
  if (name == "link_latency_us") return d.link_latency_us > 0 ? d.link_latency_us : 10.0;
  if (name == "module_overhead_us") return d.module_overhead_us > 0 ? d.module_overhead_us : 10.0;
  if (name == "attention_len_exp") return d.attention_len_exp;
  return 1.0;
}

std::string describe(const Plan& p) {
  int n[3] = {0, 0, 0};
  for (Recompute rc : p.policy) ++n[static_cast<int>(rc)];
  char buf[160];
  std::snprintf(buf, sizeof buf, "dap %d dp %d, n/m/b %d/%d/%d, target %.1f MiB", p.dap, p.dp, n[0],
                n[1], n[2], static_cast<double>(p.chunk_target_bytes) / kMiB);
  return buf;
}

bool same_choices(const Plan& a, const Plan& b) {
  return a.dap == b.dap && a.dp == b.dp && a.policy == b.policy && a.chunk == b.chunk &&
         a.chunk_target_bytes == b.chunk_target_bytes;
}

// Solves A x = b (n x n, row-major) by Gaussian elimination with partial pivoting; false when
// singular.
bool solve(std::vector<double> A, std::vector<double> b, int n, std::vector<double>* x) {
  for (int c = 0; c < n; ++c) {
    int piv = c;
    for (int i = c + 1; i < n; ++i)
      if (std::abs(A[i * n + c]) > std::abs(A[piv * n + c])) piv = i;
    if (!(std::abs(A[piv * n + c]) > 0)) return false;
    if (piv != c) {
      for (int j = 0; j < n; ++j) std::swap(A[c * n + j], A[piv * n + j]);
      std::swap(b[c], b[piv]);
    }
    for (int i = c + 1; i < n; ++i) {
      const double f = A[i * n + c] / A[c * n + c];
      for (int j = c; j < n; ++j) A[i * n + j] -= f * A[c * n + j];
      b[i] -= f * b[c];
    }
  }
  x->assign(n, 0);
  for (int i = n - 1; i >= 0; --i) {
    double s = b[i];
    for (int j = i + 1; j < n; ++j) s -= A[i * n + j] * (*x)[j];
    (*x)[i] = s / A[i * n + i];
  }
  return true;
}

DeviceProfile with_devices(const DeviceProfile& dev, const FitRow& row) {
  DeviceProfile d = dev;
  d.devices = std::max(d.devices, row.devices);
  return d;
}

// Index into `profiles` ([0]: the main one) of the profile whose thread count is the row's
// (threads 0: the main one).
Status row_profile_index(const std::vector<DeviceProfile>& profiles, const FitRow& row, int* out) {
  if (row.threads == 0 || row.threads == profiles[0].threads) {
    *out = 0;
    return Status::OK();
  }
  for (size_t b = 1; b < profiles.size(); ++b)
    if (profiles[b].threads == row.threads) {
      *out = static_cast<int>(b);
      return Status::OK();
    }
  return Status::InvalidArgument("row at line " + std::to_string(row.line) + ": no profile for " +
                                 std::to_string(row.threads) +
                                 " threads (give one calibrated at that count: --thread-profile)");
}

}  // namespace

const std::vector<std::string>& fit_parameter_names() { return kParams; }

int row_element_bytes(const DeviceProfile& dev, DType dtype) {
  if (dev.element_bytes == 2 && dtype == DType::F32) return 4;
  return dev.element_bytes;
}

Status row_profile(const DeviceProfile& main, const std::vector<DeviceProfile>& others,
                   const FitRow& row, DeviceProfile* out) {
  std::vector<DeviceProfile> all = {main};
  all.insert(all.end(), others.begin(), others.end());
  int b = 0;
  FC_RETURN_IF_ERROR(row_profile_index(all, row, &b));
  *out = all[b];
  return Status::OK();
}

Status parse_fit_table(const std::string& text, const std::string& name, std::vector<FitRow>* out) {
  std::vector<FitRow> rows;
  std::istringstream in(text);
  std::string line;
  int n = 0;
  int cells = 0;  // columns of the header; 0 before it
  while (std::getline(in, line)) {
    ++n;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const std::string where = name + ":" + std::to_string(n);
    if (cells == 0) {
      for (size_t k = kRequired; k <= kColumns.size() && cells == 0; ++k)
        if (line == header_of(k)) cells = static_cast<int>(k);
      if (cells == 0)
        return Status::InvalidArgument(where + ": expected the header '" + header_of(kRequired) +
                                       "' (optionally followed by ,threads, ,stack, "
                                       ",chunk_launches and ,ckpt_chunk), found " +
                                       quote(line));
      continue;
    }
    if (line.empty() || line[0] == '#') continue;
    FitRow row;
    row.line = n;
    FC_RETURN_IF_ERROR(parse_line(where, line, cells, &row));
    rows.push_back(row);
  }
  if (cells == 0) return Status::InvalidArgument(name + ":1: empty table (no header)");
  if (rows.empty()) return Status::InvalidArgument(name + ": no rows after the header");
  *out = std::move(rows);
  return Status::OK();
}

Status read_fit_table(const std::string& path, std::vector<FitRow>* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Status::NotFound("cannot open table " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return parse_fit_table(ss.str(), path, out);
}

Status resolve_row_plan(const EvoformerConfig& cfg0, const DeviceProfile& dev0, const FitRow& row,
                        Plan* out) {
  const std::string where = "row at line " + std::to_string(row.line);
  const DeviceProfile dev = with_devices(dev0, row);
  EvoformerConfig cfg = cfg0;
  cfg.no_blocks = row.blocks;
  if (row.extra_msa) {  // AF2's ExtraMSA stack, as `foldcube plan --stack extra_msa`
    cfg.c_m = 64;
    cfg.c_hidden_msa_att = 8;
  }
  const DType dtype = row.dtype.value_or(dev.dtype);
  const int element_bytes = row_element_bytes(dev, dtype);
  const int dp = row.dap > 0 ? row.devices / row.dap : 0;
  if (row.train && (row.policy || !row.policy_counts.empty()) && row.dap > 0) {
    // every choice given: no chunking
    Plan p;
    p.cfg = cfg;
    p.s = row.s;
    p.r = p.r_real = row.r;
    p.training = true;
    p.extra_msa = row.extra_msa;
    if (row.policy) {
      p.policy.assign(row.blocks, *row.policy);
    } else {  // the mix in the order given
      for (const auto& [rc, n] : row.policy_counts) p.policy.insert(p.policy.end(), n, rc);
    }
    p.chunk_target_bytes = training_chunk_targets(cfg, row.s, row.r).back();
    p.dap = row.dap;
    p.dp = dp;
    p.dtype = dtype;
    p.element_bytes = element_bytes;
    p.threads = dev.threads;
    p.memory_limit_bytes = dev.memory_bytes;
    const Status st = evaluate_plan(dev, &p);
    if (!st.ok()) return Status::InvalidArgument(where + ": " + st.message());
    *out = std::move(p);
    return Status::OK();
  }
  PlanRequest req;
  req.cfg = cfg;
  req.s = row.s;
  req.r = row.r;
  req.training = row.train;
  req.extra_msa = row.extra_msa;
  req.profile = dev;
  req.devices = row.devices;
  req.memory_bytes = dev.memory_bytes > 0 ? dev.memory_bytes : int64_t{1} << 60;
  req.dtype = dtype;
  req.element_bytes = element_bytes;
  if (row.train && row.policy) {
    req.fixed_policy = true;
    req.policy = *row.policy;
  }
  req.dap = row.dap;
  req.dp = dp;
  const Status st = make_plan(req, out);
  return st.WithContext(where);
}

Status predict_row(const DeviceProfile& dev, const FitRow& row, const Plan& plan,
                   RowPrediction* out) {
  Plan q = plan;
  const Status st = evaluate_plan(with_devices(dev, row), &q);
  if (!st.ok())
    return Status::InvalidArgument("row at line " + std::to_string(row.line) + ": " + st.message());
  out->time_ms = q.time_ms;
  out->plan = describe(q);
  if (row.chunk_launches > 0) {
    if (!(dev.module_kernels > 0))
      return Status::InvalidArgument("row at line " + std::to_string(row.line) +
                                     ": chunk_launches needs a profile with module_kernels > 0");
    const double ms = static_cast<double>(row.blocks) * row.chunk_launches / std::max(q.dap, 1) *
                      dev.module_overhead_us / dev.module_kernels * 1e-3;
    out->time_ms += ms;
    char buf[64];
    std::snprintf(buf, sizeof buf, ", chunk launches %.1f ms", ms);
    out->plan += buf;
  }
  if (row.ckpt_chunk > 0) {
    const double ms = row.blocks * ckpt_chunk_grad_bytes(q, row.ckpt_chunk) /
                      ((dev.stream_gbps > 0 ? dev.stream_gbps : dev.mem_gbps) * 1e9) * 1e3;
    out->time_ms += ms;
    char buf[64];
    std::snprintf(buf, sizeof buf, ", chunk gradients %.1f ms", ms);
    out->plan += buf;
  }
  out->peak_mb = static_cast<double>(q.peak_bytes) / kMiB;
  out->activation_mb = static_cast<double>(q.activation_bytes) / kMiB;
  return Status::OK();
}

double ckpt_chunk_grad_bytes(const Plan& plan, int64_t chunk) {
  const int64_t s = (plan.s + std::max(plan.dap, 1) - 1) / std::max(plan.dap, 1);
  const double H = static_cast<double>(plan.cfg.no_heads_msa), r = static_cast<double>(plan.r);
  const double whole = 4 * s * r * H * plan.cfg.c_hidden_msa_att + H * r * r;  // q, k, v, g; bias
  const double n = static_cast<double>((s + chunk - 1) / chunk);
  return (n + 3 * (n - 1)) * whole * plan_buffer_bytes(plan.element_bytes);
}

Status apply_fit_parameters(const DeviceProfile& start, const std::vector<FitParameter>& params,
                            DeviceProfile* out) {
  DeviceProfile d = start;
  for (const FitParameter& p : params) FC_RETURN_IF_ERROR(apply_one(p.name, p.value, &d));
  FC_RETURN_IF_ERROR(d.validate());
  *out = std::move(d);
  return Status::OK();
}

Status fit_profile(const EvoformerConfig& cfg, const DeviceProfile& start0,
                   const std::vector<FitRow>& rows, const FitOptions& opts, FitResult* out) {
  FC_RETURN_IF_ERROR(start0.validate());
  std::vector<std::string> names = opts.params.empty() ? kParams : opts.params;
  std::vector<FitParameter> params;
  for (const std::string& n : names) {
    if (!known_parameter(n))
      return Status::InvalidArgument("profile fit: unknown parameter '" + n + "'");
    params.push_back({n, start_value(n, start0), start_value(n, start0), true});
  }
  // The start profiles (this thread count's, then the others') with the value parameters' start
  // values set (a zero link or overhead would otherwise stay zero in log space); scales apply on
  // top of `bases`.
  std::vector<DeviceProfile> bases = {start0};
  for (const DeviceProfile& t : opts.thread_profiles) {
    FC_RETURN_IF_ERROR(t.validate());
    bases.push_back(t);
  }
  for (DeviceProfile& base : bases) {
    // Rows on several devices need a link even when it is not fitted.
    if (base.link_gbps <= 0) base.link_gbps = start_value("link_gbps", start0);
    for (const FitParameter& p : params)
      if (!is_scale(p.name)) FC_RETURN_IF_ERROR(apply_one(p.name, p.value, &base));
  }
  std::vector<int> fit;  // rows with a time
  for (size_t i = 0; i < rows.size(); ++i)
    if (rows[i].time_ms && *rows[i].time_ms > 0) fit.push_back(static_cast<int>(i));
  if (fit.empty()) return Status::InvalidArgument("profile fit: no row has a time_ms");
  std::vector<int> which(rows.size());  // the profile of each row: an index into bases
  for (size_t i = 0; i < rows.size(); ++i)
    FC_RETURN_IF_ERROR(row_profile_index(bases, rows[i], &which[i]));

  // Scales multiply base's rates; value parameters replace base's values. b: index into bases.
  auto profile_at = [&](const std::vector<double>& theta, DeviceProfile* d, size_t b = 0) {
    *d = bases[b];
    for (size_t k = 0; k < params.size(); ++k)
      FC_RETURN_IF_ERROR(apply_one(params[k].name, from_theta(params[k].name, theta[k]), d));
    return d->validate();
  };
  auto profiles_at = [&](const std::vector<double>& theta, std::vector<DeviceProfile>* ds) {
    ds->resize(bases.size());
    for (size_t b = 0; b < bases.size(); ++b) FC_RETURN_IF_ERROR(profile_at(theta, &(*ds)[b], b));
    return Status::OK();
  };
  const int np = static_cast<int>(params.size());
  std::vector<double> theta(np), theta0(np);
  for (int k = 0; k < np; ++k) theta[k] = theta0[k] = to_theta(params[k].name, params[k].start);

  std::vector<Plan> plans(rows.size());
  int iterations = 0;
  std::vector<bool> active(np, true);
  for (int round = 0; round < 3; ++round) {
    std::vector<DeviceProfile> cur;
    FC_RETURN_IF_ERROR(profiles_at(theta, &cur));
    std::vector<Plan> fresh(rows.size());
    for (size_t i = 0; i < rows.size(); ++i)
      FC_RETURN_IF_ERROR(resolve_row_plan(cfg, cur[which[i]], rows[i], &fresh[i]));
    if (round > 0) {
      bool same = true;
      for (size_t i = 0; i < rows.size(); ++i) same = same && same_choices(fresh[i], plans[i]);
      if (same) break;
    }
    plans = std::move(fresh);

    // Residuals: relative time errors of the fit rows, then the prior rows.
    const int nr = static_cast<int>(fit.size()) + (opts.prior_weight > 0 ? np : 0);
    auto residuals = [&](const std::vector<double>& th, std::vector<double>* res) {
      std::vector<DeviceProfile> d;
      FC_RETURN_IF_ERROR(profiles_at(th, &d));
      res->assign(nr, 0);
      for (size_t i = 0; i < fit.size(); ++i) {
        RowPrediction pr;
        FC_RETURN_IF_ERROR(predict_row(d[which[fit[i]]], rows[fit[i]], plans[fit[i]], &pr));
        const double m = *rows[fit[i]].time_ms;
        (*res)[i] = (pr.time_ms - m) / m;
      }
      if (opts.prior_weight > 0)
        for (int k = 0; k < np; ++k)
          (*res)[fit.size() + k] = opts.prior_weight * (th[k] - theta0[k]);
      return Status::OK();
    };
    auto cost_of = [](const std::vector<double>& r) {
      double c = 0;
      for (double v : r) c += v * v;
      return c;
    };
    std::vector<double> res;
    FC_RETURN_IF_ERROR(residuals(theta, &res));
    double cost = cost_of(res), mu = 1e-3;
    for (int it = 0; it < opts.max_iterations && cost > 1e-28; ++it) {
      ++iterations;
      // Central-difference Jacobian in log-parameters.
      const double h = 1e-5;
      std::vector<double> J(static_cast<size_t>(nr) * np, 0.0);
      for (int k = 0; k < np; ++k) {
        if (!active[k]) continue;
        std::vector<double> tp = theta, tm = theta, rp, rm;
        tp[k] += h, tm[k] -= h;
        FC_RETURN_IF_ERROR(residuals(tp, &rp));
        FC_RETURN_IF_ERROR(residuals(tm, &rm));
        double data = 0;
        for (int i = 0; i < nr; ++i) {
          J[i * np + k] = (rp[i] - rm[i]) / (2 * h);
          if (i < static_cast<int>(fit.size())) data = std::max(data, std::abs(J[i * np + k]));
        }
        if (data < 1e-12 && it == 0) active[k] = false;  // no row depends on it: frozen
      }
      std::vector<int> idx;
      for (int k = 0; k < np; ++k)
        if (active[k]) idx.push_back(k);
      const int na = static_cast<int>(idx.size());
      if (na == 0) break;
      std::vector<double> JtJ(na * na, 0.0), g(na, 0.0);
      for (int i = 0; i < nr; ++i)
        for (int a = 0; a < na; ++a) {
          g[a] += J[i * np + idx[a]] * res[i];
          for (int b = 0; b < na; ++b) JtJ[a * na + b] += J[i * np + idx[a]] * J[i * np + idx[b]];
        }
      bool improved = false;
      double step = 0;
      while (mu < 1e20) {
        std::vector<double> A = JtJ, rhs(na), delta;
        for (int a = 0; a < na; ++a) {
          A[a * na + a] += mu * std::max(JtJ[a * na + a], 1e-12);
          rhs[a] = -g[a];
        }
        if (!solve(A, rhs, na, &delta)) {
          mu *= 10;
          continue;
        }
        std::vector<double> trial = theta;
        step = 0;
        for (int a = 0; a < na; ++a) {
          trial[idx[a]] += std::clamp(delta[a], -2.0, 2.0);  // at most e^2 per step
          step = std::max(step, std::abs(delta[a]));
        }
        std::vector<double> rt;
        DeviceProfile probe;
        if (profile_at(trial, &probe).ok() && residuals(trial, &rt).ok() && cost_of(rt) < cost) {
          const double before = cost;
          theta = trial, res = rt, cost = cost_of(rt);
          mu = std::max(mu / 3, 1e-12);
          improved = true;
          if (before - cost <= 1e-15 * before && step < 1e-10) mu = 1e30;  // converged
          break;
        }
        mu *= 4;
      }
      if (!improved || step < 1e-13) break;
    }
  }

  FitResult r;
  for (int k = 0; k < np; ++k) {
    params[k].value = from_theta(params[k].name, theta[k]);
    params[k].determined = active[k];
  }
  std::vector<DeviceProfile> fitted;
  FC_RETURN_IF_ERROR(profiles_at(theta, &fitted));
  r.profile = fitted[0];
  r.thread_profiles.assign(fitted.begin() + 1, fitted.end());
  r.params = params;
  r.iterations = iterations;
  r.predictions.resize(rows.size());
  double ss = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    FC_RETURN_IF_ERROR(predict_row(fitted[which[i]], rows[i], plans[i], &r.predictions[i]));
    if (rows[i].time_ms && *rows[i].time_ms > 0) {
      const double e = (r.predictions[i].time_ms - *rows[i].time_ms) / *rows[i].time_ms;
      ss += e * e;
    }
  }
  r.rms_relative = std::sqrt(ss / fit.size());
  r.plans = std::move(plans);
  *out = std::move(r);
  return Status::OK();
}

namespace {
std::string policy_cell(const FitRow& w) {
  if (w.policy) return recompute_name(*w.policy);
  std::string c;
  for (const auto& [rc, n] : w.policy_counts) {
    if (!c.empty()) c += '+';
    c.append(recompute_name(rc)).append(":").append(std::to_string(n));
  }
  return c.empty() ? "-" : c;
}
}  // namespace

std::string fit_report(const std::vector<FitRow>& rows, const std::vector<RowPrediction>& pred) {
  std::ostringstream o;
  o << "| line | s | r | blocks | train | policy | devices | dap | dtype | plan | time ms meas / "
       "pred (err) | peak MiB meas / pred (err) | activation MiB meas / pred (err) |\n"
    << "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  auto cell = [](const std::optional<double>& m, double p) {
    char buf[96];
    if (m && *m > 0)
      std::snprintf(buf, sizeof buf, "%.1f / %.1f (%+.1f %%)", *m, p, 100 * (p - *m) / *m);
    else
      std::snprintf(buf, sizeof buf, "- / %.1f", p);
    return std::string(buf);
  };
  for (size_t i = 0; i < rows.size() && i < pred.size(); ++i) {
    const FitRow& w = rows[i];
    o << "| " << w.line << " | " << w.s << " | " << w.r << " | " << w.blocks << " | " << w.train
      << " | " << policy_cell(w) << " | " << w.devices << " | "
      << (w.dap > 0 ? std::to_string(w.dap) : "-") << " | "
      << (w.dtype ? plan_dtype_name(*w.dtype) : "-") << " | " << pred[i].plan << " | "
      << cell(w.time_ms, pred[i].time_ms) << " | " << cell(w.peak_mb, pred[i].peak_mb) << " | "
      << cell(w.activation_mb, pred[i].activation_mb) << " |\n";
  }
  // Issue 20's time target (within 15 %), counted on one device and on more.
  int within[2] = {0, 0}, timed[2] = {0, 0};
  for (size_t i = 0; i < rows.size() && i < pred.size(); ++i) {
    if (!rows[i].time_ms || !(*rows[i].time_ms > 0)) continue;
    const int k = rows[i].devices > 1;
    ++timed[k];
    within[k] += std::abs(pred[i].time_ms - *rows[i].time_ms) <= 0.15 * *rows[i].time_ms;
  }
  o << "\nTime within 15 %: " << within[0] + within[1] << " of " << timed[0] + timed[1]
    << " rows (one device " << within[0] << " of " << timed[0] << ", more devices " << within[1]
    << " of " << timed[1] << ")\n";
  return o.str();
}

}  // namespace fc
