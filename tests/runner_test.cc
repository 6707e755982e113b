// The one-process job API (foldcube/runner.h): stack detection, config resolution, job loading,
// forward and training runs against the stack's own calls, and the output file.
#include "foldcube/runner.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "foldcube/io.h"
#include "test_util.h"

namespace fc {
namespace {

std::string golden() { return test::data_path("evo_tiny.safetensors"); }

bool same(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return false;
  Tensor x = a.contiguous(), y = b.contiguous();
  for (int64_t i = 0; i < x.numel(); ++i)
    if (x.f32()[i] != y.f32()[i]) return false;
  return true;
}

TEST(Runner, DetectStack) {
  StackKind k;
  TensorFile w;
  ASSERT_TRUE(detect_stack("auto", nullptr, &k).ok());
  EXPECT_EQ(k, StackKind::kEvoformer);
  w.metadata["kind"] = "extra_msa";
  ASSERT_TRUE(detect_stack("auto", &w, &k).ok());
  EXPECT_EQ(k, StackKind::kExtraMsa);
  ASSERT_TRUE(detect_stack("evoformer", &w, &k).ok());
  EXPECT_EQ(k, StackKind::kEvoformer);
  const Status st = detect_stack("pairformer", &w, &k);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("pairformer"), std::string::npos);
}

TEST(Runner, ResolveConfig) {
  EvoformerConfig cfg;
  ASSERT_TRUE(resolve_config("", nullptr, StackKind::kEvoformer, 3, &cfg).ok());
  EXPECT_EQ(cfg.no_blocks, 3);
  EXPECT_EQ(cfg.c_m, 256);
  ASSERT_TRUE(resolve_config("", nullptr, StackKind::kExtraMsa, 2, &cfg).ok());
  EXPECT_EQ(cfg.c_m, 64);
  EXPECT_EQ(cfg.c_hidden_msa_att, 8);
  TensorFile f;
  ASSERT_TRUE(read_safetensors(golden(), &f).ok());
  EvoformerConfig from_md, inferred;
  ASSERT_TRUE(resolve_config("", &f, StackKind::kEvoformer, 0, &from_md).ok());
  f.metadata.erase("c_m");  // no config metadata: from the parameter shapes
  ASSERT_TRUE(resolve_config("", &f, StackKind::kEvoformer, 0, &inferred).ok());
  EXPECT_EQ(from_md.c_m, inferred.c_m);
  EXPECT_EQ(from_md.c_z, inferred.c_z);
  EXPECT_EQ(from_md.no_blocks, inferred.no_blocks);
  EXPECT_FALSE(resolve_config("/nonexistent/c.json", &f, StackKind::kEvoformer, 0, &cfg).ok());
}

// run_forward on the golden file gives exactly the stack's own forward (and keeps m, z moved out
// of the job on the last pass).
TEST(Runner, ForwardMatchesStackForward) {
  JobSpec spec;
  spec.weights = spec.inputs = golden();
  Job job;
  ASSERT_TRUE(load_job(spec, &job).ok());
  Tensor m = job.m.clone(), z = job.z.clone(), s_out;
  ASSERT_TRUE(job.stack.forward(m, z, job.msa_mask, job.pair_mask, &s_out).ok());
  RunOptions o;
  o.repeats = 2;
  o.profile = true;
  ForwardReport f;
  const Status st = run_forward(&job, o, &f);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(same(f.m, m));
  EXPECT_TRUE(same(f.z, z));
  EXPECT_TRUE(same(f.s_out, s_out));
  EXPECT_EQ(f.times_ms.size(), 2u);
  EXPECT_GT(f.peak_tracked_bytes, 0);
  EXPECT_FALSE(f.module_ms.empty());
  EXPECT_FALSE(f.chunking.empty());
  EXPECT_FALSE(job.m.defined());
}

TEST(Runner, TrainingMatchesStackTrainStep) {
  JobSpec spec;
  spec.weights = spec.inputs = golden();
  spec.seed = 5;
  Job job;
  ASSERT_TRUE(load_job(spec, &job).ok());
  Tensor gm, gz;
  ASSERT_TRUE(load_grad_outputs(spec, job, &gm, &gz).ok());
  Tensor m = job.m.clone(), z = job.z.clone();
  TrainOptions to;
  to.policy = {Recompute::kModule};
  TrainResult ref;
  ASSERT_TRUE(job.stack.train_step(m, z, job.msa_mask, job.pair_mask, gm, gz, to, &ref).ok());
  RunOptions o;
  ASSERT_TRUE(parse_policy("module", &o.policy).ok());
  EXPECT_EQ(policy_string(o.policy), "module");
  TrainReport t;
  ASSERT_TRUE(run_training(&job, gm, gz, o, &t).ok());
  EXPECT_TRUE(same(t.m, m));
  EXPECT_TRUE(same(t.result.grad_m, ref.grad_m));
  ASSERT_EQ(t.result.grad_params.size(), ref.grad_params.size());
  for (size_t i = 0; i < ref.grad_params.size(); ++i)
    EXPECT_TRUE(same(t.result.grad_params[i].second, ref.grad_params[i].second))
        << ref.grad_params[i].first;
}

TEST(Runner, PolicyParsing) {
  std::vector<Recompute> p;
  ASSERT_TRUE(parse_policy("none,block", &p).ok());
  EXPECT_EQ(policy_string(p), "none,block");
  EXPECT_EQ(policy_string({}), "none");
  EXPECT_FALSE(parse_policy("none,,block", &p).ok());
}

// Random jobs whose sizes come from flags: an absurd size is an OutOfMemory status naming the
// tensor, not an abort.
TEST(Runner, AbsurdRandomInputsAreAStatus) {
  JobSpec spec;
  spec.blocks = 1;
  spec.s = spec.r = int64_t{1} << 40;
  Job job;
  const Status st = load_job(spec, &job);
  EXPECT_EQ(st.code(), Status::Code::kOutOfMemory) << st.ToString();
  EXPECT_NE(st.message().find("input.m"), std::string::npos) << st.message();
}

// The output file: names and metadata; a failed write leaves nothing at the path.
TEST(Runner, OutputFile) {
  const std::string dir = ::testing::TempDir() + "/fc_runner_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  EvoformerConfig cfg = test::small_config();
  Tensor m = Tensor::full({2, 3, cfg.c_m}, 1.f), z = Tensor::full({3, 3, cfg.c_z}, 2.f);
  TrainResult g;
  g.grad_m = m;
  g.grad_z = z;
  g.grad_params.emplace_back("blocks.0.w", Tensor::full({4}, 3.f));
  const std::string path = dir + "/out.safetensors";
  ASSERT_TRUE(write_outputs(path, cfg, m, z, Tensor(), &g).ok());
  TensorFile f;
  ASSERT_TRUE(read_safetensors(path, &f).ok());
  EXPECT_EQ(f.names, (std::vector<std::string>{"output.m", "output.z", "grad.input.m",
                                               "grad.input.z", "grad.param.blocks.0.w"}));
  EXPECT_EQ(f.metadata.at("format"), "foldcube-output/1");
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  const std::string bad = dir + "/missing_dir/out.safetensors";
  EXPECT_FALSE(write_outputs(bad, cfg, m, z, Tensor(), nullptr).ok());
  EXPECT_FALSE(std::filesystem::exists(bad));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace fc
