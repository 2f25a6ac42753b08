// Phase 2 in steps on the GPU (cs_kernels/phase2_steps.py), the CUDA twins of
// csrc/steps_cpu.cpp with the same semantics:
//
// channel_gram: grads [T, N] -> gram [C, T, T], gram[c, i, j] = <G_i[c], G_j[c]> (fp32; fp64
//   for fp64), and with `sum_out` the plain sum sum_t G_t of every row and gap element in the
//   same pass. Three launches whatever the number of layers:
//     1. setup: cuts every layer (and gap) into work items, as phase2.cu does (whole rows
//        batched per item, rows longer than kChunk cut into pieces), and zeroes `gram`;
//     2. main: per item, one read of the rows; a group of `lanes` threads per row piece
//        computes the T (T + 1) / 2 dots of the piece in register tiles of 8 tasks (4 when
//        T <= 4); whole rows store into `gram`, the pieces of a long row into scratch;
//     3. finish: a long row's pieces added in piece order (a fixed order) into `gram`.
// project_: out = sum_t G_t - (sum_j coef[j, c]) * G_top(c)[c] on every channel row, the plain
//   sum elsewhere; with `out_holds_sum` only rows with a non-zero shrink are rewritten (fp32/fp64
//   from the sum in `out`, bf16/fp16 from the rows: one rounding). Optionally projected [T, N].
//   Two launches: setup (items of kChunk elements of a layer or gap), then an element-wise pass.
//
// No host synchronisation (the tables live in device memory), no floating-point atomics: every
// sum has a fixed order, so the bits do not depend on the grid size or scheduling. Table rows
// that do not fit the buffers are skipped and a channel whose top task is outside [0, T) is
// plainly summed (the public API checks both first), so nothing is read or written out of
// bounds.
#include "common.cuh"
#include "launch.h"

namespace cs_kernels {
namespace cuda {

namespace {

constexpr int kStepEPT = 8;                                // row elements a thread holds
// Tasks per register tile of the Gram pass: 8, or 4 for T <= 4 (fewer idle registers and
// shuffles for the small task counts of most models).
constexpr int kStepTile = 8;
constexpr int kStepSmallTile = 4;
constexpr int64_t kStepChunk = int64_t{kThreads} * kStepEPT;  // longest piece one block holds
constexpr std::size_t kStepAlign = 256;

enum StepKind : int32_t {
  kStepSkip = 0,
  kStepRows = 1,      // gram: whole rows, `lanes` threads each
  kStepSplit = 2,     // gram: a long row, one item per kStepChunk piece
  kStepGap = 3,       // plainly summed elements
  kStepElements = 4,  // projection: kStepChunk elements of a layer per item
};

// One layer (table order) or gap, cut into work items by the setup kernel.
struct StepSegment {
  int64_t offset;       // first element
  int64_t rows;         // channels (1 for a gap)
  int64_t row_length;   // D (the length, for a gap)
  int64_t first;        // first channel
  int64_t item_begin;   // first work item
  int64_t piece_begin;  // kStepSplit: first scratch slot of its pieces
  int64_t items;        // work items of the segment
  int32_t kind;         // StepKind
  int32_t lanes;        // kStepRows: threads per row (power of two)
  int32_t rows_per_item;
  int32_t pieces_per_row;
};

struct StepLayout {
  int64_t item_bound = 0;   // most items any valid plan of these sizes can have
  int64_t piece_bound = 0;  // most pieces of long rows
  std::size_t segments = 0, item_begin = 0, num_items = 0, partials = 0, total = 0;
};

std::size_t step_align(std::size_t v) { return (v + kStepAlign - 1) / kStepAlign * kStepAlign; }

__host__ __device__ __forceinline__ int64_t pair_count(int64_t tasks) {
  return tasks * (tasks + 1) / 2;
}

StepLayout make_step_layout(const StepsProblem& pr, bool gram) {
  const std::size_t acc = pr.dtype == ScalarType::kFloat64 ? 8 : 4;
  const int64_t S = pr.num_layers + pr.num_gaps;
  StepLayout lay;
  // Every item but the last of its segment covers >= kStepChunk elements, and a long row of D
  // elements has ceil(D / kStepChunk) <= 2 D / kStepChunk pieces.
  lay.item_bound = 2 * ceil_div(pr.numel, kStepChunk) + S + 1;
  lay.piece_bound = gram ? 2 * ceil_div(pr.numel, kStepChunk) + 1 : 0;
  std::size_t at = 0;
  const auto take = [&](std::size_t bytes) {
    const std::size_t here = at;
    at = step_align(at + bytes);
    return here;
  };
  lay.segments = take(sizeof(StepSegment) * static_cast<std::size_t>(S));
  lay.item_begin = take(sizeof(int64_t) * static_cast<std::size_t>(S + 1));
  lay.num_items = take(sizeof(int64_t));
  lay.partials = take(acc * static_cast<std::size_t>(lay.piece_bound * pair_count(pr.tasks)));
  lay.total = at;
  return lay;
}

template <typename scalar_t>
struct StepParams {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* grads;
  const int64_t* layers;
  const int64_t* gaps;
  int64_t tasks, numel, num_layers, num_gaps, total_channels;
  int64_t item_bound, piece_bound;
  bool gram_cut;      // Gram: rows batched / long rows in pieces; projection: element chunks
  bool with_gaps;     // the gaps are work items
  // Gram
  acc_t* gram;        // [C, T, T]
  scalar_t* sum_out;  // [N] or nullptr
  // Projection
  const int64_t* top;   // [C]
  const acc_t* coef;    // [T, C]
  bool out_holds_sum;
  scalar_t* out;        // [N]
  scalar_t* projected;  // [T, N] or nullptr
  // Scratch
  StepSegment* segments;
  int64_t* item_begin;
  int64_t* num_items;
  acc_t* partials;  // [piece_bound, T (T + 1) / 2]
};

// ---------------------------------------------------------------------------------- setup

__device__ __forceinline__ bool step_layer_fits(const int64_t* row, int64_t numel,
                                                int64_t total_channels) {
  const int64_t offset = ld(row), channels = ld(row + 1), length = ld(row + 2), first = ld(row + 3);
  return offset >= 0 && offset <= numel && channels >= 1 && length >= 1 &&
         channels <= numel && length <= (numel - offset) / channels && first >= 0 &&
         first <= total_channels && channels <= total_channels - first;
}

// How segment `s` (layers first, then gaps) is cut into items; kStepSkip when it does not fit
// (or is a gap that is no work).
template <typename scalar_t>
__device__ StepSegment plan_step_segment(const StepParams<scalar_t>& p, int64_t s) {
  StepSegment g{};
  g.kind = kStepSkip;
  g.lanes = kThreads;
  g.rows_per_item = 1;
  g.pieces_per_row = 1;
  if (s < p.num_layers) {
    const int64_t* row = p.layers + 4 * s;
    if (!step_layer_fits(row, p.numel, p.total_channels)) return g;
    g.offset = ld(row);
    g.rows = ld(row + 1);
    g.row_length = ld(row + 2);
    g.first = ld(row + 3);
    if (!p.gram_cut) {
      g.kind = kStepElements;
      g.items = ceil_div(g.rows * g.row_length, kStepChunk);
    } else if (g.row_length <= kStepChunk) {
      // Whole rows: `lanes` threads per row (at most kStepEPT elements each), several rows
      // per block iteration and several iterations per item (about kStepChunk elements).
      g.kind = kStepRows;
      const int64_t lanes = next_pow2(ceil_div(g.row_length, kStepEPT));
      g.lanes = static_cast<int32_t>(min64(lanes, kThreads));
      const int64_t per_iteration = (kThreads / g.lanes) * g.row_length;
      const int64_t iterations =
          per_iteration >= kStepChunk ? 1 : ceil_div(kStepChunk, per_iteration);
      g.rows_per_item = static_cast<int32_t>((kThreads / g.lanes) * iterations);
      g.items = ceil_div(g.rows, g.rows_per_item);
    } else {
      g.kind = kStepSplit;  // one item per kStepChunk piece of a row
      g.pieces_per_row = static_cast<int32_t>(ceil_div(g.row_length, kStepChunk));
      g.items = g.rows * g.pieces_per_row;
    }
    return g;
  }
  if (!p.with_gaps) return g;
  const int64_t* row = p.gaps + 2 * (s - p.num_layers);
  const int64_t offset = ld(row), length = ld(row + 1);
  if (!(offset >= 0 && length >= 0 && offset <= p.numel && length <= p.numel - offset)) return g;
  g.kind = kStepGap;
  g.offset = offset;
  g.rows = 1;
  g.row_length = length;
  g.items = ceil_div(length, kStepChunk);
  return g;
}

// Block 0: every segment's items (prefix sums over the segments, in table order). The other
// blocks zero `gram` (channels that no layer covers stay 0; the others are overwritten).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) steps_setup(StepParams<scalar_t> p) {
  using acc_t = typename Acc<scalar_t>::type;
  __shared__ int64_t scan_items[kThreads];
  __shared__ int64_t scan_pieces[kThreads];
  const int tid = static_cast<int>(threadIdx.x);
  if (blockIdx.x > 0) {
    const int64_t cells = p.total_channels * p.tasks * p.tasks;
    const int64_t stride = int64_t{gridDim.x - 1} * kThreads;
    for (int64_t k = int64_t{blockIdx.x - 1} * kThreads + tid; k < cells; k += stride) {
      st(p.gram + k, acc_t(0));
    }
    return;
  }
  const int64_t num_segments = p.num_layers + p.num_gaps;
  int64_t carry_items = 0, carry_pieces = 0;
  for (int64_t base = 0; base < num_segments; base += kThreads) {
    const int64_t s = base + tid;
    StepSegment g{};
    if (s < num_segments) g = plan_step_segment(p, s);
    const int64_t pieces = g.kind == kStepSplit ? g.items : 0;
    scan_items[tid] = g.items;
    scan_pieces[tid] = pieces;
    __syncthreads();
    for (int offset = 1; offset < kThreads; offset <<= 1) {  // inclusive scan
      const int64_t a = tid >= offset ? scan_items[tid - offset] : 0;
      const int64_t b = tid >= offset ? scan_pieces[tid - offset] : 0;
      __syncthreads();
      scan_items[tid] += a;
      scan_pieces[tid] += b;
      __syncthreads();
    }
    g.item_begin = carry_items + scan_items[tid] - g.items;
    g.piece_begin = carry_pieces + scan_pieces[tid] - pieces;
    if (s < num_segments) {
      st(p.segments + s, g);
      st(p.item_begin + s, g.item_begin);
    }
    carry_items += scan_items[kThreads - 1];
    carry_pieces += scan_pieces[kThreads - 1];
    __syncthreads();  // the scan arrays are reused
  }
  if (tid == 0) {
    st(p.item_begin + num_segments, carry_items);
    // Tables that are no valid plan (overlapping layers) could need more scratch than
    // reserved: then no item runs (the public API never passes such tables).
    const bool fits = carry_items <= p.item_bound && carry_pieces <= p.piece_bound;
    st(p.num_items, fits ? carry_items : int64_t{0});
  }
}

__device__ __forceinline__ int64_t find_step_segment(const int64_t* item_begin, int64_t n,
                                                     int64_t item) {
  int64_t lo = 0, hi = n;  // item_begin[lo] <= item < item_begin[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (ld(item_begin + mid) <= item) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// ------------------------------------------------------------------------------- Gram

// Index of the pair (i <= j) in the upper triangle, row by row.
__device__ __forceinline__ int64_t pair_index(int64_t i, int64_t j, int64_t tasks) {
  return i * tasks - i * (i - 1) / 2 + (j - i);
}

// The dots of one row piece [base, base + len) held by a group of `lanes` threads (len <=
// lanes * kStepEPT; len == 0: the group only takes part in the block's barriers). Whole rows
// (`channel` >= 0) store into gram[channel], pieces of a long row into partials[slot].
// Tasks i of a tile are held in registers while every task j >= the tile's first streams by;
// the plain sum comes from the first tile's stream (every task, in order).
template <typename scalar_t, int kTile>
__device__ __forceinline__ void gram_piece(const StepParams<scalar_t>& p, int lanes, int64_t base,
                                           int len, int64_t channel, int64_t slot,
                                           typename Acc<scalar_t>::type* red) {
  using acc_t = typename Acc<scalar_t>::type;
  const int sub = static_cast<int>(threadIdx.x) & (lanes - 1);
  const int tasks = static_cast<int>(p.tasks);
  const int64_t numel = p.numel;
  const scalar_t* __restrict__ g = p.grads + base;
  acc_t sum[kStepEPT];
  CSK_UNROLL
  for (int k = 0; k < kStepEPT; ++k) sum[k] = acc_t(0);
  for (int i0 = 0; i0 < tasks; i0 += kTile) {
    acc_t a[kTile][kStepEPT];
    CSK_UNROLL
    for (int ii = 0; ii < kTile; ++ii) {
      CSK_UNROLL
      for (int k = 0; k < kStepEPT; ++k) {
        const int e = sub + k * lanes;
        a[ii][k] = (e < len && i0 + ii < tasks)
                       ? load_acc<scalar_t, acc_t>(g + (i0 + ii) * numel + e)
                       : acc_t(0);
      }
    }
    for (int j = i0; j < tasks; ++j) {
      acc_t b[kStepEPT];
      CSK_UNROLL
      for (int k = 0; k < kStepEPT; ++k) {
        const int e = sub + k * lanes;
        b[k] = e < len ? load_acc<scalar_t, acc_t>(g + j * numel + e) : acc_t(0);
        if (i0 == 0) sum[k] += b[k];
      }
      acc_t dot[kTile];
      CSK_UNROLL
      for (int ii = 0; ii < kTile; ++ii) {
        acc_t d = acc_t(0);
        CSK_UNROLL
        for (int k = 0; k < kStepEPT; ++k) d += a[ii][k] * b[k];
        dot[ii] = d;
      }
      group_sum<kTile>(dot, lanes, red);
      if (sub == 0 && len > 0) {
        CSK_UNROLL
        for (int ii = 0; ii < kTile; ++ii) {
          const int i = i0 + ii;
          if (i > j) continue;
          if (channel >= 0) {
            acc_t* m = p.gram + channel * tasks * tasks;
            st(m + i * tasks + j, dot[ii]);
            if (i != j) st(m + j * tasks + i, dot[ii]);
          } else {
            st(p.partials + slot * pair_count(tasks) + pair_index(i, j, tasks), dot[ii]);
          }
        }
      }
    }
  }
  if (p.sum_out != nullptr) {
    CSK_UNROLL
    for (int k = 0; k < kStepEPT; ++k) {
      const int e = sub + k * lanes;
      if (e < len) store_rounded(p.sum_out + base + e, sum[k]);
    }
  }
}

template <typename scalar_t, int kTile>
__global__ void __launch_bounds__(kThreads) gram_main(StepParams<scalar_t> p) {
  using acc_t = typename Acc<scalar_t>::type;
  __shared__ acc_t red[kTile * kWarps];
  const int64_t num_items = ld(p.num_items);
  const int64_t num_segments = p.num_layers + p.num_gaps;
  const int tasks = static_cast<int>(p.tasks);
  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int64_t s = find_step_segment(p.item_begin, num_segments, item);
    const StepSegment seg = ld(p.segments + s);
    const int64_t local = item - seg.item_begin;
    if (seg.kind == kStepRows) {
      const int lanes = seg.lanes;
      const int64_t r0 = local * seg.rows_per_item;
      const int64_t r_end = min64(r0 + seg.rows_per_item, seg.rows);
      const int64_t group = threadIdx.x / lanes;
      for (int64_t r = r0; r < r_end; r += kThreads / lanes) {
        const int64_t row = r + group;
        const bool here = row < r_end;
        const int64_t base = seg.offset + (here ? row : 0) * seg.row_length;
        const int len = here ? static_cast<int>(seg.row_length) : 0;
        gram_piece<scalar_t, kTile>(p, lanes, base, len, seg.first + (here ? row : 0), -1, red);
      }
    } else if (seg.kind == kStepSplit) {
      const int64_t c = local / seg.pieces_per_row;
      const int64_t k = local % seg.pieces_per_row;
      const int64_t base = seg.offset + c * seg.row_length + k * kStepChunk;
      const int len = static_cast<int>(min64(kStepChunk, seg.row_length - k * kStepChunk));
      gram_piece<scalar_t, kTile>(p, kThreads, base, len, -1, seg.piece_begin + local, red);
    } else if (seg.kind == kStepGap && p.sum_out != nullptr) {
      const int64_t base = seg.offset + local * kStepChunk;
      const int64_t len = min64(kStepChunk, seg.row_length - local * kStepChunk);
      for (int64_t e = threadIdx.x; e < len; e += kThreads) {
        acc_t sum = acc_t(0);
        for (int j = 0; j < tasks; ++j) {
          sum += load_acc<scalar_t, acc_t>(p.grads + j * p.numel + base + e);
        }
        store_rounded(p.sum_out + base + e, sum);
      }
    }
  }
}

// The long rows: their pieces' dots added in piece order, by the block that meets the row's
// first piece. Both triangles from the same sums (same bits).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gram_finish(StepParams<scalar_t> p) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t num_items = ld(p.num_items);
  const int64_t num_segments = p.num_layers + p.num_gaps;
  const int64_t tasks = p.tasks, tt = tasks * tasks, pairs = pair_count(tasks);
  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int64_t s = find_step_segment(p.item_begin, num_segments, item);
    const StepSegment seg = ld(p.segments + s);
    const int64_t local = item - seg.item_begin;
    if (seg.kind != kStepSplit || local % seg.pieces_per_row != 0) continue;
    const int64_t c = local / seg.pieces_per_row;
    const acc_t* parts = p.partials + (seg.piece_begin + local) * pairs;
    acc_t* m = p.gram + (seg.first + c) * tt;
    for (int64_t q = threadIdx.x; q < tt; q += kThreads) {
      const int64_t i = q / tasks, j = q % tasks;
      const int64_t at = i <= j ? pair_index(i, j, tasks) : pair_index(j, i, tasks);
      acc_t a = acc_t(0);
      for (int k = 0; k < seg.pieces_per_row; ++k) a += ld(parts + k * pairs + at);
      st(m + q, a);
    }
  }
}

// ------------------------------------------------------------------------- projection

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) project_main(StepParams<scalar_t> p) {
  using acc_t = typename Acc<scalar_t>::type;
  // bf16/fp16 outputs are rounded once: a projected row is recomputed from the rows.
  constexpr bool kExactOut = sizeof(scalar_t) == sizeof(acc_t);
  const int64_t num_items = ld(p.num_items);
  const int64_t num_segments = p.num_layers + p.num_gaps;
  const int tasks = static_cast<int>(p.tasks);
  const int64_t numel = p.numel, channels = p.total_channels;
  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int64_t s = find_step_segment(p.item_begin, num_segments, item);
    const StepSegment seg = ld(p.segments + s);
    const int64_t start = (item - seg.item_begin) * kStepChunk;
    const int64_t len = min64(kStepChunk, seg.rows * seg.row_length - start);
    if (seg.kind == kStepGap) {
      for (int64_t e = threadIdx.x; e < len; e += kThreads) {
        const int64_t at = seg.offset + start + e;
        acc_t sum = acc_t(0);
        for (int j = 0; j < tasks; ++j) {
          const scalar_t raw = ld(p.grads + j * numel + at);
          sum += static_cast<acc_t>(to_acc(raw));
          if (p.projected != nullptr) st(p.projected + j * numel + at, raw);
        }
        if (!p.out_holds_sum) store_rounded(p.out + at, sum);
      }
      continue;
    }
    if (seg.kind != kStepElements) continue;
    // The thread's channel so far: its top task, whether that is a task, and its shrink.
    int64_t last = -1, top = 0;
    bool valid = false;
    acc_t shrink = acc_t(0);
    // The item's first row and its position in it: then the channel of each element is one
    // 32-bit division when rows are shorter than 2^31 - kStepChunk (always, in practice).
    const int64_t first_row = start / seg.row_length, into_row = start % seg.row_length;
    const bool narrow = seg.row_length <= int64_t{0x7fffffff} - kStepChunk;
    for (int64_t e = threadIdx.x; e < len; e += kThreads) {
      const int64_t rel = start + e;
      const int64_t past = into_row + e;  // < row_length + kStepChunk
      const int64_t c = seg.first + first_row +
                        (narrow ? static_cast<int64_t>(static_cast<uint32_t>(past) /
                                                       static_cast<uint32_t>(seg.row_length))
                                : past / seg.row_length);
      if (c != last) {
        last = c;
        top = ld(p.top + c);
        valid = top >= 0 && top < tasks;  // else: plainly summed (no read out of bounds)
        shrink = acc_t(0);
        if (valid) {
          for (int j = 0; j < tasks; ++j) shrink += ld(p.coef + j * channels + c);
        }
      }
      const int64_t at = seg.offset + rel;
      if (p.projected != nullptr) {
        const acc_t ref = valid ? load_acc<scalar_t, acc_t>(p.grads + top * numel + at) : acc_t(0);
        for (int j = 0; j < tasks; ++j) {
          const scalar_t raw = ld(p.grads + j * numel + at);
          const acc_t cj = valid ? ld(p.coef + j * channels + c) : acc_t(0);
          if (cj == acc_t(0)) {
            st(p.projected + j * numel + at, raw);
          } else {
            store_rounded(p.projected + j * numel + at, static_cast<acc_t>(to_acc(raw)) - cj * ref);
          }
        }
      }
      if (p.out_holds_sum) {
        if (!valid || shrink == acc_t(0)) continue;  // the plain sum is the answer
        const acc_t ref = load_acc<scalar_t, acc_t>(p.grads + top * numel + at);
        if constexpr (kExactOut) {
          store_rounded(p.out + at, load_acc<scalar_t, acc_t>(p.out + at) - shrink * ref);
          continue;
        }
      }
      acc_t sum = acc_t(0);
      for (int j = 0; j < tasks; ++j) sum += load_acc<scalar_t, acc_t>(p.grads + j * numel + at);
      if (valid) sum = sum - shrink * load_acc<scalar_t, acc_t>(p.grads + top * numel + at);
      store_rounded(p.out + at, sum);
    }
  }
}

// --------------------------------------------------------------------------------- host

template <typename scalar_t>
StepParams<scalar_t> make_params(const StepsProblem& pr, const StepLayout& lay, bool gram,
                                 void* workspace) {
  using acc_t = typename Acc<scalar_t>::type;
  char* ws = static_cast<char*>(workspace);
  StepParams<scalar_t> p{};
  p.grads = static_cast<const scalar_t*>(pr.grads);
  p.layers = pr.layers;
  p.gaps = pr.gaps;
  p.tasks = pr.tasks;
  p.numel = pr.numel;
  p.num_layers = pr.num_layers;
  p.num_gaps = pr.num_gaps;
  p.total_channels = pr.total_channels;
  p.item_bound = lay.item_bound;
  p.piece_bound = lay.piece_bound;
  p.gram_cut = gram;
  p.segments = reinterpret_cast<StepSegment*>(ws + lay.segments);
  p.item_begin = reinterpret_cast<int64_t*>(ws + lay.item_begin);
  p.num_items = reinterpret_cast<int64_t*>(ws + lay.num_items);
  p.partials = reinterpret_cast<acc_t*>(ws + lay.partials);
  return p;
}

// Persistent grid of `kernel`: resident blocks on every multiprocessor, at most one per item.
template <typename Kernel>
int persistent_grid(Kernel kernel, int* cache, int64_t item_bound) {
  if (*cache == 0) *cache = blocks_per_multiprocessor(kernel);
  return static_cast<int>(max64(1, min64(multiprocessor_count() * int64_t{*cache}, item_bound)));
}

// The Gram main pass with register tiles of kTile tasks.
template <typename scalar_t, int kTile>
const char* launch_gram_main(const StepParams<scalar_t>& p, int64_t item_bound, void* stream) {
  static int blocks = 0;
  const auto kernel = gram_main<scalar_t, kTile>;  // (no comma inside the launch macro)
  CSK_LAUNCH(kernel, persistent_grid(kernel, &blocks, item_bound), kThreads, stream, p);
  return launch_error();
}

template <typename scalar_t>
const char* gram_typed(const StepsProblem& pr, void* gram, void* sum_out, void* workspace,
                       void* stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const StepLayout lay = make_step_layout(pr, true);
  StepParams<scalar_t> p = make_params<scalar_t>(pr, lay, true, workspace);
  p.with_gaps = sum_out != nullptr;
  p.gram = static_cast<acc_t*>(gram);
  p.sum_out = static_cast<scalar_t*>(sum_out);
  const int64_t cells = pr.total_channels * pr.tasks * pr.tasks;
  const int zero_blocks = static_cast<int>(min64(ceil_div(cells, kThreads), 1024));
  CSK_LAUNCH(steps_setup<scalar_t>, 1 + zero_blocks, kThreads, stream, p);
  if (const char* error = launch_error()) return error;
  const char* error = pr.tasks <= kStepSmallTile
                          ? launch_gram_main<scalar_t, kStepSmallTile>(p, lay.item_bound, stream)
                          : launch_gram_main<scalar_t, kStepTile>(p, lay.item_bound, stream);
  if (error != nullptr) return error;
  static int finish_blocks = 0;
  CSK_LAUNCH(gram_finish<scalar_t>,
             persistent_grid(gram_finish<scalar_t>, &finish_blocks, lay.item_bound), kThreads,
             stream, p);
  return launch_error();
}

template <typename scalar_t>
const char* project_typed(const StepsProblem& pr, const int64_t* top, const void* coefficients,
                          bool out_holds_sum, void* out, void* projected, void* workspace,
                          void* stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const StepLayout lay = make_step_layout(pr, false);
  StepParams<scalar_t> p = make_params<scalar_t>(pr, lay, false, workspace);
  // Gaps are work only when out must be written there, or the projected rows.
  p.with_gaps = !out_holds_sum || projected != nullptr;
  p.top = top;
  p.coef = static_cast<const acc_t*>(coefficients);
  p.out_holds_sum = out_holds_sum;
  p.out = static_cast<scalar_t*>(out);
  p.projected = static_cast<scalar_t*>(projected);
  CSK_LAUNCH(steps_setup<scalar_t>, 1, kThreads, stream, p);
  if (const char* error = launch_error()) return error;
  static int main_blocks = 0;
  CSK_LAUNCH(project_main<scalar_t>,
             persistent_grid(project_main<scalar_t>, &main_blocks, lay.item_bound), kThreads,
             stream, p);
  return launch_error();
}

}  // namespace

std::size_t channel_gram_workspace_bytes(const StepsProblem& problem) {
  return make_step_layout(problem, true).total;
}

std::size_t project_workspace_bytes(const StepsProblem& problem) {
  return make_step_layout(problem, false).total;
}

const char* channel_gram_launch(const StepsProblem& problem, void* gram, void* sum_out,
                                void* workspace, void* stream) {
  if (problem.tasks <= 0) return nullptr;
  switch (problem.dtype) {
    case ScalarType::kFloat32:
      return gram_typed<float>(problem, gram, sum_out, workspace, stream);
    case ScalarType::kFloat64:
      return gram_typed<double>(problem, gram, sum_out, workspace, stream);
    case ScalarType::kBFloat16:
      return gram_typed<__nv_bfloat16>(problem, gram, sum_out, workspace, stream);
    case ScalarType::kFloat16:
      return gram_typed<__half>(problem, gram, sum_out, workspace, stream);
  }
  return "unsupported dtype";
}

const char* project_launch(const StepsProblem& problem, const int64_t* top,
                           const void* coefficients, bool out_holds_sum, void* out,
                           void* projected, void* workspace, void* stream) {
  if (problem.tasks <= 0 || problem.numel == 0 || problem.num_layers + problem.num_gaps == 0) {
    return nullptr;
  }
  switch (problem.dtype) {
    case ScalarType::kFloat32:
      return project_typed<float>(problem, top, coefficients, out_holds_sum, out, projected,
                                  workspace, stream);
    case ScalarType::kFloat64:
      return project_typed<double>(problem, top, coefficients, out_holds_sum, out, projected,
                                   workspace, stream);
    case ScalarType::kBFloat16:
      return project_typed<__nv_bfloat16>(problem, top, coefficients, out_holds_sum, out,
                                          projected, workspace, stream);
    case ScalarType::kFloat16:
      return project_typed<__half>(problem, top, coefficients, out_holds_sum, out, projected,
                                   workspace, stream);
  }
  return "unsupported dtype";
}

}  // namespace cuda
}  // namespace cs_kernels
