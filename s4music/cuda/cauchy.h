// What cauchy.cpp (tensors, checks, Python) and cauchy_kernel.cu (the kernels) share.
#pragma once
#include <cuda_runtime.h>

constexpr int kMaxN = 256;  // state entries per channel held in shared memory
constexpr int kMaxK = 8;    // (B, C) products per channel
constexpr int kThreads = 256;

// Complex64 arrays as raw pointers; the launches are asynchronous on `stream`.
void cauchy_forward_launch(const void* v, const void* z, const void* w, void* out, int K, int H, int N, int L,
                           cudaStream_t stream);
void cauchy_backward_launch(const void* grad, const void* v, const void* z, const void* w, void* grad_v, void* grad_w,
                            int K, int H, int N, int L, cudaStream_t stream);
