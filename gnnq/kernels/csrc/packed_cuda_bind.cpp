// PyTorch binding of the CUDA kernels in packed_cuda.cu (built by gnnq/kernels/cuda.py only
// where a CUDA build of PyTorch and nvcc are present). Tensors arrive as in the CPU extension
// (packed_cpu.cpp): flat int32 words plus per-group bits / row starts / word starts.

#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>

#include "packed_bind.h"
#include "packed_cuda.h"

namespace {

using gnnq_cuda::MAX_GROUPS;

const gnnq_bind::Checker kCheck{"gnnq CUDA kernel", /*cuda=*/true};

void check(bool ok, const std::string& what) { kCheck(ok, what); }

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "gnnq CUDA kernel ", what, " failed: ",
              cudaGetErrorString(err));
}

void check_tensor(const torch::Tensor& t, torch::ScalarType dtype, const char* name) {
  kCheck.tensor(t, dtype, name);
}

template <typename T>
const T* optional_ptr(const c10::optional<torch::Tensor>& t, torch::ScalarType dtype,
                      const char* name, int64_t numel) {
  return kCheck.optional_ptr<T>(t, dtype, name, numel);
}

template <typename P>
void fill_layout(P& v, const torch::Tensor& bits, const torch::Tensor& row_start,
                 const torch::Tensor& word_start, int64_t F, int64_t words) {
  kCheck.layout(v, bits, row_start, word_start, F, words, MAX_GROUPS);
}

gnnq_cuda::Packed packed_view(const torch::Tensor& words, const torch::Tensor& bits,
                              const torch::Tensor& row_start, const torch::Tensor& word_start,
                              int64_t F) {
  check_tensor(words, torch::kInt32, "words");
  gnnq_cuda::Packed v;
  v.words = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  fill_layout(v, bits, row_start, word_start, F, words.numel());
  return v;
}

// The packed output of a fused epilogue: layout tensors (CPU) + grid tensors (device).
gnnq_cuda::PackTarget make_target(torch::Tensor& words, const torch::Tensor& bits,
                                  const torch::Tensor& row_start, const torch::Tensor& word_start,
                                  const c10::optional<torch::Tensor>& position, int64_t rows,
                                  int64_t F, int64_t axis, const torch::Tensor& scale,
                                  const torch::Tensor& zero, const torch::Tensor& umin,
                                  const torch::Tensor& umax, int64_t rounding) {
  gnnq_cuda::PackTarget t;
  t.words = reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>());
  fill_layout(t, bits, row_start, word_start, F, words.numel());
  check(t.row_start[t.groups] == rows, "the target groups must cover every output row");
  check(axis == 0 || axis == 1, "axis must be 0 (rows) or 1 (columns)");
  const int64_t G = axis == 0 ? rows : F;
  t.position = optional_ptr<int64_t>(position, torch::kInt64, "position", rows);
  t.axis = static_cast<int>(axis);
  t.rounding = static_cast<int>(rounding);
  t.scale = optional_ptr<float>(scale, torch::kFloat32, "scale", G);
  t.zero = optional_ptr<int32_t>(zero, torch::kInt32, "zero", G);
  t.umin = optional_ptr<int32_t>(umin, torch::kInt32, "umin", G);
  t.umax = optional_ptr<int32_t>(umax, torch::kInt32, "umax", G);
  return t;
}

// The SpMM launch parameters of a packed source (outputs left unset).
gnnq_cuda::SpmmParams spmm_params(const torch::Tensor& rowptr, const torch::Tensor& col,
                                  const torch::Tensor& words, const torch::Tensor& bits,
                                  const torch::Tensor& row_start, const torch::Tensor& word_start,
                                  int64_t F, const c10::optional<torch::Tensor>& src_scale,
                                  const c10::optional<torch::Tensor>& dst_scale,
                                  const c10::optional<torch::Tensor>& src_zero,
                                  const c10::optional<torch::Tensor>& col_scale,
                                  const c10::optional<torch::Tensor>& col_zero,
                                  const c10::optional<torch::Tensor>& bias, bool relu) {
  check_tensor(rowptr, torch::kInt64, "rowptr");
  check_tensor(col, torch::kInt32, "col");
  gnnq_cuda::SpmmParams p;
  p.x = packed_view(words, bits, row_start, word_start, F);
  const int64_t src_rows = p.x.row_start[p.x.groups];
  p.rowptr = rowptr.data_ptr<int64_t>();
  p.col = col.data_ptr<int32_t>();
  p.num_rows = rowptr.numel() - 1;
  p.F = F;
  p.src_scale = optional_ptr<float>(src_scale, torch::kFloat32, "src_scale", src_rows);
  p.dst_scale = optional_ptr<float>(dst_scale, torch::kFloat32, "dst_scale", p.num_rows);
  p.src_zero = optional_ptr<float>(src_zero, torch::kFloat32, "src_zero", src_rows);
  p.col_scale = optional_ptr<float>(col_scale, torch::kFloat32, "col_scale", F);
  p.col_zero = optional_ptr<int32_t>(col_zero, torch::kInt32, "col_zero", F);
  p.bias = optional_ptr<float>(bias, torch::kFloat32, "bias", F);
  p.relu = relu;
  return p;
}

torch::Tensor spmm_impl(const torch::Tensor& rowptr, const torch::Tensor& col,
                        const torch::Tensor& words, const torch::Tensor& bits,
                        const torch::Tensor& row_start, const torch::Tensor& word_start,
                        int64_t F, const c10::optional<torch::Tensor>& src_scale,
                        const c10::optional<torch::Tensor>& dst_scale,
                        const c10::optional<torch::Tensor>& src_zero,
                        const c10::optional<torch::Tensor>& col_scale,
                        const c10::optional<torch::Tensor>& col_zero,
                        const c10::optional<torch::Tensor>& bias, bool relu, bool codes) {
  const c10::cuda::CUDAGuard guard(words.device());
  gnnq_cuda::SpmmParams p = spmm_params(rowptr, col, words, bits, row_start, word_start, F,
                                        src_scale, dst_scale, src_zero, col_scale, col_zero,
                                        bias, relu);
  auto options = words.options().dtype(codes ? torch::kInt32 : torch::kFloat32);
  torch::Tensor out = torch::empty({p.num_rows, F}, options);
  if (codes) p.out_codes = out.data_ptr<int32_t>(); else p.out = out.data_ptr<float>();
  check_cuda(gnnq_cuda::spmm(p, c10::cuda::getCurrentCUDAStream()), "spmm");
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
  check_tensor(rowptr, torch::kInt64, "rowptr");
  check_tensor(col, torch::kInt32, "col");
  check_tensor(x, torch::kFloat32, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  gnnq_cuda::SpmmF32Params p;
  p.rowptr = rowptr.data_ptr<int64_t>();
  p.col = col.data_ptr<int32_t>();
  p.x = x.data_ptr<float>();
  p.num_rows = rowptr.numel() - 1;
  p.F = x.size(1);
  p.src_scale = optional_ptr<float>(src_scale, torch::kFloat32, "src_scale", x.size(0));
  p.dst_scale = optional_ptr<float>(dst_scale, torch::kFloat32, "dst_scale", p.num_rows);
  p.bias = optional_ptr<float>(bias, torch::kFloat32, "bias", p.F);
  p.relu = relu;
  torch::Tensor out = torch::empty({p.num_rows, p.F}, x.options());
  p.out = out.data_ptr<float>();
  check_cuda(gnnq_cuda::spmm_f32(p, c10::cuda::getCurrentCUDAStream()), "spmm_f32");
  return out;
}

// The dense-transform launch parameters (outputs and bias left unset); `colsum` receives the
// weight codes' column sums (for zero points) and must outlive the launch.
gnnq_cuda::LinearParams linear_params(const torch::Tensor& words, const torch::Tensor& bits,
                                      const torch::Tensor& row_start,
                                      const torch::Tensor& word_start,
                                      const c10::optional<torch::Tensor>& order, int64_t K,
                                      const torch::Tensor& w_words, int64_t w_bits,
                                      const c10::optional<torch::Tensor>& x_scale,
                                      const c10::optional<torch::Tensor>& x_zero,
                                      const c10::optional<torch::Tensor>& w_scale,
                                      const c10::optional<torch::Tensor>& w_zero,
                                      torch::Tensor& colsum) {
  check_tensor(w_words, torch::kInt32, "w_words");
  check(w_bits >= 1 && w_bits <= 8, "weight bits must lie in 1..8");
  gnnq_cuda::LinearParams p;
  p.x = packed_view(words, bits, row_start, word_start, K);
  p.rows = p.x.row_start[p.x.groups];
  p.K = K;
  p.O = w_words.size(0);
  const int per = static_cast<int>(32 / w_bits);
  check(w_words.size(1) == (K + per - 1) / per, "w_words has the wrong number of words per row");
  p.w_words = reinterpret_cast<const uint32_t*>(w_words.data_ptr<int32_t>());
  p.w_bits = static_cast<int>(w_bits);
  auto shifts = torch::arange(per, w_words.options().dtype(torch::kInt64)) * w_bits;
  auto codes_w = (w_words.to(torch::kInt64).bitwise_and(0xffffffffLL).unsqueeze(-1)
                      .bitwise_right_shift(shifts))
                     .bitwise_and((1LL << w_bits) - 1)
                     .reshape({p.O, -1})
                     .narrow(1, 0, K);
  colsum = codes_w.sum(1).contiguous();
  p.w_colsum = colsum.data_ptr<int64_t>();
  p.order = optional_ptr<int64_t>(order, torch::kInt64, "order", p.rows);
  p.x_scale = optional_ptr<float>(x_scale, torch::kFloat32, "x_scale", p.rows);
  p.x_zero = optional_ptr<int32_t>(x_zero, torch::kInt32, "x_zero", p.rows);
  p.w_scale = optional_ptr<float>(w_scale, torch::kFloat32, "w_scale", p.O);
  p.w_zero = optional_ptr<int32_t>(w_zero, torch::kInt32, "w_zero", p.O);
  return p;
}

torch::Tensor linear_impl(const torch::Tensor& words, const torch::Tensor& bits,
                          const torch::Tensor& row_start, const torch::Tensor& word_start,
                          const c10::optional<torch::Tensor>& order, int64_t K,
                          const torch::Tensor& w_words, int64_t w_bits,
                          const c10::optional<torch::Tensor>& x_scale,
                          const c10::optional<torch::Tensor>& x_zero,
                          const c10::optional<torch::Tensor>& w_scale,
                          const c10::optional<torch::Tensor>& w_zero,
                          const c10::optional<torch::Tensor>& bias, bool relu, bool codes) {
  const c10::cuda::CUDAGuard guard(words.device());
  torch::Tensor colsum;
  gnnq_cuda::LinearParams p = linear_params(words, bits, row_start, word_start, order, K,
                                            w_words, w_bits, x_scale, x_zero, w_scale, w_zero,
                                            colsum);
  p.bias = optional_ptr<float>(bias, torch::kFloat32, "bias", p.O);
  p.relu = relu;
  auto options = words.options().dtype(codes ? torch::kInt32 : torch::kFloat32);
  torch::Tensor out = torch::empty({p.rows, p.O}, options);
  if (codes) p.out_codes = out.data_ptr<int32_t>(); else p.out = out.data_ptr<float>();
  check_cuda(gnnq_cuda::linear(p, c10::cuda::getCurrentCUDAStream()), "linear");
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

torch::Tensor quantize_pack(const torch::Tensor& x, const torch::Tensor& bits,
                            const torch::Tensor& row_start, const torch::Tensor& word_start,
                            const c10::optional<torch::Tensor>& order, int64_t total_words,
                            int64_t axis, const torch::Tensor& scale, const torch::Tensor& zero,
                            const torch::Tensor& umin, const torch::Tensor& umax,
                            int64_t rounding) {
  check_tensor(x, torch::kFloat32, "x");
  check(x.dim() == 2, "x must be 2-D");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t R = x.size(0), F = x.size(1);
  torch::Tensor words = torch::zeros({total_words}, x.options().dtype(torch::kInt32));
  gnnq_cuda::QuantizeParams p;
  p.x = x.data_ptr<float>();
  p.rows = R;
  p.F = F;
  p.target.words = reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>());
  fill_layout(p.target, bits, row_start, word_start, F, total_words);
  check(p.target.row_start[p.target.groups] == R, "the groups must cover every row of x");
  check(axis == 0 || axis == 1, "axis must be 0 (rows) or 1 (columns)");
  const int64_t G = axis == 0 ? R : F;
  p.target.order = optional_ptr<int64_t>(order, torch::kInt64, "order", R);
  p.target.axis = static_cast<int>(axis);
  p.target.rounding = static_cast<int>(rounding);
  p.target.scale = optional_ptr<float>(scale, torch::kFloat32, "scale", G);
  p.target.zero = optional_ptr<int32_t>(zero, torch::kInt32, "zero", G);
  p.target.umin = optional_ptr<int32_t>(umin, torch::kInt32, "umin", G);
  p.target.umax = optional_ptr<int32_t>(umax, torch::kInt32, "umax", G);
  check_cuda(gnnq_cuda::quantize_pack(p, c10::cuda::getCurrentCUDAStream()), "quantize_pack");
  return words;
}

// Fused GCN aggregation: aggregate, add bias, ReLU, then quantize every output row on the next
// layer's grid and pack it (target layout t_*, grid per row or column); returns the words.
torch::Tensor spmm_quantize_pack(
    const torch::Tensor& rowptr, const torch::Tensor& col, const torch::Tensor& words,
    const torch::Tensor& bits, const torch::Tensor& row_start, const torch::Tensor& word_start,
    int64_t F, const c10::optional<torch::Tensor>& src_scale,
    const c10::optional<torch::Tensor>& dst_scale, const c10::optional<torch::Tensor>& src_zero,
    const c10::optional<torch::Tensor>& col_scale, const c10::optional<torch::Tensor>& col_zero,
    const c10::optional<torch::Tensor>& bias, bool relu, const torch::Tensor& t_bits,
    const torch::Tensor& t_row_start, const torch::Tensor& t_word_start,
    const c10::optional<torch::Tensor>& t_position, int64_t t_total_words, int64_t t_axis,
    const torch::Tensor& t_scale, const torch::Tensor& t_zero, const torch::Tensor& t_umin,
    const torch::Tensor& t_umax, int64_t t_rounding) {
  const c10::cuda::CUDAGuard guard(words.device());
  gnnq_cuda::SpmmParams p = spmm_params(rowptr, col, words, bits, row_start, word_start, F,
                                        src_scale, dst_scale, src_zero, col_scale, col_zero,
                                        bias, relu);
  torch::Tensor out = torch::zeros({t_total_words}, words.options());
  p.pack_out = true;
  p.packed_out = make_target(out, t_bits, t_row_start, t_word_start, t_position, p.num_rows, F,
                             t_axis, t_scale, t_zero, t_umin, t_umax, t_rounding);
  check_cuda(gnnq_cuda::spmm(p, c10::cuda::getCurrentCUDAStream()), "spmm_quantize_pack");
  return out;
}

// Fused dense transform: packed X times packed W, then quantize every output on a per-channel
// grid and pack it (the GCN feature quantizer ahead of the aggregation); returns the words.
torch::Tensor linear_quantize_pack(
    const torch::Tensor& words, const torch::Tensor& bits, const torch::Tensor& row_start,
    const torch::Tensor& word_start, const c10::optional<torch::Tensor>& order, int64_t K,
    const torch::Tensor& w_words, int64_t w_bits, const c10::optional<torch::Tensor>& x_scale,
    const c10::optional<torch::Tensor>& x_zero, const c10::optional<torch::Tensor>& w_scale,
    const c10::optional<torch::Tensor>& w_zero, const torch::Tensor& t_bits,
    const torch::Tensor& t_row_start, const torch::Tensor& t_word_start,
    const c10::optional<torch::Tensor>& t_position, int64_t t_total_words, int64_t t_axis,
    const torch::Tensor& t_scale, const torch::Tensor& t_zero, const torch::Tensor& t_umin,
    const torch::Tensor& t_umax, int64_t t_rounding) {
  const c10::cuda::CUDAGuard guard(words.device());
  torch::Tensor colsum;
  gnnq_cuda::LinearParams p = linear_params(words, bits, row_start, word_start, order, K,
                                            w_words, w_bits, x_scale, x_zero, w_scale, w_zero,
                                            colsum);
  torch::Tensor out = torch::zeros({t_total_words}, words.options());
  p.pack_out = true;
  p.packed_out = make_target(out, t_bits, t_row_start, t_word_start, t_position, p.rows, p.O,
                             t_axis, t_scale, t_zero, t_umin, t_umax, t_rounding);
  check_cuda(gnnq_cuda::linear(p, c10::cuda::getCurrentCUDAStream()), "linear_quantize_pack");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gnnq packed INT1..INT8 CUDA kernels";
  m.def("spmm", &spmm, "packed CSR SpMM, float32 output");
  m.def("spmm_codes", &spmm_codes, "packed CSR SpMM, exact int32 sums of the stored codes");
  m.def("spmm_f32", &spmm_f32, "FP32 CSR SpMM of the same design");
  m.def("linear", &linear, "packed dense transform (dp4a), float32 output");
  m.def("linear_codes", &linear_codes, "packed dense transform, raw int32 sums");
  m.def("quantize_pack", &quantize_pack, "quantize on a grid and pack");
  m.def("spmm_quantize_pack", &spmm_quantize_pack, "fused aggregation + requantize + pack");
  m.def("linear_quantize_pack", &linear_quantize_pack, "fused dense transform + quantize + pack");
}
