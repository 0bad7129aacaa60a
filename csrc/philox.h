// Counter-based normal noise shared by the C++ and CUDA kernels: Philox4x32-10 + Box-Muller.
//
// Element i of a noise tensor drawn from (seed, offset) is, bit for bit in its integer part,
// Triton's tl.randn(seed, offset + i) (the spec: dmd2.kernels.reference.philox_normal):
//   counter (c0, c1, c2, c3) = (lo32(offset + i), hi32(offset + i), 0, 0), key (k0, k1) = (lo32(seed), hi32(seed)),
//   10 rounds of  c0' = hi(B*c2) ^ c1 ^ k0,  c2' = hi(A*c0) ^ c3 ^ k1,  c1' = lo(B*c2),  c3' = lo(A*c0),
//   key += (0x9E3779B9, 0xBB67AE85) after each round (Salmon et al. 2011, "Random123");
//   u_k = float(fold(int32(c_k))) * 4.6566127342e-10f with fold(v) = v < 0 ? ~v : v   (k = 0, 1);
//   z = sqrt(-2 log max(1e-7, u_0)) * cos(2 pi u_1)   (first Box-Muller output), all in float32.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DMD2_HD __host__ __device__ __forceinline__
#else
#define DMD2_HD inline
#endif

namespace dmd2 {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

DMD2_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First two 32-bit outputs of Philox4x32-10 for a 64-bit counter and a 64-bit key (the two tl.randn uses).
DMD2_HD void philox_c0_c1(uint64_t counter, uint64_t seed, uint32_t& out0, uint32_t& out1) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u;
  uint32_t c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mulhi32(kPhiloxRoundB, c2);
    const uint32_t lo_b = kPhiloxRoundB * c2;
    const uint32_t hi_a = mulhi32(kPhiloxRoundA, c0);
    const uint32_t lo_a = kPhiloxRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  out0 = c0;
  out1 = c1;
}

// Triton's uint_to_uniform_float for 32-bit words: [0, 1) in float32.
DMD2_HD float uint32_to_uniform(uint32_t bits) {
  int32_t v = static_cast<int32_t>(bits);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

// First output of Box-Muller on two uniforms, as Triton's pair_uniform_to_normal.
DMD2_HD float box_muller_first(float u1, float u2) {
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float theta = 6.283185307179586f * u2;
#if defined(__CUDA_ARCH__)
  return sqrtf(-2.0f * logf(u1)) * cosf(theta);
#else
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(theta);
#endif
}

DMD2_HD float philox_normal_at(uint64_t seed, uint64_t counter) {
  uint32_t a, b;
  philox_c0_c1(counter, seed, a, b);
  return box_muller_first(uint32_to_uniform(a), uint32_to_uniform(b));
}

}  // namespace dmd2
