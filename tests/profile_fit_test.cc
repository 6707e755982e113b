// Fitted device profiles (issue 20): the measured-row CSV parser, exact recovery of known
// parameters from rows the cost model generates, and the fitted profile in `plan --profile`.
#include "plan/profile_fit.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <string>

#include "test_util.h"

namespace fc {
namespace {

constexpr char kHeader[] =
    "s,r,blocks,train,policy,devices,dap,dtype,time_ms,peak_mb,activation_mb\n";

DeviceProfile start_profile() {
  DeviceProfile p;
  EXPECT_TRUE(DeviceProfile::from_json(R"({"name": "fit-test", "devices": 4, "dtype": "fp32",
      "peak_gflops": 1000, "peak_mem_gbps": 100, "link_gbps": 20, "link_latency_us": 5,
      "memory_gb": 1000})",
                                       &p)
                  .ok());
  return p;
}

TEST(ProfileFitTable, ParsesCellsAndEmptyOnes) {
  std::vector<FitRow> rows;
  const Status st = parse_fit_table(std::string(kHeader) +
                                        "# a comment\n"
                                        "128,256,48,1,module,1,1,fp16,3656.61,8119,7462\r\n"
                                        "\n"
                                        "512,384,4,0,,2,,,,,\n",
                                    "t.csv", &rows);
  ASSERT_TRUE(st.ok()) << st.message();
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].line, 3);
  EXPECT_EQ(rows[0].s, 128);
  EXPECT_TRUE(rows[0].train);
  EXPECT_EQ(*rows[0].policy, Recompute::kModule);
  EXPECT_EQ(*rows[0].dtype, DType::F16);
  EXPECT_DOUBLE_EQ(*rows[0].time_ms, 3656.61);
  EXPECT_DOUBLE_EQ(*rows[0].activation_mb, 7462);
  EXPECT_EQ(rows[1].line, 5);
  EXPECT_FALSE(rows[1].policy.has_value());
  EXPECT_EQ(rows[1].dap, 0);
  EXPECT_FALSE(rows[1].dtype.has_value());
  EXPECT_FALSE(rows[1].time_ms.has_value());
}

// The report counts the rows within issue 20's 15 % of time, on one device and on more.
TEST(ProfileFitReport, CountsRowsWithinFifteenPercent) {
  std::vector<FitRow> rows;
  ASSERT_TRUE(parse_fit_table(std::string(kHeader) + "128,256,4,1,none,1,1,fp32,100,,\n"
                                                     "128,256,4,1,none,2,2,fp32,100,,\n"
                                                     "128,256,4,1,none,4,4,fp32,100,,\n"
                                                     "128,256,4,1,none,4,4,fp32,,,\n",
                              "t.csv", &rows)
                  .ok());
  std::vector<RowPrediction> pred(4);
  pred[0].time_ms = 115, pred[1].time_ms = 84, pred[2].time_ms = 86, pred[3].time_ms = 1;
  const std::string rep = fit_report(rows, pred);
  EXPECT_NE(rep.find("Time within 15 %: 2 of 3 rows (one device 1 of 1, more devices 1 of 2)"),
            std::string::npos)
      << rep;
}

struct BadTable {
  const char* name;
  std::string text;
  std::string needle;  // the one-line message contains this
};

// ctest lists a parameter by its printed value: the case name.
void PrintTo(const BadTable& b, std::ostream* os) { *os << b.name; }

class ProfileFitTableErrors : public testing::TestWithParam<BadTable> {};

TEST_P(ProfileFitTableErrors, OneLineNamingFileAndLine) {
  std::vector<FitRow> rows;
  const Status st = parse_fit_table(GetParam().text, "bad.csv", &rows);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.message().find('\n'), std::string::npos) << st.message();
  EXPECT_NE(st.message().find(GetParam().needle), std::string::npos)
      << "wanted '" << GetParam().needle << "' in: " << st.message();
}

const std::string H = kHeader;
INSTANTIATE_TEST_SUITE_P(
    Cases, ProfileFitTableErrors,
    testing::Values(
        BadTable{"Empty", "", "bad.csv:1: empty table"},
        BadTable{"WrongHeader", "s,r,blocks\n1,2,3\n", "bad.csv:1: expected the header"},
        BadTable{"HeaderOnly", H, "no rows"},
        BadTable{"TooFewCells", H + "1,2,3\n", "bad.csv:2: expected 11 cells, found 3"},
        BadTable{"TooManyCells", H + "1,2,3,0,,1,,,,,,\n", "found 12"},
        BadTable{"Junk", H + "abc,2,3,0,,1,,,,,\n", "bad.csv:2: column s: 'abc' is not an integer"},
        BadTable{"HugeInteger", H + "99999999999999999999,2,3,0,,1,,,,,\n", "column s"},
        BadTable{"ZeroResidues", H + "1,0,3,0,,1,,,,,\n", "column r: '0' is out of range"},
        BadTable{"MissingBlocks", H + "1,2,,0,,1,,,,,\n", "column blocks: '' is empty"},
        BadTable{"TrainNotBool", H + "1,2,3,2,,1,,,,,\n", "column train"},
        BadTable{"BadPolicy", H + "1,2,3,1,tiny,1,,,,,\n", "column policy: 'tiny'"},
        BadTable{"DapNotDividing", H + "1,2,3,1,,4,3,,,,\n", "column dap: '3' must divide"},
        BadTable{"BadDtype", H + "1,2,3,1,,1,,fp8,,,\n", "column dtype: 'fp8'"},
        BadTable{"NaNTime", H + "1,2,3,1,,1,,,nan,,\n", "column time_ms: 'nan' must be finite"},
        BadTable{"InfPeak", H + "1,2,3,1,,1,,,,inf,\n", "column peak_mb: 'inf'"},
        BadTable{"HugeTime", H + "1,2,3,1,,1,,,1e300,,\n", "must be finite, >= 0 and < 1e12"},
        BadTable{"NegativeTime", H + "1,2,3,1,,1,,,-5,,\n", "column time_ms: '-5'"},
        BadTable{"NotANumber", H + "# c\n1,2,3,1,,1,,,12ms,,\n",
                 "bad.csv:3: column time_ms: '12ms' is not a number"},
        BadTable{"BinaryJunk", H + std::string("1,2,3,1,,1,,,\x01\xff,,\n"), "is not a number"}),
    [](const testing::TestParamInfo<BadTable>& i) { return std::string(i.param.name); });

// Rows the cost model generates from a known profile: every class of work, both dtypes,
// inference and training (three policies), DAP and data parallelism, different block counts.
std::vector<FitRow> synthetic_rows(const EvoformerConfig& cfg, const DeviceProfile& truth) {
  std::vector<FitRow> rows;
  int line = 2;
  auto add = [&](int64_t s, int64_t r, int64_t blocks, bool train, Recompute pol, int devices,
                 int dap, DType dt) {
    FitRow w;
    w.line = line++;
    w.s = s, w.r = r, w.blocks = blocks, w.train = train;
    if (train) w.policy = pol;
    w.devices = devices, w.dap = dap, w.dtype = dt;
    Plan p;
    EXPECT_TRUE(resolve_row_plan(cfg, truth, w, &p).ok());
    RowPrediction pr;
    EXPECT_TRUE(predict_row(truth, w, p, &pr).ok());
    w.time_ms = pr.time_ms;
    rows.push_back(w);
  };
  const int64_t shapes[][2] = {{8, 16}, {32, 16}, {8, 64}, {48, 40}, {16, 96}};
  for (const auto& sh : shapes)
    for (DType dt : {DType::F32, DType::F16}) {
      add(sh[0], sh[1], 2, false, Recompute::kNone, 1, 1, dt);
      add(sh[0], sh[1], 1 + (sh[0] % 3), true, Recompute::kNone, 1, 1, dt);
      add(sh[0], sh[1], 2, true, Recompute::kModule, 1, 1, dt);
      add(sh[0], sh[1], 2, true, Recompute::kBlock, 2, 2, dt);
    }
  add(32, 64, 2, true, Recompute::kNone, 4, 4, DType::F32);
  add(32, 64, 2, true, Recompute::kNone, 2, 1, DType::F32);  // data parallel: gradient all-reduce
  add(64, 128, 3, true, Recompute::kNone, 2, 2, DType::F16);
  return rows;
}

TEST(ProfileFit, RecoversKnownParametersExactly) {
  const EvoformerConfig cfg;
  const DeviceProfile start = start_profile();
  const double truth_value[] = {1.3, 0.7, 1.6, 0.8, 1.25, 0.9, 1.15, 35.0, 12.0, 40.0, 0.3};
  std::vector<FitParameter> truth_params;
  for (size_t k = 0; k < fit_parameter_names().size(); ++k)
    truth_params.push_back({fit_parameter_names()[k], 0, truth_value[k], true});
  DeviceProfile truth;
  ASSERT_TRUE(apply_fit_parameters(start, truth_params, &truth).ok());
  const std::vector<FitRow> rows = synthetic_rows(cfg, truth);
  ASSERT_GT(rows.size(), 40u);

  FitResult r;
  const Status st = fit_profile(cfg, start, rows, FitOptions{}, &r);
  ASSERT_TRUE(st.ok()) << st.message();
  ASSERT_EQ(r.params.size(), fit_parameter_names().size());
  for (size_t k = 0; k < r.params.size(); ++k) {
    EXPECT_TRUE(r.params[k].determined) << r.params[k].name;
    EXPECT_NEAR(r.params[k].value / truth_value[k], 1.0, 1e-6) << r.params[k].name;
  }
  EXPECT_LT(r.rms_relative, 1e-8);
  for (size_t i = 0; i < rows.size(); ++i)
    EXPECT_NEAR(r.predictions[i].time_ms / *rows[i].time_ms, 1.0, 1e-8) << "line " << rows[i].line;
}

// Parameters no row depends on (link terms on one device) stay at the start and are flagged.
TEST(ProfileFit, FreezesParametersNoRowDetermines) {
  const EvoformerConfig cfg;
  const DeviceProfile start = start_profile();
  std::vector<FitRow> rows;
  ASSERT_TRUE(parse_fit_table(std::string(kHeader) + "16,32,2,1,none,1,1,fp32,900,,\n"
                                                     "32,64,2,1,block,1,1,fp32,4000,,\n",
                              "t.csv", &rows)
                  .ok());
  FitOptions o;
  o.params = {"gemm", "link_gbps", "link_latency_us"};
  FitResult r;
  ASSERT_TRUE(fit_profile(cfg, start, rows, o, &r).ok());
  EXPECT_TRUE(r.params[0].determined);
  EXPECT_FALSE(r.params[1].determined);
  EXPECT_FALSE(r.params[2].determined);
  EXPECT_DOUBLE_EQ(r.params[1].value, start.link_gbps);
  EXPECT_DOUBLE_EQ(r.profile.link_latency_us, start.link_latency_us);
}

TEST(ProfileFit, UnknownParameterIsAnError) {
  std::vector<FitRow> rows;
  ASSERT_TRUE(
      parse_fit_table(std::string(kHeader) + "16,32,2,1,none,1,1,fp32,900,,\n", "t.csv", &rows)
          .ok());
  FitOptions o;
  o.params = {"warp_speed"};
  FitResult r;
  const Status st = fit_profile(EvoformerConfig{}, start_profile(), rows, o, &r);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("warp_speed"), std::string::npos);
}

// The fitted profile goes through the profile JSON reader unchanged, and `plan --profile` and
// `profile fit` run end to end on it.
TEST(ProfileFitCli, FittedProfileRoundTripsAndPlans) {
  const std::string table = test::temp_file("rows.csv");
  const std::string start = test::temp_file("start.json");
  const std::string out = test::temp_file("fitted.json");
  std::ofstream(table) << kHeader << "16,32,2,1,none,1,1,fp32,900,,\n"
                       << "32,64,2,1,block,1,1,fp32,4000,,\n"
                       << "32,64,2,0,,1,,fp32,700,,\n"
                       << "32,64,2,1,none,2,2,fp32,,,\n";
  std::ofstream(start) << start_profile().to_json();
  test::Result r = test::run_cli("profile fit --table " + table + " --start " + start + " --out " +
                                 out + " --fit-devices 1 --params gemm,gemm_bwd,mem");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("Predicted rows"), std::string::npos) << r.out;
  std::ifstream f(out);
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  DeviceProfile p, again;
  ASSERT_TRUE(DeviceProfile::from_json(text, &p).ok()) << text;
  ASSERT_TRUE(DeviceProfile::from_json(p.to_json(), &again).ok());
  EXPECT_EQ(again.to_json(), p.to_json());
  r = test::run_cli("plan --s 32 --r 64 --blocks 4 --train --devices 2 --profile " + out);
  EXPECT_EQ(r.code, 0) << r.out;

  r = test::run_cli("profile fit --table " + start + " --start " + start + " --out " + out);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find(start + ":1: expected the header"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace fc

namespace fc {
namespace {

// module_overhead_us is charged once per module pass and, under DAP, in full on every rank (the
// rest of the module's time splits over the ranks).
TEST(ProfileFit, ModuleOverheadRunsInFullOnEveryRank) {
  DeviceProfile dev = start_profile(), slow = start_profile();
  slow.module_overhead_us = 500;
  auto block_ms = [](const DeviceProfile& d, int dap) {
    Plan p;
    p.cfg.no_blocks = 1;
    p.s = 32, p.r = 64, p.r_real = 64;
    p.training = true;
    p.policy = {Recompute::kNone};
    p.dap = dap;
    EXPECT_TRUE(evaluate_plan(d, &p).ok());
    return std::make_pair(p.forward_ms, p.backward_ms);
  };
  const auto [f1, b1] = block_ms(dev, 1);
  const auto [f2, b2] = block_ms(dev, 2);
  const auto [g1, c1] = block_ms(slow, 1);
  const auto [g2, c2] = block_ms(slow, 2);
  const double o = 9 * 0.5;  // nine modules x 0.5 ms
  EXPECT_NEAR(g1 - f1, o, 1e-9);
  EXPECT_NEAR(c1 - b1, o, 1e-9);
  EXPECT_NEAR(g2 - f2, o, 1e-9);  // not o / 2
  EXPECT_NEAR(c2 - b2, o, 1e-9);
}

}  // namespace
}  // namespace fc

namespace fc {
namespace {

// The optional chunk_launches and ckpt_chunk columns (after threads and stack), and their errors;
// a table may end at chunk_launches.
TEST(ProfileFitTable, ReadsChunkLaunchesAndCkptChunk) {
  std::vector<FitRow> rows;
  const std::string h14 =
      "s,r,blocks,train,policy,devices,dap,dtype,time_ms,peak_mb,activation_mb,threads,stack,"
      "chunk_launches";
  const std::string h = h14 + ",ckpt_chunk\n";
  ASSERT_TRUE(parse_fit_table(h + "128,2048,48,0,,2,2,fp32,192577.34,13006,,,,14208,\n"
                                  "1024,256,4,1,block,1,1,fp16,2306,3236,1166,,extra_msa,,4\n",
                              "t.csv", &rows)
                  .ok());
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_DOUBLE_EQ(rows[0].chunk_launches, 14208);
  EXPECT_EQ(*rows[0].dtype, DType::F32);
  EXPECT_EQ(rows[0].ckpt_chunk, 0);
  EXPECT_DOUBLE_EQ(rows[1].chunk_launches, 0);
  EXPECT_EQ(rows[1].ckpt_chunk, 4);
  EXPECT_TRUE(rows[1].extra_msa);
  ASSERT_TRUE(
      parse_fit_table(h14 + "\n128,256,4,1,none,2,2,fp16,139.15,,,,,\n", "t.csv", &rows).ok());
  EXPECT_EQ(rows[0].ckpt_chunk, 0);
  for (const auto& [line, needle] :
       {std::pair<std::string, std::string>{"128,256,4,1,none,2,2,fp16,139.15,,,,,-1,",
                                            "t.csv:2: column chunk_launches: '-1'"},
        {"128,256,4,1,none,2,2,fp16,139.15,,,,,,0", "t.csv:2: column ckpt_chunk: '0'"},
        {"128,256,4,0,,2,2,fp16,139.15,,,,,,4", "ckpt_chunk: '4' is for training rows"}}) {
    const Status bad = parse_fit_table(h + line + "\n", "t.csv", &rows);
    ASSERT_FALSE(bad.ok()) << line;
    EXPECT_NE(bad.message().find(needle), std::string::npos) << bad.message();
  }
}

// A row's chunk launches cost blocks x launches / dap x module_overhead_us / module_kernels on
// top of its plan's estimate; without module_kernels they are an error.
TEST(ProfileFit, ChunkLaunchesCostTheProfilesPerLaunchOverhead) {
  DeviceProfile dev = start_profile();
  dev.module_overhead_us = 300;
  dev.module_kernels = 15;  // 20 us per launch
  FitRow w;
  w.line = 7;
  w.s = 16, w.r = 64, w.blocks = 3, w.devices = 2, w.dap = 2;
  Plan p;
  ASSERT_TRUE(resolve_row_plan(EvoformerConfig{}, dev, w, &p).ok());
  ASSERT_EQ(p.dap, 2);
  RowPrediction base, with;
  ASSERT_TRUE(predict_row(dev, w, p, &base).ok());
  w.chunk_launches = 1000;
  ASSERT_TRUE(predict_row(dev, w, p, &with).ok());
  EXPECT_NEAR(with.time_ms - base.time_ms, 3 * 1000 / 2 * 0.020, 1e-9);
  EXPECT_EQ(with.peak_mb, base.peak_mb);
  dev.module_kernels = 0;
  const Status st = predict_row(dev, w, p, &with);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("line 7: chunk_launches needs a profile with module_kernels"),
            std::string::npos)
      << st.message();
}

// A training row whose row attention ran in checkpointed chunks of ckpt_chunk sequences pays,
// per block, n = ceil(s / chunk) zero-filled gradients of the whole q, k, v, gate and bias plus
// n - 1 accumulations (read 2, write 1), at the stream rate; per DAP rank over s / dap sequences.
TEST(ProfileFit, CheckpointedChunkGradientsGrowWithTheSquareOfTheSequences) {
  DeviceProfile dev = start_profile();
  dev.element_bytes = 2;
  FitRow w;
  w.line = 4;
  w.s = 64, w.r = 16, w.blocks = 3, w.train = true, w.devices = 1, w.dap = 1;
  w.policy = Recompute::kBlock;
  w.extra_msa = true;
  w.dtype = DType::F16;  // 2-byte buffers (an fp32 row would keep 4)
  Plan p;
  ASSERT_TRUE(resolve_row_plan(EvoformerConfig{}, dev, w, &p).ok());
  RowPrediction base, with;
  ASSERT_TRUE(predict_row(dev, w, p, &base).ok());
  w.ckpt_chunk = 4;
  ASSERT_TRUE(predict_row(dev, w, p, &with).ok());
  const double H = 8, C = 8, whole = 4 * 64 * 16 * H * C + H * 16 * 16, n = 16;
  const double bytes = (n + 3 * (n - 1)) * whole * 2;
  EXPECT_DOUBLE_EQ(ckpt_chunk_grad_bytes(p, 4), bytes);
  const double rate = dev.stream_gbps > 0 ? dev.stream_gbps : dev.mem_gbps;
  EXPECT_NEAR(with.time_ms - base.time_ms, 3 * bytes / (rate * 1e9) * 1e3, 1e-9);
  EXPECT_NE(with.plan.find("chunk gradients"), std::string::npos) << with.plan;
  // Twice the sequences: twice the chunks over twice the q, k, v, gate (about 4x the bytes).
  Plan p2 = p;
  p2.s = 128;
  const double bytes2 = (32 + 3 * 31) * (4 * 128 * 16 * H * C + H * 16 * 16) * 2;
  EXPECT_DOUBLE_EQ(ckpt_chunk_grad_bytes(p2, 4), bytes2);
  EXPECT_NEAR(bytes2 / bytes, 4.0, 0.1);
  // Two DAP ranks: each holds half the sequences.
  p2.dap = 2;
  EXPECT_DOUBLE_EQ(ckpt_chunk_grad_bytes(p2, 4), bytes);
}

// An fp32 row on a profile that keeps every buffer in 2 bytes is planned with 4-byte buffers
// (the seeds' T1044 ran in float32 on their fp16 GPUs); fp16 rows and the engine's layout keep
// the profile's element size.
TEST(ProfileFit, Fp32RowOnAHalfPrecisionDeviceHasFourByteBuffers) {
  DeviceProfile half = start_profile();
  half.element_bytes = 2;
  EXPECT_EQ(row_element_bytes(half, DType::F32), 4);
  EXPECT_EQ(row_element_bytes(half, DType::F16), 2);
  EXPECT_EQ(row_element_bytes(start_profile(), DType::F32), 0);
  FitRow w;
  w.s = 16, w.r = 64, w.blocks = 2, w.devices = 1, w.dap = 1;
  w.dtype = DType::F32;
  Plan p32, p16;
  ASSERT_TRUE(resolve_row_plan(EvoformerConfig{}, half, w, &p32).ok());
  w.dtype = DType::F16;
  ASSERT_TRUE(resolve_row_plan(EvoformerConfig{}, half, w, &p16).ok());
  EXPECT_EQ(p32.element_bytes, 4);
  EXPECT_EQ(p16.element_bytes, 2);
  EXPECT_GT(p32.time_ms, p16.time_ms);
}

}  // namespace
}  // namespace fc
