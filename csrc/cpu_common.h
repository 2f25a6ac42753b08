// Helpers shared by the CPU kernels: accumulation types and fixed-order lane reductions.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace cs_kernels {

// fp64 accumulates in fp64; fp32, bf16 and fp16 in fp32.
template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Elements handled per inner block: the top-priority row block and the running sums stay in L1.
constexpr int64_t kBlock = 512;
// Independent accumulators per dot product: lets the compiler vectorise without reassociating,
// and fixes the summation order (results do not depend on the thread count).
constexpr int kLanes = 16;

template <typename acc_t>
inline acc_t reduce_lanes(const acc_t* lanes) {
  // Pairwise tree in a fixed order.
  acc_t tmp[kLanes];
  for (int k = 0; k < kLanes; ++k) tmp[k] = lanes[k];
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) tmp[k] += tmp[k + width];
  }
  return tmp[0];
}

}  // namespace cs_kernels
