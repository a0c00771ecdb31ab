// Cauchy product for S4 DPLR kernels, forward and backward.
//   out[k, h, l] = sum_n v[k, h, n] / (z[l] - w[h, n])
// v (K, H, N) complex64, z (L) complex64, w (H, N) complex64.
// The reference is s4music/model/kernels.py (cauchy_reference); tests compare the two.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/complex.h>

using cfloat = c10::complex<float>;

constexpr int kMaxN = 256;  // state entries per channel held in shared memory
constexpr int kMaxK = 8;    // (B, C) products per channel
constexpr int kThreads = 256;

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

static void check_inputs(const torch::Tensor& v, const torch::Tensor& z, const torch::Tensor& w) {
  TORCH_CHECK(v.is_cuda() && z.is_cuda() && w.is_cuda(), "cauchy: tensors must be on CUDA");
  TORCH_CHECK(v.scalar_type() == torch::kComplexFloat && z.scalar_type() == torch::kComplexFloat &&
                  w.scalar_type() == torch::kComplexFloat,
              "cauchy: tensors must be complex64");
  TORCH_CHECK(v.dim() == 3 && w.dim() == 2 && z.dim() == 1, "cauchy: shapes v (K,H,N), w (H,N), z (L)");
  TORCH_CHECK(v.size(1) == w.size(0) && v.size(2) == w.size(1), "cauchy: v and w disagree");
  TORCH_CHECK(v.size(0) <= kMaxK && v.size(2) <= kMaxN, "cauchy: K or N too large for this kernel");
}

torch::Tensor cauchy_forward(torch::Tensor v, torch::Tensor z, torch::Tensor w) {
  check_inputs(v, z, w);
  v = v.contiguous(); z = z.contiguous(); w = w.contiguous();
  const int K = v.size(0), H = v.size(1), N = v.size(2), L = z.size(0);
  auto out = torch::empty({K, H, L}, v.options());
  const dim3 grid((L + kThreads - 1) / kThreads, H);
  cauchy_forward_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const cfloat*>(v.data_ptr()), reinterpret_cast<const cfloat*>(z.data_ptr()),
      reinterpret_cast<const cfloat*>(w.data_ptr()), reinterpret_cast<cfloat*>(out.data_ptr()), K, H, N, L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<torch::Tensor> cauchy_backward(torch::Tensor grad, torch::Tensor v, torch::Tensor z,
                                           torch::Tensor w) {
  check_inputs(v, z, w);
  grad = grad.contiguous(); v = v.contiguous(); z = z.contiguous(); w = w.contiguous();
  const int K = v.size(0), H = v.size(1), N = v.size(2), L = z.size(0);
  auto grad_v = torch::empty_like(v);
  auto grad_w = torch::empty_like(w);
  const dim3 grid(N, H);
  cauchy_backward_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const cfloat*>(grad.data_ptr()), reinterpret_cast<const cfloat*>(v.data_ptr()),
      reinterpret_cast<const cfloat*>(z.data_ptr()), reinterpret_cast<const cfloat*>(w.data_ptr()),
      reinterpret_cast<cfloat*>(grad_v.data_ptr()), reinterpret_cast<cfloat*>(grad_w.data_ptr()), K, H, N, L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_v, grad_w};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &cauchy_forward, "Cauchy product (CUDA)");
  m.def("backward", &cauchy_backward, "Cauchy product gradients (CUDA)");
}
