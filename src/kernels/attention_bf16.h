// bf16 tile products of the attention kernel (AttentionArgs::dtype == BF16; src/kernels/
// attention.cc): AVX512-BF16 dot products (vdpbf16ps: pairs of bf16 products accumulated in f32)
// where the CPU has them, else the same sums in portable f32 loops. Called per register block
// of R <= 8 query rows and one key tile; no allocation, single-threaded.
//
// Packed operands (uint32 = two bf16, the lower half first, rounded to nearest even):
//   Q  [R, cq] with cq = ceil(C/2): channels (2p, 2p+1) of a query row (odd C: the last pair's
//      upper half is 0);
//   KP [cq, ldk] (ldk a multiple of 32): channels (2p, 2p+1) of key j at KP[p * ldk + j];
//   VP [ceil(Lk/2), Cp] (Cp a multiple of 16): keys (2q, 2q+1) of channel c at VP[q * Cp + c]
//      (a missing last key is 0);
//   P  the probabilities of a row, converted in place at the start of its f32 row of S.
#pragma once

#include <cstdint>

namespace fc::kern::bf16dot {

// True when the CPU runs AVX512-BF16 (the results of the two paths differ in the last bits of
// the f32 accumulation only).
bool native();
// Tests: run the portable versions even on a CPU with AVX512-BF16 (true), or not (false).
void force_portable(bool on);

// S[r, j] = sum_c q[r, c] k[j, c] for r < R and j < round_up(w, 32) (keys past the tile's end
// read KP's zero padding or the next keys; the caller masks them). KP points at the tile's
// first key (a multiple of 32).
void logits(const uint32_t* Q, int64_t cq, int R, const uint32_t* KP, int64_t ldk, int64_t w,
            float* S, int64_t ldS);

// Row r < R of S: its first round_up(w, 32) floats rounded to bf16 and stored, in order, as
// uint16 at the start of the same row (S + r * ldS, read as uint16). Values past w must be
// finite (the softmax leaves 0 there).
void probs_to_bf16(float* S, int64_t ldS, int R, int64_t w);

// O[r, :Cp] = (first ? 0 : alpha[r] * O[r, :]) + sum_{j < w} p[r, j] v[j, :] with p the bf16 rows
// written by probs_to_bf16 (w rounded up to even; the extra p is 0) and VP pointing at the key
// tile's first pair.
void pv(const float* S, int64_t ldS, int R, int64_t w, const uint32_t* VP, int64_t Cp,
        const float* alpha, bool first, float* O);

}  // namespace fc::kern::bf16dot
