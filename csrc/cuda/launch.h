// The torch-free interface of the cs_kernels CUDA kernels: raw device pointers, sizes and a
// stream (a cudaStream_t passed as void*). Plain C++: includes neither torch nor CUDA headers,
// so the torch-facing registration (csrc/cuda_ops.cpp) and the kernels (*.cu) build apart.
//
// Every launcher is asynchronous on `stream`, never synchronises the host, and returns
// nullptr on success or a static description of the launch error.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cs_kernels {
namespace cuda {

enum class ScalarType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Phase 2 (docs/algorithm.md) on grads [T, N], with the plan's tables in device memory.
struct Phase2Problem {
  ScalarType dtype = ScalarType::kFloat32;
  const void* grads = nullptr;       // [T, N], contiguous
  int64_t tasks = 0;                 // T >= 1
  int64_t numel = 0;                 // N
  const int64_t* layers = nullptr;   // [L, 4]: offset, channels, row_length, first_channel
  int64_t num_layers = 0;
  const int64_t* gaps = nullptr;     // [G, 2]: offset, length
  int64_t num_gaps = 0;
  const int64_t* top = nullptr;      // [C] top-priority task per channel
  int64_t total_channels = 0;        // C
  bool group_mode = true;
  bool project_uniform = false;
  void* out = nullptr;               // [N], dtype of grads
  void* projected = nullptr;         // [T, N] or nullptr
};

// Bytes of device scratch memory `phase2_launch` needs (from the sizes alone).
std::size_t phase2_workspace_bytes(const Phase2Problem& problem);

// Three launches (setup, main pass, projection pass). `workspace` holds
// phase2_workspace_bytes(problem) bytes, 256-byte aligned; it is scratch for this call only.
const char* phase2_launch(const Phase2Problem& problem, void* workspace, void* stream);

// Phase 2 in steps (cs_kernels/phase2_steps.py, as csrc/steps_cpu.cpp) on grads [T, N], with
// the plan's tables in device memory.
struct StepsProblem {
  ScalarType dtype = ScalarType::kFloat32;
  const void* grads = nullptr;      // [T, N], contiguous
  int64_t tasks = 0;                // T
  int64_t numel = 0;                // N
  const int64_t* layers = nullptr;  // [L, 4]: offset, channels, row_length, first_channel
  int64_t num_layers = 0;
  const int64_t* gaps = nullptr;    // [G, 2]: offset, length
  int64_t num_gaps = 0;
  int64_t total_channels = 0;       // C
};

// Scratch bytes of channel_gram_launch / project_launch (from the sizes alone).
std::size_t channel_gram_workspace_bytes(const StepsProblem& problem);
std::size_t project_workspace_bytes(const StepsProblem& problem);

// gram [C, T, T] (fp32; fp64 for fp64) = <G_i[c], G_j[c]> per channel row (0 for channels no
// layer covers); with `sum_out` ([N], dtype of grads; may be nullptr) also sum_t G_t on every
// row and gap element, in the same pass. Three launches (setup, main pass, long rows).
const char* channel_gram_launch(const StepsProblem& problem, void* gram, void* sum_out,
                                void* workspace, void* stream);

// out [N] = sum_t G_t - (sum_j coef[j, c]) * G_top(c)[c] on every channel row, the plain sum
// on the gaps; with `out_holds_sum`, `out` already holds the plain sum and only rows with a
// non-zero shrink are rewritten (gaps untouched). `coefficients`: [T, C] in the accumulation
// dtype; `top`: [C] int64 (a channel whose top is outside [0, T) is plainly summed). With
// `projected` ([T, N] or nullptr) also G'_t. Two launches (setup, element pass).
const char* project_launch(const StepsProblem& problem, const int64_t* top,
                           const void* coefficients, bool out_holds_sum, void* out,
                           void* projected, void* workspace, void* stream);

// One matrix [rows, cols] (contiguous) for the batched squared row norms.
struct Matrix {
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
};

// Most matrices one row_sqnorm launch takes (its table travels as a kernel argument).
constexpr int kMaxMatrices = 64;

// out[k] = sum_d W[k, d]^2 over the rows of all matrices, back to back (fp32; fp64 for fp64).
// One launch per kMaxMatrices matrices.
const char* row_sqnorm_launch(ScalarType dtype, const Matrix* matrices, int64_t count, void* out,
                              void* stream);

// Scratch bytes for top_priority_launch.
std::size_t top_priority_workspace_bytes(int64_t tasks, int64_t num_layers);

// strength [T, C] (fp32, or fp64 when `fp64`) -> top [C] (int64): per layer, the argmax over
// tasks of strength / (sum of the task's strengths over the layer), ties to the lowest task,
// in fp64. One launch. Channels outside every valid layer are left untouched.
const char* top_priority_launch(bool fp64, const void* strength, int64_t tasks,
                                int64_t total_channels, const int64_t* layers, int64_t num_layers,
                                int64_t* top, void* workspace, void* stream);

}  // namespace cuda
}  // namespace cs_kernels
