// The library hooks of the Python package: the cancel flag, the SIGINT scope and shielded calls
// (foldcube/runtime.h), tensors over external memory (Tensor::wrap) and the AlphaFold file
// loaders (foldcube/alphafold.h).
#include <gtest/gtest.h>
#include <omp.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <thread>

#include "foldcube/alphafold.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/runner.h"
#include "foldcube/runtime.h"
#include "test_util.h"

namespace fc {
namespace {

// Clears the flag however a test ends.
struct CancelGuard {
  ~CancelGuard() { clear_cancel(); }
};

TEST(Cancel, StopsTheStacksAndTheWholeModelUntilCleared) {
  CancelGuard guard;
  JobSpec spec;
  spec.weights = spec.inputs = test::data_path("evo_tiny.safetensors");
  Job job;
  ASSERT_TRUE(load_job(spec, &job).ok());
  Tensor m = job.m.clone(), z = job.z.clone();
  request_cancel();
  Status st = job.stack.forward(m, z, job.msa_mask, job.pair_mask, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kCancelled) << st.ToString();
  TrainResult res;
  st = job.stack.train_step(m, z, job.msa_mask, job.pair_mask, m.clone(), z.clone(), {}, &res);
  EXPECT_EQ(st.code(), Status::Code::kCancelled) << st.ToString();
  AlphaFold model;
  ASSERT_TRUE(load_alphafold(test::data_path("af2_model_tiny.safetensors"), &model).ok());
  FeatureDict feats;
  ASSERT_TRUE(read_feature_file(test::data_path("af2_model_tiny.safetensors"), &feats).ok());
  std::map<std::string, Tensor> out;
  st = model.forward(feats, &out);
  EXPECT_EQ(st.code(), Status::Code::kCancelled) << st.ToString();
  EXPECT_EQ(st.ToString().rfind("cancelled: ", 0), 0u);
  clear_cancel();
  EXPECT_TRUE(job.stack.forward(m, z, job.msa_mask, job.pair_mask, nullptr).ok());
}

int g_previous_calls = 0;
void previous_handler(int) { ++g_previous_calls; }

// Installs previous_handler for SIGINT (counting calls from 0) for the test's duration.
class PreviousHandler {
 public:
  PreviousHandler() {
    g_previous_calls = 0;
    struct sigaction mine {};
    mine.sa_handler = previous_handler;
    sigemptyset(&mine.sa_mask);
    installed_ = sigaction(SIGINT, &mine, &old_) == 0;
  }
  ~PreviousHandler() { sigaction(SIGINT, &old_, nullptr); }
  bool installed() const { return installed_; }

 private:
  struct sigaction old_ {};
  bool installed_ = false;
};

TEST(Cancel, SigintScopeSetsTheFlagAndRestoresThePreviousHandler) {
  CancelGuard guard;
  PreviousHandler previous;
  ASSERT_TRUE(previous.installed());
  {
    SigintCancelScope scope;
    EXPECT_FALSE(scope.interrupted());
    EXPECT_FALSE(cancel_requested());
    raise(SIGINT);
    EXPECT_TRUE(scope.interrupted());
    EXPECT_TRUE(cancel_requested());
    EXPECT_EQ(g_previous_calls, 0);
  }
  raise(SIGINT);  // the previous handler again
  EXPECT_EQ(g_previous_calls, 1);
}

// A second SIGINT in the scope runs the previous action at once (the CLI: the process ends);
// the first only sets the flag.
TEST(Cancel, SecondSigintInTheScopeRunsThePreviousHandler) {
  CancelGuard guard;
  PreviousHandler previous;
  ASSERT_TRUE(previous.installed());
  {
    SigintCancelScope scope;
    raise(SIGINT);
    EXPECT_EQ(g_previous_calls, 0);
    EXPECT_TRUE(cancel_requested());
    raise(SIGINT);
    EXPECT_EQ(g_previous_calls, 1);
    EXPECT_TRUE(scope.interrupted());
  }
}

// Signals blocked while fn runs, on the caller and on every thread of its kernel team, and the
// caller's mask restored afterwards.
TEST(Cancel, RunShieldedBlocksSignalsOnTheCallerAndItsTeam) {
  auto blocks = [] {
    sigset_t mask;
    pthread_sigmask(SIG_BLOCK, nullptr, &mask);
    return sigismember(&mask, SIGINT) == 1 && sigismember(&mask, SIGTERM) == 1 &&
           sigismember(&mask, SIGSEGV) == 0;
  };
  const int threads = num_threads();
  ASSERT_FALSE(blocks());
  std::thread::id ran;
  bool caller_blocks = false;
  std::atomic<int> team_blocks{0};
  int team = 0;
  const Status st = run_shielded([&] {
    ran = std::this_thread::get_id();
    caller_blocks = blocks();
#pragma omp parallel num_threads(threads)
    {
      if (blocks()) team_blocks.fetch_add(1);
#pragma omp single
      team = omp_get_num_threads();
    }
    return Status::InvalidArgument("from fn");
  });
  EXPECT_EQ(st.message(), "from fn");
  EXPECT_EQ(ran, std::this_thread::get_id());
  EXPECT_TRUE(caller_blocks);
  EXPECT_EQ(team_blocks.load(), team);
  EXPECT_FALSE(blocks());
}

// An exception out of fn leaves the caller's signal mask as it was.
TEST(Cancel, RunShieldedRestoresTheMaskWhenFnThrows) {
  EXPECT_THROW(run_shielded([]() -> Status { throw std::runtime_error("from fn"); }),
               std::runtime_error);
  sigset_t mask;
  pthread_sigmask(SIG_BLOCK, nullptr, &mask);
  EXPECT_EQ(sigismember(&mask, SIGINT), 0);
  EXPECT_EQ(sigismember(&mask, SIGTERM), 0);
}

// A team started by an unmasked region of the caller before the first shielded call is masked
// by that call.
TEST(Cancel, RunShieldedMasksATeamStartedBeforeIt) {
  std::thread t([] {
    std::atomic<int> started{0};
#pragma omp parallel num_threads(2)
    started.fetch_add(1);  // starts the team's second thread, signals unblocked
    ASSERT_EQ(started.load(), 2);
    std::atomic<int> team_blocks{0};
    // (no pragma inside a macro argument: GCC then applies it to the whole statement)
    const Status st = run_shielded([&] {
#pragma omp parallel num_threads(2)
      {
        sigset_t mask;  // [per thread]
        pthread_sigmask(SIG_BLOCK, nullptr, &mask);
        if (sigismember(&mask, SIGINT) == 1) team_blocks.fetch_add(1);
      }
      return Status::OK();
    });
    EXPECT_TRUE(st.ok());
    EXPECT_EQ(team_blocks.load(), 2);
  });
  t.join();
}

// SIGTERM during a shielded call ends the process at once (mpirun and job schedulers stop ranks
// with it), though the calling thread blocks it: fn would otherwise exit with code 3.
TEST(Cancel, SigtermDuringRunShieldedEndsTheProcess) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        const Status st = run_shielded([] {
          kill(getpid(), SIGTERM);
          std::this_thread::sleep_for(std::chrono::seconds(5));
          _exit(3);
          return Status::OK();
        });
        (void)st;
      },
      testing::KilledBySignal(SIGTERM), "");
}

// Ctrl-C during shielded forwards: each stops with Cancelled between modules, and the heap stays
// intact (before run_shielded, a SIGINT landing on a thread inside a oneDNN JIT kernel corrupted
// it within a few such calls).
TEST(Cancel, SigintDuringShieldedForwardsCancelsWithoutCorruption) {
  CancelGuard guard;
  EvoformerConfig cfg = test::small_config();
  cfg.no_blocks = 16;
  const EvoformerStack stack = EvoformerStack::random(cfg, 3);
  Tensor m0, z0;
  ASSERT_TRUE(random_tensor({16, 48, cfg.c_m}, 1, "m", &m0).ok());
  ASSERT_TRUE(random_tensor({48, 48, cfg.c_z}, 2, "z", &z0).ok());
  int cancelled = 0;
  for (int it = 0; it < 12; ++it) {
    Tensor m = m0.clone(), z = z0.clone();
    SigintCancelScope scope;
    std::atomic<bool> done{false};
    std::thread timer([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(2 + 3 * (it % 5)));
      if (!done) kill(getpid(), SIGINT);  // process-directed, as the terminal's
    });
    const Status st =
        run_shielded([&] { return stack.forward(m, z, Tensor(), Tensor(), nullptr); });
    done = true;
    timer.join();
    if (st.code() == Status::Code::kCancelled) ++cancelled;
    EXPECT_TRUE(st.ok() || st.code() == Status::Code::kCancelled) << st.ToString();
  }
  EXPECT_GT(cancelled, 0);
  clear_cancel();
  Tensor m = m0.clone(), z = z0.clone();
  EXPECT_TRUE(run_shielded([&] { return stack.forward(m, z, Tensor(), Tensor(), nullptr); }).ok());
  EXPECT_TRUE(test::all_finite(m));
}

TEST(TensorWrap, ViewsExternalMemoryUntrackedAndReleasesTheOwner) {
  auto storage = std::make_shared<std::vector<float>>(6, 1.5f);
  std::weak_ptr<std::vector<float>> watch = storage;
  const int64_t live0 = mem_stats().live_bytes;
  {
    Tensor t = Tensor::wrap(storage->data(), {2, 3}, DType::F32, storage);
    storage.reset();
    EXPECT_FALSE(watch.expired());  // the view keeps its owner
    EXPECT_EQ(mem_stats().live_bytes, live0);
    EXPECT_TRUE(t.is_contiguous());
    t.f32()[4] = 7.f;
    EXPECT_EQ(watch.lock()->at(4), 7.f);
    Tensor view = t.select(0, 1);
    EXPECT_EQ(view.f32()[1], 7.f);
  }
  EXPECT_TRUE(watch.expired());
  float plain[4] = {1, 2, 3, 4};
  EXPECT_EQ(Tensor::wrap(plain, {4}, DType::F32, nullptr).f32()[3], 4.f);
}

TEST(AlphaFoldFiles, LoadersNameTheFile) {
  AlphaFold model;
  Status st = load_alphafold(test::data_path("evo_tiny.safetensors"), &model);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("evo_tiny.safetensors"), std::string::npos) << st.message();
  FeatureDict feats;
  st = read_feature_file(test::data_path("evo_tiny.safetensors"), &feats);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("no feature."), std::string::npos) << st.message();
}

}  // namespace
}  // namespace fc
