// Regressions of fuzzing findings (docs/reliability.md): each test replays the input of one
// finding through the normal API and checks the clean user error that replaced the crash.
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "foldcube/config.h"
#include "foldcube/extra_msa.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/planner.h"
#include "npz_util.h"
#include "test_util.h"

namespace fc {
namespace {

// safetensors target: a weights file whose metadata claims an absurd but valid config
// (c_m = 2^20) used to make the loader allocate a 17 TB block and abort ("out of memory").
TEST(FuzzRegression, HugeConfigFromMetadataIsRefusedBeforeAllocating) {
  for (const char* file : {"evo_tiny.safetensors", "extra_tiny.safetensors"}) {
    SCOPED_TRACE(file);
    TensorFile w;
    ASSERT_TRUE(read_safetensors(test::data_path(file), &w).ok());
    w.metadata["c_m"] = "1048576";
    w.metadata.erase("config");
    EvoformerConfig cfg;
    ASSERT_TRUE(EvoformerConfig::from_metadata(w.metadata, &cfg).ok());
    const int64_t live_before = mem_stats().live_bytes;
    EvoformerStack evo;
    ExtraMsaStack extra;
    const Status st = w.metadata["kind"] == "extra_msa" ? ExtraMsaStack::load(cfg, w, &extra)
                                                        : EvoformerStack::load(cfg, w, &evo);
    EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
    EXPECT_NE(st.message().find("config and weights do not match"), std::string::npos)
        << st.message();
    EXPECT_EQ(mem_stats().live_bytes, live_before);
  }
}

// metadata target: a metadata value with a control character (here a newline) was echoed raw in
// the error, breaking the one-line error contract.
TEST(FuzzRegression, MetadataValueWithNewlineStaysOnOneLine) {
  const std::map<std::string, std::string> md = {{"c_m", "32"},
                                                 {"c_hidden_mul", "1\ntransition_n"}};
  EvoformerConfig cfg;
  const Status st = EvoformerConfig::from_metadata(md, &cfg);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(st.message().find('\n'), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("got '1\\x0atransition_n'"), std::string::npos) << st.message();
  const std::map<std::string, std::string> md2 = {{"c_m", "32"},
                                                  {"eps_ln", std::string(100, '\r')}};
  const Status st2 = EvoformerConfig::from_metadata(md2, &cfg);
  EXPECT_EQ(st2.message().find('\r'), std::string::npos) << st2.message();
  EXPECT_NE(st2.message().find("...'"), std::string::npos) << st2.message();
}

// profile target: an integer field given as a float beyond the integer's range
// ("memory_bytes": 2.5e132) was converted with a static_cast (undefined behaviour, UBSan
// float-cast-overflow). The same pattern in plan JSON (s, r, dap, threads, ...) and memory_gb.
TEST(FuzzRegression, OutOfRangeFloatsForIntegerFieldsAreErrors) {
  const std::string base = R"({"gemm_gflops": 100, "gemm_bwd_gflops": 100, "batched_gflops": 100,
      "attention_gflops": 100, "attention_bwd_gflops": 100, "mem_gbps": 10, )";
  DeviceProfile p;
  for (const char* field :
       {R"("memory_bytes": 2.5e132})", R"("devices": 3e9})", R"("threads": -1e300})",
        R"("memory_gb": 1e300})", R"("memory_bytes": 1.5})"}) {
    SCOPED_TRACE(field);
    const Status st = DeviceProfile::from_json(base + field, &p);
    EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
    EXPECT_NE(st.message().find("profile: "), std::string::npos) << st.message();
  }
  ASSERT_TRUE(DeviceProfile::from_json(base + R"("memory_bytes": 8e9})", &p).ok());
  EXPECT_EQ(p.memory_bytes, int64_t{8000000000});

  Plan plan;
  plan.cfg.no_blocks = 2;
  plan.s = 8;
  plan.r = 16;
  plan.r_real = 16;
  const nlohmann::json good = nlohmann::json::parse(plan.to_json());
  ASSERT_TRUE(Plan::from_json(good.dump(), &plan).ok());
  for (const char* key : {"s", "r", "r_real", "blocks", "dap", "dp", "threads", "chunk",
                          "peak_bytes_estimate", "format"}) {
    SCOPED_TRACE(key);
    for (double v : {1e300, -1e300, 3e9, 2.5}) {
      nlohmann::json j = good;
      j[key] = v;
      Plan x;
      const Status st = Plan::from_json(j.dump(), &x);
      if (v == 3e9 && std::string(key) != "dap" && std::string(key) != "dp" &&
          std::string(key) != "threads" && std::string(key) != "format")
        continue;  // a valid int64 (the plan may still be refused for other reasons)
      EXPECT_FALSE(st.ok()) << v;
    }
  }
}

// npz target: a .npy header dict whose key is not followed by ':' echoed the raw key ("expected
// ':' after '<key>'"); a key spanning a newline (fuzz/regressions/npz/key-with-newline) broke
// the one-line error contract. The key is now quoted with control characters as \xNN.
TEST(FuzzRegression, NpyHeaderKeyWithNewlineStaysOnOneLine) {
  using namespace fc::test;
  const std::string zip =
      build_zip({{"x.npy", npy_raw("{'d\nx\r' 1}", bytes_of(std::vector<float>{1}))}});
  TensorFile f;
  const Status st =
      parse_npz_bytes(reinterpret_cast<const uint8_t*>(zip.data()), zip.size(), "k.npz", &f);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(st.message().find('\n'), std::string::npos) << st.message();
  EXPECT_EQ(st.message().find('\r'), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("expected ':' after 'd\\x0ax\\x0d'"), std::string::npos)
      << st.message();
}

}  // namespace
}  // namespace fc
