// The packed-tensor layout shared by the CPU (packed_cpu.h) and CUDA (packed_cuda.h) kernels.
// No PyTorch or CUDA headers: it compiles with g++ and nvcc alike.
#pragma once

#include <cstdint>

namespace gnnq_layout {

constexpr int MAX_GROUPS = 8;

// Rows of codes packed along the features, grouped by bitwidth (gnnq/kernels/packing.py):
// rows of F b-bit codes, W = ceil(F / P) 32-bit words per row, P = 32 / b codes per word,
// code k of a word at bits [k b, k b + b). Group g holds the grouped rows
// row_start[g] .. row_start[g+1] - 1 at bits[g]; grouped row p of group g starts at word
// word_start[g] + (p - row_start[g]) * width[g] of `words`. Word: uint32_t to write codes,
// const uint32_t to read them.
template <typename Word>
struct Groups {
  Word* words = nullptr;
  int groups = 1;
  int bits[MAX_GROUPS] = {0};
  int64_t row_start[MAX_GROUPS + 1] = {0};
  int64_t word_start[MAX_GROUPS] = {0};
  int64_t width[MAX_GROUPS] = {0};  // words per row
};

}  // namespace gnnq_layout
