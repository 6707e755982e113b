// write_safetensors_streamed: the same bytes as write_safetensors when fed in pieces, and a fill
// that passes the wrong number of bytes is an error that leaves no file.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>

#include "foldcube/io.h"
#include "test_util.h"

namespace fc {
namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(SafetensorsStream, PiecesGiveTheSameFileAsWholeTensors) {
  TensorFile f;
  f.metadata["format"] = "test";
  Tensor a = Tensor::empty({3, 4, 2});  // [3, 4, 2]
  for (int64_t i = 0; i < a.numel(); ++i) a.f32()[i] = 0.5f * static_cast<float>(i);
  Tensor b = Tensor::empty({}, DType::I64);
  b.data<int64_t>()[0] = 7;
  f.put("a", a);
  f.put("b", b);
  const std::string whole = test::temp_file("whole.safetensors");
  const std::string parts = test::temp_file("parts.safetensors");
  ASSERT_TRUE(write_safetensors(whole, f).ok());
  const std::vector<TensorSpec> specs = {{"a", DType::F32, {3, 4, 2}}, {"b", DType::I64, {}}};
  ASSERT_TRUE(write_safetensors_streamed(parts, f.metadata, specs,
                                         [&](size_t i, const ByteSink& sink) -> Status {
                                           if (i == 1) return sink(b.data<char>(), 8);
                                           for (int64_t r = 0; r < 3; ++r)  // one row at a time
                                             FC_RETURN_IF_ERROR(sink(a.f32() + r * 8, 32));
                                           return Status::OK();
                                         })
                  .ok());
  EXPECT_EQ(slurp(parts), slurp(whole));
}

TEST(SafetensorsStream, WrongByteCountIsAnErrorAndLeavesNoFile) {
  const std::string path = test::temp_file("short.safetensors");
  std::filesystem::remove(path);
  const std::vector<TensorSpec> specs = {{"a", DType::F32, {2, 2}}};
  const float x[5] = {1, 2, 3, 4, 5};
  Status st = write_safetensors_streamed(path, {}, specs,
                                         [&](size_t, const ByteSink& sink) { return sink(x, 12); });
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("tensor "), std::string::npos) << st.message();
  st = write_safetensors_streamed(path, {}, specs,
                                  [&](size_t, const ByteSink& sink) { return sink(x, 20); });
  EXPECT_FALSE(st.ok());
  EXPECT_FALSE(std::filesystem::exists(path));
}

}  // namespace
}  // namespace fc
