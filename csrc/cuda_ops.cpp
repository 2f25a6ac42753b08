// The cs_kernels ops for CUDA tensors: argument checks, scratch memory from PyTorch's caching
// allocator, the current stream, then the torch-free launchers of csrc/cuda/ (launch.h).
// Compiled only in CUDA builds (setup.py). Never synchronises the host, so every op can be
// captured in a CUDA graph.
//
// Value checks that would need a device-to-host copy (task indices in `top`, the tables'
// offsets) are left to the public API (`check=True`); the kernels skip a table row that does
// not fit and plainly sum a layer whose tops are out of range, instead of reading out of
// bounds.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cstddef>
#include <initializer_list>
#include <vector>

// The CUDA build of torch ships c10/cuda; a CPU build (used to compile-check this file, see
// tools/check_cuda_compile.py) does not, and then the device-generic stream interface stands in.
#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAStream.h>
#define CS_KERNELS_HAVE_C10_CUDA 1
#else
#include <c10/core/impl/DeviceGuardImplInterface.h>
#endif

#include "cuda/launch.h"

namespace cs_kernels {

namespace {

namespace kc = cs_kernels::cuda;

void* current_stream(const at::Device& device) {
#ifdef CS_KERNELS_HAVE_C10_CUDA
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
#else
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
  return c10::impl::getDeviceGuardImpl(device.type())->getStreamNativeHandle(stream);
#endif
}

kc::ScalarType kernel_dtype(const at::Tensor& t, const char* name) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kBFloat16 ||
                  type == at::kHalf,
              name, " must be float32, float64, bfloat16 or float16, got ", type);
  if (type == at::kDouble) return kc::ScalarType::kFloat64;
  if (type == at::kBFloat16) return kc::ScalarType::kBFloat16;
  if (type == at::kHalf) return kc::ScalarType::kFloat16;
  return kc::ScalarType::kFloat32;
}

void check_on(const at::Tensor& t, const at::Device& device, const char* name) {
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), ", expected ", device);
}

void check_launch(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, "cs_kernels::", op, " CUDA launch failed: ",
              error == nullptr ? "" : error);
}

// Scratch bytes on the device of `like`. The launchers align their regions to 256 bytes from
// the start of the buffer, which the caching allocator aligns to 512 bytes.
at::Tensor workspace(std::size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// Checks shared by the steps: grads, the tables (shapes, dtypes, device; their values are the
// kernels' to skip when they do not fit) and the problem the launchers take.
kc::StepsProblem steps_problem(const at::Tensor& grads, const at::Tensor& layers,
                               const at::Tensor& gaps, int64_t channels) {
  TORCH_CHECK(grads.is_cuda(), "grads must be a CUDA tensor");
  TORCH_CHECK(grads.dim() == 2 && grads.is_contiguous(), "grads must be contiguous [T, N]");
  TORCH_CHECK(layers.scalar_type() == at::kLong && layers.dim() == 2 && layers.size(1) == 4 &&
                  layers.is_contiguous(),
              "layers must be contiguous int64 [L, 4]");
  TORCH_CHECK(gaps.scalar_type() == at::kLong && gaps.dim() == 2 && gaps.size(1) == 2 &&
                  gaps.is_contiguous(),
              "gaps must be contiguous int64 [G, 2]");
  TORCH_CHECK(channels >= 0, "channels must be >= 0, got ", channels);
  check_on(layers, grads.device(), "layers");
  check_on(gaps, grads.device(), "gaps");
  kc::StepsProblem problem;
  problem.dtype = kernel_dtype(grads, "grads");
  problem.grads = grads.data_ptr();
  problem.tasks = grads.size(0);
  problem.numel = grads.size(1);
  problem.layers = layers.data_ptr<int64_t>();
  problem.num_layers = layers.size(0);
  problem.gaps = gaps.data_ptr<int64_t>();
  problem.num_gaps = gaps.size(0);
  problem.total_channels = channels;
  return problem;
}

void check_step_out(const at::Tensor& t, const at::Tensor& grads, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.dim() == 1 && t.numel() == grads.size(1) &&
                  t.scalar_type() == grads.scalar_type(),
              name, " must be a contiguous [N] tensor of the dtype of grads");
  check_on(t, grads.device(), name);
}

// Whether the bytes of `a` and `b` overlap (the kernels keep reading `b` while writing `a`).
bool bytes_overlap(const at::Tensor& a, const at::Tensor& b) {
  const auto* a0 = static_cast<const char*>(a.data_ptr());
  const auto* b0 = static_cast<const char*>(b.data_ptr());
  const auto a_bytes = static_cast<std::ptrdiff_t>(a.numel() * a.element_size());
  const auto b_bytes = static_cast<std::ptrdiff_t>(b.numel() * b.element_size());
  return a_bytes > 0 && b_bytes > 0 && a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

}  // namespace

at::Tensor row_sqnorm_cuda(const at::Tensor& weight) {
  TORCH_CHECK(weight.is_cuda(), "weight must be a CUDA tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be contiguous [C, D]");
  const kc::ScalarType dtype = kernel_dtype(weight, "weight");
  const c10::DeviceGuard guard(weight.device());
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({weight.size(0)}, weight.options().dtype(acc));
  if (weight.size(0) == 0) return out;
  const kc::Matrix matrix{weight.data_ptr(), weight.size(0), weight.size(1)};
  check_launch(kc::row_sqnorm_launch(dtype, &matrix, 1, out.data_ptr(), current_stream(weight.device())),
               "row_sqnorm");
  return out;
}

at::Tensor plan_row_sqnorm_cuda(at::TensorList weights) {
  TORCH_CHECK(!weights.empty(), "weights must hold at least one tensor");
  const at::Tensor& head = weights[0];
  TORCH_CHECK(head.is_cuda(), "weights[0] must be a CUDA tensor");
  const kc::ScalarType dtype = kernel_dtype(head, "weights[0]");
  std::vector<kc::Matrix> matrices;
  matrices.reserve(weights.size());
  int64_t rows = 0;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.scalar_type() == head.scalar_type() && w.device() == head.device(), "weights[",
                i, "] must have the dtype and device of weights[0]");
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weights[", i, "] must be contiguous [C, D]");
    matrices.push_back(kc::Matrix{w.data_ptr(), w.size(0), w.size(1)});
    rows += w.size(0);
  }
  const c10::DeviceGuard guard(head.device());
  const auto acc = head.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({rows}, head.options().dtype(acc));
  if (rows == 0) return out;
  check_launch(kc::row_sqnorm_launch(dtype, matrices.data(), static_cast<int64_t>(matrices.size()),
                                     out.data_ptr(), current_stream(head.device())),
               "plan_row_sqnorm");
  return out;
}

at::Tensor top_priority_cuda(const at::Tensor& strength, const at::Tensor& layers) {
  TORCH_CHECK(strength.is_cuda(), "strength must be a CUDA tensor");
  TORCH_CHECK(strength.dim() == 2 && strength.is_contiguous(), "strength must be contiguous [T, C]");
  TORCH_CHECK(strength.scalar_type() == at::kFloat || strength.scalar_type() == at::kDouble,
              "strength must be float32 or float64");
  TORCH_CHECK(layers.dim() == 2 && layers.size(1) == 4 && layers.scalar_type() == at::kLong &&
                  layers.is_contiguous(),
              "layers must be contiguous int64 [L, 4]");
  check_on(layers, strength.device(), "layers");
  const c10::DeviceGuard guard(strength.device());
  // Zeros: channels outside every layer (only with a table that does not cover them) stay 0.
  at::Tensor top = at::zeros({strength.size(1)}, strength.options().dtype(at::kLong));
  const int64_t tasks = strength.size(0), num_layers = layers.size(0);
  if (strength.size(1) == 0 || num_layers == 0 || tasks == 0) return top;
  at::Tensor scratch = workspace(kc::top_priority_workspace_bytes(tasks, num_layers), strength);
  check_launch(kc::top_priority_launch(strength.scalar_type() == at::kDouble, strength.data_ptr(),
                                       tasks, strength.size(1), layers.data_ptr<int64_t>(),
                                       num_layers, top.data_ptr<int64_t>(), scratch.data_ptr(),
                                       current_stream(strength.device())),
               "top_priority");
  return top;
}

void phase2_cuda(const at::Tensor& grads, const at::Tensor& layers, const at::Tensor& gaps,
                 const at::Tensor& top, bool group_mode, bool project_uniform, at::Tensor out,
                 const c10::optional<at::Tensor>& projected) {
  TORCH_CHECK(grads.is_cuda(), "grads must be a CUDA tensor");
  TORCH_CHECK(grads.dim() == 2 && grads.is_contiguous(), "grads must be contiguous [T, N]");
  TORCH_CHECK(grads.size(0) >= 1, "grads must hold at least one task (T >= 1)");
  const kc::ScalarType dtype = kernel_dtype(grads, "grads");
  const at::Device device = grads.device();
  TORCH_CHECK(out.is_contiguous() && out.dim() == 1 && out.numel() == grads.size(1),
              "out must be contiguous [N]");
  TORCH_CHECK(out.scalar_type() == grads.scalar_type(), "out must have the dtype of grads");
  TORCH_CHECK(layers.scalar_type() == at::kLong && layers.dim() == 2 && layers.size(1) == 4 &&
                  layers.is_contiguous(),
              "layers must be contiguous int64 [L, 4]");
  TORCH_CHECK(gaps.scalar_type() == at::kLong && gaps.dim() == 2 && gaps.size(1) == 2 &&
                  gaps.is_contiguous(),
              "gaps must be contiguous int64 [G, 2]");
  TORCH_CHECK(top.scalar_type() == at::kLong && top.dim() == 1 && top.is_contiguous(),
              "top must be contiguous int64 [C]");
  check_on(out, device, "out");
  check_on(layers, device, "layers");
  check_on(gaps, device, "gaps");
  check_on(top, device, "top");
  const bool want_projected = projected.has_value() && projected->defined();
  if (want_projected) {
    TORCH_CHECK(projected->is_contiguous() && projected->sizes() == grads.sizes() &&
                    projected->scalar_type() == grads.scalar_type(),
                "projected must be contiguous with the shape and dtype of grads");
    check_on(*projected, device, "projected");
  }
  const c10::DeviceGuard guard(device);
  kc::Phase2Problem problem;
  problem.dtype = dtype;
  problem.grads = grads.data_ptr();
  problem.tasks = grads.size(0);
  problem.numel = grads.size(1);
  problem.layers = layers.data_ptr<int64_t>();
  problem.num_layers = layers.size(0);
  problem.gaps = gaps.data_ptr<int64_t>();
  problem.num_gaps = gaps.size(0);
  problem.top = top.data_ptr<int64_t>();
  problem.total_channels = top.numel();
  problem.group_mode = group_mode;
  problem.project_uniform = project_uniform;
  problem.out = out.data_ptr();
  problem.projected = want_projected ? projected->data_ptr() : nullptr;
  if (problem.numel == 0 || problem.num_layers + problem.num_gaps == 0) return;
  at::Tensor scratch = workspace(kc::phase2_workspace_bytes(problem), grads);
  check_launch(kc::phase2_launch(problem, scratch.data_ptr(), current_stream(device)), "phase2_");
}

at::Tensor channel_gram_cuda(const at::Tensor& grads, const at::Tensor& layers,
                             const at::Tensor& gaps, int64_t channels,
                             const c10::optional<at::Tensor>& sum_out) {
  const kc::StepsProblem problem = steps_problem(grads, layers, gaps, channels);
  const bool with_sum = sum_out.has_value() && sum_out->defined();
  if (with_sum) check_step_out(*sum_out, grads, "sum_out");
  const c10::DeviceGuard guard(grads.device());
  const auto acc = grads.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = grads.options().dtype(acc);
  if (problem.tasks == 0) return at::zeros({channels, 0, 0}, options);
  // Every entry is written by the kernels (zero for channels no layer covers).
  at::Tensor gram = at::empty({channels, problem.tasks, problem.tasks}, options);
  at::Tensor scratch = workspace(kc::channel_gram_workspace_bytes(problem), grads);
  check_launch(kc::channel_gram_launch(problem, gram.data_ptr(),
                                       with_sum ? sum_out->data_ptr() : nullptr,
                                       scratch.data_ptr(), current_stream(grads.device())),
               "channel_gram");
  return gram;
}

void project_cuda(const at::Tensor& grads, const at::Tensor& layers, const at::Tensor& gaps,
                  const at::Tensor& top, const at::Tensor& coefficients, bool out_holds_sum,
                  at::Tensor out, const c10::optional<at::Tensor>& projected) {
  TORCH_CHECK(top.scalar_type() == at::kLong && top.dim() == 1, "top must be an int64 [C] tensor");
  kc::StepsProblem problem = steps_problem(grads, layers, gaps, top.numel());
  check_on(top, grads.device(), "top");
  check_step_out(out, grads, "out");
  const int64_t tasks = problem.tasks, channels = problem.total_channels;
  TORCH_CHECK(coefficients.dim() == 2 && coefficients.size(0) == tasks &&
                  coefficients.size(1) == channels &&
                  at::isFloatingType(coefficients.scalar_type()),
              "coefficients must be a floating [T, C] tensor");
  check_on(coefficients, grads.device(), "coefficients");
  const bool want_projected = projected.has_value() && projected->defined();
  if (want_projected) {
    TORCH_CHECK(projected->is_contiguous() && projected->sizes() == grads.sizes() &&
                    projected->scalar_type() == grads.scalar_type(),
                "projected must be contiguous with the shape and dtype of grads");
    check_on(*projected, grads.device(), "projected");
  }
  if (tasks == 0 || problem.numel == 0) return;
  const c10::DeviceGuard guard(grads.device());
  // Device copies (C and T * C values) where the outputs could overwrite what the kernel
  // keeps reading; the coefficients in the accumulation dtype.
  const auto acc = grads.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor coef = coefficients.to(acc).contiguous();
  at::Tensor tops = top.contiguous();
  const std::initializer_list<const at::Tensor*> outputs = {
      &out, want_projected ? &*projected : &out};
  for (const at::Tensor* written : outputs) {
    if (bytes_overlap(*written, coef)) coef = coef.clone();
    if (bytes_overlap(*written, tops)) tops = tops.clone();
  }
  at::Tensor scratch = workspace(kc::project_workspace_bytes(problem), grads);
  check_launch(kc::project_launch(problem, tops.data_ptr<int64_t>(), coef.data_ptr(),
                                  out_holds_sum, out.data_ptr(),
                                  want_projected ? projected->data_ptr() : nullptr,
                                  scratch.data_ptr(), current_stream(grads.device())),
               "project_");
}

TORCH_LIBRARY_IMPL(cs_kernels, CUDA, m) {
  m.impl("row_sqnorm", &row_sqnorm_cuda);
  m.impl("plan_row_sqnorm", &plan_row_sqnorm_cuda);
  m.impl("top_priority", &top_priority_cuda);
  m.impl("phase2_", &phase2_cuda);
  m.impl("channel_gram", &channel_gram_cuda);
  m.impl("project_", &project_cuda);
}

}  // namespace cs_kernels
