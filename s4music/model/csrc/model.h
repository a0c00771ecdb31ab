// The model's weights and one step of a tier's residual layers for a group of rows.
// Part of the fused CPU step: see fast_step.cpp for the layout and the build.
#pragma once

#include "s4_layer.h"

namespace {

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

}  // namespace
