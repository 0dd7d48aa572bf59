// Shared declarations of the gnnq CPU kernels (no PyTorch headers: the per-instruction-set
// translation units include only this and packed_cpu_kernels.h, so they compile in seconds).
#pragma once

#include <cstdint>

#include "packed_layout.h"

namespace gnnq_cpu {

constexpr int MAX_GROUPS = gnnq_layout::MAX_GROUPS;

// A packed tensor to read (gnnq_layout::Groups).
using PackedView = gnnq_layout::Groups<const uint32_t>;

// out[i, c] = dst[i] * cs[c] * (sum_j a_j u[j, c] - sum_j a_j z_j - cz[c] sum_j a_j) + bias[c]
// over the CSR row i (source rows j in grouped numbering); a_j = src_scale[j] (1 if null),
// z_j = src_zero[j] (0 if null), cz = col_zero (0 if null); optional ReLU. spmm_codes_rows
// writes the exact int32 sums sum_j u[j, c] instead.
// Column indices are checked in the edge loops (no separate pass over them): an index outside
// 0 .. rows - 1 is skipped and sets *bad_index, and the caller raises an error.
struct SpmmArgs {
  PackedView x;
  const int64_t* rowptr = nullptr;
  const int32_t* col = nullptr;
  int64_t nnz = 0, src_rows = 0;
  int* bad_index = nullptr;
  int64_t F = 0, fpad = 0;
  const float* src_scale = nullptr;
  const float* dst_scale = nullptr;
  const float* src_zero = nullptr;
  const int32_t* col_zero = nullptr;
  const float* col_scale = nullptr;
  const float* bias = nullptr;
  bool relu = false;
  float* out = nullptr;
  int32_t* out_int = nullptr;
};

// Dense transform: grouped input row p (output row order[p]) with decoded weights w [O, kpad]:
// acc = sum_f u_x[f] u_w[o, f];
// out = sx * sw[o] * (acc - zw[o] * sum_f u_x - zx * sum_f u_w[o] + K zx zw[o]) + bias[o].
struct LinearArgs {
  PackedView x;
  const int64_t* order = nullptr;
  const int16_t* w = nullptr;
  const int64_t* w_colsum = nullptr;
  int64_t in_features = 0, kpad = 0, out_features = 0;
  const float* x_scale = nullptr;
  const int32_t* x_zero = nullptr;
  const float* w_scale = nullptr;
  const int32_t* w_zero = nullptr;
  const float* bias = nullptr;
  bool relu = false;
  float* out = nullptr;
  int32_t* out_int = nullptr;
};

// Quantize x [R, F] (row order[p] for grouped row p) on a grid per row (axis 0) or column
// (axis 1): u = clamp(round(x / s), umin - z, umax - z) + z; rounding 0 = half away from zero
// as sign(v) floor(|v| + 0.5) in float (A2Q's expression), 1 = half to even (torch.round),
// 2 = half to even of x / s + z, minus z (the QLR quantizer's order).
struct QuantArgs {
  PackedView x;
  const int64_t* order = nullptr;
  const float* x_in = nullptr;
  int64_t F = 0;
  int axis = 0, rounding = 0;
  const float* scale = nullptr;
  const int32_t* zero = nullptr;
  const int32_t* umin = nullptr;
  const int32_t* umax = nullptr;
  uint32_t* words_out = nullptr;
};

}  // namespace gnnq_cpu

#define GNNQ_DECLARE_KERNELS(ns)                                                              \
  namespace ns {                                                                              \
  void spmm_rows(const gnnq_cpu::SpmmArgs& S, int64_t r0, int64_t r1, float* scratch);       \
  void spmm_codes_rows(const gnnq_cpu::SpmmArgs& S, int64_t r0, int64_t r1,                  \
                       int32_t* scratch);                                                     \
  void spmm_f32_rows(const gnnq_cpu::SpmmArgs& S, const float* x, int64_t r0, int64_t r1,    \
                     float* scratch);                                                         \
  void linear_rows(const gnnq_cpu::LinearArgs& L, int64_t p0, int64_t p1, int16_t* xrow);    \
  void quantize_rows(const gnnq_cpu::QuantArgs& Q, int64_t p0, int64_t p1);                  \
  }

GNNQ_DECLARE_KERNELS(isa_base)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GNNQ_MULTI_ISA 1
GNNQ_DECLARE_KERNELS(isa_avx2)
#endif
