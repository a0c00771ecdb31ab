// The SaShiMi model on the CPU, fused in C++: the recurrent step (generation, many samples a call)
// and the parallel read of a prompt (prefill), from one copy of the weights in one layout.
//
// Python (s4music/model/fast.py) hands over every weight once, already in step form:
//   S4 layers as an O(N) recurrence: diagonal (S4D) or DPLR through Sherman-Morrison, exact in
//   float32 (no eigendecomposition, which is ill-conditioned for HiPPO matrices),
//   weight-normed pooling weights as plain matrices.
// The references are SaShiMi.step and SaShiMi.prefill in sashimi.py; tests compare them.
//
// Instruction sets. The hot loops are written once over a vector type (Plain, Avx2, Avx512 below)
// and built for every set the compiler targets; the widest one the CPU runs is picked at run time,
// and a narrower one can be asked for, so a wide machine tests the narrower machines' code too.
//
// Layout, shared by both modes:
//   linear layers  weights stored by input, so a row is a sum of weight rows scaled by its inputs:
//                  register tiles of rows x outputs, no horizontal sums; in panels of 16 outputs
//                  (see kPanel), so a tile's weights are sequential streams;
//   S4 recurrence  parameters and state packed by vectors of channels (8 or 16 lanes, the vector
//                  width), so the SIMD lanes are channels and the sums over the state stay in
//                  registers;
//   GELU, gates    erf and exp inline (below), so their loops vectorize with no calls.
//
// Step: at batch 1 a step is a chain of small matrix-vector products, bound by reading the weights.
// Rows of the batch (variations) are split into groups, one per thread. With fewer rows than
// threads, a group gets a team of up to 4 threads that splits every layer's inner units (S4
// channels, hidden units) and meets at one barrier per layer to add up its parts.
//
// Read: a tier's layers take the prompt in blocks of rows (time), every layer on one block before
// the next block, so the activations stay in cache and the weights are read once a block. In a
// block, an S4 layer runs its recurrence along time for whole vectors of channels (split between
// the team), then every linear layer takes the block's rows (split between the team) as register
// tiles: two barriers per S4 and feed-forward pair, and no pass over the whole prompt per layer.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define S4MUSIC_AVX2 1
#endif
#if defined(S4MUSIC_AVX2) && defined(__AVX512F__)
#define S4MUSIC_AVX512 1
#endif
#if defined(S4MUSIC_AVX512) && defined(__AVX512BF16__)
#define S4MUSIC_BF16 1  // the read's linear layers in bfloat16 (vdpbf16ps), where asked for
#endif

namespace {

constexpr int kMaxTeam = 4;  // threads that share one group of rows in the step (see FastSaShiMi::run)

// ---------------------------------------------------------------- vector types
// A register of `lanes` floats and the few operations the kernels use. `accumulators`: how many
// registers a product tile may keep as sums (the rest hold weights and inputs: 16 registers for
// AVX2, 32 for AVX-512).

// Any CPU: 8 lanes in plain C++, which the compiler vectorizes as far as its target allows.
struct Plain {
  static constexpr int lanes = 8, accumulators = 8;
  static constexpr const char* name = "plain";
  struct reg {
    float v[lanes];
  };
  static reg zero() { return reg{}; }
  static reg set1(float a) {
    reg r;
    for (int l = 0; l < lanes; ++l) r.v[l] = a;
    return r;
  }
  static reg load(const float* p) {
    reg r;
    std::copy(p, p + lanes, r.v);
    return r;
  }
#ifdef __F16C__
  static reg load(const uint16_t* p) {
    reg r;
    for (int l = 0; l < lanes; ++l) r.v[l] = _cvtsh_ss(p[l]);
    return r;
  }
#endif
  static void store(float* p, const reg& a) { std::copy(a.v, a.v + lanes, p); }
  static reg add(reg a, const reg& b) {
    for (int l = 0; l < lanes; ++l) a.v[l] += b.v[l];
    return a;
  }
  static reg mul(reg a, const reg& b) {
    for (int l = 0; l < lanes; ++l) a.v[l] *= b.v[l];
    return a;
  }
  static reg fmadd(const reg& a, const reg& b, reg c) {  // a b + c
    for (int l = 0; l < lanes; ++l) c.v[l] += a.v[l] * b.v[l];
    return c;
  }
  static reg fnmadd(const reg& a, const reg& b, reg c) {  // c - a b
    for (int l = 0; l < lanes; ++l) c.v[l] -= a.v[l] * b.v[l];
    return c;
  }
};

#ifdef S4MUSIC_AVX2
struct Avx2 {
  static constexpr int lanes = 8, accumulators = 12;
  static constexpr const char* name = "avx2";
  using reg = __m256;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float a) { return _mm256_set1_ps(a); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, reg a) { _mm256_storeu_ps(p, a); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg fnmadd(reg a, reg b, reg c) { return _mm256_fnmadd_ps(a, b, c); }
};
#endif

#ifdef S4MUSIC_AVX512
// 32 registers of 16 lanes: tiles of up to 24 sums.
struct Avx512 {
  static constexpr int lanes = 16, accumulators = 24;
  static constexpr const char* name = "avx512";
  using reg = __m512;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float a) { return _mm512_set1_ps(a); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store(float* p, reg a) { _mm512_storeu_ps(p, a); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg fnmadd(reg a, reg b, reg c) { return _mm512_fnmadd_ps(a, b, c); }
};
#endif

// The instruction sets this build has that this CPU runs, widest first.
std::vector<std::string> instruction_sets() {
  std::vector<std::string> found;
#ifdef S4MUSIC_AVX512
  if (__builtin_cpu_supports("avx512f")) found.push_back(Avx512::name);
#endif
#ifdef S4MUSIC_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) found.push_back(Avx2::name);
#endif
  found.push_back(Plain::name);
  return found;
}

// Calls f with a value of the vector type named `isa` (one of instruction_sets()).
template <class F>
decltype(auto) with_vectors(const std::string& isa, F&& f) {
#ifdef S4MUSIC_AVX512
  if (isa == Avx512::name) return f(Avx512{});
#endif
#ifdef S4MUSIC_AVX2
  if (isa == Avx2::name) return f(Avx2{});
#endif
  return f(Plain{});
}

// The first `valid` lanes at p, the rest zero (a vector of channels that runs past the layer's width).
template <class V>
typename V::reg load_part(const float* p, int valid) {
  if (valid == V::lanes) return V::load(p);
  float tmp[V::lanes] = {};
  std::copy(p, p + valid, tmp);
  return V::load(tmp);
}

template <class V>
void store_part(float* p, typename V::reg a, int valid) {
  if (valid == V::lanes) return V::store(p, a);
  float tmp[V::lanes];
  V::store(tmp, a);
  std::copy(tmp, tmp + valid, p);
}

// 64-byte aligned storage: the members of a team write neighbouring halves of the same arrays,
// and a cache line split between two cores would bounce between them on every write.
template <class T>
struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <class U>
  Aligned(const Aligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Aligned<U>&) const { return true; }
  template <class U>
  bool operator!=(const Aligned<U>&) const { return false; }
};
using Floats = std::vector<float, Aligned<float>>;

// Threads that work on the same rows, meeting at barriers.
struct Team {
  int member = 0, size = 1;
  std::atomic<int>* arrived = nullptr;
  std::atomic<int>* generation = nullptr;

  // This member's part of [0, n), in whole units of `unit` (vectors of channels, or of outputs).
  std::pair<int, int> share(int n, int unit) const {
    const int blocks = (n + unit - 1) / unit;
    return {std::min(n, unit * (blocks * member / size)), std::min(n, unit * (blocks * (member + 1) / size))};
  }
  // Everyone waits here until the whole team has arrived; spins, then yields the core (a
  // machine with more threads than cores would otherwise spin through the others' turns).
  void sync() const {
    if (size == 1) return;
    const int gen = generation->load(std::memory_order_acquire);
    if (arrived->fetch_add(1, std::memory_order_acq_rel) == size - 1) {
      arrived->store(0, std::memory_order_relaxed);
      generation->fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation->load(std::memory_order_acquire) == gen; ++spins)
      if (spins > 4000) std::this_thread::yield();
  }
  bool lead() const { return member == 0; }
};

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

// ---------------------------------------------------------------- S4 layers
// What a residual layer holds; Python names them through the module's LayerKind.
enum Kind { S4_DIAG, S4_DPLR, FEEDFORWARD };

// How an S4 layer's recurrence runs (see Layer.packed):
//   FOLDED  S4D with its state held as s = x / b and c as c b: then s' = a s + u takes the input
//           without a multiply, and y = Re((c b) s); 6 operations a state index and step, not 8.
//           Every S4D layer whose b has no zero (a mode no input reaches) runs so.
//   DIAG    S4D as it is: x' = a x + b u, y = Re(c x').
//   DPLR    a row's state is w and alpha is g's coefficient, x = w - g alpha (see
//           S4Kernel.step_params). One pass over the state per step: the next step's P^H x is
//           alpha itself, and y follows from sums over w, so x is never formed.
enum Form { FOLDED, DIAG, DPLR };
constexpr int fields(Form f) { return f == FOLDED ? 2 : f == DIAG ? 3 : 5; }

struct Layer {
  int kind = 0, H = 0, N2 = 0;
  Form form = DIAG;
  int lanes = 8, Hv = 0;  // channels in Hv vectors of `lanes`, the last one zero-padded
  float norm_m = 0.f, norm_s = 1.f;
  // S4 step parameters (see S4Kernel.step_params), packed (Hv, N2, fields, 2, lanes): for each
  // vector of channels and each state index, the real then imaginary lanes of a, c b (FOLDED);
  // a, b, c (DIAG); a, b, c, q, p (DPLR). One stream through memory per layer, in the order the
  // recurrence reads it.
  Floats packed;
  Floats kappa, cg;     // DPLR, (Hv * lanes), zero-padded
  Floats D;             // (Hv * lanes), zero-padded
  torch::Tensor p, g;   // DPLR, complex (H, N2): only to convert the state on the way in and out
  torch::Tensor b;      // FOLDED, complex (H, N2): likewise
  Linear out;       // S4 output linear (2H, H), GLU after
  Linear fc1, fc2;  // feed-forward
  int state_index = -1;

  size_t state_size() const { return (size_t)Hv * N2 * 2 * lanes; }  // one row's packed state

  // The one channel layout of the S4 recurrence: (..., H) -> (..., lanes Hv) float, zero-padded
  torch::Tensor padded(const torch::Tensor& x) const {
    return at::constant_pad_nd(x.to(torch::kFloat), {0, lanes * Hv - H}).contiguous();
  }
  // complex (K, H, N2) -> float (K, Hv, N2, 2, lanes): real then imaginary lanes
  torch::Tensor to_lanes(const torch::Tensor& z) const {
    auto ri = at::constant_pad_nd(torch::view_as_real(z.to(torch::kComplexFloat)), {0, 0, 0, 0, 0, lanes * Hv - H});
    return ri.view({z.size(0), Hv, lanes, N2, 2}).permute({0, 1, 3, 4, 2}).contiguous();
  }
  // float (K, Hv, N2, 2, lanes) -> complex (K, H, N2), the inverse of to_lanes
  torch::Tensor from_lanes(float* data, int64_t k) const {
    auto packed_state = torch::from_blob(data, {k, Hv, N2, 2, lanes});
    return torch::view_as_complex(
        packed_state.permute({0, 1, 4, 2, 3}).reshape({k, lanes * Hv, N2, 2}).slice(1, 0, H).contiguous());
  }

  // A state in torch's layout, complex (rows, H, N2), as packed lanes (rows, Hv, N2, 2, lanes) and
  // alpha (rows, Hv lanes), and back (unpack). FOLDED: s = x / b. DPLR: w = x + g alpha with
  // alpha = 2 Re(sum conj(p) x), and back x = w - g alpha. In double, so the round trip costs no
  // precision.
  void pack(const torch::Tensor& state, Floats& lanes_out, Floats& alpha_out) const {
    auto x = state.to(torch::kComplexDouble);
    auto alpha = torch::zeros({state.size(0), H}, torch::kDouble);
    if (form == DPLR) {
      alpha = 2 * torch::real((torch::conj(p) * x).sum(-1));
      x = x + g * alpha.unsqueeze(-1);
    } else if (form == FOLDED) {
      x = x / b;
    }
    auto packed_state = to_lanes(x);
    lanes_out.assign(packed_state.data_ptr<float>(), packed_state.data_ptr<float>() + packed_state.numel());
    auto al = padded(alpha);
    alpha_out.assign(al.data_ptr<float>(), al.data_ptr<float>() + al.numel());
  }
  void unpack(Floats& lanes_in, Floats& alpha_in, torch::Tensor state) const {
    const int64_t rows = state.size(0);
    auto x = from_lanes(lanes_in.data(), rows).to(torch::kComplexDouble);
    if (form == DPLR) {
      auto alpha = torch::from_blob(alpha_in.data(), {rows, lanes * Hv}).slice(1, 0, H);
      x = x - g * alpha.to(torch::kDouble).unsqueeze(-1);
    } else if (form == FOLDED) {
      x = x * b;
    }
    state.copy_(x);
  }
};

// One S4 recurrence step on vector v of channels for R rows: inputs u, outputs y = Re(c x) (half
// the layer's 2 Re), states in place (see Form). Pointers are row 0's, at the vector's first
// channel; the strides step to the next row. The state index is the inner loop, so the sums stay
// in registers and each packed slice of parameters is read once for the R rows.
template <class V, int R, Form form>
void s4_vector(const Layer& L, int v, const float* u, size_t us, float* y, size_t ys, float* state, size_t ss,
               float* alpha, size_t as) {
  using reg = typename V::reg;
  constexpr int W = V::lanes, F = fields(form);
  const int N2 = L.N2, valid = std::min(W, L.H - v * W);
  reg uu[R], al[R], sum_y[R], sum_p[R];
  for (int r = 0; r < R; ++r) {
    uu[r] = load_part<V>(u + r * us, valid);
    al[r] = form == DPLR ? V::load(alpha + r * as) : V::zero();
    sum_y[r] = sum_p[r] = V::zero();
  }
  const float* prm = L.packed.data() + (size_t)v * N2 * F * 2 * W;
  for (int n = 0; n < N2; ++n, prm += F * 2 * W) {
    const reg ar = V::load(prm), ai = V::load(prm + W);
    const reg cr = V::load(prm + (F == 2 ? 2 : 4) * W), ci = V::load(prm + (F == 2 ? 3 : 5) * W);
    for (int r = 0; r < R; ++r) {
      float* x = state + r * ss + (size_t)n * 2 * W;
      const reg xr = V::load(x), xi = V::load(x + W);
      reg re, im;
      if constexpr (form == FOLDED) {
        re = V::fnmadd(ai, xi, V::fmadd(ar, xr, uu[r]));
        im = V::fmadd(ai, xr, V::mul(ar, xi));
      } else {
        re = V::fmadd(V::load(prm + 2 * W), uu[r], V::fnmadd(ai, xi, V::mul(ar, xr)));
        im = V::fmadd(V::load(prm + 3 * W), uu[r], V::fmadd(ai, xr, V::mul(ar, xi)));
      }
      if constexpr (form == DPLR) {
        re = V::fnmadd(V::load(prm + 6 * W), al[r], re);
        im = V::fnmadd(V::load(prm + 7 * W), al[r], im);
        sum_p[r] = V::fmadd(V::load(prm + 8 * W), re, V::fmadd(V::load(prm + 9 * W), im, sum_p[r]));
      }
      V::store(x, re);
      V::store(x + W, im);
      sum_y[r] = V::fmadd(cr, re, V::fnmadd(ci, im, sum_y[r]));
    }
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (form == DPLR) {
      al[r] = V::mul(V::mul(V::set1(2.f), V::load(L.kappa.data() + v * W)), sum_p[r]);
      V::store(alpha + r * as, al[r]);
      sum_y[r] = V::fnmadd(al[r], V::load(L.cg.data() + v * W), sum_y[r]);
    }
    store_part<V>(y + r * ys, sum_y[r], valid);
  }
}

// The recurrence over channels [c0, c1) (c0 a multiple of the lanes) of `rows` rows of width H,
// two rows at a time (with more, the sums no longer fit in registers).
template <class V, Form form>
void s4_rows_as(const Layer& L, const float* u, float* y, float* state, float* alpha, int rows, int c0, int c1) {
  constexpr int W = V::lanes;
  const size_t H = L.H, ss = L.state_size(), as = (size_t)L.Hv * W;
  for (int v = c0 / W; v < (c1 + W - 1) / W; ++v) {
    const size_t st = (size_t)v * L.N2 * 2 * W;
    int r = 0;
    for (; r + 2 <= rows; r += 2)
      s4_vector<V, 2, form>(L, v, u + r * H + v * W, H, y + r * H + v * W, H, state + r * ss + st, ss,
                            alpha + r * as + v * W, as);
    if (r < rows)
      s4_vector<V, 1, form>(L, v, u + r * H + v * W, H, y + r * H + v * W, H, state + r * ss + st, ss,
                            alpha + r * as + v * W, as);
  }
}

template <class V>
void s4_rows(const Layer& L, const float* u, float* y, float* state, float* alpha, int rows, int c0, int c1) {
  if (L.form == FOLDED) s4_rows_as<V, FOLDED>(L, u, y, state, alpha, rows, c0, c1);
  else if (L.form == DIAG) s4_rows_as<V, DIAG>(L, u, y, state, alpha, rows, c0, c1);
  else s4_rows_as<V, DPLR>(L, u, y, state, alpha, rows, c0, c1);
}

// An S4D recurrence (FOLDED or DIAG) along T steps of time for vector v of one row: u (T rows of
// stride us, at the vector's first channel, zero-padded past the layer's width) -> y (T, lanes) =
// Re(c x), the state (N2, 2, lanes) in place. Time is the inner loop and G state indices go along
// together, so their states and parameters stay in registers and G independent chains hide the
// multiply-add latency.
template <class V, Form form, int G>
void s4d_along(const Layer& L, int v, const float* u, size_t us, float* y, int T, float* state) {
  using reg = typename V::reg;
  constexpr int W = V::lanes, F = fields(form);
  const int N2 = L.N2;
  const float* params = L.packed.data() + (size_t)v * N2 * F * 2 * W;
  int n0 = 0;
  auto run = [&](auto group) {
    constexpr int g = decltype(group)::value;
    reg xr[g], xi[g], ar[g], ai[g], br[g], bi[g], cr[g], ci[g];
    for (int k = 0; k < g; ++k) {
      const float* prm = params + (size_t)(n0 + k) * F * 2 * W;
      const float* x = state + (size_t)(n0 + k) * 2 * W;
      ar[k] = V::load(prm), ai[k] = V::load(prm + W), xr[k] = V::load(x), xi[k] = V::load(x + W);
      if constexpr (form == FOLDED) {
        cr[k] = V::load(prm + 2 * W), ci[k] = V::load(prm + 3 * W);
      } else {
        br[k] = V::load(prm + 2 * W), bi[k] = V::load(prm + 3 * W), cr[k] = V::load(prm + 4 * W),
        ci[k] = V::load(prm + 5 * W);
      }
    }
    for (int t = 0; t < T; ++t) {
      const reg ut = V::load(u + t * us);
      reg acc = n0 == 0 ? V::zero() : V::load(y + (size_t)t * W);
      for (int k = 0; k < g; ++k) {
        reg re, im;
        if constexpr (form == FOLDED) {
          re = V::fnmadd(ai[k], xi[k], V::fmadd(ar[k], xr[k], ut));
          im = V::fmadd(ai[k], xr[k], V::mul(ar[k], xi[k]));
        } else {
          re = V::fnmadd(ai[k], xi[k], V::fmadd(ar[k], xr[k], V::mul(br[k], ut)));
          im = V::fmadd(ai[k], xr[k], V::fmadd(ar[k], xi[k], V::mul(bi[k], ut)));
        }
        xr[k] = re;
        xi[k] = im;
        acc = V::fmadd(cr[k], re, V::fnmadd(ci[k], im, acc));
      }
      V::store(y + (size_t)t * W, acc);
    }
    for (int k = 0; k < g; ++k) {
      V::store(state + (size_t)(n0 + k) * 2 * W, xr[k]);
      V::store(state + (size_t)(n0 + k) * 2 * W + W, xi[k]);
    }
    n0 += g;
  };
  while (N2 - n0 >= G) run(std::integral_constant<int, G>{});
  while (n0 < N2) run(std::integral_constant<int, 1>{});
}

// ---------------------------------------------------------------- the model
struct Model {
  int n_codes = 256, H0 = 0;
  torch::Tensor embedding;  // (n_codes, H0)
  std::vector<int> pools;
  std::vector<Linear> down, up;          // per tier boundary
  std::vector<std::vector<Layer>> tiers;  // [0] = centre, [1..] = up blocks, deepest first
  torch::Tensor ln_w, ln_b;
  float ln_eps = 1e-5f;  // the final LayerNorm's epsilon
  Linear decoder;
  int n_s4 = 0, widest = 0;
  bool half = false;  // linear weights in half precision
  bool bf16 = false;  // the read's residual layers' linear maps in bfloat16 (see read_product)
  std::string isa;    // the vector type the kernels run with (one of instruction_sets())
  int lanes = 8;      // its width: the S4 layers' channels are packed by it
};

// The rows one group owns: their recurrent state and the activations its team shares.
struct Rows {
  int r0 = 0, n = 0;
  std::vector<Floats> s4;     // per S4 layer: (rows, Hv, N2, 2, lanes), real then imaginary lanes
  std::vector<Floats> alpha;  // per S4 layer: (rows, Hv * lanes), the DPLR low-rank coefficient
  std::vector<Floats> down;  // per pool: (rows, H, p)
  std::vector<Floats> up;    // per up block: (rows, H_out, p)
  Floats h, wide, block_in;
  std::vector<Floats> partial;  // (2 parities x team size): each member's part of a layer's output
  std::vector<Floats> skips;  // per tier, its input
  std::vector<int64_t> code;
  std::atomic<int> arrived{0}, generation{0};
};

// Scratch that each thread keeps to itself.
struct Private {
  Floats h;       // the tier's activations: every member keeps the same copy
  Floats normed, hidden;
  int parity = 0;  // which set of partial buffers the next layer writes
  std::vector<double> prob, score;
  std::vector<int> order;
  Floats mixed;  // guided logits
};

// One residual layer on the group's rows of width H, in place on P.h. Each member normalizes every
// channel, computes its share of the inner units (S4 channels, or feed-forward hidden units) and
// from them its part of every output of the layer's last linear map. After one barrier every
// member adds up the parts (in the same order, so all copies of h stay equal). The parts are
// double-buffered: a member can only write a set again after the next barrier, which no member
// passes before it has read the previous layer's parts.
template <class V>
void layer_step(const Layer& L, Rows& R, Private& P, const Team& team) {
  const int H = L.H, rows = R.n;
  float* h = P.h.data();
  float* normed = P.normed.data();
  float* hidden = P.hidden.data();
  const Floats* parts = R.partial.data() + (size_t)P.parity * team.size;
  float* mine = R.partial[(size_t)P.parity * team.size + team.member].data();
  P.parity ^= 1;
  norm_rows(h, H, normed, H, rows, H, L.norm_m, L.norm_s);
  if (L.kind == FEEDFORWARD) {
    const int F = L.fc1.out;
    auto [f0, f1] = team.share(F, V::lanes);
    product<V>(L.fc1, normed, H, hidden, F, rows, f0, f1, 0, H, true);
    gelu(hidden, rows, F, f0, f1);
    product<V>(L.fc2, hidden, F, mine, H, rows, 0, H, f0, f1, team.lead());
    team.sync();
    for (int r = 0; r < rows; ++r) {
      float* __restrict hr = h + (size_t)r * H;
      for (int m = 0; m < team.size; ++m) {
        const float* __restrict add = parts[m].data() + (size_t)r * H;
#pragma omp simd
        for (int ch = 0; ch < H; ++ch) hr[ch] += add[ch];
      }
    }
    return;
  }
  auto [c0, c1] = team.share(H, V::lanes);
  float* state = R.s4[L.state_index].data();
  float* alpha = R.alpha[L.state_index].data();
  s4_rows<V>(L, normed, hidden, state, alpha, rows, c0, c1);
  for (int r = 0; r < rows; ++r) {
    const float* u = normed + (size_t)r * H;
    float* y = hidden + (size_t)r * H;
#pragma omp simd
    for (int ch = c0; ch < c1; ++ch) y[ch] = 2.f * y[ch] + L.D[ch] * u[ch];
  }
  gelu(hidden, rows, H, c0, c1);
  // the linear half of the GLU, then its gates
  product<V>(L.out, hidden, H, mine, 2 * H, rows, 0, 2 * H, c0, c1, team.lead());
  team.sync();
  const float* g = parts[0].data();
  if (team.size > 1) {
    float* sum = normed;  // free again, and as wide as any layer's 2H
    std::copy(g, g + (size_t)rows * 2 * H, sum);
    for (int m = 1; m < team.size; ++m) {
      const float* __restrict add = parts[m].data();
#pragma omp simd
      for (size_t k = 0; k < (size_t)rows * 2 * H; ++k) sum[k] += add[k];
    }
    g = sum;
  }
  glu_add(g, h, rows, H);
}

// ---------------------------------------------------------------- the read (prefill)
// Rows of time a tier's layers take together: the activations of a block stay in cache (L2).
constexpr int kReadBlock = 256;
// Rows a member's linear layers take at a time, each layer's output still in L1 for the next step.
constexpr int kReadRows = 24;

// One residual layer's feed-forward on rows of width H of a block, in place: every member its own rows.
template <class V>
void read_feedforward(const Layer& L, float* h, int rows, float* normed, float* hidden, float* out, uint32_t* pairs) {
  const int H = L.H, F = L.fc1.out;
  for (int r = 0; r < rows; r += kReadRows) {
    const int n = std::min(kReadRows, rows - r);
    float* hr = h + (size_t)r * H;
    norm_rows(hr, H, normed, H, n, H, L.norm_m, L.norm_s);
    read_product<V>(L.fc1, normed, H, hidden, F, n, pairs);
    gelu(hidden, n, F, 0, F);
    read_product<V>(L.fc2, hidden, F, out, H, n, pairs);
#pragma omp simd
    for (int k = 0; k < n * H; ++k) hr[k] += out[k];
  }
}

struct ReadScratch {
  Floats normed;  // (block, Hv lanes): an S4 layer's norm of the whole block, zero-padded channels
  Floats along;   // (block, lanes): one vector of channels' recurrence outputs
  Floats rows, hidden, out;  // (kReadRows, widest inner layer): a member's rows in a linear layer
  std::vector<uint32_t> pairs;  // (kReadRows, widest inner layer / 2): the same in bfloat16 pairs
};

// An S4 layer on a block of `rows` rows of h (width H) of one batch row, whose norms (`scale`,
// `shift`) the team has worked out: the recurrence along time for this member's vectors of channels
// into the shared `gated` (rows, Hv lanes), a barrier, then the output linear and its GLU for this
// member's rows [r0, r1).
template <class V>
void read_s4(const Layer& L, float* h, int rows, int r0, int r1, const float* scale, const float* shift,
             float* state, float* alpha, float* gated, ReadScratch& S, const Team& team) {
  constexpr int W = V::lanes;
  const int H = L.H;
  const size_t Hp = (size_t)L.Hv * W;
  float* normed = S.normed.data();
  auto [c0, c1] = team.share(H, W);
  apply_norms(h, H, normed, Hp, rows, c0, c1, scale, shift);
  for (int v = c0 / W; v < (c1 + W - 1) / W; ++v) {
    float* along = S.along.data();
    float* st = state + (size_t)v * L.N2 * 2 * W;
    const float* u = normed + v * W;
    if (L.form == FOLDED) {
      s4d_along<V, FOLDED, 4>(L, v, u, Hp, along, rows, st);
    } else if (L.form == DIAG) {
      s4d_along<V, DIAG, 4>(L, v, u, Hp, along, rows, st);
    } else {
      for (int t = 0; t < rows; ++t) s4_vector<V, 1, DPLR>(L, v, u + t * Hp, 0, along + t * W, 0, st, 0, alpha + v * W, 0);
    }
    const float* D = L.D.data() + v * W;
    for (int t = 0; t < rows; ++t) {
      float* __restrict gt = gated + t * Hp + v * W;
      const float* __restrict ut = u + t * Hp;
      const float* __restrict yt = along + (size_t)t * W;
#pragma omp simd
      for (int l = 0; l < W; ++l) gt[l] = 2.f * yt[l] + D[l] * ut[l];
    }
    gelu(gated + v * W, rows, Hp, 0, W);
  }
  team.sync();  // every channel of the block gated
  float* out = S.out.data();
  for (int r = r0; r < r1; r += kReadRows) {
    const int n = std::min(kReadRows, r1 - r);
    read_product<V>(L.out, gated + r * Hp, Hp, out, 2 * H, n, S.pairs.data());
    glu_add(out, h + (size_t)r * H, n, H);
  }
}

// ---------------------------------------------------------------- the step's sampling
inline float max_of(const float* x, int n) {
  float mx = x[0];
#pragma omp simd reduction(max : mx)
  for (int i = 0; i < n; ++i) mx = std::max(mx, x[i]);
  return mx;
}

// The log-partition at temperature 1 (a code's log-probability is logit - log_z).
float log_partition(const float* logits, int n) {
  const float mx = max_of(logits, n);
  double z = 0;
#pragma omp simd reduction(+ : z)
  for (int i = 0; i < n; ++i) z += exp_inline((double)(logits[i] - mx));
  return mx + (float)std::log(z);
}

// How logits become a code; the same rule as fast.Rule and sample_codes in fast.py.
struct Rule {
  float temperature = 1.f, top_p = 1.f, typical = 1.f, guidance = 1.f, surprise = 0.f;
  int top_k = 0;
};
constexpr double kSurpriseRate = 0.1;  // Mirostat's learning rate (fast.Rule.SURPRISE_RATE)
constexpr double kLn2 = 0.6931471805599453;

// Keep the smallest prefix of `order` (first `ranked` entries sorted) whose probability reaches
// `mass` of the total, at least one code; zero the rest.
void keep_prefix(std::vector<double>& prob, const std::vector<int>& order, int n, int ranked, double mass) {
  double total = 0, before = 0;
  for (int i = 0; i < n; ++i) total += prob[i];
  int kept = 0;
  while (kept < ranked && (kept == 0 || before / total < mass)) before += prob[order[kept++]];
  for (int k = kept; k < n; ++k) prob[order[k]] = 0;
}

// Pick a code from logits by inverse CDF with uniform u (same procedure as sample_codes in fast.py):
// probabilities at the temperature; then, in this order, Mirostat's bound (codes whose surprise at
// temperature 1 exceeds *mu bits dropped, the likeliest kept; *mu then moves toward the target),
// locally typical, top-k and top-p.
int sample(const float* logits, int n, float u, const Rule& rule, double* mu, Private& P) {
  if (rule.temperature <= 0.f) return (int)(std::max_element(logits, logits + n) - logits);
  std::vector<double>& prob = P.prob;
  std::vector<int>& order = P.order;
  const float mx = max_of(logits, n);
  const int best = (int)(std::max_element(logits, logits + n) - logits);
  double* pr = prob.data();
#pragma omp simd
  for (int i = 0; i < n; ++i) pr[i] = exp_inline((double)(logits[i] - mx) / rule.temperature);
  double log_z1 = 0;  // temperature 1, relative to mx
  if (mu != nullptr) {
    double z = 0;
    for (int i = 0; i < n; ++i) z += exp_inline((double)(logits[i] - mx));
    log_z1 = std::log(z);
    for (int i = 0; i < n; ++i)
      if (i != best && (log_z1 - (double)(logits[i] - mx)) / kLn2 > *mu) pr[i] = 0;
  }
  if (rule.typical < 1.f) {
    double total = 0, entropy = 0;
    for (int i = 0; i < n; ++i) total += pr[i];
    const double log_total = std::log(total);
    std::vector<double>& score = P.score;
    for (int i = 0; i < n; ++i)
      if (pr[i] > 0) entropy += pr[i] / total * (log_total - std::log(pr[i]));
    for (int i = 0; i < n; ++i)
      score[i] = pr[i] > 0 ? std::abs(log_total - std::log(pr[i]) - entropy) : INFINITY;
    std::iota(order.begin(), order.begin() + n, 0);
    std::stable_sort(order.begin(), order.begin() + n, [&](int i, int j) { return score[i] < score[j]; });
    keep_prefix(prob, order, n, n, rule.typical);
  }
  if ((rule.top_k > 0 && rule.top_k < n) || rule.top_p < 1.f) {
    // likeliest first, ties by index (as a stable sort); only the first top_k need ordering
    std::iota(order.begin(), order.begin() + n, 0);
    auto likelier = [&](int i, int j) { return prob[i] > prob[j] || (prob[i] == prob[j] && i < j); };
    const int ranked = rule.top_k > 0 && rule.top_k < n ? rule.top_k : n;
    std::partial_sort(order.begin(), order.begin() + ranked, order.begin() + n, likelier);
    keep_prefix(prob, order, n, ranked, rule.top_p);
  }
  double total = 0;
  for (int i = 0; i < n; ++i) total += prob[i];
  const double target = u * total;
  double cum = 0;
  int code = n - 1;
  for (int i = 0; i < n; ++i) {
    cum += prob[i];
    if (prob[i] > 0 && cum > target) {
      code = i;
      break;
    }
  }
  while (prob[code] == 0 && code > 0) --code;
  if (mu != nullptr) *mu -= kSurpriseRate * ((log_z1 - (double)(logits[code] - mx)) / kLn2 - rule.surprise);
  return code;
}

// What one call asks for, shared by every thread.
struct Job {
  int n = 0;
  int64_t t0 = 0;
  const float* uniforms = nullptr;  // (B, n)
  const int64_t* forced = nullptr;  // (B, n) or null
  Rule rule;
  double* mu = nullptr;             // (B,) Mirostat bounds in bits, or null
  int64_t* codes = nullptr;         // (B, n)
  float* logprobs = nullptr;        // (B, n)
  float* logits = nullptr;          // (B, n, V) or null
};

// For its lifetime, this thread treats denormal floats as zero (x86 FTZ and DAZ): a denormal
// operand or result costs a microcode assist of a hundred cycles or more, and values that small
// are zero next to the activations anyway. The thread's own mode comes back afterwards (the
// threads are OpenMP's, which torch shares).
class DenormalsAsZero {
 public:
#if defined(__x86_64__) && defined(__SSE__)
  DenormalsAsZero() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~DenormalsAsZero() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// The threads of the current parallel region (OpenMP may start fewer than were asked for).
int team_threads() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

int thread_number() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

class FastSaShiMi {
 public:
  // isa: the vector type to run with, one of instruction_sets(); empty for the widest.
  FastSaShiMi(torch::Tensor embedding, std::vector<int64_t> pools, std::vector<torch::Tensor> down_w,
              std::vector<torch::Tensor> down_b, std::vector<torch::Tensor> up_w, std::vector<torch::Tensor> up_b,
              torch::Tensor ln_w, torch::Tensor ln_b, double ln_eps, torch::Tensor dec_w, torch::Tensor dec_b,
              bool half, std::string isa, bool bf16) {
    const auto available = instruction_sets();
    if (isa.empty()) isa = available.front();
    TORCH_CHECK(std::find(available.begin(), available.end(), isa) != available.end(), "instruction set '", isa,
                "' is not available here (this build and CPU have: ", torch::str(available), ")");
    M.isa = isa;
    M.lanes = with_vectors(isa, [](auto v) { return decltype(v)::lanes; });
    M.half = half;
#ifdef S4MUSIC_BF16
    M.bf16 = bf16 && isa == Avx512::name && __builtin_cpu_supports("avx512bf16");
#endif
    M.embedding = embedding.contiguous();
    M.n_codes = embedding.size(0);
    M.H0 = embedding.size(1);
    for (auto p : pools) M.pools.push_back((int)p);
    for (size_t i = 0; i < down_w.size(); ++i) M.down.emplace_back(down_w[i], down_b[i], half);
    for (size_t i = 0; i < up_w.size(); ++i) M.up.emplace_back(up_w[i], up_b[i], half);
    M.tiers.resize(pools.size() + 1);
    M.ln_w = ln_w.contiguous();
    M.ln_b = ln_b.contiguous();
    M.ln_eps = (float)ln_eps;
    M.decoder = Linear(dec_w, dec_b, half);
    M.widest = std::max(M.H0, M.n_codes);
    for (const Linear& l : M.down) M.widest = std::max({M.widest, l.in, l.out});
    for (const Linear& l : M.up) M.widest = std::max(M.widest, l.out);
  }

  // Whether the linear weights are held in half precision (asked for, and the CPU converts it).
  bool half_weights() const { return M.decoder.half; }
  // What the read's linear layers compute in: "bf16" (asked for, and the CPU has AVX512-BF16) or "float32".
  std::string read_precision() const {
    for (const auto& tier : M.tiers)
      for (const Layer& L : tier)
        if (!L.out.wpairs.empty() || !L.fc1.wpairs.empty()) return "bf16";
    return "float32";  // not asked for, no AVX512-BF16, or no layer a whole number of panels wide
  }
  std::string instruction_set() const { return M.isa; }

  // tier: 0 centre, 1.. up blocks deepest first. Tensors by name: a feed-forward layer's fc1_w, fc1_b,
  // fc2_w, fc2_b; an S4 layer's a, b, c (complex (H, N2), see S4Kernel.step_params), D, out_w, out_b,
  // and for DPLR also p, g, q (complex (H, N2)), kappa and cg (H).
  void add_layer(int tier, Kind kind, double norm_m, double norm_s, const std::map<std::string, torch::Tensor>& t) {
    Layer L;
    L.kind = kind;
    L.norm_m = (float)norm_m;
    L.norm_s = (float)norm_s;
    L.lanes = M.lanes;
    auto floats = [](const torch::Tensor& x) {
      auto c = x.contiguous();
      return Floats(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
    };
    auto get = [&](const char* name) {
      auto it = t.find(name);
      TORCH_CHECK(it != t.end(), "add_layer: no tensor '", name, "'");
      return it->second;
    };
    if (kind == FEEDFORWARD) {
      L.fc1 = Linear(get("fc1_w"), get("fc1_b"), M.half, M.bf16);
      L.fc2 = Linear(get("fc2_w"), get("fc2_b"), M.half, M.bf16);
      L.H = L.fc1.in;
      M.widest = std::max(M.widest, L.fc1.out);
    } else {
      const auto a = get("a");
      L.H = a.size(0);
      L.N2 = a.size(1);
      L.Hv = (L.H + L.lanes - 1) / L.lanes;
      const auto b = get("b").to(torch::kComplexDouble);
      L.form = kind == S4_DPLR ? DPLR : (b.abs() > 1e-15).all().item<bool>() ? FOLDED : DIAG;
      const auto c = get("c").to(torch::kComplexDouble), a64 = a.to(torch::kComplexDouble);
      std::vector<torch::Tensor> stacked{a64, b, c};
      if (L.form == FOLDED) {
        L.b = b;
        stacked = {a64, c * b};
      }
      if (L.form == DPLR) stacked.insert(stacked.end(), {get("q").to(torch::kComplexDouble), get("p").to(torch::kComplexDouble)});
      L.packed = floats(L.to_lanes(torch::stack(stacked)).permute({1, 2, 0, 3, 4}));  // (F, Hv, ...) -> (Hv, N2, F, ...)
      L.D = floats(L.padded(get("D")));
      L.out = Linear(get("out_w"), get("out_b"), M.half, M.bf16);
      if (kind == S4_DPLR) {
        L.p = get("p").to(torch::kComplexDouble);
        L.g = get("g").to(torch::kComplexDouble);
        L.kappa = floats(L.padded(get("kappa")));
        L.cg = floats(L.padded(get("cg")));
      }
      L.state_index = M.n_s4++;
      M.widest = std::max(M.widest, 2 * L.H);
    }
    M.tiers[tier].push_back(L);
  }

  // Continue from the given state for n steps. codes0 (B,) are the first inputs. uniforms (B, n)
  // drive sampling; forced (B, n) codes, if not empty, replace the samples (teacher forcing) and
  // the logits are returned too. States are updated in place. Returns codes, logprobs[, logits].
  // guidance != 1: rows in pairs (heard the prompt, did not), both given the code drawn from
  // free + guidance (prompt - free), each its own log-probability. mu (B,) float64, if not empty:
  // Mirostat's bounds in bits, toward the target `surprise`, updated in place.
  std::vector<torch::Tensor> run(torch::Tensor codes0, int64_t t0, std::vector<torch::Tensor> s4_states,
                                 std::vector<torch::Tensor> down_states, std::vector<torch::Tensor> up_states,
                                 torch::Tensor uniforms, double temperature, int64_t top_k, double top_p,
                                 torch::Tensor forced, double typical, double guidance, double surprise,
                                 torch::Tensor mu) {
    const int B = codes0.size(0);
    const bool teacher = forced.numel() > 0;
    const int pair = guidance != 1.0 && !teacher ? 2 : 1;  // rows that sample together, in one group
    TORCH_CHECK(B % pair == 0, "run: guidance takes rows in pairs");
    TORCH_CHECK(mu.numel() == 0 || (mu.numel() == B && mu.scalar_type() == torch::kDouble && mu.is_contiguous()),
                "run: mu must be (B,) float64");
    auto codes = torch::empty({B, uniforms.size(1)}, torch::kLong);
    auto logprobs = torch::empty({B, uniforms.size(1)}, torch::kFloat);
    auto logits = teacher ? torch::empty({B, uniforms.size(1), M.n_codes}, torch::kFloat) : torch::empty({0});
    Job job;
    job.n = uniforms.size(1);
    job.t0 = t0;
    job.uniforms = uniforms.data_ptr<float>();
    job.forced = teacher ? forced.data_ptr<int64_t>() : nullptr;
    job.rule = Rule{(float)temperature, (float)top_p, (float)typical, (float)guidance, (float)surprise, (int)top_k};
    job.mu = mu.numel() ? mu.data_ptr<double>() : nullptr;
    job.codes = codes.data_ptr<int64_t>();
    job.logprobs = logprobs.data_ptr<float>();
    job.logits = teacher ? logits.data_ptr<float>() : nullptr;

    const int threads = max_threads();
    // A team meets at a barrier every layer, and past 4 members the meetings cost more than the split
    // saves (measured on a 16-core Xeon: benchmarks/RESULTS.md, the GPU machine's section).
    const int units = B / pair;
    const int n_groups = std::max(1, std::min(units, threads)), team = std::clamp(threads / n_groups, 1, kMaxTeam);
    std::vector<Rows> groups(n_groups);
    const int64_t* c0 = codes0.data_ptr<int64_t>();
    for (int g = 0; g < n_groups; ++g) {
      Rows& R = groups[g];
      R.r0 = pair * (units * g / n_groups);
      R.n = pair * (units * (g + 1) / n_groups) - R.r0;
      load_state(R, s4_states, down_states, up_states);
      R.code.assign(c0 + R.r0, c0 + R.r0 + R.n);
      R.partial.assign(2 * team, Floats((size_t)R.n * M.widest));
    }
    with_vectors(M.isa, [&](auto vectors) {
      using V = decltype(vectors);
#pragma omp parallel num_threads(n_groups * team)
      {
        const DenormalsAsZero flush;
        const int tid = thread_number();
        if (team_threads() == n_groups * team) {
          Rows& R = groups[tid / team];
          run_group<V>(R, Team{tid % team, team, &R.arrived, &R.generation}, job);
        } else if (tid == 0) {  // OpenMP started fewer threads than asked: one does every group
          for (Rows& R : groups) run_group<V>(R, Team{0, 1, &R.arrived, &R.generation}, job);
        }
      }
    });
    for (Rows& R : groups) store_state(R, s4_states, down_states, up_states);
    if (teacher) return {codes, logprobs, logits};
    return {codes, logprobs};
  }

  // The final LayerNorm and decoder on h (B, L, H0), scored: the bits of each of targets (B, L) ->
  // (B, L) float32. Rows in stretches whose logits stay in L1; no (B, L, n_codes) tensor.
  torch::Tensor head_bits(torch::Tensor h, torch::Tensor targets) {
    TORCH_CHECK(h.dim() == 3 && h.size(2) == M.H0 && h.scalar_type() == torch::kFloat && h.is_contiguous(),
                "head_bits: h must be (B, L, ", M.H0, ") float32");
    TORCH_CHECK(targets.sizes() == h.sizes().slice(0, 2) && targets.scalar_type() == torch::kLong,
                "head_bits: targets must be (B, L) int64");
    TORCH_CHECK(targets.numel() == 0 || (targets.min().item<int64_t>() >= 0 && targets.max().item<int64_t>() < M.n_codes),
                "head_bits: targets must be codes from 0 to ", M.n_codes - 1);
    const int64_t rows = h.size(0) * h.size(1);
    const int H0 = M.H0, V_codes = M.n_codes;
    auto bits = torch::empty({h.size(0), h.size(1)}, torch::kFloat);
    const float *x = h.data_ptr<float>(), *lw = M.ln_w.data_ptr<float>(), *lb = M.ln_b.data_ptr<float>();
    const int64_t* code = targets.data_ptr<int64_t>();
    float* out = bits.data_ptr<float>();
    const int64_t stretches = (rows + kReadRows - 1) / kReadRows;
    const int threads = std::max(1, max_threads());
    std::vector<Floats> normed_of(threads, Floats((size_t)kReadRows * H0)),
        logits_of(threads, Floats((size_t)kReadRows * V_codes));
    with_vectors(M.isa, [&](auto vectors) {
      using V = decltype(vectors);
#pragma omp parallel num_threads(threads)
      {
        const DenormalsAsZero flush;
        Floats &normed = normed_of[thread_number()], &logits = logits_of[thread_number()];
#pragma omp for schedule(static)
        for (int64_t k = 0; k < stretches; ++k) {
          const int64_t r0 = k * kReadRows;
          const int n = (int)std::min<int64_t>(kReadRows, rows - r0);
          for (int r = 0; r < n; ++r) {
            const float* xr = x + (r0 + r) * H0;
            const auto [mean, var] = mean_var(xr, H0);
            const float inv = 1.f / std::sqrt(var + M.ln_eps);
#pragma omp simd
            for (int i = 0; i < H0; ++i) normed[(size_t)r * H0 + i] = (xr[i] - mean) * inv * lw[i] + lb[i];
          }
          product<V, 6>(M.decoder, normed.data(), H0, logits.data(), V_codes, n, 0, V_codes, 0, H0, true);
          for (int r = 0; r < n; ++r) {
            const float* lg = logits.data() + (size_t)r * V_codes;
            const float mx = *std::max_element(lg, lg + V_codes);
            float z = 0.f;
#pragma omp simd reduction(+ : z)
            for (int i = 0; i < V_codes; ++i) z += exp_inline(lg[i] - mx);
            out[r0 + r] = (std::log(z) + mx - lg[code[r0 + r]]) * 1.4426950408889634f;  // nats to bits
          }
        }
      }
    });
    return bits;
  }

  // The residual layers of one tier (0 centre, 1.. up blocks deepest first) over a whole sequence,
  // with the residual around the tier: x + layers(x), where x = h + skip (h alone if skip is empty),
  // into h. h and skip (B, L, H) float32; states, one per S4 layer of the tier in order, complex
  // (B, H, N2), the states before x on the way in and after it on the way out.
  void read(int64_t tier, torch::Tensor h, torch::Tensor skip, std::vector<torch::Tensor> states) {
    TORCH_CHECK(tier >= 0 && tier < (int64_t)M.tiers.size(), "read: no tier ", tier);
    const auto& layers = M.tiers[tier];
    TORCH_CHECK(h.dim() == 3 && h.scalar_type() == torch::kFloat && h.is_contiguous(), "read: h must be (B, L, H) float32");
    const bool with_skip = skip.numel() > 0;
    TORCH_CHECK(!with_skip || (skip.sizes() == h.sizes() && skip.scalar_type() == torch::kFloat && skip.is_contiguous()),
                "read: skip must be empty or as h");
    if (h.numel() == 0) return;
    if (layers.empty()) {
      h.mul_(2);  // x + x
      if (with_skip) h.add_(skip, 2);
      return;
    }
    const int B = h.size(0), L = h.size(1), H = h.size(2);
    TORCH_CHECK(H == layers.front().H, "read: tier ", tier, " is ", layers.front().H, " channels wide, h has ", H);
    std::vector<const Layer*> s4;
    int widest = 2 * H;
    for (const Layer& layer : layers) {
      if (layer.kind != FEEDFORWARD) s4.push_back(&layer);
      else widest = std::max(widest, layer.fc1.out);
    }
    TORCH_CHECK(states.size() == s4.size(), "read: tier ", tier, " has ", s4.size(), " S4 layers, got ", states.size(),
                " states");
    std::vector<Floats> packed(s4.size()), alpha(s4.size());
    for (size_t k = 0; k < s4.size(); ++k) {
      TORCH_CHECK(states[k].dim() == 3 && states[k].size(0) == B && states[k].size(1) == H &&
                      states[k].size(2) == s4[k]->N2,
                  "read: state ", k, " of tier ", tier, " must be (", B, ", ", H, ", ", s4[k]->N2, ")");
      s4[k]->pack(states[k], packed[k], alpha[k]);
    }
    const int Hv = (H + M.lanes - 1) / M.lanes;
    const size_t Hp = (size_t)Hv * M.lanes;
    Floats gated((size_t)kReadBlock * Hp), scale(kReadBlock), shift(kReadBlock), x((size_t)kReadBlock * H);
    const float* skip_p = with_skip ? skip.data_ptr<float>() : nullptr;
    std::atomic<int> arrived{0}, generation{0};
    const int threads = std::max(1, max_threads());
    std::vector<ReadScratch> scratch(threads);  // allocated here: an exception must not leave a parallel region
    for (ReadScratch& S : scratch) {
      S.normed.assign((size_t)kReadBlock * Hp, 0.f);
      S.along.resize((size_t)kReadBlock * M.lanes);
      for (auto* v : {&S.rows, &S.hidden, &S.out}) v->resize((size_t)kReadRows * widest);
      S.pairs.resize((size_t)kReadRows * ((widest + 1) / 2));
    }
    float* hp = h.data_ptr<float>();
    with_vectors(M.isa, [&](auto vectors) {
      using V = decltype(vectors);
#pragma omp parallel num_threads(threads)
      {
        const DenormalsAsZero flush;
        const Team team{thread_number(), team_threads(), &arrived, &generation};  // as many as OpenMP started
        ReadScratch& S = scratch[team.member];
        for (int b = 0; b < B; ++b)
          for (int t0 = 0; t0 < L; t0 += kReadBlock) {
            const int rows = std::min(kReadBlock, L - t0);
            float* block = hp + ((size_t)b * L + t0) * H;
            const auto [r0, r1] = team.share(rows, 8);
            const size_t own0 = (size_t)r0 * H, own1 = (size_t)r1 * H;  // this member's rows, as elements
            if (with_skip) {
              const float* s = skip_p + ((size_t)b * L + t0) * H;
#pragma omp simd
              for (size_t e = own0; e < own1; ++e) block[e] += s[e];
            }
            std::copy(block + own0, block + own1, x.data() + own0);
            size_t k = 0;
            for (const Layer& layer : layers) {
              if (layer.kind == FEEDFORWARD) {
                read_feedforward<V>(layer, block + (size_t)r0 * H, r1 - r0, S.rows.data(), S.hidden.data(),
                                    S.out.data(), S.pairs.data());
                continue;
              }
              row_norms(block + (size_t)r0 * H, H, r1 - r0, H, layer.norm_m, layer.norm_s, scale.data() + r0,
                        shift.data() + r0);
              team.sync();  // every row of the block is in, and its norm
              read_s4<V>(layer, block, rows, r0, r1, scale.data(), shift.data(), packed[k].data() + b * layer.state_size(),
                         alpha[k].data() + (size_t)b * Hp, gated.data(), S, team);
              ++k;
            }
#pragma omp simd
            for (size_t e = own0; e < own1; ++e) block[e] += x[e];  // the tier's residual
            team.sync();  // the next block's first S4 layer rewrites `gated`
          }
      }
    });
    for (size_t k = 0; k < s4.size(); ++k) s4[k]->unpack(packed[k], alpha[k], states[k]);
  }

 private:
  Model M;

  // States in torch's layout (B, H, N2) complex64 <-> this group's rows, packed (rows, Hv, N2, 2, lanes).
  void load_state(Rows& R, std::vector<torch::Tensor>& s4_states, std::vector<torch::Tensor>& down_states,
                  std::vector<torch::Tensor>& up_states) const {
    const int r1 = R.r0 + R.n;
    R.s4.assign(M.n_s4, Floats());
    R.alpha.assign(M.n_s4, Floats());
    for (auto& tier : M.tiers)
      for (const Layer& L : tier)
        if (L.kind != FEEDFORWARD)
          L.pack(s4_states[L.state_index].slice(0, R.r0, r1), R.s4[L.state_index], R.alpha[L.state_index]);
    auto copy_rows = [&](std::vector<torch::Tensor>& from, std::vector<Floats>& to) {
      for (auto& s : from) {
        auto part = s.slice(0, R.r0, r1).contiguous();
        to.emplace_back(part.data_ptr<float>(), part.data_ptr<float>() + part.numel());
      }
    };
    copy_rows(down_states, R.down);
    copy_rows(up_states, R.up);
    const size_t wide = (size_t)R.n * M.widest;
    for (auto* v : {&R.h, &R.wide, &R.block_in}) v->resize(wide);
    R.skips.assign(M.pools.size() + 1, Floats(wide));
  }

  void store_state(Rows& R, std::vector<torch::Tensor>& s4_states, std::vector<torch::Tensor>& down_states,
                   std::vector<torch::Tensor>& up_states) const {
    const int r1 = R.r0 + R.n;
    for (auto& tier : M.tiers)
      for (const Layer& L : tier)
        if (L.kind != FEEDFORWARD)
          L.unpack(R.s4[L.state_index], R.alpha[L.state_index], s4_states[L.state_index].slice(0, R.r0, r1));
    for (size_t i = 0; i < down_states.size(); ++i)
      down_states[i].slice(0, R.r0, r1).copy_(torch::from_blob(R.down[i].data(), down_states[i].slice(0, R.r0, r1).sizes()));
    for (size_t i = 0; i < up_states.size(); ++i)
      up_states[i].slice(0, R.r0, r1).copy_(torch::from_blob(R.up[i].data(), up_states[i].slice(0, R.r0, r1).sizes()));
  }

  // The tier's layers on every member's own copy of h, which starts from R.h and goes back to it.
  template <class V>
  void tier_step(int tier, Rows& R, Private& P, const Team& team) const {
    if (M.tiers[tier].empty()) return;
    const size_t width = (size_t)R.n * M.tiers[tier].front().H;
    std::copy(R.h.begin(), R.h.begin() + width, P.h.begin());
    for (const Layer& L : M.tiers[tier]) layer_step<V>(L, R, P, team);
    if (team.lead()) std::copy(P.h.begin(), P.h.begin() + width, R.h.begin());
  }

  // The group's rows for job.n steps. The lead member does the cheap serial parts (encoder,
  // pooling buffers, sampling); the layers and the decoder are shared.
  template <class V>
  void run_group(Rows& R, const Team& team, const Job& job) const {
    const int rows = R.n, n_tiers = (int)M.pools.size(), H0 = M.H0, V_codes = M.n_codes;
    Private P;
    for (auto* v : {&P.h, &P.normed, &P.hidden}) v->resize((size_t)rows * M.widest);
    for (auto* v : {&P.prob, &P.score}) v->resize(V_codes);
    P.order.resize(V_codes);
    P.mixed.resize(V_codes);
    const float* E = M.embedding.data_ptr<float>();
    float* h = R.h.data();

    for (int step = 0; step < job.n; ++step) {
      const int64_t t = job.t0 + step;
      // Which tiers step now: tier i when (t + 1) is a multiple of the pools below it.
      int depth = 0;
      for (int64_t period = 1; depth < n_tiers; ++depth) {
        period *= M.pools[depth];
        if ((t + 1) % period) break;
      }
      if (team.lead()) {
        // encoder; skips[i] holds tier i's input
        for (int r = 0; r < rows; ++r)
          std::copy(E + R.code[r] * H0, E + (R.code[r] + 1) * H0, h + (size_t)r * H0);
        std::copy(h, h + (size_t)rows * H0, R.skips[0].data());
        int H = H0;
        int64_t period = 1;
        for (int i = 0; i < n_tiers; ++i) {
          const int p = M.pools[i];
          const int slot = (int)((t / period) % p);
          float* buf = R.down[i].data();  // (rows, H, p)
          for (int r = 0; r < rows; ++r)
            for (int ch = 0; ch < H; ++ch) buf[((size_t)r * H + ch) * p + slot] = h[(size_t)r * H + ch];
          if (i >= depth) break;
          apply<V>(M.down[i], buf, h, rows);
          H = M.down[i].out;
          period *= p;
          std::copy(h, h + (size_t)rows * H, R.skips[i + 1].data());
        }
      }
      team.sync();
      if (depth == n_tiers) {
        tier_step<V>(0, R, P, team);
        if (team.lead()) {
          const float* skip = R.skips[depth].data();
          const size_t width = (size_t)rows * (n_tiers ? M.down.back().out : H0);
          for (size_t k = 0; k < width; ++k) h[k] += skip[k];
        }
      }
      for (int j = 0; j < n_tiers; ++j) {
        const int out_tier = n_tiers - 1 - j;
        if (out_tier > depth) continue;
        const int Ho = M.up[j].out / M.pools[out_tier];
        const size_t width = (size_t)rows * Ho;
        float* block_in = R.block_in.data();  // the block's input, added again after it
        if (team.lead()) {
          int64_t per = 1;
          for (int k = 0; k < out_tier; ++k) per *= M.pools[k];
          const int p = M.pools[out_tier];
          const int slot = (int)((t / per) % p);
          float* buf = R.up[j].data();  // (rows, Ho, p)
          for (int r = 0; r < rows; ++r)
            for (int ch = 0; ch < Ho; ++ch) block_in[(size_t)r * Ho + ch] = buf[((size_t)r * Ho + ch) * p + slot];
          if (out_tier < depth) apply<V>(M.up[j], h, buf, rows);
          const float* skip = R.skips[out_tier].data();
          for (size_t k = 0; k < width; ++k) block_in[k] += skip[k];
          std::copy(block_in, block_in + width, h);
        }
        team.sync();
        tier_step<V>(j + 1, R, P, team);
        if (team.lead())
          for (size_t k = 0; k < width; ++k) h[k] += block_in[k];
      }
      // final LayerNorm, by every member, and the decoder's outputs shared
      team.sync();
      const float* lw = M.ln_w.data_ptr<float>();
      const float* lb = M.ln_b.data_ptr<float>();
      float* normed = P.normed.data();
      for (int r = 0; r < rows; ++r) {
        const float* x = h + (size_t)r * H0;
        const auto [mean, var] = mean_var(x, H0);
        const float inv = 1.f / std::sqrt(var + M.ln_eps);
        for (int i = 0; i < H0; ++i) normed[(size_t)r * H0 + i] = (x[i] - mean) * inv * lw[i] + lb[i];
      }
      float* logits = R.wide.data();
      auto [o0, o1] = team.share(V_codes, V::lanes);
      product<V>(M.decoder, normed, H0, logits, V_codes, rows, o0, o1, 0, H0, true);
      team.sync();
      if (team.lead()) pick_codes(R, P, job, step, logits);
    }
  }

  void pick_codes(Rows& R, Private& P, const Job& job, int step, const float* logits) const {
    const int V = M.n_codes;
    const bool guided = job.rule.guidance != 1.f && !job.forced;
    for (int r = 0; r < R.n; r += guided ? 2 : 1) {
      const size_t at = (size_t)(R.r0 + r) * job.n + step;
      const float* lg = logits + (size_t)r * V;
      int c;
      if (job.forced) {  // teacher-forced scoring: nothing to sample
        c = (int)job.forced[at];
        std::copy(lg, lg + V, job.logits + at * V);
      } else {
        const float* from = lg;
        if (guided) {  // in double, rounded once, as sample_codes does
          const float* free = lg + V;
          const double g = job.rule.guidance;
          float* mixed = P.mixed.data();
          for (int i = 0; i < V; ++i) mixed[i] = (float)((double)free[i] + g * ((double)lg[i] - (double)free[i]));
          from = mixed;
        }
        c = sample(from, V, job.uniforms[at], job.rule, job.mu ? job.mu + R.r0 + r : nullptr, P);
      }
      job.codes[at] = c;
      job.logprobs[at] = lg[c] - log_partition(lg, V);
      R.code[r] = c;
      if (guided) {  // the row that did not hear the prompt goes on with the same code
        const float* free = lg + V;
        job.codes[at + job.n] = c;
        job.logprobs[at + job.n] = free[c] - log_partition(free, V);
        R.code[r + 1] = c;
      }
    }
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::enum_<Kind>(m, "LayerKind")
      .value("S4D", S4_DIAG)
      .value("DPLR", S4_DPLR)
      .value("FEEDFORWARD", FEEDFORWARD);
  m.def("instruction_sets", &instruction_sets, "the vector instruction sets this build runs on this CPU, widest first");
  pybind11::class_<FastSaShiMi>(m, "FastSaShiMi")
      .def(pybind11::init<torch::Tensor, std::vector<int64_t>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                          std::vector<torch::Tensor>, std::vector<torch::Tensor>, torch::Tensor, torch::Tensor, double,
                          torch::Tensor, torch::Tensor, bool, std::string, bool>(),
           pybind11::arg("embedding"), pybind11::arg("pools"), pybind11::arg("down_w"), pybind11::arg("down_b"),
           pybind11::arg("up_w"), pybind11::arg("up_b"), pybind11::arg("ln_w"), pybind11::arg("ln_b"),
           pybind11::arg("ln_eps"), pybind11::arg("dec_w"), pybind11::arg("dec_b"), pybind11::arg("half"),
           pybind11::arg("isa") = "", pybind11::arg("bf16") = false)
      .def("add_layer", &FastSaShiMi::add_layer, pybind11::arg("tier"), pybind11::arg("kind"), pybind11::arg("norm_m"),
           pybind11::arg("norm_s"), pybind11::arg("tensors"))
      .def("half_weights", &FastSaShiMi::half_weights)
      .def("instruction_set", &FastSaShiMi::instruction_set)
      .def("read_precision", &FastSaShiMi::read_precision)
      .def("run", &FastSaShiMi::run, pybind11::arg("codes0"), pybind11::arg("t0"), pybind11::arg("s4_states"),
           pybind11::arg("down_states"), pybind11::arg("up_states"), pybind11::arg("uniforms"),
           pybind11::arg("temperature"), pybind11::arg("top_k"), pybind11::arg("top_p"), pybind11::arg("forced"),
           pybind11::arg("typical") = 1.0, pybind11::arg("guidance") = 1.0, pybind11::arg("surprise") = 0.0,
           pybind11::arg("mu") = torch::empty({0}, torch::kDouble),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("read", &FastSaShiMi::read, pybind11::arg("tier"), pybind11::arg("h"), pybind11::arg("skip"),
           pybind11::arg("states"),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("head_bits", &FastSaShiMi::head_bits, pybind11::arg("h"), pybind11::arg("targets"),
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
