// Device helpers shared by the cs_kernels CUDA kernels. Needs only the CUDA toolkit headers.
//
// Compiled by nvcc for the GPU. With CSK_EMULATE defined it is compiled by a host C++ compiler
// instead, against emulation.h, which runs every CUDA thread of a block as a fiber: the test
// suite uses that to run these exact kernels on a machine without a GPU.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifdef CSK_EMULATE
#include "emulation.h"
#else
#include <cuda_runtime.h>
#endif

#ifdef CSK_EMULATE
#define CSK_UNROLL
#define CSK_LAUNCH(kernel, grid, block, stream, ...) \
  ((void)(stream), csk_emu::launch((grid), (block), [&]() { kernel(__VA_ARGS__); }))
#else
#define CSK_UNROLL _Pragma("unroll")
#define CSK_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<(grid), (block), 0, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#endif

namespace cs_kernels {
namespace cuda {

// Threads per block of every kernel (the emulation builds use fewer, to exercise more blocks).
#ifndef CSK_THREADS
#define CSK_THREADS 512
#endif
constexpr int kThreads = CSK_THREADS;
constexpr int kWarps = kThreads / 32;
static_assert(kThreads % 32 == 0 && (kThreads & (kThreads - 1)) == 0, "power-of-two warps");

// fp64 accumulates in fp64; fp32, bf16 and fp16 in fp32.
template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Every global memory access goes through these helpers: the emulation checks the address.
template <typename T>
__device__ __forceinline__ T ld(const T* p) {
#ifdef CSK_EMULATE
  if (!csk_emu::check_access(p, sizeof(T), false)) return T();
#endif
  return *p;
}

template <typename T>
__device__ __forceinline__ void st(T* p, T v) {
#ifdef CSK_EMULATE
  if (!csk_emu::check_access(p, sizeof(T), true)) return;
#endif
  *p = v;
}

// Loads that must not hit a stale L1 line: data written by other blocks of the same launch.
template <typename T>
__device__ __forceinline__ T ld_coherent(const T* p) {
#ifdef CSK_EMULATE
  return ld(p);
#else
  return __ldcg(p);
#endif
}

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename scalar_t>
struct Round;
template <>
struct Round<float> {
  __device__ __forceinline__ static float from(float v) { return v; }
};
template <>
struct Round<double> {
  __device__ __forceinline__ static double from(double v) { return v; }
};
template <>
struct Round<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Round<__half> {
  __device__ __forceinline__ static __half from(float v) { return __float2half_rn(v); }
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_acc(const scalar_t* p) {
  return static_cast<acc_t>(to_acc(ld(p)));
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_rounded(scalar_t* p, acc_t v) {
  st(p, Round<scalar_t>::from(v));
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Smallest power of two >= v, for 1 <= v <= 2^30.
__host__ __device__ __forceinline__ int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Sum `v` over each aligned group of `lanes` consecutive threads (a power of two, at most
// kThreads); every thread of the group receives the same bits. Shuffle butterflies inside a
// warp, then the warps of a group are added in warp order through `red` (shared, at least
// K * kWarps). Must be called by every thread of the block with the same `lanes`.
template <int K, typename acc_t>
__device__ __forceinline__ void group_sum(acc_t (&v)[K], int lanes, acc_t* red) {
  const int width = lanes < 32 ? lanes : 32;
  for (int offset = 1; offset < width; offset <<= 1) {
    CSK_UNROLL
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
  if (lanes > 32) {
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    const int per_group = lanes >> 5;
    const int first = warp - warp % per_group;
    if ((threadIdx.x & 31) == 0) {
      CSK_UNROLL
      for (int k = 0; k < K; ++k) red[k * kWarps + warp] = v[k];
    }
    __syncthreads();
    CSK_UNROLL
    for (int k = 0; k < K; ++k) {
      acc_t total = red[k * kWarps + first];
      for (int w = 1; w < per_group; ++w) total += red[k * kWarps + first + w];
      v[k] = total;
    }
    __syncthreads();  // `red` is reused by the next call
  }
}

// Sum over the whole block, in a fixed order; every thread receives the result.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* red) {
  acc_t one[1] = {v};
  group_sum<1>(one, kThreads, red);
  return one[0];
}

// ---------------------------------------------------------------- host-side runtime queries

// Multiprocessors of the current device (cached per device; no synchronisation).
inline int multiprocessor_count() {
#ifdef CSK_EMULATE
  return csk_emu::options().multiprocessors;
#else
  static int cache[128] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 128) return 1;
  if (cache[device] == 0) {
    int count = 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return 1;
    }
    cache[device] = count > 0 ? count : 1;
  }
  return cache[device];
#endif
}

// Resident blocks of kThreads per multiprocessor for `kernel` (at least 1).
template <typename Kernel>
int blocks_per_multiprocessor(Kernel kernel) {
#ifdef CSK_EMULATE
  (void)kernel;
  return 1;
#else
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0) != cudaSuccess) {
    return 1;
  }
  return blocks > 0 ? blocks : 1;
#endif
}

// nullptr when the launches so far succeeded, otherwise the error's description.
inline const char* launch_error() {
#ifdef CSK_EMULATE
  return csk_emu::first_error().empty() ? nullptr : csk_emu::first_error().c_str();
#else
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
#endif
}

}  // namespace cuda
}  // namespace cs_kernels
