// C entry points of the CPU emulation build of the CUDA kernels (tests only; see emulation.h).
// Each call registers the buffers the kernels may touch, fills the scratch memory with NaN
// bytes (a read before a write shows), runs the real launchers and returns the first error
// the emulation saw (an access outside the buffers, a deadlock) or nullptr.
#ifndef CSK_EMULATE
#error "emulation_capi.cpp is only for CSK_EMULATE builds"
#endif

#include <cstring>
#include <vector>

#include "common.cuh"
#include "launch.h"

namespace {

using cs_kernels::cuda::ScalarType;

std::size_t element_size(int dtype) {
  return dtype == 1 ? 8 : (dtype == 0 ? 4 : 2);
}

std::vector<unsigned char>& scratch(std::size_t bytes) {
  static std::vector<unsigned char> buffer;
  buffer.assign(bytes + 256, 0xff);  // 0xff.. is a NaN in every float format, -1 as an integer
  return buffer;
}

void* aligned(std::vector<unsigned char>& buffer) {
  const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
  return buffer.data() + ((256 - address % 256) % 256);
}

const char* result(const char* launch_error) {
  if (!csk_emu::first_error().empty()) return csk_emu::first_error().c_str();
  return launch_error;
}

cs_kernels::cuda::StepsProblem steps_problem(int dtype, const void* grads, int64_t tasks,
                                             int64_t numel, const int64_t* layers,
                                             int64_t num_layers, const int64_t* gaps,
                                             int64_t num_gaps, int64_t total_channels) {
  cs_kernels::cuda::StepsProblem pr;
  pr.dtype = static_cast<ScalarType>(dtype);
  pr.grads = grads;
  pr.tasks = tasks;
  pr.numel = numel;
  pr.layers = layers;
  pr.num_layers = num_layers;
  pr.gaps = gaps;
  pr.num_gaps = num_gaps;
  pr.total_channels = total_channels;
  return pr;
}

// The read-only inputs every step reads: the rows and the plan's tables.
void add_step_regions(const cs_kernels::cuda::StepsProblem& pr) {
  const std::size_t es = element_size(static_cast<int>(pr.dtype));
  csk_emu::add_region(pr.grads, es * static_cast<std::size_t>(pr.tasks * pr.numel), false,
                      "grads");
  csk_emu::add_region(pr.layers, 32 * static_cast<std::size_t>(pr.num_layers), false, "layers");
  csk_emu::add_region(pr.gaps, 16 * static_cast<std::size_t>(pr.num_gaps), false, "gaps");
}

}  // namespace

extern "C" {

int csk_emu_threads() { return cs_kernels::cuda::kThreads; }

void csk_emu_configure(int multiprocessors, int reverse) {
  csk_emu::options().multiprocessors = multiprocessors;
  csk_emu::options().reverse = reverse != 0;
}

const char* csk_emu_phase2(int dtype, const void* grads, int64_t tasks, int64_t numel,
                           const int64_t* layers, int64_t num_layers, const int64_t* gaps,
                           int64_t num_gaps, const int64_t* top, int64_t total_channels,
                           int group_mode, int project_uniform, void* out, void* projected) {
  csk_emu::reset();
  cs_kernels::cuda::Phase2Problem pr;
  pr.dtype = static_cast<ScalarType>(dtype);
  pr.grads = grads;
  pr.tasks = tasks;
  pr.numel = numel;
  pr.layers = layers;
  pr.num_layers = num_layers;
  pr.gaps = gaps;
  pr.num_gaps = num_gaps;
  pr.top = top;
  pr.total_channels = total_channels;
  pr.group_mode = group_mode != 0;
  pr.project_uniform = project_uniform != 0;
  pr.out = out;
  pr.projected = projected;
  const std::size_t bytes = cs_kernels::cuda::phase2_workspace_bytes(pr);
  std::vector<unsigned char>& buffer = scratch(bytes);
  void* workspace = aligned(buffer);
  const std::size_t es = element_size(dtype);
  const auto n = static_cast<std::size_t>(numel), t = static_cast<std::size_t>(tasks);
  csk_emu::add_region(grads, es * t * n, false, "grads");
  csk_emu::add_region(layers, 32 * static_cast<std::size_t>(num_layers), false, "layers");
  csk_emu::add_region(gaps, 16 * static_cast<std::size_t>(num_gaps), false, "gaps");
  csk_emu::add_region(top, 8 * static_cast<std::size_t>(total_channels), false, "top");
  csk_emu::add_region(out, es * n, true, "out");
  csk_emu::add_region(projected, es * t * n, true, "projected");
  csk_emu::add_region(workspace, bytes, true, "workspace");
  return result(cs_kernels::cuda::phase2_launch(pr, workspace, nullptr));
}

const char* csk_emu_row_sqnorm(int dtype, const void* const* data, const int64_t* rows,
                               const int64_t* cols, int64_t count, void* out) {
  csk_emu::reset();
  std::vector<cs_kernels::cuda::Matrix> matrices(static_cast<std::size_t>(count));
  std::size_t total_rows = 0;
  for (int64_t k = 0; k < count; ++k) {
    matrices[k] = {data[k], rows[k], cols[k]};
    csk_emu::add_region(data[k], element_size(dtype) * static_cast<std::size_t>(rows[k] * cols[k]),
                        false, "weight");
    total_rows += static_cast<std::size_t>(rows[k]);
  }
  csk_emu::add_region(out, (dtype == 1 ? 8 : 4) * total_rows, true, "out");
  return result(cs_kernels::cuda::row_sqnorm_launch(static_cast<ScalarType>(dtype),
                                                    matrices.data(), count, out, nullptr));
}

const char* csk_emu_top_priority(int fp64, const void* strength, int64_t tasks,
                                 int64_t total_channels, const int64_t* layers,
                                 int64_t num_layers, int64_t* top) {
  csk_emu::reset();
  const std::size_t bytes = cs_kernels::cuda::top_priority_workspace_bytes(tasks, num_layers);
  std::vector<unsigned char>& buffer = scratch(bytes);
  void* workspace = aligned(buffer);
  const auto cells = static_cast<std::size_t>(tasks * total_channels);
  csk_emu::add_region(strength, (fp64 != 0 ? 8 : 4) * cells, false, "strength");
  csk_emu::add_region(layers, 32 * static_cast<std::size_t>(num_layers), false, "layers");
  csk_emu::add_region(top, 8 * static_cast<std::size_t>(total_channels), true, "top");
  csk_emu::add_region(workspace, bytes, true, "workspace");
  return result(cs_kernels::cuda::top_priority_launch(fp64 != 0, strength, tasks, total_channels,
                                                      layers, num_layers, top, workspace,
                                                      nullptr));
}

const char* csk_emu_channel_gram(int dtype, const void* grads, int64_t tasks, int64_t numel,
                                 const int64_t* layers, int64_t num_layers, const int64_t* gaps,
                                 int64_t num_gaps, int64_t total_channels, void* gram,
                                 void* sum_out) {
  csk_emu::reset();
  const cs_kernels::cuda::StepsProblem pr = steps_problem(dtype, grads, tasks, numel, layers,
                                                          num_layers, gaps, num_gaps,
                                                          total_channels);
  const std::size_t bytes = cs_kernels::cuda::channel_gram_workspace_bytes(pr);
  std::vector<unsigned char>& buffer = scratch(bytes);
  void* workspace = aligned(buffer);
  add_step_regions(pr);
  const auto cells = static_cast<std::size_t>(total_channels * tasks * tasks);
  csk_emu::add_region(gram, (dtype == 1 ? 8 : 4) * cells, true, "gram");
  csk_emu::add_region(sum_out, element_size(dtype) * static_cast<std::size_t>(numel), true,
                      "sum_out");
  csk_emu::add_region(workspace, bytes, true, "workspace");
  return result(cs_kernels::cuda::channel_gram_launch(pr, gram, sum_out, workspace, nullptr));
}

const char* csk_emu_project(int dtype, const void* grads, int64_t tasks, int64_t numel,
                            const int64_t* layers, int64_t num_layers, const int64_t* gaps,
                            int64_t num_gaps, const int64_t* top, int64_t total_channels,
                            const void* coefficients, int out_holds_sum, void* out,
                            void* projected) {
  csk_emu::reset();
  const cs_kernels::cuda::StepsProblem pr = steps_problem(dtype, grads, tasks, numel, layers,
                                                          num_layers, gaps, num_gaps,
                                                          total_channels);
  const std::size_t bytes = cs_kernels::cuda::project_workspace_bytes(pr);
  std::vector<unsigned char>& buffer = scratch(bytes);
  void* workspace = aligned(buffer);
  add_step_regions(pr);
  const std::size_t es = element_size(dtype);
  const auto n = static_cast<std::size_t>(numel), t = static_cast<std::size_t>(tasks);
  const auto c = static_cast<std::size_t>(total_channels);
  csk_emu::add_region(top, 8 * c, false, "top");
  csk_emu::add_region(coefficients, (dtype == 1 ? 8 : 4) * t * c, false, "coefficients");
  csk_emu::add_region(out, es * n, true, "out");
  csk_emu::add_region(projected, es * t * n, true, "projected");
  csk_emu::add_region(workspace, bytes, true, "workspace");
  return result(cs_kernels::cuda::project_launch(pr, top, coefficients, out_holds_sum != 0, out,
                                                 projected, workspace, nullptr));
}

}  // extern "C"
