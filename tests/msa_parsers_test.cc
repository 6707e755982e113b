// FASTA, A3M and Stockholm parsers: OpenFold's conventions (wrapped lines, CRLF, '#' lines,
// where insertions attach, Stockholm blocks and query-gap columns, de-duplication) and hostile
// input (binary junk, NUL bytes, 0-length query, ragged rows, unknown letters, an over-long
// line): one-line errors naming file and line, never a crash.
#include <gtest/gtest.h>

#include <random>
#include <string>

#include "foldcube/features.h"

namespace fc {
namespace {

using namespace std::string_literals;

// Asserts a one-line parse error whose message contains `needle`.
void expect_error(const Status& st, const std::string& needle) {
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find(needle), std::string::npos)
      << "wanted '" << needle << "' in: " << st.message();
  EXPECT_EQ(st.message().find('\n'), std::string::npos) << st.message();
}

std::vector<int32_t> row_deletions(const Msa& m, int64_t i) {
  return {m.deletions.begin() + i * m.width, m.deletions.begin() + (i + 1) * m.width};
}

TEST(Fasta, RecordsWrappedLinesAndLineEndings) {
  std::vector<FastaRecord> r;
  const std::string text =
      "# comment\r\n>q1 desc |with| \ttabs & \xc3\xa9 ; = ()\r\nMKV\r\nLLA \r\n\r\n>  q2\rAC\rDX\n";
  ASSERT_TRUE(parse_fasta(text, "in.fasta", &r).ok());
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].description, "q1 desc |with| \ttabs & \xc3\xa9 ; = ()");
  EXPECT_EQ(r[0].sequence, "MKVLLA");
  EXPECT_EQ(r[0].line, 2);
  EXPECT_EQ(r[1].description, "  q2");  // whitespace after '>' is kept (OpenFold)
  EXPECT_EQ(r[1].sequence, "ACDX");
  EXPECT_EQ(r[1].line, 6);
}

TEST(Fasta, HostileInput) {
  std::vector<FastaRecord> r;
  expect_error(parse_fasta("", "q.fasta", &r), "q.fasta:1: no '>' record");
  expect_error(parse_fasta("MKV\n", "q.fasta", &r), "q.fasta:1: sequence before the first '>'");
  expect_error(parse_fasta(">a\nMKv\n", "q.fasta", &r), "q.fasta:2: invalid character 'v'");
  expect_error(parse_fasta(">a\nMK-V\n", "q.fasta", &r), "q.fasta:2: invalid character '-'");
  expect_error(parse_fasta(">a\nMK*\n", "q.fasta", &r), "invalid character '*'");
  expect_error(parse_fasta(">a\nMK\0V\n"s, "q.fasta", &r),
               "q.fasta:2: invalid character byte 0x00");
  expect_error(parse_fasta(">a\n>b\nMK\n", "q.fasta", &r), "q.fasta:1: record without a sequence");
  expect_error(parse_fasta(">a\nMK\n>b\n", "q.fasta", &r), "q.fasta:3: record without a sequence");
  expect_error(parse_fasta(">a\0b\nMK\n"s, "q.fasta", &r), "q.fasta:1: NUL byte");
}

TEST(A3m, InsertionsAttachToTheNextAlignedColumn) {
  Msa m;
  // ColabFold header; a leading insertion, an insertion before a gap, a trailing insertion
  // (dropped), wrapped lines inside an insertion run.
  const std::string text =
      "#5\t1\n>101\nMKVLA\n>h1 any chars \t|/#%;=()'[]\nabMK-cdeV\nLxyz\n>h2\nM\nKqr\nr-LA\n";
  Status st = parse_a3m(text, "m.a3m", &m);
  ASSERT_TRUE(st.ok()) << st.message();
  ASSERT_EQ(m.width, 5);
  ASSERT_EQ(m.num_records(), 3);
  EXPECT_EQ(m.letters, "MKVLAMK-VLMK-LA");
  EXPECT_EQ(row_deletions(m, 0), (std::vector<int32_t>{0, 0, 0, 0, 0}));
  EXPECT_EQ(row_deletions(m, 1), (std::vector<int32_t>{2, 0, 0, 3, 0}));
  EXPECT_EQ(row_deletions(m, 2), (std::vector<int32_t>{0, 0, 3, 0, 0}));
  EXPECT_EQ(m.descriptions[1], "h1 any chars \t|/#%;=()'[]");
  EXPECT_EQ(m.lines, (std::vector<int64_t>{2, 4, 7}));
}

TEST(A3m, CrlfAndBlankLines) {
  Msa m;
  ASSERT_TRUE(parse_a3m(">q\r\nMK\r\n\r\n>h\r\nM-\r\n", "m.a3m", &m).ok());
  EXPECT_EQ(m.letters, "MKM-");
}

TEST(A3m, HostileInput) {
  Msa m;
  expect_error(parse_a3m("", "m.a3m", &m), "m.a3m:1: no '>' record");
  expect_error(parse_a3m(">q\nabc\n>h\nMK\n", "m.a3m", &m), "m.a3m:1: the query record has no");
  expect_error(parse_a3m(">q\n", "m.a3m", &m), "m.a3m:1: the query record has no aligned");
  expect_error(parse_a3m(">q\nMKV\n>h\nMK\n", "m.a3m", &m),
               "m.a3m:3: record 2 has 2 aligned columns, the query has 3");
  expect_error(parse_a3m(">q\nMKV\n>h\nMK\nVL\n", "m.a3m", &m),
               "m.a3m:5: record 2 has more aligned columns than the query (3)");
  expect_error(parse_a3m(">q\nMKV\n>h\nM.V\n", "m.a3m", &m), "m.a3m:4: invalid character '.'");
  expect_error(parse_a3m(">q\nMK1\n", "m.a3m", &m), "invalid character '1'");
  expect_error(parse_a3m(">q\nMK\0\n"s, "m.a3m", &m), "m.a3m:2: invalid character byte 0x00");
  expect_error(parse_a3m("\x7f"
                         "ELF\x02\x01\x01\0\0",
                         "m.a3m", &m),
               "m.a3m:1: sequence before");
  // An over-long line is refused after kMaxLine bytes, not read to its end.
  const std::string huge = ">q\n" + std::string((size_t{1} << 24) + 10, 'A') + "\n";
  expect_error(parse_a3m(huge, "m.a3m", &m), "m.a3m:2: line longer than 16 MiB");
}

TEST(Stockholm, BlocksQueryGapsAndRf) {
  Msa m;
  // Two interleaved blocks. Query gap columns 2 and 5 are removed; residues of other rows there
  // count as deletions before the next query column; '.' reads as a gap.
  const std::string text =
      "# STOCKHOLM 1.0\n#=GF ID test\nquery  MK-V\nhit/1  MKaV\nhit2   M.-V\n#=GC RF xx.x\n\n"
      "query  L-A\nhit/1  LbA\nhit2   .c.\n#=GC RF x.x\n//\nignored after the end\n";
  Status st = parse_stockholm(text, "m.sto", &m);
  ASSERT_TRUE(st.ok()) << st.message();
  ASSERT_EQ(m.width, 5);
  ASSERT_EQ(m.num_records(), 3);
  EXPECT_EQ(m.descriptions, (std::vector<std::string>{"query", "hit/1", "hit2"}));
  EXPECT_EQ(m.letters, "MKVLAMKVLAM-V--");
  EXPECT_EQ(row_deletions(m, 0), (std::vector<int32_t>{0, 0, 0, 0, 0}));
  EXPECT_EQ(row_deletions(m, 1), (std::vector<int32_t>{0, 0, 1, 0, 1}));
  EXPECT_EQ(row_deletions(m, 2), (std::vector<int32_t>{0, 0, 0, 0, 1}));
}

TEST(Stockholm, HostileInput) {
  Msa m;
  expect_error(parse_stockholm("", "m.sto", &m), "m.sto:1: no sequence lines");
  expect_error(parse_stockholm("q MKV\nh MK\n", "m.sto", &m),
               "m.sto:2: sequence 1 has 2 columns, the query 3");
  expect_error(parse_stockholm("q MKV extra\n", "m.sto", &m), "m.sto:1: expected '<name>");
  expect_error(parse_stockholm("q\n", "m.sto", &m), "m.sto:1: expected '<name>");
  expect_error(parse_stockholm("q MK1\n", "m.sto", &m), "m.sto:1: invalid character '1'");
  expect_error(parse_stockholm("q ---\n", "m.sto", &m), "m.sto:1: the query row has no residue");
  expect_error(parse_stockholm("q MKV\n#=GC RF xx\n", "m.sto", &m), "m.sto:2: #=GC RF has 2");
}

TEST(RawFeatures, DuplicatesDroppedFirstKeepsItsDeletions) {
  Msa m;
  ASSERT_TRUE(parse_a3m(">q\nMKV\n>a\nMaK-\n>b\nMbbK-\n>c\nMKV\n>d\nBKV\n", "m.a3m", &m).ok());
  RawFeatures raw;
  Status st = make_raw_features(FastaRecord{"q", "MKV", 1}, m, "m.a3m", &raw);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(raw.num_alignments, 3);
  EXPECT_EQ(raw.record_to_row, (std::vector<int64_t>{0, 1, -1, -1, 2}));
  EXPECT_EQ(raw.deletion_matrix, (std::vector<int32_t>{0, 0, 0, 0, 1, 0, 0, 0, 0}));
  // HHblits alphabet: M=10, K=8, V=17, '-'=21, B->D=2.
  EXPECT_EQ(raw.msa, (std::vector<int32_t>{10, 8, 17, 10, 8, 21, 2, 8, 17}));
  // The query must be the MSA's first row.
  expect_error(make_raw_features(FastaRecord{"q", "MKA", 1}, m, "m.a3m", &raw),
               "m.a3m:1: the first MSA row is not the FASTA query");
}

// Random bytes and mutated valid files through every parser: no crash, no hang, one-line errors.
TEST(Parsers, RandomJunkNeverCrashes) {
  std::mt19937 gen(11);
  const std::string seed_text =
      "# STOCKHOLM 1.0\n>q desc\nMKV-LA\nq MKV-LA\n>h\nmkMK-\r\n#=GC RF xxx.xx\n//\n";
  for (int iter = 0; iter < 3000; ++iter) {
    std::string text = seed_text;
    const int edits = 1 + static_cast<int>(gen() % 8);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = gen() % (text.size() + 1);
      switch (gen() % 3) {
        case 0:
          text.insert(pos, 1, static_cast<char>(gen() & 0xFF));
          break;
        case 1:
          if (pos < text.size()) text.erase(pos, 1);
          break;
        default:
          if (pos < text.size()) text[pos] = static_cast<char>(gen() & 0xFF);
      }
    }
    if (iter % 10 == 0) {
      text.resize(gen() % 64);
      for (char& c : text) c = static_cast<char>(gen() & 0xFF);
    }
    std::vector<FastaRecord> f;
    Msa m;
    for (const Status& st :
         {parse_fasta(text, "x", &f), parse_a3m(text, "x", &m), parse_stockholm(text, "x", &m)}) {
      if (!st.ok()) {
        EXPECT_EQ(st.message().find('\n'), std::string::npos) << st.message();
      }
    }
  }
}

}  // namespace
}  // namespace fc
