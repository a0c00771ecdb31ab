// Vector types (plain, AVX2, AVX-512) and the instruction sets a CPU runs; aligned buffers; thread teams.
// Part of the fused CPU step: see fast_step.cpp for the layout and the build.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
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

}  // namespace
