// The step's sampling: temperature, Mirostat, typical, top-k, top-p and guided pairs (Rule), and
// what one call of the step asks for (Job).
// Part of the fused CPU step: see fast_step.cpp for the layout and the build.
#pragma once

#include "vectors.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

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

}  // namespace
