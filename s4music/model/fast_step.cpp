// The whole SaShiMi recurrent step, fused in C++ for the CPU: one call generates many samples.
//
// Python (s4music/model/fast.py) hands over every weight once, already in step form:
//   S4 layers as an O(N) recurrence: diagonal (S4D) or DPLR through Sherman-Morrison, exact in
//   float32 (no eigendecomposition, which is ill-conditioned for HiPPO matrices),
//   weight-normed pooling weights as plain matrices.
// The reference is SaShiMi.step in sashimi.py; tests compare the two logit for logit.
//
// At batch 1 a step is a chain of small matrix-vector products, bound by reading the weights.
// The layout answers that:
//   linear layers  weights stored by input, so a row of the batch is a sum of weight rows scaled
//                  by its inputs: register tiles of outputs, no horizontal sums; in panels of 16
//                  outputs (see kPanel), so a tile's weights are sequential streams;
//   S4 recurrence  parameters and state packed by vectors of 8 channels, so the SIMD lanes are
//                  channels, the sums over the state stay in registers, and each layer's
//                  parameters are one sequential stream;
//   GELU, gates    erf and exp from glibc's vector math library (libmvec) where it exists.
// Threads: rows of the batch (variations) are split into groups, one per thread. With fewer rows
// than threads, a group gets a team of up to 4 threads that splits every layer's inner units (S4
// channels, hidden units) and meets at one barrier per layer to add up its parts.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <numeric>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define S4MUSIC_AVX2 1
#endif

#if defined(__GLIBC__) && defined(__x86_64__)
// glibc declares its vector variants only under -ffast-math; declaring them here lets the GELU
// and gate loops call libmvec (linked through libm) without fast-math elsewhere.
extern "C" {
#pragma omp declare simd notinbranch
float erff(float);
#pragma omp declare simd notinbranch
float expf(float);
}
#endif

namespace {

constexpr int kMaxTeam = 4;  // threads that share one group of rows (see FastSaShiMi::run)

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

// The threads that share one group of rows. Work is split in blocks of 8 channels (one vector).
struct Team {
  int member = 0, size = 1;
  std::atomic<int>* arrived = nullptr;
  std::atomic<int>* generation = nullptr;

  std::pair<int, int> share(int n) const {
    const int blocks = (n + 7) / 8;
    return {std::min(n, 8 * (blocks * member / size)), std::min(n, 8 * (blocks * (member + 1) / size))};
  }
  // Everyone waits here until the whole team has arrived; spins briefly, then yields the core.
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

// Linear weights are stored in panels of kPanel outputs, each panel contiguous over the inputs:
// (out / kPanel, in, kPanel), zero-padded to whole panels. A tile then reads its weights as a few
// sequential streams, which the prefetchers follow, instead of kPanel values every `out`.
constexpr int kPanel = 16;

struct Linear {
  // weights in panels (see kPanel), in float32 or, with `half`, IEEE half precision; bias (out)
  Floats wt, b;
  std::vector<uint16_t> wt16;
  int in = 0, out = 0;
  bool half = false;
  Linear() = default;
  Linear(const torch::Tensor& w, const torch::Tensor& bias, bool half_weights = false)
      : in(w.size(1)), out(w.size(0)) {
    const int panels = (out + kPanel - 1) / kPanel;
    auto t = at::constant_pad_nd(w, {0, 0, 0, panels * kPanel - out}).view({panels, kPanel, in}).transpose(1, 2)
                 .contiguous();
#ifdef S4MUSIC_AVX2
    half = half_weights;
#endif
    if (half) {
      auto h = t.to(torch::kHalf).contiguous();
      const uint16_t* raw = reinterpret_cast<const uint16_t*>(h.data_ptr<at::Half>());
      wt16.assign(raw, raw + h.numel());
    } else {
      wt.assign(t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
    }
    auto bc = bias.contiguous();
    b.assign(bc.data_ptr<float>(), bc.data_ptr<float>() + bc.numel());
  }

  // Where weight (input i, output o) is stored.
  size_t at(int i, int o) const { return ((size_t)(o / kPanel) * in + i) * kPanel + o % kPanel; }

  float weight(int i, int o) const {
#ifdef S4MUSIC_AVX2
    if (half) return _cvtsh_ss(wt16[at(i, o)]);
#endif
    return wt[at(i, o)];
  }

  // Outputs [o0, o1) of y[r] = W[:, i0:i1] x[r][i0:i1] (+ b) for `rows` rows; plain loops, any widths
  // (the whole product without AVX2, else the tail of a width). A panel's outputs for one input
  // are contiguous, so the loop over them vectorizes.
  void columns(const float* x, float* y, int rows, int o0, int o1, int i0, int i1, bool bias) const {
    for (int r = 0; r < rows; ++r) {
      float* __restrict yr = y + (size_t)r * out;
      const float* xr = x + (size_t)r * in;
      for (int o = o0; o < o1; ++o) yr[o] = bias ? b[o] : 0.f;
      for (int start = o0; start < o1; start = (start / kPanel + 1) * kPanel) {
        const int end = std::min(o1, (start / kPanel + 1) * kPanel);
        if (!half && start % kPanel == 0 && end - start == kPanel) {  // a whole panel: sums in registers
          float acc[kPanel];
          std::copy(yr + start, yr + end, acc);
          for (int i = i0; i < i1; ++i) {
            const float* __restrict w = wt.data() + at(i, start);
            const float xi = xr[i];
#pragma omp simd
            for (int q = 0; q < kPanel; ++q) acc[q] += w[q] * xi;
          }
          std::copy(acc, acc + kPanel, yr + start);
          continue;
        }
        for (int i = i0; i < i1; ++i) {
          const float xi = xr[i];
          if (half) {
            for (int o = start; o < end; ++o) yr[o] += weight(i, o) * xi;
            continue;
          }
          const float* __restrict w = wt.data() + at(i, start) - start;  // w[o]: weight (i, o)
#pragma omp simd
          for (int o = start; o < end; ++o) yr[o] += w[o] * xi;
        }
      }
    }
  }

#ifdef S4MUSIC_AVX2
  template <bool Half>
  __m256 load8(size_t at) const {
    if constexpr (Half) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wt16.data() + at)));
    else return _mm256_loadu_ps(wt.data() + at);
  }

  // R rows by 8V outputs from o0, accumulated in registers. K interleaved partial sums over the
  // inputs keep enough independent FMA chains in flight when the tile is narrow.
  template <bool Half, int R, int V, int K>
  void tile(const float* x, float* y, int o0, int i0, int i1, bool bias) const {
    __m256 acc[K][R][V];
    for (int v = 0; v < V; ++v) {
      const __m256 start = bias ? _mm256_loadu_ps(b.data() + o0 + 8 * v) : _mm256_setzero_ps();
      for (int r = 0; r < R; ++r) {
        acc[0][r][v] = start;
        for (int k = 1; k < K; ++k) acc[k][r][v] = _mm256_setzero_ps();
      }
    }
    size_t first[V];  // vector v's weights for input i are at first[v] + i * kPanel
    for (int v = 0; v < V; ++v) first[v] = at(0, o0 + 8 * v);
    auto madd = [&](int k, int i) {
      __m256 wv[V];
      for (int v = 0; v < V; ++v) wv[v] = load8<Half>(first[v] + (size_t)i * kPanel);
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_set1_ps(x[(size_t)r * in + i]);
        for (int v = 0; v < V; ++v) acc[k][r][v] = _mm256_fmadd_ps(wv[v], xb, acc[k][r][v]);
      }
    };
    int i = i0;
    for (; i + K <= i1; i += K)
      for (int k = 0; k < K; ++k) madd(k, i + k);
    for (; i < i1; ++i) madd(0, i);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) {
        __m256 sum = acc[0][r][v];
        for (int k = 1; k < K; ++k) sum = _mm256_add_ps(sum, acc[k][r][v]);
        _mm256_storeu_ps(y + (size_t)r * out + o0 + 8 * v, sum);
      }
  }

  // R rows, outputs [o0, o1): the widest tiles that fit, about eight accumulators each.
  template <bool Half, int R>
  void block(const float* x, float* y, int o0, int o1, int i0, int i1, bool bias) const {
    constexpr int widest = R == 1 ? 8 : R == 2 ? 4 : 2;
    int o = o0;
    while (o1 - o >= 8) {
      const int vectors = (o1 - o) / 8;
      if (widest >= 8 && vectors >= 8) {
        tile<Half, R, 8, 1>(x, y, o, i0, i1, bias);
        o += 64;
      } else if (widest >= 4 && vectors >= 4) {
        tile<Half, R, 4, std::max(1, 8 / (4 * R))>(x, y, o, i0, i1, bias);
        o += 32;
      } else if (vectors >= 2) {
        tile<Half, R, 2, std::max(1, 8 / (2 * R))>(x, y, o, i0, i1, bias);
        o += 16;
      } else {
        tile<Half, R, 1, std::max(1, 8 / R)>(x, y, o, i0, i1, bias);
        o += 8;
      }
    }
    if (o < o1) columns(x, y, R, o, o1, i0, i1, bias);
  }

  template <bool Half>
  void rows_by_four(const float* x, float* y, int rows, int o0, int o1, int i0, int i1, bool bias) const {
    int r = 0;
    for (; r + 4 <= rows; r += 4) block<Half, 4>(x + (size_t)r * in, y + (size_t)r * out, o0, o1, i0, i1, bias);
    const float* xr = x + (size_t)r * in;
    float* yr = y + (size_t)r * out;
    switch (rows - r) {
      case 3: block<Half, 3>(xr, yr, o0, o1, i0, i1, bias); break;
      case 2: block<Half, 2>(xr, yr, o0, o1, i0, i1, bias); break;
      case 1: block<Half, 1>(xr, yr, o0, o1, i0, i1, bias); break;
      default: break;
    }
  }
#endif

  // Outputs [o0, o1) of y[r] = W[:, i0:i1] x[r][i0:i1] (+ b) for `rows` rows of widths in and out.
  void product(const float* x, float* y, int rows, int o0, int o1, int i0, int i1, bool bias) const {
#ifdef S4MUSIC_AVX2
    if (half) rows_by_four<true>(x, y, rows, o0, o1, i0, i1, bias);
    else rows_by_four<false>(x, y, rows, o0, o1, i0, i1, bias);
#else
    columns(x, y, rows, o0, o1, i0, i1, bias);
#endif
  }
  // Outputs [o0, o1) of y[r] = W x[r] + b.
  void apply(const float* x, float* y, int rows, int o0, int o1) const { product(x, y, rows, o0, o1, 0, in, true); }
  void apply(const float* x, float* y, int rows) const { apply(x, y, rows, 0, out); }
  // Every output's share from inputs [i0, i1) (with the bias, or not): a member's part of a sum.
  void partial(const float* x, float* y, int rows, int i0, int i1, bool bias) const {
    product(x, y, rows, 0, out, i0, i1, bias);
  }
  // This member's share of the outputs.
  void apply(const float* x, float* y, int rows, const Team& team) const {
    auto [o0, o1] = team.share(out);
    apply(x, y, rows, o0, o1);
  }
};

// gelu (the exact, erf form that torch uses) in place on columns [c0, c1) of `rows` rows of width w.
inline void gelu(float* x, int rows, int w, int c0, int c1) {
  for (int r = 0; r < rows; ++r) {
    float* xr = x + (size_t)r * w;
#pragma omp simd
    for (int i = c0; i < c1; ++i) xr[i] = 0.5f * xr[i] * (1.f + erff(xr[i] * 0.70710678118654752f));
  }
}

// What a residual layer holds; Python names them through the module's LayerKind.
enum Kind { S4_DIAG, S4_DPLR, FEEDFORWARD };

struct Layer {
  int kind = 0, H = 0, N2 = 0, Hv = 0;  // Hv: channels in vectors of 8, the last one zero-padded
  float norm_m = 0.f, norm_s = 1.f;
  // S4 step parameters (see S4Kernel.step_params), packed (Hv, N2, fields, 2, 8): for each vector
  // of 8 channels and each state index, the real then imaginary lanes of a, b, c [, q, p]. One
  // stream through memory per layer, in the order the recurrence reads it.
  Floats packed;
  Floats kappa, cg;     // DPLR, (Hv * 8), zero-padded
  Floats D;             // (H)
  torch::Tensor p, g;   // DPLR, complex (H, N2): only to convert the state on the way in and out
  Linear out;       // S4 output linear (2H, H), GLU after
  Linear fc1, fc2;  // feed-forward
  int state_index = -1;

  // The one channel layout of the S4 recurrence: channels zero-padded to Hv vectors of 8 lanes.
  // (..., H) -> (..., 8 Hv) float
  torch::Tensor padded(const torch::Tensor& x) const {
    return at::constant_pad_nd(x.to(torch::kFloat), {0, 8 * Hv - H}).contiguous();
  }
  // complex (K, H, N2) -> float (K, Hv, N2, 2, 8): real then imaginary lanes
  torch::Tensor to_lanes(const torch::Tensor& z) const {
    auto ri = at::constant_pad_nd(torch::view_as_real(z.to(torch::kComplexFloat)), {0, 0, 0, 0, 0, 8 * Hv - H});
    return ri.view({z.size(0), Hv, 8, N2, 2}).permute({0, 1, 3, 4, 2}).contiguous();
  }
  // float (K, Hv, N2, 2, 8) -> complex (K, H, N2), the inverse of to_lanes
  torch::Tensor from_lanes(float* data, int64_t k) const {
    auto lanes = torch::from_blob(data, {k, Hv, N2, 2, 8});
    return torch::view_as_complex(
        lanes.permute({0, 1, 4, 2, 3}).reshape({k, 8 * Hv, N2, 2}).slice(1, 0, H).contiguous());
  }
};

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
};

// The rows one group owns: their recurrent state and the activations its team shares.
struct Rows {
  int r0 = 0, n = 0;
  std::vector<Floats> s4;     // per S4 layer: (rows, Hv, N2, 2, 8), real then imaginary lanes
  std::vector<Floats> alpha;  // per S4 layer: (rows, Hv * 8), the DPLR low-rank coefficient
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
  std::vector<double> prob;
  std::vector<int> order;
};

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

void norm_rows(const float* x, float* y, int rows, int H, float m, float s) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + (size_t)r * H;
    const auto [mean, var] = mean_var(xr, H);
    const float scale = s / std::sqrt(var);
#pragma omp simd
    for (int i = 0; i < H; ++i) y[(size_t)r * H + i] = scale * (xr[i] - mean + m);
  }
}

// One S4 recurrence on the 8-channel vector v of R rows: inputs u (rows, H), states in place,
// outputs y (rows, H) = Re(c x') (half the layer's 2 Re).
//   diag: a row's state is x.
//   dplr: a row's state is w and alpha is g's coefficient, x = w - g alpha (see
//         S4Kernel.step_params). One pass over the state per step: the next step's P^H x is
//         alpha itself, and y follows from sums over w, so x is never formed.
// The state index is the inner loop, so the sums stay in registers and each packed slice of
// parameters is read once for the R rows.
template <int R, bool Dplr>
void s4_vector(const Layer& L, int v, const float* u, float* y, float* state, float* alpha, int row_offset) {
  constexpr int F = Dplr ? 5 : 3;
  const int H = L.H, N2 = L.N2, ch0 = 8 * v, lanes = std::min(8, H - ch0);
  const size_t row_stride = (size_t)L.Hv * N2 * 16, padded = (size_t)L.Hv * 8;
  float uu[R][8], al[R][8], sum_y[R][8], sum_p[R][8];
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < 8; ++l) {
      const int rr = row_offset + r;
      uu[r][l] = l < lanes ? u[(size_t)rr * H + ch0 + l] : 0.f;
      al[r][l] = Dplr ? alpha[rr * padded + ch0 + l] : 0.f;
      sum_y[r][l] = sum_p[r][l] = 0.f;
    }
  const float* prm = L.packed.data() + (size_t)v * N2 * F * 16;
  float* st = state + row_offset * row_stride + (size_t)v * N2 * 16;
  for (int n = 0; n < N2; ++n, prm += F * 16, st += 16) {
    const float *ar = prm, *ai = prm + 8, *br = prm + 16, *bi = prm + 24, *cr = prm + 32, *ci = prm + 40;
    for (int r = 0; r < R; ++r) {
      float* __restrict xr = st + r * row_stride;
      float* __restrict xi = xr + 8;
#pragma omp simd
      for (int l = 0; l < 8; ++l) {
        float re = ar[l] * xr[l] - ai[l] * xi[l] + br[l] * uu[r][l];
        float im = ar[l] * xi[l] + ai[l] * xr[l] + bi[l] * uu[r][l];
        if constexpr (Dplr) {
          const float *qr = prm + 48, *qi = prm + 56, *pr = prm + 64, *pi = prm + 72;
          re -= qr[l] * al[r][l];
          im -= qi[l] * al[r][l];
          sum_p[r][l] += pr[l] * re + pi[l] * im;
        }
        xr[l] = re;
        xi[l] = im;
        sum_y[r][l] += cr[l] * re - ci[l] * im;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int rr = row_offset + r;
    for (int l = 0; l < 8; ++l) {
      if constexpr (Dplr) {
        al[r][l] = 2.f * L.kappa[ch0 + l] * sum_p[r][l];
        alpha[rr * padded + ch0 + l] = al[r][l];
        sum_y[r][l] -= al[r][l] * L.cg[ch0 + l];
      }
      if (l < lanes) y[(size_t)rr * H + ch0 + l] = sum_y[r][l];
    }
  }
}

// The S4 recurrence over channels [c0, c1) (c0 a multiple of 8) of `rows` rows, two at a time
// (with more, the sums no longer fit in registers).
template <bool Dplr>
void s4_rows(const Layer& L, const float* u, float* y, float* state, float* alpha, int rows, int c0, int c1) {
  for (int v = c0 / 8; v < (c1 + 7) / 8; ++v) {
    int r = 0;
    for (; r + 2 <= rows; r += 2) s4_vector<2, Dplr>(L, v, u, y, state, alpha, r);
    if (r < rows) s4_vector<1, Dplr>(L, v, u, y, state, alpha, r);
  }
}

// One residual layer on the group's rows of width H, in place on P.h. Each member normalizes every
// channel, computes its share of the inner units (S4 channels, or feed-forward hidden units) and
// from them its part of every output of the layer's last linear map. After one barrier every
// member adds up the parts (in the same order, so all copies of h stay equal). The parts are
// double-buffered: a member can only write a set again after the next barrier, which no member
// passes before it has read the previous layer's parts.
void layer_step(const Layer& L, Rows& R, Private& P, const Team& team) {
  const int H = L.H, rows = R.n;
  float* h = P.h.data();
  float* normed = P.normed.data();
  float* hidden = P.hidden.data();
  const Floats* parts = R.partial.data() + (size_t)P.parity * team.size;
  float* mine = R.partial[(size_t)P.parity * team.size + team.member].data();
  P.parity ^= 1;
  norm_rows(h, normed, rows, H, L.norm_m, L.norm_s);
  if (L.kind == FEEDFORWARD) {
    auto [f0, f1] = team.share(L.fc1.out);
    L.fc1.apply(normed, hidden, rows, f0, f1);
    gelu(hidden, rows, L.fc1.out, f0, f1);
    L.fc2.partial(hidden, mine, rows, f0, f1, team.lead());
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
  auto [c0, c1] = team.share(H);
  float* state = R.s4[L.state_index].data();
  float* alpha = R.alpha[L.state_index].data();
  if (L.kind == S4_DPLR) s4_rows<true>(L, normed, hidden, state, alpha, rows, c0, c1);
  else s4_rows<false>(L, normed, hidden, state, alpha, rows, c0, c1);
  for (int r = 0; r < rows; ++r) {
    const float* u = normed + (size_t)r * H;
    float* y = hidden + (size_t)r * H;
#pragma omp simd
    for (int ch = c0; ch < c1; ++ch) y[ch] = 2.f * y[ch] + L.D[ch] * u[ch];
  }
  gelu(hidden, rows, H, c0, c1);
  L.out.partial(hidden, mine, rows, c0, c1, team.lead());  // the linear half of the GLU, then its gates
  team.sync();
  for (int r = 0; r < rows; ++r) {
    const float* g = parts[0].data() + (size_t)r * 2 * H;
    if (team.size > 1) {
      float* __restrict sum = normed + (size_t)r * 2 * H;  // free again, and as wide as any layer's 2H
      std::copy(g, g + 2 * H, sum);
      for (int m = 1; m < team.size; ++m) {
        const float* __restrict add = parts[m].data() + (size_t)r * 2 * H;
#pragma omp simd
        for (int ch = 0; ch < 2 * H; ++ch) sum[ch] += add[ch];
      }
      g = sum;
    }
    float* __restrict hr = h + (size_t)r * H;
#pragma omp simd
    for (int ch = 0; ch < H; ++ch) hr[ch] += g[ch] / (1.f + expf(-g[H + ch]));
  }
}

// The log-partition at temperature 1 (a code's log-probability is logit - log_z); leaves
// exp(logit - max) in P.prob for sample().
float log_partition(const float* logits, int n, Private& P) {
  const float mx = *std::max_element(logits, logits + n);
  double z = 0;
  for (int i = 0; i < n; ++i) {
    P.prob[i] = std::exp((double)(logits[i] - mx));
    z += P.prob[i];
  }
  return mx + (float)std::log(z);
}

// Pick a code from logits by inverse CDF with uniform u (same procedure as sample_codes in fast.py).
// Call right after log_partition(logits, ...), whose P.prob it starts from.
int sample(const float* logits, int n, float u, float temperature, int top_k, float top_p, Private& P) {
  std::vector<double>& prob = P.prob;
  const float mx = *std::max_element(logits, logits + n);
  int code;
  if (temperature <= 0.f) {
    code = (int)(std::max_element(logits, logits + n) - logits);
  } else {
    if (temperature != 1.f)
      for (int i = 0; i < n; ++i) prob[i] = std::exp((double)(logits[i] - mx) / temperature);
    if ((top_k > 0 && top_k < n) || top_p < 1.f) {
      // likeliest first, ties by index (as a stable sort); only the first top_k need ordering
      std::vector<int>& order = P.order;
      std::iota(order.begin(), order.begin() + n, 0);
      auto likelier = [&](int i, int j) { return prob[i] > prob[j] || (prob[i] == prob[j] && i < j); };
      const int ranked = top_k > 0 && top_k < n ? top_k : n;
      std::partial_sort(order.begin(), order.begin() + ranked, order.begin() + n, likelier);
      double total = 0, before = 0;
      for (int i = 0; i < n; ++i) total += prob[i];
      int kept = 0;
      while (kept < ranked && (kept == 0 || before / total < top_p)) before += prob[order[kept++]];
      for (int k = kept; k < n; ++k) prob[order[k]] = 0;
    }
    double total = 0;
    for (int i = 0; i < n; ++i) total += prob[i];
    const double target = u * total;
    double cum = 0;
    code = n - 1;
    for (int i = 0; i < n; ++i) {
      cum += prob[i];
      if (prob[i] > 0 && cum > target) {
        code = i;
        break;
      }
    }
    while (prob[code] == 0 && code > 0) --code;
  }
  return code;
}

// What one call asks for, shared by every thread.
struct Job {
  int n = 0;
  int64_t t0 = 0;
  const float* uniforms = nullptr;  // (B, n)
  const int64_t* forced = nullptr;  // (B, n) or null
  float temperature = 1.f, top_p = 1.f;
  int top_k = 0;
  int64_t* codes = nullptr;         // (B, n)
  float* logprobs = nullptr;        // (B, n)
  float* logits = nullptr;          // (B, n, V) or null
};

class FastSaShiMi {
 public:
  FastSaShiMi(torch::Tensor embedding, std::vector<int64_t> pools, std::vector<torch::Tensor> down_w,
              std::vector<torch::Tensor> down_b, std::vector<torch::Tensor> up_w, std::vector<torch::Tensor> up_b,
              torch::Tensor ln_w, torch::Tensor ln_b, double ln_eps, torch::Tensor dec_w, torch::Tensor dec_b,
              bool half) {
    M.half = half;
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

  // tier: 0 centre, 1.. up blocks deepest first. Tensors by name: a feed-forward layer's fc1_w, fc1_b,
  // fc2_w, fc2_b; an S4 layer's a, b, c (complex (H, N2), see S4Kernel.step_params), D, out_w, out_b,
  // and for DPLR also p, g, q (complex (H, N2)), kappa and cg (H).
  void add_layer(int tier, Kind kind, double norm_m, double norm_s, const std::map<std::string, torch::Tensor>& t) {
    Layer L;
    L.kind = kind;
    L.norm_m = (float)norm_m;
    L.norm_s = (float)norm_s;
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
      L.fc1 = Linear(get("fc1_w"), get("fc1_b"), M.half);
      L.fc2 = Linear(get("fc2_w"), get("fc2_b"), M.half);
      L.H = L.fc1.in;
      M.widest = std::max(M.widest, L.fc1.out);
    } else {
      const auto a = get("a");
      L.H = a.size(0);
      L.N2 = a.size(1);
      L.Hv = (L.H + 7) / 8;
      std::vector<torch::Tensor> fields{a, get("b"), get("c")};
      if (kind == S4_DPLR) fields.insert(fields.end(), {get("q"), get("p")});
      L.packed = floats(L.to_lanes(torch::stack(fields)).permute({1, 2, 0, 3, 4}));  // (F, Hv, ...) -> (Hv, N2, F, ...)
      L.D = floats(get("D"));
      L.out = Linear(get("out_w"), get("out_b"), M.half);
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
  std::vector<torch::Tensor> run(torch::Tensor codes0, int64_t t0, std::vector<torch::Tensor> s4_states,
                                 std::vector<torch::Tensor> down_states, std::vector<torch::Tensor> up_states,
                                 torch::Tensor uniforms, double temperature, int64_t top_k, double top_p,
                                 torch::Tensor forced) {
    const int B = codes0.size(0);
    const bool teacher = forced.numel() > 0;
    auto codes = torch::empty({B, uniforms.size(1)}, torch::kLong);
    auto logprobs = torch::empty({B, uniforms.size(1)}, torch::kFloat);
    auto logits = teacher ? torch::empty({B, uniforms.size(1), M.n_codes}, torch::kFloat) : torch::empty({0});
    Job job;
    job.n = uniforms.size(1);
    job.t0 = t0;
    job.uniforms = uniforms.data_ptr<float>();
    job.forced = teacher ? forced.data_ptr<int64_t>() : nullptr;
    job.temperature = (float)temperature;
    job.top_k = (int)top_k;
    job.top_p = (float)top_p;
    job.codes = codes.data_ptr<int64_t>();
    job.logprobs = logprobs.data_ptr<float>();
    job.logits = teacher ? logits.data_ptr<float>() : nullptr;

    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    // A team meets at a barrier every layer, and past 4 members the meetings cost more than the split
    // saves (measured on a 16-core Xeon: benchmarks/RESULTS.md, the GPU machine's section).
    const int n_groups = std::max(1, std::min(B, threads)), team = std::clamp(threads / n_groups, 1, kMaxTeam);
    std::vector<Rows> groups(n_groups);
    const int64_t* c0 = codes0.data_ptr<int64_t>();
    for (int g = 0; g < n_groups; ++g) {
      Rows& R = groups[g];
      R.r0 = B * g / n_groups;
      R.n = B * (g + 1) / n_groups - R.r0;
      load_state(R, s4_states, down_states, up_states);
      R.code.assign(c0 + R.r0, c0 + R.r0 + R.n);
      R.partial.assign(2 * team, Floats((size_t)R.n * M.widest));
    }
#pragma omp parallel num_threads(n_groups * team)
    {
      int tid = 0;
#ifdef _OPENMP
      tid = omp_get_thread_num();
#endif
      Rows& R = groups[tid / team];
      run_group(R, Team{tid % team, team, &R.arrived, &R.generation}, job);
    }
    for (Rows& R : groups) store_state(R, s4_states, down_states, up_states);
    if (teacher) return {codes, logprobs, logits};
    return {codes, logprobs};
  }

 private:
  Model M;

  // States in torch's layout (B, H, N2) complex64 <-> this group's rows, packed (rows, Hv, N2, 2, 8).
  // A DPLR state goes in as w = x + g alpha with alpha = 2 Re(sum conj(p) x) = P^H x, and comes
  // back as x = w - g alpha; in double, so the round trip costs no precision.
  void load_state(Rows& R, std::vector<torch::Tensor>& s4_states, std::vector<torch::Tensor>& down_states,
                  std::vector<torch::Tensor>& up_states) const {
    const int r1 = R.r0 + R.n;
    R.s4.assign(M.n_s4, Floats());
    R.alpha.assign(M.n_s4, Floats());
    for (auto& tier : M.tiers)
      for (const Layer& L : tier) {
        if (L.kind == FEEDFORWARD) continue;
        auto x = s4_states[L.state_index].slice(0, R.r0, r1).to(torch::kComplexDouble);
        auto alpha = torch::zeros({R.n, L.H}, torch::kDouble);
        if (L.kind == S4_DPLR) {
          alpha = 2 * torch::real((torch::conj(L.p) * x).sum(-1));
          x = x + L.g * alpha.unsqueeze(-1);
        }
        auto packed = L.to_lanes(x);
        R.s4[L.state_index].assign(packed.data_ptr<float>(), packed.data_ptr<float>() + packed.numel());
        auto al = L.padded(alpha);
        R.alpha[L.state_index].assign(al.data_ptr<float>(), al.data_ptr<float>() + al.numel());
      }
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
      for (const Layer& L : tier) {
        if (L.kind == FEEDFORWARD) continue;
        auto x = L.from_lanes(R.s4[L.state_index].data(), R.n).to(torch::kComplexDouble);
        if (L.kind == S4_DPLR) {
          auto alpha = torch::from_blob(R.alpha[L.state_index].data(), {R.n, 8 * L.Hv}).slice(1, 0, L.H);
          x = x - L.g * alpha.to(torch::kDouble).unsqueeze(-1);
        }
        s4_states[L.state_index].slice(0, R.r0, r1).copy_(x);
      }
    for (size_t i = 0; i < down_states.size(); ++i)
      down_states[i].slice(0, R.r0, r1).copy_(torch::from_blob(R.down[i].data(), down_states[i].slice(0, R.r0, r1).sizes()));
    for (size_t i = 0; i < up_states.size(); ++i)
      up_states[i].slice(0, R.r0, r1).copy_(torch::from_blob(R.up[i].data(), up_states[i].slice(0, R.r0, r1).sizes()));
  }

  // The tier's layers on every member's own copy of h, which starts from R.h and goes back to it.
  void tier_step(int tier, Rows& R, Private& P, const Team& team) const {
    if (M.tiers[tier].empty()) return;
    const size_t width = (size_t)R.n * M.tiers[tier].front().H;
    std::copy(R.h.begin(), R.h.begin() + width, P.h.begin());
    for (const Layer& L : M.tiers[tier]) layer_step(L, R, P, team);
    if (team.lead()) std::copy(P.h.begin(), P.h.begin() + width, R.h.begin());
  }

  // The group's rows for job.n steps. The lead member does the cheap serial parts (encoder,
  // pooling buffers, sampling); the layers and the decoder are shared.
  void run_group(Rows& R, const Team& team, const Job& job) const {
    const int rows = R.n, n_tiers = (int)M.pools.size(), H0 = M.H0, V = M.n_codes;
    Private P;
    for (auto* v : {&P.h, &P.normed, &P.hidden}) v->resize((size_t)rows * M.widest);
    P.prob.resize(V);
    P.order.resize(V);
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
          M.down[i].apply(buf, h, rows);
          H = M.down[i].out;
          period *= p;
          std::copy(h, h + (size_t)rows * H, R.skips[i + 1].data());
        }
      }
      team.sync();
      if (depth == n_tiers) {
        tier_step(0, R, P, team);
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
          if (out_tier < depth) M.up[j].apply(h, buf, rows);
          const float* skip = R.skips[out_tier].data();
          for (size_t k = 0; k < width; ++k) block_in[k] += skip[k];
          std::copy(block_in, block_in + width, h);
        }
        team.sync();
        tier_step(j + 1, R, P, team);
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
      M.decoder.apply(normed, logits, rows, team);
      team.sync();
      if (team.lead()) pick_codes(R, P, job, step, logits);
    }
  }

  void pick_codes(Rows& R, Private& P, const Job& job, int step, const float* logits) const {
    const int V = M.n_codes;
    for (int r = 0; r < R.n; ++r) {
      const size_t at = (size_t)(R.r0 + r) * job.n + step;
      const float* lg = logits + (size_t)r * V;
      const float log_z = log_partition(lg, V, P);
      int c;
      if (job.forced) {  // teacher-forced scoring: nothing to sample
        c = (int)job.forced[at];
        std::copy(lg, lg + V, job.logits + at * V);
      } else {
        c = sample(lg, V, job.uniforms[at], job.temperature, job.top_k, job.top_p, P);
      }
      job.codes[at] = c;
      job.logprobs[at] = lg[c] - log_z;
      R.code[r] = c;
    }
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::enum_<Kind>(m, "LayerKind")
      .value("S4D", S4_DIAG)
      .value("DPLR", S4_DPLR)
      .value("FEEDFORWARD", FEEDFORWARD);
  pybind11::class_<FastSaShiMi>(m, "FastSaShiMi")
      .def(pybind11::init<torch::Tensor, std::vector<int64_t>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                          std::vector<torch::Tensor>, std::vector<torch::Tensor>, torch::Tensor, torch::Tensor, double,
                          torch::Tensor, torch::Tensor, bool>(),
           pybind11::arg("embedding"), pybind11::arg("pools"), pybind11::arg("down_w"), pybind11::arg("down_b"),
           pybind11::arg("up_w"), pybind11::arg("up_b"), pybind11::arg("ln_w"), pybind11::arg("ln_b"),
           pybind11::arg("ln_eps"), pybind11::arg("dec_w"), pybind11::arg("dec_b"), pybind11::arg("half"))
      .def("add_layer", &FastSaShiMi::add_layer, pybind11::arg("tier"), pybind11::arg("kind"), pybind11::arg("norm_m"),
           pybind11::arg("norm_s"), pybind11::arg("tensors"))
      .def("half_weights", &FastSaShiMi::half_weights)
      .def("run", &FastSaShiMi::run, pybind11::call_guard<pybind11::gil_scoped_release>());
}
