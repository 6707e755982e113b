// EvoformerConfig: validation and JSON / safetensors-metadata I/O. No exception escapes.
#include "foldcube/config.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

namespace fc {
namespace {

using json = nlohmann::json;

constexpr int64_t kMaxChannels = int64_t{1} << 20;
constexpr int64_t kMaxBlocks = 1024;
constexpr int64_t kMaxTransition = 1024;

struct IntField {
  const char* name;
  int64_t EvoformerConfig::*member;
  int64_t max;
};
constexpr IntField kIntFields[] = {
    {"c_m", &EvoformerConfig::c_m, kMaxChannels},
    {"c_z", &EvoformerConfig::c_z, kMaxChannels},
    {"c_hidden_msa_att", &EvoformerConfig::c_hidden_msa_att, kMaxChannels},
    {"no_heads_msa", &EvoformerConfig::no_heads_msa, kMaxChannels},
    {"c_hidden_pair_att", &EvoformerConfig::c_hidden_pair_att, kMaxChannels},
    {"no_heads_pair", &EvoformerConfig::no_heads_pair, kMaxChannels},
    {"c_hidden_opm", &EvoformerConfig::c_hidden_opm, kMaxChannels},
    {"c_hidden_mul", &EvoformerConfig::c_hidden_mul, kMaxChannels},
    {"transition_n", &EvoformerConfig::transition_n, kMaxTransition},
    {"no_blocks", &EvoformerConfig::no_blocks, kMaxBlocks},
    {"c_s", &EvoformerConfig::c_s, kMaxChannels},
};

// Float fields with the accepted key spellings: member name, then aliases from the golden
// metadata `constants` and OpenFold kwargs. OpenFold's stack kwarg `eps` is the global-attention
// eps (1e-8), not a LayerNorm eps, so it is deliberately not an alias.
struct FloatField {
  const char* name;
  float EvoformerConfig::*member;
  const char* aliases[2];
};
constexpr FloatField kFloatFields[] = {
    {"inf", &EvoformerConfig::inf, {"attention_mask_inf", nullptr}},
    {"eps_ln", &EvoformerConfig::eps_ln, {"layer_norm_eps", nullptr}},
    {"eps_opm", &EvoformerConfig::eps_opm, {"outer_product_mean_eps", nullptr}},
    {"msa_dropout", &EvoformerConfig::msa_dropout, {nullptr, nullptr}},
    {"pair_dropout", &EvoformerConfig::pair_dropout, {nullptr, nullptr}},
};

bool is_rate(const FloatField& f) {
  return std::string(f.name).find("_dropout") != std::string::npos;
}

// Shortest decimal text of a float ("1e-05", not "0.000010").
std::string float_str(float f) {
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof buf, f);
  return std::string(buf, r.ptr);
}

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

bool parse_int_text(const std::string& text, int64_t* out) {
  const std::string t = trim(text);
  const char* end = t.data() + t.size();
  auto r = std::from_chars(t.data(), end, *out);
  if (r.ec == std::errc() && r.ptr == end && !t.empty()) return true;
  double d = 0;  // also accept "32.0" or "3.2e1"
  auto rd = std::from_chars(t.data(), end, d);
  if (rd.ec != std::errc() || rd.ptr != end || t.empty() || !(std::abs(d) < 9.2e18) ||
      d != std::trunc(d))
    return false;
  *out = static_cast<int64_t>(d);
  return true;
}

bool parse_double_text(const std::string& text, double* out) {
  const std::string t = trim(text);
  const char* end = t.data() + t.size();
  auto r = std::from_chars(t.data(), end, *out);
  return !t.empty() && r.ec == std::errc() && r.ptr == end;
}

// An untrusted metadata value for a message: quoted, at most 60 bytes, control characters as
// \xNN, so that the message stays on one line.
std::string quoted(const std::string& v) {
  std::string out = "'";
  for (unsigned char c : v.substr(0, 60)) {
    if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + (v.size() > 60 ? "...'" : "'");
}

std::string describe(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

// Integer from a JSON integer, an integral float, or a numeric string.
bool json_to_int(const json& v, int64_t* out) {
  if (v.is_number_integer() && !v.is_number_unsigned()) {
    *out = v.get<int64_t>();
    return true;
  }
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    *out = static_cast<int64_t>(u);
    return true;
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (!(std::abs(d) < 9.2e18) || d != std::trunc(d)) return false;
    *out = static_cast<int64_t>(d);
    return true;
  }
  if (v.is_string()) return parse_int_text(v.get_ref<const std::string&>(), out);
  return false;
}

// Float from a JSON number or a numeric string; must be finite and representable as float.
bool json_to_float(const json& v, float* out) {
  double d = 0;
  if (v.is_number()) {
    d = v.get<double>();
  } else if (!v.is_string() || !parse_double_text(v.get_ref<const std::string&>(), &d)) {
    return false;
  }
  if (!std::isfinite(d) || std::abs(d) > std::numeric_limits<float>::max()) return false;
  *out = static_cast<float>(d);
  return true;
}

// Applies the known keys of a JSON object to cfg; `source` names the input in messages.
// null values count as missing.
Status apply_object(const json& obj, const std::string& source, EvoformerConfig* cfg) {
  if (!obj.is_object())
    return Status::InvalidArgument(source + ": expected a JSON object, got " + describe(obj));
  for (const IntField& f : kIntFields) {
    auto it = obj.find(f.name);
    if (it == obj.end() || it->is_null()) continue;
    int64_t v = 0;
    if (!json_to_int(*it, &v))
      return Status::InvalidArgument(source + ": '" + f.name + "' must be an integer, got " +
                                     describe(*it));
    cfg->*f.member = v;
  }
  for (const FloatField& f : kFloatFields) {
    for (const char* key : {f.name, f.aliases[0], f.aliases[1]}) {
      if (key == nullptr) continue;
      auto it = obj.find(key);
      if (it == obj.end() || it->is_null()) continue;
      float v = 0;
      if (!json_to_float(*it, &v))
        return Status::InvalidArgument(source + ": '" + key + "' must be a finite number, got " +
                                       describe(*it));
      cfg->*f.member = v;
    }
  }
  return Status::OK();
}

// Parses without exceptions; a parse failure becomes a Status naming `source`.
Status parse_json(const std::string& text, const std::string& source, json* out) {
  try {
    *out = json::parse(text);
  } catch (const json::exception& e) {
    std::string what = e.what();
    const size_t p = what.find("] ");
    if (p != std::string::npos) what = what.substr(p + 2);
    return Status::InvalidArgument(source + ": invalid JSON (" + what + ")");
  } catch (const std::exception& e) {
    return Status::InvalidArgument(source + ": cannot parse JSON (" + e.what() + ")");
  }
  return Status::OK();
}

}  // namespace

Status EvoformerConfig::validate() const {
  for (const IntField& f : kIntFields) {
    const int64_t v = this->*f.member;
    if (v < 1 || v > f.max)
      return Status::InvalidArgument("config: " + std::string(f.name) + " must be in [1, " +
                                     std::to_string(f.max) + "], got " + std::to_string(v));
  }
  for (const FloatField& f : kFloatFields) {
    const float v = this->*f.member;
    if (is_rate(f)) {
      if (!(v >= 0.0f && v < 1.0f))
        return Status::InvalidArgument("config: " + std::string(f.name) +
                                       " must be in [0, 1), got " + float_str(v));
      continue;
    }
    if (!std::isfinite(v) || !(v > 0.0f))
      return Status::InvalidArgument("config: " + std::string(f.name) +
                                     " must be a positive finite number, got " + float_str(v));
  }
  return Status::OK();
}

std::string EvoformerConfig::to_json() const {
  nlohmann::ordered_json j;
  for (const IntField& f : kIntFields) j[f.name] = this->*f.member;
  for (const FloatField& f : kFloatFields) {  // via the shortest text: 1e-05, not 9.99999974e-06
    const std::string text = float_str(this->*f.member);
    double d = 0;
    std::from_chars(text.data(), text.data() + text.size(), d);
    j[f.name] = d;
  }
  return j.dump();
}

Status EvoformerConfig::update_from_json(const std::string& json_text) {
  json j;
  FC_RETURN_IF_ERROR(parse_json(json_text, "config", &j));
  EvoformerConfig next = *this;  // all or nothing
  FC_RETURN_IF_ERROR(apply_object(j, "config", &next));
  *this = next;
  return Status::OK();
}

Status EvoformerConfig::from_json_file(const std::string& path, EvoformerConfig* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::NotFound("config file " + path + ": cannot open");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return Status::IOError("config file " + path + ": read error");
  json j;
  FC_RETURN_IF_ERROR(parse_json(ss.str(), "config file " + path, &j));
  EvoformerConfig cfg;
  FC_RETURN_IF_ERROR(apply_object(j, "config file " + path, &cfg));
  FC_RETURN_IF_ERROR(cfg.validate());
  *out = cfg;
  return Status::OK();
}

Status EvoformerConfig::from_metadata(const std::map<std::string, std::string>& md,
                                      EvoformerConfig* out) {
  EvoformerConfig cfg;
  bool found_c_m = false;
  // 1. The full OpenFold kwargs, if present.
  if (auto it = md.find("config"); it != md.end()) {
    json j;
    FC_RETURN_IF_ERROR(parse_json(it->second, "metadata 'config'", &j));
    FC_RETURN_IF_ERROR(apply_object(j, "metadata 'config'", &cfg));
    found_c_m = j.contains("c_m");
  }
  // 2. One key per size (what the golden files store). "-" or "" means not applicable.
  for (const IntField& f : kIntFields) {
    auto it = md.find(f.name);
    if (it == md.end() || trim(it->second).empty() || trim(it->second) == "-") continue;
    int64_t v = 0;
    if (!parse_int_text(it->second, &v))
      return Status::InvalidArgument("metadata '" + std::string(f.name) +
                                     "' must be an integer, got " + quoted(it->second));
    cfg.*f.member = v;
    found_c_m |= std::string(f.name) == "c_m";
  }
  if (!found_c_m)
    return Status::InvalidArgument("metadata holds no Evoformer config (no 'c_m' key)");
  // 3. Numerical constants (layer_norm_eps, outer_product_mean_eps, attention_mask_inf).
  if (auto it = md.find("constants"); it != md.end()) {
    json j;
    FC_RETURN_IF_ERROR(parse_json(it->second, "metadata 'constants'", &j));
    FC_RETURN_IF_ERROR(apply_object(j, "metadata 'constants'", &cfg));
  }
  for (const FloatField& f : kFloatFields) {
    auto it = md.find(f.name);
    if (it == md.end()) continue;
    if (!json_to_float(json(it->second), &(cfg.*f.member)))
      return Status::InvalidArgument("metadata '" + std::string(f.name) +
                                     "' must be a finite number, got " + quoted(it->second));
  }
  FC_RETURN_IF_ERROR(cfg.validate());
  *out = cfg;
  return Status::OK();
}

}  // namespace fc
