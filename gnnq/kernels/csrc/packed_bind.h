// Argument checks shared by the PyTorch bindings of the CPU (packed_cpu.cpp) and CUDA
// (packed_cuda_bind.cpp) kernels. Both receive a packed tensor as flat int32 words plus small
// CPU tensors per bit group: bits, row_start (groups + 1 entries) and word_start.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <string>

namespace gnnq_bind {

struct Checker {
  const char* who;  // the error prefix: which kernels complain
  bool cuda;        // where the data tensors must live

  void operator()(bool ok, const std::string& what) const { TORCH_CHECK(ok, who, ": ", what); }

  void tensor(const torch::Tensor& t, torch::ScalarType dtype, const char* name) const {
    (*this)(t.is_cuda() == cuda,
            std::string(name) + (cuda ? " must be a CUDA tensor" : " must be a CPU tensor"));
    (*this)(t.scalar_type() == dtype, std::string(name) + " has the wrong dtype");
    (*this)(t.is_contiguous(), std::string(name) + " must be contiguous");
  }

  template <typename T>
  const T* optional_ptr(const c10::optional<torch::Tensor>& t, torch::ScalarType dtype,
                        const char* name, int64_t numel) const {
    if (!t.has_value() || !t->defined()) return nullptr;
    tensor(*t, dtype, name);
    (*this)(t->numel() == numel, std::string(name) + " has " + std::to_string(t->numel()) +
                                     " elements, expected " + std::to_string(numel));
    return t->data_ptr<T>();
  }

  // Fills the group layout of `v` (groups, bits, width, row_start, word_start: the fields of
  // gnnq_cpu::PackedView and gnnq_cuda::Packed) for F features in a buffer of `words` words,
  // and returns the padded width max_g(width_g * codes per word) of the widest group.
  template <typename View>
  int64_t layout(View& v, const torch::Tensor& bits, const torch::Tensor& row_start,
                 const torch::Tensor& word_start, int64_t F, int64_t words,
                 int max_groups) const {
    (*this)(!bits.is_cuda() && !row_start.is_cuda() && !word_start.is_cuda(),
            "bits / row_start / word_start must be CPU tensors");
    const auto b = bits.to(torch::kInt32).contiguous();
    const auto rs = row_start.to(torch::kInt64).contiguous();
    const auto ws = word_start.to(torch::kInt64).contiguous();
    v.groups = static_cast<int>(b.numel());
    (*this)(v.groups >= 1 && v.groups <= max_groups, "between 1 and " +
            std::to_string(max_groups) + " bit groups are supported");
    (*this)(rs.numel() == v.groups + 1 && ws.numel() == v.groups,
            "row_start needs groups + 1 entries and word_start groups entries");
    int64_t pad = 0;
    for (int g = 0; g < v.groups; ++g) {
      v.bits[g] = b.data_ptr<int32_t>()[g];
      (*this)(v.bits[g] >= 1 && v.bits[g] <= 8, "bitwidths must lie in 1..8");
      const int per = 32 / v.bits[g];
      v.width[g] = (F + per - 1) / per;
      v.row_start[g] = rs.data_ptr<int64_t>()[g];
      v.word_start[g] = ws.data_ptr<int64_t>()[g];
      const int64_t rows = rs.data_ptr<int64_t>()[g + 1] - v.row_start[g];
      (*this)(rows >= 0, "row_start must not decrease");
      (*this)(v.word_start[g] + rows * v.width[g] <= words,
              "the word buffer is shorter than its groups need");
      pad = std::max<int64_t>(pad, v.width[g] * per);
    }
    v.row_start[v.groups] = rs.data_ptr<int64_t>()[v.groups];
    return pad;
  }
};

}  // namespace gnnq_bind
