// Input side of AlphaFold2: FASTA / A3M / Stockholm parsers and the OpenFold feature pipeline
// (monomer, predict mode). Stage 1 ("raw" features) is OpenFold's DataPipeline.process_fasta with
// one user MSA and no templates; stage 2 ("model" features) is FeaturePipeline.process_features,
// one slice per recycling iteration along a trailing dimension R. Conventions (alphabets, where
// deletions attach, de-duplication, clustering on the corrupted MSA) follow OpenFold exactly and
// are written down in docs/features.md.
//
// Every parser takes the whole text (bytes-in entry for fuzzing), never crashes or hangs on
// hostile input, runs in linear time, and returns a one-line error "<name>:<line>: <reason>".
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "foldcube/io.h"
#include "foldcube/status.h"

namespace fc {

// ---------------------------------------------------------------------------------- parsers

struct FastaRecord {
  std::string description;  // the header line after '>' (leading spaces kept, trailing stripped)
  std::string sequence;     // upper-case letters, lines joined
  int64_t line = 0;         // 1-based line of the '>' header
};

// One or many records; each is a job. Lines end with \n, \r\n or \r; lines are stripped of
// surrounding whitespace; empty lines and lines starting with '#' are skipped. Sequence letters
// must be upper-case A-Z (lower case, '-', '*', digits, control bytes: an error); an empty file,
// a record without sequence or text before the first '>' is an error.
Status parse_fasta(std::string_view text, const std::string& name, std::vector<FastaRecord>* out);

// An alignment as parsed: every record (duplicates included), aligned columns only.
struct Msa {
  int64_t width = 0;                      // aligned length N (the query's)
  std::vector<std::string> descriptions;  // per record
  std::vector<int64_t> lines;             // per record: 1-based line of its header / first row
  std::string letters;                    // [records, N] aligned letters: 'A'..'Z' or '-'
  std::vector<int32_t> deletions;  // [records, N] insertions right before each aligned column
  int64_t num_records() const { return static_cast<int64_t>(descriptions.size()); }
};

// A3M (HHblits / MMseqs2 / ColabFold): first record = query. Upper case and '-' are aligned
// columns; lower case letters are insertions, counted into the deletion count of the next
// aligned column (also a '-'), and dropped after the last one. A ColabFold "#N\t1" line is
// skipped like every '#' line. Rows whose aligned length differs from the query's, '.', digits
// and other bytes are errors.
Status parse_a3m(std::string_view text, const std::string& name, Msa* out);

// Stockholm (jackhmmer/hmmsearch .sto): "name row" lines, several interleaved blocks
// concatenated per name; '#' annotation lines (#=GF, #=GS, #=GR, #=GC RF, ...) skipped; input
// ends at "//". As OpenFold: the first sequence is the query; columns where it has a gap ('-'
// or '.') are removed and residues there count as deletions before the next query column.
// '.' in a kept column reads as '-'; lower case in a kept column as upper case.
Status parse_stockholm(std::string_view text, const std::string& name, Msa* out);

// Reads a file: FASTA, or an MSA chosen by extension (.sto/.stockholm: Stockholm, else A3M).
Status read_fasta(const std::string& path, std::vector<FastaRecord>* out);
Status read_msa(const std::string& path, Msa* out);

// ------------------------------------------------------------------------ stage 1: raw features

struct RawFeatures {
  std::string domain_name;                // FASTA description
  std::string sequence;                   // query letters
  int64_t num_res = 0;                    // N
  int64_t num_alignments = 0;             // S: MSA rows after de-duplication (query = row 0)
  std::vector<int32_t> aatype;            // [N] restypes + X (ARNDCQEGHILKMFPSTWYVX), 0..20
  std::vector<int32_t> msa;               // [S, N] HHblits alphabet (ACDEFGHIKLMNPQRSTVWYX-)
  std::vector<int32_t> deletion_matrix;   // [S, N]
  std::vector<int64_t> record_to_row;     // [MSA records] row in msa, or -1 (duplicate dropped)
  std::vector<std::string> descriptions;  // [S]
  std::vector<std::string> species;       // [S] msa_species_identifiers ("" if none)
};

// OpenFold's species identifier of an MSA description: the first whitespace-separated token, cut
// at the first '/', read as a UniProt name "tr|ACC|NAME_SPECIES" (or "sp|..."); else "".
std::string species_identifier(std::string_view description);

// The query must equal the MSA's first row (OpenFold does not check; we do). Duplicate rows
// (same aligned letters as an earlier row, the query included) are dropped; the first keeps its
// deletion counts.
Status make_raw_features(const FastaRecord& query, const Msa& msa, const std::string& msa_name,
                         RawFeatures* out);

// raw.<name> tensors with OpenFold's dtypes and shapes (aatype one-hot [N, 21] I32, msa,
// deletion_matrix_int, ..., empty F32 template tensors).
void put_raw_tensors(const RawFeatures& raw, const std::string& prefix, TensorFile* out);

// ------------------------------------------------------------------- stage 2: model features

struct FeatureConfig {
  int64_t max_msa_clusters = 512;  // model_1 preset (predict)
  int64_t max_extra_msa = 5120;
  int64_t max_templates = 4;
  int64_t max_recycling_iters = 3;  // R = max_recycling_iters + 1 slices
  float masked_msa_replace_fraction = 0.15f;
  float profile_prob = 0.1f, same_prob = 0.1f, uniform_prob = 0.1f;  // [MASK]: the rest
  // No BERT corruption and identity row orders (OpenFold's config cannot do this; the golden
  // feature_det.* shows the result).
  bool deterministic = false;
};

// The random decisions of every recycling iteration (OpenFold's random.* in the golden files).
struct FeatureDecisions {
  int64_t iters = 0;                        // R
  int64_t rows = 0, centres = 0, cols = 0;  // S, S_sel = min(max_msa_clusters, S), N
  int64_t extra_kept = 0;                   // min(max_extra_msa, S - S_sel)
  std::vector<int64_t> msa_order;           // [R, S] order[0] = 0, a permutation of 0..S-1
  std::vector<uint8_t> bert_mask;           // [R, S_sel, N] 1 = corrupted
  std::vector<int64_t> bert_sample;         // [R, S_sel, N] replacement token 0..22
  std::vector<int64_t> extra_msa_order;     // [R, E_kept] distinct indices into the extra list
};

// Draws the decisions from a seeded counter-based RNG (the same for any thread count);
// cfg.deterministic gives identity orders and no masking.
void draw_decisions(const RawFeatures& raw, const FeatureConfig& cfg, uint64_t seed,
                    FeatureDecisions* out);
// Reads random.msa_order, random.bert_mask, random.bert_sample, random.extra_msa_order and checks
// shapes, ranges and permutations against raw and cfg.
Status decisions_from_tensors(const TensorFile& file, const RawFeatures& raw,
                              const FeatureConfig& cfg, FeatureDecisions* out);

// feature.<name> tensors (OpenFold's names, dtypes and shapes with the trailing R dimension).
// assignment, if given, receives the nearest-centre index of every extra row [R, S - S_sel].
Status make_model_features(const RawFeatures& raw, const FeatureConfig& cfg,
                           const FeatureDecisions& dec, const std::string& prefix, TensorFile* out,
                           std::vector<int64_t>* assignment = nullptr);

// Nearest cluster centre of every extra row: argmax over centres s of the number of columns j
// with extra[e, j] == centre[s, j] <= 20 (stage-2 alphabet), ties to the lowest s.
// extra [E, N], centres [S_sel, N] (uint8 tokens 0..22); out [E]. Fast (blocked, threaded) and
// naive reference.
void nearest_centres(const uint8_t* extra, int64_t num_extra, const uint8_t* centres,
                     int64_t num_centres, int64_t cols, int64_t* out);
void nearest_centres_ref(const uint8_t* extra, int64_t num_extra, const uint8_t* centres,
                         int64_t num_centres, int64_t cols, int64_t* out);

// -------------------------------------------------------------------------- whole data stage

struct FeatureJob {
  std::string fasta, msa;  // paths; the FASTA must hold exactly one record
  FeatureConfig config;
  uint64_t seed = 0;
  std::string decisions;  // optional: take random.* from this safetensors file instead of seed
};
// Parses both files and writes raw.<name> and feature.<name> into out (plus string metadata:
// format, domain_name, sequence, config). timings_ms, if given, receives {parse, raw, model}.
Status run_feature_job(const FeatureJob& job, TensorFile* out, double* timings_ms = nullptr);

}  // namespace fc
