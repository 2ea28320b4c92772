// Persistent recurrence kernels, forward and backward, for every cell (rnn_cells.cuh).
//
// One launch runs all T steps of one (layer, direction) of the primitive
// (gpurnn/backends/base.py). Each block owns `kUnits` hidden units and keeps the matching
// slice of W_hh in shared memory, packed on the host in tensor-core fragment order, for the
// whole launch. Per step, per group of 8*N_TILES batch rows:
//
//   1. GEMM   D[rows x 8n] = A[rows x K] * X[8n x K]^T on mma.sync, the batch in the n=8
//             dimension so that B <= 8 costs one n-tile; K is split across the 8 warps and
//             the partial tiles are summed through shared memory (`red`).
//   2. cell   one thread per (batch row, unit): gate math in fp32, state update, outputs.
//   3. put    the new h (forward) or the hidden-side dgates (backward) go to the exchange.
//   4. sync   all blocks that read that exchange pass a barrier.
//
// Three variants:
//   grid     (here) GridExchange: a (2, Bpad, ldx) global buffer, double-buffered by step
//            parity (one barrier per step suffices: step s reads plane s&1 and writes the
//            other), read through L2 only; the barrier is a grid-wide counter (GridSync), so
//            the launch must be cooperative (every block resident).
//   cluster  (rnn_cluster.cuh, sm_90) the whole W_hh in one 8-block cluster, the exchange
//            in distributed shared memory with asynchronous stores completing on mbarriers:
//            no barrier at all between steps.
//   ksplit   (rnn_ksplit.cuh, sm_90) clusters of C CTAs: clusters split the units, the CTAs
//            of a cluster split K (each loads only its slice of the exchange), partial sums
//            reduced over distributed shared memory, the exchange between clusters in
//            global memory behind a split-phase counter barrier.
//
// Forward  A rows: gate-major within the block (row g*kUnits + u is W_hh row g*H + u0 + u),
//          K = H, X = h_{t-1} rounded to the element type. The fp32 state (h, c) of a
//          (row, unit) lives in global `h_state`/`c_state`, touched only by its owner thread:
//          initialised from h0/c0 by the launcher, left holding h_T/c_T.
// Backward A rows: unit u is column u0 + u of W_hh (K = G*H), X = the previous backward
//          step's hidden-side dgates. `dh_state`/`dc_state` carry what flows to step t-1
//          besides W_hh^T dgates: dh_T/dc_T on entry, dh0/dc0 on exit. One extra GEMM after
//          the last step adds the final W_hh^T dgates term. The GEMM reads the dgates of the
//          step processed just before (t's forward successor); the saved state a step
//          starts from (c_{t-1}, h_{t-1}) is its forward predecessor's (reverse: t + 1).
//
// Every time index and offset comes from rnn_index.cuh (tested on CPU, bounds-checked on
// the GPU under GPURNN_DEBUG_BOUNDS).
//
// A step t is valid for batch row b iff t < lengths[b] (both directions): forward runs
// t = 0..L-1, reverse t = L-1..0. Past the end y = 0, the state is kept (and re-published
// to the exchange), the workspace row and dxg are 0, and dy is never read.
#include "rnn_cells.cuh"
#include "rnn_index.cuh"

namespace gpurnn {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// k-tiles whose X fragments one warp loads before its first mma: enough 32-bit L2 loads in
// flight to cover the latency, few enough registers to stay far from spilling.
constexpr int kPrefetch = 4;

// ------------------------------------------------------------------------- exchanges

template <class Elem>
struct GridExchange {
  typedef typename Elem::storage S;
  S* buf;    // (2, rows, ldx), zero padding in rows >= B and columns >= K
  int rows;  // B padded to the batch group
  int ldx;
  GridSync barrier;

  // r: row within the group starting at row0, k: element column (even for 16-bit types)
  struct Reader {
    const S* buf;
    int plane, row0, rows, ldx;
    __device__ __forceinline__ u32 operator()(int r, int k) const {
      return ld_cg_u32(buf + exchange_at(plane, row0 + r, k, rows, ldx));
    }
  };
  __device__ __forceinline__ Reader reader(int step, int row0) const {
    return Reader{buf, read_plane(step), row0, rows, ldx};
  }
  __device__ __forceinline__ void put(int step, int row, int k, S v) const {
    buf[exchange_at(write_plane(step), row, k, rows, ldx)] = v;
  }
  __device__ __forceinline__ void put_initial(int row, int k, S v) const {
    buf[exchange_at(0, row, k, rows, ldx)] = v;
  }
  __device__ __forceinline__ void sync() { barrier.sync(); }
};

// ------------------------------------------------------------------------- block GEMM

// red[((w * N_TILES + nt) * kRows + row) * 8 + col] = this warp's partial D over its k-tiles.
template <class Elem, int M_TILES, int N_TILES, class Reader>
__device__ __forceinline__ void block_gemm(const uint4* __restrict__ a_frag, int KT,
                                           const Reader (&x)[N_TILES], float* red) {
  typedef MmaTile<Elem> Mma;
  constexpr int kRows = M_TILES * 16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float acc[N_TILES][M_TILES][4];
#pragma unroll
  for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][mt][i] = 0.0f;

  for (int kt0 = warp; kt0 < KT; kt0 += kWarps * kPrefetch) {
    u32 xf[kPrefetch][N_TILES][2];
#pragma unroll
    for (int p = 0; p < kPrefetch; ++p) {
      const int kt = kt0 + p * kWarps;
#pragma unroll
      for (int nt = 0; nt < N_TILES; ++nt) {
        if (kt < KT) {
          Mma::load_x(x[nt], kt * Mma::kK, lane, xf[p][nt]);
        } else {
          xf[p][nt][0] = xf[p][nt][1] = 0u;
        }
      }
    }
#pragma unroll
    for (int p = 0; p < kPrefetch; ++p) {
      const int kt = kt0 + p * kWarps;
      if (kt < KT) {
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          const uint4* a = a_frag + (static_cast<size_t>(mt) * KT + kt) * Mma::kUint4A * 32 + lane;
#pragma unroll
          for (int nt = 0; nt < N_TILES; ++nt) Mma::mma(acc[nt][mt], a, xf[p][nt]);
        }
      }
    }
  }

  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
      float* r = red + (static_cast<size_t>(warp * N_TILES + nt) * kRows + mt * 16 + g) * 8 + 2 * q;
      *reinterpret_cast<float2*>(r) = make_float2(acc[nt][mt][0], acc[nt][mt][1]);
      *reinterpret_cast<float2*>(r + 64) = make_float2(acc[nt][mt][2], acc[nt][mt][3]);
    }
}

template <int M_TILES, int N_TILES>
__device__ __forceinline__ float reduce_red(const float* red, int nt, int row, int col) {
  constexpr int kRows = M_TILES * 16;
  float s = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += red[((w * N_TILES + nt) * kRows + row) * 8 + col];
  return s;
}

// Does any batch row of [row0, row0 + 8*N_TILES) have step t inside its sequence? (t may
// be -1: no step, nothing active)
template <int N_TILES>
__device__ __forceinline__ bool group_active(const long long* lengths, int row0, int B, int T,
                                             int t) {
  int active = 0;
  if (threadIdx.x < 8 * N_TILES) {
    const int b = row0 + threadIdx.x;
    active = (b < B && step_valid(t, seq_len(lengths, b, T))) ? 1 : 0;
  }
  return __syncthreads_or(active) != 0;
}

// red = 0: the partial sums of a block_gemm that has nothing to multiply.
template <int M_TILES, int N_TILES>
__device__ __forceinline__ void zero_red(float* red) {
  for (int i = threadIdx.x; i < kWarps * N_TILES * M_TILES * 16 * 8; i += kThreads) red[i] = 0.0f;
}

// red = this block's fragments times the exchanged vectors of rows [row0, row0 + 8*N_TILES)
// at `step`, or zeros when no row of the group has step t inside its sequence (their
// published vectors are zeros: they add nothing).
template <class Elem, int M_TILES, int N_TILES, class Exchange>
__device__ __forceinline__ void group_gemm(const uint4* frag, int KT, const Exchange& ex,
                                           int step, int row0, const long long* lengths, int B,
                                           int T, int t, float* red) {
  if (group_active<N_TILES>(lengths, row0, B, T, t)) {
    typename Exchange::Reader x[N_TILES];
#pragma unroll
    for (int nt = 0; nt < N_TILES; ++nt) x[nt] = ex.reader(step, row0 + 8 * nt);
    block_gemm<Elem, M_TILES, N_TILES>(frag, KT, x, red);
  } else {
    zero_red<M_TILES, N_TILES>(red);
  }
}

// Copy this block's packed W_hh fragments (n uint4) into shared memory.
__device__ __forceinline__ void load_fragments(uint4* dst, const uint4* __restrict__ src,
                                               int n) {
  for (int i = threadIdx.x; i < n; i += kThreads) dst[i] = __ldg(src + i);
}

template <class Elem, int M_TILES>
__host__ __device__ constexpr int fragment_uint4s(int KT) {
  return M_TILES * KT * MmaTile<Elem>::kUint4A * 32;
}

// ------------------------------------------------------------------------- forward

struct ForwardArgs {
  const void* xg;          // (T, B, G*H) elements
  const uint4* w_frag;     // (blocks, fragment_uint4s) packed W_hh
  const float* b_hn;       // (H,) fp32 or null (GRU only)
  const long long* lengths;  // (B,) or null
  void* y;                 // (T, B, H) elements
  float* ws;               // (T, B, kFields*H) or null (no save)
  float* h_state;          // (B, H) in: h0, out: h_T
  float* c_state;          // (B, H) in: c0, out: c_T (LSTM)
  int T, B, H, KT, reverse;
};

template <class Cell, class Elem, int M_TILES, int N_TILES, class Exchange>
__device__ __forceinline__ void forward_body(const ForwardArgs& a, Exchange& ex, int unit_block,
                                             int row_begin, int row_end, uint4* a_smem,
                                             float* red) {
  typedef typename Elem::storage S;
  constexpr int G = Cell::kGates;
  constexpr int F = Cell::kFields;
  constexpr int kUnits = (M_TILES * 16) / G;
  constexpr int kNF = F > 0 ? F : 1;
  const int T = a.T, B = a.B, H = a.H, u0 = unit_block * kUnits;
  const i64 TB = static_cast<i64>(T) * B;
  const S* xg = static_cast<const S*>(a.xg);
  S* y = static_cast<S*>(a.y);
  const int n_items = kUnits * 8 * N_TILES;  // (unit, row) pairs of one batch group

  load_fragments(a_smem, a.w_frag + static_cast<size_t>(unit_block) *
                                        fragment_uint4s<Elem, M_TILES>(a.KT),
                 fragment_uint4s<Elem, M_TILES>(a.KT));
  // publish h0 (this block's units) to plane 0
  for (int r0 = row_begin; r0 < row_end; r0 += 8 * N_TILES)
    for (int i = threadIdx.x; i < n_items; i += kThreads) {
      const int u = i % kUnits, b = r0 + i / kUnits, j = u0 + u;
      if (b < B && j < H) ex.put_initial(b, j, Elem::from_float(a.h_state[at(b, j, B, H)]));
    }
  ex.sync();

  for (int s = 0; s < T; ++s) {
    const int t = forward_time(s, T, a.reverse);
    for (int r0 = row_begin; r0 < row_end; r0 += 8 * N_TILES) {
      group_gemm<Elem, M_TILES, N_TILES>(a_smem, a.KT, ex, s, r0, a.lengths, B, T, t, red);
      __syncthreads();

      for (int i = threadIdx.x; i < n_items; i += kThreads) {
        // consecutive threads take consecutive units: coalesced xg / y / state accesses
        const int u = i % kUnits, rr = i / kUnits, nt = rr >> 3, col = rr & 7;
        const int b = r0 + rr, j = u0 + u;
        if (b >= B || j >= H) continue;
        const i64 row = forward_row(t, b, B);
        const i64 own = at(b, j, B, H);
        float h = a.h_state[own];
        if (step_valid(t, seq_len(a.lengths, b, T))) {
          float pre[G], x[G], ws[kNF];
#pragma unroll
          for (int g = 0; g < G; ++g) {
            pre[g] = reduce_red<M_TILES, N_TILES>(red, nt, g * kUnits + u, col);
            x[g] = Elem::to_float(xg[at(row, g * H + j, TB, G * H)]);
          }
          float c = Cell::kHasCell ? a.c_state[own] : 0.0f;
          Cell::forward(pre, x, a.b_hn ? a.b_hn[j] : 0.0f, h, c, ws);
          a.h_state[own] = h;
          if (Cell::kHasCell) a.c_state[own] = c;
          y[at(row, j, TB, H)] = Elem::from_float(h);
          if (F > 0 && a.ws) {
#pragma unroll
            for (int f = 0; f < F; ++f) a.ws[at(row, f * H + j, TB, F * H)] = ws[f];
          }
        } else {
          y[at(row, j, TB, H)] = Elem::from_float(0.0f);
          if (F > 0 && a.ws) {
#pragma unroll
            for (int f = 0; f < F; ++f) a.ws[at(row, f * H + j, TB, F * H)] = 0.0f;
          }
        }
        ex.put(s, b, j, Elem::from_float(h));
      }
      __syncthreads();  // `red` is reused by the next batch group
    }
    ex.sync();
  }
}

// ------------------------------------------------------------------------- backward

struct BackwardArgs {
  const uint4* w_frag;     // (blocks, fragment_uint4s) packed W_hh^T
  const long long* lengths;
  const void* y;           // (T, B, H) forward output
  const float* ws;         // forward workspace (LSTM, GRU)
  const void* dy;          // (T, B, H)
  const float* h_init;     // (B, H) h0 as fp32 (GRU)
  const float* c_init;     // (B, H) c0 as fp32 (LSTM)
  void* dxg;               // (T, B, G*H) out
  void* dhn;               // (T, B, H) out: hidden-side dgates of GRU's n block, else null
  float* dh_state;         // (B, H) in: dh_T, out: dh0
  float* dc_state;         // (B, H) in: dc_T, out: dc0 (LSTM)
  int T, B, H, KT, reverse;
};

// One hidden unit j of one batch row at a backward step (`row`): the cell's backward from
// dh_in (the gradient reaching h_t through the next step's recurrent product) and dy, the
// carried dh / dc updated, the step's dgates out in da (input side) and dhid (hidden side,
// what is exchanged). Past a sequence's end nothing happens: zeros, dh carried on.
template <class Cell, class Elem>
__device__ __forceinline__ void backward_unit(const BackwardArgs& a, const BackwardRow& row,
                                              i64 own, int j, i64 TB, float dh_in,
                                              float (&da)[Cell::kGates],
                                              float (&dhid)[Cell::kGates]) {
  typedef typename Elem::storage S;
  constexpr int G = Cell::kGates;
  constexpr int F = Cell::kFields;
  constexpr int kNF = F > 0 ? F : 1;
  const int H = a.H;
  const S* y = static_cast<const S*>(a.y);
  const S* dy = static_cast<const S*>(a.dy);
  if (row.valid) {
    float ws[kNF];
#pragma unroll
    for (int f = 0; f < F; ++f) ws[f] = a.ws[at(row.cur, f * H + j, TB, F * H)];
    // the state step t started from: its forward predecessor's, or h0 / c0 where t is the
    // sequence's first step (row.prev < 0)
    float h_prev = 0.0f, c_prev = 0.0f;
    if (Cell::kBackwardReadsH)
      h_prev = row.prev < 0 ? a.h_init[own] : Elem::to_float(y[at(row.prev, j, TB, H)]);
    if (Cell::kHasCell)  // c is the workspace's last field
      c_prev = row.prev < 0 ? a.c_init[own] : a.ws[at(row.prev, (F - 1) * H + j, TB, F * H)];
    const float h_t = F == 0 ? Elem::to_float(y[at(row.cur, j, TB, H)]) : 0.0f;
    float dc = Cell::kHasCell ? a.dc_state[own] : 0.0f;
    float dh_carry;
    Cell::backward(ws, h_prev, c_prev, h_t, dh_in + Elem::to_float(dy[at(row.cur, j, TB, H)]),
                   dc, da, dhid, dh_carry);
    a.dh_state[own] = dh_carry;
    if (Cell::kHasCell) a.dc_state[own] = dc;
  } else {
#pragma unroll
    for (int g = 0; g < G; ++g) da[g] = dhid[g] = 0.0f;
    a.dh_state[own] = dh_in;  // nothing happened at this step: carry it on
  }
}

template <class Cell, class Elem, int M_TILES, int N_TILES, class Exchange>
__device__ __forceinline__ void backward_body(const BackwardArgs& a, Exchange& ex,
                                              int unit_block, int row_begin, int row_end,
                                              uint4* a_smem, float* red) {
  typedef typename Elem::storage S;
  constexpr int G = Cell::kGates;
  constexpr int kUnits = M_TILES * 16;
  const int T = a.T, B = a.B, H = a.H, u0 = unit_block * kUnits;
  const i64 TB = static_cast<i64>(T) * B;
  S* dxg = static_cast<S*>(a.dxg);
  S* dhn = static_cast<S*>(a.dhn);
  const int n_items = kUnits * 8 * N_TILES;

  load_fragments(a_smem, a.w_frag + static_cast<size_t>(unit_block) *
                                        fragment_uint4s<Elem, M_TILES>(a.KT),
                 fragment_uint4s<Elem, M_TILES>(a.KT));
  __syncthreads();

  // s = T is the closing GEMM: it adds W_hh^T dgates of the last step to dh0.
  for (int s = 0; s <= T; ++s) {
    const BackwardStep st = backward_step(s, T, a.reverse);
    for (int r0 = row_begin; r0 < row_end; r0 += 8 * N_TILES) {
      // rows whose source step lay outside their sequence published zeros: they add nothing
      group_gemm<Elem, M_TILES, N_TILES>(a_smem, a.KT, ex, s, r0, a.lengths, B, T, st.source,
                                         red);
      __syncthreads();

      for (int i = threadIdx.x; i < n_items; i += kThreads) {
        const int u = i % kUnits, rr = i / kUnits, nt = rr >> 3, col = rr & 7;
        const int b = r0 + rr, j = u0 + u;
        if (b >= B || j >= H) continue;
        const i64 own = at(b, j, B, H);
        const float dh_in = a.dh_state[own] + reduce_red<M_TILES, N_TILES>(red, nt, u, col);
        if (s == T) {
          a.dh_state[own] = dh_in;
          continue;
        }
        const BackwardRow row = backward_row(st.t, b, seq_len(a.lengths, b, T), B, a.reverse);
        float da[G], dhid[G];
        backward_unit<Cell, Elem>(a, row, own, j, TB, dh_in, da, dhid);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          dxg[at(row.cur, g * H + j, TB, G * H)] = Elem::from_float(da[g]);
          ex.put(s, b, g * H + j, Elem::from_float(dhid[g]));
        }
        // GRU: the n block's hidden-side dgates (da_n * r) differ from dxg's; dW_hh needs them
        if (G == 3 && dhn) dhn[at(row.cur, j, TB, H)] = Elem::from_float(dhid[G - 1]);
      }
      __syncthreads();
    }
    if (s < T) ex.sync();
  }
}

// ------------------------------------------------------------------------- entry points
//
// Kernel parameters are flat (pointers and 32-bit ints: what CuPy passes with exact C types)
// and gathered into ForwardArgs / BackwardArgs here. Dynamic shared memory: [packed W_hh
// fragments | red | (cluster) exchange planes], each part a multiple of 16 bytes; sizes in
// gpurnn/backends/cupy/plan.py (`shared_bytes`).

#define GPURNN_FORWARD_PARAMS                                                                \
  const void *xg, const uint4 *w_frag, const float *b_hn, const long long *lengths, void *y,  \
      float *ws, float *h_state, float *c_state, int T, int B, int H, int KT, int reverse
#define GPURNN_FORWARD_ARGS \
  ForwardArgs { xg, w_frag, b_hn, lengths, y, ws, h_state, c_state, T, B, H, KT, reverse }
#define GPURNN_BACKWARD_PARAMS                                                              \
  const uint4 *w_frag, const long long *lengths, const void *y, const float *ws,            \
      const void *dy, const float *h_init, const float *c_init, void *dxg, void *dhn,       \
      float *dh_state, float *dc_state, int T, int B, int H, int KT, int reverse
#define GPURNN_BACKWARD_ARGS                                                                  \
  BackwardArgs {                                                                              \
    w_frag, lengths, y, ws, dy, h_init, c_init, dxg, dhn, dh_state, dc_state, T, B, H, KT, \
        reverse                                                                               \
  }

template <class Elem, int M_TILES>
__device__ __forceinline__ float* red_after_fragments(uint4* smem, int KT) {
  return reinterpret_cast<float*>(smem + fragment_uint4s<Elem, M_TILES>(KT));
}

// Grid variant: blockIdx.x owns units [x * kUnits, ...) for every batch row; all blocks
// must be resident (cooperative launch). xbuf: (2, Bpad, ldx) zero-initialised.
template <class Cell, class Elem, int M_TILES, int N_TILES>
__global__ void __launch_bounds__(kThreads, 1)
    rnn_forward_grid(GPURNN_FORWARD_PARAMS, void* xbuf, int ldx, int Bpad, u32* sync_counter) {
  extern __shared__ uint4 smem[];
  const ForwardArgs a = GPURNN_FORWARD_ARGS;
  GridExchange<Elem> ex{static_cast<typename Elem::storage*>(xbuf), Bpad, ldx,
                        GridSync{sync_counter, gridDim.x, 0u}};
  forward_body<Cell, Elem, M_TILES, N_TILES>(a, ex, blockIdx.x, 0, B, smem,
                                             red_after_fragments<Elem, M_TILES>(smem, KT));
}

template <class Cell, class Elem, int M_TILES, int N_TILES>
__global__ void __launch_bounds__(kThreads, 1)
    rnn_backward_grid(GPURNN_BACKWARD_PARAMS, void* xbuf, int ldx, int Bpad, u32* sync_counter) {
  extern __shared__ uint4 smem[];
  const BackwardArgs a = GPURNN_BACKWARD_ARGS;
  GridExchange<Elem> ex{static_cast<typename Elem::storage*>(xbuf), Bpad, ldx,
                        GridSync{sync_counter, gridDim.x, 0u}};
  backward_body<Cell, Elem, M_TILES, N_TILES>(a, ex, blockIdx.x, 0, B, smem,
                                              red_after_fragments<Elem, M_TILES>(smem, KT));
}

}  // namespace gpurnn

// LSTM with projection (grid variant only): the same GEMM, exchange and barrier, two phases
// per step.
#include "rnn_lstmp.cuh"

// The sm_90 cluster variant: the same GEMM and cells, its own step loop.
#include "rnn_cluster.cuh"

// The sm_90 K-split cluster variant: clusters split the units, their CTAs split K.
#include "rnn_ksplit.cuh"
