// Kernel launchers behind csrc/dmd2_api.cpp. The binding has checked every input before these run:
//   * tensors are non-empty (B, ...) on one device, dtype float32 / bfloat16 / float16, and the elements of each
//     sample are contiguous in memory (any batch stride; stride(0) is passed as the batch stride);
//   * outputs are fresh contiguous tensors shaped like the first input;
//   * alpha / sigma are contiguous float32 (B,) tensors on the device of x0.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dmd2 {

// The dtypes the binding accepts (dmd2/kernels/contracts.py DTYPES), and no other: float32, bfloat16, float16.
#define DMD2_DISPATCH_DTYPES(TYPE, NAME, ...)                                                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                       \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Number of elements of one sample of a non-empty (B, ...) tensor (1 for a (B,) tensor).
inline int64_t sample_numel(const at::Tensor& t) {
  return t.numel() / t.size(0);
}

// g_i = (fake_i - real_i) / (mean_j |x_ij - real_ij| + eps), math in float32.
void dm_grad_cpu(const at::Tensor& x, const at::Tensor& real_x0, const at::Tensor& fake_x0, double eps, at::Tensor& g);
// x_t[b, j] = alpha[b] * x0[b, j] + sigma[b] * z[b * n + j], z = Philox normal of (seed, offset + flat index).
void noise_add_cpu(const at::Tensor& x0, const at::Tensor& alpha, const at::Tensor& sigma, uint64_t seed,
                   uint64_t offset, at::Tensor& out);

#ifdef DMD2_WITH_CUDA
void dm_grad_cuda(const at::Tensor& x, const at::Tensor& real_x0, const at::Tensor& fake_x0, double eps, at::Tensor& g);
void noise_add_cuda(const at::Tensor& x0, const at::Tensor& alpha, const at::Tensor& sigma, uint64_t seed,
                    uint64_t offset, at::Tensor& out);
#endif

}  // namespace dmd2
