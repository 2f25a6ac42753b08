// Phase 2 of connection strength-based optimization on the CPU (docs/algorithm.md, "Phase 2").
//
// grads [T, N] -> out [N] (and optionally projected [T, N]) in ONE parallel region per call.
//
// The host first cuts every layer and gap of the plan into work items of about kItemWork
// gradient elements (the cut depends on the plan, T and the tops only, never on the thread
// count). Threads then claim items from a shared atomic counter; nobody waits on anybody
// mid-call, so a thread descheduled by other processes delays the call by the item it holds,
// not by a barrier per layer and per pass (the design this replaces: one parallel region per
// layer and pass, each ending in a barrier).
//
// An item is either self-contained, a batch of pieces finished in place:
//   - plain sums (gaps, layers left unprojected): out = sum_j G_j;
//   - channel mode, whole rows: per row dots[j] = <G_top, G_j> and out = sum_j G_j (one read
//     of each element), then the coefficients and out -= shrink * G_top while the row is in L1;
//   - group mode, a whole layer that fits one item: both passes on the layer, in cache;
// or one piece of a *scope*, work whose projection needs dot products summed over several
// items (a group-mode layer larger than an item, or a channel-mode row longer than an item):
//   pass 1: the item's dots go into its own partial sums: [T, T] (top task, task) for a
//           layer, [T] for a row;
//   finish: the thread finishing the scope's last pass-1 item (an atomic counter decides) sums
//           the partials in item order and writes the scope's coefficients;
//   pass 2: the scope's items become claimable (reverse order: the rows pass 1 touched last are
//           the likeliest to still be in cache): out -= shrink * G_top (fp32/fp64) or
//           out = sum_j G_j - shrink * G_top (bf16/fp16: one rounding).
// A thread prefers claimable pass-2 work to a new item, so a scope is projected soon after its
// last pass-1 item, while its rows are still in cache.
//
// Every sum has a fixed order (lanes, rows in order, items in order), so the result is bitwise
// the same whatever the number of threads and however the items were shared out.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace cs_kernels {

namespace {

// Gradient elements (over all T tasks) per work item: ~256 KB of fp32, a few microseconds of
// work, far more than claiming the item costs, and the rows an item reads stay in L2 until
// its projection.
constexpr int64_t kItemWork = 65536;
constexpr int64_t kMinItemRow = 1024;   // per-task elements per item, at any T
constexpr int64_t kMaxItemRow = 65536;
// How long a thread that ran out of items keeps yielding for a scope another thread is
// finishing, to share its projection, before it leaves for the join.
constexpr auto kHelpWindow = std::chrono::microseconds(500);

// Per-task elements per item for T tasks: a multiple of kLanes, so long rows split into
// pieces whose only lane tail is at the row's end.
int64_t item_row_elements(int64_t tasks) {
  // At least 16 T elements per task: a group-mode item's [T, T] partial sums stay a 16th of
  // the gradients it reads, whatever T.
  const int64_t e = std::max(std::clamp<int64_t>(kItemWork / tasks, kMinItemRow, kMaxItemRow),
                             16 * tasks);
  return e / kLanes * kLanes;
}

enum class Kind : int32_t {
  kSum,          // `length` elements plainly summed
  kChannelRows,  // channel mode, `length` whole rows: both passes per row
  kGroupLayer,   // group mode, a whole layer of `length` rows: both passes on the layer
  kScopeRows,    // `length` whole rows of a scoped layer: pass 1 into the item's partial
  kScopePiece,   // `length` elements of one long row: pass 1 into the item's partial
};

struct Piece {
  int64_t offset;      // first element
  int64_t length;      // elements (kSum, kScopePiece) or rows (the row kinds)
  int64_t row_length;  // D (row kinds)
  int64_t channel;     // index in `top` of the first row (row kinds, kScopePiece)
  Kind kind;
};

struct Item {
  int64_t first_piece, end_piece;
  int64_t scope;  // -1: self-contained; else one piece, pass 1 of that scope
};

// A group-mode layer's sums are [T, T] (top task, task); a channel-mode long row's are [T].
struct Scope {
  int64_t first_item;  // pass-1 items [first_item, first_item + items), in order
  int64_t items;
  bool group;
  int64_t partials;  // item k's partial sums at partials + k * stride, in the shared buffer
  int64_t stride;    // sums per item (T * T or T), padded to a whole number of cache lines
  int64_t coefs;     // its coefficients (T * T or T) in the shared buffer
};

// The counters one scope's threads share; each scope on its own cache line.
struct alignas(64) ScopeState {
  std::atomic<int64_t> finished{0};  // pass-1 items done
  std::atomic<int64_t> claimed{0};   // pass-2 items handed out
  std::atomic<bool> ready{false};    // coefficients written
};

// The work items of one call, in offset order.
struct Schedule {
  std::vector<Piece> pieces;
  std::vector<Item> items;
  std::vector<Scope> scopes;
  int64_t partial_size = 0;  // accumulators all scopes' partial sums take
  int64_t coef_size = 0;     // and their coefficients
};

class ScheduleBuilder {
 public:
  explicit ScheduleBuilder(int64_t tasks) : tasks_(tasks), row_(item_row_elements(tasks)) {}

  void gap(int64_t offset, int64_t length) {
    for (int64_t at = 0; at < length; at += row_) {
      const int64_t n = std::min(row_, length - at);
      add_free({offset + at, n, 0, 0, Kind::kSum}, n);
    }
  }

  void channel_layer(int64_t offset, int64_t channels, int64_t row_length, int64_t first) {
    if (row_length > row_) {
      for (int64_t c = 0; c < channels; ++c) long_row(offset + c * row_length, row_length, first + c);
      return;
    }
    const int64_t rows = std::max<int64_t>(1, row_ / row_length);
    for (int64_t c = 0; c < channels; c += rows) {
      const int64_t n = std::min(rows, channels - c);
      add_free({offset + c * row_length, n, row_length, first + c, Kind::kChannelRows},
               n * row_length);
    }
  }

  void group_layer(int64_t offset, int64_t channels, int64_t row_length, int64_t first) {
    if (channels * row_length <= row_) {
      add_free({offset, channels, row_length, first, Kind::kGroupLayer}, channels * row_length);
      return;
    }
    open_scope(true);
    if (row_length > row_) {
      for (int64_t c = 0; c < channels; ++c) {
        split_row(offset + c * row_length, row_length, first + c);
      }
    } else {
      const int64_t rows = std::max<int64_t>(1, row_ / row_length);
      for (int64_t c = 0; c < channels; c += rows) {
        add_scoped({offset + c * row_length, std::min(rows, channels - c), row_length, first + c,
                    Kind::kScopeRows});
      }
    }
    close_scope();
  }

  Schedule take() { return std::move(s_); }

 private:
  // Channel mode: a row longer than an item is its own scope.
  void long_row(int64_t offset, int64_t row_length, int64_t channel) {
    open_scope(false);
    split_row(offset, row_length, channel);
    close_scope();
  }

  void split_row(int64_t offset, int64_t row_length, int64_t channel) {
    for (int64_t at = 0; at < row_length; at += row_) {
      add_scoped({offset + at, std::min(row_, row_length - at), row_length, channel,
                  Kind::kScopePiece});
    }
  }

  // Self-contained pieces are packed into items of up to row_ elements per task.
  void add_free(const Piece& piece, int64_t size) {
    if (batch_open_ && batch_size_ + size > row_) batch_open_ = false;
    if (!batch_open_) {
      const auto at = static_cast<int64_t>(s_.pieces.size());
      s_.items.push_back({at, at, -1});
      batch_open_ = true;
      batch_size_ = 0;
    }
    s_.pieces.push_back(piece);
    s_.items.back().end_piece += 1;
    batch_size_ += size;
  }

  void open_scope(bool group) {
    batch_open_ = false;
    const int64_t width = group ? tasks_ * tasks_ : tasks_;
    const int64_t stride = (width + kPad - 1) / kPad * kPad;
    s_.scopes.push_back({static_cast<int64_t>(s_.items.size()), 0, group, s_.partial_size,
                         stride, s_.coef_size});
    s_.coef_size += width;
  }

  void add_scoped(const Piece& piece) {
    const auto at = static_cast<int64_t>(s_.pieces.size());
    s_.pieces.push_back(piece);
    s_.items.push_back({at, at + 1, static_cast<int64_t>(s_.scopes.size()) - 1});
    s_.scopes.back().items += 1;
  }

  void close_scope() { s_.partial_size += s_.scopes.back().items * s_.scopes.back().stride; }

  // Partial sums of neighbouring items are written by different threads: 16 accumulators
  // (a 64-byte line of fp32) apart at least.
  static constexpr int64_t kPad = 16;
  int64_t tasks_;
  int64_t row_;
  Schedule s_;
  bool batch_open_ = false;
  int64_t batch_size_ = 0;
};

// Cuts the plan into items. Layers are visited by offset, as are the gaps (between the layers).
Schedule make_schedule(int64_t tasks, const int64_t* layers, int64_t num_layers,
                       const int64_t* gaps, int64_t num_gaps, const int64_t* top,
                       bool group_mode, bool project_uniform) {
  // (offset, index): index < num_layers is a layer, else the gap index - num_layers.
  std::vector<std::pair<int64_t, int64_t>> order;
  order.reserve(num_layers + num_gaps);
  for (int64_t l = 0; l < num_layers; ++l) order.emplace_back(layers[4 * l], l);
  for (int64_t k = 0; k < num_gaps; ++k) order.emplace_back(gaps[2 * k], num_layers + k);
  std::sort(order.begin(), order.end());
  ScheduleBuilder builder(tasks);
  for (const auto& [offset, index] : order) {
    if (index >= num_layers) {
      builder.gap(offset, gaps[2 * (index - num_layers) + 1]);
      continue;
    }
    const int64_t* row = layers + 4 * index;
    const int64_t channels = row[1], row_length = row[2], first = row[3];
    const int64_t* tops = top + first;
    const bool uniform =
        std::all_of(tops, tops + channels, [&](int64_t t) { return t == tops[0]; });
    if (uniform && !project_uniform) {
      builder.gap(offset, channels * row_length);  // the authors' rule: plainly summed
    } else if (group_mode) {
      builder.group_layer(offset, channels, row_length, first);
    } else {
      builder.channel_layer(offset, channels, row_length, first);
    }
  }
  return builder.take();
}

// The per-row operations. kT > 0: the task count is a compile-time constant (T <= 8), so the
// per-task accumulators live in registers; kT == 0: any T, accumulators in per-thread scratch.
// out_t: the dtype of `out`, scalar_t or (for bf16/fp16 rows) the fp32 accumulation type.
template <typename scalar_t, typename out_t, int kT>
class Phase2Cpu {
 public:
  using acc_t = typename Acc<scalar_t>::type;
  // bf16/fp16 outputs are rounded; their pass 2 recomputes the sum from the gradients. An fp32
  // out of bf16/fp16 rows is exact: pass 2 corrects it in place, as for fp32 rows.
  static constexpr bool kExactOut = std::is_same<out_t, acc_t>::value;

  Phase2Cpu(const scalar_t* grads, int64_t tasks, int64_t numel, out_t* out, scalar_t* projected)
      : g_(grads), tasks_(kT > 0 ? kT : tasks), numel_(numel), out_(out), proj_(projected) {}

  int64_t tasks() const { return kT > 0 ? kT : tasks_; }

  // out[off:off+len] = sum_j G_j; projected rows are copies.
  void plain_sum(int64_t off, int64_t len) const {
    const int64_t T = tasks();
    const scalar_t* base = g_ + off;
    out_t* o = out_ + off;
    int64_t e = 0;
    for (; e + kLanes <= len; e += kLanes) {
      acc_t s[kLanes] = {};
      for (int64_t j = 0; j < T; ++j) {
        const scalar_t* gj = base + j * numel_ + e;
        for (int k = 0; k < kLanes; ++k) s[k] += static_cast<acc_t>(gj[k]);
      }
      for (int k = 0; k < kLanes; ++k) o[e + k] = static_cast<out_t>(s[k]);
    }
    for (; e < len; ++e) {
      acc_t s = 0;
      for (int64_t j = 0; j < T; ++j) s += static_cast<acc_t>(base[j * numel_ + e]);
      o[e] = static_cast<out_t>(s);
    }
    if (proj_ != nullptr) {
      for (int64_t j = 0; j < T; ++j) {
        std::copy(base + j * numel_, base + j * numel_ + len, proj_ + j * numel_ + off);
      }
    }
  }

  // Pass 1 on one row (or row piece): dots[j] = <G_top, G_j> over it, out = sum_j G_j.
  // scratch: [T * kLanes] accumulators when kT == 0.
  void dots_and_sum(int64_t off, int64_t len, int64_t top, acc_t* dots, acc_t* scratch) const {
    const int64_t T = tasks();
    acc_t fixed[kT > 0 ? kT * kLanes : 1];
    acc_t* lanes = kT > 0 ? fixed : scratch;
    std::fill(lanes, lanes + T * kLanes, acc_t(0));
    std::fill(dots, dots + T, acc_t(0));
    const scalar_t* base = g_ + off;
    const scalar_t* ref = base + top * numel_;
    out_t* o = out_ + off;
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
      for (int k = 0; k < kLanes; ++k) o[e + k] = static_cast<out_t>(s[k]);
    }
    for (; e < len; ++e) {  // the tail goes into dots first, the lanes are added after
      const acc_t r = static_cast<acc_t>(ref[e]);
      acc_t s = 0;
      for (int64_t j = 0; j < T; ++j) {
        const acc_t v = static_cast<acc_t>(base[j * numel_ + e]);
        s += v;
        dots[j] += r * v;
      }
      o[e] = static_cast<out_t>(s);
    }
    for (int64_t j = 0; j < T; ++j) dots[j] = reduce_lanes(lanes + j * kLanes) + dots[j];
  }

  // Pass 2 on one row (or row piece): G'_j = G_j - coef[j] * G_top; out = sum_j G'_j.
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
    out_t* o = out_ + off;
    if constexpr (kExactOut) {
      for (int64_t e = 0; e < len; ++e) o[e] = o[e] - shrink * static_cast<acc_t>(gt[e]);
    } else {
      for (int64_t e = 0; e < len; ++e) {
        acc_t s = 0;
        for (int64_t j = 0; j < T; ++j) s += static_cast<acc_t>(base[j * numel_ + e]);
        o[e] = static_cast<out_t>(s - shrink * static_cast<acc_t>(gt[e]));
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

 private:
  const scalar_t* g_;
  int64_t tasks_;
  int64_t numel_;
  out_t* out_;
  scalar_t* proj_;
};

// One call: the schedule, the shared counters, and the worker every thread runs.
template <typename scalar_t, typename out_t, int kT>
class Phase2Run {
 public:
  using acc_t = typename Acc<scalar_t>::type;

  Phase2Run(const Phase2Cpu<scalar_t, out_t, kT>& rows, const Schedule& schedule, const int64_t* top)
      : rows_(rows),
        s_(schedule),
        top_(top),
        tasks_(rows.tasks()),
        state_(new ScopeState[schedule.scopes.size()]),
        partials_(static_cast<size_t>(schedule.partial_size)),
        coefs_(static_cast<size_t>(schedule.coef_size)) {}

  int64_t num_items() const { return static_cast<int64_t>(s_.items.size()); }

  void worker() {
    const int64_t T = tasks_;
    // lanes [T * kLanes] | dots [T] | coef [T] | group sums [T, T] | group coefficients [T, T]
    std::vector<acc_t> scratch(static_cast<size_t>(T * kLanes + 2 * T + 2 * T * T));
    Scratch w{scratch.data(), scratch.data() + T * kLanes, scratch.data() + T * kLanes + T,
              scratch.data() + T * kLanes + 2 * T, scratch.data() + T * kLanes + 2 * T + T * T};
    int64_t cursor = 0;  // scopes before it are ready and fully handed out
    for (;;) {
      if (project_ready(cursor)) continue;
      const int64_t i = next_item_.fetch_add(1, std::memory_order_relaxed);
      if (i < num_items()) {
        run_item(i, w);
        continue;
      }
      help_finish(cursor);
      return;
    }
  }

 private:
  struct Scratch {
    acc_t* lanes;
    acc_t* dots;
    acc_t* coef;
    acc_t* group;
    acc_t* group_coef;
  };

  void run_item(int64_t i, const Scratch& w) {
    const Item& item = s_.items[i];
    if (item.scope < 0) {
      for (int64_t p = item.first_piece; p < item.end_piece; ++p) run_piece(s_.pieces[p], w);
      return;
    }
    const Scope& scope = s_.scopes[item.scope];
    const Piece& piece = s_.pieces[item.first_piece];
    const int64_t T = tasks_;
    acc_t* partial = partials_.data() + scope.partials + (i - scope.first_item) * scope.stride;
    std::fill(partial, partial + (scope.group ? T * T : T), acc_t(0));
    if (piece.kind == Kind::kScopeRows) {
      for (int64_t c = 0; c < piece.length; ++c) {
        const int64_t t = top_[piece.channel + c];
        rows_.dots_and_sum(piece.offset + c * piece.row_length, piece.row_length, t, w.dots,
                           w.lanes);
        acc_t* sums = partial + t * T;
        for (int64_t j = 0; j < T; ++j) sums[j] += w.dots[j];
      }
    } else {  // kScopePiece
      const int64_t t = top_[piece.channel];
      rows_.dots_and_sum(piece.offset, piece.length, t, w.dots, w.lanes);
      std::copy(w.dots, w.dots + T, partial + (scope.group ? t * T : 0));
    }
    ScopeState& state = state_[item.scope];
    if (state.finished.fetch_add(1, std::memory_order_acq_rel) == scope.items - 1) {
      finish_scope(item.scope);
    }
  }

  void run_piece(const Piece& piece, const Scratch& w) {
    const int64_t T = tasks_;
    if (piece.kind == Kind::kSum) {
      rows_.plain_sum(piece.offset, piece.length);
    } else if (piece.kind == Kind::kChannelRows) {
      for (int64_t c = 0; c < piece.length; ++c) {
        const int64_t off = piece.offset + c * piece.row_length;
        const int64_t t = top_[piece.channel + c];
        rows_.dots_and_sum(off, piece.row_length, t, w.dots, w.lanes);
        rows_.coefficients(w.dots, t, w.coef);
        rows_.project_row(off, piece.row_length, t, w.coef);
      }
    } else {  // kGroupLayer
      std::fill(w.group, w.group + T * T, acc_t(0));
      for (int64_t c = 0; c < piece.length; ++c) {
        const int64_t t = top_[piece.channel + c];
        rows_.dots_and_sum(piece.offset + c * piece.row_length, piece.row_length, t, w.dots,
                           w.lanes);
        for (int64_t j = 0; j < T; ++j) w.group[t * T + j] += w.dots[j];
      }
      for (int64_t t = 0; t < T; ++t) rows_.coefficients(w.group + t * T, t, w.group_coef + t * T);
      for (int64_t c = piece.length - 1; c >= 0; --c) {
        const int64_t t = top_[piece.channel + c];
        rows_.project_row(piece.offset + c * piece.row_length, piece.row_length, t,
                          w.group_coef + t * T);
      }
    }
  }

  // The scope's last pass-1 item is done: its sums in item order, then the coefficients of
  // every group (of the one row, for a channel-mode scope).
  void finish_scope(int64_t s) {
    const Scope& scope = s_.scopes[s];
    const int64_t T = tasks_;
    const int64_t width = scope.group ? T * T : T;
    acc_t* coef = coefs_.data() + scope.coefs;
    std::vector<acc_t> sums(static_cast<size_t>(width), acc_t(0));
    for (int64_t k = 0; k < scope.items; ++k) {
      const acc_t* partial = partials_.data() + scope.partials + k * scope.stride;
      for (int64_t e = 0; e < width; ++e) sums[e] += partial[e];
    }
    if (scope.group) {
      for (int64_t t = 0; t < T; ++t) rows_.coefficients(sums.data() + t * T, t, coef + t * T);
    } else {
      const Piece& piece = s_.pieces[s_.items[scope.first_item].first_piece];
      rows_.coefficients(sums.data(), top_[piece.channel], coef);
    }
    state_[s].ready.store(true, std::memory_order_release);
  }

  // Pass 2 of item `i` of scope `s`.
  void project_item(int64_t s, int64_t i) {
    const Scope& scope = s_.scopes[s];
    const Piece& piece = s_.pieces[s_.items[i].first_piece];
    const acc_t* coef = coefs_.data() + scope.coefs;
    const auto coef_of = [&](int64_t t) { return scope.group ? coef + t * tasks_ : coef; };
    if (piece.kind == Kind::kScopeRows) {
      for (int64_t c = piece.length - 1; c >= 0; --c) {
        const int64_t t = top_[piece.channel + c];
        rows_.project_row(piece.offset + c * piece.row_length, piece.row_length, t, coef_of(t));
      }
    } else {
      const int64_t t = top_[piece.channel];
      rows_.project_row(piece.offset, piece.length, t, coef_of(t));
    }
  }

  // Claims and runs one pass-2 item of a ready scope, if there is one; false otherwise.
  bool project_ready(int64_t& cursor) {
    const int64_t started = next_item_.load(std::memory_order_relaxed);
    const auto num_scopes = static_cast<int64_t>(s_.scopes.size());
    for (int64_t s = cursor; s < num_scopes && s_.scopes[s].first_item < started; ++s) {
      ScopeState& state = state_[s];
      if (!state.ready.load(std::memory_order_acquire)) continue;
      const Scope& scope = s_.scopes[s];
      if (state.claimed.load(std::memory_order_relaxed) < scope.items) {
        const int64_t k = state.claimed.fetch_add(1, std::memory_order_relaxed);
        if (k < scope.items) {
          project_item(s, scope.first_item + scope.items - 1 - k);
          return true;
        }
      }
      if (s == cursor) ++cursor;
    }
    return false;
  }

  // Out of items: while another thread finishes a scope's pass 1, yield the core (no spinning
  // that would take it from that thread) and share the scope's pass 2 once it is ready. Gives
  // up after kHelpWindow: the finishing thread then projects alone.
  void help_finish(int64_t& cursor) {
    const auto num_scopes = static_cast<int64_t>(s_.scopes.size());
    const auto deadline = std::chrono::steady_clock::now() + kHelpWindow;
    for (;;) {
      if (project_ready(cursor)) continue;
      bool pending = false;
      for (int64_t s = cursor; s < num_scopes && !pending; ++s) {
        pending = !state_[s].ready.load(std::memory_order_acquire);
      }
      if (!pending || std::chrono::steady_clock::now() > deadline) return;
      std::this_thread::yield();
    }
  }

  const Phase2Cpu<scalar_t, out_t, kT>& rows_;
  const Schedule& s_;
  const int64_t* top_;
  const int64_t tasks_;
  std::unique_ptr<ScopeState[]> state_;
  std::vector<acc_t> partials_;
  std::vector<acc_t> coefs_;
  alignas(64) std::atomic<int64_t> next_item_{0};
};

template <typename scalar_t, typename out_t, int kT>
void run_phase2(const at::Tensor& grads, const Schedule& schedule, const int64_t* top,
                out_t* out, scalar_t* projected) {
  const Phase2Cpu<scalar_t, out_t, kT> rows(grads.data_ptr<scalar_t>(), grads.size(0),
                                            grads.size(1), out, projected);
  Phase2Run<scalar_t, out_t, kT> run(rows, schedule, top);
  run_workers(run.num_items(), [&run] { run.worker(); });
}

}  // namespace

void phase2_cpu(const at::Tensor& grads, const at::Tensor& layers, const at::Tensor& gaps,
                const at::Tensor& top, bool group_mode, bool project_uniform, at::Tensor out,
                const c10::optional<at::Tensor>& projected) {
  TORCH_CHECK(grads.dim() == 2 && grads.is_contiguous(), "grads must be contiguous [T, N]");
  TORCH_CHECK(out.is_contiguous() && out.numel() == grads.size(1), "out must be contiguous [N]");
  const bool half_rows = grads.scalar_type() == at::kBFloat16 || grads.scalar_type() == at::kHalf;
  const bool fp32_out = half_rows && out.scalar_type() == at::kFloat;
  TORCH_CHECK(out.scalar_type() == grads.scalar_type() || fp32_out,
              "out must have the dtype of grads (or float32 for bfloat16/float16 grads)");
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
  if (tasks == 0 || grads.size(1) == 0) return;
  const Schedule schedule = make_schedule(tasks, lt, layer_table.size(0), gt, gap_table.size(0),
                                          top_ptr, group_mode, project_uniform);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads.scalar_type(), "phase2", [&] {
    scalar_t* proj_ptr = want_projected ? projected->data_ptr<scalar_t>() : nullptr;
    const auto with_out = [&](auto* out_ptr) {
      using out_t = std::remove_pointer_t<decltype(out_ptr)>;
      const auto run = [&](auto fixed_tasks) {
        run_phase2<scalar_t, out_t, decltype(fixed_tasks)::value>(grads, schedule, top_ptr,
                                                                  out_ptr, proj_ptr);
      };
      switch (tasks) {
        case 1: run(std::integral_constant<int, 1>{}); break;
        case 2: run(std::integral_constant<int, 2>{}); break;
        case 3: run(std::integral_constant<int, 3>{}); break;
        case 4: run(std::integral_constant<int, 4>{}); break;
        case 5: run(std::integral_constant<int, 5>{}); break;
        case 6: run(std::integral_constant<int, 6>{}); break;
        case 8: run(std::integral_constant<int, 8>{}); break;
        default: run(std::integral_constant<int, 0>{}); break;
      }
    };
    if constexpr (std::is_same<scalar_t, float>::value || std::is_same<scalar_t, double>::value) {
      with_out(out.data_ptr<scalar_t>());
    } else if (fp32_out) {  // bf16/fp16 rows, fp32 [N] result
      with_out(out.data_ptr<float>());
    } else {
      with_out(out.data_ptr<scalar_t>());
    }
  });
}

TORCH_LIBRARY_IMPL(cs_kernels, CPU, m) { m.impl("phase2_", &phase2_cpu); }

}  // namespace cs_kernels
