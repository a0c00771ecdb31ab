// The Cauchy product's tensors and Python bindings; the kernels are in cauchy_kernel.cu.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "cauchy.h"

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
  cauchy_forward_launch(v.data_ptr(), z.data_ptr(), w.data_ptr(), out.data_ptr(), K, H, N, L,
                        c10::cuda::getCurrentCUDAStream());
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
  cauchy_backward_launch(grad.data_ptr(), v.data_ptr(), z.data_ptr(), w.data_ptr(), grad_v.data_ptr(),
                         grad_w.data_ptr(), K, H, N, L, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_v, grad_w};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &cauchy_forward, "Cauchy product (CUDA)");
  m.def("backward", &cauchy_backward, "Cauchy product gradients (CUDA)");
}
