// Regressions of fuzzing findings (docs/reliability.md): each test replays the input of one
// finding through the normal API and checks the clean user error that replaced the crash.
#include <gtest/gtest.h>

#include <string>

#include "foldcube/config.h"
#include "foldcube/extra_msa.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
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

}  // namespace
}  // namespace fc
