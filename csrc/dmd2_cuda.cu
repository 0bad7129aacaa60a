// CUDA kernels of the dmd2 extension (see dmd2_kernels.h for the layout contract).
//
// dm_grad: two launches over a (chunks, B) grid, deterministic (no atomics):
//   1. each block sums |x - real_x0| over its chunk of one sample in float32 -> partial[b, chunk];
//   2. each block re-reduces the (few) partials of its sample in a fixed order, forms
//      denom = mean|x - real_x0| + eps and writes g = (fake_x0 - real_x0) / denom for its chunk.
// noise_add: one launch; each thread produces VEC consecutive outputs, drawing element i's normal from the Philox
// counter offset + i (philox.h), so the result does not depend on the launch shape.
// Loads and stores are 16-byte vectors when every base pointer and batch stride allows it, scalar otherwise.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "dmd2_kernels.h"
#include "philox.h"

namespace dmd2 {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float block_sum(float v, float* shared /* [32] */) {
  for (int delta = 16; delta > 0; delta >>= 1) v += __shfl_down_sync(0xffffffffu, v, delta);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // `shared` may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < warps) ? shared[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int delta = 16; delta > 0; delta >>= 1) v += __shfl_down_sync(0xffffffffu, v, delta);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];  // the block total, in every thread
}

// Pass 1. grid = (chunks, min(B, 65535)); chunk is a multiple of VEC.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) dm_abs_partial_kernel(const T* __restrict__ x, const T* __restrict__ r,
                                                                  int64_t sx, int64_t sr, int64_t batch, int64_t n,
                                                                  int64_t chunk, float* __restrict__ partial) {
  __shared__ float shared[32];
  const int64_t j_begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t j_end = min(n, j_begin + chunk);
  const int64_t j_vec_end = j_begin + ((j_end - j_begin) / VEC) * VEC;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const T* xb = x + b * sx;
    const T* rb = r + b * sr;
    float acc = 0.f;
    for (int64_t j = j_begin + static_cast<int64_t>(threadIdx.x) * VEC; j < j_vec_end;
         j += static_cast<int64_t>(blockDim.x) * VEC) {
      const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(xb + j);
      const Pack<T, VEC> rv = *reinterpret_cast<const Pack<T, VEC>*>(rb + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc += fabsf(static_cast<float>(xv.v[k]) - static_cast<float>(rv.v[k]));
    }
    for (int64_t j = j_vec_end + threadIdx.x; j < j_end; j += blockDim.x)
      acc += fabsf(static_cast<float>(xb[j]) - static_cast<float>(rb[j]));
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = acc;
  }
}

// Pass 2. Same grid as pass 1; g is contiguous (batch stride n).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) dm_apply_kernel(const T* __restrict__ r, const T* __restrict__ f,
                                                            int64_t sr, int64_t sf, int64_t batch, int64_t n,
                                                            int64_t chunk, const float* __restrict__ partial,
                                                            float eps, T* __restrict__ g) {
  __shared__ float shared[32];
  const int64_t j_begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t j_end = min(n, j_begin + chunk);
  const int64_t j_vec_end = j_begin + ((j_end - j_begin) / VEC) * VEC;
  const int chunks = gridDim.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    float s = 0.f;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) s += partial[b * chunks + c];
    s = block_sum(s, shared);
    const float denom = s / static_cast<float>(n) + eps;
    const T* rb = r + b * sr;
    const T* fb = f + b * sf;
    T* gb = g + b * n;
    for (int64_t j = j_begin + static_cast<int64_t>(threadIdx.x) * VEC; j < j_vec_end;
         j += static_cast<int64_t>(blockDim.x) * VEC) {
      const Pack<T, VEC> rv = *reinterpret_cast<const Pack<T, VEC>*>(rb + j);
      const Pack<T, VEC> fv = *reinterpret_cast<const Pack<T, VEC>*>(fb + j);
      Pack<T, VEC> gv;
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        gv.v[k] = static_cast<T>((static_cast<float>(fv.v[k]) - static_cast<float>(rv.v[k])) / denom);
      *reinterpret_cast<Pack<T, VEC>*>(gb + j) = gv;
    }
    for (int64_t j = j_vec_end + threadIdx.x; j < j_end; j += blockDim.x)
      gb[j] = static_cast<T>((static_cast<float>(fb[j]) - static_cast<float>(rb[j])) / denom);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) noise_add_kernel(const T* __restrict__ x0, int64_t sx,
                                                             const float* __restrict__ alpha,
                                                             const float* __restrict__ sigma, int64_t batch,
                                                             int64_t n, int64_t chunk, uint64_t seed, uint64_t offset,
                                                             T* __restrict__ out) {
  const int64_t j_begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t j_end = min(n, j_begin + chunk);
  const int64_t j_vec_end = j_begin + ((j_end - j_begin) / VEC) * VEC;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const float a = alpha[b], s = sigma[b];
    const T* xb = x0 + b * sx;
    T* ob = out + b * n;
    const uint64_t counter_b = offset + static_cast<uint64_t>(b) * static_cast<uint64_t>(n);
    for (int64_t j = j_begin + static_cast<int64_t>(threadIdx.x) * VEC; j < j_vec_end;
         j += static_cast<int64_t>(blockDim.x) * VEC) {
      const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(xb + j);
      Pack<T, VEC> ov;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float z = philox_normal_at(seed, counter_b + static_cast<uint64_t>(j + k));
        ov.v[k] = static_cast<T>(a * static_cast<float>(xv.v[k]) + s * z);
      }
      *reinterpret_cast<Pack<T, VEC>*>(ob + j) = ov;
    }
    for (int64_t j = j_vec_end + threadIdx.x; j < j_end; j += blockDim.x) {
      const float z = philox_normal_at(seed, counter_b + static_cast<uint64_t>(j));
      ob[j] = static_cast<T>(a * static_cast<float>(xb[j]) + s * z);
    }
  }
}

// 16-byte vectors are used only when every row start is 16-byte aligned.
bool rows_aligned16(const at::Tensor& t, int64_t batch_stride) {
  const auto elem = static_cast<int64_t>(t.element_size());
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 && (batch_stride * elem) % 16 == 0;
}

int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return std::max(count, 1);
}

struct Grid {
  int64_t chunk;
  dim3 grid;
};

// About 4 blocks per SM in total, whatever B is; each chunk a multiple of one vector pass of the block.
Grid make_grid(int64_t batch, int64_t n, int vec, int device) {
  const int64_t step = static_cast<int64_t>(kThreads) * vec;
  const int64_t rows = std::min<int64_t>(batch, kMaxGridY);
  const int64_t target_blocks = 4 * static_cast<int64_t>(sm_count(device));
  const int64_t chunks_wanted = std::max<int64_t>(1, target_blocks / rows);
  int64_t chunk = (n + chunks_wanted - 1) / chunks_wanted;
  chunk = std::max(step, (chunk + step - 1) / step * step);
  const int64_t chunks = (n + chunk - 1) / chunk;
  return Grid{chunk, dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(rows), 1)};
}

template <typename T, int VEC>
void launch_dm_grad(const at::Tensor& x, const at::Tensor& r, const at::Tensor& f, double eps, at::Tensor& g) {
  const int64_t batch = x.size(0), n = sample_numel(x);
  const Grid gr = make_grid(batch, n, VEC, x.get_device());
  at::Tensor partial = at::empty({batch * static_cast<int64_t>(gr.grid.x)}, x.options().dtype(at::kFloat));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  dm_abs_partial_kernel<T, VEC><<<gr.grid, kThreads, 0, stream>>>(
      x.const_data_ptr<T>(), r.const_data_ptr<T>(), x.stride(0), r.stride(0), batch, n, gr.chunk,
      partial.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dm_apply_kernel<T, VEC><<<gr.grid, kThreads, 0, stream>>>(
      r.const_data_ptr<T>(), f.const_data_ptr<T>(), r.stride(0), f.stride(0), batch, n, gr.chunk,
      partial.const_data_ptr<float>(), static_cast<float>(eps), g.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void launch_noise_add(const at::Tensor& x0, const at::Tensor& alpha, const at::Tensor& sigma, uint64_t seed,
                      uint64_t offset, at::Tensor& out) {
  const int64_t batch = x0.size(0), n = sample_numel(x0);
  const Grid gr = make_grid(batch, n, VEC, x0.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x0.get_device()).stream();
  noise_add_kernel<T, VEC><<<gr.grid, kThreads, 0, stream>>>(
      x0.const_data_ptr<T>(), x0.stride(0), alpha.const_data_ptr<float>(), sigma.const_data_ptr<float>(), batch, n,
      gr.chunk, seed, offset, out.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void dm_grad_cuda(const at::Tensor& x, const at::Tensor& real_x0, const at::Tensor& fake_x0, double eps,
                  at::Tensor& g) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = sample_numel(x);
  DMD2_DISPATCH_DTYPES(x.scalar_type(), "dmd2_dm_grad_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = rows_aligned16(x, x.stride(0)) && rows_aligned16(real_x0, real_x0.stride(0)) &&
                     rows_aligned16(fake_x0, fake_x0.stride(0)) && rows_aligned16(g, n);
    if (vec) {
      launch_dm_grad<scalar_t, kVec>(x, real_x0, fake_x0, eps, g);
    } else {
      launch_dm_grad<scalar_t, 1>(x, real_x0, fake_x0, eps, g);
    }
  });
}

void noise_add_cuda(const at::Tensor& x0, const at::Tensor& alpha, const at::Tensor& sigma, uint64_t seed,
                    uint64_t offset, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x0.device());
  const int64_t n = sample_numel(x0);
  DMD2_DISPATCH_DTYPES(x0.scalar_type(), "dmd2_noise_add_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (rows_aligned16(x0, x0.stride(0)) && rows_aligned16(out, n)) {
      launch_noise_add<scalar_t, kVec>(x0, alpha, sigma, seed, offset, out);
    } else {
      launch_noise_add<scalar_t, 1>(x0, alpha, sigma, seed, offset, out);
    }
  });
}

}  // namespace dmd2
