// The K-split cluster variant of the persistent kernels (sm_90), included by
// rnn_persistent.cu after the cells, the GEMM tiles and the grid variant.
//
// The grid holds clusters of C CTAs (template parameter: __cluster_dims__). Clusters split the
// units, the CTAs of a cluster split the reduction dimension K; the layout is
// rnn_index.cuh's `KSplit` (one CTA holds its cluster's rows over its K slice only). Per step,
// per group of 8 * N_TILES batch rows:
//
//   1. GEMM    each warp multiplies its m-tiles over its share of the CTA's k-tiles (KW warps
//              per m-tile) by the CTA's K slice of X (h_{t-1} forward, the previous step's
//              dgates backward), read from a global exchange through L2: each CTA loads
//              only its slice, 1/C of what a grid block loads.
//   2. reduce  each lane sends its accumulator pairs with `st.async` to the rank that owns
//              the row, into that rank's receive buffer (two by fill parity); the stores
//              count their bytes off the owner's mbarrier. The owner waits for its fill
//              (every source's bytes), arms the buffer's next fill, and sums the C * KW
//              partials of its units in a fixed order.
//   3. cell    one thread per (owned unit, batch row): gate math in fp32, state in global
//              h_state / c_state (dh_state / dc_state) touched only by its owner thread,
//              outputs, and the new h (dgates) into the exchange's other plane.
//   4. sync    after the step's exchange stores every CTA adds 1 to a monotonic global
//              counter (release); the next step reads the exchange once the counter reaches
//              its target (acquire): `ksplit_barrier_target`.
//
// Why the receive buffers are safe to reuse: a rank sends fill f + 2 only after its own
// wait for fill f + 1 completed, which needs every rank's stores of f + 1, which each rank
// issues only after its epilogue of f (a block barrier separates them). So a buffer is
// overwritten only once its owner has read it, provided every rank owns a unit and waits
// (the planner keeps U >= C). tests/test_ksplit_protocol.py models all of this in float64.
//
// Waits are bounded (kSpinMax polls): one that gives up raises the counter to kSyncError,
// after which no wait in any CTA spins again; the launcher sees the counter and raises.
#pragma once

namespace gpurnn {

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// Counter value of a launch in which a wait gave up (targets stay below it: the launcher
// checks (T + 1) * CTAs < kSyncError).
constexpr u32 kSyncError = 1u << 30;

// Split-phase barrier between clusters on a monotonic counter (zeroed by the launcher).
struct KSplitBarrier {
  u32* counter;

  // All threads, after this CTA's exchange stores: the block barrier orders them before
  // thread 0's release.
  __device__ __forceinline__ void arrive() const {
    __syncthreads();
    if (threadIdx.x == 0)
      asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
  }

  // All threads: returns once `target` arrivals have happened (or a wait gave up).
  __device__ __forceinline__ void wait(long long target) const {
    if (target > 0 && threadIdx.x == 0) {
      const u32 want = static_cast<u32>(target);
      u32 seen = 0;
      for (u32 spins = 0; spins < kSpinMax; ++spins) {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
        if (seen >= want) break;
      }
      if (seen < want) fail(counter);
    }
    __syncthreads();
  }

  static __device__ __forceinline__ void fail(u32* counter) {
    asm volatile("red.relaxed.gpu.global.max.u32 [%0], %1;" ::"l"(counter), "r"(kSyncError)
                 : "memory");
  }
};

// X as the warp GEMM reads it: row r of the group at row0, element column k of this CTA's
// slice (k0 = rank * Kc), 32-bit words through L2.
template <class Elem>
struct KSliceReader {
  typedef typename Elem::storage S;
  const S* buf;
  int plane, row0, rows, ldx, k0;
  __device__ __forceinline__ u32 operator()(int r, int k) const {
    return ld_cg_u32(buf + exchange_at(plane, row0 + r, k0 + k, rows, ldx));
  }
};

// This CTA's receive buffers (2 fills of [source][local row][column] fp32) and mbarriers,
// and where this lane's accumulator rows go.
template <int MW>
struct KSplitReduce {
  float* recv;
  u64* bars;
  KSplit p;
  int cols;         // 8 * N_TILES
  u32 fill_bytes;   // what one fill brings this rank
  u32* counter;     // the launch's counter: kSyncError flags a wait that gave up
  bool failed;      // this thread's wait gave up: it waits and arms no more
  int dst_rank[MW][2];   // owner of this lane's rows mt*16 + g (+8), -1: padding row
  int dst_local[MW][2];  // their local rows at the owner
  int source;

  // All threads. Initialises and arms both mbarriers, and waits until every CTA of the
  // cluster has (after which any of them may send).
  __device__ __forceinline__ void init(float* recv_, u64* bars_, const KSplit& p_, int cols_,
                                       int rank, u32* counter_) {
    recv = recv_, bars = bars_, p = p_, cols = cols_, counter = counter_, failed = false;
    fill_bytes = ksplit_fill_bytes(p, rank, cols);
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    const int mslot = warp / p.KW;
    source = ksplit_source(p, rank, warp % p.KW);
#pragma unroll
    for (int i = 0; i < MW; ++i)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int m = (mslot * MW + i) * 16 + g + 8 * half;
        int r, local;
        if (ksplit_owner(p, m, r, local)) {
          dst_rank[i][half] = r, dst_local[i][half] = local;
        } else {
          dst_rank[i][half] = -1, dst_local[i][half] = 0;
        }
      }
    if (threadIdx.x == 0) {
      mbarrier_init(&bars[0], 1);
      mbarrier_init(&bars[1], 1);
      fence_mbarrier_init_cluster();
      mbarrier_arrive_expect_tx(&bars[0], fill_bytes);
      mbarrier_arrive_expect_tx(&bars[1], fill_bytes);
    }
    cluster_sync();
  }

  // This warp's partial sums of one fill to their owners (columns 2q, 2q + 1 of each n-tile).
  template <int N_TILES>
  __device__ __forceinline__ void send(const float (&acc)[N_TILES][MW][4], int fill) const {
    const int q = threadIdx.x & 3, buffer = ksplit_buffer(fill);
#pragma unroll
    for (int i = 0; i < MW; ++i)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = dst_rank[i][half];
        if (r < 0) continue;
        const u32 bar = map_shared_rank(&bars[buffer], r);
#pragma unroll
        for (int nt = 0; nt < N_TILES; ++nt) {
          const float* local =
              recv + ksplit_recv_at(p, buffer, source, dst_local[i][half], nt * 8 + 2 * q, cols);
          st_async_v2_f32(map_shared_rank(local, r), acc[nt][i][2 * half],
                          acc[nt][i][2 * half + 1], bar);
        }
      }
  }

  // All threads: wait for `fill`, then (thread 0) arm its buffer's next fill.
  __device__ __forceinline__ void wait(int fill) {
    const int buffer = ksplit_buffer(fill);
    if (!failed && !mbarrier_wait_parity(&bars[buffer], ksplit_parity(fill))) {
      failed = true;
      KSplitBarrier::fail(counter);
    }
    if (threadIdx.x == 0 && !failed) mbarrier_arrive_expect_tx(&bars[buffer], fill_bytes);
  }

  // Sum of the partials of local row `local`, column `col` of `fill`, sources in order.
  __device__ __forceinline__ float sum(int fill, int local, int col) const {
    const int buffer = ksplit_buffer(fill);
    float s = 0.0f;
    for (int src = 0; src < ksplit_sources(p); ++src)
      s += recv[ksplit_recv_at(p, buffer, src, local, col, cols)];
    return s;
  }
};

// acc = this warp's m-tiles (mslot * MW + i) times X over the k-tiles kt = kgroup (mod KW)
// of this CTA's KT; zeros where the group has nothing to multiply.
template <class Elem, int MW, int N_TILES>
__device__ __forceinline__ void ksplit_warp_gemm(const uint4* __restrict__ a_frag, int KT, int KW,
                                                 const KSliceReader<Elem> (&x)[N_TILES],
                                                 bool active, float (&acc)[N_TILES][MW][4]) {
  typedef MmaTile<Elem> Mma;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int mslot = warp / KW, kgroup = warp % KW;
#pragma unroll
  for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
    for (int i = 0; i < MW; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][i][e] = 0.0f;
  if (!active) return;
  for (int kt0 = kgroup; kt0 < KT; kt0 += KW * kPrefetch) {
    u32 xf[kPrefetch][N_TILES][2];
#pragma unroll
    for (int pf = 0; pf < kPrefetch; ++pf) {
      const int kt = kt0 + pf * KW;
#pragma unroll
      for (int nt = 0; nt < N_TILES; ++nt) {
        if (kt < KT) {
          Mma::load_x(x[nt], kt * Mma::kK, lane, xf[pf][nt]);
        } else {
          xf[pf][nt][0] = xf[pf][nt][1] = 0u;
        }
      }
    }
#pragma unroll
    for (int pf = 0; pf < kPrefetch; ++pf) {
      const int kt = kt0 + pf * KW;
      if (kt < KT) {
#pragma unroll
        for (int i = 0; i < MW; ++i) {
          const int mt = mslot * MW + i;
          const uint4* a = a_frag + (static_cast<size_t>(mt) * KT + kt) * Mma::kUint4A * 32 + lane;
#pragma unroll
          for (int nt = 0; nt < N_TILES; ++nt) Mma::mma(acc[nt][i], a, xf[pf][nt]);
        }
      }
    }
  }
}

// The launch's extra arguments (after the forward / backward ones): the exchange, the
// counter, and the layout.
struct KSplitArgs {
  void* xbuf;    // (2, rows, ldx) elements, zeroed (its padding must read as 0)
  int ldx;       // C * Kc
  int rows;      // B padded to the batch group
  u32* counter;  // zeroed
  int units;     // U: units per cluster
  int k_warps;   // KW
};

// Shared memory: [A fragments (m_tiles * KT) | 2 receive fills | 2 mbarriers].
template <class Elem, int MW, int N_TILES>
struct KSplitSmem {
  uint4* frag;
  float* recv;
  u64* bars;
  __device__ __forceinline__ KSplitSmem(uint4* smem, const KSplit& p, int m_tiles, int KT) {
    frag = smem;
    recv = reinterpret_cast<float*>(smem + m_tiles * KT * MmaTile<Elem>::kUint4A * 32);
    const int fill = ksplit_sources(p) * p.Gr * ksplit_unit_span(p) * 8 * N_TILES;
    bars = reinterpret_cast<u64*>(recv + 2 * fill);
  }
};

template <class Cell, class Elem, int C, int MW, int N_TILES>
__device__ __forceinline__ void ksplit_forward_body(const ForwardArgs& a, const KSplitArgs& k,
                                                    uint4* smem) {
  typedef typename Elem::storage S;
  constexpr int G = Cell::kGates;
  constexpr int F = Cell::kFields;
  constexpr int kNF = F > 0 ? F : 1;
  constexpr int kCols = 8 * N_TILES;
  const int T = a.T, B = a.B, H = a.H, KT = a.KT;
  const i64 TB = static_cast<i64>(T) * B;
  const KSplit p{C, k.units, G, k.k_warps};
  const int m_tiles = kWarps / p.KW * MW;
  const int rank = static_cast<int>(cluster_rank());
  const int cluster = static_cast<int>(blockIdx.x) / C;
  const int ctas = static_cast<int>(gridDim.x);
  const int span = ksplit_unit_span(p), owned = ksplit_rank_units(p, rank);
  const int k0 = rank * KT * MmaTile<Elem>::kK;  // this CTA's K slice starts here
  const S* xg = static_cast<const S*>(a.xg);
  S* y = static_cast<S*>(a.y);
  S* xbuf = static_cast<S*>(k.xbuf);
  const KSplitBarrier barrier{k.counter};
  const KSplitSmem<Elem, MW, N_TILES> mem(smem, p, m_tiles, KT);

  const int n_frag = m_tiles * KT * MmaTile<Elem>::kUint4A * 32;
  load_fragments(mem.frag, a.w_frag + static_cast<size_t>(blockIdx.x) * n_frag, n_frag);
  KSplitReduce<MW> red;
  red.init(mem.recv, mem.bars, p, kCols, rank, k.counter);

  // (owned unit, batch row) items: item i is local unit i % owned of column i / owned
  const int n_items = owned * kCols;
  for (int i = threadIdx.x; i < owned * B; i += kThreads) {  // publish h0
    const int j = cluster * p.U + ksplit_unit(p, rank, i % owned), b = i / owned;
    if (j < H)
      xbuf[exchange_at(0, b, j, k.rows, k.ldx)] = Elem::from_float(a.h_state[at(b, j, B, H)]);
  }
  barrier.arrive();

  const int groups = ceil_div(B, kCols);
  for (int s = 0; s < T; ++s) {
    const int t = forward_time(s, T, a.reverse);
    barrier.wait(ksplit_barrier_target(s, 1, ctas));
    for (int grp = 0; grp < groups; ++grp) {
      const int r0 = grp * kCols, fill = ksplit_fill(s, grp, groups);
      // (its block barrier also ends the previous group's epilogue before these sends)
      const bool active = group_active<N_TILES>(a.lengths, r0, B, T, t);
      KSliceReader<Elem> x[N_TILES];
#pragma unroll
      for (int nt = 0; nt < N_TILES; ++nt)
        x[nt] = KSliceReader<Elem>{xbuf, read_plane(s), r0 + 8 * nt, k.rows, k.ldx, k0};
      float acc[N_TILES][MW][4];
      ksplit_warp_gemm<Elem, MW, N_TILES>(mem.frag, KT, p.KW, x, active, acc);
      red.template send<N_TILES>(acc, fill);
      red.wait(fill);

      for (int i = threadIdx.x; i < n_items; i += kThreads) {
        const int lu = i % owned, cc = i / owned, b = r0 + cc;
        const int j = cluster * p.U + ksplit_unit(p, rank, lu);
        if (b >= B || j >= H) continue;
        const i64 row = forward_row(t, b, B);
        const i64 own = at(b, j, B, H);
        float h = a.h_state[own];
        if (step_valid(t, seq_len(a.lengths, b, T))) {
          float pre[G], xv[G], ws[kNF];
#pragma unroll
          for (int g = 0; g < G; ++g) {
            pre[g] = red.sum(fill, g * span + lu, cc);
            xv[g] = Elem::to_float(xg[at(row, g * H + j, TB, G * H)]);
          }
          float c = Cell::kHasCell ? a.c_state[own] : 0.0f;
          Cell::forward(pre, xv, a.b_hn ? a.b_hn[j] : 0.0f, h, c, ws);
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
        xbuf[exchange_at(write_plane(s), b, j, k.rows, k.ldx)] = Elem::from_float(h);
      }
    }
    barrier.arrive();
  }
}

template <class Cell, class Elem, int C, int MW, int N_TILES>
__device__ __forceinline__ void ksplit_backward_body(const BackwardArgs& a, const KSplitArgs& k,
                                                     uint4* smem) {
  typedef typename Elem::storage S;
  constexpr int G = Cell::kGates;
  constexpr int kCols = 8 * N_TILES;
  const int T = a.T, B = a.B, H = a.H, KT = a.KT;
  const i64 TB = static_cast<i64>(T) * B;
  const KSplit p{C, k.units, 1, k.k_warps};
  const int m_tiles = kWarps / p.KW * MW;
  const int rank = static_cast<int>(cluster_rank());
  const int cluster = static_cast<int>(blockIdx.x) / C;
  const int ctas = static_cast<int>(gridDim.x);
  const int owned = ksplit_rank_units(p, rank);
  const int k0 = rank * KT * MmaTile<Elem>::kK;  // this CTA's K slice starts here
  S* dxg = static_cast<S*>(a.dxg);
  S* dhn = static_cast<S*>(a.dhn);
  S* xbuf = static_cast<S*>(k.xbuf);
  const KSplitBarrier barrier{k.counter};
  const KSplitSmem<Elem, MW, N_TILES> mem(smem, p, m_tiles, KT);

  const int n_frag = m_tiles * KT * MmaTile<Elem>::kUint4A * 32;
  load_fragments(mem.frag, a.w_frag + static_cast<size_t>(blockIdx.x) * n_frag, n_frag);
  KSplitReduce<MW> red;
  red.init(mem.recv, mem.bars, p, kCols, rank, k.counter);

  const int n_items = owned * kCols;
  const int groups = ceil_div(B, kCols);
  // s = T is the closing GEMM: it adds W_hh^T dgates of the last step to dh0.
  for (int s = 0; s <= T; ++s) {
    const BackwardStep st = backward_step(s, T, a.reverse);
    barrier.wait(ksplit_barrier_target(s, 0, ctas));
    for (int grp = 0; grp < groups; ++grp) {
      const int r0 = grp * kCols, fill = ksplit_fill(s, grp, groups);
      // rows whose source step lay outside their sequence published zeros: they add nothing
      const bool active = group_active<N_TILES>(a.lengths, r0, B, T, st.source);
      KSliceReader<Elem> x[N_TILES];
#pragma unroll
      for (int nt = 0; nt < N_TILES; ++nt)
        x[nt] = KSliceReader<Elem>{xbuf, read_plane(s), r0 + 8 * nt, k.rows, k.ldx, k0};
      float acc[N_TILES][MW][4];
      ksplit_warp_gemm<Elem, MW, N_TILES>(mem.frag, KT, p.KW, x, active, acc);
      red.template send<N_TILES>(acc, fill);
      red.wait(fill);

      for (int i = threadIdx.x; i < n_items; i += kThreads) {
        const int lu = i % owned, cc = i / owned, b = r0 + cc;
        const int j = cluster * p.U + ksplit_unit(p, rank, lu);
        if (b >= B || j >= H) continue;
        const i64 own = at(b, j, B, H);
        const float dh_in = a.dh_state[own] + red.sum(fill, lu, cc);
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
          xbuf[exchange_at(write_plane(s), b, g * H + j, k.rows, k.ldx)] =
              Elem::from_float(dhid[g]);
        }
        if (G == 3 && dhn) dhn[at(row.cur, j, TB, H)] = Elem::from_float(dhid[G - 1]);
      }
    }
    if (s < T) barrier.arrive();
  }
}

// Entry points: grid = clusters * C CTAs, one per SM (not a cooperative launch: the planner
// keeps the grid within what can be resident, and a wait that gives up reports it).
// KT: k-tiles per CTA (its K slice). Declared only where clusters exist (sm_90+, and the
// host pass of nvcc).
#define GPURNN_KSPLIT_PARAMS \
  void *xbuf, int ldx, int Bpad, u32 *sync_counter, int units, int k_warps
#define GPURNN_KSPLIT_ARGS \
  KSplitArgs { xbuf, ldx, Bpad, sync_counter, units, k_warps }

template <class Cell, class Elem, int C, int MW, int N_TILES>
__global__ void __cluster_dims__(C, 1, 1) __launch_bounds__(kThreads, 1)
    rnn_forward_ksplit(GPURNN_FORWARD_PARAMS, GPURNN_KSPLIT_PARAMS) {
  extern __shared__ uint4 smem[];
  ksplit_forward_body<Cell, Elem, C, MW, N_TILES>(GPURNN_FORWARD_ARGS, GPURNN_KSPLIT_ARGS, smem);
  cluster_sync();  // no CTA leaves while another could still address its shared memory
}

template <class Cell, class Elem, int C, int MW, int N_TILES>
__global__ void __cluster_dims__(C, 1, 1) __launch_bounds__(kThreads, 1)
    rnn_backward_ksplit(GPURNN_BACKWARD_PARAMS, GPURNN_KSPLIT_PARAMS) {
  extern __shared__ uint4 smem[];
  ksplit_backward_body<Cell, Elem, C, MW, N_TILES>(GPURNN_BACKWARD_ARGS, GPURNN_KSPLIT_ARGS,
                                                   smem);
  cluster_sync();
}
#endif  // clusters

}  // namespace gpurnn
