// Kernel bodies of the gnnq CPU extension, compiled once per instruction set: each
// packed_cpu_<isa>.cpp defines GNNQ_VL (float lanes of a SIMD vector: 8) and GNNQ_ISA (the
// namespace), sets its target pragma and includes this file. SIMD code is written with GCC/Clang vector extensions (portable: where
// the hardware lacks an operation, the compiler splits it), not with intrinsics.
//
// Each entry point processes rows [r0, r1) on the calling thread; the OpenMP loop (dynamic
// chunks of rows) is in packed_cpu.cpp.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

#include "packed_cpu.h"

namespace GNNQ_ISA {
namespace {

using gnnq_cpu::LinearArgs;
using gnnq_cpu::PackedView;
using gnnq_cpu::QuantArgs;
using gnnq_cpu::SpmmArgs;

constexpr int VL = GNNQ_VL;
typedef uint32_t vu __attribute__((vector_size(VL * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VL * 4), aligned(4)));
typedef float vf __attribute__((vector_size(VL * 4), aligned(4)));

// -- decoding packed words into VL-lane vectors ---------------------------------------------
// Bitwidths whose P = 32 / B codes per word are a multiple of VL (B <= 4 with 8 lanes, all of
// 1, 2, 4, 8 with 4): one word is broadcast and shifted lane by lane, giving P / VL vectors.
// P = VL / 2 or VL / 4 (B = 7, 8 with 8 lanes): 2 or 4 words are spread over the lanes. The
// rest (B = 3, 5, 6: 10, 6, 5 codes per word) take the scalar loop.
template <int B>
constexpr bool wide_word() { return 32 / B >= VL && (32 / B) % VL == 0; }
template <int B>
constexpr bool narrow_word() { return 2 * (32 / B) == VL || 4 * (32 / B) == VL; }

// Calls f(std::integral_constant<int, t>) for t = 0 .. T - 1 (a compile-time unrolled loop).
template <int T, typename Fn, int... I>
static inline void for_each_vector_impl(Fn&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}

template <int T, typename Fn>
static inline void for_each_vector(Fn&& f) {
  for_each_vector_impl<T>(f, std::make_integer_sequence<int, T>{});
}

template <int B, int T>
static inline vu word_shifts() {
  vu s;
  for (int l = 0; l < VL; ++l) s[l] = static_cast<uint32_t>((T * VL + l) * B);
  return s;
}

template <int B>
static inline vu spread_shifts() {
  constexpr int P = 32 / B;
  vu s;
  for (int l = 0; l < VL; ++l) s[l] = static_cast<uint32_t>((l % P) * B);
  return s;
}

// K = VL / P consecutive words (K = 2 or 4), word k repeated in lanes k P .. k P + P - 1:
// 64-bit broadcasts and a permute of registers (no trip through memory).
typedef uint64_t vq __attribute__((vector_size(VL * 4), aligned(4)));

static inline vu broadcast_pair(const uint32_t* w) {
  uint64_t pair;
  std::memcpy(&pair, w, 8);
  return (vu)(vq{} + pair);  // lanes: w0 w1 w0 w1 ...
}

template <int B, size_t... I>
static inline vu spread_words_impl(const uint32_t* w, std::index_sequence<I...>) {
  constexpr int P = 32 / B;
  constexpr int K = VL / P;
  const vu lo = broadcast_pair(w);
  if constexpr (K == 2) {
    return __builtin_shufflevector(lo, lo, static_cast<int>(I / P)...);
  } else {
    static_assert(K == 4, "2 or 4 words per vector");
    const vu hi = broadcast_pair(w + 2);
    // lane l takes word l / P: words 0, 1 from lo (lanes 0, 1), words 2, 3 from hi.
    return __builtin_shufflevector(
        lo, hi, static_cast<int>((I / P) < 2 ? (I / P) : VL + (I / P) - 2)...);
  }
}

template <int B>
static inline vu spread_words(const uint32_t* w) {
  return spread_words_impl<B>(w, std::make_index_sequence<VL>{});
}

template <int B>
static inline vf codes_f(vu x, vu shifts) {
  constexpr uint32_t M = (1u << B) - 1u;
  return __builtin_convertvector((vi)((x >> shifts) & M), vf);
}

template <int B>
static inline vi codes_i(vu x, vu shifts) {
  constexpr uint32_t M = (1u << B) - 1u;
  return (vi)((x >> shifts) & M);
}

static inline vf& vf_at(float* p) { return *reinterpret_cast<vf*>(p); }
static inline vi& vi_at(int32_t* p) { return *reinterpret_cast<vi*>(p); }

// acc[0 .. W P) += a * codes of the row.
template <int B>
static inline void axpy_codes(float* __restrict acc, const uint32_t* __restrict row,
                              int64_t W, float a) {
  constexpr int P = 32 / B;
  constexpr uint32_t M = (1u << B) - 1u;
  const vf av = vf{} + a;
  if constexpr (wide_word<B>()) {
    for (int64_t w = 0; w < W; ++w) {
      const vu x = vu{} + row[w];
      float* o = acc + w * P;
      for_each_vector<P / VL>([&](auto t) {
        vf_at(o + t * VL) += av * codes_f<B>(x, word_shifts<B, decltype(t)::value>());
      });
    }
  } else if constexpr (narrow_word<B>()) {
    constexpr int K = VL / P;
    const int64_t full = W / K;
    const vu shifts = spread_shifts<B>();
    for (int64_t v = 0; v < full; ++v)
      vf_at(acc + v * VL) += av * codes_f<B>(spread_words<B>(row + v * K), shifts);
    for (int64_t w = full * K; w < W; ++w)
      for (int k = 0; k < P; ++k)
        acc[w * P + k] += a * static_cast<float>((row[w] >> (k * B)) & M);
  } else {
    for (int64_t w = 0; w < W; ++w) {
      const uint32_t x = row[w];
      for (int k = 0; k < P; ++k) acc[w * P + k] += a * static_cast<float>((x >> (k * B)) & M);
    }
  }
}

// acc[0 .. W P) += codes of the row (exact int32).
template <int B>
static inline void add_codes(int32_t* __restrict acc, const uint32_t* __restrict row,
                             int64_t W) {
  constexpr int P = 32 / B;
  constexpr uint32_t M = (1u << B) - 1u;
  if constexpr (wide_word<B>()) {
    for (int64_t w = 0; w < W; ++w) {
      const vu x = vu{} + row[w];
      int32_t* o = acc + w * P;
      for_each_vector<P / VL>([&](auto t) {
        vi_at(o + t * VL) += codes_i<B>(x, word_shifts<B, decltype(t)::value>());
      });
    }
  } else if constexpr (narrow_word<B>()) {
    constexpr int K = VL / P;
    const int64_t full = W / K;
    const vu shifts = spread_shifts<B>();
    for (int64_t v = 0; v < full; ++v)
      vi_at(acc + v * VL) += codes_i<B>(spread_words<B>(row + v * K), shifts);
    for (int64_t w = full * K; w < W; ++w)
      for (int k = 0; k < P; ++k)
        acc[w * P + k] += static_cast<int32_t>((row[w] >> (k * B)) & M);
  } else {
    for (int64_t w = 0; w < W; ++w) {
      const uint32_t x = row[w];
      for (int k = 0; k < P; ++k) acc[w * P + k] += static_cast<int32_t>((x >> (k * B)) & M);
    }
  }
}

template <int B>
static inline void decode_row_i16(int16_t* __restrict out, const uint32_t* __restrict row,
                                  int64_t W) {
  constexpr int P = 32 / B;
  constexpr uint32_t M = (1u << B) - 1u;
  for (int64_t w = 0; w < W; ++w) {
    const uint32_t x = row[w];
    for (int k = 0; k < P; ++k) out[w * P + k] = static_cast<int16_t>((x >> (k * B)) & M);
  }
}

#define GNNQ_BITS_SWITCH(bits, CALL) \
  switch (bits) {                    \
    case 1: CALL(1); break;          \
    case 2: CALL(2); break;          \
    case 3: CALL(3); break;          \
    case 4: CALL(4); break;          \
    case 5: CALL(5); break;          \
    case 6: CALL(6); break;          \
    case 7: CALL(7); break;          \
    default: CALL(8); break;         \
  }

static inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

static inline int find_group(const PackedView& X, int64_t j) {
  int g = 0;
  while (g + 1 < X.groups && j >= X.row_start[g + 1]) ++g;
  return g;
}

// A CSR row's edge range, clipped to the index array (a damaged rowptr cannot read outside).
static inline void row_range(const SpmmArgs& S, int64_t i, int64_t& beg, int64_t& end) {
  beg = std::max<int64_t>(0, S.rowptr[i]);
  end = std::min<int64_t>(S.nnz, S.rowptr[i + 1]);
}

static inline bool bad(const SpmmArgs& S, int64_t j) {
  if (static_cast<uint64_t>(j) < static_cast<uint64_t>(S.src_rows)) return false;
  *S.bad_index = 1;
  return true;
}

static inline const uint32_t* row_ptr(const PackedView& X, int g, int64_t j) {
  return X.words + X.word_start[g] + (j - X.row_start[g]) * X.width[g];
}

// out[c] = d * cs[c] * (acc[c] - Z - cz[c] * A) + bias[c], optional ReLU.
static inline void spmm_epilogue(const SpmmArgs& S, int64_t i, const float* acc, double asum,
                                 double zsum, float* __restrict out) {
  const float d = S.dst_scale ? S.dst_scale[i] : 1.0f;
  const float A = static_cast<float>(asum), Z = static_cast<float>(zsum);
  for (int64_t c = 0; c < S.F; ++c) {
    float v = acc[c] - Z;
    if (S.col_zero) v -= static_cast<float>(S.col_zero[c]) * A;
    v *= d;
    if (S.col_scale) v *= S.col_scale[c];
    if (S.bias) v += S.bias[c];
    if (S.relu && v < 0.0f) v = 0.0f;
    out[c] = v;
  }
}

// Every EDGE_BLOCK edges the block accumulator is added into the row accumulator, so a row of
// 10^5 edges loses no more precision than a two-level sum would (error ~ (EDGE_BLOCK +
// degree / EDGE_BLOCK) eps rather than degree eps).
constexpr int64_t EDGE_BLOCK = 128;
// Rows of the edge PREFETCH_EDGES ahead are prefetched, across row boundaries (rows of a
// chunk are contiguous in `col`): most rows have fewer in-edges than that distance.
constexpr int64_t PREFETCH_EDGES = 32;

// A run of consecutive edges whose sources lie in one bitwidth group is decoded at that
// group's (compile-time) bitwidth. A tensor of one bitwidth is one group, so each block of
// edges is one run; for mixed bitwidths callers sort each row's sources in grouped numbering,
// so a row has at most one run per group (unsorted rows are still correct, only slower).
template <int B>
static int64_t spmm_run(const SpmmArgs& S, int g, float* __restrict block, int64_t e,
                        int64_t e1, int64_t pf_end, double& asum, double& zsum) {
  const PackedView& X = S.x;
  const int64_t lo = X.row_start[g], hi = X.row_start[g + 1];
  const int64_t W = X.width[g];
  const uint32_t* base = X.words + X.word_start[g];
  for (; e < e1; ++e) {
    const int64_t j = S.col[e];
    if (j < lo || j >= hi) break;
    if (e + PREFETCH_EDGES < pf_end) {
      const int64_t jp = S.col[e + PREFETCH_EDGES];
      const int gp = find_group(X, jp);
      prefetch_bytes(row_ptr(X, gp, jp), X.width[gp] * 4);
      if (S.src_scale) __builtin_prefetch(S.src_scale + jp, 0, 3);
      if (S.src_zero) __builtin_prefetch(S.src_zero + jp, 0, 3);
    }
    const float a = S.src_scale ? S.src_scale[j] : 1.0f;
    axpy_codes<B>(block, base + (j - lo) * W, W, a);
    asum += a;
    if (S.src_zero) zsum += static_cast<double>(a) * S.src_zero[j];
  }
  return e;
}

static void spmm_rows_grouped(const SpmmArgs& S, int64_t r0, int64_t r1, float* scratch) {
  const PackedView& X = S.x;
  const int64_t Fp = S.fpad;
  float* __restrict total = scratch;
  float* __restrict block = scratch + Fp;
  const int64_t pf_end = std::min<int64_t>(S.nnz, S.rowptr[r1]);
  for (int64_t i = r0; i < r1; ++i) {
    int64_t beg, end;
    row_range(S, i, beg, end);
    std::fill(total, total + Fp, 0.0f);
    double asum = 0.0, zsum = 0.0;
    for (int64_t e0 = beg; e0 < end; e0 += EDGE_BLOCK) {
      const int64_t e1 = std::min(end, e0 + EDGE_BLOCK);
      std::fill(block, block + Fp, 0.0f);
      int64_t e = e0;
      while (e < e1) {
        if (bad(S, S.col[e])) {
          ++e;
          continue;
        }
        const int g = find_group(X, S.col[e]);
#define GNNQ_RUN(b) e = spmm_run<b>(S, g, block, e, e1, pf_end, asum, zsum)
        GNNQ_BITS_SWITCH(X.bits[g], GNNQ_RUN)
#undef GNNQ_RUN
      }
      for (int64_t c = 0; c < Fp; ++c) total[c] += block[c];
    }
    spmm_epilogue(S, i, total, asum, zsum, S.out + i * S.F);
  }
}

// f32 rows of the same design: the apples-to-apples baseline for the byte ratio.
static void spmm_f32_impl(const SpmmArgs& S, const float* x, int64_t r0, int64_t r1,
                          float* scratch) {
  const int64_t F = S.F;
  float* __restrict total = scratch;
  float* __restrict block = scratch + F;
  const int64_t pf_end = std::min<int64_t>(S.nnz, S.rowptr[r1]);
  for (int64_t i = r0; i < r1; ++i) {
    int64_t beg, end;
    row_range(S, i, beg, end);
    std::fill(total, total + F, 0.0f);
    for (int64_t e0 = beg; e0 < end; e0 += EDGE_BLOCK) {
      const int64_t e1 = std::min(end, e0 + EDGE_BLOCK);
      std::fill(block, block + F, 0.0f);
      for (int64_t e = e0; e < e1; ++e) {
        if (e + PREFETCH_EDGES < pf_end) {
          const int64_t jp = S.col[e + PREFETCH_EDGES];
          prefetch_bytes(x + jp * F, F * 4);
          if (S.src_scale) __builtin_prefetch(S.src_scale + jp, 0, 3);
        }
        const int64_t j = S.col[e];
        if (bad(S, j)) continue;
        const float a = S.src_scale ? S.src_scale[j] : 1.0f;
        const float* __restrict xj = x + j * F;
        for (int64_t c = 0; c < F; ++c) block[c] += a * xj[c];
      }
      for (int64_t c = 0; c < F; ++c) total[c] += block[c];
    }
    const float d = S.dst_scale ? S.dst_scale[i] : 1.0f;
    float* __restrict out = S.out + i * F;
    for (int64_t c = 0; c < F; ++c) {
      float v = total[c] * d;
      if (S.bias) v += S.bias[c];
      if (S.relu && v < 0.0f) v = 0.0f;
      out[c] = v;
    }
  }
}

static inline int32_t dot_i16(const int16_t* __restrict a, const int16_t* __restrict b,
                              int64_t n) {
  int32_t s = 0;
  for (int64_t f = 0; f < n; ++f) s += static_cast<int32_t>(a[f]) * static_cast<int32_t>(b[f]);
  return s;
}

}  // namespace

// -- entry points ------------------------------------------------------------------------------
void spmm_rows(const SpmmArgs& S, int64_t r0, int64_t r1, float* scratch) {
  spmm_rows_grouped(S, r0, r1, scratch);
}

void spmm_codes_rows(const SpmmArgs& S, int64_t r0, int64_t r1, int32_t* scratch) {
  const PackedView& X = S.x;
  for (int64_t i = r0; i < r1; ++i) {
    std::fill(scratch, scratch + S.fpad, 0);
    int64_t beg, end;
    row_range(S, i, beg, end);
    for (int64_t e = beg; e < end; ++e) {
      const int64_t j = S.col[e];
      if (bad(S, j)) continue;
      const int g = X.groups == 1 ? 0 : find_group(X, j);
      const uint32_t* row = row_ptr(X, g, j);
      const int64_t W = X.width[g];
#define GNNQ_ADD(b) add_codes<b>(scratch, row, W)
      GNNQ_BITS_SWITCH(X.bits[g], GNNQ_ADD)
#undef GNNQ_ADD
    }
    std::copy(scratch, scratch + S.F, S.out_int + i * S.F);
  }
}

void spmm_f32_rows(const SpmmArgs& S, const float* x, int64_t r0, int64_t r1, float* scratch) {
  spmm_f32_impl(S, x, r0, r1, scratch);
}

void linear_rows(const LinearArgs& L, int64_t p0, int64_t p1, int16_t* xrow) {
  const PackedView& X = L.x;
  const int64_t K = L.kpad, O = L.out_features;
  int g = find_group(X, p0);
  for (int64_t p = p0; p < p1; ++p) {
    while (p >= X.row_start[g + 1]) ++g;
    std::fill(xrow, xrow + K, static_cast<int16_t>(0));
    const uint32_t* row = row_ptr(X, g, p);
    const int64_t W = X.width[g];
#define GNNQ_DECODE(b) decode_row_i16<b>(xrow, row, W)
    GNNQ_BITS_SWITCH(X.bits[g], GNNQ_DECODE)
#undef GNNQ_DECODE
    int32_t rs = 0;
    for (int64_t f = 0; f < K; ++f) rs += xrow[f];
    const int64_t r = L.order ? L.order[p] : p;
    if (L.out_int) {
      int32_t* __restrict out = L.out_int + r * O;
      for (int64_t o = 0; o < O; ++o) out[o] = dot_i16(xrow, L.w + o * K, K);
      continue;
    }
    const float sx = L.x_scale ? L.x_scale[r] : 1.0f;
    const double zx = L.x_zero ? static_cast<double>(L.x_zero[r]) : 0.0;
    float* __restrict out = L.out + r * O;
    for (int64_t o = 0; o < O; ++o) {
      const int32_t acc = dot_i16(xrow, L.w + o * K, K);
      const double zw = L.w_zero ? static_cast<double>(L.w_zero[o]) : 0.0;
      const double corrected = static_cast<double>(acc) - zw * rs - zx * L.w_colsum[o] +
                               static_cast<double>(L.in_features) * zx * zw;
      float v = static_cast<float>(corrected) * sx;
      if (L.w_scale) v *= L.w_scale[o];
      if (L.bias) v += L.bias[o];
      if (L.relu && v < 0.0f) v = 0.0f;
      out[o] = v;
    }
  }
}

void quantize_rows(const QuantArgs& Q, int64_t p0, int64_t p1) {
  const PackedView& X = Q.x;
  const int64_t F = Q.F;
  int g = find_group(X, p0);
  for (int64_t p = p0; p < p1; ++p) {
    while (p >= X.row_start[g + 1]) ++g;
    const int B = X.bits[g];
    const int P = 32 / B;
    const int64_t r = Q.order ? Q.order[p] : p;
    const float* __restrict xr = Q.x_in + r * F;
    uint32_t* dst = Q.words_out + X.word_start[g] + (p - X.row_start[g]) * X.width[g];
    for (int64_t w = 0; w < X.width[g]; ++w) {
      uint32_t word = 0;
      for (int k = 0; k < P; ++k) {
        const int64_t f = w * P + k;
        if (f >= F) break;
        const int64_t grp = Q.axis == 0 ? r : f;
        const float v = xr[f] / Q.scale[grp];
        float q;
        if (Q.rounding == 0) {
          const float t = std::floor(std::fabs(v) + 0.5f);
          q = v < 0.0f ? -t : t;
        } else if (Q.rounding == 1) {
          q = std::nearbyint(v);
        } else {
          const float zf = static_cast<float>(Q.zero[grp]);
          q = std::nearbyint(v + zf) - zf;
        }
        const float lo = static_cast<float>(Q.umin[grp] - Q.zero[grp]);
        const float hi = static_cast<float>(Q.umax[grp] - Q.zero[grp]);
        q = q < lo ? lo : (q > hi ? hi : q);
        if (v != v) q = 0.0f;  // NaN: the code of zero
        const uint32_t u = static_cast<uint32_t>(static_cast<int32_t>(q) + Q.zero[grp]);
        word |= u << (k * B);
      }
      dst[w] = word;
    }
  }
}

}  // namespace GNNQ_ISA
