// The whole SaShiMi recurrent step, fused in C++ for the CPU: one call generates many samples.
//
// Python (s4music/model/fast.py) hands over every weight once, already in step form:
//   S4 layers as an O(N) recurrence: diagonal (S4D) or DPLR through Sherman-Morrison, exact in
//   float32 (no eigendecomposition, which is ill-conditioned for HiPPO matrices),
//   weight-normed pooling weights as plain matrices.
// The reference is SaShiMi.step in sashimi.py; tests compare the two logit for logit.
// Rows of the batch (variations) are independent and are split across OpenMP threads; within a
// thread, each weight row is applied to all of its batch rows before the next is read.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

struct Linear {
  torch::Tensor w, b;  // (out, in), (out)
  int in = 0, out = 0;
  Linear() = default;
  Linear(torch::Tensor w_, torch::Tensor b_) : w(w_.contiguous()), b(b_.contiguous()), in(w_.size(1)), out(w_.size(0)) {}
  // y[r] = W x[r] + b for `rows` rows of stride in / out.
  void apply(const float* x, float* y, int rows) const {
    const float* W = w.data_ptr<float>();
    const float* B = b.data_ptr<float>();
    for (int o = 0; o < out; ++o) {
      const float* wr = W + (size_t)o * in;
      for (int r = 0; r < rows; ++r) {
        const float* xr = x + (size_t)r * in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int i = 0; i < in; ++i) acc += wr[i] * xr[i];
        y[(size_t)r * out + o] = acc + B[o];
      }
    }
  }
};

inline float gelu(float x) { return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f)); }

enum Kind { S4_DIAG = 0, S4_DPLR = 1, FEEDFORWARD = 2 };

struct Layer {
  int kind = 0, H = 0, N2 = 0;
  float norm_m = 0.f, norm_s = 1.f;
  // S4 step parameters (see S4Kernel.step_params), split into real and imaginary (H, N2) arrays
  // so that the loops over the state vectorize.
  std::vector<float> a_re, a_im, b_re, b_im, c_re, c_im, p_re, p_im, hp_re, hp_im, ei_re, ei_im, g_re, g_im;
  torch::Tensor kappa, D;
  Linear out;       // S4 output linear (2H, H), GLU after
  Linear fc1, fc2;  // feed-forward
  int state_index = -1;
};

struct Model {
  int n_codes = 256, H0 = 0;
  torch::Tensor embedding;  // (n_codes, H0)
  std::vector<int> pools;
  std::vector<Linear> down, up;          // per tier boundary
  std::vector<std::vector<Layer>> tiers;  // [0] = centre, [1..] = up blocks, deepest first
  torch::Tensor ln_w, ln_b;
  Linear decoder;
  int n_s4 = 0;
};

// Per-row scratch and recurrent state for the rows one thread owns.
struct Rows {
  int n;
  std::vector<std::vector<float>> s4;    // per S4 layer: (rows, H, 2, N2), real then imaginary parts
  std::vector<std::vector<float>> down;  // per pool: (rows, H, p)
  std::vector<std::vector<float>> up;    // per up block: (rows, H_out, p)
};

void norm_rows(const float* x, float* y, int rows, int H, float m, float s) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + (size_t)r * H;
    float mean = 0.f;
    for (int i = 0; i < H; ++i) mean += xr[i];
    mean /= H;
    float var = 0.f;
    for (int i = 0; i < H; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    float scale = s / std::sqrt(var / H);
    for (int i = 0; i < H; ++i) y[(size_t)r * H + i] = scale * (xr[i] - mean + m);
  }
}

// One residual layer on `rows` rows of width H, in place on h.
void layer_step(const Layer& L, float* h, int rows, std::vector<float>* state, std::vector<float>& t1,
                std::vector<float>& t2) {
  const int H = L.H;
  t1.resize((size_t)rows * std::max(H, L.fc1.out));
  norm_rows(h, t1.data(), rows, H, L.norm_m, L.norm_s);
  if (L.kind == FEEDFORWARD) {
    t2.resize((size_t)rows * L.fc1.out);
    L.fc1.apply(t1.data(), t2.data(), rows);
    for (auto& v : t2) v = gelu(v);
    std::vector<float> y((size_t)rows * H);
    L.fc2.apply(t2.data(), y.data(), rows);
    for (size_t i = 0; i < y.size(); ++i) h[i] += y[i];
    return;
  }
  const int N2 = L.N2;
  const float* D = L.D.data_ptr<float>();
  const float* kappa = L.kind == S4_DPLR ? L.kappa.data_ptr<float>() : nullptr;
  t2.resize((size_t)rows * H);
  for (int r = 0; r < rows; ++r) {
    for (int ch = 0; ch < H; ++ch) {
      const float u = t1[(size_t)r * H + ch];
      // state of (row, channel): N2 real parts, then N2 imaginary parts
      float* xr = state->data() + ((size_t)r * H + ch) * 2 * N2;
      float* xi = xr + N2;
      const size_t o = (size_t)ch * N2;
      const float *ar = &L.a_re[o], *ai = &L.a_im[o], *br = &L.b_re[o], *bi = &L.b_im[o];
      const float *cr = &L.c_re[o], *ci = &L.c_im[o];
      float y = 0.f;
      if (L.kind == S4_DIAG) {
#pragma omp simd reduction(+ : y)
        for (int n = 0; n < N2; ++n) {
          const float re = ar[n] * xr[n] - ai[n] * xi[n] + br[n] * u;
          const float im = ar[n] * xi[n] + ai[n] * xr[n] + bi[n] * u;
          xr[n] = re;
          xi[n] = im;
          y += re * cr[n] - im * ci[n];
        }
      } else {
        // Bilinear step with A = Lambda - P P^H on the conjugate-paired state:
        // r = (I + dt/2 A) x + dt B u, then x' = (I - dt/2 A)^{-1} r by Sherman-Morrison.
        const float *pr = &L.p_re[o], *pi = &L.p_im[o], *hr = &L.hp_re[o], *hi = &L.hp_im[o];
        const float *er = &L.ei_re[o], *ei = &L.ei_im[o], *gr = &L.g_re[o], *gi = &L.g_im[o];
        float gamma = 0.f;  // P^H x over the full state = 2 Re(sum conj(p) x)
#pragma omp simd reduction(+ : gamma)
        for (int n = 0; n < N2; ++n) gamma += pr[n] * xr[n] + pi[n] * xi[n];
        gamma *= 2.f;
        float alpha = 0.f;
#pragma omp simd reduction(+ : alpha)
        for (int n = 0; n < N2; ++n) {
          const float rr = ar[n] * xr[n] - ai[n] * xi[n] - hr[n] * gamma + br[n] * u;
          const float ri = ar[n] * xi[n] + ai[n] * xr[n] - hi[n] * gamma + bi[n] * u;
          const float wr = rr * er[n] - ri * ei[n], wi = rr * ei[n] + ri * er[n];
          xr[n] = wr;
          xi[n] = wi;
          alpha += pr[n] * wr + pi[n] * wi;
        }
        alpha *= 2.f * kappa[ch];
#pragma omp simd reduction(+ : y)
        for (int n = 0; n < N2; ++n) {
          xr[n] -= gr[n] * alpha;
          xi[n] -= gi[n] * alpha;
          y += xr[n] * cr[n] - xi[n] * ci[n];
        }
      }
      t2[(size_t)r * H + ch] = gelu(2.f * y + D[ch] * u);
    }
  }
  std::vector<float> z((size_t)rows * 2 * H);
  L.out.apply(t2.data(), z.data(), rows);
  for (int r = 0; r < rows; ++r)
    for (int ch = 0; ch < H; ++ch) {
      float lin = z[(size_t)r * 2 * H + ch], gate = z[(size_t)r * 2 * H + H + ch];
      h[(size_t)r * H + ch] += lin / (1.f + std::exp(-gate));
    }
}

void tier_step(const Model& M, int tier, std::vector<float>& h, int rows, Rows& R, std::vector<float>& t1,
               std::vector<float>& t2) {
  for (const Layer& L : M.tiers[tier])
    layer_step(L, h.data(), rows, L.kind == FEEDFORWARD ? nullptr : &R.s4[L.state_index], t1, t2);
}

// Pick a code from logits by inverse CDF with uniform u (same procedure as sample_codes in fast.py).
int sample(const float* logits, int n, float u, float temperature, int top_k, float top_p, float* logprob) {
  float mx = *std::max_element(logits, logits + n);
  double z = 0;
  for (int i = 0; i < n; ++i) z += std::exp((double)(logits[i] - mx));
  const float log_z = mx + (float)std::log(z);
  int code;
  if (temperature <= 0.f) {
    code = (int)(std::max_element(logits, logits + n) - logits);
  } else {
    std::vector<double> prob(n);
    for (int i = 0; i < n; ++i) prob[i] = std::exp((double)(logits[i] - mx) / temperature);
    if ((top_k > 0 && top_k < n) || top_p < 1.f) {
      std::vector<int> order(n);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return prob[i] > prob[j]; });
      double total = std::accumulate(prob.begin(), prob.end(), 0.0), before = 0;
      std::vector<char> keep(n, 0);
      for (int k = 0; k < n; ++k) {
        int i = order[k];
        bool in_k = top_k <= 0 || k < top_k;
        bool in_p = k == 0 || before / total < top_p;
        keep[i] = in_k && in_p;
        before += prob[i];
      }
      for (int i = 0; i < n; ++i)
        if (!keep[i]) prob[i] = 0;
    }
    double total = std::accumulate(prob.begin(), prob.end(), 0.0), target = u * total, cum = 0;
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
  *logprob = logits[code] - log_z;
  return code;
}

class FastSaShiMi {
 public:
  FastSaShiMi(torch::Tensor embedding, std::vector<int64_t> pools, std::vector<torch::Tensor> down_w,
              std::vector<torch::Tensor> down_b, std::vector<torch::Tensor> up_w, std::vector<torch::Tensor> up_b,
              torch::Tensor ln_w, torch::Tensor ln_b, torch::Tensor dec_w, torch::Tensor dec_b) {
    M.embedding = embedding.contiguous();
    M.n_codes = embedding.size(0);
    M.H0 = embedding.size(1);
    for (auto p : pools) M.pools.push_back((int)p);
    for (size_t i = 0; i < down_w.size(); ++i) M.down.emplace_back(down_w[i], down_b[i]);
    for (size_t i = 0; i < up_w.size(); ++i) M.up.emplace_back(up_w[i], up_b[i]);
    M.tiers.resize(pools.size() + 1);
    M.ln_w = ln_w.contiguous();
    M.ln_b = ln_b.contiguous();
    M.decoder = Linear(dec_w, dec_b);
  }

  // tier: 0 centre, 1.. up blocks deepest first. kind: 0 S4D, 1 DPLR, 2 feed-forward.
  void add_layer(int tier, int kind, double norm_m, double norm_s, std::vector<torch::Tensor> t) {
    Layer L;
    L.kind = kind;
    L.norm_m = (float)norm_m;
    L.norm_s = (float)norm_s;
    if (kind == FEEDFORWARD) {
      L.fc1 = Linear(t[0], t[1]);
      L.fc2 = Linear(t[2], t[3]);
      L.H = L.fc1.in;
    } else {
      // t: a, b, c, D, out_w, out_b [, p, half_dt_p, e_inv, g, kappa]
      auto split = [](const torch::Tensor& z, std::vector<float>& re, std::vector<float>& im) {
        auto ri = torch::view_as_real(z.contiguous()).contiguous();  // (H, N2, 2)
        const float* d = ri.data_ptr<float>();
        re.resize(z.numel());
        im.resize(z.numel());
        for (int64_t i = 0; i < z.numel(); ++i) re[i] = d[2 * i], im[i] = d[2 * i + 1];
      };
      split(t[0], L.a_re, L.a_im);
      split(t[1], L.b_re, L.b_im);
      split(t[2], L.c_re, L.c_im);
      L.D = t[3].contiguous();
      L.out = Linear(t[4], t[5]);
      L.H = t[0].size(0);
      L.N2 = t[0].size(1);
      if (kind == S4_DPLR) {
        split(t[6], L.p_re, L.p_im);
        split(t[7], L.hp_re, L.hp_im);
        split(t[8], L.ei_re, L.ei_im);
        split(t[9], L.g_re, L.g_im);
        L.kappa = t[10].contiguous();
      }
      L.state_index = M.n_s4++;
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
    const int B = codes0.size(0), n = uniforms.size(1);
    const bool teacher = forced.numel() > 0;
    auto codes = torch::empty({B, n}, torch::kLong);
    auto logprobs = torch::empty({B, n}, torch::kFloat);
    auto logits_out = teacher ? torch::empty({B, n, M.n_codes}, torch::kFloat) : torch::empty({0});
    int threads = 1;
#ifdef _OPENMP
    threads = std::min(B, omp_get_max_threads());
#endif
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int part = 0; part < threads; ++part) {
      int r0 = B * part / threads, r1 = B * (part + 1) / threads;
      run_rows(r0, r1, n, t0, codes0, s4_states, down_states, up_states, uniforms, (float)temperature, (int)top_k,
               (float)top_p, teacher ? &forced : nullptr, codes, logprobs, teacher ? &logits_out : nullptr);
    }
    if (teacher) return {codes, logprobs, logits_out};
    return {codes, logprobs};
  }

 private:
  Model M;

  void run_rows(int r0, int r1, int n, int64_t t0, torch::Tensor& codes0, std::vector<torch::Tensor>& s4_states,
                std::vector<torch::Tensor>& down_states, std::vector<torch::Tensor>& up_states, torch::Tensor& uniforms,
                float temperature, int top_k, float top_p, torch::Tensor* forced, torch::Tensor& codes,
                torch::Tensor& logprobs, torch::Tensor* logits_out) {
    const int rows = r1 - r0;
    if (rows <= 0) return;
    Rows R;
    R.n = rows;
    for (auto& s : s4_states) {  // (B, H, N2) complex64 -> (rows, H, 2, N2)
      auto part = torch::view_as_real(s.slice(0, r0, r1)).permute({0, 1, 3, 2}).contiguous();
      R.s4.emplace_back(part.data_ptr<float>(), part.data_ptr<float>() + part.numel());
    }
    auto copy_rows = [&](std::vector<torch::Tensor>& from, std::vector<std::vector<float>>& to) {
      for (auto& s : from) {
        auto part = s.slice(0, r0, r1).contiguous();
        to.emplace_back(part.data_ptr<float>(), part.data_ptr<float>() + part.numel());
      }
    };
    copy_rows(down_states, R.down);
    copy_rows(up_states, R.up);

    const int n_tiers = (int)M.pools.size(), H0 = M.H0, V = M.n_codes;
    std::vector<int64_t> code(rows);
    const int64_t* c0 = codes0.data_ptr<int64_t>();
    for (int r = 0; r < rows; ++r) code[r] = c0[r0 + r];
    std::vector<float> h, t1, t2, logits((size_t)rows * V);
    std::vector<std::vector<float>> skips;
    float* code_ptr_logprob = logprobs.data_ptr<float>();
    int64_t* codes_out = codes.data_ptr<int64_t>();
    const float* U = uniforms.data_ptr<float>();
    const int64_t* F = forced ? forced->data_ptr<int64_t>() : nullptr;

    for (int step = 0; step < n; ++step) {
      const int64_t t = t0 + step;
      // encoder
      h.assign((size_t)rows * H0, 0.f);
      const float* E = M.embedding.data_ptr<float>();
      for (int r = 0; r < rows; ++r) std::copy(E + code[r] * H0, E + (code[r] + 1) * H0, h.begin() + (size_t)r * H0);
      skips.clear();
      skips.push_back(h);
      int depth = 0, H = H0;
      int64_t period = 1;
      for (int i = 0; i < n_tiers; ++i) {
        const int p = M.pools[i];
        const int slot = (int)((t / period) % p);
        auto& buf = R.down[i];  // (rows, H, p)
        for (int r = 0; r < rows; ++r)
          for (int ch = 0; ch < H; ++ch) buf[((size_t)r * H + ch) * p + slot] = h[(size_t)r * H + ch];
        if (slot != p - 1) break;
        std::vector<float> next((size_t)rows * M.down[i].out);
        M.down[i].apply(buf.data(), next.data(), rows);
        h.swap(next);
        H = M.down[i].out;
        period *= p;
        depth = i + 1;
        skips.push_back(h);
      }
      if (depth == n_tiers) {
        std::vector<float> skip = skips.back();
        skips.pop_back();
        tier_step(M, 0, h, rows, R, t1, t2);
        for (size_t k = 0; k < h.size(); ++k) h[k] += skip[k];
      }
      for (int j = 0; j < n_tiers; ++j) {
        const int out_tier = n_tiers - 1 - j;
        if (out_tier > depth) continue;
        int64_t per = 1;
        for (int k = 0; k < out_tier; ++k) per *= M.pools[k];
        const int p = M.pools[out_tier];
        const int slot = (int)((t / per) % p);
        const int Ho = M.up[j].out / p;
        auto& buf = R.up[j];  // (rows, Ho, p)
        std::vector<float> y((size_t)rows * Ho);
        for (int r = 0; r < rows; ++r)
          for (int ch = 0; ch < Ho; ++ch) y[(size_t)r * Ho + ch] = buf[((size_t)r * Ho + ch) * p + slot];
        if (out_tier < depth) M.up[j].apply(h.data(), buf.data(), rows);
        std::vector<float> skip = skips.back();
        skips.pop_back();
        for (size_t k = 0; k < y.size(); ++k) y[k] += skip[k];
        h = y;
        std::vector<float> before = h;
        tier_step(M, j + 1, h, rows, R, t1, t2);
        for (size_t k = 0; k < h.size(); ++k) h[k] += before[k];
      }
      // final LayerNorm (eps 1e-5) and decoder
      const float* lw = M.ln_w.data_ptr<float>();
      const float* lb = M.ln_b.data_ptr<float>();
      t1.resize((size_t)rows * H0);
      for (int r = 0; r < rows; ++r) {
        const float* x = h.data() + (size_t)r * H0;
        float mean = 0.f, var = 0.f;
        for (int i = 0; i < H0; ++i) mean += x[i];
        mean /= H0;
        for (int i = 0; i < H0; ++i) var += (x[i] - mean) * (x[i] - mean);
        float inv = 1.f / std::sqrt(var / H0 + 1e-5f);
        for (int i = 0; i < H0; ++i) t1[(size_t)r * H0 + i] = (x[i] - mean) * inv * lw[i] + lb[i];
      }
      M.decoder.apply(t1.data(), logits.data(), rows);
      for (int r = 0; r < rows; ++r) {
        const int row = r0 + r;
        const float* lg = logits.data() + (size_t)r * V;
        float lp;
        int c = sample(lg, V, U[(size_t)row * n + step], temperature, top_k, top_p, &lp);
        if (F) {
          c = (int)F[(size_t)row * n + step];
          float mx = *std::max_element(lg, lg + V);
          double z = 0;
          for (int i = 0; i < V; ++i) z += std::exp((double)(lg[i] - mx));
          lp = lg[c] - mx - (float)std::log(z);
        }
        if (logits_out)
          std::copy(lg, lg + V, logits_out->data_ptr<float>() + ((size_t)row * n + step) * V);
        codes_out[(size_t)row * n + step] = c;
        code_ptr_logprob[(size_t)row * n + step] = lp;
        code[r] = c;
      }
    }
    // write the state back
    for (size_t i = 0; i < s4_states.size(); ++i) {
      auto dst = s4_states[i].slice(0, r0, r1);
      auto soa = torch::from_blob(R.s4[i].data(), {rows, dst.size(1), 2, dst.size(2)});
      dst.copy_(torch::view_as_complex(soa.permute({0, 1, 3, 2}).contiguous()));
    }
    for (size_t i = 0; i < down_states.size(); ++i)
      down_states[i].slice(0, r0, r1).copy_(torch::from_blob(R.down[i].data(), down_states[i].slice(0, r0, r1).sizes()));
    for (size_t i = 0; i < up_states.size(); ++i)
      up_states[i].slice(0, r0, r1).copy_(torch::from_blob(R.up[i].data(), up_states[i].slice(0, r0, r1).sizes()));
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<FastSaShiMi>(m, "FastSaShiMi")
      .def(pybind11::init<torch::Tensor, std::vector<int64_t>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                          std::vector<torch::Tensor>, std::vector<torch::Tensor>, torch::Tensor, torch::Tensor,
                          torch::Tensor, torch::Tensor>())
      .def("add_layer", &FastSaShiMi::add_layer)
      .def("run", &FastSaShiMi::run, pybind11::call_guard<pybind11::gil_scoped_release>());
}
