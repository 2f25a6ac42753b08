// Phase 2 in steps on the CPU (cs_kernels/phase2_steps.py): the per-channel Gram matrices and
// the projection, each in ONE parallel region per call.
//
// channel_gram: grads [T, N] -> gram [C, T, T], gram[c, i, j] = <G_i[c], G_j[c]>; the diagonal
//   (the rows' squared norms) comes from the same pass over the rows. With `sum_out` it also
//   writes the plain sum sum_t G_t of every element (rows and gaps) in that pass, so that the
//   projection afterwards only has to touch the rows it changes.
// project_: out = sum_t G_t - (sum_j coef[j, c]) * G_top(c)[c] on every channel row, the plain
//   sum elsewhere; with `out_holds_sum`, `out` already holds the plain sum (from channel_gram)
//   and only rows with a non-zero shrink are rewritten.
//
// The host cuts the plan into work items of about kItemWork gradient elements (whole rows
// batched together, long rows cut into pieces, gaps cut likewise); the cut depends on the plan
// and T only. Threads claim items from one atomic counter (`for_each_block`): no barrier per
// layer. Every sum has a fixed order (lanes, then the tail; a long row's pieces in order, summed
// after the parallel region), so the bits do not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace cs_kernels {
// Its own namespace: the item sizes, schedules and passes here are the steps' own, beside
// the Phase 2 kernel's of the same names (csrc/phase2_cpu.cpp).
namespace steps {

namespace {

constexpr int64_t kItemWork = 65536;  // gradient elements (over all T tasks) per item
constexpr int64_t kMinItemRow = 1024;
constexpr int64_t kMaxItemRow = 65536;

// Per-task elements per item: a multiple of kLanes, so a long row's pieces have their only
// lane tail at the row's end.
int64_t item_row_elements(int64_t tasks) {
  const int64_t e = std::clamp<int64_t>(kItemWork / std::max<int64_t>(tasks, 1), kMinItemRow,
                                        kMaxItemRow);
  return e / kLanes * kLanes;
}

enum class Kind : int32_t {
  kRows,   // `count` whole rows of `row_length` from `offset`, channels from `channel`
  kPiece,  // elements [offset, offset + count) of the row of `channel` (a long row), part `part`
  kGap,    // `count` plainly summed elements from `offset`
};

struct Item {
  int64_t offset;
  int64_t count;
  int64_t row_length;
  int64_t channel;
  int64_t part;  // kPiece: index of its partial sums
  Kind kind;
};

struct Pieces {
  int64_t channel;
  int64_t first_part;  // its pieces' partials are parts [first_part, first_part + parts)
  int64_t parts;
};

struct Schedule {
  std::vector<Item> items;
  std::vector<Pieces> long_rows;  // rows cut into pieces (their partials summed afterwards)
  int64_t parts = 0;
};

// The items of a plan, by offset. `with_gaps`: the gaps are items too.
Schedule make_schedule(int64_t tasks, const int64_t* layers, int64_t num_layers,
                       const int64_t* gaps, int64_t num_gaps, bool with_gaps) {
  const int64_t row = item_row_elements(tasks);
  std::vector<std::pair<int64_t, int64_t>> order;  // (offset, index): index >= L is a gap
  order.reserve(num_layers + num_gaps);
  for (int64_t l = 0; l < num_layers; ++l) order.emplace_back(layers[4 * l], l);
  if (with_gaps) {
    for (int64_t k = 0; k < num_gaps; ++k) order.emplace_back(gaps[2 * k], num_layers + k);
  }
  std::sort(order.begin(), order.end());
  Schedule s;
  for (const auto& [offset, index] : order) {
    if (index >= num_layers) {
      const int64_t length = gaps[2 * (index - num_layers) + 1];
      for (int64_t at = 0; at < length; at += row) {
        s.items.push_back({offset + at, std::min(row, length - at), 0, 0, 0, Kind::kGap});
      }
      continue;
    }
    const int64_t* l = layers + 4 * index;
    const int64_t channels = l[1], row_length = l[2], first = l[3];
    if (row_length > row) {
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t start = offset + c * row_length;
        Pieces p{first + c, s.parts, 0};
        for (int64_t at = 0; at < row_length; at += row) {
          s.items.push_back({start + at, std::min(row, row_length - at), row_length, first + c,
                             s.parts++, Kind::kPiece});
          ++p.parts;
        }
        s.long_rows.push_back(p);
      }
      continue;
    }
    const int64_t rows = std::max<int64_t>(1, row / row_length);
    for (int64_t c = 0; c < channels; c += rows) {
      s.items.push_back({offset + c * row_length, std::min(rows, channels - c), row_length,
                         first + c, 0, Kind::kRows});
    }
  }
  return s;
}

// Loads a tile of kLanes elements of every task's row at `e` (as acc_t) into `tile[j][k]`.
template <typename scalar_t, typename acc_t>
inline void load_tile(const scalar_t* base, int64_t numel, int64_t tasks, acc_t* tile) {
  for (int64_t j = 0; j < tasks; ++j) {
    const scalar_t* gj = base + j * numel;
    for (int k = 0; k < kLanes; ++k) tile[j * kLanes + k] = static_cast<acc_t>(gj[k]);
  }
}

// The Gram pass. kT > 0: T is a compile-time constant (small T: accumulators in registers).
template <typename scalar_t, int kT>
class GramPass {
 public:
  using acc_t = typename Acc<scalar_t>::type;

  GramPass(const scalar_t* grads, int64_t tasks, int64_t numel, acc_t* gram, acc_t* partials,
           scalar_t* sum_out)
      : g_(grads), tasks_(kT > 0 ? kT : tasks), numel_(numel), gram_(gram), partials_(partials),
        sum_(sum_out) {}

  int64_t tasks() const { return kT > 0 ? kT : tasks_; }
  int64_t pairs() const { return tasks() * (tasks() + 1) / 2; }

  // Scratch per thread: lanes [pairs * kLanes], tile [T * kLanes], dots [pairs].
  int64_t scratch_size() const { return pairs() * kLanes + tasks() * kLanes + pairs(); }

  void run(const Item& item, acc_t* scratch) const {
    if (item.kind == Kind::kGap) {
      plain_sum(item.offset, item.count);
      return;
    }
    acc_t* dots = scratch + pairs() * kLanes + tasks() * kLanes;
    if (item.kind == Kind::kPiece) {
      dots_and_sum(item.offset, item.count, scratch, partials_ + item.part * pairs());
      return;
    }
    for (int64_t r = 0; r < item.count; ++r) {
      dots_and_sum(item.offset + r * item.row_length, item.row_length, scratch, dots);
      store(item.channel + r, dots);
    }
  }

  // The Gram matrix of channel c from its upper-triangle dots (pairs i <= j, row by row).
  void store(int64_t c, const acc_t* dots) const {
    const int64_t T = tasks();
    acc_t* m = gram_ + c * T * T;
    int64_t p = 0;
    for (int64_t i = 0; i < T; ++i) {
      for (int64_t j = i; j < T; ++j, ++p) {
        m[i * T + j] = dots[p];
        m[j * T + i] = dots[p];
      }
    }
  }

 private:
  // dots[p] = <G_i, G_j> over [off, off + len) for pairs p = (i <= j); the plain sum into
  // sum_out alongside when it is given.
  void dots_and_sum(int64_t off, int64_t len, acc_t* scratch, acc_t* dots) const {
    if constexpr (kT > 0) {
      // Local arrays of constant size: the compiler keeps them in registers.
      constexpr int kP = kT * (kT + 1) / 2;
      acc_t lanes[kP * kLanes];
      acc_t tile[kT * kLanes];
      dots_with(off, len, lanes, tile, dots);
    } else {
      dots_with(off, len, scratch, scratch + pairs() * kLanes, dots);
    }
  }

  void dots_with(int64_t off, int64_t len, acc_t* __restrict lanes, acc_t* __restrict tile,
                 acc_t* __restrict dots) const {
    const int64_t T = tasks();
    const int64_t P = pairs();
    std::fill(lanes, lanes + P * kLanes, acc_t(0));
    std::fill(dots, dots + P, acc_t(0));
    const scalar_t* base = g_ + off;
    scalar_t* o = sum_ == nullptr ? nullptr : sum_ + off;
    int64_t e = 0;
    for (; e + kLanes <= len; e += kLanes) {
      load_tile(base + e, numel_, T, tile);
      int64_t p = 0;
      for (int64_t i = 0; i < T; ++i) {
        for (int64_t j = i; j < T; ++j, ++p) {
          for (int k = 0; k < kLanes; ++k) {
            lanes[p * kLanes + k] += tile[i * kLanes + k] * tile[j * kLanes + k];
          }
        }
      }
      if (o != nullptr) {
        acc_t s[kLanes] = {};
        for (int64_t j = 0; j < T; ++j) {
          for (int k = 0; k < kLanes; ++k) s[k] += tile[j * kLanes + k];
        }
        for (int k = 0; k < kLanes; ++k) o[e + k] = static_cast<scalar_t>(s[k]);
      }
    }
    for (; e < len; ++e) {  // the tail goes into dots first, the lanes are added after
      acc_t s = 0;
      int64_t p = 0;
      for (int64_t i = 0; i < T; ++i) {
        const acc_t vi = static_cast<acc_t>(base[i * numel_ + e]);
        s += vi;
        for (int64_t j = i; j < T; ++j, ++p) dots[p] += vi * static_cast<acc_t>(base[j * numel_ + e]);
      }
      if (o != nullptr) o[e] = static_cast<scalar_t>(s);
    }
    for (int64_t p = 0; p < P; ++p) dots[p] = reduce_lanes(lanes + p * kLanes) + dots[p];
  }

  void plain_sum(int64_t off, int64_t len) const {
    const int64_t T = tasks();
    const scalar_t* base = g_ + off;
    scalar_t* o = sum_ + off;
    for (int64_t e = 0; e < len; ++e) {
      acc_t s = 0;
      for (int64_t j = 0; j < T; ++j) s += static_cast<acc_t>(base[j * numel_ + e]);
      o[e] = static_cast<scalar_t>(s);
    }
  }

  const scalar_t* g_;
  int64_t tasks_;
  int64_t numel_;
  acc_t* gram_;
  acc_t* partials_;
  scalar_t* sum_;
};

// The projection pass.
template <typename scalar_t, int kT>
class ProjectPass {
 public:
  using acc_t = typename Acc<scalar_t>::type;
  // bf16/fp16 outputs are rounded once: a row's result is recomputed from the gradients.
  static constexpr bool kExactOut = std::is_same<scalar_t, acc_t>::value;

  ProjectPass(const scalar_t* grads, int64_t tasks, int64_t numel, const int64_t* top,
              const acc_t* coef, int64_t channels, bool out_holds_sum, scalar_t* out,
              scalar_t* projected)
      : g_(grads), tasks_(kT > 0 ? kT : tasks), numel_(numel), top_(top), coef_(coef),
        channels_(channels), holds_sum_(out_holds_sum), out_(out), proj_(projected) {}

  int64_t tasks() const { return kT > 0 ? kT : tasks_; }

  void run(const Item& item) const {
    if (item.kind == Kind::kGap) {
      gap(item.offset, item.count);
    } else if (item.kind == Kind::kPiece) {
      row(item.offset, item.count, item.channel);
    } else {
      for (int64_t r = 0; r < item.count; ++r) {
        row(item.offset + r * item.row_length, item.row_length, item.channel + r);
      }
    }
  }

 private:
  void gap(int64_t off, int64_t len) const {
    const int64_t T = tasks();
    const scalar_t* base = g_ + off;
    if (proj_ != nullptr) {
      for (int64_t j = 0; j < T; ++j) {
        std::copy(base + j * numel_, base + j * numel_ + len, proj_ + j * numel_ + off);
      }
    }
    if (holds_sum_) return;
    scalar_t* o = out_ + off;
    for (int64_t e = 0; e < len; ++e) {
      acc_t s = 0;
      for (int64_t j = 0; j < T; ++j) s += static_cast<acc_t>(base[j * numel_ + e]);
      o[e] = static_cast<scalar_t>(s);
    }
  }

  // One row (or piece of a long row) of channel c.
  void row(int64_t off, int64_t len, int64_t c) const {
    const int64_t T = tasks();
    const scalar_t* base = g_ + off;
    const scalar_t* gt = base + top_[c] * numel_;
    acc_t shrink = 0;
    for (int64_t j = 0; j < T; ++j) shrink += coef_[j * channels_ + c];
    if (proj_ != nullptr) {
      for (int64_t j = 0; j < T; ++j) {
        const scalar_t* gj = base + j * numel_;
        scalar_t* pj = proj_ + j * numel_ + off;
        const acc_t cj = coef_[j * channels_ + c];
        if (cj == acc_t(0)) {
          std::copy(gj, gj + len, pj);
          continue;
        }
        for (int64_t e = 0; e < len; ++e) {
          pj[e] = static_cast<scalar_t>(static_cast<acc_t>(gj[e]) - cj * static_cast<acc_t>(gt[e]));
        }
      }
    }
    scalar_t* o = out_ + off;
    if (holds_sum_) {
      if (shrink == acc_t(0)) return;  // the plain sum is the answer
      if constexpr (kExactOut) {
        for (int64_t e = 0; e < len; ++e) o[e] = o[e] - shrink * gt[e];
        return;
      }
    }
    for (int64_t e = 0; e < len; ++e) {
      acc_t s = 0;
      for (int64_t j = 0; j < T; ++j) s += static_cast<acc_t>(base[j * numel_ + e]);
      o[e] = static_cast<scalar_t>(s - shrink * static_cast<acc_t>(gt[e]));
    }
  }

  const scalar_t* g_;
  int64_t tasks_;
  int64_t numel_;
  const int64_t* top_;
  const acc_t* coef_;
  int64_t channels_;
  bool holds_sum_;
  scalar_t* out_;
  scalar_t* proj_;
};

// Calls `fn(std::integral_constant<int, kT>)` with the compile-time task count for T (0: any).
template <typename F>
void with_tasks(int64_t tasks, const F& fn) {
  switch (tasks) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

void check_tables(const at::Tensor& grads, const at::Tensor& layers, const at::Tensor& gaps,
                  int64_t channels) {
  TORCH_CHECK(grads.device().is_cpu(), "grads must be a CPU tensor");
  TORCH_CHECK(grads.dim() == 2 && grads.is_contiguous(), "grads must be contiguous [T, N]");
  TORCH_CHECK(layers.device().is_cpu() && gaps.device().is_cpu(), "the plan tables must be on the CPU");
  TORCH_CHECK(layers.scalar_type() == at::kLong && layers.dim() == 2 && layers.size(1) == 4 &&
                  layers.is_contiguous(),
              "layers must be contiguous int64 [L, 4]");
  TORCH_CHECK(gaps.scalar_type() == at::kLong && gaps.dim() == 2 && gaps.size(1) == 2 &&
                  gaps.is_contiguous(),
              "gaps must be contiguous int64 [G, 2]");
  const int64_t numel = grads.size(1);
  const int64_t* lt = layers.data_ptr<int64_t>();
  for (int64_t l = 0; l < layers.size(0); ++l) {
    const int64_t* row = lt + 4 * l;
    TORCH_CHECK(row[0] >= 0 && row[1] >= 1 && row[2] >= 1 && row[0] + row[1] * row[2] <= numel &&
                    row[3] >= 0 && row[3] + row[1] <= channels,
                "layers row ", l, " does not fit grads [T, N] and ", channels, " channels");
  }
  const int64_t* gt = gaps.data_ptr<int64_t>();
  for (int64_t k = 0; k < gaps.size(0); ++k) {
    TORCH_CHECK(gt[2 * k] >= 0 && gt[2 * k + 1] >= 0 && gt[2 * k] + gt[2 * k + 1] <= numel,
                "gaps row ", k, " does not fit grads [T, N]");
  }
}

void check_out(const at::Tensor& t, const at::Tensor& grads, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 1 && t.numel() == grads.size(1) &&
                  t.scalar_type() == grads.scalar_type(),
              name, " must be a contiguous CPU [N] tensor of the dtype of grads");
}

}  // namespace

at::Tensor channel_gram_cpu(const at::Tensor& grads, const at::Tensor& layers,
                            const at::Tensor& gaps, int64_t channels,
                            const c10::optional<at::Tensor>& sum_out) {
  check_tables(grads, layers, gaps, channels);
  const bool with_sum = sum_out.has_value() && sum_out->defined();
  if (with_sum) check_out(*sum_out, grads, "sum_out");
  const int64_t tasks = grads.size(0), numel = grads.size(1);
  const auto acc = grads.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Zeros: a channel no layer covers (only with a `channels` beyond the tables) stays 0, as
  // in the CUDA kernel.
  at::Tensor gram = at::zeros({channels, tasks, tasks}, grads.options().dtype(acc));
  if (tasks == 0 || numel == 0) return gram;
  const Schedule s = make_schedule(tasks, layers.data_ptr<int64_t>(), layers.size(0),
                                   gaps.data_ptr<int64_t>(), gaps.size(0), with_sum);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads.scalar_type(), "channel_gram", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    with_tasks(tasks, [&](auto fixed) {
      constexpr int kT = decltype(fixed)::value;
      std::vector<acc_t> partials(static_cast<size_t>(s.parts * tasks * (tasks + 1) / 2));
      const GramPass<scalar_t, kT> pass(grads.data_ptr<scalar_t>(), tasks, numel,
                                        gram.data_ptr<acc_t>(), partials.data(),
                                        with_sum ? sum_out->data_ptr<scalar_t>() : nullptr);
      const auto n = static_cast<int64_t>(s.items.size());
      std::atomic<int64_t> next{0};
      run_workers(n, [&] {
        std::vector<acc_t> scratch(static_cast<size_t>(pass.scratch_size()));
        for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
             i = next.fetch_add(1, std::memory_order_relaxed)) {
          pass.run(s.items[i], scratch.data());
        }
      });
      // Long rows: their pieces' dots in piece order (a fixed order, after the region).
      const int64_t pairs = pass.pairs();
      std::vector<acc_t> dots(static_cast<size_t>(pairs));
      for (const Pieces& p : s.long_rows) {
        std::fill(dots.begin(), dots.end(), acc_t(0));
        for (int64_t k = 0; k < p.parts; ++k) {
          const acc_t* part = partials.data() + (p.first_part + k) * pairs;
          for (int64_t q = 0; q < pairs; ++q) dots[q] += part[q];
        }
        pass.store(p.channel, dots.data());
      }
    });
  });
  return gram;
}

void project_cpu(const at::Tensor& grads, const at::Tensor& layers, const at::Tensor& gaps,
                 const at::Tensor& top, const at::Tensor& coefficients, bool out_holds_sum,
                 at::Tensor out, const c10::optional<at::Tensor>& projected) {
  TORCH_CHECK(top.device().is_cpu() && top.scalar_type() == at::kLong && top.dim() == 1,
              "top must be a CPU int64 [C] tensor");
  const int64_t channels = top.numel();
  check_tables(grads, layers, gaps, channels);
  check_out(out, grads, "out");
  const int64_t tasks = grads.size(0), numel = grads.size(1);
  TORCH_CHECK(coefficients.device().is_cpu() && coefficients.dim() == 2 &&
                  coefficients.size(0) == tasks && coefficients.size(1) == channels &&
                  at::isFloatingType(coefficients.scalar_type()),
              "coefficients must be a floating CPU [T, C] tensor");
  const bool want_projected = projected.has_value() && projected->defined();
  if (want_projected) {
    TORCH_CHECK(projected->is_contiguous() && projected->sizes() == grads.sizes() &&
                    projected->scalar_type() == grads.scalar_type(),
                "projected must be contiguous with the shape and dtype of grads");
  }
  // Private copies (C values each): `out` may not alias what the kernel keeps reading.
  const std::vector<int64_t> top_copy(top.contiguous().data_ptr<int64_t>(),
                                      top.contiguous().data_ptr<int64_t>() + channels);
  TORCH_CHECK(std::all_of(top_copy.begin(), top_copy.end(),
                          [tasks](int64_t t) { return t >= 0 && t < tasks; }),
              "top holds a task index outside [0, T)");
  if (tasks == 0 || numel == 0) return;
  const auto acc = grads.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor coef = coefficients.to(acc).contiguous().clone();
  // Gaps are work only when out must be written there, or the projected rows.
  const Schedule s = make_schedule(tasks, layers.data_ptr<int64_t>(), layers.size(0),
                                   gaps.data_ptr<int64_t>(), gaps.size(0),
                                   !out_holds_sum || want_projected);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads.scalar_type(), "project", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    with_tasks(tasks, [&](auto fixed) {
      constexpr int kT = decltype(fixed)::value;
      const ProjectPass<scalar_t, kT> pass(
          grads.data_ptr<scalar_t>(), tasks, numel, top_copy.data(), coef.data_ptr<acc_t>(),
          channels, out_holds_sum, out.data_ptr<scalar_t>(),
          want_projected ? projected->data_ptr<scalar_t>() : nullptr);
      for_each_block(static_cast<int64_t>(s.items.size()),
                     [&](int64_t i) { pass.run(s.items[i]); });
    });
  });
}

namespace {

// One layer's coefficients (see projection_coefficients_cpu). `a` accumulates the group sums
// in channel order: a fixed order, whatever the thread count.
template <typename acc_t>
void layer_coefficients(const acc_t* gram, const int64_t* top, int64_t tasks, int64_t channels,
                        int64_t first, int64_t count, bool group_mode, bool project_uniform,
                        acc_t* coef) {
  const auto tt = static_cast<size_t>(tasks);
  std::vector<acc_t> sums(group_mode ? tt * tt : 0, acc_t(0));  // [top i, task j]
  std::vector<int64_t> members(tt, 0);
  for (int64_t c = first; c < first + count; ++c) {
    const int64_t i = top[c];
    if (i < 0 || i >= tasks) continue;  // out of range: left unprojected (checked by the API)
    ++members[i];
    if (group_mode) {
      const acc_t* row = gram + (c * tasks + i) * tasks;
      for (int64_t j = 0; j < tasks; ++j) sums[i * tasks + j] += row[j];
    }
  }
  const bool uniform = *std::max_element(members.begin(), members.end()) == count;
  if (uniform && !project_uniform) return;  // a uniform-priority layer is plainly summed
  for (int64_t c = first; c < first + count; ++c) {
    const int64_t i = top[c];
    if (i < 0 || i >= tasks) continue;
    const acc_t* a = group_mode ? sums.data() + i * tasks : gram + (c * tasks + i) * tasks;
    const acc_t norm_sq = a[i];
    if (!(norm_sq > 0)) continue;
    for (int64_t j = 0; j < tasks; ++j) {
      if (j != i && a[j] < 0) coef[j * channels + c] = a[j] / norm_sq;
    }
  }
}

}  // namespace

// gram [C, T, T] (fp32/fp64), layers int64 [L, 4], top int64 [C] -> [T, C] coefficients:
// coef[j, c] = a_j / a_i for the channel's top task i, j != i, where a_j < 0 and a_i > 0;
// a = the row <G_i[c], G_j[c]> of the channel's Gram matrix (channel mode) or its sum over the
// channels of the layer with the same top task (group mode). Zero elsewhere, and on every
// channel of a layer whose channels share one top task unless project_uniform.
at::Tensor projection_coefficients_cpu(const at::Tensor& gram, const at::Tensor& layers,
                                       const at::Tensor& top, bool group_mode,
                                       bool project_uniform) {
  TORCH_CHECK(gram.device().is_cpu() && gram.dim() == 3 && gram.size(1) == gram.size(2) &&
                  (gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble),
              "gram must be a float32 or float64 CPU [C, T, T] tensor");
  const int64_t channels = gram.size(0), tasks = gram.size(1);
  TORCH_CHECK(top.device().is_cpu() && top.scalar_type() == at::kLong && top.dim() == 1 &&
                  top.numel() == channels,
              "top must be a CPU int64 [C] tensor, C = gram.size(0)");
  TORCH_CHECK(layers.device().is_cpu() && layers.dim() == 2 && layers.size(1) == 4 &&
                  layers.scalar_type() == at::kLong,
              "layers must be a CPU int64 [L, 4] tensor");
  const at::Tensor table = layers.contiguous();
  const int64_t* rows = table.data_ptr<int64_t>();
  const int64_t num_layers = table.size(0);
  for (int64_t l = 0; l < num_layers; ++l) {
    TORCH_CHECK(rows[4 * l + 1] >= 1 && rows[4 * l + 3] >= 0 &&
                    rows[4 * l + 3] + rows[4 * l + 1] <= channels,
                "layers row ", l, " does not fit gram [C, T, T]");
  }
  at::Tensor coef = at::zeros({tasks, channels}, gram.options());
  if (tasks == 0 || channels == 0) return coef;
  const at::Tensor g = gram.contiguous();
  const at::Tensor t = top.contiguous();
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "projection_coefficients", [&] {
    // Layers are independent: each writes only its own channels' columns.
    at::parallel_for(0, num_layers, 16, [&](int64_t begin, int64_t end) {
      for (int64_t l = begin; l < end; ++l) {
        layer_coefficients<scalar_t>(g.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), tasks,
                                     channels, rows[4 * l + 3], rows[4 * l + 1], group_mode,
                                     project_uniform, coef.data_ptr<scalar_t>());
      }
    });
  });
  return coef;
}

}  // namespace steps

TORCH_LIBRARY_IMPL(cs_kernels, CPU, m) {
  m.impl("channel_gram", &steps::channel_gram_cpu);
  m.impl("project_", &steps::project_cpu);
  m.impl("projection_coefficients", &steps::projection_coefficients_cpu);
}

}  // namespace cs_kernels
