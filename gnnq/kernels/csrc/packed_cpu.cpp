// gnnq packed INT1..INT8 inference kernels for the CPU (PyTorch C++ extension, OpenMP).
//
// Built on first use by gnnq/kernels/cpu.py through torch.utils.cpp_extension.load with
// -O3 -fopenmp and no -march flag: the kernel bodies (packed_cpu_kernels.h) are compiled twice
// (packed_cpu_{base,avx2}.cpp: the portable build and, on x86-64 with GCC, AVX2+FMA), and the
// AVX2 one is chosen at run time where the CPU has it (so a build cache shared between
// machines stays correct). An AVX-512 build was measured too and dropped: on the Zen 5 test
// machine its packed kernels were no faster (slower when cache-resident, where 16-lane
// vectors need a cross-lane permute per word) and it cost a third of the build time. The arithmetic is the one defined by gnnq/kernels/reference.py.
//
// Parallelism: OpenMP over destination rows in chunks with dynamic scheduling (a node with
// 10^5 in-edges is one row; the other threads take the remaining chunks meanwhile). The
// thread count is PyTorch's (torch.set_num_threads): this library shares PyTorch's libgomp.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <omp.h>

#include "packed_bind.h"
#include "packed_cpu.h"

using gnnq_cpu::LinearArgs;
using gnnq_cpu::PackedView;
using gnnq_cpu::QuantArgs;
using gnnq_cpu::SpmmArgs;
using gnnq_cpu::MAX_GROUPS;

namespace {

enum class Isa { base, avx2 };

Isa detect_isa() {
#ifdef GNNQ_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::base;
}

Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

Isa& isa_override() {
  static Isa isa = active_isa();
  return isa;
}

#ifdef GNNQ_MULTI_ISA
#define GNNQ_DISPATCH(fn, ...)                                         \
  do {                                                                  \
    switch (isa_override()) {                                           \
      case Isa::avx2: isa_avx2::fn(__VA_ARGS__); break;                 \
      default: isa_base::fn(__VA_ARGS__); break;                        \
    }                                                                   \
  } while (0)
#else
#define GNNQ_DISPATCH(fn, ...) isa_base::fn(__VA_ARGS__)
#endif

const gnnq_bind::Checker kCheck{"gnnq packed kernel", /*cuda=*/false};

void check(bool ok, const std::string& what) { kCheck(ok, what); }

void check_tensor(const torch::Tensor& t, torch::ScalarType dtype, const char* name) {
  kCheck.tensor(t, dtype, name);
}

template <typename T>
const T* optional_ptr(const c10::optional<torch::Tensor>& t, torch::ScalarType dtype,
                      const char* name, int64_t numel) {
  return kCheck.optional_ptr<T>(t, dtype, name, numel);
}

// The packed tensor: flat int32 words + per-group bits / row starts / word starts.
PackedView make_view(const torch::Tensor& words, const torch::Tensor& bits,
                     const torch::Tensor& row_start, const torch::Tensor& word_start,
                     int64_t F, int64_t* fpad) {
  check_tensor(words, torch::kInt32, "words");
  PackedView v;
  v.words = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  const int64_t pad = kCheck.layout(v, bits, row_start, word_start, F, words.numel(), MAX_GROUPS);
  if (fpad) *fpad = pad;
  return v;
}

int64_t chunk_rows(int64_t rows) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(256, rows / (threads * 64)));
}

// Cheap checks here; column indices are checked inside the edge loops (see SpmmArgs).
void check_graph(const torch::Tensor& rowptr, const torch::Tensor& col, SpmmArgs& S,
                 int64_t src_rows, int* bad_index) {
  check_tensor(rowptr, torch::kInt64, "rowptr");
  check_tensor(col, torch::kInt32, "col");
  check(rowptr.numel() >= 1, "rowptr needs num_rows + 1 entries");
  check(rowptr.data_ptr<int64_t>()[0] == 0 &&
            rowptr.data_ptr<int64_t>()[rowptr.numel() - 1] == col.numel(),
        "rowptr must start at 0 and end at the number of column indices");
  S.rowptr = rowptr.data_ptr<int64_t>();
  S.col = col.data_ptr<int32_t>();
  S.nnz = col.numel();
  S.src_rows = src_rows;
  S.bad_index = bad_index;
}

void check_indices(int bad_index) {
  check(bad_index == 0, "column indices must lie in 0 .. rows of the gathered tensor - 1");
}

torch::Tensor spmm_impl(const torch::Tensor& rowptr, const torch::Tensor& col,
                        const torch::Tensor& words, const torch::Tensor& bits,
                        const torch::Tensor& row_start, const torch::Tensor& word_start,
                        int64_t F, const c10::optional<torch::Tensor>& src_scale,
                        const c10::optional<torch::Tensor>& dst_scale,
                        const c10::optional<torch::Tensor>& src_zero,
                        const c10::optional<torch::Tensor>& col_scale,
                        const c10::optional<torch::Tensor>& col_zero,
                        const c10::optional<torch::Tensor>& bias, bool relu, bool codes_only) {
  SpmmArgs S;
  S.x = make_view(words, bits, row_start, word_start, F, &S.fpad);
  const int64_t src_rows = S.x.row_start[S.x.groups];
  const int64_t N = rowptr.numel() - 1;
  int bad_index = 0;
  check_graph(rowptr, col, S, src_rows, &bad_index);
  S.F = F;
  S.src_scale = optional_ptr<float>(src_scale, torch::kFloat32, "src_scale", src_rows);
  S.dst_scale = optional_ptr<float>(dst_scale, torch::kFloat32, "dst_scale", N);
  S.src_zero = optional_ptr<float>(src_zero, torch::kFloat32, "src_zero", src_rows);
  S.col_scale = optional_ptr<float>(col_scale, torch::kFloat32, "col_scale", F);
  S.col_zero = optional_ptr<int32_t>(col_zero, torch::kInt32, "col_zero", F);
  S.bias = optional_ptr<float>(bias, torch::kFloat32, "bias", F);
  S.relu = relu;
  torch::Tensor out = torch::empty({N, F}, codes_only ? torch::kInt32 : torch::kFloat32);
  if (codes_only) S.out_int = out.data_ptr<int32_t>(); else S.out = out.data_ptr<float>();
  const int64_t chunk = chunk_rows(N);
  const int64_t chunks = (N + chunk - 1) / chunk;
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch(codes_only ? 0 : 2 * S.fpad + 16);
    std::vector<int32_t> scratch_int(codes_only ? S.fpad + 16 : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = c * chunk, r1 = std::min(N, r0 + chunk);
      if (codes_only) {
        GNNQ_DISPATCH(spmm_codes_rows, S, r0, r1, scratch_int.data());
      } else {
        GNNQ_DISPATCH(spmm_rows, S, r0, r1, scratch.data());
      }
    }
  }
  check_indices(bad_index);
  return out;
}

torch::Tensor spmm(const torch::Tensor& rowptr, const torch::Tensor& col,
                   const torch::Tensor& words, const torch::Tensor& bits,
                   const torch::Tensor& row_start, const torch::Tensor& word_start, int64_t F,
                   const c10::optional<torch::Tensor>& src_scale,
                   const c10::optional<torch::Tensor>& dst_scale,
                   const c10::optional<torch::Tensor>& src_zero,
                   const c10::optional<torch::Tensor>& col_scale,
                   const c10::optional<torch::Tensor>& col_zero,
                   const c10::optional<torch::Tensor>& bias, bool relu) {
  return spmm_impl(rowptr, col, words, bits, row_start, word_start, F, src_scale, dst_scale,
                   src_zero, col_scale, col_zero, bias, relu, false);
}

torch::Tensor spmm_codes(const torch::Tensor& rowptr, const torch::Tensor& col,
                         const torch::Tensor& words, const torch::Tensor& bits,
                         const torch::Tensor& row_start, const torch::Tensor& word_start,
                         int64_t F) {
  const c10::optional<torch::Tensor> none;
  return spmm_impl(rowptr, col, words, bits, row_start, word_start, F, none, none, none, none,
                   none, none, false, true);
}

torch::Tensor spmm_f32(const torch::Tensor& rowptr, const torch::Tensor& col,
                       const torch::Tensor& x, const c10::optional<torch::Tensor>& src_scale,
                       const c10::optional<torch::Tensor>& dst_scale,
                       const c10::optional<torch::Tensor>& bias, bool relu) {
  check_tensor(x, torch::kFloat32, "x");
  check(x.dim() == 2, "x must be 2-D");
  const int64_t N = rowptr.numel() - 1, F = x.size(1);
  SpmmArgs S;
  int bad_index = 0;
  check_graph(rowptr, col, S, x.size(0), &bad_index);
  S.F = F;
  S.fpad = F;
  S.src_scale = optional_ptr<float>(src_scale, torch::kFloat32, "src_scale", x.size(0));
  S.dst_scale = optional_ptr<float>(dst_scale, torch::kFloat32, "dst_scale", N);
  S.bias = optional_ptr<float>(bias, torch::kFloat32, "bias", F);
  S.relu = relu;
  torch::Tensor out = torch::empty({N, F}, torch::kFloat32);
  S.out = out.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t chunk = chunk_rows(N);
  const int64_t chunks = (N + chunk - 1) / chunk;
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch(2 * F + 16);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = c * chunk, r1 = std::min(N, r0 + chunk);
      GNNQ_DISPATCH(spmm_f32_rows, S, xp, r0, r1, scratch.data());
    }
  }
  check_indices(bad_index);
  return out;
}

// Packed X [R, K] (groups, grouped numbering; `order` maps grouped row -> output row) times
// packed W [O, K] (uniform bits, codes along K): float output [R, O] or raw int32 sums.
torch::Tensor linear_impl(const torch::Tensor& words, const torch::Tensor& bits,
                          const torch::Tensor& row_start, const torch::Tensor& word_start,
                          const c10::optional<torch::Tensor>& order, int64_t K,
                          const torch::Tensor& w_words, int64_t w_bits,
                          const c10::optional<torch::Tensor>& x_scale,
                          const c10::optional<torch::Tensor>& x_zero,
                          const c10::optional<torch::Tensor>& w_scale,
                          const c10::optional<torch::Tensor>& w_zero,
                          const c10::optional<torch::Tensor>& bias, bool relu, bool codes_only) {
  LinearArgs L;
  int64_t fpad = 0;
  L.x = make_view(words, bits, row_start, word_start, K, &fpad);
  const int64_t R = L.x.row_start[L.x.groups];
  check_tensor(w_words, torch::kInt32, "w_words");
  check(w_words.dim() == 2, "w_words must be [out_features, words per row]");
  check(w_bits >= 1 && w_bits <= 8, "weight bits must lie in 1..8");
  const int64_t O = w_words.size(0);
  const int WP = static_cast<int>(32 / w_bits);
  const int64_t WW = (K + WP - 1) / WP;
  check(w_words.size(1) == WW, "w_words has the wrong number of words per row");
  L.order = optional_ptr<int64_t>(order, torch::kInt64, "order", R);
  L.in_features = K;
  L.out_features = O;
  L.kpad = ((std::max<int64_t>(fpad, WW * WP) + 31) / 32) * 32;
  // Decode the weights once per call: int16 [O, kpad], and their column sums.
  std::vector<int16_t> wdec(static_cast<size_t>(O * L.kpad), 0);
  std::vector<int64_t> wsum(static_cast<size_t>(O), 0);
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(w_words.data_ptr<int32_t>());
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t f = 0; f < K; ++f) {
      const uint32_t word = wp[o * WW + f / WP];
      const int16_t code = static_cast<int16_t>((word >> ((f % WP) * w_bits)) &
                                                ((1u << w_bits) - 1u));
      wdec[o * L.kpad + f] = code;
      wsum[o] += code;
    }
  }
  L.w = wdec.data();
  L.w_colsum = wsum.data();
  L.x_scale = optional_ptr<float>(x_scale, torch::kFloat32, "x_scale", R);
  L.x_zero = optional_ptr<int32_t>(x_zero, torch::kInt32, "x_zero", R);
  L.w_scale = optional_ptr<float>(w_scale, torch::kFloat32, "w_scale", O);
  L.w_zero = optional_ptr<int32_t>(w_zero, torch::kInt32, "w_zero", O);
  L.bias = optional_ptr<float>(bias, torch::kFloat32, "bias", O);
  L.relu = relu;
  torch::Tensor out = torch::empty({R, O}, codes_only ? torch::kInt32 : torch::kFloat32);
  if (codes_only) L.out_int = out.data_ptr<int32_t>(); else L.out = out.data_ptr<float>();
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(64, R / (at::get_num_threads() * 16)));
  const int64_t chunks = (R + chunk - 1) / chunk;
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads)
  {
    std::vector<int16_t> xrow(static_cast<size_t>(L.kpad) + 64, 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t p0 = c * chunk, p1 = std::min(R, p0 + chunk);
      GNNQ_DISPATCH(linear_rows, L, p0, p1, xrow.data());
    }
  }
  return out;
}

torch::Tensor linear(const torch::Tensor& words, const torch::Tensor& bits,
                     const torch::Tensor& row_start, const torch::Tensor& word_start,
                     const c10::optional<torch::Tensor>& order, int64_t K,
                     const torch::Tensor& w_words, int64_t w_bits,
                     const c10::optional<torch::Tensor>& x_scale,
                     const c10::optional<torch::Tensor>& x_zero,
                     const c10::optional<torch::Tensor>& w_scale,
                     const c10::optional<torch::Tensor>& w_zero,
                     const c10::optional<torch::Tensor>& bias, bool relu) {
  return linear_impl(words, bits, row_start, word_start, order, K, w_words, w_bits, x_scale,
                     x_zero, w_scale, w_zero, bias, relu, false);
}

torch::Tensor linear_codes(const torch::Tensor& words, const torch::Tensor& bits,
                           const torch::Tensor& row_start, const torch::Tensor& word_start,
                           const c10::optional<torch::Tensor>& order, int64_t K,
                           const torch::Tensor& w_words, int64_t w_bits) {
  const c10::optional<torch::Tensor> none;
  return linear_impl(words, bits, row_start, word_start, order, K, w_words, w_bits, none, none,
                     none, none, none, false, true);
}

// Quantize x [R, F] on a grid (per row: axis 0, per column: axis 1) and pack it into the
// layout given by bits / row_start / word_start / order; returns the flat words.
torch::Tensor quantize_pack(const torch::Tensor& x, const torch::Tensor& bits,
                            const torch::Tensor& row_start, const torch::Tensor& word_start,
                            const c10::optional<torch::Tensor>& order, int64_t total_words,
                            int64_t axis, const torch::Tensor& scale, const torch::Tensor& zero,
                            const torch::Tensor& umin, const torch::Tensor& umax,
                            int64_t rounding) {
  check_tensor(x, torch::kFloat32, "x");
  check(x.dim() == 2, "x must be 2-D");
  const int64_t R = x.size(0), F = x.size(1);
  torch::Tensor words = torch::zeros({total_words}, torch::kInt32);
  QuantArgs Q;
  Q.x = make_view(words, bits, row_start, word_start, F, nullptr);
  check(Q.x.row_start[Q.x.groups] == R, "the groups must cover every row of x");
  check(axis == 0 || axis == 1, "axis must be 0 (rows) or 1 (columns)");
  const int64_t G = axis == 0 ? R : F;
  Q.order = optional_ptr<int64_t>(order, torch::kInt64, "order", R);
  Q.x_in = x.data_ptr<float>();
  Q.F = F;
  Q.axis = static_cast<int>(axis);
  Q.rounding = static_cast<int>(rounding);
  Q.scale = optional_ptr<float>(scale, torch::kFloat32, "scale", G);
  Q.zero = optional_ptr<int32_t>(zero, torch::kInt32, "zero", G);
  Q.umin = optional_ptr<int32_t>(umin, torch::kInt32, "umin", G);
  Q.umax = optional_ptr<int32_t>(umax, torch::kInt32, "umax", G);
  Q.words_out = reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>());
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(256, R / (at::get_num_threads() * 16)));
  const int64_t chunks = (R + chunk - 1) / chunk;
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t p0 = c * chunk, p1 = std::min(R, p0 + chunk);
    GNNQ_DISPATCH(quantize_rows, Q, p0, p1);
  }
  return words;
}

std::string isa_name() {
  return isa_override() == Isa::avx2 ? "avx2" : "baseline";
}

// For tests: run every instruction set this CPU supports ("baseline", "avx2").
void set_isa(const std::string& name) {
  const Isa best = active_isa();
  Isa want = Isa::base;
  if (name == "avx2") want = Isa::avx2;
  else check(name == "baseline", "isa must be baseline or avx2");
  check(static_cast<int>(want) <= static_cast<int>(best),
        "this CPU does not support the " + name + " kernels");
  isa_override() = want;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gnnq packed INT1..INT8 CPU kernels";
  m.def("spmm", &spmm, "packed CSR SpMM, float32 output");
  m.def("spmm_codes", &spmm_codes, "packed CSR SpMM, exact int32 sums of the stored codes");
  m.def("spmm_f32", &spmm_f32, "FP32 CSR SpMM of the same design");
  m.def("linear", &linear, "packed dense transform, float32 output");
  m.def("linear_codes", &linear_codes, "packed dense transform, raw int32 sums");
  m.def("quantize_pack", &quantize_pack, "quantize on a grid and pack");
  m.def("isa", &isa_name, "instruction set in use");
  m.def("set_isa", &set_isa, "choose the instruction set (tests)");
}
