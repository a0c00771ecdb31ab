// Cauchy product for S4 DPLR kernels, forward and backward: the kernels and their launches.
//   out[k, h, l] = sum_n v[k, h, n] / (z[l] - w[h, n])
// v (K, H, N) complex64, z (L) complex64, w (H, N) complex64.
// The reference is s4music/model/kernels.py (cauchy_reference); tests compare the two. The tensors'
// side is cauchy.cpp: nvcc never reads torch's headers, which makes the build minutes shorter.
#include <cuda_runtime.h>
#include <c10/util/complex.h>

#include "cauchy.h"

using cfloat = c10::complex<float>;

__global__ void cauchy_forward_kernel(const cfloat* __restrict__ v, const cfloat* __restrict__ z,
                                      const cfloat* __restrict__ w, cfloat* __restrict__ out,
                                      int K, int H, int N, int L) {
  __shared__ cfloat sw[kMaxN];
  __shared__ cfloat sv[kMaxK * kMaxN];
  const int h = blockIdx.y;
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    sw[n] = w[h * N + n];
    for (int k = 0; k < K; ++k) sv[k * N + n] = v[(k * H + h) * N + n];
  }
  __syncthreads();
  const int l = blockIdx.x * blockDim.x + threadIdx.x;
  if (l >= L) return;
  const cfloat zl = z[l];
  cfloat acc[kMaxK];
  for (int k = 0; k < K; ++k) acc[k] = cfloat(0.f, 0.f);
  for (int n = 0; n < N; ++n) {
    const cfloat inv = cfloat(1.f, 0.f) / (zl - sw[n]);
    for (int k = 0; k < K; ++k) acc[k] += sv[k * N + n] * inv;
  }
  for (int k = 0; k < K; ++k) out[(k * H + h) * L + l] = acc[k];
}

// One block per (h, n): reduce over l for grad_v[:, h, n] and grad_w[h, n].
// PyTorch's complex convention: grad_x = sum grad_out * conj(d out / d x).
__global__ void cauchy_backward_kernel(const cfloat* __restrict__ grad, const cfloat* __restrict__ v,
                                       const cfloat* __restrict__ z, const cfloat* __restrict__ w,
                                       cfloat* __restrict__ grad_v, cfloat* __restrict__ grad_w,
                                       int K, int H, int N, int L) {
  const int h = blockIdx.y, n = blockIdx.x;
  const cfloat wn = w[h * N + n];
  cfloat vc[kMaxK], gv[kMaxK];
  for (int k = 0; k < K; ++k) {
    vc[k] = std::conj(v[(k * H + h) * N + n]);
    gv[k] = cfloat(0.f, 0.f);
  }
  cfloat gw(0.f, 0.f);
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    const cfloat inv_c = std::conj(cfloat(1.f, 0.f) / (z[l] - wn));
    cfloat mix(0.f, 0.f);
    for (int k = 0; k < K; ++k) {
      const cfloat g = grad[(k * H + h) * L + l];
      gv[k] += g * inv_c;
      mix += g * vc[k];
    }
    gw += mix * inv_c * inv_c;
  }
  __shared__ cfloat red[kThreads];
  auto reduce = [&](cfloat x) -> cfloat {
    red[threadIdx.x] = x;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
      __syncthreads();
    }
    cfloat total = red[0];
    __syncthreads();
    return total;
  };
  for (int k = 0; k < K; ++k) {
    const cfloat total = reduce(gv[k]);
    if (threadIdx.x == 0) grad_v[(k * H + h) * N + n] = total;
  }
  const cfloat total = reduce(gw);
  if (threadIdx.x == 0) grad_w[h * N + n] = total;
}

void cauchy_forward_launch(const void* v, const void* z, const void* w, void* out, int K, int H, int N, int L,
                           cudaStream_t stream) {
  const dim3 grid((L + kThreads - 1) / kThreads, H);
  cauchy_forward_kernel<<<grid, kThreads, 0, stream>>>(
      static_cast<const cfloat*>(v), static_cast<const cfloat*>(z), static_cast<const cfloat*>(w),
      static_cast<cfloat*>(out), K, H, N, L);
}

void cauchy_backward_launch(const void* grad, const void* v, const void* z, const void* w, void* grad_v, void* grad_w,
                            int K, int H, int N, int L, cudaStream_t stream) {
  const dim3 grid(N, H);
  cauchy_backward_kernel<<<grid, kThreads, 0, stream>>>(
      static_cast<const cfloat*>(grad), static_cast<const cfloat*>(v), static_cast<const cfloat*>(z),
      static_cast<const cfloat*>(w), static_cast<cfloat*>(grad_v), static_cast<cfloat*>(grad_w), K, H, N, L);
}
