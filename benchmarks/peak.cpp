// This machine's arithmetic peak, for the bounds in bench_model.py: every OpenMP thread at once
// issues independent vector instructions of one kind in registers (no memory traffic), and the
// rates of all threads are added.
//   fma    vfmadd231ps on ymm: 8 float multiply-adds an instruction (AVX2)
//   madd   vpmaddwd + vpaddd: 16 int16 multiply-adds an instruction, summed pairwise into int32,
//          the fastest integer product AVX2 has without 8-bit saturation
//   fma512 vfmadd231ps on zmm: 16 float multiply-adds an instruction, where the CPU has AVX-512
// Twelve chains per kind are more than latency x throughput on current x86 cores, so the figure
// is the issue rate, not a latency.
#include <torch/extension.h>

#include <chrono>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Instructions per second of one thread, in billions.
double fma_rate(int64_t n) {
  __m256 w = _mm256_set1_ps(1.0001f), x = _mm256_set1_ps(0.9999f);
#define DECLARE(i) __m256 acc##i = _mm256_set1_ps((float)i);
  CHAINS(DECLARE)
#undef DECLARE
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t k = 0; k < n; ++k) {
#define STEP(i) acc##i = _mm256_fmadd_ps(w, x, acc##i);
    CHAINS(STEP)
#undef STEP
    __asm__ volatile("" : "+x"(w), "+x"(x));  // opaque operands: nothing to hoist or fold
  }
  const double dt = seconds_since(t0);
  float sink = 0.f;
#define SINK(i) sink += _mm256_cvtss_f32(acc##i);
  CHAINS(SINK)
#undef SINK
  __asm__ volatile("" : : "x"(sink));
  return 12.0 * n / dt / 1e9;
}

double madd_rate(int64_t n) {
  const __m256i x = _mm256_set1_epi16(3);
#define DECLARE(i) __m256i acc##i = _mm256_set1_epi32(i), w##i = _mm256_set1_epi16((short)(i + 1));
  CHAINS(DECLARE)
#undef DECLARE
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t k = 0; k < n; ++k) {
#define STEP(i) acc##i = _mm256_add_epi32(acc##i, _mm256_madd_epi16(w##i, x)); __asm__ volatile("" : "+x"(w##i));
    CHAINS(STEP)
#undef STEP
  }
  const double dt = seconds_since(t0);
  int sink = 0;
#define SINK(i) sink += _mm256_cvtsi256_si32(acc##i);
  CHAINS(SINK)
#undef SINK
  __asm__ volatile("" : : "r"(sink));
  return 12.0 * n / dt / 1e9;
}

#ifdef __AVX512F__
double fma512_rate(int64_t n) {
  __m512 w = _mm512_set1_ps(1.0001f), x = _mm512_set1_ps(0.9999f);
#define DECLARE(i) __m512 acc##i = _mm512_set1_ps((float)i);
  CHAINS(DECLARE)
#undef DECLARE
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t k = 0; k < n; ++k) {
#define STEP(i) acc##i = _mm512_fmadd_ps(w, x, acc##i);
    CHAINS(STEP)
#undef STEP
    __asm__ volatile("" : "+v"(w), "+v"(x));
  }
  const double dt = seconds_since(t0);
  float sink = 0.f;
#define SINK(i) sink += _mm512_reduce_add_ps(acc##i);
  CHAINS(SINK)
#undef SINK
  __asm__ volatile("" : : "x"(sink));
  return 12.0 * n / dt / 1e9;
}
#endif

}  // namespace

// {float multiply-adds per second (ymm), int16 multiply-adds per second[, float multiply-adds per
// second on zmm]}, in billions, all threads together.
std::vector<double> peak(int64_t n) {
  double fma = 0, madd = 0, fma512 = 0;
#pragma omp parallel reduction(+ : fma, madd, fma512)
  {
    fma += 8 * fma_rate(n);
#pragma omp barrier
    madd += 16 * madd_rate(n);
#ifdef __AVX512F__
#pragma omp barrier
    fma512 += 16 * fma512_rate(n);
#endif
  }
#ifdef __AVX512F__
  return {fma, madd, fma512};
#endif
  return {fma, madd};
}
#else
std::vector<double> peak(int64_t) { return {}; }  // no AVX2: nothing to measure
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("peak", &peak); }
