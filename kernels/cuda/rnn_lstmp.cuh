// LSTM with projection (proj_size P) in the grid variant, included by rnn_persistent.cu after
// the grid kernels (it reuses their GEMM, exchange and barrier).
//
// W_hh is (4H, P), W_hr (P, H); a step is h_t = W_hr m_t with m_t = o * tanh(c_t), so it has
// two dependent products and two exchanges, each ended by a grid barrier:
//
//   forward   1. units   block p owns LSTM units [p * kUnits, ...): gates from h_{t-1} (P wide,
//                        the `xbuf` exchange) with its W_hh rows (K = P), the cell, m_t to
//                        the `obuf` exchange (H wide).
//             2. outputs block p owns projected outputs [p * 16, ...): h_t from m_t with its
//                        W_hr rows (K = H), to y and back to `xbuf` for the next step.
//   backward  1. outputs block p owns outputs [p * 16, ...): dh_t = carry + dy_t + W_hh^T
//                        dgates of the step processed before (`obuf`, 4H wide; K = 4H, the
//                        W_hh columns of its outputs), to `dhp` (for dW_hr) and to `xbuf`.
//             2. units   block p owns units: dm = W_hr^T dh_t (K = P, the W_hr columns of its
//                        units), the LSTM gate backward with dm in place of dh, dgates to
//                        dxg and to `obuf` for the next step.
//
// So in both directions the units' GEMM has K = P (`KT` k-tiles, M_TILES m-tiles) and the
// outputs' GEMM is one m-tile of 16 outputs (`KT_OUT` k-tiles, K = H forward, 4H backward).
// Shared memory: [units' fragments | outputs' fragments | red]. Blocks whose output tile
// starts at or past P (P < H, so most of them) skip the outputs' phase but pass its barrier.
//
// Exchanges are double-buffered by step parity as in the plain grid kernels: phase 1 of
// step s reads plane s & 1 of its input and writes plane (s + 1) & 1 of the other buffer,
// which phase 2 reads as "step s + 1"; the barrier after each phase orders every write
// before the reads it feeds. The workspace is the plain LSTM's (i, f, g, o, c): m follows
// from it, so the backend computes dW_hr = sum_t dhp_t^T m_t as one GEMM afterwards.
#pragma once

namespace gpurnn {

struct LstmpForwardArgs {
  const void* xg;            // (T, B, 4H) elements
  const uint4* w_frag;       // (blocks, fragment_uint4s<M_TILES>(KT)) packed W_hh rows
  const uint4* r_frag;       // (out blocks, fragment_uint4s<1>(KT_OUT)) packed W_hr rows
  const long long* lengths;  // (B,) or null
  void* y;                   // (T, B, P) elements
  float* ws;                 // (T, B, 5H) or null (no save)
  float* h_state;            // (B, P) in: h0, out: h_T
  float* c_state;            // (B, H) in: c0, out: c_T
  int T, B, H, P, KT, KT_OUT, reverse;
};

struct LstmpBackwardArgs {
  const uint4* w_frag;       // (blocks, fragment_uint4s<M_TILES>(KT)) packed W_hr columns
  const uint4* r_frag;       // (out blocks, fragment_uint4s<1>(KT_OUT)) packed W_hh columns
  const long long* lengths;
  const float* ws;           // forward workspace (T, B, 5H)
  const void* dy;            // (T, B, P)
  const float* c_init;       // (B, H) c0 as fp32
  void* dxg;                 // (T, B, 4H) out
  void* dhp;                 // (T, B, P) out: gradient of each step's projected h (0 past the end)
  float* dh_state;           // (B, P) in: dh_T, out: dh0
  float* dc_state;           // (B, H) in: dc_T, out: dc0
  int T, B, H, P, KT, KT_OUT, reverse;
};

// Smem pointers of one block: units' fragments, outputs' fragments, red.
template <class Elem, int M_TILES>
struct LstmpSmem {
  uint4* units;
  uint4* outs;
  float* red;
  __device__ __forceinline__ LstmpSmem(uint4* smem, int KT, int KT_OUT)
      : units(smem),
        outs(smem + fragment_uint4s<Elem, M_TILES>(KT)),
        red(reinterpret_cast<float*>(outs + fragment_uint4s<Elem, 1>(KT_OUT))) {}
  // This block's packed weights (forward and backward args alike): the units' fragments,
  // and the outputs' where the block has outputs to project.
  template <class Args>
  __device__ __forceinline__ void load_weights(const Args& a, int block, bool projects) const {
    load_fragments(units, a.w_frag + static_cast<size_t>(block) *
                                         fragment_uint4s<Elem, M_TILES>(a.KT),
                   fragment_uint4s<Elem, M_TILES>(a.KT));
    if (projects)
      load_fragments(outs, a.r_frag + static_cast<size_t>(block) *
                                          fragment_uint4s<Elem, 1>(a.KT_OUT),
                     fragment_uint4s<Elem, 1>(a.KT_OUT));
  }
};

// ------------------------------------------------------------------------- forward

template <class Elem, int M_TILES, int N_TILES>
__device__ __forceinline__ void lstmp_forward_body(const LstmpForwardArgs& a,
                                                   GridExchange<Elem>& hx, GridExchange<Elem>& mx,
                                                   int block, uint4* smem) {
  typedef typename Elem::storage S;
  typedef LstmCell Cell;
  constexpr int G = Cell::kGates;
  constexpr int F = Cell::kFields;
  constexpr int kUnits = (M_TILES * 16) / G;
  constexpr int kOutRows = 16;  // projected outputs per block: one m-tile (PROJ_OUT_ROWS)
  const int T = a.T, B = a.B, H = a.H, P = a.P;
  const int u0 = block * kUnits, p0 = block * kOutRows;
  const bool projects = p0 < P;
  const i64 TB = static_cast<i64>(T) * B;
  const S* xg = static_cast<const S*>(a.xg);
  S* y = static_cast<S*>(a.y);
  const LstmpSmem<Elem, M_TILES> sm(smem, a.KT, a.KT_OUT);
  const int unit_items = kUnits * 8 * N_TILES, out_items = kOutRows * 8 * N_TILES;
  sm.load_weights(a, block, projects);
  // publish h0 (this block's outputs) to plane 0
  for (int r0 = 0; r0 < B; r0 += 8 * N_TILES)
    for (int i = threadIdx.x; i < out_items; i += kThreads) {
      const int b = r0 + i / kOutRows, p = p0 + i % kOutRows;
      if (b < B && p < P) hx.put_initial(b, p, Elem::from_float(a.h_state[at(b, p, B, P)]));
    }
  hx.sync();

  for (int s = 0; s < T; ++s) {
    const int t = forward_time(s, T, a.reverse);
    // phase 1: gates of the own units from h_{t-1}, m_t to the exchange
    for (int r0 = 0; r0 < B; r0 += 8 * N_TILES) {
      group_gemm<Elem, M_TILES, N_TILES>(sm.units, a.KT, hx, s, r0, a.lengths, B, T, t, sm.red);
      __syncthreads();
      for (int i = threadIdx.x; i < unit_items; i += kThreads) {
        const int u = i % kUnits, rr = i / kUnits, nt = rr >> 3, col = rr & 7;
        const int b = r0 + rr, j = u0 + u;
        if (b >= B || j >= H) continue;
        const i64 row = forward_row(t, b, B);
        float m = 0.0f;  // past a sequence's end nothing reads it: phase 2 keeps h
        if (step_valid(t, seq_len(a.lengths, b, T))) {
          float pre[G], x[G], ws[F];
#pragma unroll
          for (int g = 0; g < G; ++g) {
            pre[g] = reduce_red<M_TILES, N_TILES>(sm.red, nt, g * kUnits + u, col);
            x[g] = Elem::to_float(xg[at(row, g * H + j, TB, G * H)]);
          }
          const i64 own = at(b, j, B, H);
          float c = a.c_state[own];
          Cell::forward(pre, x, 0.0f, m, c, ws);  // the cell's "h" is m = o * tanh(c)
          a.c_state[own] = c;
          if (a.ws) {
#pragma unroll
            for (int f = 0; f < F; ++f) a.ws[at(row, f * H + j, TB, F * H)] = ws[f];
          }
        } else if (a.ws) {
#pragma unroll
          for (int f = 0; f < F; ++f) a.ws[at(row, f * H + j, TB, F * H)] = 0.0f;
        }
        mx.put(s, b, j, Elem::from_float(m));
      }
      __syncthreads();  // `red` is reused by the next batch group
    }
    hx.sync();  // every unit's m_t published

    // phase 2: h_t of the own outputs from m_t
    if (projects) {
      for (int r0 = 0; r0 < B; r0 += 8 * N_TILES) {
        group_gemm<Elem, 1, N_TILES>(sm.outs, a.KT_OUT, mx, s + 1, r0, a.lengths, B, T, t, sm.red);
        __syncthreads();
        for (int i = threadIdx.x; i < out_items; i += kThreads) {
          const int o = i % kOutRows, rr = i / kOutRows, nt = rr >> 3, col = rr & 7;
          const int b = r0 + rr, p = p0 + o;
          if (b >= B || p >= P) continue;
          const i64 row = forward_row(t, b, B);
          const i64 own = at(b, p, B, P);
          float h = a.h_state[own];
          if (step_valid(t, seq_len(a.lengths, b, T))) {
            h = reduce_red<1, N_TILES>(sm.red, nt, o, col);
            a.h_state[own] = h;
            y[at(row, p, TB, P)] = Elem::from_float(h);
          } else {
            y[at(row, p, TB, P)] = Elem::from_float(0.0f);  // the state is kept (re-published)
          }
          hx.put(s, b, p, Elem::from_float(h));
        }
        __syncthreads();
      }
    }
    hx.sync();  // every output's h_t published
  }
}

// ------------------------------------------------------------------------- backward

template <class Elem, int M_TILES, int N_TILES>
__device__ __forceinline__ void lstmp_backward_body(const LstmpBackwardArgs& a,
                                                    GridExchange<Elem>& dhx,
                                                    GridExchange<Elem>& dgx, int block,
                                                    uint4* smem) {
  typedef typename Elem::storage S;
  typedef LstmCell Cell;
  constexpr int G = Cell::kGates;
  constexpr int F = Cell::kFields;
  constexpr int kUnits = M_TILES * 16;
  constexpr int kOutRows = 16;  // projected outputs per block: one m-tile (PROJ_OUT_ROWS)
  const int T = a.T, B = a.B, H = a.H, P = a.P;
  const int u0 = block * kUnits, p0 = block * kOutRows;
  const bool projects = p0 < P;
  const i64 TB = static_cast<i64>(T) * B;
  const S* dy = static_cast<const S*>(a.dy);
  S* dxg = static_cast<S*>(a.dxg);
  S* dhp = static_cast<S*>(a.dhp);
  const LstmpSmem<Elem, M_TILES> sm(smem, a.KT, a.KT_OUT);
  const int unit_items = kUnits * 8 * N_TILES, out_items = kOutRows * 8 * N_TILES;
  sm.load_weights(a, block, projects);
  __syncthreads();

  // s = T is the closing GEMM: it adds W_hh^T dgates of the last step to dh0.
  for (int s = 0; s <= T; ++s) {
    const BackwardStep st = backward_step(s, T, a.reverse);
    // phase 1: dh_t of the own outputs
    if (projects) {
      for (int r0 = 0; r0 < B; r0 += 8 * N_TILES) {
        // rows whose source step lay outside their sequence published zeros: they add nothing
        group_gemm<Elem, 1, N_TILES>(sm.outs, a.KT_OUT, dgx, s,
                                     r0, a.lengths, B, T, st.source, sm.red);
        __syncthreads();
        for (int i = threadIdx.x; i < out_items; i += kThreads) {
          const int o = i % kOutRows, rr = i / kOutRows, nt = rr >> 3, col = rr & 7;
          const int b = r0 + rr, p = p0 + o;
          if (b >= B || p >= P) continue;
          const i64 own = at(b, p, B, P);
          const float dh_in = a.dh_state[own] + reduce_red<1, N_TILES>(sm.red, nt, o, col);
          if (s == T) {
            a.dh_state[own] = dh_in;
            continue;
          }
          const BackwardRow row = backward_row(st.t, b, seq_len(a.lengths, b, T), B, a.reverse);
          float dh = 0.0f;
          if (row.valid) {
            dh = dh_in + Elem::to_float(dy[at(row.cur, p, TB, P)]);
            a.dh_state[own] = 0.0f;  // all of it flows through this step's cell
          } else {
            a.dh_state[own] = dh_in;  // nothing happened at this step: carry it on
          }
          dhp[at(row.cur, p, TB, P)] = Elem::from_float(dh);
          dhx.put(s, b, p, Elem::from_float(dh));
        }
        __syncthreads();
      }
    }
    if (s == T) break;
    dhx.sync();  // every output's dh_t published

    // phase 2: dm = W_hr^T dh_t for the own units, the gate backward
    for (int r0 = 0; r0 < B; r0 += 8 * N_TILES) {
      group_gemm<Elem, M_TILES, N_TILES>(sm.units, a.KT, dhx, s + 1,
                                         r0, a.lengths, B, T, st.t, sm.red);
      __syncthreads();
      for (int i = threadIdx.x; i < unit_items; i += kThreads) {
        const int u = i % kUnits, rr = i / kUnits, nt = rr >> 3, col = rr & 7;
        const int b = r0 + rr, j = u0 + u;
        if (b >= B || j >= H) continue;
        const i64 own = at(b, j, B, H);
        const BackwardRow row = backward_row(st.t, b, seq_len(a.lengths, b, T), B, a.reverse);
        float da[G], dhid[G];
        if (row.valid) {
          float ws[F];
#pragma unroll
          for (int f = 0; f < F; ++f) ws[f] = a.ws[at(row.cur, f * H + j, TB, F * H)];
          // c_{t-1}: the forward predecessor's, or c0 at the sequence's first step
          const float c_prev = row.prev < 0 ? a.c_init[own]
                                            : a.ws[at(row.prev, (F - 1) * H + j, TB, F * H)];
          const float dm = reduce_red<M_TILES, N_TILES>(sm.red, nt, u, col);
          float dc = a.dc_state[own], dh_carry;
          Cell::backward(ws, 0.0f, c_prev, 0.0f, dm, dc, da, dhid, dh_carry);
          a.dc_state[own] = dc;
        } else {
#pragma unroll
          for (int g = 0; g < G; ++g) da[g] = dhid[g] = 0.0f;
        }
#pragma unroll
        for (int g = 0; g < G; ++g) {
          dxg[at(row.cur, g * H + j, TB, G * H)] = Elem::from_float(da[g]);
          dgx.put(s, b, g * H + j, Elem::from_float(dhid[g]));
        }
      }
      __syncthreads();
    }
    dhx.sync();  // every unit's dgates published
  }
}

// ------------------------------------------------------------------------- entry points
//
// xbuf: the P-wide exchange (forward h, backward dh), (2, Bpad, ldx); obuf: the outputs'
// GEMM input (forward m, H wide; backward dgates, 4H wide), (2, Bpad, ldo); both zeroed.
// One barrier counter serves both: the exchanges are never synchronised apart.

#define GPURNN_LSTMP_FORWARD_PARAMS                                                            \
  const void *xg, const uint4 *w_frag, const uint4 *r_frag, const long long *lengths, void *y,  \
      float *ws, float *h_state, float *c_state, int T, int B, int H, int P, int KT,            \
      int KT_OUT, int reverse
#define GPURNN_LSTMP_BACKWARD_PARAMS                                                            \
  const uint4 *w_frag, const uint4 *r_frag, const long long *lengths, const float *ws,          \
      const void *dy, const float *c_init, void *dxg, void *dhp, float *dh_state,               \
      float *dc_state, int T, int B, int H, int P, int KT, int KT_OUT, int reverse
#define GPURNN_LSTMP_EXCHANGE_PARAMS \
  void *xbuf, int ldx, void *obuf, int ldo, int Bpad, u32 *sync_counter

template <class Elem, int M_TILES, int N_TILES>
__global__ void __launch_bounds__(kThreads, 1)
    rnn_lstmp_forward_grid(GPURNN_LSTMP_FORWARD_PARAMS, GPURNN_LSTMP_EXCHANGE_PARAMS) {
  extern __shared__ uint4 smem[];
  typedef typename Elem::storage S;
  const LstmpForwardArgs a{xg, w_frag, r_frag, lengths, y, ws, h_state, c_state,
                           T, B, H, P, KT, KT_OUT, reverse};
  GridExchange<Elem> hx{static_cast<S*>(xbuf), Bpad, ldx, GridSync{sync_counter, gridDim.x, 0u}};
  // its barrier is never used: hx's passes for both
  GridExchange<Elem> mx{static_cast<S*>(obuf), Bpad, ldo, GridSync{sync_counter, gridDim.x, 0u}};
  lstmp_forward_body<Elem, M_TILES, N_TILES>(a, hx, mx, blockIdx.x, smem);
}

template <class Elem, int M_TILES, int N_TILES>
__global__ void __launch_bounds__(kThreads, 1)
    rnn_lstmp_backward_grid(GPURNN_LSTMP_BACKWARD_PARAMS, GPURNN_LSTMP_EXCHANGE_PARAMS) {
  extern __shared__ uint4 smem[];
  typedef typename Elem::storage S;
  const LstmpBackwardArgs a{w_frag, r_frag, lengths, ws, dy, c_init, dxg, dhp, dh_state,
                            dc_state, T, B, H, P, KT, KT_OUT, reverse};
  GridExchange<Elem> dhx{static_cast<S*>(xbuf), Bpad, ldx, GridSync{sync_counter, gridDim.x, 0u}};
  // its barrier is never used: dhx's passes for both
  GridExchange<Elem> dgx{static_cast<S*>(obuf), Bpad, ldo, GridSync{sync_counter, gridDim.x, 0u}};
  lstmp_backward_body<Elem, M_TILES, N_TILES>(a, dhx, dgx, blockIdx.x, smem);
}

}  // namespace gpurnn
