// Linear layers as register tiles (float32, half and bfloat16 weights), and the element-wise
// functions between them: GELU, exp, GLU, layer norm.
// Part of the fused CPU step: see fast_step.cpp for the layout and the build.
#pragma once

#include "vectors.h"

#include <torch/extension.h>

#include <cmath>
#include <utility>

namespace {

// ---------------------------------------------------------------- linear layers
// Linear weights are stored in panels of kPanel outputs, each panel contiguous over the inputs:
// (out / kPanel, in, kPanel), zero-padded to whole panels. A tile then reads its weights as a few
// sequential streams, which the prefetchers follow, instead of kPanel values every `out`.
constexpr int kPanel = 16;

struct Linear {
  // weights in panels (see kPanel), in float32 or, with `half`, IEEE half precision; bias (out)
  Floats wt, b;
  std::vector<uint16_t> wt16;
  // with `pairs`, also in bfloat16 for vdpbf16ps: panels of kPanel outputs, each over pairs of
  // inputs, a 32-bit lane an output's weights for inputs 2k (low half) and 2k + 1: (out / kPanel,
  // in / 2, kPanel), zero-padded
  std::vector<uint32_t> wpairs;
  int in = 0, out = 0;
  bool half = false;
  Linear() = default;
  Linear(const torch::Tensor& w, const torch::Tensor& bias, bool half_weights = false, bool pairs = false)
      : in(w.size(1)), out(w.size(0)) {
    const int panels = (out + kPanel - 1) / kPanel;
    auto t = at::constant_pad_nd(w, {0, 0, 0, panels * kPanel - out}).view({panels, kPanel, in}).transpose(1, 2)
                 .contiguous();
#ifdef __F16C__
    half = half_weights;
#endif
    if (half) {
      auto h = t.to(torch::kHalf).contiguous();
      const uint16_t* raw = reinterpret_cast<const uint16_t*>(h.data_ptr<at::Half>());
      wt16.assign(raw, raw + h.numel());
    } else {
      wt.assign(t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
    }
    if (pairs && out % kPanel == 0) {
      const int n_pairs = (in + 1) / 2;
      auto p = at::constant_pad_nd(w, {0, 2 * n_pairs - in}).to(torch::kBFloat16).view({panels, kPanel, n_pairs, 2})
                   .permute({0, 2, 1, 3}).contiguous();
      const uint32_t* raw = reinterpret_cast<const uint32_t*>(p.data_ptr<at::BFloat16>());
      wpairs.assign(raw, raw + p.numel() / 2);
    }
    auto bc = bias.contiguous();
    b.assign(bc.data_ptr<float>(), bc.data_ptr<float>() + bc.numel());
  }

  // Where weight (input i, output o) is stored.
  size_t at(int i, int o) const { return ((size_t)(o / kPanel) * in + i) * kPanel + o % kPanel; }

  float weight(int i, int o) const {
#ifdef __F16C__
    if (half) return _cvtsh_ss(wt16[at(i, o)]);
#endif
    return wt[at(i, o)];
  }

  // Outputs [o0, o1) of y[r] = W[:, i0:i1] x[r][i0:i1] (+ b) for `rows` rows (strides xs, ys): plain
  // loops, for the outputs short of a whole vector.
  void columns(const float* x, size_t xs, float* y, size_t ys, int rows, int o0, int o1, int i0, int i1,
               bool bias) const {
    for (int r = 0; r < rows; ++r) {
      float* __restrict yr = y + r * ys;
      const float* xr = x + r * xs;
      for (int o = o0; o < o1; ++o) yr[o] = bias ? b[o] : 0.f;
      for (int i = i0; i < i1; ++i)
        for (int o = o0; o < o1; ++o) yr[o] += weight(i, o) * xr[i];
    }
  }
};

// R rows by NV vectors of outputs from o0, accumulated in registers. K interleaved partial sums
// over the inputs keep enough independent multiply-add chains in flight when the tile is small.
template <class V, class W, int R, int NV, int K>
void tile(const Linear& L, const W* w, const float* x, size_t xs, float* y, size_t ys, int o0, int i0, int i1,
          bool bias) {
  using reg = typename V::reg;
  reg acc[K][R][NV];
  for (int v = 0; v < NV; ++v) {
    const reg start = bias ? V::load(L.b.data() + o0 + V::lanes * v) : V::zero();
    for (int r = 0; r < R; ++r) {
      acc[0][r][v] = start;
      for (int k = 1; k < K; ++k) acc[k][r][v] = V::zero();
    }
  }
  const W* first[NV];  // vector v's weights for input i are at first[v] + i * kPanel
  for (int v = 0; v < NV; ++v) first[v] = w + L.at(0, o0 + V::lanes * v);
  auto madd = [&](int k, int i) {
    reg wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = V::load(first[v] + (size_t)i * kPanel);
    for (int r = 0; r < R; ++r) {
      const reg xb = V::set1(x[r * xs + i]);
      for (int v = 0; v < NV; ++v) acc[k][r][v] = V::fmadd(wv[v], xb, acc[k][r][v]);
    }
  };
  int i = i0;
  for (; i + K <= i1; i += K)
    for (int k = 0; k < K; ++k) madd(k, i + k);
  for (; i < i1; ++i) madd(0, i);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      reg sum = acc[0][r][v];
      for (int k = 1; k < K; ++k) sum = V::add(sum, acc[k][r][v]);
      V::store(y + r * ys + o0 + V::lanes * v, sum);
    }
}

// The tile of R rows and NV vectors, with enough partial sums for about 8 chains in flight.
template <class V, class W, int R, int NV>
void tile_of(const Linear& L, const W* w, const float* x, size_t xs, float* y, size_t ys, int o, int i0, int i1,
             bool bias) {
  tile<V, W, R, NV, std::max(1, 8 / (R * NV))>(L, w, x, xs, y, ys, o, i0, i1, bias);
}

// R rows, outputs [o0, o1): the widest tiles that fit in V's accumulators.
template <class V, class W, int R>
void block(const Linear& L, const W* w, const float* x, size_t xs, float* y, size_t ys, int o0, int o1, int i0,
           int i1, bool bias) {
  constexpr int fit = V::accumulators / R, widest = fit >= 8 ? 8 : fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
  constexpr int n = V::lanes;
  int o = o0;
  while (o1 - o >= n) {
    const int vectors = (o1 - o) / n;
    if constexpr (widest >= 8) {
      if (vectors >= 8) {
        tile_of<V, W, R, 8>(L, w, x, xs, y, ys, o, i0, i1, bias);
        o += 8 * n;
        continue;
      }
    }
    if constexpr (widest >= 4) {
      if (vectors >= 4) {
        tile_of<V, W, R, 4>(L, w, x, xs, y, ys, o, i0, i1, bias);
        o += 4 * n;
        continue;
      }
    }
    if constexpr (widest >= 2) {
      if (vectors >= 2) {
        tile_of<V, W, R, 2>(L, w, x, xs, y, ys, o, i0, i1, bias);
        o += 2 * n;
        continue;
      }
    }
    tile_of<V, W, R, 1>(L, w, x, xs, y, ys, o, i0, i1, bias);
    o += n;
  }
  if (o < o1) L.columns(x, xs, y, ys, R, o, o1, i0, i1, bias);
}

// Rows in blocks of RB (the last block shorter), each block by `block`.
template <class V, int RB, class W>
void rows_in_blocks(const Linear& L, const W* w, const float* x, size_t xs, float* y, size_t ys, int rows, int o0,
                    int o1, int i0, int i1, bool bias) {
  int r = 0;
  for (; r + RB <= rows; r += RB) block<V, W, RB>(L, w, x + r * xs, xs, y + r * ys, ys, o0, o1, i0, i1, bias);
  if (r == rows) return;
  if constexpr (RB > 1) rows_in_blocks<V, RB / 2 ? RB / 2 : 1>(L, w, x + r * xs, xs, y + r * ys, ys, rows - r, o0, o1,
                                                                i0, i1, bias);
}

// Outputs [o0, o1) of y[r] = W[:, i0:i1] x[r][i0:i1] (+ b) for `rows` rows, row strides xs and ys.
// RB: rows a tile takes at once (4 in the step; more in the read, whose blocks have many rows).
template <class V, int RB = 4>
void product(const Linear& L, const float* x, size_t xs, float* y, size_t ys, int rows, int o0, int o1, int i0,
             int i1, bool bias) {
#ifdef __F16C__
  if (L.half) return rows_in_blocks<V, RB>(L, L.wt16.data(), x, xs, y, ys, rows, o0, o1, i0, i1, bias);
#endif
  rows_in_blocks<V, RB>(L, L.wt.data(), x, xs, y, ys, rows, o0, o1, i0, i1, bias);
}

// y[r] = W x[r] + b for rows of widths in and out.
template <class V>
void apply(const Linear& L, const float* x, float* y, int rows) {
  product<V>(L, x, L.in, y, L.out, rows, 0, L.out, 0, L.in, true);
}

// erf(x) for any float x, within 3.3e-7: clamped to +-3.925 (past which erf is +-1 in float), then
// x P(x^2) / Q(x^2) with P and Q of degree 5, fitted to erf by least squares for this kernel.
// Inline, so loops of it vectorize; half the time of glibc's vector erff, which is a call.
#pragma omp declare simd notinbranch
inline float erf_inline(float x) {
  x = std::min(std::max(x, -3.925f), 3.925f);
  const float z = x * x;
  float p = std::fma(2.03092645e-06f, z, 0.000287486444f);
  p = std::fma(p, z, 0.00387605233f);
  p = std::fma(p, z, 0.0530835167f);
  p = std::fma(p, z, 0.192966074f);
  p = std::fma(p, z, 1.12837899f);
  float q = std::fma(3.8031736e-05f, z, 0.00118968403f);
  q = std::fma(q, z, 0.0151878092f);
  q = std::fma(q, z, 0.115164801f);
  q = std::fma(q, z, 0.50434339f);
  q = std::fma(q, z, 1.f);
  return x * p / q;
}

// ---------------------------------------------------------------- bfloat16 products (the read)
// x rows (n of width `in`, stride xs) as bfloat16 pairs (n, (in + 1) / 2), rounded to nearest even:
// the activations' side of vdpbf16ps.
inline void to_bf16_pairs(const float* x, size_t xs, int rows, int in, uint32_t* pairs) {
  const int n_pairs = (in + 1) / 2;
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + r * xs;
    uint32_t* pr = pairs + (size_t)r * n_pairs;
#pragma omp simd
    for (int k = 0; k < n_pairs; ++k) {
      uint32_t lo, hi = 0;
      std::memcpy(&lo, xr + 2 * k, 4);
      if (2 * k + 1 < in) std::memcpy(&hi, xr + 2 * k + 1, 4);
      lo = (lo + 0x7fff + ((lo >> 16) & 1)) >> 16;
      hi = (hi + 0x7fff + ((hi >> 16) & 1)) >> 16;
      pr[k] = lo | hi << 16;
    }
  }
}

#ifdef S4MUSIC_BF16
// R rows by NV panels of outputs from o0 (a multiple of kPanel): each vdpbf16ps adds two inputs'
// products into 16 float sums.
template <int R, int NV>
void tile_bf16(const Linear& L, const uint32_t* x, float* y, size_t ys, int o0, bool bias) {
  const int n_pairs = (L.in + 1) / 2;
  __m512 acc[R][NV];
  for (int v = 0; v < NV; ++v) {
    const __m512 start = bias ? _mm512_loadu_ps(L.b.data() + o0 + kPanel * v) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) acc[r][v] = start;
  }
  const uint32_t* first[NV];
  for (int v = 0; v < NV; ++v) first[v] = L.wpairs.data() + (size_t)(o0 / kPanel + v) * n_pairs * kPanel;
  for (int k = 0; k < n_pairs; ++k) {
    __m512bh wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = (__m512bh)_mm512_loadu_si512(first[v] + (size_t)k * kPanel);
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[(size_t)r * n_pairs + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], wv[v], xb);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(y + r * ys + o0 + kPanel * v, acc[r][v]);
}

// y[r] = W x[r] (+ b) for rows of bfloat16 pairs (see to_bf16_pairs), every output: tiles of RB rows.
template <int RB>
void product_bf16(const Linear& L, const uint32_t* x, float* y, size_t ys, int rows, bool bias) {
  const size_t n_pairs = (L.in + 1) / 2;
  int r = 0;
  for (; r + RB <= rows; r += RB) {
    int o = 0;
    for (; o + 4 * kPanel <= L.out; o += 4 * kPanel) tile_bf16<RB, 4>(L, x + r * n_pairs, y + r * ys, ys, o, bias);
    for (; o < L.out; o += kPanel) tile_bf16<RB, 1>(L, x + r * n_pairs, y + r * ys, ys, o, bias);
  }
  if constexpr (RB > 1)
    if (r < rows) product_bf16<RB / 2 ? RB / 2 : 1>(L, x + r * n_pairs, y + r * ys, ys, rows - r, bias);
}
#endif

// y[r] = W x[r] + b for rows of x (stride xs) into y (stride ys), as the read computes it: in
// bfloat16 where the layer holds pairs (with `scratch` for the rounded rows), else float32 tiles.
template <class V>
void read_product(const Linear& L, const float* x, size_t xs, float* y, size_t ys, int rows, uint32_t* scratch) {
#ifdef S4MUSIC_BF16
  if (!L.wpairs.empty()) {
    to_bf16_pairs(x, xs, rows, L.in, scratch);
    return product_bf16<6>(L, scratch, y, ys, rows, true);
  }
#endif
  product<V, 6>(L, x, xs, y, ys, rows, 0, L.out, 0, L.in, true);
}

// gelu (the exact, erf form that torch uses) in place on columns [c0, c1) of `rows` rows of stride w.
inline void gelu(float* x, int rows, size_t w, int c0, int c1) {
  for (int r = 0; r < rows; ++r) {
    float* xr = x + r * w;
#pragma omp simd
    for (int i = c0; i < c1; ++i) xr[i] = 0.5f * xr[i] * (1.f + erf_inline(xr[i] * 0.70710678118654752f));
  }
}

// e^x inline, so that loops of it vectorize: 0 below `lo` (as the library exp gives there; a code
// the Python path gives probability 0 must not be drawn), clamped at `hi`, then 2^n e^r with
// n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two parts), e^r by its Taylor series. (libmvec's
// expf leaves its vector code for a path 7 times slower past +-88, where trained models' gates go;
// and gcc moves a clamp written around expf out of its argument.) float: within 2 units in the last
// place, series to r^7; double (the sampler's probabilities, which must agree with the Python
// path's double ones): within a few units, series to r^13.
template <typename T> struct ExpForm;
template <> struct ExpForm<float> {
  using Bits = int32_t;
  static constexpr float lo = -87.f, hi = 87.f, ln2_hi = 0.693145752f, ln2_lo = 1.42860677e-06f;
  static constexpr int terms = 7, bias = 127, mantissa = 23;
};
template <> struct ExpForm<double> {
  using Bits = int64_t;
  static constexpr double lo = -708.0, hi = 709.0, ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
  static constexpr int terms = 13, bias = 1023, mantissa = 52;
};

constexpr double factorial(int k) { return k <= 1 ? 1.0 : k * factorial(k - 1); }

// sum over k in [K, N] of r^(k - K) / k!, by Horner's rule, unrolled at compile time.
template <typename T, int K, int N>
inline T taylor_tail(T r) {
  if constexpr (K == N) return T(1 / factorial(N));
  else return std::fma(taylor_tail<T, K + 1, N>(r), r, T(1 / factorial(K)));
}

#pragma omp declare simd notinbranch
template <typename T>
inline T exp_inline(T x) {
  using F = ExpForm<T>;
  const bool vanishes = x < F::lo;
  x = std::min(std::max(x, F::lo), F::hi);
  const T n = std::nearbyint(x * T(1.4426950408889634));
  const T r = std::fma(n, -F::ln2_lo, std::fma(n, -F::ln2_hi, x));
  const T p = taylor_tail<T, 0, F::terms>(r);  // e^r
  const typename F::Bits bits = (typename F::Bits)(n + T(F::bias)) << F::mantissa;  // 2^n
  T scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return vanishes ? T(0) : p * scale;
}

// h[r][c] += z[r][c] * sigmoid(z[r][H + c]): the GLU of an S4 layer's output linear, and its residual.
inline void glu_add(const float* z, float* h, int rows, int H) {
  for (int r = 0; r < rows; ++r) {
    const float* __restrict g = z + (size_t)r * 2 * H;
    float* __restrict hr = h + (size_t)r * H;
#pragma omp simd
    for (int c = 0; c < H; ++c) hr[c] += g[c] / (1.f + exp_inline(-g[H + c]));
  }
}

// The mean and the (biased) variance of x[0:H]. The sums are vectorized: in order, each add
// would wait for the one before.
inline std::pair<float, float> mean_var(const float* x, int H) {
  float mean = 0.f, var = 0.f;
#pragma omp simd reduction(+ : mean)
  for (int i = 0; i < H; ++i) mean += x[i];
  mean /= H;
#pragma omp simd reduction(+ : var)
  for (int i = 0; i < H; ++i) var += (x[i] - mean) * (x[i] - mean);
  return {mean, var / H};
}

// The residual layers' scalar layer norm is y = s / std * (x - mean + m) = scale (x - shift) per
// row. row_norms gives each row's scale and shift (rows of width H, stride xs); four rows at a time,
// so that their sums overlap instead of each waiting on the one before.
void row_norms(const float* x, size_t xs, int rows, int H, float m, float s, float* scale, float* shift) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float *x0 = x + r * xs, *x1 = x0 + xs, *x2 = x1 + xs, *x3 = x2 + xs;
    float m0 = 0.f, m1 = 0.f, m2 = 0.f, m3 = 0.f, v0 = 0.f, v1 = 0.f, v2 = 0.f, v3 = 0.f;
#pragma omp simd reduction(+ : m0, m1, m2, m3)
    for (int i = 0; i < H; ++i) m0 += x0[i], m1 += x1[i], m2 += x2[i], m3 += x3[i];
    m0 /= H, m1 /= H, m2 /= H, m3 /= H;
#pragma omp simd reduction(+ : v0, v1, v2, v3)
    for (int i = 0; i < H; ++i)
      v0 += (x0[i] - m0) * (x0[i] - m0), v1 += (x1[i] - m1) * (x1[i] - m1), v2 += (x2[i] - m2) * (x2[i] - m2),
          v3 += (x3[i] - m3) * (x3[i] - m3);
    const float mean[4] = {m0, m1, m2, m3}, var[4] = {v0, v1, v2, v3};
    for (int k = 0; k < 4; ++k) {
      scale[r + k] = s / std::sqrt(var[k] / H);
      shift[r + k] = mean[k] - m;
    }
  }
  for (; r < rows; ++r) {
    const auto [mean, var] = mean_var(x + r * xs, H);
    scale[r] = s / std::sqrt(var);
    shift[r] = mean - m;
  }
}

// The norm itself on columns [c0, c1) of rows of stride xs into rows of stride ys.
void apply_norms(const float* x, size_t xs, float* y, size_t ys, int rows, int c0, int c1, const float* scale,
                 const float* shift) {
  for (int r = 0; r < rows; ++r) {
    const float* __restrict xr = x + r * xs;
    float* __restrict yr = y + r * ys;
    const float a = scale[r], b = shift[r];
#pragma omp simd
    for (int i = c0; i < c1; ++i) yr[i] = a * (xr[i] - b);
  }
}

// The norm of whole rows (at most kMaxRows of them) of width H.
constexpr int kMaxRows = 32;
void norm_rows(const float* x, size_t xs, float* y, size_t ys, int rows, int H, float m, float s) {
  for (int r = 0; r < rows; r += kMaxRows) {
    const int n = std::min(kMaxRows, rows - r);
    float scale[kMaxRows], shift[kMaxRows];
    row_norms(x + r * xs, xs, n, H, m, s, scale, shift);
    apply_norms(x + r * xs, xs, y + r * ys, ys, n, 0, H, scale, shift);
  }
}

}  // namespace
