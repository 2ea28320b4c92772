// Step and index arithmetic of the persistent kernels (rnn_persistent.cu), all in one place.
//
// Which time index a processing step handles, which step a backward step takes its saved
// state from, which step's dgates its recurrent GEMM reads, whether a batch row is inside
// its sequence, and the element offset of every (T, B, width) / (B, H) / exchange access.
//
// Plain C++ as well as CUDA: tests/test_cuda_index.py compiles this header with the system
// C++ compiler and compares the step order, the predecessors and the offsets with the
// float64 NumPy reference's loops (gpurnn/reference.py) for many T, B, directions and
// length patterns, and checks every offset against its buffer's size up to T = 100 000.
// A bug here is then a CPU test failure rather than a wrong gradient (or an illegal address)
// on a GPU.
//
// GPURNN_DEBUG_BOUNDS (the cupy backend defines it when GPURNN_DEBUG_BOUNDS=1): every offset
// function checks its indices against the buffer's extent and traps on a violation, so a
// bad access stops the kernel with an error at the access instead of corrupting memory or
// faulting later somewhere else.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GPURNN_HD __host__ __device__ __forceinline__
#else
#define GPURNN_HD inline
#endif

#ifdef GPURNN_DEBUG_BOUNDS
#if defined(__CUDA_ARCH__)
#define GPURNN_TRAP() __trap()
#else
#define GPURNN_TRAP() __builtin_trap()
#endif
#define GPURNN_CHECK(cond) \
  do {                     \
    if (!(cond)) GPURNN_TRAP(); \
  } while (0)
#else
#define GPURNN_CHECK(cond) \
  do {                     \
  } while (0)
#endif

namespace gpurnn {

// Offsets are 64-bit and signed: T * B * G * H passes 2^31 at real sizes (T = 100 000,
// B = 64, 4 * 1024 columns), and a negative index must fail the bounds check, not wrap.
typedef long long i64;

// ------------------------------------------------------------------------- time order

// Forward step s (0 .. T-1) handles time t. A reverse layer runs from T-1 down to 0; a row
// shorter than T simply has no valid steps at t >= its length (reverse: its first ones).
GPURNN_HD int forward_time(int s, int T, int reverse) { return reverse ? T - 1 - s : s; }

// Backward step s (0 .. T-1) handles the forward's order reversed.
GPURNN_HD int backward_time(int s, int T, int reverse) { return reverse ? s : T - 1 - s; }

// Step t of a row starts from the state its forward predecessor left (reverse: t + 1).
// Not the step the backward processed just before (that is the forward *successor*).
GPURNN_HD int forward_predecessor(int t, int reverse) { return reverse ? t + 1 : t - 1; }

// Is time t inside a sequence of `len` steps (PackedSequence semantics, both directions)?
GPURNN_HD bool step_valid(int t, int len) { return t >= 0 && t < len; }

GPURNN_HD int seq_len(const long long* lengths, int b, int T) {
  return lengths ? static_cast<int>(lengths[b]) : T;
}

// One backward step as a whole (every row): the time it handles, and the time whose
// hidden-side dgates its recurrent GEMM reads from the exchange (what the previous backward
// step published; -1 at s = 0, where nothing was). Step s = T is the closing GEMM: no time
// of its own (t = -1), it adds W_hh^T dgates of the last step to dh0.
struct BackwardStep {
  int t;
  int source;
};

GPURNN_HD BackwardStep backward_step(int s, int T, int reverse) {
  BackwardStep st;
  st.t = s < T ? backward_time(s, T, reverse) : -1;
  st.source = s > 0 ? backward_time(s - 1, T, reverse) : -1;
  return st;
}

// One batch row at one backward step: whether the step is inside its sequence, and the row
// indices (t * B + b) of the (T, B, .) tensors it reads and writes: `cur` for dy, y, the
// workspace and dxg / dhn at t; `prev` for the saved state t started from (GRU's h_{t-1}
// in y, LSTM's c_{t-1} in the workspace), -1 where t is the sequence's first step (the state
// is h0 / c0) or not valid. `cur` is a real row for every t in [0, T) (past a sequence's
// end the kernel writes zeros there), -1 at the closing step.
struct BackwardRow {
  bool valid;
  i64 cur;
  i64 prev;
};

GPURNN_HD BackwardRow backward_row(int t, int b, int len, int B, int reverse) {
  BackwardRow r;
  r.valid = step_valid(t, len);
  r.cur = t >= 0 ? static_cast<i64>(t) * B + b : -1;
  const int p = forward_predecessor(t, reverse);
  r.prev = (r.valid && step_valid(p, len)) ? static_cast<i64>(p) * B + b : -1;
  return r;
}

// ------------------------------------------------------------------------- offsets

// Element (row, col) of a (rows, width) row-major tensor: (T, B, width) tensors are
// (T * B, width) here, with row = t * B + b from BackwardRow / forward_row.
GPURNN_HD i64 at(i64 row, int col, i64 rows, int width) {
  GPURNN_CHECK(row >= 0 && row < rows && col >= 0 && col < width);
  return row * width + col;
}

// Row t * B + b of a (T, B, .) tensor, for the forward (every t in [0, T) is written).
GPURNN_HD i64 forward_row(int t, int b, int B) { return static_cast<i64>(t) * B + b; }

// Exchange buffers: two planes of (rows, ldx), plane = step parity. Step s reads plane
// s & 1 and writes plane (s + 1) & 1, so one barrier per step separates the readers of a
// plane from its next writers.
GPURNN_HD i64 exchange_at(int plane, int row, int k, int rows, int ldx) {
  GPURNN_CHECK(plane >= 0 && plane < 2 && row >= 0 && row < rows && k >= 0 && k < ldx);
  return (static_cast<i64>(plane) * rows + row) * ldx + k;
}
GPURNN_HD int read_plane(int step) { return step & 1; }
GPURNN_HD int write_plane(int step) { return (step + 1) & 1; }

// ------------------------------------------------------------------------- K-split layout
//
// The K-split cluster variant (rnn_ksplit.cuh): the grid holds clusters of C CTAs. Clusters
// split the units: cluster q owns units [q * U, (q + 1) * U). The CTAs of a cluster split
// the reduction dimension K (H forward, G * H backward): rank r holds columns
// [r * Kc, (r + 1) * Kc) of its cluster's GEMM rows (Kc a multiple of the mma's k; K padded
// to C * Kc). A cluster's GEMM rows are gate-major forward (row g * U + u: gate g of unit u,
// Gr = G rows a unit) and one per unit backward (Gr = 1); rows past Gr * U pad the m-tiles.
//
// Within a CTA, KW warps share each m-tile, warp w taking k-tiles kt = w % KW (mod KW):
// a cluster row's partial sum arrives from S = C * KW sources (rank, warp's k-group).
// In the epilogue the units are dealt round-robin: unit u belongs to rank u % C, as its
// local unit u / C; with U >= C every rank owns at least one (and so waits for its fills,
// which keeps a fast rank from overwriting a fill another has not read: see the kernel).
struct KSplit {
  int C;   // CTAs per cluster
  int U;   // units per cluster
  int Gr;  // GEMM rows per unit (G forward, 1 backward)
  int KW;  // warps per m-tile
};

GPURNN_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Local units of rank r (ceil((U - r) / C), 0 past U) and the most any rank has.
GPURNN_HD int ksplit_rank_units(const KSplit& p, int r) {
  return r < p.U ? ceil_div(p.U - r, p.C) : 0;
}
GPURNN_HD int ksplit_unit_span(const KSplit& p) { return ceil_div(p.U, p.C); }
GPURNN_HD int ksplit_sources(const KSplit& p) { return p.C * p.KW; }
GPURNN_HD int ksplit_source(const KSplit& p, int rank, int kgroup) { return rank * p.KW + kgroup; }

// Cluster GEMM row m -> (owner rank, owner's local row g * span + u / C); false for rows
// that pad the m-tiles (m >= Gr * U), which nobody receives.
GPURNN_HD bool ksplit_owner(const KSplit& p, int m, int& rank, int& local) {
  if (m < 0 || m >= p.Gr * p.U) return false;
  const int g = m / p.U, u = m % p.U;
  rank = u % p.C;
  local = g * ksplit_unit_span(p) + u / p.C;
  return true;
}

// Local unit lu of rank r -> the cluster's unit (its row of gate g is g * U + unit).
GPURNN_HD int ksplit_unit(const KSplit& p, int r, int lu) { return lu * p.C + r; }

// One fill of a rank's receive buffer: the partial sums of one batch group's GEMM at one
// step, laid out [source][local row][column], columns the group's 8 * N_TILES batch rows.
// Fill f = step * groups + group goes to buffer f & 1; the k-th fill of a buffer is its
// mbarrier's phase k, of parity k & 1.
GPURNN_HD int ksplit_fill(int step, int group, int groups) { return step * groups + group; }
GPURNN_HD int ksplit_buffer(int fill) { return fill & 1; }
GPURNN_HD unsigned ksplit_parity(int fill) { return static_cast<unsigned>(fill >> 1) & 1u; }
GPURNN_HD i64 ksplit_recv_at(const KSplit& p, int buffer, int source, int local, int col,
                             int cols) {
  const int rows = p.Gr * ksplit_unit_span(p), sources = ksplit_sources(p);
  GPURNN_CHECK(buffer >= 0 && buffer < 2 && source >= 0 && source < sources && local >= 0 &&
               local < rows && col >= 0 && col < cols);
  return ((static_cast<i64>(buffer) * sources + source) * rows + local) * cols + col;
}
// Bytes one fill brings rank r (fp32 partial sums of its rows, all columns, every source).
GPURNN_HD unsigned ksplit_fill_bytes(const KSplit& p, int r, int cols) {
  return 4u * ksplit_sources(p) * p.Gr * ksplit_rank_units(p, r) * cols;
}

// Between clusters: each CTA adds 1 to a monotonic counter after its step's exchange stores
// (forward: also once after publishing h0). Step s reads the exchange once the counter
// reaches this (backward step 0 reads nothing: target 0).
GPURNN_HD long long ksplit_barrier_target(int step, int forward, int ctas) {
  return static_cast<long long>(forward ? step + 1 : step) * ctas;
}

}  // namespace gpurnn
