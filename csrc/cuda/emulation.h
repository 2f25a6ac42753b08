// A CPU emulation of the small part of the CUDA execution model the cs_kernels kernels use,
// so the test suite can run the real kernel sources on a machine without a GPU.
//
// Never part of the extension: only compiled with -DCSK_EMULATE by a host C++ compiler
// (tests/test_cuda_emulation.py). Blocks run one after another; inside a block every CUDA
// thread is a fiber (ucontext) and a fiber runs until it reaches a barrier (__syncthreads,
// a warp shuffle, __syncwarp) or returns, so barriers have their CUDA meaning:
//   * __shared__ variables become statics (one block runs at a time);
//   * every global memory access is checked against the buffers the caller registered;
//   * fibers and blocks can run in reverse order: a result that changes with the order
//     reveals a missing barrier or a dependence between blocks;
//   * a barrier that not every thread reaches is reported as a deadlock.
#pragma once

#ifndef CSK_EMULATE
#error "emulation.h is only for CSK_EMULATE builds"
#endif

#include <cuda_runtime_api.h>  // types only (dim3, cudaError_t, cudaStream_t): no libcudart
#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace csk_emu {

struct Options {
  int multiprocessors = 2;  // what the launchers see as the SM count (sizes persistent grids)
  bool reverse = false;     // run blocks and the threads of a block in reverse order
};

inline Options& options() {
  static Options value;
  return value;
}

// ------------------------------------------------------------------ memory access checks

struct Region {
  const char* begin;
  const char* end;
  bool writable;
  std::string name;
};

inline std::vector<Region>& regions() {
  static std::vector<Region> value;
  return value;
}

inline std::string& first_error() {
  static std::string value;
  return value;
}

inline void report(const std::string& message) {
  if (first_error().empty()) first_error() = message;
}

inline void add_region(const void* p, std::size_t bytes, bool writable, const char* name) {
  if (p == nullptr || bytes == 0) return;
  const char* begin = static_cast<const char*>(p);
  regions().push_back(Region{begin, begin + bytes, writable, name});
}

inline void reset() {
  regions().clear();
  first_error().clear();
}

inline bool check_access(const void* p, std::size_t bytes, bool write) {
  const char* begin = static_cast<const char*>(p);
  for (const Region& r : regions()) {
    if (begin >= r.begin && begin + bytes <= r.end) {
      if (write && !r.writable) {
        report("write into read-only buffer " + r.name);
        return false;
      }
      return true;
    }
  }
  char text[96];
  std::snprintf(text, sizeof(text), "%s of %zu bytes at %p outside every buffer",
                write ? "store" : "load", bytes, p);
  report(text);
  return false;
}

// ------------------------------------------------------------------ fibers and barriers

enum class Wait { kRunning, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  unsigned tid = 0;
  Wait wait = Wait::kRunning;
  unsigned long long slot = 0;  // the value a warp shuffle publishes
};

struct BlockState {
  dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  const std::function<void()>* body = nullptr;
};

inline BlockState& state() {
  static BlockState value;
  return value;
}

inline Fiber& self() { return state().fibers[static_cast<std::size_t>(state().current)]; }

inline void wait_at(Wait barrier) {
  Fiber& f = self();
  f.wait = barrier;
  swapcontext(&f.context, &state().scheduler);
}

inline void fiber_entry() {
  (*state().body)();
  self().wait = Wait::kDone;  // uc_link returns to the scheduler
}

// After every fiber has stopped: release the block barrier when every live thread reached
// it; otherwise release a single warp (the first whose live lanes all wait at a warp barrier,
// in scheduling order), which then runs as far as it can alone. Warps thus drift as far
// apart as the barriers allow, so a missing __syncthreads shows as a wrong or
// order-dependent result.
inline bool release_barriers() {
  std::vector<Fiber>& fibers = state().fibers;
  bool block_ready = true, block_waiting = false;
  for (const Fiber& f : fibers) {
    if (f.wait != Wait::kDone && f.wait != Wait::kBlock) block_ready = false;
    block_waiting = block_waiting || f.wait == Wait::kBlock;
  }
  if (block_ready && block_waiting) {
    for (Fiber& f : fibers) {
      if (f.wait == Wait::kBlock) f.wait = Wait::kRunning;
    }
    return true;
  }
  const std::size_t warps = fibers.size() / 32;
  for (std::size_t k = 0; k < warps; ++k) {
    const std::size_t w = (options().reverse ? warps - 1 - k : k) * 32;
    bool ready = true, waiting = false;
    for (std::size_t l = w; l < w + 32; ++l) {
      if (fibers[l].wait != Wait::kDone && fibers[l].wait != Wait::kWarp) ready = false;
      waiting = waiting || fibers[l].wait == Wait::kWarp;
    }
    if (ready && waiting) {
      for (std::size_t l = w; l < w + 32; ++l) {
        if (fibers[l].wait == Wait::kWarp) fibers[l].wait = Wait::kRunning;
      }
      return true;
    }
  }
  return false;
}

inline void run_block(dim3 block_idx, dim3 grid_dim, dim3 block_dim,
                      const std::function<void()>& body) {
  constexpr std::size_t kStack = 128 * 1024;
  BlockState& s = state();
  s.block_idx = block_idx;
  s.grid_dim = grid_dim;
  s.block_dim = block_dim;
  s.body = &body;
  const std::size_t n = block_dim.x;
  if (s.fibers.size() != n) s.fibers = std::vector<Fiber>(n);
  for (std::size_t t = 0; t < n; ++t) {
    Fiber& f = s.fibers[t];
    if (f.stack.size() != kStack) f.stack.assign(kStack, 0);
    f.tid = static_cast<unsigned>(t);
    f.wait = Wait::kWarp;  // every warp starts as if at a warp barrier: released one by one
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &s.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  for (;;) {
    for (std::size_t k = 0; k < n; ++k) {
      const std::size_t t = options().reverse ? n - 1 - k : k;
      if (s.fibers[t].wait != Wait::kRunning) continue;
      s.current = static_cast<int>(t);
      swapcontext(&s.scheduler, &s.fibers[t].context);
    }
    const bool done = std::all_of(s.fibers.begin(), s.fibers.end(),
                                  [](const Fiber& f) { return f.wait == Wait::kDone; });
    if (done) break;
    if (!release_barriers()) {
      report("deadlock: a barrier that not every thread of the block reaches");
      break;  // the stuck fibers are abandoned; their stacks are reinitialised next time
    }
  }
  s.current = -1;
}

inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1 || block.x % 32 != 0) {
    report("the emulation runs 1-D grids of whole warps only");
    return;
  }
  for (unsigned k = 0; k < grid.x; ++k) {
    const unsigned b = options().reverse ? grid.x - 1 - k : k;
    run_block(dim3(b), grid, block, body);
    if (!first_error().empty()) return;
  }
}

inline dim3 thread_idx() { return dim3(self().tid); }
inline dim3 block_idx() { return state().block_idx; }
inline dim3 block_dim() { return state().block_dim; }
inline dim3 grid_dim() { return state().grid_dim; }

template <typename T>
T shuffle(T value, unsigned source_lane_of_lane0, bool xor_mode, int width) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a wide type");
  Fiber& f = self();
  std::memcpy(&f.slot, &value, sizeof(T));
  wait_at(Wait::kWarp);
  const unsigned lane = f.tid & 31u;
  const unsigned segment = lane & ~static_cast<unsigned>(width - 1);
  unsigned src = xor_mode ? (lane ^ source_lane_of_lane0)
                          : segment + (source_lane_of_lane0 & static_cast<unsigned>(width - 1));
  if ((src & ~static_cast<unsigned>(width - 1)) != segment) src = lane;
  T result;
  std::memcpy(&result, &state().fibers[(f.tid & ~31u) + src].slot, sizeof(T));
  wait_at(Wait::kWarp);  // nobody republishes before every lane has read
  return result;
}

}  // namespace csk_emu

#define threadIdx (csk_emu::thread_idx())
#define blockIdx (csk_emu::block_idx())
#define blockDim (csk_emu::block_dim())
#define gridDim (csk_emu::grid_dim())

inline void __syncthreads() { csk_emu::wait_at(csk_emu::Wait::kBlock); }
inline void __syncwarp(unsigned = 0xffffffffu) { csk_emu::wait_at(csk_emu::Wait::kWarp); }
inline void __threadfence() {}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int width = 32) {
  return csk_emu::shuffle(value, static_cast<unsigned>(lane_mask), true, width);
}

template <typename T>
T __shfl_sync(unsigned, T value, int source_lane, int width = 32) {
  return csk_emu::shuffle(value, static_cast<unsigned>(source_lane), false, width);
}

inline int atomicAdd(int* address, int value) {
  if (!csk_emu::check_access(address, sizeof(int), true)) return 0;
  const int old = *address;
  *address = old + value;
  return old;
}
