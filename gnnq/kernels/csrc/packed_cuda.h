// gnnq packed INT1..INT8 inference kernels for CUDA: host-side launch API.
//
// Plain CUDA C++ (no PyTorch headers): packed_cuda.cu compiles with `nvcc -c` anywhere, and
// packed_cuda_bind.cpp wraps these launchers for PyTorch where a CUDA build of torch exists.
// Every pointer is a device pointer; every launcher returns the launch's cudaError_t.
// The arithmetic is gnnq/kernels/reference.py's (see that module's docstring).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "packed_layout.h"

namespace gnnq_cuda {

constexpr int MAX_GROUPS = gnnq_layout::MAX_GROUPS;

// A packed tensor to read (gnnq_layout::Groups).
using Packed = gnnq_layout::Groups<const uint32_t>;

// Where quantized codes go: a packed layout to write and a grid (per row, axis 0, or per
// column, axis 1: scale, zero point, code range). `order[p]` is the original row of grouped
// row p and `position[r]` the grouped row of original row r (both null: identity).
struct PackTarget : gnnq_layout::Groups<uint32_t> {
  const int64_t* order = nullptr;
  const int64_t* position = nullptr;
  const float* scale = nullptr;     // per row (axis 0) or column (axis 1)
  const int32_t* zero = nullptr;
  const int32_t* umin = nullptr;
  const int32_t* umax = nullptr;
  int axis = 0;
  int rounding = 0;                 // 0: half away (A2Q), 1: half to even, 2: even of v + z
};

// out[i, c] = d_i cs_c (sum_j a_j u[j, c] - sum_j a_j z_j - cz_c sum_j a_j) + bias_c [ReLU]
struct SpmmParams {
  Packed x;
  const int64_t* rowptr = nullptr;  // [N + 1]
  const int32_t* col = nullptr;     // grouped numbering of x
  int64_t num_rows = 0, F = 0;
  const float* src_scale = nullptr;
  const float* dst_scale = nullptr;
  const float* src_zero = nullptr;
  const float* col_scale = nullptr;
  const int32_t* col_zero = nullptr;
  const float* bias = nullptr;
  bool relu = false;
  float* out = nullptr;             // [N, F] float, or
  int32_t* out_codes = nullptr;     // [N, F] exact int32 sums of the codes (no scaling), or
  bool pack_out = false;            // (fused layer) quantized on a row grid and packed
  PackTarget packed_out;
};

// FP32 CSR SpMM of the same design: out[i] = d_i sum_j a_j x[j] + bias [ReLU].
struct SpmmF32Params {
  const int64_t* rowptr = nullptr;
  const int32_t* col = nullptr;
  const float* x = nullptr;
  int64_t num_rows = 0, F = 0;
  const float* src_scale = nullptr;
  const float* dst_scale = nullptr;
  const float* bias = nullptr;
  bool relu = false;
  float* out = nullptr;
};

// Dense transform: grouped input rows (output row order[p]) x packed weights [O, K]:
// acc = sum_f u_x u_w (dp4a on unpacked uint8);
// out = sx sw_o (acc - zw_o sum u_x - zx sum_o u_w + K zx zw_o) + bias_o [ReLU]
struct LinearParams {
  Packed x;
  const int64_t* order = nullptr;
  int64_t rows = 0, K = 0, O = 0;
  const uint32_t* w_words = nullptr;  // [O, ceil(K / (32 / w_bits))]
  int w_bits = 4;
  const int64_t* w_colsum = nullptr;  // [O] sum_f u_w[o, f]
  const float* x_scale = nullptr;     // per original row
  const int32_t* x_zero = nullptr;
  const float* w_scale = nullptr;
  const int32_t* w_zero = nullptr;
  const float* bias = nullptr;
  bool relu = false;
  float* out = nullptr;               // [rows, O] float, or
  int32_t* out_codes = nullptr;       // raw int32 sums, or
  bool pack_out = false;              // (fused layer) quantized per column and packed
  PackTarget packed_out;
};

// Quantize x [R, F] on a grid and pack into target (rows in original numbering).
struct QuantizeParams {
  const float* x = nullptr;
  int64_t rows = 0, F = 0;
  PackTarget target;
};

cudaError_t spmm(const SpmmParams& p, cudaStream_t stream);
cudaError_t spmm_f32(const SpmmF32Params& p, cudaStream_t stream);
cudaError_t linear(const LinearParams& p, cudaStream_t stream);
cudaError_t quantize_pack(const QuantizeParams& p, cudaStream_t stream);

}  // namespace gnnq_cuda
