// The cs_kernels operator schemas. Device kernels register their implementations elsewhere
// (TORCH_LIBRARY_IMPL); fake (meta) implementations for torch.compile live in Python.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(cs_kernels, m) {
  // weight [C, D] -> [C] squared row norms (fp32 accumulation, fp64 for fp64).
  m.def("row_sqnorm(Tensor weight) -> Tensor");
  // weights: [C_i, D_i] (one dtype, one device) -> [sum_i C_i] squared row norms, layers
  // back to back (one launch on CUDA).
  m.def("plan_row_sqnorm(Tensor[] weights) -> Tensor");
  // strength [T, C] (fp32/fp64), layers int64 [L, 4] -> int64 [C] top task per channel.
  m.def("top_priority(Tensor strength, Tensor layers) -> Tensor");
  // grads [T, N], layers int64 [L, 4], gaps int64 [G, 2], top int64 [C];
  // writes out [N] and, when given, projected [T, N].
  m.def(
      "phase2_(Tensor grads, Tensor layers, Tensor gaps, Tensor top, bool group_mode, "
      "bool project_uniform, Tensor(a!) out, Tensor(b!)? projected) -> ()");
  // Phase 2 in steps (CPU only so far). grads [T, N], layers int64 [L, 4], gaps int64 [G, 2]
  // -> [channels, T, T] Gram matrices (fp32, fp64 for fp64); writes sum_t G_t into sum_out
  // [N] when given.
  m.def(
      "channel_gram(Tensor grads, Tensor layers, Tensor gaps, int channels, "
      "Tensor(a!)? sum_out) -> Tensor");
  // top int64 [C], coefficients [T, C]: writes out [N] (onto the plain sum already in it when
  // out_holds_sum) and, when given, projected [T, N].
  // gram [C, T, T] (fp32/fp64), layers int64 [L, 4], top int64 [C] -> [T, C] projection
  // coefficients (CPU only).
  m.def(
      "projection_coefficients(Tensor gram, Tensor layers, Tensor top, bool group_mode, "
      "bool project_uniform) -> Tensor");
  m.def(
      "project_(Tensor grads, Tensor layers, Tensor gaps, Tensor top, Tensor coefficients, "
      "bool out_holds_sum, Tensor(a!) out, Tensor(b!)? projected) -> ()");
}

// A plain Python module: importing it runs the registrations above.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
