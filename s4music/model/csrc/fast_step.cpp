// The SaShiMi model on the CPU, fused in C++: the recurrent step (generation, many samples a call)
// and the parallel read of a prompt (prefill), from one copy of the weights in one layout.
//
// Python (s4music/model/fast.py) hands over every weight once, already in step form:
//   S4 layers as an O(N) recurrence: diagonal (S4D) or DPLR through Sherman-Morrison, exact in
//   float32 (no eigendecomposition, which is ill-conditioned for HiPPO matrices),
//   weight-normed pooling weights as plain matrices.
// The references are SaShiMi.step and SaShiMi.prefill in sashimi.py; tests compare them.
//
// Instruction sets. The hot loops are written once over a vector type (Plain, Avx2, Avx512 in vectors.h)
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
//   GELU, gates    erf and exp inline (linear.h), so their loops vectorize with no calls.
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
//
// The parts, in the order they build on each other: vectors.h, linear.h, s4_layer.h, model.h,
// read.h, sampling.h; this file holds the model's entry points and their Python bindings.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "read.h"
#include "sampling.h"

namespace {

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