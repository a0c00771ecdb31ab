// The S4 layers' recurrence (diagonal and DPLR) on vectors of channels, and a residual layer.
// Part of the fused CPU step: see fast_step.cpp for the layout and the build.
#pragma once

#include "linear.h"

#include <torch/extension.h>

#include <vector>

namespace {

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

}  // namespace
