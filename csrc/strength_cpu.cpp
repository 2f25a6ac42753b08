// Connection strength on the CPU: per-channel squared weight norms and per-layer top priority.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_common.h"

namespace cs_kernels {

namespace {

// Rows of elements per block of work: enough to outweigh claiming it.
constexpr int64_t kNormBlock = 32768;

// One weight [rows, cols] and where its squared row norms go.
template <typename scalar_t>
struct NormJob {
  const scalar_t* weight;
  int64_t rows, cols;
  typename Acc<scalar_t>::type* out;
};

// Squared row norms of every job's weight, in one parallel region over blocks of rows of all
// of them (claimed dynamically: no barrier per weight). Each row's sum has a fixed order.
template <typename scalar_t>
void row_sqnorm_kernel(const std::vector<NormJob<scalar_t>>& jobs) {
  using acc_t = typename Acc<scalar_t>::type;
  struct Block {
    int64_t job, begin, end;
  };
  std::vector<Block> blocks;
  for (size_t j = 0; j < jobs.size(); ++j) {
    const int64_t rows = jobs[j].rows;
    const int64_t step = std::max<int64_t>(1, kNormBlock / std::max<int64_t>(1, jobs[j].cols));
    for (int64_t r = 0; r < rows; r += step) {
      blocks.push_back({static_cast<int64_t>(j), r, std::min(rows, r + step)});
    }
  }
  for_each_block(static_cast<int64_t>(blocks.size()), [&](int64_t b) {
    const Block& block = blocks[b];
    const NormJob<scalar_t>& job = jobs[block.job];
    const int64_t cols = job.cols;
    for (int64_t r = block.begin; r < block.end; ++r) {
      const scalar_t* row = job.weight + r * cols;
      acc_t lanes[kLanes] = {};
      int64_t d = 0;
      for (; d + kLanes <= cols; d += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
          acc_t v = static_cast<acc_t>(row[d + k]);
          lanes[k] += v * v;
        }
      }
      acc_t tail = 0;
      for (; d < cols; ++d) {
        acc_t v = static_cast<acc_t>(row[d]);
        tail += v * v;
      }
      job.out[r] = reduce_lanes(lanes) + tail;
    }
  });
}

// Normalisation in fp64 whatever the input: near-ties (e.g. one task's strengths a multiple
// of another's) then resolve as in exact arithmetic, like the fp64 reference.
template <typename scalar_t>
void top_priority_kernel(const scalar_t* strength, int64_t tasks, int64_t total_channels,
                         const int64_t* layers, int64_t num_layers, int64_t* top) {
  for_each_block(num_layers, [&](int64_t l) {
    const int64_t channels = layers[l * 4 + 1];
    const int64_t first = layers[l * 4 + 3];
    std::vector<double> totals(tasks);
    for (int64_t t = 0; t < tasks; ++t) {
      const scalar_t* s = strength + t * total_channels + first;
      double total = 0;
      for (int64_t c = 0; c < channels; ++c) total += static_cast<double>(s[c]);
      totals[t] = total;
    }
    for (int64_t c = 0; c < channels; ++c) {
      int64_t best = 0;
      double best_value = 0;
      for (int64_t t = 0; t < tasks; ++t) {
        const double raw = static_cast<double>(strength[t * total_channels + first + c]);
        const double value = totals[t] > 0 ? raw / totals[t] : 0.0;
        if (t == 0 || value > best_value) {  // strict '>': ties stay on the smallest task
          best = t;
          best_value = value;
        }
      }
      top[first + c] = best;
    }
  });
}

}  // namespace

at::Tensor row_sqnorm_cpu(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be contiguous [C, D]");
  const auto acc_dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({weight.size(0)}, weight.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "row_sqnorm", [&] {
    row_sqnorm_kernel<scalar_t>({{weight.data_ptr<scalar_t>(), weight.size(0), weight.size(1),
                                 out.data_ptr<typename Acc<scalar_t>::type>()}});
  });
  return out;
}

at::Tensor plan_row_sqnorm_cpu(at::TensorList weights) {
  TORCH_CHECK(!weights.empty(), "weights must hold at least one tensor");
  const at::Tensor& head = weights[0];
  int64_t rows = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.scalar_type() == head.scalar_type() && w.device() == head.device(), "weights[",
                i, "] must have the dtype and device of weights[0]");
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weights[", i, "] must be contiguous [C, D]");
    rows += w.size(0);
  }
  const auto acc_dtype = head.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({rows}, head.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, head.scalar_type(), "plan_row_sqnorm", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    acc_t* dst = out.data_ptr<acc_t>();
    std::vector<NormJob<scalar_t>> jobs;
    for (const at::Tensor& w : weights) {
      jobs.push_back({w.data_ptr<scalar_t>(), w.size(0), w.size(1), dst});
      dst += w.size(0);
    }
    row_sqnorm_kernel<scalar_t>(jobs);
  });
  return out;
}

at::Tensor top_priority_cpu(const at::Tensor& strength, const at::Tensor& layers) {
  TORCH_CHECK(strength.dim() == 2 && strength.is_contiguous(), "strength must be contiguous [T, C]");
  TORCH_CHECK(strength.scalar_type() == at::kFloat || strength.scalar_type() == at::kDouble,
              "strength must be float32 or float64");
  TORCH_CHECK(layers.dim() == 2 && layers.size(1) == 4 && layers.scalar_type() == at::kLong,
              "layers must be int64 [L, 4]");
  const at::Tensor table = layers.contiguous();
  const int64_t* rows = table.data_ptr<int64_t>();
  for (int64_t l = 0; l < table.size(0); ++l) {
    TORCH_CHECK(rows[4 * l + 1] >= 1 && rows[4 * l + 3] >= 0 &&
                    rows[4 * l + 3] + rows[4 * l + 1] <= strength.size(1),
                "layers row ", l, " does not fit strength [T, C]");
  }
  at::Tensor top = at::zeros({strength.size(1)}, strength.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(strength.scalar_type(), "top_priority", [&] {
    top_priority_kernel<scalar_t>(strength.data_ptr<scalar_t>(), strength.size(0),
                                  strength.size(1), rows, table.size(0), top.data_ptr<int64_t>());
  });
  return top;
}

TORCH_LIBRARY_IMPL(cs_kernels, CPU, m) {
  m.impl("row_sqnorm", &row_sqnorm_cpu);
  m.impl("plan_row_sqnorm", &plan_row_sqnorm_cpu);
  m.impl("top_priority", &top_priority_cpu);
}

}  // namespace cs_kernels
