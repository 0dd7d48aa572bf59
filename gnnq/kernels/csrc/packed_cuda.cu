// gnnq packed INT1..INT8 inference kernels for CUDA (sm_80 and sm_90; plain CUDA C++).
//
// Kernels (launchers in packed_cuda.h; arithmetic of gnnq/kernels/reference.py):
//
// - spmm: CSR aggregation over packed rows of one or several bitwidths. One warp per
//   destination row; each lane owns FPL consecutive features of a 32 * FPL feature tile
//   (blockIdx.y), so the FPL codes of a lane sit in one 32-bit word for INT1/2/4/8 and a
//   neighbour's row is one coalesced gather of F * b / 8 bytes. The warp loads 32 column
//   indices at a time and broadcasts them with __shfl_sync; the GCN normalisation is two
//   per-node factors (a_j on the source, d_i on the destination), so no edge values are read.
//   Uniform INT1/2/4/8 rows have a compile-time bitwidth; other and mixed bitwidths decode
//   with the group's runtime bitwidth (groups found by <= 8 warp-uniform compares).
//   Modes: float output, exact int32 sums of codes, or (fused layer) the epilogue quantizes
//   each output row on the next layer's per-node grid and packs it (no float round trip).
// - spmm_f32: the same design over FP32 rows (lane-interleaved features for coalescing):
//   the apples-to-apples baseline.
// - linear: dense transform. Hopper has no INT4 tensor cores, so codes are unpacked to uint8
//   in shared memory and multiplied with __dp4a (u8 x u8 -> u32) in 32 x 32 tiles; zero points
//   are applied in the epilogue from row/column code sums. Optional fused epilogue: quantize
//   each output on a per-channel grid and pack (the GCN feature quantizer before aggregation).
// - quantize_pack: quantize a float matrix on a grid and pack it (one thread per word).
//
// A fused GCN layer is linear(packed_out = per-channel grid) followed by spmm(packed_out =
// next layer's per-node grid): integer codes in, integer codes out, no FP32 intermediates.

#include "packed_cuda.h"

#include <cstdint>

namespace gnnq_cuda {
namespace {

constexpr int WARPS_PER_BLOCK = 4;
constexpr unsigned FULL_MASK = 0xffffffffu;

// The bit group of grouped row j (of a Packed source or a PackTarget).
template <typename Layout>
__device__ __forceinline__ int find_group(const Layout& X, int64_t j) {
  int g = 0;
#pragma unroll
  for (int k = 1; k < MAX_GROUPS; ++k)
    if (k < X.groups && j >= X.row_start[k]) g = k;
  return g;
}

// Round as the reference does: 0 = sign(v) floor(|v| + 0.5) in float, 1 = half to even,
// 2 = half to even of v + z, minus z.
__device__ __forceinline__ float round_code(float v, int rounding, int32_t z) {
  if (rounding == 0) {
    const float t = floorf(fabsf(v) + 0.5f);
    return v < 0.0f ? -t : t;
  }
  if (rounding == 1) return rintf(v);
  const float zf = static_cast<float>(z);
  return rintf(__fadd_rn(v, zf)) - zf;
}

__device__ __forceinline__ uint32_t quantize_one(float x, float s, int32_t z, int32_t lo,
                                                 int32_t hi, int rounding) {
  const float v = __fdiv_rn(x, s);  // IEEE division, as torch's x / s
  float q = round_code(v, rounding, z);
  const float qlo = static_cast<float>(lo - z), qhi = static_cast<float>(hi - z);
  q = fminf(fmaxf(q, qlo), qhi);
  if (v != v) q = 0.0f;
  return static_cast<uint32_t>(static_cast<int32_t>(q) + z);
}

// Quantize `values[k]` (features f0 + k of original row r) on the target grid and OR the codes
// into the packed output (words zeroed by the launcher).
template <int FPL>
__device__ __forceinline__ void store_packed(const PackTarget& T, int64_t r, int64_t f0,
                                             int64_t F, const float* values) {
  const int64_t p = T.position ? T.position[r] : r;
  const int g = find_group(T, p);
  const int b = T.bits[g];
  const int P = 32 / b;
  uint32_t* row = T.words + T.word_start[g] + (p - T.row_start[g]) * T.width[g];
  int64_t word = f0 / P;
  int slot = static_cast<int>(f0 % P);
  uint32_t bits = 0;
#pragma unroll
  for (int k = 0; k < FPL; ++k) {
    const int64_t f = f0 + k;
    if (f < F) {
      const int64_t grp = T.axis == 0 ? r : f;
      const uint32_t u = quantize_one(values[k], T.scale[grp], T.zero[grp], T.umin[grp],
                                      T.umax[grp], T.rounding);
      bits |= u << (slot * b);
    }
    if (++slot == P || k == FPL - 1) {
      if (bits) atomicOr(row + word, bits);
      bits = 0;
      if (slot == P) { slot = 0; ++word; }
    }
  }
}

// Codes of the lane's FPL features (f0 .. f0 + FPL - 1) of one packed row. B > 0: the
// compile-time bitwidth; B == 0: runtime `b` with the lane's first word/slot precomputed.
template <int B, int FPL>
__device__ __forceinline__ void load_codes(const uint32_t* __restrict__ row, int64_t f0,
                                           int64_t F, int b, int64_t w0, int s0,
                                           uint32_t* codes) {
  if constexpr (B == 1 || B == 2 || B == 4 || B == 8) {
    constexpr int P = 32 / B;
    constexpr uint32_t M = (1u << B) - 1u;
    if constexpr (FPL <= P) {  // the lane's features share one word
      const uint32_t x = f0 < F ? __ldg(row + f0 / P) : 0u;
      const int shift = static_cast<int>(f0 % P) * B;
#pragma unroll
      for (int k = 0; k < FPL; ++k) codes[k] = (x >> (shift + k * B)) & M;
    } else {
#pragma unroll
      for (int k = 0; k < FPL; ++k) {
        const int64_t f = f0 + k;
        codes[k] = f < F ? (__ldg(row + f / P) >> ((f % P) * B)) & M : 0u;
      }
    }
  } else {
    const int P = 32 / b;
    const uint32_t M = (1u << b) - 1u;
    int64_t w = w0;
    int s = s0;
    uint32_t x = f0 < F ? __ldg(row + w) : 0u;
#pragma unroll
    for (int k = 0; k < FPL; ++k) {
      codes[k] = f0 + k < F ? (x >> (s * b)) & M : 0u;
      if (++s == P) {
        s = 0;
        ++w;
        if (k + 1 < FPL && f0 + k + 1 < F) x = __ldg(row + w);
      }
    }
  }
}

// One warp per destination row, FPL features per lane (see the file comment).
template <int B, int FPL, bool CODES>
__global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)
spmm_kernel(const SpmmParams p) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t f0 = (static_cast<int64_t>(blockIdx.y) * 32 + lane) * FPL;
  const Packed& X = p.x;
  // First word / slot of this lane's features in each group (runtime bitwidths only).
  int64_t w0[MAX_GROUPS];
  int s0[MAX_GROUPS];
#pragma unroll
  for (int g = 0; g < MAX_GROUPS; ++g) {
    const int P = X.bits[g] > 0 ? 32 / X.bits[g] : 32;
    w0[g] = f0 / P;
    s0[g] = static_cast<int>(f0 % P);
  }
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * WARPS_PER_BLOCK + warp; i < p.num_rows;
       i += static_cast<int64_t>(gridDim.x) * WARPS_PER_BLOCK) {
    float acc[FPL];
    int32_t iacc[FPL];
#pragma unroll
    for (int k = 0; k < FPL; ++k) { acc[k] = 0.0f; iacc[k] = 0; }
    float asum = 0.0f, zsum = 0.0f;
    const int64_t beg = p.rowptr[i], end = p.rowptr[i + 1];
    for (int64_t e0 = beg; e0 < end; e0 += 32) {
      const int64_t e = e0 + lane;
      const int32_t jl = e < end ? __ldg(p.col + e) : 0;
      const float al = (e < end && p.src_scale) ? __ldg(p.src_scale + jl) : 1.0f;
      const int n = static_cast<int>(end - e0 < 32 ? end - e0 : 32);
#pragma unroll 4
      for (int t = 0; t < n; ++t) {
        const int64_t j = __shfl_sync(FULL_MASK, jl, t);
        const float a = __shfl_sync(FULL_MASK, al, t);
        const int g = (B > 0) ? 0 : find_group(X, j);
        const uint32_t* row = X.words + X.word_start[g] + (j - X.row_start[g]) * X.width[g];
        uint32_t codes[FPL];
        load_codes<B, FPL>(row, f0, p.F, X.bits[g], w0[g], s0[g], codes);
#pragma unroll
        for (int k = 0; k < FPL; ++k) {
          if constexpr (CODES) iacc[k] += static_cast<int32_t>(codes[k]);
          else acc[k] = fmaf(a, static_cast<float>(codes[k]), acc[k]);
        }
        if constexpr (!CODES) {
          asum += a;
          if (p.src_zero) zsum = fmaf(a, __ldg(p.src_zero + j), zsum);
        }
      }
    }
    if constexpr (CODES) {
#pragma unroll
      for (int k = 0; k < FPL; ++k)
        if (f0 + k < p.F) p.out_codes[i * p.F + f0 + k] = iacc[k];
      continue;
    } else {
      const float d = p.dst_scale ? p.dst_scale[i] : 1.0f;
      float v[FPL];
#pragma unroll
      for (int k = 0; k < FPL; ++k) {
        const int64_t f = f0 + k;
        float x = acc[k] - zsum;
        if (f < p.F) {
          if (p.col_zero) x -= static_cast<float>(p.col_zero[f]) * asum;
          x *= d;
          if (p.col_scale) x *= p.col_scale[f];
          if (p.bias) x += p.bias[f];
          if (p.relu) x = fmaxf(x, 0.0f);
        }
        v[k] = x;
      }
      if (p.pack_out) {
        store_packed<FPL>(p.packed_out, i, f0, p.F, v);
      } else {
#pragma unroll
        for (int k = 0; k < FPL; ++k)
          if (f0 + k < p.F) p.out[i * p.F + f0 + k] = v[k];
      }
    }
  }
}

// FP32 rows: lane owns features tile + k * 32 + lane (coalesced 128-byte loads).
template <int FPL>
__global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)
spmm_f32_kernel(const SpmmF32Params p) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t base = static_cast<int64_t>(blockIdx.y) * 32 * FPL + lane;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * WARPS_PER_BLOCK + warp; i < p.num_rows;
       i += static_cast<int64_t>(gridDim.x) * WARPS_PER_BLOCK) {
    float acc[FPL];
#pragma unroll
    for (int k = 0; k < FPL; ++k) acc[k] = 0.0f;
    const int64_t beg = p.rowptr[i], end = p.rowptr[i + 1];
    for (int64_t e0 = beg; e0 < end; e0 += 32) {
      const int64_t e = e0 + lane;
      const int32_t jl = e < end ? __ldg(p.col + e) : 0;
      const float al = (e < end && p.src_scale) ? __ldg(p.src_scale + jl) : 1.0f;
      const int n = static_cast<int>(end - e0 < 32 ? end - e0 : 32);
#pragma unroll 4
      for (int t = 0; t < n; ++t) {
        const int64_t j = __shfl_sync(FULL_MASK, jl, t);
        const float a = __shfl_sync(FULL_MASK, al, t);
        const float* xj = p.x + j * p.F;
#pragma unroll
        for (int k = 0; k < FPL; ++k) {
          const int64_t f = base + k * 32;
          if (f < p.F) acc[k] = fmaf(a, __ldg(xj + f), acc[k]);
        }
      }
    }
    const float d = p.dst_scale ? p.dst_scale[i] : 1.0f;
#pragma unroll
    for (int k = 0; k < FPL; ++k) {
      const int64_t f = base + k * 32;
      if (f < p.F) {
        float v = acc[k] * d;
        if (p.bias) v += p.bias[f];
        if (p.relu) v = fmaxf(v, 0.0f);
        p.out[i * p.F + f] = v;
      }
    }
  }
}

// -- dense transform: 32 x 32 output tiles, 256 threads (2 x 2 outputs each), K in steps of
// 64 codes unpacked to uint8 (16 words of 4 codes) in shared memory, __dp4a products.
constexpr int TILE = 32;
constexpr int KSTEP = 64;
constexpr int KWORDS = KSTEP / 4;

__device__ __forceinline__ uint32_t code_at(const uint32_t* row, int b, int64_t f) {
  const int P = 32 / b;
  return (__ldg(row + f / P) >> ((f % P) * b)) & ((1u << b) - 1u);
}

// Four codes f .. f + 3 of a packed row as uint8 lanes of one word (0 beyond K).
__device__ __forceinline__ uint32_t four_codes(const uint32_t* row, int b, int64_t f,
                                               int64_t K) {
  uint32_t out = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (f + k < K) out |= code_at(row, b, f + k) << (8 * k);
  return out;
}

__global__ void __launch_bounds__(256) linear_kernel(const LinearParams p) {
  __shared__ uint32_t xs[TILE][KWORDS + 1];
  __shared__ uint32_t ws[TILE][KWORDS + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  // Rows on x: gridDim.y stops at 65535 tiles (2.1 M rows), gridDim.x at 2^31 - 1.
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * TILE;  // grouped input rows
  const int64_t out0 = static_cast<int64_t>(blockIdx.y) * TILE;  // output channels
  const int w_per = 32 / p.w_bits;
  const int64_t w_width = (p.K + w_per - 1) / w_per;
  uint32_t acc[2][2] = {{0u, 0u}, {0u, 0u}};
  uint32_t rs[2] = {0u, 0u};
  for (int64_t k0 = 0; k0 < p.K; k0 += KSTEP) {
    for (int idx = threadIdx.x; idx < TILE * KWORDS; idx += blockDim.x) {
      const int r = idx / KWORDS, kw = idx % KWORDS;
      const int64_t f = k0 + 4 * kw;
      const int64_t prow = row0 + r;
      uint32_t xv = 0;
      if (prow < p.rows) {
        const int g = find_group(p.x, prow);
        const uint32_t* xr = p.x.words + p.x.word_start[g] +
                             (prow - p.x.row_start[g]) * p.x.width[g];
        xv = four_codes(xr, p.x.bits[g], f, p.K);
      }
      xs[r][kw] = xv;
      const int64_t o = out0 + r;
      ws[r][kw] = o < p.O ? four_codes(p.w_words + o * w_width, p.w_bits, f, p.K) : 0u;
    }
    __syncthreads();
#pragma unroll
    for (int kw = 0; kw < KWORDS; ++kw) {
#pragma unroll
      for (int ii = 0; ii < 2; ++ii) {
        const uint32_t xv = xs[ty * 2 + ii][kw];
        rs[ii] = __dp4a(xv, 0x01010101u, rs[ii]);
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) acc[ii][jj] = __dp4a(xv, ws[tx * 2 + jj][kw], acc[ii][jj]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int ii = 0; ii < 2; ++ii) {
    const int64_t prow = row0 + ty * 2 + ii;
    if (prow >= p.rows) continue;
    const int64_t r = p.order ? p.order[prow] : prow;
    const float sx = p.x_scale ? p.x_scale[r] : 1.0f;
    const double zx = p.x_zero ? static_cast<double>(p.x_zero[r]) : 0.0;
    float v[2];
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const int64_t o = out0 + tx * 2 + jj;
      v[jj] = 0.0f;
      if (o >= p.O) continue;
      if (p.out_codes) {
        p.out_codes[r * p.O + o] = static_cast<int32_t>(acc[ii][jj]);
        continue;
      }
      const double zw = p.w_zero ? static_cast<double>(p.w_zero[o]) : 0.0;
      const double corrected = static_cast<double>(acc[ii][jj]) - zw * rs[ii] -
                               zx * static_cast<double>(p.w_colsum[o]) +
                               static_cast<double>(p.K) * zx * zw;
      float x = static_cast<float>(corrected) * sx;
      if (p.w_scale) x *= p.w_scale[o];
      if (p.bias) x += p.bias[o];
      if (p.relu) x = fmaxf(x, 0.0f);
      v[jj] = x;
      if (!p.pack_out) p.out[r * p.O + o] = x;
    }
    if (p.pack_out && !p.out_codes) {
      // Two consecutive output channels of row r: quantize and OR into the packed words.
      store_packed<2>(p.packed_out, r, out0 + tx * 2, p.O, v);
    }
  }
}

// One thread per packed output word: P codes of original row order[p].
__global__ void quantize_pack_kernel(const float* __restrict__ x, int64_t rows, int64_t F,
                                     const PackTarget t, const int64_t* __restrict__ order,
                                     int64_t total_words) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       idx < total_words; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int g = 0;
#pragma unroll
    for (int k = 1; k < MAX_GROUPS; ++k)
      if (k < t.groups && idx >= t.word_start[k]) g = k;
    const int64_t local = idx - t.word_start[g];
    const int64_t pgrp = t.row_start[g] + local / t.width[g];
    const int64_t w = local % t.width[g];
    const int64_t r = order ? order[pgrp] : pgrp;
    const int b = t.bits[g];
    const int P = 32 / b;
    uint32_t word = 0;
    for (int k = 0; k < P; ++k) {
      const int64_t f = w * P + k;
      if (f >= F) break;
      const int64_t grp = t.axis == 0 ? r : f;
      word |= quantize_one(x[r * F + f], t.scale[grp], t.zero[grp], t.umin[grp], t.umax[grp],
                           t.rounding) << (k * b);
    }
    t.words[idx] = word;
  }
}

int features_per_lane(int64_t F) {
  int fpl = 1;
  while (fpl < 8 && 32 * fpl < F) fpl *= 2;
  return fpl;
}

unsigned grid_rows(int64_t rows) {
  const int64_t blocks = (rows + WARPS_PER_BLOCK - 1) / WARPS_PER_BLOCK;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 16 ? 65535 * 16 : blocks));
}

template <int B, bool CODES>
cudaError_t launch_spmm_b(const SpmmParams& p, int fpl, dim3 grid, cudaStream_t s) {
  const dim3 block(WARPS_PER_BLOCK * 32);
  switch (fpl) {
    case 1: spmm_kernel<B, 1, CODES><<<grid, block, 0, s>>>(p); break;
    case 2: spmm_kernel<B, 2, CODES><<<grid, block, 0, s>>>(p); break;
    case 4: spmm_kernel<B, 4, CODES><<<grid, block, 0, s>>>(p); break;
    default: spmm_kernel<B, 8, CODES><<<grid, block, 0, s>>>(p); break;
  }
  return cudaGetLastError();
}

template <bool CODES>
cudaError_t launch_spmm(const SpmmParams& p, int fpl, dim3 grid, cudaStream_t s) {
  const int b = p.x.groups == 1 ? p.x.bits[0] : 0;
  switch (b) {
    case 1: return launch_spmm_b<1, CODES>(p, fpl, grid, s);
    case 2: return launch_spmm_b<2, CODES>(p, fpl, grid, s);
    case 4: return launch_spmm_b<4, CODES>(p, fpl, grid, s);
    case 8: return launch_spmm_b<8, CODES>(p, fpl, grid, s);
    default: return launch_spmm_b<0, CODES>(p, fpl, grid, s);
  }
}

int64_t target_words(const PackTarget& t) {
  int64_t total = 0;
  for (int g = 0; g < t.groups; ++g) {
    const int64_t end = t.word_start[g] + (t.row_start[g + 1] - t.row_start[g]) * t.width[g];
    total = end > total ? end : total;
  }
  return total;
}

}  // namespace

cudaError_t spmm(const SpmmParams& p, cudaStream_t stream) {
  if (p.num_rows == 0 || p.F == 0) return cudaSuccess;
  if (p.pack_out) {  // codes are OR-ed into the words
    const cudaError_t err = cudaMemsetAsync(p.packed_out.words, 0,
                                            static_cast<size_t>(target_words(p.packed_out)) * 4,
                                            stream);
    if (err != cudaSuccess) return err;
  }
  const int fpl = features_per_lane(p.F);
  const unsigned tiles = static_cast<unsigned>((p.F + 32 * fpl - 1) / (32 * fpl));
  const dim3 grid(grid_rows(p.num_rows), tiles);
  return p.out_codes ? launch_spmm<true>(p, fpl, grid, stream)
                     : launch_spmm<false>(p, fpl, grid, stream);
}

cudaError_t spmm_f32(const SpmmF32Params& p, cudaStream_t stream) {
  if (p.num_rows == 0 || p.F == 0) return cudaSuccess;
  const int fpl = features_per_lane(p.F);
  const unsigned tiles = static_cast<unsigned>((p.F + 32 * fpl - 1) / (32 * fpl));
  const dim3 grid(grid_rows(p.num_rows), tiles), block(WARPS_PER_BLOCK * 32);
  switch (fpl) {
    case 1: spmm_f32_kernel<1><<<grid, block, 0, stream>>>(p); break;
    case 2: spmm_f32_kernel<2><<<grid, block, 0, stream>>>(p); break;
    case 4: spmm_f32_kernel<4><<<grid, block, 0, stream>>>(p); break;
    default: spmm_f32_kernel<8><<<grid, block, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

cudaError_t linear(const LinearParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.O == 0) return cudaSuccess;
  if (p.K > (1ll << 31) / (255 * 255)) return cudaErrorInvalidValue;  // int32 sums would wrap
  if (p.pack_out) {
    const cudaError_t err = cudaMemsetAsync(p.packed_out.words, 0,
                                            static_cast<size_t>(target_words(p.packed_out)) * 4,
                                            stream);
    if (err != cudaSuccess) return err;
  }
  if ((p.O + TILE - 1) / TILE > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((p.rows + TILE - 1) / TILE),
                  static_cast<unsigned>((p.O + TILE - 1) / TILE));
  linear_kernel<<<grid, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t quantize_pack(const QuantizeParams& p, cudaStream_t stream) {
  const int64_t total = target_words(p.target);
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks64 = (total + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(blocks64 > (1 << 20) ? (1 << 20) : blocks64);
  quantize_pack_kernel<<<blocks, threads, 0, stream>>>(p.x, p.rows, p.F, p.target,
                                                       p.target.order, total);
  return cudaGetLastError();
}

}  // namespace gnnq_cuda
