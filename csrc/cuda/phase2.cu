// Phase 2 of connection strength-based optimization on the GPU (docs/algorithm.md, "Phase 2").
//
// grads [T, N] -> out [N] (and optionally projected [T, N]) in three launches, each covering
// every layer and gap of the plan through tables in device memory:
//
//  1. setup: cuts every layer and gap into work items (balanced: ~kChunk elements each) and
//     flags the layers to project (valid tops; not uniform unless project_uniform).
//  2. main: per item, one read of every gradient element. Each channel row (or each kChunk
//     piece of a longer row) is handled by a group of `lanes` threads holding its elements in
//     registers: dots[j] = <G_top, G_j> over the row and s = sum_j G_j.
//       - channel mode, whole rows: coefficients and out = s - shrink * G_top at once;
//       - group mode: row dots -> per item (top task, task) sums -> the last item of a layer
//         to finish adds its items' sums in item order and writes the layer's coefficients;
//       - gaps and unprojected layers: out = s.
//  3. fix (reverse item order, where the cache is warmest): rows whose projection needs the
//     layer (group mode) or the whole long row (channel mode, split rows):
//     out -= shrink * G_top (fp32/fp64, from the plain sum the main pass wrote) or
//     out = sum_j G_j - shrink * G_top (bf16/fp16: one rounding, as the CPU kernels).
//
// No floating-point atomics: every sum has a fixed order (per-thread element order, shuffle
// butterflies, warps in order, items in order), so the result does not depend on scheduling.
// One integer atomic counter per layer only decides which block runs the layer's final sum.
#include "common.cuh"
#include "launch.h"

namespace cs_kernels {
namespace cuda {

namespace {

constexpr int kEPT = 16;                               // most row elements a thread holds
constexpr int kTile = 8;                               // tasks per register tile
constexpr int64_t kChunk = int64_t{kThreads} * kEPT;   // longest row piece one block holds
constexpr int kTargetLanesPerRow = 8;                  // elements per thread aimed for (short rows)
constexpr std::size_t kAlign = 256;

enum SegmentKind : int32_t { kSkip = 0, kRows = 1, kSplit = 2, kGap = 3 };

// One layer (table order) or gap, as the setup kernel cut it into items.
struct Segment {
  int64_t offset;       // first element
  int64_t rows;         // channels (1 for a gap)
  int64_t row_length;   // D (the length, for a gap)
  int64_t first;        // first channel in plan order (layers)
  int64_t item_begin;   // first work item
  int64_t piece_begin;  // first row piece (dot-product slot) of the layer
  int64_t items;        // work items of the segment
  int32_t kind;         // SegmentKind
  int32_t lanes;        // threads per row piece (power of two)
  int32_t rows_per_item;   // kRows: rows per item
  int32_t pieces_per_row;  // kSplit: pieces per row (1 otherwise)
};

// Byte offsets of the scratch regions (computed on the host from the sizes alone).
struct Layout {
  int64_t item_bound = 0;   // most items any valid plan of these sizes can have
  int64_t piece_bound = 0;  // most row pieces
  std::size_t segments = 0, item_begin = 0, num_items = 0, project = 0, counters = 0;
  std::size_t pieces = 0, partials = 0, group_sums = 0, coefs = 0, shrinks = 0, total = 0;
};

std::size_t align_up(std::size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

Layout make_layout(const Phase2Problem& pr) {
  const std::size_t acc = pr.dtype == ScalarType::kFloat64 ? 8 : 4;
  const int64_t T = pr.tasks, L = pr.num_layers, G = pr.num_gaps, S = L + G;
  Layout lay;
  // Every item but the last of its segment covers >= kChunk elements, and a split row has
  // ceil(D / kChunk) <= 2 D / kChunk pieces (see plan_segment).
  lay.item_bound = 2 * ceil_div(pr.numel, kChunk) + S + 1;
  lay.piece_bound = pr.total_channels + 2 * ceil_div(pr.numel, kChunk) + 1;
  std::size_t at = 0;
  const auto take = [&](std::size_t bytes) {
    const std::size_t here = at;
    at = align_up(at + bytes);
    return here;
  };
  lay.segments = take(sizeof(Segment) * static_cast<std::size_t>(S));
  lay.item_begin = take(sizeof(int64_t) * static_cast<std::size_t>(S + 1));
  lay.num_items = take(sizeof(int64_t));
  lay.project = take(sizeof(int32_t) * static_cast<std::size_t>(L));
  lay.counters = take(sizeof(int32_t) * static_cast<std::size_t>(L));
  lay.pieces = take(acc * static_cast<std::size_t>(lay.piece_bound * T));
  // Group mode: per-item [T, T] (top task, task) sums. Channel mode: per-item [T]
  // coefficients of a split row.
  const int64_t per_item = pr.group_mode ? T * T : T;
  lay.partials = take(acc * static_cast<std::size_t>(lay.item_bound * per_item));
  const int64_t layer_tt = pr.group_mode ? L * T * T : 0;
  lay.group_sums = take(acc * static_cast<std::size_t>(layer_tt));
  lay.coefs = take(acc * static_cast<std::size_t>(layer_tt));
  lay.shrinks = take(acc * static_cast<std::size_t>(pr.group_mode ? L * T : 0));
  lay.total = at;
  return lay;
}

template <typename scalar_t>
struct Params {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* grads;
  scalar_t* out;
  scalar_t* projected;  // nullptr: not requested
  const int64_t* layers;
  const int64_t* gaps;
  const int64_t* top;
  int64_t tasks, numel, num_layers, num_gaps, total_channels;
  int64_t item_bound, piece_bound;
  bool group_mode, project_uniform;
  bool update_out;  // fp32/fp64: the fix pass corrects the plain sum the main pass wrote
  Segment* segments;
  int64_t* item_begin;
  int64_t* num_items;
  int32_t* project;
  int32_t* counters;
  acc_t* pieces;
  acc_t* partials;
  acc_t* group_sums;
  acc_t* coefs;
  acc_t* shrinks;
};

// ---------------------------------------------------------------------------------- setup

__device__ __forceinline__ bool layer_fits(const int64_t* row, int64_t numel,
                                           int64_t total_channels) {
  const int64_t offset = ld(row), channels = ld(row + 1), length = ld(row + 2), first = ld(row + 3);
  return offset >= 0 && offset <= numel && channels >= 1 && length >= 1 &&
         channels <= numel && length <= (numel - offset) / channels && first >= 0 &&
         first <= total_channels && channels <= total_channels - first;
}

// How segment `s` (layers first, then gaps) is cut into items. kSkip when it does not fit.
template <typename scalar_t>
__device__ Segment plan_segment(const Params<scalar_t>& p, int64_t s) {
  Segment g{};
  g.kind = kSkip;
  g.pieces_per_row = 1;
  g.lanes = kThreads;
  if (s < p.num_layers) {
    const int64_t* row = p.layers + 4 * s;
    if (!layer_fits(row, p.numel, p.total_channels)) return g;
    g.offset = ld(row);
    g.rows = ld(row + 1);
    g.row_length = ld(row + 2);
    g.first = ld(row + 3);
    if (g.row_length <= kChunk) {
      // Whole rows: `lanes` threads per row (about kTargetLanesPerRow elements each), several
      // rows per block iteration and several iterations per item.
      g.kind = kRows;
      const int64_t lanes = next_pow2(ceil_div(g.row_length, kTargetLanesPerRow));
      g.lanes = static_cast<int32_t>(min64(lanes, kThreads));
      const int64_t per_iteration = (kThreads / g.lanes) * g.row_length;
      const int64_t iterations = per_iteration >= kChunk ? 1 : ceil_div(kChunk, per_iteration);
      g.rows_per_item = static_cast<int32_t>((kThreads / g.lanes) * iterations);
      g.items = ceil_div(g.rows, g.rows_per_item);
    } else {
      g.kind = kSplit;  // one item per kChunk piece of a row
      g.pieces_per_row = static_cast<int32_t>(ceil_div(g.row_length, kChunk));
      g.rows_per_item = 1;
      g.items = g.rows * g.pieces_per_row;
    }
  } else {
    const int64_t* row = p.gaps + 2 * (s - p.num_layers);
    const int64_t offset = ld(row), length = ld(row + 1);
    if (!(offset >= 0 && length >= 0 && offset <= p.numel && length <= p.numel - offset)) return g;
    g.kind = kGap;
    g.offset = offset;
    g.rows = 1;
    g.row_length = length;
    g.rows_per_item = 1;
    g.items = ceil_div(length, kChunk);
  }
  return g;
}

__device__ __forceinline__ int64_t segment_pieces(const Segment& g) {
  return g.kind == kRows ? g.rows : (g.kind == kSplit ? g.items : 0);
}

// Block 0: cut every segment into items (prefix sums over the segments, in table order).
// Block 1 + l: whether layer l is projected (tops in range; not uniform unless asked) and
// its finishing counter reset.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) phase2_setup(Params<scalar_t> p) {
  __shared__ int64_t scan_items[kThreads];
  __shared__ int64_t scan_pieces[kThreads];
  __shared__ int flags[2];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t num_segments = p.num_layers + p.num_gaps;
  if (blockIdx.x == 0) {
    int64_t carry_items = 0, carry_pieces = 0;
    for (int64_t base = 0; base < num_segments; base += kThreads) {
      const int64_t s = base + tid;
      Segment g{};
      if (s < num_segments) g = plan_segment(p, s);
      scan_items[tid] = g.items;
      scan_pieces[tid] = segment_pieces(g);
      __syncthreads();
      for (int offset = 1; offset < kThreads; offset <<= 1) {  // inclusive Hillis-Steele scan
        const int64_t a = tid >= offset ? scan_items[tid - offset] : 0;
        const int64_t b = tid >= offset ? scan_pieces[tid - offset] : 0;
        __syncthreads();
        scan_items[tid] += a;
        scan_pieces[tid] += b;
        __syncthreads();
      }
      g.item_begin = carry_items + scan_items[tid] - g.items;
      g.piece_begin = carry_pieces + scan_pieces[tid] - segment_pieces(g);
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
      // Tables that do not describe a valid plan (e.g. overlapping layers) could need more
      // scratch than reserved: then nothing runs (the public API never passes such tables).
      const bool fits = carry_items <= p.item_bound && carry_pieces <= p.piece_bound;
      st(p.num_items, fits ? carry_items : int64_t{0});
    }
    return;
  }
  const int64_t l = blockIdx.x - 1;
  const int64_t* row = p.layers + 4 * l;
  if (tid == 0) st(p.counters + l, 0);
  if (!layer_fits(row, p.numel, p.total_channels)) {
    if (tid == 0) st(p.project + l, 0);
    return;
  }
  const int64_t channels = ld(row + 1), first = ld(row + 3);
  if (tid == 0) {
    flags[0] = 0;  // some top outside [0, T)
    flags[1] = 0;  // not every channel has the same top
  }
  __syncthreads();
  const int64_t head = ld(p.top + first);
  for (int64_t c = tid; c < channels; c += kThreads) {
    const int64_t t = ld(p.top + first + c);
    if (t < 0 || t >= p.tasks) flags[0] = 1;
    if (t != head) flags[1] = 1;
  }
  __syncthreads();
  if (tid == 0) {
    // Out-of-range tops cannot be reported without a host synchronisation: such a layer is
    // plainly summed instead of read out of bounds (the public API checks tops first).
    const bool project = flags[0] == 0 && (flags[1] != 0 || p.project_uniform);
    st(p.project + l, project ? 1 : 0);
  }
}

// ---------------------------------------------------------------------------- main pass

__device__ __forceinline__ int64_t find_segment(const int64_t* item_begin, int64_t n,
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

// What the main pass does with the row pieces of one block iteration (block-uniform).
struct PieceMode {
  bool dots;        // compute <G_top, G_j> over the piece
  bool fused;       // channel mode, whole rows: project and write out here
  bool write_sum;   // write out = sum_j G_j (not fused)
  bool store_dots;  // write the piece's dots to `pieces`
  bool copy;        // write projected = grads (not fused)
};

// One block iteration of the main pass: every group of `lanes` threads handles one row piece
// [base, base + len) (len <= lanes * kEPT; len == 0: nothing, but the group still takes part
// in the block's barriers). `top`: the reference task; `piece`: its slot in `pieces`.
template <typename scalar_t>
__device__ __forceinline__ void main_piece(const Params<scalar_t>& p, const PieceMode mode,
                                           int lanes, int64_t base, int len, int top,
                                           int64_t piece, typename Acc<scalar_t>::type* red) {
  using acc_t = typename Acc<scalar_t>::type;
  const int sub = static_cast<int>(threadIdx.x) & (lanes - 1);
  const int tasks = static_cast<int>(p.tasks);
  const int64_t numel = p.numel;
  const scalar_t* __restrict__ g = p.grads + base;
  scalar_t* __restrict__ proj = p.projected;
  acc_t s[kEPT];
  acc_t ref[kEPT];
  CSK_UNROLL
  for (int k = 0; k < kEPT; ++k) {
    s[k] = acc_t(0);
    ref[k] = acc_t(0);
  }
  if (mode.dots) {
    const scalar_t* __restrict__ gt = g + top * numel;
    CSK_UNROLL
    for (int k = 0; k < kEPT; ++k) {
      const int e = sub + k * lanes;
      if (e < len) ref[k] = load_acc<scalar_t, acc_t>(gt + e);
    }
  }
  acc_t norm_sq = acc_t(0);  // fused: ||G_top||^2 over the row
  if (mode.fused) {
    acc_t v[1] = {acc_t(0)};
    CSK_UNROLL
    for (int k = 0; k < kEPT; ++k) v[0] += ref[k] * ref[k];
    group_sum<1>(v, lanes, red);
    norm_sq = v[0];
  }
  acc_t shrink = acc_t(0);  // fused: sum_j coef_j
  for (int j0 = 0; j0 < tasks; j0 += kTile) {
    acc_t dot[kTile];
    CSK_UNROLL
    for (int jj = 0; jj < kTile; ++jj) dot[jj] = acc_t(0);
    CSK_UNROLL
    for (int k = 0; k < kEPT; ++k) {
      const int e = sub + k * lanes;
      if (e < len) {
        CSK_UNROLL
        for (int jj = 0; jj < kTile; ++jj) {
          const int j = j0 + jj;
          if (j < tasks) {
            const scalar_t raw = ld(g + j * numel + e);
            const acc_t v = static_cast<acc_t>(to_acc(raw));
            s[k] += v;
            if (mode.dots) dot[jj] += ref[k] * v;
            if (mode.copy) st(proj + base + j * numel + e, raw);
          }
        }
      }
    }
    if (mode.dots) {
      group_sum<kTile>(dot, lanes, red);
      CSK_UNROLL
      for (int jj = 0; jj < kTile; ++jj) {
        const int j = j0 + jj;
        if (j >= tasks) continue;
        acc_t slot = dot[jj];
        if (mode.fused) {
          // docs/algorithm.md: coef_j = a_j / ||G_i||^2 where a_j < 0, j != i.
          const acc_t coef = (j != top && dot[jj] < acc_t(0) && norm_sq > acc_t(0))
                                 ? dot[jj] / norm_sq
                                 : acc_t(0);
          shrink += coef;
          slot = coef;
        }
        if ((mode.store_dots || (mode.fused && proj != nullptr)) && len > 0 && sub == 0) {
          st(p.pieces + piece * tasks + j, slot);
        }
      }
    }
  }
  if (mode.fused) {
    // sum_j G'_j = sum_j G_j - (sum_j coef_j) G_top: one rounding.
    CSK_UNROLL
    for (int k = 0; k < kEPT; ++k) {
      const int e = sub + k * lanes;
      if (e < len) {
        const acc_t o = shrink != acc_t(0) ? s[k] - shrink * ref[k] : s[k];
        store_rounded(p.out + base + e, o);
      }
    }
    if (proj != nullptr) {
      __syncthreads();  // the coefficients stored above, for every lane of the group
      for (int j = 0; j < tasks; ++j) {
        const acc_t coef = len > 0 ? ld(p.pieces + piece * tasks + j) : acc_t(0);
        const scalar_t* __restrict__ gj = g + j * numel;
        scalar_t* __restrict__ pj = proj + base + j * numel;
        CSK_UNROLL
        for (int k = 0; k < kEPT; ++k) {
          const int e = sub + k * lanes;
          if (e < len) {
            const scalar_t raw = ld(gj + e);
            if (coef == acc_t(0)) {
              st(pj + e, raw);
            } else {
              store_rounded(pj + e, static_cast<acc_t>(to_acc(raw)) - coef * ref[k]);
            }
          }
        }
      }
    }
  } else if (mode.write_sum) {
    CSK_UNROLL
    for (int k = 0; k < kEPT; ++k) {
      const int e = sub + k * lanes;
      if (e < len) store_rounded(p.out + base + e, s[k]);
    }
  }
}

// Group mode: partial[i][j] = sum of pieces[q][j] over this item's pieces q whose channel's
// top task is i, in piece order (each (j, slice) unit is one warp; lanes own the keys i).
template <typename scalar_t>
__device__ void item_group_sums(const Params<scalar_t>& p, const Segment& seg, int64_t q0,
                                int64_t count, typename Acc<scalar_t>::type* partial,
                                typename Acc<scalar_t>::type* hist) {
  using acc_t = typename Acc<scalar_t>::type;
  const int tasks = static_cast<int>(p.tasks);
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int slices = tasks >= kWarps ? 1 : kWarps / tasks;  // slices * T * T < kWarps^2
  for (int unit = warp; unit < tasks * slices; unit += kWarps) {
    const int j = unit % tasks;
    const int slice = unit / tasks;
    const int64_t lo = q0 + count * slice / slices;
    const int64_t hi = q0 + count * (slice + 1) / slices;
    for (int i0 = 0; i0 < tasks; i0 += 32) {
      const int key = i0 + lane;
      acc_t acc = acc_t(0);
      for (int64_t b = lo; b < hi; b += 32) {
        const int64_t q = b + lane;
        int t = -1;
        acc_t d = acc_t(0);
        if (q < hi) {
          t = static_cast<int>(ld(p.top + seg.first + (q - seg.piece_begin) / seg.pieces_per_row));
          d = ld(p.pieces + q * tasks + j);
        }
        for (int src = 0; src < 32; ++src) {
          const int ts = __shfl_sync(0xffffffffu, t, src);
          const acc_t ds = __shfl_sync(0xffffffffu, d, src);
          if (ts == key) acc += ds;
        }
      }
      if (key < tasks) {
        if (slices == 1) {
          st(partial + key * tasks + j, acc);
        } else {
          hist[(slice * tasks + key) * tasks + j] = acc;
        }
      }
    }
  }
  if (slices > 1) {
    __syncthreads();
    for (int q = static_cast<int>(threadIdx.x); q < tasks * tasks; q += kThreads) {
      acc_t a = hist[q];
      for (int slice = 1; slice < slices; ++slice) a += hist[slice * tasks * tasks + q];
      st(partial + q, a);
    }
  }
}

// Group mode, run by the block that finished a layer's last item: the layer's group dot
// products (its items' partial sums, in item order), then its coefficients and shrinks.
template <typename scalar_t>
__device__ void finish_layer(const Params<scalar_t>& p, int64_t l, const Segment& seg) {
  using acc_t = typename Acc<scalar_t>::type;
  const int tasks = static_cast<int>(p.tasks);
  const int64_t tt = p.tasks * p.tasks;
  acc_t* sums = p.group_sums + l * tt;
  acc_t* coefs = p.coefs + l * tt;
  for (int64_t q = threadIdx.x; q < tt; q += kThreads) {
    acc_t a = acc_t(0);
    for (int64_t it = seg.item_begin; it < seg.item_begin + seg.items; ++it) {
      a += ld_coherent(p.partials + it * tt + q);
    }
    st(sums + q, a);
  }
  __syncthreads();
  for (int64_t q = threadIdx.x; q < tt; q += kThreads) {
    const int i = static_cast<int>(q / tasks), j = static_cast<int>(q % tasks);
    const acc_t a = ld(sums + q);                  // <G_i[CG_i], G_j[CG_i]>
    const acc_t norm_sq = ld(sums + i * tasks + i);  // ||G_i[CG_i]||^2
    st(coefs + q, (j != i && a < acc_t(0) && norm_sq > acc_t(0)) ? a / norm_sq : acc_t(0));
  }
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < tasks; i += kThreads) {
    acc_t shrink = acc_t(0);
    for (int j = 0; j < tasks; ++j) shrink += ld(coefs + i * tasks + j);
    st(p.shrinks + l * tasks + i, shrink);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) phase2_main(Params<scalar_t> p) {
  using acc_t = typename Acc<scalar_t>::type;
  __shared__ acc_t red[kTile * kWarps];
  __shared__ acc_t hist[kWarps * kWarps];
  __shared__ int last;
  const int64_t num_items = ld(p.num_items);
  const int64_t num_segments = p.num_layers + p.num_gaps;
  const bool has_projected = p.projected != nullptr;
  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int64_t s = find_segment(p.item_begin, num_segments, item);
    const Segment seg = ld(p.segments + s);
    const int64_t local = item - seg.item_begin;
    const bool project = seg.kind != kGap && ld(p.project + s) != 0;
    int64_t q0 = 0, count = 0;  // this item's row pieces (group mode)
    if (seg.kind == kRows) {
      const int lanes = seg.lanes;
      const int rows_per_iteration = kThreads / lanes;
      const int64_t r0 = local * seg.rows_per_item;
      const int64_t r_end = min64(r0 + seg.rows_per_item, seg.rows);
      const int64_t group = threadIdx.x / lanes;
      PieceMode mode;
      mode.dots = project;
      mode.fused = project && !p.group_mode;
      mode.write_sum = !project || p.update_out;
      mode.store_dots = project && p.group_mode;
      mode.copy = has_projected && !mode.fused;
      for (int64_t r = r0; r < r_end; r += rows_per_iteration) {
        const int64_t row = r + group;
        const bool here = row < r_end;
        const int64_t base = seg.offset + (here ? row : 0) * seg.row_length;
        const int len = here ? static_cast<int>(seg.row_length) : 0;
        const int top = (here && project) ? static_cast<int>(ld(p.top + seg.first + row)) : 0;
        main_piece(p, mode, lanes, base, len, top, seg.piece_begin + row, red);
      }
      q0 = seg.piece_begin + r0;
      count = r_end - r0;
    } else {  // kSplit or kGap: one piece of up to kChunk elements for the whole block
      int64_t base = 0, len = 0;
      int top = 0;
      if (seg.kind == kSplit) {
        const int64_t c = local / seg.pieces_per_row;
        const int64_t k = local % seg.pieces_per_row;
        base = seg.offset + c * seg.row_length + k * kChunk;
        len = min64(kChunk, seg.row_length - k * kChunk);
        if (project) top = static_cast<int>(ld(p.top + seg.first + c));
      } else {
        base = seg.offset + local * kChunk;
        len = min64(kChunk, seg.row_length - local * kChunk);
      }
      PieceMode mode;
      mode.dots = project;
      mode.fused = false;
      mode.write_sum = !project || p.update_out;
      mode.store_dots = project;
      mode.copy = has_projected;
      main_piece(p, mode, kThreads, base, static_cast<int>(len), top, seg.piece_begin + local,
                 red);
      q0 = seg.piece_begin + local;
      count = 1;
    }
    if (project && p.group_mode) {
      __syncthreads();  // the pieces stored by other groups of this block
      item_group_sums(p, seg, q0, count, p.partials + item * p.tasks * p.tasks, hist);
      __threadfence();  // this item's partial sums, before it counts as done
      __syncthreads();
      if (threadIdx.x == 0) last = atomicAdd(p.counters + s, 1) == seg.items - 1 ? 1 : 0;
      __syncthreads();
      if (last != 0) {
        __threadfence();
        finish_layer(p, s, seg);
      }
      __syncthreads();  // `last` and `hist` are reused
    }
  }
}

// ----------------------------------------------------------------------------- fix pass

// Rows of a piece that need their projection: out (and projected) from the coefficients.
template <typename scalar_t>
__device__ __forceinline__ void fix_piece(const Params<scalar_t>& p, int lanes, int64_t base,
                                          int len, int top,
                                          const typename Acc<scalar_t>::type* coefs,
                                          typename Acc<scalar_t>::type shrink) {
  using acc_t = typename Acc<scalar_t>::type;
  if (p.update_out && shrink == acc_t(0)) return;  // no projection: out already holds the sum
  const int sub = static_cast<int>(threadIdx.x) & (lanes - 1);
  const int tasks = static_cast<int>(p.tasks);
  const int64_t numel = p.numel;
  const scalar_t* __restrict__ g = p.grads + base;
  const scalar_t* __restrict__ gt = g + top * numel;
  scalar_t* __restrict__ out = p.out + base;
  for (int e = sub; e < len; e += lanes) {
    const acc_t ref = load_acc<scalar_t, acc_t>(gt + e);
    if (p.update_out) {
      store_rounded(out + e, load_acc<scalar_t, acc_t>(out + e) - shrink * ref);
    } else {
      acc_t sum = acc_t(0);
      for (int j = 0; j < tasks; ++j) sum += load_acc<scalar_t, acc_t>(g + j * numel + e);
      store_rounded(out + e, shrink != acc_t(0) ? sum - shrink * ref : sum);
    }
    if (p.projected != nullptr && shrink != acc_t(0)) {
      for (int j = 0; j < tasks; ++j) {
        const acc_t coef = ld(coefs + j);
        if (coef != acc_t(0)) {
          store_rounded(p.projected + base + j * numel + e,
                        load_acc<scalar_t, acc_t>(g + j * numel + e) - coef * ref);
        }
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) phase2_fix(Params<scalar_t> p) {
  using acc_t = typename Acc<scalar_t>::type;
  __shared__ acc_t row_shrink;
  const int64_t num_items = ld(p.num_items);
  const int64_t num_segments = p.num_layers + p.num_gaps;
  const int tasks = static_cast<int>(p.tasks);
  for (int64_t it = blockIdx.x; it < num_items; it += gridDim.x) {
    const int64_t item = num_items - 1 - it;  // reverse: the main pass ended there
    const int64_t s = find_segment(p.item_begin, num_segments, item);
    const Segment seg = ld(p.segments + s);
    if (seg.kind == kGap || ld(p.project + s) == 0) continue;
    const int64_t local = item - seg.item_begin;
    if (seg.kind == kRows) {
      if (!p.group_mode) continue;  // channel mode finished whole rows in the main pass
      const int lanes = seg.lanes;
      const int64_t r0 = local * seg.rows_per_item;
      const int64_t r_end = min64(r0 + seg.rows_per_item, seg.rows);
      for (int64_t row = r0 + threadIdx.x / lanes; row < r_end; row += kThreads / lanes) {
        const int top = static_cast<int>(ld(p.top + seg.first + row));
        fix_piece(p, lanes, seg.offset + row * seg.row_length, static_cast<int>(seg.row_length),
                  top, p.coefs + (s * tasks + top) * tasks, ld(p.shrinks + s * tasks + top));
      }
      continue;
    }
    // kSplit: one piece of a long row.
    const int64_t c = local / seg.pieces_per_row;
    const int64_t k = local % seg.pieces_per_row;
    const int64_t base = seg.offset + c * seg.row_length + k * kChunk;
    const int len = static_cast<int>(min64(kChunk, seg.row_length - k * kChunk));
    const int top = static_cast<int>(ld(p.top + seg.first + c));
    if (p.group_mode) {
      fix_piece(p, kThreads, base, len, top, p.coefs + (s * tasks + top) * tasks,
                ld(p.shrinks + s * tasks + top));
      continue;
    }
    // Channel mode: the row's dot products from its pieces (in piece order), then its
    // coefficients into this item's scratch slot.
    const acc_t* row_pieces = p.pieces + (seg.piece_begin + c * seg.pieces_per_row) * tasks;
    acc_t* coefs = p.partials + item * tasks;
    acc_t norm_sq = acc_t(0);
    for (int kk = 0; kk < seg.pieces_per_row; ++kk) norm_sq += ld(row_pieces + kk * tasks + top);
    for (int j = static_cast<int>(threadIdx.x); j < tasks; j += kThreads) {
      acc_t a = acc_t(0);
      for (int kk = 0; kk < seg.pieces_per_row; ++kk) a += ld(row_pieces + kk * tasks + j);
      st(coefs + j, (j != top && a < acc_t(0) && norm_sq > acc_t(0)) ? a / norm_sq : acc_t(0));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t shrink = acc_t(0);
      for (int j = 0; j < tasks; ++j) shrink += ld(coefs + j);
      row_shrink = shrink;
    }
    __syncthreads();
    fix_piece(p, kThreads, base, len, top, coefs, row_shrink);
    __syncthreads();  // row_shrink is reused
  }
}

// --------------------------------------------------------------------------------- host

template <typename scalar_t>
const char* launch_typed(const Phase2Problem& pr, void* workspace, void* stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const Layout lay = make_layout(pr);
  char* ws = static_cast<char*>(workspace);
  Params<scalar_t> p;
  p.grads = static_cast<const scalar_t*>(pr.grads);
  p.out = static_cast<scalar_t*>(pr.out);
  p.projected = static_cast<scalar_t*>(pr.projected);
  p.layers = pr.layers;
  p.gaps = pr.gaps;
  p.top = pr.top;
  p.tasks = pr.tasks;
  p.numel = pr.numel;
  p.num_layers = pr.num_layers;
  p.num_gaps = pr.num_gaps;
  p.total_channels = pr.total_channels;
  p.item_bound = lay.item_bound;
  p.piece_bound = lay.piece_bound;
  p.group_mode = pr.group_mode;
  p.project_uniform = pr.project_uniform;
  p.update_out = sizeof(scalar_t) == sizeof(acc_t);  // fp32 and fp64
  p.segments = reinterpret_cast<Segment*>(ws + lay.segments);
  p.item_begin = reinterpret_cast<int64_t*>(ws + lay.item_begin);
  p.num_items = reinterpret_cast<int64_t*>(ws + lay.num_items);
  p.project = reinterpret_cast<int32_t*>(ws + lay.project);
  p.counters = reinterpret_cast<int32_t*>(ws + lay.counters);
  p.pieces = reinterpret_cast<acc_t*>(ws + lay.pieces);
  p.partials = reinterpret_cast<acc_t*>(ws + lay.partials);
  p.group_sums = reinterpret_cast<acc_t*>(ws + lay.group_sums);
  p.coefs = reinterpret_cast<acc_t*>(ws + lay.coefs);
  p.shrinks = reinterpret_cast<acc_t*>(ws + lay.shrinks);

  const int setup_blocks = static_cast<int>(1 + pr.num_layers);
  CSK_LAUNCH(phase2_setup<scalar_t>, setup_blocks, kThreads, stream, p);
  if (const char* error = launch_error()) return error;
  // Persistent grids: resident blocks per multiprocessor, queried once per instantiation.
  static int main_blocks = 0, fix_blocks = 0;
  if (main_blocks == 0) main_blocks = blocks_per_multiprocessor(phase2_main<scalar_t>);
  if (fix_blocks == 0) fix_blocks = blocks_per_multiprocessor(phase2_fix<scalar_t>);
  const int64_t sms = multiprocessor_count();
  const int main_grid = static_cast<int>(max64(1, min64(sms * main_blocks, lay.item_bound)));
  const int fix_grid = static_cast<int>(max64(1, min64(sms * fix_blocks, lay.item_bound)));
  CSK_LAUNCH(phase2_main<scalar_t>, main_grid, kThreads, stream, p);
  if (const char* error = launch_error()) return error;
  CSK_LAUNCH(phase2_fix<scalar_t>, fix_grid, kThreads, stream, p);
  return launch_error();
}

}  // namespace

std::size_t phase2_workspace_bytes(const Phase2Problem& problem) {
  return make_layout(problem).total;
}

const char* phase2_launch(const Phase2Problem& problem, void* workspace, void* stream) {
  if (problem.numel == 0 || problem.num_layers + problem.num_gaps == 0) return nullptr;
  switch (problem.dtype) {
    case ScalarType::kFloat32:
      return launch_typed<float>(problem, workspace, stream);
    case ScalarType::kFloat64:
      return launch_typed<double>(problem, workspace, stream);
    case ScalarType::kBFloat16:
      return launch_typed<__nv_bfloat16>(problem, workspace, stream);
    case ScalarType::kFloat16:
      return launch_typed<__half>(problem, workspace, stream);
  }
  return "unsupported dtype";
}

}  // namespace cuda
}  // namespace cs_kernels
