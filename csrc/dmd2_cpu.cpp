// C++ CPU kernels of the dmd2 extension (see dmd2_kernels.h for the layout contract).
//
// Parallelism: at::parallel_for over (sample, chunk) tasks so that a small batch of large samples still uses every
// thread. Inner loops are straight-line float32 code over contiguous memory, written so the compiler vectorises them
// (independent partial sums for the reduction, no branches in the elementwise loops).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dmd2_kernels.h"
#include "philox.h"

namespace dmd2 {
namespace {

constexpr int64_t kChunk = 16384;  // elements per parallel task (64 KiB of float32 per input)
constexpr int kLanes = 16;         // independent partial sums in the reduction (vector width x unroll)

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

// sum_j |x_j - r_j| over n contiguous elements, float32 accumulation in kLanes independent lanes.
template <typename T>
float abs_diff_sum(const T* __restrict__ x, const T* __restrict__ r, int64_t n) {
  float lanes[kLanes] = {0.f};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += std::fabs(to_f(x[j + k]) - to_f(r[j + k]));
  }
  float tail = 0.f;
  for (; j < n; ++j) tail += std::fabs(to_f(x[j]) - to_f(r[j]));
  // pairwise combination of the lanes
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int k = 0; k < width; ++k) lanes[k] += lanes[k + width];
  return lanes[0] + tail;
}

template <typename T>
void dm_grad_cpu_typed(const at::Tensor& x, const at::Tensor& real_x0, const at::Tensor& fake_x0, double eps,
                       at::Tensor& g) {
  const int64_t batch = x.size(0);
  const int64_t n = sample_numel(x);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t sx = x.stride(0), sr = real_x0.stride(0), sf = fake_x0.stride(0);
  const T* xp = x.const_data_ptr<T>();
  const T* rp = real_x0.const_data_ptr<T>();
  const T* fp = fake_x0.const_data_ptr<T>();
  T* gp = g.mutable_data_ptr<T>();

  // Pass 1: per-(sample, chunk) partial sums of |x - real_x0|.
  std::vector<float> partial(static_cast<size_t>(batch * chunks));
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      const int64_t j0 = c * kChunk, len = std::min(kChunk, n - j0);
      partial[task] = abs_diff_sum(xp + b * sx + j0, rp + b * sr + j0, len);
    }
  });

  // Per-sample denominators mean|x - real_x0| + eps (chunks summed in order: deterministic).
  std::vector<float> denom(static_cast<size_t>(batch));
  const float epsf = static_cast<float>(eps);
  for (int64_t b = 0; b < batch; ++b) {
    float s = 0.f;
    for (int64_t c = 0; c < chunks; ++c) s += partial[b * chunks + c];
    denom[b] = s / static_cast<float>(n) + epsf;
  }

  // Pass 2: g = (fake_x0 - real_x0) * (1 / denom), elementwise.
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      const int64_t j0 = c * kChunk, len = std::min(kChunk, n - j0);
      const T* __restrict__ f = fp + b * sf + j0;
      const T* __restrict__ r = rp + b * sr + j0;
      T* __restrict__ out = gp + b * n + j0;
      // one reciprocal per sample: a multiply per element vectorises far better than a divide (<= 1 ulp apart)
      const float inv = 1.0f / denom[b];
      for (int64_t j = 0; j < len; ++j) out[j] = static_cast<T>((to_f(f[j]) - to_f(r[j])) * inv);
    }
  });
}

constexpr int64_t kNoiseBlock = 256;  // elements whose normals are computed together (stack buffers)

template <typename T>
void noise_add_cpu_typed(const at::Tensor& x0, const at::Tensor& alpha, const at::Tensor& sigma, uint64_t seed,
                         uint64_t offset, at::Tensor& out) {
  const int64_t batch = x0.size(0);
  const int64_t n = sample_numel(x0);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t sx = x0.stride(0);
  const T* xp = x0.const_data_ptr<T>();
  const float* ap = alpha.const_data_ptr<float>();
  const float* sp = sigma.const_data_ptr<float>();
  T* op = out.mutable_data_ptr<T>();

  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    uint32_t w0[kNoiseBlock], w1[kNoiseBlock];
    float z[kNoiseBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      const int64_t j_begin = c * kChunk, j_end = std::min(n, j_begin + kChunk);
      const float a = ap[b], s = sp[b];
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kNoiseBlock) {
        const int64_t len = std::min(kNoiseBlock, j_end - j0);
        // flat (row-major) index of element (b, j) of the output is b * n + j
        const uint64_t counter0 = offset + static_cast<uint64_t>(b * n + j0);
        for (int64_t k = 0; k < len; ++k) philox_c0_c1(counter0 + static_cast<uint64_t>(k), seed, w0[k], w1[k]);
        for (int64_t k = 0; k < len; ++k) z[k] = box_muller_first(uint32_to_uniform(w0[k]), uint32_to_uniform(w1[k]));
        const T* __restrict__ xs = xp + b * sx + j0;
        T* __restrict__ o = op + b * n + j0;
        for (int64_t k = 0; k < len; ++k) o[k] = static_cast<T>(a * to_f(xs[k]) + s * z[k]);
      }
    }
  });
}

}  // namespace

void dm_grad_cpu(const at::Tensor& x, const at::Tensor& real_x0, const at::Tensor& fake_x0, double eps,
                 at::Tensor& g) {
  DMD2_DISPATCH_DTYPES(x.scalar_type(), "dmd2_dm_grad_cpu",
                                  [&] { dm_grad_cpu_typed<scalar_t>(x, real_x0, fake_x0, eps, g); });
}

void noise_add_cpu(const at::Tensor& x0, const at::Tensor& alpha, const at::Tensor& sigma, uint64_t seed,
                   uint64_t offset, at::Tensor& out) {
  DMD2_DISPATCH_DTYPES(x0.scalar_type(), "dmd2_noise_add_cpu",
                                  [&] { noise_add_cpu_typed<scalar_t>(x0, alpha, sigma, seed, offset, out); });
}

}  // namespace dmd2
