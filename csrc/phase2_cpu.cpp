// Phase 2 of connection strength-based optimization on the CPU (ALGORITHM.md, "Phase 2").
//
// grads [T, N] -> out [N] (and optionally projected [T, N]). Connection layers are processed
// one at a time so that the second pass over a layer finds its rows still in cache:
//   pass 1 (parallel over channels): per row, dots[j] = <G_top[row], G_j[row]> and
//           out[row] = sum_j G_j[row], reading each gradient element once;
//   reduce (serial, fixed order):     group mode sums the dots of each (top task, task) pair;
//   pass 2 (parallel over channels): out[row] -= (sum_j coef_j) * G_top[row].
// In channel mode pass 2 follows pass 1 on the same row while it is in L1/L2.
// Gaps between layers are plainly summed. All reductions have a fixed order: the result does
// not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace cs_kernels {

namespace {

// kT > 0: the task count is a compile-time constant (T <= 8), so the per-task accumulators
// live in registers; kT == 0: any T, accumulators in a small per-thread scratch array.
template <typename scalar_t, int kT>
class Phase2Cpu {
 public:
  using acc_t = typename Acc<scalar_t>::type;
  // bf16/fp16 outputs are rounded; their pass 2 recomputes the sum from the gradients.
  static constexpr bool kExactOut = std::is_same<scalar_t, acc_t>::value;

  Phase2Cpu(const scalar_t* grads, int64_t tasks, int64_t numel, scalar_t* out, scalar_t* projected)
      : g_(grads), tasks_(kT > 0 ? kT : tasks), numel_(numel), out_(out), proj_(projected) {}

  int64_t tasks() const { return kT > 0 ? kT : tasks_; }

  // out[off:off+len] = sum_j G_j; projected rows are copies.
  void plain_sum(int64_t off, int64_t len) const {
    const int64_t T = tasks();
    const scalar_t* base = g_ + off;
    scalar_t* o = out_ + off;
    int64_t e = 0;
    for (; e + kLanes <= len; e += kLanes) {
      acc_t s[kLanes] = {};
      for (int64_t j = 0; j < T; ++j) {
        const scalar_t* gj = base + j * numel_ + e;
        for (int k = 0; k < kLanes; ++k) s[k] += static_cast<acc_t>(gj[k]);
      }
      for (int k = 0; k < kLanes; ++k) o[e + k] = static_cast<scalar_t>(s[k]);
    }
    for (; e < len; ++e) {
      acc_t s = 0;
      for (int64_t j = 0; j < T; ++j) s += static_cast<acc_t>(base[j * numel_ + e]);
      o[e] = static_cast<scalar_t>(s);
    }
    if (proj_ != nullptr) {
      for (int64_t j = 0; j < T; ++j) {
        std::copy(base + j * numel_, base + j * numel_ + len, proj_ + j * numel_ + off);
      }
    }
  }

  // Pass 1 on one row: dots[j] = <G_top, G_j> over the row, out[row] = sum_j G_j.
  // scratch: [T * kLanes] accumulators when kT == 0.
  void dots_and_sum(int64_t off, int64_t len, int64_t top, acc_t* dots, acc_t* scratch) const {
    const int64_t T = tasks();
    acc_t fixed[kT > 0 ? kT * kLanes : 1];
    acc_t* lanes = kT > 0 ? fixed : scratch;
    std::fill(lanes, lanes + T * kLanes, acc_t(0));
    std::fill(dots, dots + T, acc_t(0));
    const scalar_t* base = g_ + off;
    const scalar_t* ref = base + top * numel_;
    scalar_t* o = out_ + off;
    int64_t e = 0;
    for (; e + kLanes <= len; e += kLanes) {
      acc_t r[kLanes];
      acc_t s[kLanes] = {};
      for (int k = 0; k < kLanes; ++k) r[k] = static_cast<acc_t>(ref[e + k]);
      for (int64_t j = 0; j < T; ++j) {
        const scalar_t* gj = base + j * numel_ + e;
        acc_t* lj = lanes + j * kLanes;
        for (int k = 0; k < kLanes; ++k) {
          const acc_t v = static_cast<acc_t>(gj[k]);
          s[k] += v;
          lj[k] += r[k] * v;
        }
      }
      for (int k = 0; k < kLanes; ++k) o[e + k] = static_cast<scalar_t>(s[k]);
    }
    for (; e < len; ++e) {  // the row's tail goes into dots first, the lanes are added after
      const acc_t r = static_cast<acc_t>(ref[e]);
      acc_t s = 0;
      for (int64_t j = 0; j < T; ++j) {
        const acc_t v = static_cast<acc_t>(base[j * numel_ + e]);
        s += v;
        dots[j] += r * v;
      }
      o[e] = static_cast<scalar_t>(s);
    }
    for (int64_t j = 0; j < T; ++j) dots[j] = reduce_lanes(lanes + j * kLanes) + dots[j];
  }

  // Pass 2 on one row: G'_j = G_j - coef[j] * G_top; out = sum_j G'_j.
  void project_row(int64_t off, int64_t len, int64_t top, const acc_t* coef) const {
    const int64_t T = tasks();
    acc_t shrink = 0;
    for (int64_t j = 0; j < T; ++j) shrink += coef[j];
    const scalar_t* base = g_ + off;
    const scalar_t* gt = base + top * numel_;
    if (proj_ != nullptr) {
      for (int64_t j = 0; j < T; ++j) {
        const scalar_t* gj = base + j * numel_;
        scalar_t* pj = proj_ + j * numel_ + off;
        const acc_t cj = coef[j];
        if (cj == acc_t(0)) {
          std::copy(gj, gj + len, pj);
          continue;
        }
        for (int64_t e = 0; e < len; ++e) {
          pj[e] = static_cast<scalar_t>(static_cast<acc_t>(gj[e]) - cj * static_cast<acc_t>(gt[e]));
        }
      }
    }
    if (shrink == acc_t(0)) return;
    scalar_t* o = out_ + off;
    if constexpr (kExactOut) {
      for (int64_t e = 0; e < len; ++e) o[e] = o[e] - shrink * gt[e];
    } else {
      for (int64_t e = 0; e < len; ++e) {
        acc_t s = 0;
        for (int64_t j = 0; j < T; ++j) s += static_cast<acc_t>(base[j * numel_ + e]);
        o[e] = static_cast<scalar_t>(s - shrink * static_cast<acc_t>(gt[e]));
      }
    }
  }

  // Coefficients for one reference row/group: coef[j] = a_j / a_i when a_j < 0, j != i.
  void coefficients(const acc_t* a, int64_t top, acc_t* coef) const {
    const acc_t norm_sq = a[top];
    for (int64_t j = 0; j < tasks(); ++j) {
      coef[j] = (j != top && a[j] < 0 && norm_sq > 0) ? a[j] / norm_sq : acc_t(0);
    }
  }

  void layer(int64_t offset, int64_t channels, int64_t row_length, const int64_t* top,
             bool group_mode, bool project_uniform) const {
    const int64_t T = tasks();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_length * T));
    const bool uniform = std::all_of(top, top + channels, [&](int64_t t) { return t == top[0]; });
    if (uniform && !project_uniform) {
      at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
        plain_sum(offset + begin * row_length, (end - begin) * row_length);
      });
      return;
    }
    if (!group_mode) {
      at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> work(T * (kLanes + 2));
        acc_t* dots = work.data();
        acc_t* coef = dots + T;
        for (int64_t c = begin; c < end; ++c) {
          const int64_t off = offset + c * row_length;
          dots_and_sum(off, row_length, top[c], dots, coef + T);
          coefficients(dots, top[c], coef);
          project_row(off, row_length, top[c], coef);
        }
      });
      return;
    }
    std::vector<acc_t> dots(channels * T);
    at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(T * kLanes);
      for (int64_t c = begin; c < end; ++c) {
        dots_and_sum(offset + c * row_length, row_length, top[c], dots.data() + c * T,
                     scratch.data());
      }
    });
    // group_dots[i * T + j] = sum over channels with top i of <G_i, G_j>, in channel order.
    std::vector<acc_t> group_dots(T * T, acc_t(0));
    for (int64_t c = 0; c < channels; ++c) {
      acc_t* row = group_dots.data() + top[c] * T;
      for (int64_t j = 0; j < T; ++j) row[j] += dots[c * T + j];
    }
    std::vector<acc_t> group_coef(T * T);
    for (int64_t i = 0; i < T; ++i) {
      coefficients(group_dots.data() + i * T, i, group_coef.data() + i * T);
    }
    // Backwards: the rows pass 1 touched last are the likeliest to still be in cache.
    at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = end - 1; c >= begin; --c) {
        project_row(offset + c * row_length, row_length, top[c], group_coef.data() + top[c] * T);
      }
    });
  }

 private:
  const scalar_t* g_;
  int64_t tasks_;
  int64_t numel_;
  scalar_t* out_;
  scalar_t* proj_;
};

template <typename scalar_t, int kT>
void run_phase2(const at::Tensor& grads, const int64_t* layers, int64_t num_layers,
                const int64_t* gaps, int64_t num_gaps, const int64_t* top, bool group_mode,
                bool project_uniform, scalar_t* out, scalar_t* projected) {
  const Phase2Cpu<scalar_t, kT> kernel(grads.data_ptr<scalar_t>(), grads.size(0), grads.size(1),
                                       out, projected);
  for (int64_t k = 0; k < num_gaps; ++k) {
    const int64_t offset = gaps[2 * k], length = gaps[2 * k + 1];
    at::parallel_for(0, length, 16384, [&](int64_t begin, int64_t end) {
      kernel.plain_sum(offset + begin, end - begin);
    });
  }
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t* row = layers + 4 * l;
    kernel.layer(row[0], row[1], row[2], top + row[3], group_mode, project_uniform);
  }
}

}  // namespace

void phase2_cpu(const at::Tensor& grads, const at::Tensor& layers, const at::Tensor& gaps,
                const at::Tensor& top, bool group_mode, bool project_uniform, at::Tensor out,
                const c10::optional<at::Tensor>& projected) {
  TORCH_CHECK(grads.dim() == 2 && grads.is_contiguous(), "grads must be contiguous [T, N]");
  TORCH_CHECK(out.is_contiguous() && out.numel() == grads.size(1), "out must be contiguous [N]");
  TORCH_CHECK(out.scalar_type() == grads.scalar_type(), "out must have the dtype of grads");
  TORCH_CHECK(layers.scalar_type() == at::kLong && layers.dim() == 2 && layers.size(1) == 4,
              "layers must be int64 [L, 4]");
  TORCH_CHECK(gaps.scalar_type() == at::kLong && gaps.dim() == 2 && gaps.size(1) == 2,
              "gaps must be int64 [G, 2]");
  TORCH_CHECK(top.scalar_type() == at::kLong && top.is_contiguous(), "top must be contiguous int64");
  const bool want_projected = projected.has_value() && projected->defined();
  if (want_projected) {
    TORCH_CHECK(projected->is_contiguous() && projected->sizes() == grads.sizes() &&
                    projected->scalar_type() == grads.scalar_type(),
                "projected must be contiguous with the shape and dtype of grads");
  }
  const at::Tensor layer_table = layers.contiguous();
  const at::Tensor gap_table = gaps.contiguous();
  const int64_t* lt = layer_table.data_ptr<int64_t>();
  const int64_t* gt = gap_table.data_ptr<int64_t>();
  // A private copy (C integers): `out` may not alias what the kernel keeps reading.
  const std::vector<int64_t> top_copy(top.data_ptr<int64_t>(), top.data_ptr<int64_t>() + top.numel());
  const int64_t* top_ptr = top_copy.data();
  // Out-of-range tasks would index outside grads: always checked here (O(C), no device sync).
  const int64_t tasks = grads.size(0);
  TORCH_CHECK(std::all_of(top_ptr, top_ptr + top.numel(),
                          [tasks](int64_t t) { return t >= 0 && t < tasks; }),
              "top holds a task index outside [0, T)");
  for (int64_t l = 0; l < layer_table.size(0); ++l) {
    const int64_t* row = lt + 4 * l;
    TORCH_CHECK(row[0] >= 0 && row[1] >= 1 && row[2] >= 1 && row[0] + row[1] * row[2] <= grads.size(1) &&
                    row[3] >= 0 && row[3] + row[1] <= top.numel(),
                "layers row ", l, " does not fit grads [T, N] and top [C]");
  }
  for (int64_t k = 0; k < gap_table.size(0); ++k) {
    TORCH_CHECK(gt[2 * k] >= 0 && gt[2 * k + 1] >= 0 && gt[2 * k] + gt[2 * k + 1] <= grads.size(1),
                "gaps row ", k, " does not fit grads [T, N]");
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads.scalar_type(), "phase2", [&] {
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    scalar_t* proj_ptr = want_projected ? projected->data_ptr<scalar_t>() : nullptr;
    const auto run = [&](auto fixed_tasks) {
      run_phase2<scalar_t, decltype(fixed_tasks)::value>(
          grads, lt, layer_table.size(0), gt, gap_table.size(0), top_ptr, group_mode,
          project_uniform, out_ptr, proj_ptr);
    };
    switch (grads.size(0)) {
      case 1: run(std::integral_constant<int, 1>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      case 4: run(std::integral_constant<int, 4>{}); break;
      case 5: run(std::integral_constant<int, 5>{}); break;
      case 6: run(std::integral_constant<int, 6>{}); break;
      case 8: run(std::integral_constant<int, 8>{}); break;
      default: run(std::integral_constant<int, 0>{}); break;
    }
  });
}

TORCH_LIBRARY_IMPL(cs_kernels, CPU, m) { m.impl("phase2_", &phase2_cpu); }

}  // namespace cs_kernels
