// The cluster variant of the persistent kernels (sm_90), included by rnn_persistent.cu after
// the GEMM, the cells and the grid variant.
//
// When all of W_hh fits in one 8-block thread-block cluster, one cluster runs 8 batch rows
// (block rank r owns units [r * kUnits, ...)), and the step needs no barrier at all:
//
//   - exchange  every block keeps its own copy of X (h_{t-1} forward, the previous step's
//               dgates backward) in shared memory, two fp32 planes by step parity. Each
//               thread sends its new value to the 8 copies with `st.async` (a DSMEM store
//               that completes asynchronously, counting its bytes off the receiving block's
//               mbarrier for that plane). A block waits on its own mbarrier until the bytes
//               of all 8 senders have landed: no cluster barrier, no GPU-scope fence, no L1
//               invalidation on the step's critical path.
//   - reuse     a plane is rewritten two steps after it was read; by then every block has
//               sent (so has finished reading) the step in between, which the writer
//               waited for. The mbarrier phase of a plane's k-th fill has parity k & 1.
//               This needs every receiver to be a sender too: blocks that own no unit
//               (8 * units > H) take no part after setup, and nobody sends to them.
//               tests/test_cluster_protocol.py model-checks the protocol.
//   - prefetch  the next step's inputs (xg forward; dy, the workspace fields and the saved
//               state backward) are loaded right after the current step's cell math, so
//               their latency hides behind the wait and the GEMM.
//   - state     h, c (forward) and dh, dc (backward) stay in registers for the whole launch;
//               each (row, unit) belongs to the same thread at every step.
//
// X is kept in fp32 because st.async stores 32-bit words at least, and a unit's 16-bit
// neighbour may belong to another block; the GEMM rounds each pair to the element type as
// it loads it (cvt.rn, the same value the grid variant's 16-bit exchange holds).
#pragma once

namespace gpurnn {

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
constexpr int kClusterSize = 8;

template <class Elem>
struct AsyncClusterExchange {
  float* planes;   // this block's copy: (2, 8, ldx) fp32, rows relative to row_base
  u64* bars;       // [2]: one mbarrier per plane
  int ldx;         // row stride in floats (K padded; rows land in distinct bank groups)
  int row_base;    // first batch row of this cluster
  int ranks;       // blocks that own units (< H): they alone send and receive
  u32 fill_bytes;  // bytes one fill brings: 4 * (valid rows) * (columns sent)
  u32 parity;      // bit p: parity of the next phase of plane p to wait for
  u32* error;      // global flag: set to 1 when a wait gave up (the launcher raises)
  bool failed;     // this thread's wait gave up: it waits and arms no more

  // All threads. Zeroes the planes (padding must read as 0: it is never sent), initialises
  // and arms both mbarriers, and waits until every block of the cluster has done so.
  __device__ __forceinline__ void init(float* planes_, u64* bars_, int ldx_, int row_base_,
                                       int ranks_, u32 fill_bytes_, u32* error_) {
    planes = planes_, bars = bars_, ldx = ldx_, row_base = row_base_, ranks = ranks_;
    fill_bytes = fill_bytes_, parity = 0u, error = error_, failed = false;
    for (int i = threadIdx.x; i < 2 * 8 * ldx; i += blockDim.x) planes[i] = 0.0f;
    if (threadIdx.x == 0) {
      mbarrier_init(&bars[0], 1);
      mbarrier_init(&bars[1], 1);
      fence_mbarrier_init_cluster();
      // arm the first fill of each plane (its one arrival, and the bytes to expect)
      mbarrier_arrive_expect_tx(&bars[0], fill_bytes);
      mbarrier_arrive_expect_tx(&bars[1], fill_bytes);
    }
    cluster_sync();
  }

  // Wait for the fill that step `step` reads, then arm that plane's next fill (which only
  // starts after every block has passed this one: see "reuse" above). A wait that gives up
  // (a block of the cluster is not running) flags the launch and ends this thread's
  // waiting: the kernel runs to its end on garbage, and the launcher raises. Thread 0 arms
  // only after its own wait succeeded, so a phase is never armed twice.
  __device__ __forceinline__ void wait(int step) {
    const int p = read_plane(step);
    if (!failed && !mbarrier_wait_parity(&bars[p], (parity >> p) & 1u)) {
      failed = true;
      atomicExch(error, 1u);
    }
    parity ^= 1u << p;
    if (threadIdx.x == 0 && !failed) mbarrier_arrive_expect_tx(&bars[p], fill_bytes);
  }

  // (mapa per store rather than 16 addresses held in registers for the whole launch)
  __device__ __forceinline__ void send(int plane, int row, int k, float v) const {
    const float* local = planes + exchange_at(plane, row - row_base, k, 8, ldx);
#pragma unroll
    for (int r = 0; r < kClusterSize; ++r)
      if (r < ranks) st_async_f32(map_shared_rank(local, r), v, map_shared_rank(&bars[plane], r));
  }
  __device__ __forceinline__ void put(int step, int row, int k, float v) const {
    send(write_plane(step), row, k, v);
  }
  __device__ __forceinline__ void put_initial(int row, int k, float v) const {
    send(0, row, k, v);
  }

  // X as block_gemm reads it: 32-bit words of two 16-bit elements (k even), or one fp32.
  struct Reader {
    const float* planes;
    int plane, row0, ldx;
    __device__ __forceinline__ u32 operator()(int r, int k) const {
      const float* p = planes + exchange_at(plane, row0 + r, k, 8, ldx);
      if constexpr (Elem::kBytes == 2) {
        const float2 v = *reinterpret_cast<const float2*>(p);
        return Elem::pack2(v.x, v.y);
      } else {
        return __float_as_uint(*p);
      }
    }
  };
  __device__ __forceinline__ Reader reader(int step) const {
    return Reader{planes, read_plane(step), 0, ldx};
  }
};

// (unit, row) items of a block: item i = threadIdx.x + k * kThreads is unit i % units of
// row i / units, the same thread's at every step.
template <int kUnits>
struct ClusterItems {
  static constexpr int kCount = (kUnits * 8 + kThreads - 1) / kThreads;
  __device__ __forceinline__ static bool get(int k, int u0, int row_base, int B, int H, int& u,
                                             int& rr, int& b, int& j) {
    const int i = threadIdx.x + k * kThreads;
    u = i % kUnits, rr = i / kUnits, b = row_base + rr, j = u0 + u;
    return i < kUnits * 8 && b < B && j < H;
  }
};

template <class Cell, class Elem, int M_TILES>
__device__ __forceinline__ void cluster_forward_body(const ForwardArgs& a,
                                                     AsyncClusterExchange<Elem>& ex,
                                                     int unit_block, uint4* a_smem, float* red) {
  typedef typename Elem::storage S;
  typedef ClusterItems<(M_TILES * 16) / Cell::kGates> Items;
  constexpr int G = Cell::kGates;
  constexpr int F = Cell::kFields;
  constexpr int kUnits = (M_TILES * 16) / G;
  constexpr int kNF = F > 0 ? F : 1;
  constexpr int kItems = Items::kCount;
  const int T = a.T, B = a.B, H = a.H, u0 = unit_block * kUnits, row0 = ex.row_base;
  const i64 TB = static_cast<i64>(T) * B;
  const S* xg = static_cast<const S*>(a.xg);
  S* y = static_cast<S*>(a.y);

  load_fragments(a_smem, a.w_frag + static_cast<size_t>(unit_block) *
                                        fragment_uint4s<Elem, M_TILES>(a.KT),
                 fragment_uint4s<Elem, M_TILES>(a.KT));

  float h[kItems], c[kItems], b_hn[kItems], x[kItems][G];
  int len[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    int u, rr, b, j;
    h[k] = c[k] = b_hn[k] = 0.0f, len[k] = 0;
    if (Items::get(k, u0, row0, B, H, u, rr, b, j)) {
      h[k] = a.h_state[at(b, j, B, H)];
      if (Cell::kHasCell) c[k] = a.c_state[at(b, j, B, H)];
      if (a.b_hn) b_hn[k] = a.b_hn[j];
      len[k] = seq_len(a.lengths, b, T);
      ex.put_initial(b, j, h[k]);
    }
  }
  // xg of step s for the items valid there (issued a step ahead: see the header)
  auto prefetch = [&](int s) {
    const int t = forward_time(s, T, a.reverse);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      int u, rr, b, j;
      if (Items::get(k, u0, row0, B, H, u, rr, b, j) && step_valid(t, len[k])) {
#pragma unroll
        for (int g = 0; g < G; ++g)
          x[k][g] = Elem::to_float(xg[at(forward_row(t, b, B), g * H + j, TB, G * H)]);
      }
    }
  };
  prefetch(0);
  __syncthreads();  // the fragments are in shared memory

  for (int s = 0; s < T; ++s) {
    const int t = forward_time(s, T, a.reverse);
    ex.wait(s);
    if (group_active<1>(a.lengths, row0, B, T, t)) {
      typename AsyncClusterExchange<Elem>::Reader xr[1] = {ex.reader(s)};
      block_gemm<Elem, M_TILES, 1>(a_smem, a.KT, xr, red);
    } else {
      for (int i = threadIdx.x; i < kWarps * M_TILES * 16 * 8; i += kThreads) red[i] = 0.0f;
    }
    __syncthreads();

#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      int u, rr, b, j;
      if (!Items::get(k, u0, row0, B, H, u, rr, b, j)) continue;
      const i64 row = forward_row(t, b, B);
      if (step_valid(t, len[k])) {
        float pre[G], ws[kNF];
#pragma unroll
        for (int g = 0; g < G; ++g) pre[g] = reduce_red<M_TILES, 1>(red, 0, g * kUnits + u, rr);
        Cell::forward(pre, x[k], b_hn[k], h[k], c[k], ws);
        y[at(row, j, TB, H)] = Elem::from_float(h[k]);
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
      if (s + 1 < T) ex.put(s, b, j, h[k]);  // the last step's h has no reader
    }
    if (s + 1 < T) prefetch(s + 1);
    __syncthreads();  // `red` is rewritten by the next step's GEMM
  }

#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    int u, rr, b, j;
    if (Items::get(k, u0, row0, B, H, u, rr, b, j)) {
      a.h_state[at(b, j, B, H)] = h[k];
      if (Cell::kHasCell) a.c_state[at(b, j, B, H)] = c[k];
    }
  }
}

template <class Cell, class Elem, int M_TILES>
__device__ __forceinline__ void cluster_backward_body(const BackwardArgs& a,
                                                      AsyncClusterExchange<Elem>& ex,
                                                      int unit_block, uint4* a_smem,
                                                      float* red) {
  typedef typename Elem::storage S;
  typedef ClusterItems<M_TILES * 16> Items;
  constexpr int G = Cell::kGates;
  constexpr int F = Cell::kFields;
  constexpr int kUnits = M_TILES * 16;
  constexpr int kNF = F > 0 ? F : 1;
  constexpr int kItems = Items::kCount;
  const int T = a.T, B = a.B, H = a.H, u0 = unit_block * kUnits, row0 = ex.row_base;
  const i64 TB = static_cast<i64>(T) * B;
  const S* y = static_cast<const S*>(a.y);
  const S* dy = static_cast<const S*>(a.dy);
  S* dxg = static_cast<S*>(a.dxg);
  S* dhn = static_cast<S*>(a.dhn);

  load_fragments(a_smem, a.w_frag + static_cast<size_t>(unit_block) *
                                        fragment_uint4s<Elem, M_TILES>(a.KT),
                 fragment_uint4s<Elem, M_TILES>(a.KT));

  // per item: the carries, and what the next step reads besides the exchange
  float dh[kItems], dc[kItems], ws[kItems][kNF], dy_t[kItems], h_prev[kItems], c_prev[kItems],
      h_t[kItems];
  int len[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    int u, rr, b, j;
    dh[k] = dc[k] = 0.0f, len[k] = 0;
    if (Items::get(k, u0, row0, B, H, u, rr, b, j)) {
      dh[k] = a.dh_state[at(b, j, B, H)];
      if (Cell::kHasCell) dc[k] = a.dc_state[at(b, j, B, H)];
      len[k] = seq_len(a.lengths, b, T);
    }
  }
  auto prefetch = [&](int s) {
    const int t = backward_time(s, T, a.reverse);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      int u, rr, b, j;
      if (!Items::get(k, u0, row0, B, H, u, rr, b, j)) continue;
      const BackwardRow row = backward_row(t, b, len[k], B, a.reverse);
      if (!row.valid) continue;
      const i64 own = at(b, j, B, H);
#pragma unroll
      for (int f = 0; f < F; ++f) ws[k][f] = a.ws[at(row.cur, f * H + j, TB, F * H)];
      dy_t[k] = Elem::to_float(dy[at(row.cur, j, TB, H)]);
      // the state t started from: its forward predecessor's, or h0 / c0 (row.prev < 0)
      if (Cell::kBackwardReadsH)
        h_prev[k] = row.prev < 0 ? a.h_init[own] : Elem::to_float(y[at(row.prev, j, TB, H)]);
      if (Cell::kHasCell)  // c is the workspace's last field
        c_prev[k] = row.prev < 0 ? a.c_init[own] : a.ws[at(row.prev, (F - 1) * H + j, TB, F * H)];
      if (F == 0) h_t[k] = Elem::to_float(y[at(row.cur, j, TB, H)]);
    }
  };
  prefetch(0);
  __syncthreads();  // the fragments are in shared memory

  // s = T is the closing GEMM: it adds W_hh^T dgates of the last step to dh0.
  for (int s = 0; s <= T; ++s) {
    const BackwardStep st = backward_step(s, T, a.reverse);
    if (s > 0) ex.wait(s);  // step 0 reads nothing
    if (group_active<1>(a.lengths, row0, B, T, st.source)) {
      typename AsyncClusterExchange<Elem>::Reader xr[1] = {ex.reader(s)};
      block_gemm<Elem, M_TILES, 1>(a_smem, a.KT, xr, red);
    } else {
      for (int i = threadIdx.x; i < kWarps * M_TILES * 16 * 8; i += kThreads) red[i] = 0.0f;
    }
    __syncthreads();

#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      int u, rr, b, j;
      if (!Items::get(k, u0, row0, B, H, u, rr, b, j)) continue;
      const float dh_in = dh[k] + reduce_red<M_TILES, 1>(red, 0, u, rr);
      if (s == T) {
        dh[k] = dh_in;
        continue;
      }
      const BackwardRow row = backward_row(st.t, b, len[k], B, a.reverse);
      float da[G], dhid[G];
      if (row.valid) {
        float dh_carry;
        Cell::backward(ws[k], h_prev[k], c_prev[k], h_t[k], dh_in + dy_t[k], dc[k], da, dhid,
                       dh_carry);
        dh[k] = dh_carry;
      } else {
#pragma unroll
        for (int g = 0; g < G; ++g) da[g] = dhid[g] = 0.0f;
        dh[k] = dh_in;  // nothing happened at this step: carry it on
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        dxg[at(row.cur, g * H + j, TB, G * H)] = Elem::from_float(da[g]);
        ex.put(s, b, g * H + j, dhid[g]);  // read by step s + 1 <= T
      }
      if (G == 3 && dhn) dhn[at(row.cur, j, TB, H)] = Elem::from_float(dhid[G - 1]);
    }
    if (s + 1 < T) prefetch(s + 1);
    __syncthreads();
  }

#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    int u, rr, b, j;
    if (Items::get(k, u0, row0, B, H, u, rr, b, j)) {
      a.dh_state[at(b, j, B, H)] = dh[k];
      if (Cell::kHasCell) a.dc_state[at(b, j, B, H)] = dc[k];
    }
  }
}

// Entry points: one cluster of 8 blocks per group of 8 batch rows, grid = 8 * ceil(B / 8).
// ldx: the exchange row stride in floats; error: a zeroed flag, 1 after a wait gave up.
// Dynamic shared memory: [fragments | red | planes
// (2, 8, ldx) fp32 | 2 mbarriers]. Declared only where clusters exist (sm_90+, and the host
// pass of nvcc): older targets reject `__cluster_dims__` even uninstantiated.
template <class Elem, int M_TILES>
struct ClusterSmem {
  float* red;
  float* planes;
  u64* bars;
  __device__ __forceinline__ ClusterSmem(uint4* smem, int KT, int ldx) {
    red = reinterpret_cast<float*>(smem + fragment_uint4s<Elem, M_TILES>(KT));
    planes = red + kWarps * M_TILES * 16 * 8;
    bars = reinterpret_cast<u64*>(planes + 2 * 8 * ldx);
  }
};

template <class Cell, class Elem, int M_TILES>
__global__ void __cluster_dims__(kClusterSize, 1, 1) __launch_bounds__(kThreads, 1)
    rnn_forward_cluster(GPURNN_FORWARD_PARAMS, int ldx, u32* error) {
  extern __shared__ uint4 smem[];
  const ForwardArgs a = GPURNN_FORWARD_ARGS;
  const ClusterSmem<Elem, M_TILES> mem(smem, KT, ldx);
  constexpr int kUnits = (M_TILES * 16) / Cell::kGates;
  const int row0 = static_cast<int>(cluster_id_x()) * 8;
  const int rows = B - row0 < 8 ? B - row0 : 8;
  const int ranks = (H + kUnits - 1) / kUnits, rank = static_cast<int>(cluster_rank());
  AsyncClusterExchange<Elem> ex;
  ex.init(mem.planes, mem.bars, ldx, row0, ranks, 4u * rows * H, error);
  if (rank < ranks) cluster_forward_body<Cell, Elem, M_TILES>(a, ex, rank, smem, mem.red);
  cluster_sync();  // no block leaves while another could still address its shared memory
}

template <class Cell, class Elem, int M_TILES>
__global__ void __cluster_dims__(kClusterSize, 1, 1) __launch_bounds__(kThreads, 1)
    rnn_backward_cluster(GPURNN_BACKWARD_PARAMS, int ldx, u32* error) {
  extern __shared__ uint4 smem[];
  const BackwardArgs a = GPURNN_BACKWARD_ARGS;
  const ClusterSmem<Elem, M_TILES> mem(smem, KT, ldx);
  constexpr int kUnits = M_TILES * 16;
  const int row0 = static_cast<int>(cluster_id_x()) * 8;
  const int rows = B - row0 < 8 ? B - row0 : 8;
  const int ranks = (H + kUnits - 1) / kUnits, rank = static_cast<int>(cluster_rank());
  AsyncClusterExchange<Elem> ex;
  ex.init(mem.planes, mem.bars, ldx, row0, ranks, 4u * rows * Cell::kGates * H, error);
  if (rank < ranks) cluster_backward_body<Cell, Elem, M_TILES>(a, ex, rank, smem, mem.red);
  cluster_sync();
}
#endif  // clusters

}  // namespace gpurnn
