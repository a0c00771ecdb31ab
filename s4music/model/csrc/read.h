// The read of a prompt (prefill): a tier's layers over blocks of time.
// Part of the fused CPU step: see fast_step.cpp for the layout and the build.
#pragma once

#include "model.h"

namespace {

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

}  // namespace
