// Data-stage benchmark (issue 13 target): parse + raw features + model features for a query and
// an A3M, model_1 preset sizes (512 clusters, 5120 extra rows, 4 recycling slices), median of
// --repeats. Without --fasta/--msa it writes a synthetic 500-residue query with 10,000 homologs
// (insertions, gaps, fragments, duplicates) to a temporary directory first. Writing the output
// file is not timed (that is I/O of ~0.4 GB at these sizes).
//
//   build/features_bench [--fasta Q.fasta --msa Q.a3m] [--len 500] [--rows 10000]
//                        [--threads 2] [--repeats 3]
#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "foldcube/features.h"

namespace {

// User + system CPU seconds of this process so far.
double cpu_seconds() {
  rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
         1e-6 * (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

// A query of `len` residues and `rows` homologs at 25-95% identity, ~40% fragments, '-' runs,
// lower-case insertions, ~2% exact duplicates.
void write_synthetic(const std::string& fasta, const std::string& a3m, int len, int rows,
                     uint32_t seed) {
  static const char kAa[] = "ARNDCQEGHILKMFPSTWYV";
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> aa(0, 19);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::string query(len, 'A');
  for (char& c : query) c = kAa[aa(gen)];
  std::ofstream(fasta) << ">query synthetic len=" << len << "\n" << query << "\n";
  std::ofstream out(a3m);
  out << "#" << len << "\t1\n>101\n" << query << "\n";
  std::vector<std::string> made;
  for (int r = 0; r < rows; ++r) {
    if (!made.empty() && u(gen) < 0.02) {  // exact duplicate of an earlier record
      out << ">dup_" << r << "\n" << made[gen() % made.size()] << "\n";
      continue;
    }
    const double ident = 0.25 + 0.7 * u(gen);
    int lo = 0, hi = len;
    if (u(gen) < 0.4) {  // fragment
      const int span = std::max(len / 5, static_cast<int>(len * u(gen)));
      lo = static_cast<int>((len - span) * u(gen));
      hi = lo + span;
    }
    std::string row;
    for (int j = 0; j < len; ++j) {
      if (j < lo || j >= hi || u(gen) < 0.03) {
        row += '-';
      } else {
        row += u(gen) < ident ? query[j] : kAa[aa(gen)];
      }
      if (j >= lo && j + 1 < hi && u(gen) < 0.003)  // an insertion
        for (int k = 1 + static_cast<int>(u(gen) * 20); k > 0; --k)
          row += static_cast<char>(kAa[aa(gen)] + 32);
    }
    made.push_back(row);
    out << ">tr|A0A" << r << "|A0A" << r << "_HUMAN/1-" << len << " synthetic\n";
    for (size_t p = 0; p < row.size(); p += 80) out << row.substr(p, 80) << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string fasta, msa;
  int len = 500, rows = 10000, threads = 2, repeats = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--fasta")
      fasta = v;
    else if (k == "--msa")
      msa = v;
    else if (k == "--len")
      len = std::atoi(v.c_str());
    else if (k == "--rows")
      rows = std::atoi(v.c_str());
    else if (k == "--threads")
      threads = std::atoi(v.c_str());
    else if (k == "--repeats")
      repeats = std::atoi(v.c_str());
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  omp_set_num_threads(threads);
  if (fasta.empty() || msa.empty()) {
    const auto dir = std::filesystem::temp_directory_path() / "foldcube_features_bench";
    std::filesystem::create_directories(dir);
    fasta = (dir / "query.fasta").string();
    msa = (dir / "query.a3m").string();
    write_synthetic(fasta, msa, len, rows, 1);
  }
  fc::FeatureJob job;
  job.fasta = fasta;
  job.msa = msa;
  std::vector<double> total, parse, raw, model, cpu;
  for (int r = 0; r < repeats; ++r) {
    double t[3];
    fc::TensorFile out;
    const double c0 = cpu_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    fc::Status st = fc::run_feature_job(job, &out, t);
    const auto t1 = std::chrono::steady_clock::now();
    cpu.push_back(1e3 * (cpu_seconds() - c0));
    if (!st.ok()) {
      std::fprintf(stderr, "features_bench: %s\n", st.message().c_str());
      return 1;
    }
    total.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    parse.push_back(t[0]);
    raw.push_back(t[1]);
    model.push_back(t[2]);
    if (r == 0)
      std::printf("input: %s, %s: N=%s residues, S=%s unique rows\n", fasta.c_str(), msa.c_str(),
                  std::to_string(out.tensors.at("raw.seq_length").numel()).c_str(),
                  out.metadata.at("num_alignments").c_str());
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::printf(
      "threads %d, median of %d: wall %.1f ms (parse %.1f, raw %.1f, model %.1f), CPU %.1f ms "
      "(user+sys, all threads)\n",
      threads, repeats, median(total), median(parse), median(raw), median(model), median(cpu));
  rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  std::printf("peak RSS %.0f MiB (whole process)\n", ru.ru_maxrss / 1024.0);
  return 0;
}
