// Fused CPU training ops for the fake quantization of Degree-Quant (gnnq/quant/degree_quant.py),
// QLR (gnnq/quant/smoothness.py) and A²Q (gnnq/quant/a2q.py).
//
// Each replaces a chain of PyTorch element-wise passes over an activation by one pass, with
// the same float32 operations in the same order, so results are bit for bit those of the
// PyTorch path (tests/test_degree_quant.py and
// tests/test_a2q.py compare the two). Built on first use by
// gnnq/kernels/cpu.py (training_ops) like the packed kernels; without a compiler the
// PyTorch path runs instead.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// The element-wise loops are also built for AVX2 and picked at load time where the CPU has it
// (GCC's function multi-versioning): twice the lanes of the SSE2 baseline. Neither build uses
// FMA, so both compute the same float32 operations as PyTorch's path, bit for bit.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GNNQ_MULTI_ISA __attribute__((target_clones("avx2", "default")))
#else
#define GNNQ_MULTI_ISA
#endif

constexpr int64_t GRAIN = 1 << 15;
// Adding and subtracting 1.5 * 2^23 rounds a float of magnitude <= 2^22 to the nearest
// integer, ties to even (std::nearbyint's rounding, which GCC will not vectorize without
// SSE4.1). Larger magnitudes are clamped first: they quantize to 0 or to the top level
// either way, as the grids have at most 2^8 levels.
constexpr float ROUND_MAGIC = 12582912.0f;
constexpr float ROUND_LIMIT = 4194304.0f;

inline float round_even(float v) {
  v = std::max(std::min(v, ROUND_LIMIT), -ROUND_LIMIT);  // NaN stays NaN
  return (v + ROUND_MAGIC) - ROUND_MAGIC;
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "a contiguous float32 CPU tensor is required");
}

// Degree-Quant's fake quantization over [begin, end), specialised on the mask.
template <bool MASK>
GNNQ_MULTI_ISA void dq_range(const float* __restrict src, float* __restrict dst,
                             bool* __restrict mask, int64_t begin, int64_t end, float s, float z,
                             float top) {
  for (int64_t i = begin; i < end; ++i) {
    const float code = round_even(src[i] / s) + z;
    if (MASK) mask[i] = (code >= 0.0f) & (code <= top);
    dst[i] = (std::min(std::max(code, 0.0f), top) - z) * s;  // NaN stays NaN
  }
}

// (clamp(round(x / scale) + zero, 0, levels) - zero) * scale, and whether each element lay
// inside [0, levels] before the clamp (an undefined tensor unless want_inside).
std::vector<at::Tensor> fake_quantize(const at::Tensor& x, double scale, double zero,
                                      int64_t levels, bool want_inside) {
  check_input(x);
  const float s = static_cast<float>(scale), z = static_cast<float>(zero);
  const float top = static_cast<float>(levels);
  auto out = at::empty_like(x);
  at::Tensor inside = want_inside ? at::empty(x.sizes(), x.options().dtype(at::kBool))
                                  : at::Tensor();
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  bool* mask = want_inside ? inside.data_ptr<bool>() : nullptr;
  const auto range = want_inside ? dq_range<true> : dq_range<false>;
  at::parallel_for(0, x.numel(), GRAIN, [&](int64_t begin, int64_t end) {
    range(src, dst, mask, begin, end, s, z, top);
  });
  return {out, inside};
}

// QLR's fake quantization over [begin, end), specialised so that GCC vectorizes each case.
template <bool MASK, bool TRUNCATE>
GNNQ_MULTI_ISA void qlr_range(const float* __restrict src, float* __restrict dst,
                              bool* __restrict mask, int64_t begin, int64_t end, float s,
                              float z, float top, float shift, float step) {
  for (int64_t i = begin; i < end; ++i) {
    const float raw = round_even(src[i] / s + z);
    float code = std::min(std::max(raw, 0.0f), top);  // NaN stays NaN
    if (MASK) mask[i] = code == raw;
    if (TRUNCATE) code = std::min(std::max(round_even((code + shift) / step) * step, 0.0f), top);
    dst[i] = (code - z) * s;
  }
}

// QLR's fake quantization (gnnq/quant/smoothness.py, fake_quantize): the code
// round(x / scale + zero) clipped to [0, qmax], whether it was not clipped (an undefined
// tensor unless want_inside), with truncate the code moved to the nearest multiple of
// bt_levels after adding shift (BT/BT*), then (code - zero) * scale.
std::vector<at::Tensor> qlr_fake_quantize(const at::Tensor& x, double scale, double zero,
                                          double qmax, bool truncate, double shift,
                                          double bt_levels, bool want_inside) {
  check_input(x);
  const float s = static_cast<float>(scale), z = static_cast<float>(zero);
  const float top = static_cast<float>(qmax), sh = static_cast<float>(shift);
  const float step = static_cast<float>(bt_levels);
  auto out = at::empty_like(x);
  at::Tensor inside = want_inside ? at::empty(x.sizes(), x.options().dtype(at::kBool))
                                  : at::Tensor();
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  bool* mask = want_inside ? inside.data_ptr<bool>() : nullptr;
  const auto range = want_inside ? (truncate ? qlr_range<true, true> : qlr_range<true, false>)
                                 : (truncate ? qlr_range<false, true> : qlr_range<false, false>);
  at::parallel_for(0, x.numel(), GRAIN, [&](int64_t begin, int64_t end) {
    range(src, dst, mask, begin, end, s, z, top, sh, step);
  });
  return {out, inside};
}

// QLR's backward terms over [begin, end) (qlr_backward_terms): both sides are computed and
// one is selected, which GCC vectorizes (a branch it would not).
GNNQ_MULTI_ISA void qlr_backward_range(const float* __restrict g, const float* __restrict src,
                                       const float* __restrict q, const uint8_t* __restrict in,
                                       float* __restrict da, float* __restrict gx,
                                       int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float residual = q[i] - src[i];
    da[i] = in[i] ? residual : q[i];
  }
  if (gx != nullptr) {
    for (int64_t i = begin; i < end; ++i) {
      const float kept = g[i];
      gx[i] = in[i] ? kept : 0.0f;
    }
  }
}

// The element-wise terms of QLR's LSQ-style backward: the range gradient's summands
// inside ? out - x : out, and (with want_grad_x) the input gradient inside ? grad : 0.
std::vector<at::Tensor> qlr_backward_terms(const at::Tensor& grad, const at::Tensor& x,
                                           const at::Tensor& out, const at::Tensor& inside,
                                           bool want_grad_x) {
  check_input(grad);
  check_input(x);
  check_input(out);
  TORCH_CHECK(inside.scalar_type() == at::kBool && inside.is_contiguous(), "a bool mask");
  auto d_alpha = at::empty_like(x);
  at::Tensor grad_x = want_grad_x ? at::empty_like(grad) : at::Tensor();
  const float* g = grad.data_ptr<float>();
  const float* src = x.data_ptr<float>();
  const float* q = out.data_ptr<float>();
  const auto* in = reinterpret_cast<const uint8_t*>(inside.data_ptr<bool>());
  float* da = d_alpha.data_ptr<float>();
  float* gx = want_grad_x ? grad_x.data_ptr<float>() : nullptr;
  at::parallel_for(0, x.numel(), GRAIN, [&](int64_t begin, int64_t end) {
    qlr_backward_range(g, src, q, in, da, gx, begin, end);
  });
  return {d_alpha, grad_x};
}

// The values of x below `below` and those above `above` (two 1-D tensors, in order), and
// how many equal each threshold (a 2-element int64 tensor): a block of values is scanned
// one by one only if one of them lies beyond either threshold.
std::vector<at::Tensor> tails(const at::Tensor& x, double below, double above) {
  check_input(x);
  const float lo = static_cast<float>(below), hi = static_cast<float>(above);
  const float* __restrict src = x.data_ptr<float>();
  const int64_t n = x.numel();
  constexpr int64_t BLOCK = 64;
  std::vector<float> low, high;
  int64_t at_lo = 0, at_hi = 0;
  for (int64_t start = 0; start < n; start += BLOCK) {
    const int64_t stop = std::min(n, start + BLOCK);
    int hit = 0, eq_lo = 0, eq_hi = 0;
    for (int64_t i = start; i < stop; ++i) {
      hit |= (src[i] < lo) | (src[i] > hi);
      eq_lo += src[i] == lo;
      eq_hi += src[i] == hi;
    }
    at_lo += eq_lo;
    at_hi += eq_hi;
    if (!hit) continue;
    for (int64_t i = start; i < stop; ++i) {
      if (src[i] < lo) low.push_back(src[i]);
      else if (src[i] > hi) high.push_back(src[i]);
    }
  }
  auto as_tensor = [](const std::vector<float>& v) {
    auto t = at::empty({static_cast<int64_t>(v.size())}, at::kFloat);
    std::copy(v.begin(), v.end(), t.data_ptr<float>());
    return t;
  };
  auto ties = at::empty({2}, at::kLong);
  ties[0] = at_lo;
  ties[1] = at_hi;
  return {as_tensor(low), as_tensor(high), ties};
}

// -- A²Q -------------------------------------------------------------------------------------
// Its codes round half away from zero: floor(|c| + 0.5) with the sign of c. floor of a
// v in [0, A2Q_FLOOR_LIMIT) by the magic constant (round to nearest, then down by one where
// that went up), which GCC vectorizes; std::floor it will not without SSE4.1.
constexpr float A2Q_FLOOR_LIMIT = 4194304.0f;  // 2^22; A²Q's grids have at most 2^16 levels

inline float floor_nonnegative(float v) {
  const float nearest = (v + ROUND_MAGIC) - ROUND_MAGIC;  // NaN stays NaN
  return nearest > v ? nearest - 1.0f : nearest;
}

// One A²Q element, as gnnq/quant/a2q.py's PyTorch path computes it: the clipped ratio, its
// code and whether the ratio lay inside [-q, q] (1 or 0).
struct A2QElement {
  float clipped, code, inside;
  A2QElement(float x, float s, float q) {
    const float ratio = x / s;
    clipped = std::min(std::max(ratio, -q), q);  // NaN stays NaN
    inside = clipped == ratio ? 1.0f : 0.0f;
    code = std::copysign(floor_nonnegative(std::abs(clipped) + 0.5f), clipped);
  }
};

// The groups of an A²Q quantizer on a [rows, cols] tensor: step and levels hold one value per
// row ([rows, 1]), per column ([1, cols]) or one in all ([1, 1]).
struct A2QGroups {
  const float* step;
  const float* levels;
  int64_t rows, cols, row_stride, col_stride;  // strides of the groups over the tensor

  A2QGroups(const at::Tensor& x, const at::Tensor& step_t, const at::Tensor& levels_t) {
    check_input(x);
    check_input(step_t);
    check_input(levels_t);
    TORCH_CHECK(x.dim() == 2 && step_t.sizes() == levels_t.sizes() && step_t.dim() == 2,
                "a 2-D input with step and levels of one shape");
    rows = x.size(0);
    cols = x.size(1);
    const int64_t group_rows = step_t.size(0), group_cols = step_t.size(1);
    TORCH_CHECK((group_rows == rows || group_rows == 1) && (group_cols == cols || group_cols == 1)
                    && (group_rows == 1 || group_cols == 1),
                "step and levels must be [rows, 1], [1, cols] or [1, 1]");
    row_stride = group_rows == 1 ? 0 : 1;
    col_stride = group_cols == 1 ? 0 : 1;
    step = step_t.data_ptr<float>();
    levels = levels_t.data_ptr<float>();
    for (int64_t g = 0; g < levels_t.numel(); ++g)
      TORCH_CHECK(!(levels[g] >= A2Q_FLOOR_LIMIT), "at most 2^22 levels");  // NaN passes
  }

  // body(i, step, levels) for every element i, in parallel over rows (a2q_rows).
  template <typename Body>
  void for_each(const Body& body) const {
    const int64_t grain = std::max<int64_t>(1, GRAIN / std::max<int64_t>(cols, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      a2q_rows(*this, body, begin, end);
    });
  }
};

// Rows [begin, end) of A2QGroups::for_each. The per-row and per-column cases are separate
// loops so that each vectorizes. ivdep: the bodies write only their own element, and the
// alias checks GCC would otherwise add for up to seven streams exceed its limit, leaving the
// loop scalar (8x slower).
template <typename Body>
GNNQ_MULTI_ISA void a2q_rows(const A2QGroups& groups, const Body& body, int64_t begin,
                             int64_t end) {
  const int64_t cols = groups.cols;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t base = r * cols;
    if (groups.col_stride == 0) {
      const float s = groups.step[r * groups.row_stride];
      const float q = groups.levels[r * groups.row_stride];
#pragma GCC ivdep
      for (int64_t c = 0; c < cols; ++c) body(base + c, s, q);
    } else {
#pragma GCC ivdep
      for (int64_t c = 0; c < cols; ++c) body(base + c, groups.step[c], groups.levels[c]);
    }
  }
}

// A²Q's fake quantization (gnnq/quant/a2q.py, _FakeQuantize.forward): code * step.
at::Tensor a2q_fake_quantize(const at::Tensor& x, const at::Tensor& step,
                             const at::Tensor& levels) {
  const A2QGroups groups(x, step, levels);
  auto out = at::empty_like(x);
  const float* __restrict src = x.data_ptr<float>();
  float* __restrict dst = out.data_ptr<float>();
  groups.for_each([&](int64_t i, float s, float q) {
    dst[i] = A2QElement(src[i], s, q).code * s;
  });
  return out;
}

// The loop of a2q_backward_terms for one choice of terms, specialised so that GCC
// vectorizes it (a test per element it would not). PyTorch's addcmul(a, b, c, value=-1) is
// a + (-1 * b) * c: the same order here.
template <bool GRAD_X, bool STEP, bool LEVELS>
void a2q_backward_loop(const A2QGroups& groups, const float* __restrict g,
                       const float* __restrict src, float* __restrict gx,
                       float* __restrict ds, float* __restrict dl) {
  groups.for_each([=](int64_t i, float s, float q) {
    const A2QElement e(src[i], s, q);
    if (GRAD_X) gx[i] = g[i] * e.inside;
    if (STEP) ds[i] = (e.code + (-e.clipped) * e.inside) * g[i];
    if (LEVELS) {
      const float sign = static_cast<float>((0.0f < e.clipped) - (e.clipped < 0.0f));
      dl[i] = ((sign + (-sign) * e.inside) * g[i]) * s;
    }
  });
}

// The element-wise terms of A²Q's backward (_FakeQuantize.backward), each an undefined tensor
// unless asked for: the masked input gradient grad * inside, the step gradient's summands
// (code - clipped * inside) * grad and the levels gradient's (sign - sign * inside) * grad *
// step. The elements are recomputed from x rather than saved by the forward pass.
std::vector<at::Tensor> a2q_backward_terms(const at::Tensor& grad, const at::Tensor& x,
                                           const at::Tensor& step, const at::Tensor& levels,
                                           bool want_grad_x, bool want_step, bool want_levels) {
  const A2QGroups groups(x, step, levels);
  check_input(grad);
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad and x of one shape");
  auto term = [&](bool wanted) { return wanted ? at::empty_like(x) : at::Tensor(); };
  at::Tensor grad_x = term(want_grad_x), d_step = term(want_step), d_levels = term(want_levels);
  auto ptr = [](at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  using Loop = void (*)(const A2QGroups&, const float*, const float*, float*, float*, float*);
  static constexpr Loop loops[8] = {
      a2q_backward_loop<false, false, false>, a2q_backward_loop<false, false, true>,
      a2q_backward_loop<false, true, false>,  a2q_backward_loop<false, true, true>,
      a2q_backward_loop<true, false, false>,  a2q_backward_loop<true, false, true>,
      a2q_backward_loop<true, true, false>,   a2q_backward_loop<true, true, true>};
  loops[4 * want_grad_x + 2 * want_step + want_levels](
      groups, grad.data_ptr<float>(), x.data_ptr<float>(), ptr(grad_x), ptr(d_step),
      ptr(d_levels));
  return {grad_x, d_step, d_levels};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fake_quantize", &fake_quantize, "fused fake quantization (and its inside mask)");
  m.def("tails", &tails, "the values beyond two thresholds, and the counts equal to them");
  m.def("qlr_fake_quantize", &qlr_fake_quantize, "QLR's fused fake quantization");
  m.def("qlr_backward_terms", &qlr_backward_terms, "QLR's element-wise backward terms");
  m.def("a2q_fake_quantize", &a2q_fake_quantize, "A²Q's fused fake quantization");
  m.def("a2q_backward_terms", &a2q_backward_terms, "A²Q's element-wise backward terms");
}
