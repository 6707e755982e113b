// OpenFold's monomer feature pipeline (predict mode): stage 1 raw features from a query and an
// MSA, stage 2 model features per recycling iteration from the raw features and the random
// decisions. Contracts in foldcube/features.h; the math is written out in docs/features.md.
#include "foldcube/features.h"

#include <omp.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <string_view>
#include <unordered_set>

#include "core/rng.h"
#include "model/af2/residue_constants.h"

namespace fc {
namespace {

constexpr int kGap = 21;   // gap token in both the HHblits and the stage-2 alphabet
constexpr int kMask = 22;  // BERT [MASK] token (stage 2 only)
constexpr int kMsaClasses = 23;
constexpr char kRestypes[] = "ARNDCQEGHILKMFPSTWYV";  // restype order; X = 20

// Query letter -> restypes + X (any other upper-case letter is X).
int restype_index(char c) {
  const char* p = std::strchr(kRestypes, c);
  return (p != nullptr && c != '\0') ? static_cast<int>(p - kRestypes) : 20;
}

// A3M letter ('A'..'Z', '-') -> HHblits index (ACDEFGHIKLMNPQRSTVWYX-): B->D, Z->E, U->C,
// X/J/O->X.
int hhblits_index(char c) {
  static constexpr char kHh[] = "ACDEFGHIKLMNPQRSTVWY";
  if (c == '-') return kGap;
  if (c == 'B') return 2;
  if (c == 'Z') return 3;
  if (c == 'U') return 1;
  const char* p = std::strchr(kHh, c);
  return (p != nullptr && c != '\0') ? static_cast<int>(p - kHh) : 20;
}

// HHblits index -> stage-2 (restype) index.
constexpr int kHhToRestype[22] = {0, 4,  3, 6, 13, 7,  8,  9,  11, 10, 12,
                                  2, 14, 5, 1, 15, 16, 19, 17, 18, 20, 21};

// OpenFold's 2/pi * atan(x / 3) in float32 (atan rounded from double: within 1 ulp of torch).
float deletion_value(float x) {
  return static_cast<float>(std::atan(static_cast<double>(x / 3.0f))) *
         static_cast<float>(2.0 / M_PI);
}

// deletion_value of an integer count (a table below 4096).
float deletion_value_int(int32_t d) {
  static const std::vector<float> table = [] {
    std::vector<float> t(4096);
    for (int i = 0; i < 4096; ++i) t[i] = deletion_value(static_cast<float>(i));
    return t;
  }();
  return d >= 0 && d < 4096 ? table[d] : deletion_value(static_cast<float>(d));
}

// Counter-based uniform draws in [0, 1): value i of stream (seed, tag, iter).
double uniform01(uint64_t seed, uint64_t tag, uint64_t iter, uint64_t i) {
  const uint64_t h =
      splitmix64(splitmix64(splitmix64(seed ^ (tag * 0x9e3779b97f4a7c15ull)) ^ iter) ^
                 (i * 0xd1b54a32d192ed03ull));
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);
}

// Fisher-Yates over v, draws from stream (seed, tag, iter).
void shuffle(std::vector<int64_t>& v, size_t first, uint64_t seed, uint64_t tag, uint64_t iter) {
  for (size_t i = v.size(); i > first + 1; --i) {
    const size_t n = i - first;
    const size_t j =
        first + std::min(n - 1, static_cast<size_t>(uniform01(seed, tag, iter, i) * n));
    std::swap(v[i - 1], v[j]);
  }
}

int64_t centres_of(const RawFeatures& raw, const FeatureConfig& cfg) {
  return std::min(cfg.max_msa_clusters, raw.num_alignments);
}

// hhblits_profile[j, c]: fraction of the S rows with stage-2 letter c at column j ([N, 22]).
std::vector<float> hhblits_profile(const RawFeatures& raw) {
  const int64_t n = raw.num_res, s = raw.num_alignments;
  std::vector<float> prof(n * 22, 0.0f);  // [N, 22]
  for (int64_t i = 0; i < s; ++i)
    for (int64_t j = 0; j < n; ++j) prof[j * 22 + kHhToRestype[raw.msa[i * n + j]]] += 1.0f;
  for (float& p : prof) p /= static_cast<float>(s);
  return prof;
}

template <typename T>
Status get_typed(const TensorFile& f, const std::string& name, DType dtype, const Shape& shape,
                 const T** out) {
  auto it = f.tensors.find(name);
  if (it == f.tensors.end()) return Status::NotFound("decisions: tensor '" + name + "' missing");
  const Tensor& t = it->second;
  if (t.dtype() != dtype)
    return Status::InvalidArgument("decisions: tensor '" + name + "' has dtype " +
                                   dtype_name(t.dtype()) + ", expected " + dtype_name(dtype));
  FC_RETURN_IF_ERROR(expect_shape(name, t, shape));
  FC_CHECK(t.is_contiguous());
  *out = t.data<T>();
  return Status::OK();
}

// Checks that v[0..n) are distinct and in [0, bound).
bool distinct_in_range(const int64_t* v, int64_t n, int64_t bound) {
  std::vector<uint8_t> seen(bound, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (v[i] < 0 || v[i] >= bound || seen[v[i]]) return false;
    seen[v[i]] = 1;
  }
  return true;
}

bool all_alnum(std::string_view s) {
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return std::isalnum(static_cast<unsigned char>(c)); });
}
bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

}  // namespace

// --------------------------------------------------------------------------------- stage 1

std::string species_identifier(std::string_view d) {
  // ^(tr|sp)\|[A-Za-z0-9]{6,10}(_\d)?\|[A-Za-z0-9]+_(?P<species>[A-Za-z0-9]{1,5})(_\d+)?$
  size_t tok = 0;
  while (tok < d.size() && !std::isspace(static_cast<unsigned char>(d[tok]))) ++tok;
  d = d.substr(0, tok);
  d = d.substr(0, d.find('/'));
  if (d.size() < 3 || (d.substr(0, 3) != "tr|" && d.substr(0, 3) != "sp|")) return "";
  d.remove_prefix(3);
  const size_t bar = d.find('|');
  if (bar == std::string_view::npos) return "";
  std::string_view acc = d.substr(0, bar), name = d.substr(bar + 1);
  if (acc.size() >= 2 && acc[acc.size() - 2] == '_' && all_digits(acc.substr(acc.size() - 1)))
    acc.remove_suffix(2);
  if (acc.size() < 6 || acc.size() > 10 || !all_alnum(acc)) return "";
  std::vector<std::string_view> parts;
  for (size_t p = 0;;) {
    const size_t u = name.find('_', p);
    parts.push_back(name.substr(p, u == std::string_view::npos ? u : u - p));
    if (u == std::string_view::npos) break;
    p = u + 1;
  }
  if (parts.size() < 2 || parts.size() > 3) return "";
  if (parts[0].empty() || !all_alnum(parts[0])) return "";
  if (parts[1].empty() || parts[1].size() > 5 || !all_alnum(parts[1])) return "";
  if (parts.size() == 3 && !all_digits(parts[2])) return "";
  return std::string(parts[1]);
}

Status make_raw_features(const FastaRecord& query, const Msa& msa, const std::string& msa_name,
                         RawFeatures* out) {
  const int64_t n = static_cast<int64_t>(query.sequence.size());
  if (n == 0) return Status::InvalidArgument("query '" + query.description + "' is empty");
  if (msa.width != n)
    return Status::InvalidArgument(msa_name + ": the MSA has " + std::to_string(msa.width) +
                                   " aligned columns, the FASTA query has " + std::to_string(n));
  if (msa.letters.compare(0, n, query.sequence) != 0)
    return Status::InvalidArgument(msa_name + ":" +
                                   std::to_string(msa.lines.empty() ? 1 : msa.lines[0]) +
                                   ": the first MSA row is not the FASTA query");
  RawFeatures r;
  r.domain_name = query.description;
  r.sequence = query.sequence;
  r.num_res = n;
  r.aatype.resize(n);
  for (int64_t j = 0; j < n; ++j) r.aatype[j] = restype_index(query.sequence[j]);
  const int64_t records = msa.num_records();
  r.record_to_row.assign(records, -1);
  std::unordered_set<std::string_view> seen;
  seen.reserve(records * 2);
  std::vector<int64_t> kept;
  kept.reserve(records);
  for (int64_t i = 0; i < records; ++i) {
    const std::string_view row(msa.letters.data() + i * n, n);
    if (!seen.insert(row).second) continue;
    r.record_to_row[i] = static_cast<int64_t>(kept.size());
    kept.push_back(i);
  }
  const int64_t s = static_cast<int64_t>(kept.size());
  r.num_alignments = s;
  r.msa.resize(s * n);
  r.deletion_matrix.resize(s * n);
  r.descriptions.reserve(s);
  for (int64_t k = 0; k < s; ++k) {
    const int64_t i = kept[k];
    for (int64_t j = 0; j < n; ++j) {
      r.msa[k * n + j] = hhblits_index(msa.letters[i * n + j]);
      r.deletion_matrix[k * n + j] = msa.deletions[i * n + j];
    }
    r.descriptions.push_back(msa.descriptions[i]);
    r.species.push_back(species_identifier(msa.descriptions[i]));
  }
  *out = std::move(r);
  return Status::OK();
}

void put_raw_tensors(const RawFeatures& raw, const std::string& prefix, TensorFile* out) {
  const int64_t n = raw.num_res, s = raw.num_alignments;
  auto i32 = [](const Shape& shape) { return Tensor::zeros(shape, DType::I32); };
  Tensor aatype = i32({n, 21});  // one-hot
  for (int64_t j = 0; j < n; ++j) aatype.data<int32_t>()[j * 21 + raw.aatype[j]] = 1;
  Tensor bsr = i32({n});
  Tensor residue_index = i32({n}), seq_length = i32({n}), num_alignments = i32({n});
  for (int64_t j = 0; j < n; ++j) {
    residue_index.data<int32_t>()[j] = static_cast<int32_t>(j);
    seq_length.data<int32_t>()[j] = static_cast<int32_t>(n);
    num_alignments.data<int32_t>()[j] = static_cast<int32_t>(s);
  }
  Tensor msa = i32({s, n}), del = i32({s, n});
  std::copy(raw.msa.begin(), raw.msa.end(), msa.data<int32_t>());
  std::copy(raw.deletion_matrix.begin(), raw.deletion_matrix.end(), del.data<int32_t>());
  out->put(prefix + "aatype", aatype);
  out->put(prefix + "between_segment_residues", bsr);
  out->put(prefix + "residue_index", residue_index);
  out->put(prefix + "seq_length", seq_length);
  out->put(prefix + "deletion_matrix_int", del);
  out->put(prefix + "msa", msa);
  out->put(prefix + "num_alignments", num_alignments);
  out->put(prefix + "template_aatype", Tensor::zeros({0, n, 22}));
  out->put(prefix + "template_all_atom_mask", Tensor::zeros({0, n, 37}));
  out->put(prefix + "template_all_atom_positions", Tensor::zeros({0, n, 37, 3}));
  out->put(prefix + "template_sum_probs", Tensor::zeros({0, 1}));
}

// ---------------------------------------------------------------------- random decisions

void draw_decisions(const RawFeatures& raw, const FeatureConfig& cfg, uint64_t seed,
                    FeatureDecisions* out) {
  FeatureDecisions d;
  d.iters = cfg.max_recycling_iters + 1;
  d.rows = raw.num_alignments;
  d.centres = centres_of(raw, cfg);
  d.cols = raw.num_res;
  const int64_t extra = d.rows - d.centres, n = d.cols, sc = d.centres;
  d.extra_kept = std::min(cfg.max_extra_msa, extra);
  d.msa_order.resize(d.iters * d.rows);
  d.bert_mask.assign(d.iters * sc * n, 0);
  d.bert_sample.resize(d.iters * sc * n);
  d.extra_msa_order.resize(d.iters * d.extra_kept);
  const std::vector<float> prof = hhblits_profile(raw);  // [N, 22]
  enum : uint64_t { kOrder = 1, kMaskDraw, kSample, kExtra };
  for (int64_t r = 0; r < d.iters; ++r) {
    std::vector<int64_t> order(d.rows);  // [S]
    std::iota(order.begin(), order.end(), 0);
    if (!cfg.deterministic) shuffle(order, 1, seed, kOrder, r);
    std::copy(order.begin(), order.end(), d.msa_order.begin() + r * d.rows);
    for (int64_t i = 0; i < sc; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const int64_t idx = (r * sc + i) * n + j;
        const int true_tok = kHhToRestype[raw.msa[order[i] * n + j]];
        if (cfg.deterministic) {
          d.bert_sample[idx] = true_tok;
          continue;
        }
        const uint64_t pos = static_cast<uint64_t>(i * n + j);
        d.bert_mask[idx] = uniform01(seed, kMaskDraw, r, pos) < cfg.masked_msa_replace_fraction;
        if (!d.bert_mask[idx]) {  // the sample is only used where masked
          d.bert_sample[idx] = true_tok;
          continue;
        }
        // p[c] = uniform * 0.05 [c < 20] + profile * prof[j, c] + same * [c = true], p[22] = rest.
        double p[kMsaClasses];
        for (int c = 0; c < 22; ++c)
          p[c] = cfg.uniform_prob * (c < 20 ? 0.05 : 0.0) + cfg.profile_prob * prof[j * 22 + c] +
                 cfg.same_prob * (c == true_tok ? 1.0 : 0.0);
        p[kMask] = 1.0 - cfg.uniform_prob - cfg.profile_prob - cfg.same_prob;
        double total = 0;
        for (double v : p) total += v;
        double u = uniform01(seed, kSample, r, pos) * total;
        int c = 0;
        while (c < kMask && u >= p[c]) u -= p[c++];
        d.bert_sample[idx] = c;
      }
    std::vector<int64_t> eorder(extra);  // [E]
    std::iota(eorder.begin(), eorder.end(), 0);
    if (!cfg.deterministic) shuffle(eorder, 0, seed, kExtra, r);
    std::copy_n(eorder.begin(), d.extra_kept, d.extra_msa_order.begin() + r * d.extra_kept);
  }
  *out = std::move(d);
}

Status decisions_from_tensors(const TensorFile& file, const RawFeatures& raw,
                              const FeatureConfig& cfg, FeatureDecisions* out) {
  FeatureDecisions d;
  d.iters = cfg.max_recycling_iters + 1;
  d.rows = raw.num_alignments;
  d.centres = centres_of(raw, cfg);
  d.cols = raw.num_res;
  d.extra_kept = std::min(cfg.max_extra_msa, d.rows - d.centres);
  const int64_t R = d.iters, S = d.rows, sc = d.centres, n = d.cols, ek = d.extra_kept;
  const int64_t* order = nullptr;
  const float* mask = nullptr;
  const int64_t* sample = nullptr;
  const int64_t* eorder = nullptr;
  FC_RETURN_IF_ERROR(get_typed(file, "random.msa_order", DType::I64, {R, S}, &order));
  FC_RETURN_IF_ERROR(get_typed(file, "random.bert_mask", DType::F32, {R, sc, n}, &mask));
  FC_RETURN_IF_ERROR(get_typed(file, "random.bert_sample", DType::I64, {R, sc, n}, &sample));
  FC_RETURN_IF_ERROR(get_typed(file, "random.extra_msa_order", DType::I64, {R, ek}, &eorder));
  for (int64_t r = 0; r < R; ++r) {
    if (order[r * S] != 0 || !distinct_in_range(order + r * S, S, S))
      return Status::InvalidArgument("decisions: random.msa_order[" + std::to_string(r) +
                                     "] is not a permutation of 0.." + std::to_string(S - 1) +
                                     " starting with 0");
    if (!distinct_in_range(eorder + r * ek, ek, S - sc))
      return Status::InvalidArgument("decisions: random.extra_msa_order[" + std::to_string(r) +
                                     "] has repeated or out-of-range rows");
  }
  d.msa_order.assign(order, order + R * S);
  d.extra_msa_order.assign(eorder, eorder + R * ek);
  d.bert_mask.resize(R * sc * n);
  d.bert_sample.resize(R * sc * n);
  for (int64_t i = 0; i < R * sc * n; ++i) {
    if (mask[i] != 0.0f && mask[i] != 1.0f)
      return Status::InvalidArgument("decisions: random.bert_mask holds a value other than 0/1");
    if (sample[i] < 0 || sample[i] > kMask)
      return Status::InvalidArgument("decisions: random.bert_sample holds a token outside 0..22");
    d.bert_mask[i] = mask[i] != 0.0f;
    d.bert_sample[i] = sample[i];
  }
  *out = std::move(d);
  return Status::OK();
}

// ------------------------------------------------------------------------- clustering

void nearest_centres_ref(const uint8_t* extra, int64_t num_extra, const uint8_t* centres,
                         int64_t num_centres, int64_t cols, int64_t* out) {
  for (int64_t e = 0; e < num_extra; ++e) {
    int64_t best = 0, best_agree = -1;
    for (int64_t s = 0; s < num_centres; ++s) {
      int64_t agree = 0;
      for (int64_t j = 0; j < cols; ++j) {
        const uint8_t c = centres[s * cols + j];
        agree += (c <= 20 && extra[e * cols + j] == c);
      }
      if (agree > best_agree) best_agree = agree, best = s;
    }
    out[e] = best;
  }
}

// Clones for x86-64 only (GCC/Clang function multiversioning); other targets get one version.
// None under ThreadSanitizer: the clones' resolver runs while the dynamic loader relocates the
// binary, before the TSan runtime is initialised, and its instrumented entry crashes.
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define FC_NO_BYTE_CLONES
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define FC_NO_BYTE_CLONES
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(FC_NO_BYTE_CLONES)
#define FC_BYTE_CLONES __attribute__((target_clones("arch=skylake-avx512", "avx2", "default")))
#else
#define FC_BYTE_CLONES
#endif

namespace {

constexpr int64_t kLanes = 64;   // row padding: whole vectors up to 512 bits, no scalar tail
constexpr int64_t kBlock = 192;  // columns per byte-lane count (<= 255 per lane: no overflow)
static_assert(kBlock % kLanes == 0 && kBlock <= 255);

// Number of j < cols_pad with a[j] == b[j]; cols_pad a multiple of kLanes. Byte-lane counts over
// blocks of kBlock columns vectorise to compare + subtract on bytes; the clones give AVX2 and
// AVX-512 code paths picked at load time (the default build targets the x86-64 baseline).
FC_BYTE_CLONES int32_t count_equal(const uint8_t* a, const uint8_t* b, int64_t cols_pad) {
  int32_t total = 0;
  for (int64_t j0 = 0; j0 < cols_pad; j0 += kBlock) {
    const int64_t j1 = std::min(cols_pad, j0 + kBlock);
    uint8_t block = 0;
#pragma omp simd reduction(+ : block)
    for (int64_t j = j0; j < j1; ++j) block += a[j] == b[j];
    total += block;
  }
  return total;
}

}  // namespace

void nearest_centres(const uint8_t* extra, int64_t num_extra, const uint8_t* centres,
                     int64_t num_centres, int64_t cols, int64_t* out) {
  // Rows padded to whole vectors: pad bytes differ between the two sides (0xFE vs 0xFF), and gap
  // and [MASK] in a centre become 0xFF, which no extra token equals, so the count is a plain
  // byte-equality count.
  const int64_t cp = (cols + kLanes - 1) / kLanes * kLanes;
  std::vector<uint8_t> keyed(num_centres * cp, 0xFF);  // [S_sel, cp]
  for (int64_t s = 0; s < num_centres; ++s)
    for (int64_t j = 0; j < cols; ++j) {
      const uint8_t c = centres[s * cols + j];
      keyed[s * cp + j] = c > 20 ? 0xFF : c;
    }
#pragma omp parallel
  {
    std::vector<uint8_t> x(cp, 0xFE);  // [cp] this thread's padded extra row
#pragma omp for schedule(static)
    for (int64_t e = 0; e < num_extra; ++e) {
      std::copy_n(extra + e * cols, cols, x.begin());
      int64_t best = 0;
      int32_t best_agree = -1;
      for (int64_t s = 0; s < num_centres; ++s) {
        const int32_t agree = count_equal(x.data(), keyed.data() + s * cp, cp);
        if (agree > best_agree) best_agree = agree, best = s;
      }
      out[e] = best;
    }
  }
}

// --------------------------------------------------------------------------------- stage 2

Status make_model_features(const RawFeatures& raw, const FeatureConfig& cfg,
                           const FeatureDecisions& dec, const std::string& prefix, TensorFile* out,
                           std::vector<int64_t>* assignment) {
  const int64_t R = cfg.max_recycling_iters + 1, S = raw.num_alignments, n = raw.num_res;
  const int64_t sc = centres_of(raw, cfg), ne = S - sc;
  const int64_t ek = std::min(cfg.max_extra_msa, ne);
  const int64_t sp = cfg.max_msa_clusters, ep = cfg.max_extra_msa, tp = cfg.max_templates;
  if (sp < 1 || ep < 0 || tp < 0 || R < 1)
    return Status::InvalidArgument(
        "feature config: max_msa_clusters must be >= 1, "
        "max_extra_msa, max_templates, max_recycling_iters >= 0");
  if (dec.iters != R || dec.rows != S || dec.centres != sc || dec.cols != n || dec.extra_kept != ek)
    return Status::InvalidArgument("random decisions do not match the MSA and config");

  // Zero-filled (on all threads when large: Tensor::zeros).
  auto f32 = [](const Shape& s) { return Tensor::zeros(s, DType::F32); };
  auto i64 = [](const Shape& s) { return Tensor::zeros(s, DType::I64); };
  Tensor aatype = i64({n, R}), residue_index = i64({n, R}), seq_length = i64({R});
  Tensor seq_mask = f32({n, R}), target_feat = f32({n, 22, R});
  Tensor msa_feat = f32({sp, n, 49, R}), msa_mask = f32({sp, n, R}), msa_row_mask = f32({sp, R});
  Tensor bert_mask = f32({sp, n, R}), true_msa = i64({sp, n, R});
  Tensor extra_msa = i64({ep, n, R}), extra_msa_mask = f32({ep, n, R});
  Tensor extra_row_mask = f32({ep, R}), extra_has_del = f32({ep, n, R});
  Tensor extra_del_value = f32({ep, n, R});
  Tensor atom14_exists = f32({n, 14, R}), atom37_exists = f32({n, 37, R});
  Tensor a14_to_37 = i64({n, 14, R}), a37_to_14 = i64({n, 37, R});

  // Iteration-independent features.
  const af2::ResidueTables& at = af2::residue_tables();
  for (int64_t r = 0; r < R; ++r) {
    seq_length.data<int64_t>()[r] = n;
    for (int64_t j = 0; j < n; ++j) {
      const int a = raw.aatype[j];
      aatype.data<int64_t>()[j * R + r] = a;
      residue_index.data<int64_t>()[j * R + r] = j;
      seq_mask.data<float>()[j * R + r] = 1.0f;
      target_feat.data<float>()[(j * 22 + 1 + a) * R + r] = 1.0f;  // [0] between_segment = 0
      for (int k = 0; k < 14; ++k) {
        atom14_exists.data<float>()[(j * 14 + k) * R + r] = at.atom14_mask[a][k];
        a14_to_37.data<int64_t>()[(j * 14 + k) * R + r] = at.atom14_to_atom37[a][k];
      }
      for (int k = 0; k < 37; ++k) {
        atom37_exists.data<float>()[(j * 37 + k) * R + r] = at.atom37_mask[a][k];
        a37_to_14.data<int64_t>()[(j * 37 + k) * R + r] = at.atom37_to_atom14[a][k];
      }
    }
  }

  std::vector<uint8_t> centre_tok(sc * n), true_tok(sc * n);  // [S_sel, N] corrupted / true
  std::vector<float> centre_del(sc * n);                      // [S_sel, N]
  std::vector<uint8_t> extra_tok(ne * n);                     // [E, N]
  std::vector<float> extra_del(ne * n);                       // [E, N]
  std::vector<int64_t> assign(ne);                            // [E]
  std::vector<float> counts(sc * n), del_sum(sc * n);         // [S_sel, N]
  std::vector<float> prof_sum(sc * n * kMsaClasses);          // [S_sel, N, 23]
  if (assignment) assignment->assign(R * ne, 0);
  float* mf = msa_feat.data<float>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t* order = dec.msa_order.data() + r * S;
    // 1-2. sample_msa and make_masked_msa.
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < sc; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const int64_t src = order[i] * n + j, idx = i * n + j, d = (r * sc + i) * n + j;
        true_tok[idx] = static_cast<uint8_t>(kHhToRestype[raw.msa[src]]);
        centre_tok[idx] =
            dec.bert_mask[d] ? static_cast<uint8_t>(dec.bert_sample[d]) : true_tok[idx];
        centre_del[idx] = static_cast<float>(raw.deletion_matrix[src]);
      }
#pragma omp parallel for schedule(static)
    for (int64_t e = 0; e < ne; ++e)
      for (int64_t j = 0; j < n; ++j) {
        const int64_t src = order[sc + e] * n + j;
        extra_tok[e * n + j] = static_cast<uint8_t>(kHhToRestype[raw.msa[src]]);
        extra_del[e * n + j] = static_cast<float>(raw.deletion_matrix[src]);
      }
    // 3. nearest_neighbor_clusters against the corrupted centres.
    nearest_centres(extra_tok.data(), ne, centre_tok.data(), sc, n, assign.data());
    if (assignment) std::copy(assign.begin(), assign.end(), assignment->begin() + r * ne);
    // 4. summarize_clusters: sums over the assigned extra rows (all extra masks are 1), then
    // OpenFold's float32 order: count = (1e-6 + msa_mask) + sum(extra masks).
    std::fill(counts.begin(), counts.end(), 0.0f);
    std::fill(del_sum.begin(), del_sum.end(), 0.0f);
    std::fill(prof_sum.begin(), prof_sum.end(), 0.0f);
    // Each thread owns a range of columns (the scatter over centres never collides).
#pragma omp parallel
    {
      const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
      const int64_t j0 = n * t / nt, j1 = n * (t + 1) / nt;
      for (int64_t e = 0; e < ne; ++e) {
        const int64_t s = assign[e];
        for (int64_t j = j0; j < j1; ++j) {
          counts[s * n + j] += 1.0f;
          del_sum[s * n + j] += extra_del[e * n + j];
          prof_sum[(s * n + j) * kMsaClasses + extra_tok[e * n + j]] += 1.0f;
        }
      }
    }
    const float one_eps = 1e-6f + 1.0f;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < sc; ++i) {
      msa_row_mask.data<float>()[i * R + r] = 1.0f;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t idx = i * n + j;
        const float count = one_eps + counts[idx];
        const float del_mean = (del_sum[idx] + centre_del[idx]) / count;
        prof_sum[idx * kMsaClasses + centre_tok[idx]] += 1.0f;
        // 6. make_msa_feat: [0:23] one-hot, [23] has_deletion, [24] deletion_value,
        // [25:48] cluster_profile, [48] cluster deletion mean value.
        float* f = mf + idx * 49 * R + r;
        f[centre_tok[idx] * R] = 1.0f;
        f[23 * R] = std::min(centre_del[idx], 1.0f);
        f[24 * R] = deletion_value_int(static_cast<int32_t>(centre_del[idx]));
        for (int c = 0; c < kMsaClasses; ++c)
          f[(25 + c) * R] = prof_sum[idx * kMsaClasses + c] / count;
        f[48 * R] = deletion_value(del_mean);
        msa_mask.data<float>()[idx * R + r] = 1.0f;
        bert_mask.data<float>()[idx * R + r] = dec.bert_mask[(r * sc + i) * n + j];
        true_msa.data<int64_t>()[idx * R + r] = true_tok[idx];
      }
    }
    // 5. crop_extra_msa (after the statistics, which used every extra row).
    const int64_t* keep = dec.extra_msa_order.data() + r * ek;
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < ek; ++k) {
      const int64_t e = keep[k];
      extra_row_mask.data<float>()[k * R + r] = 1.0f;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t o = (k * n + j) * R + r;
        const float d = extra_del[e * n + j];
        extra_msa.data<int64_t>()[o] = extra_tok[e * n + j];
        extra_msa_mask.data<float>()[o] = 1.0f;
        extra_has_del.data<float>()[o] = std::min(d, 1.0f);
        extra_del_value.data<float>()[o] = deletion_value_int(static_cast<int32_t>(d));
      }
    }
  }

  // Alphabetical, as in the golden files.
  out->put(prefix + "aatype", aatype);
  out->put(prefix + "atom14_atom_exists", atom14_exists);
  out->put(prefix + "atom37_atom_exists", atom37_exists);
  out->put(prefix + "bert_mask", bert_mask);
  out->put(prefix + "extra_deletion_value", extra_del_value);
  out->put(prefix + "extra_has_deletion", extra_has_del);
  out->put(prefix + "extra_msa", extra_msa);
  out->put(prefix + "extra_msa_mask", extra_msa_mask);
  out->put(prefix + "extra_msa_row_mask", extra_row_mask);
  out->put(prefix + "msa_feat", msa_feat);
  out->put(prefix + "msa_mask", msa_mask);
  out->put(prefix + "msa_row_mask", msa_row_mask);
  out->put(prefix + "residue_index", residue_index);
  out->put(prefix + "residx_atom14_to_atom37", a14_to_37);
  out->put(prefix + "residx_atom37_to_atom14", a37_to_14);
  out->put(prefix + "seq_length", seq_length);
  out->put(prefix + "seq_mask", seq_mask);
  out->put(prefix + "target_feat", target_feat);
  out->put(prefix + "template_aatype", i64({tp, n, R}));
  out->put(prefix + "template_all_atom_mask", f32({tp, n, 37, R}));
  out->put(prefix + "template_all_atom_positions", f32({tp, n, 37, 3, R}));
  out->put(prefix + "template_alt_torsion_angles_sin_cos", f32({tp, n, 7, 2, R}));
  out->put(prefix + "template_mask", f32({tp, R}));
  out->put(prefix + "template_pseudo_beta", f32({tp, n, 3, R}));
  out->put(prefix + "template_pseudo_beta_mask", f32({tp, n, R}));
  out->put(prefix + "template_sum_probs", f32({tp, 1, R}));
  out->put(prefix + "template_torsion_angles_mask", f32({tp, n, 7, R}));
  out->put(prefix + "template_torsion_angles_sin_cos", f32({tp, n, 7, 2, R}));
  out->put(prefix + "true_msa", true_msa);
  out->put(prefix + "use_clamped_fape", f32({R}));
  return Status::OK();
}

}  // namespace fc
