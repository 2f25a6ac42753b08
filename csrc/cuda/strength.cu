// Connection strength on the GPU (docs/algorithm.md steps 1-3): squared row norms of the shared
// weights (many matrices per launch) and the per-layer top-priority task.
#include "common.cuh"
#include "launch.h"

namespace cs_kernels {
namespace cuda {

namespace {

constexpr int64_t kRowNormTarget = 8192;  // elements per block of row_sqnorm

// The matrices of one row_sqnorm launch; travels as a kernel argument (< 4 KiB).
struct NormEntry {
  const void* data;
  int64_t rows, cols;
  int64_t out_offset;  // row 0's index in `out`
  int64_t item_begin;  // first block of this matrix
  int32_t lanes;       // threads per row (power of two)
  int32_t rows_per_item;
};

struct NormBatch {
  NormEntry entry[kMaxMatrices];
  int32_t count;
};

// Block b handles `rows_per_item` rows of one matrix; `lanes` threads per row, each summing
// its elements in order, then a fixed butterfly: deterministic.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) row_sqnorm_kernel(NormBatch batch,
                                                               typename Acc<scalar_t>::type* out) {
  using acc_t = typename Acc<scalar_t>::type;
  __shared__ acc_t red[kWarps];
  const int64_t item = blockIdx.x;
  int m = 0;
  while (m + 1 < batch.count && batch.entry[m + 1].item_begin <= item) ++m;
  const NormEntry e = batch.entry[m];
  const int lanes = e.lanes;
  const int sub = static_cast<int>(threadIdx.x) & (lanes - 1);
  const int64_t r0 = (item - e.item_begin) * e.rows_per_item;
  const int64_t r_end = min64(r0 + e.rows_per_item, e.rows);
  const scalar_t* w = static_cast<const scalar_t*>(e.data);
  for (int64_t r = r0; r < r_end; r += kThreads / lanes) {
    const int64_t row = r + threadIdx.x / lanes;
    acc_t v[1] = {acc_t(0)};
    if (row < r_end) {
      const scalar_t* x = w + row * e.cols;
      for (int64_t d = sub; d < e.cols; d += lanes) {
        const acc_t a = load_acc<scalar_t, acc_t>(x + d);
        v[0] += a * a;
      }
    }
    group_sum<1>(v, lanes, red);
    if (row < r_end && sub == 0) st(out + e.out_offset + row, v[0]);
  }
}

template <typename scalar_t>
const char* row_sqnorm_typed(const Matrix* matrices, int64_t count, void* out, void* stream) {
  using acc_t = typename Acc<scalar_t>::type;
  acc_t* result = static_cast<acc_t*>(out);
  int64_t out_offset = 0;
  for (int64_t first = 0; first < count; first += kMaxMatrices) {
    NormBatch batch{};
    int64_t items = 0;
    for (int64_t k = first; k < count && k < first + kMaxMatrices; ++k) {
      const Matrix& mat = matrices[k];
      NormEntry& e = batch.entry[batch.count];
      const int64_t cols = max64(mat.cols, 1);
      e.data = mat.data;
      e.rows = mat.rows;
      e.cols = mat.cols;
      e.out_offset = out_offset;
      e.item_begin = items;
      e.lanes = static_cast<int32_t>(min64(next_pow2(ceil_div(cols, 8)), kThreads));
      const int64_t per_iteration = (kThreads / e.lanes) * cols;
      const int64_t iterations =
          per_iteration >= kRowNormTarget ? 1 : ceil_div(kRowNormTarget, per_iteration);
      e.rows_per_item = static_cast<int32_t>((kThreads / e.lanes) * iterations);
      out_offset += mat.rows;
      if (mat.rows > 0) {
        items += ceil_div(mat.rows, e.rows_per_item);
        ++batch.count;
      }
    }
    if (items == 0) continue;
    if (items > 0x7fffffff) return "row_sqnorm: too many rows for one launch";
    CSK_LAUNCH(row_sqnorm_kernel<scalar_t>, static_cast<unsigned>(items), kThreads, stream,
               batch, result);
    if (const char* error = launch_error()) return error;
  }
  return nullptr;
}

// Block l: layer l's per-task totals (fp64, fixed-order block sums), then the argmax over
// tasks of strength / total for each of its channels; strict '>' keeps ties on the lowest
// task, a task with a zero total counts as 0 (docs/algorithm.md step 3).
template <typename strength_t>
__global__ void __launch_bounds__(kThreads) top_priority_kernel(
    const strength_t* strength, int64_t tasks, int64_t total_channels, const int64_t* layers,
    int64_t* top, double* totals) {
  __shared__ double red[kWarps];
  const int64_t l = blockIdx.x;
  const int64_t channels = ld(layers + 4 * l + 1), first = ld(layers + 4 * l + 3);
  if (!(channels >= 1 && first >= 0 && first <= total_channels &&
        channels <= total_channels - first)) {
    return;  // a row that does not fit: its channels are left as they are
  }
  double* layer_totals = totals + l * tasks;
  for (int64_t t = 0; t < tasks; ++t) {
    const strength_t* row = strength + t * total_channels + first;
    double sum = 0.0;
    for (int64_t c = threadIdx.x; c < channels; c += kThreads) sum += static_cast<double>(ld(row + c));
    sum = block_sum(sum, red);
    if (threadIdx.x == 0) st(layer_totals + t, sum);
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < channels; c += kThreads) {
    int64_t best = 0;
    double best_value = 0.0;
    for (int64_t t = 0; t < tasks; ++t) {
      const double raw = static_cast<double>(ld(strength + t * total_channels + first + c));
      const double total = ld(layer_totals + t);
      const double value = total > 0.0 ? raw / total : 0.0;
      if (t == 0 || value > best_value) {
        best = t;
        best_value = value;
      }
    }
    st(top + first + c, best);
  }
}

}  // namespace

const char* row_sqnorm_launch(ScalarType dtype, const Matrix* matrices, int64_t count, void* out,
                              void* stream) {
  switch (dtype) {
    case ScalarType::kFloat32:
      return row_sqnorm_typed<float>(matrices, count, out, stream);
    case ScalarType::kFloat64:
      return row_sqnorm_typed<double>(matrices, count, out, stream);
    case ScalarType::kBFloat16:
      return row_sqnorm_typed<__nv_bfloat16>(matrices, count, out, stream);
    case ScalarType::kFloat16:
      return row_sqnorm_typed<__half>(matrices, count, out, stream);
  }
  return "unsupported dtype";
}

std::size_t top_priority_workspace_bytes(int64_t tasks, int64_t num_layers) {
  return sizeof(double) * static_cast<std::size_t>(max64(tasks * num_layers, 1));
}

const char* top_priority_launch(bool fp64, const void* strength, int64_t tasks,
                                int64_t total_channels, const int64_t* layers, int64_t num_layers,
                                int64_t* top, void* workspace, void* stream) {
  if (num_layers == 0 || tasks == 0) return nullptr;
  if (num_layers > 0x7fffffff) return "top_priority: too many layers for one launch";
  double* totals = static_cast<double*>(workspace);
  const unsigned grid = static_cast<unsigned>(num_layers);
  if (fp64) {
    CSK_LAUNCH(top_priority_kernel<double>, grid, kThreads, stream,
               static_cast<const double*>(strength), tasks, total_channels, layers, top, totals);
  } else {
    CSK_LAUNCH(top_priority_kernel<float>, grid, kThreads, stream,
               static_cast<const float*>(strength), tasks, total_channels, layers, top, totals);
  }
  return launch_error();
}

}  // namespace cuda
}  // namespace cs_kernels
