// Building blocks of the persistent recurrence kernels (rnn_persistent.cu).
//
// Header-free on purpose: NVRTC on a user's machine (the pip `nvidia-cuda-nvrtc` wheel, no
// CUDA toolkit) has no include path, so there is no <cuda_fp16.h>, <cuda_bf16.h> or
// <cooperative_groups.h>. 16-bit types are raw uint16 storage converted with `cvt`, and the
// grid and cluster barriers are the few PTX instructions cooperative_groups would emit.
//
// Contents:
//   Elem types      F16 / BF16 / F32 storage tags with load/store conversions to fp32
//   MmaTile<Elem>   one warp-level tensor-core tile D[16x8] += A[16xK] * X[8xK]^T:
//                   m16n8k16 f16/bf16, or 3xTF32 m16n8k8 for fp32 (fp32-accurate)
//   GridSync        software grid barrier (needs a cooperative launch: every block resident)
//   cluster         sm_90 thread-block-cluster barrier, mbarriers, asynchronous DSMEM stores
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// ------------------------------------------------------------------------------ elements

struct F16 {
  typedef u16 storage;
  static constexpr int kBytes = 2;
  static __device__ __forceinline__ float to_float(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
  }
  static __device__ __forceinline__ u16 from_float(float f) {
    u16 v;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
  }
  // two values rounded as from_float does, `lo` in the low half (the lower address)
  static __device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 v;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(v) : "f"(hi), "f"(lo));
    return v;
  }
};

struct BF16 {
  typedef u16 storage;
  static constexpr int kBytes = 2;
  static __device__ __forceinline__ float to_float(u16 v) {
    return __uint_as_float(static_cast<u32>(v) << 16);
  }
  static __device__ __forceinline__ u16 from_float(float f) {
    u16 v;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
  }
  static __device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 v;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(v) : "f"(hi), "f"(lo));
    return v;
  }
};

struct F32 {
  typedef float storage;
  static constexpr int kBytes = 4;
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float f) { return f; }
};

// L2-only load: the exchange buffers are rewritten by other blocks every other step, and
// L1 is not coherent across SMs, so a line cached two steps ago would be stale.
__device__ __forceinline__ u32 ld_cg_u32(const void* p) {
  u32 v;
  asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// ------------------------------------------------------------------------- fast math
// Gate math in fp32. ex2.approx-based exp keeps the epilogue short (it sits on the
// per-step critical path); relative error ~2^-22, far below the bf16/fp16 outputs' and
// inside the fp32 tolerance.
__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + __expf(-x)); }
__device__ __forceinline__ float tanhf_(float x) {
  // 2*sigmoid(2x) - 1 saturates cleanly to +-1 at large |x| (no inf/inf).
  return 2.0f / (1.0f + __expf(-2.0f * x)) - 1.0f;
}

// ------------------------------------------------------------------------ mma tiles
//
// A fragments are packed on the host (gpurnn/backends/cupy/pack.py: `pack_fragments`) in the
// order the tensor cores read them: for m-tile mt and k-tile kt, lane l's 4 registers are
// one uint4 at [(mt * KT + kt) * kUint4A * 32 + lane] -> one conflict-free 16-byte
// shared-memory load per lane per mma. X (the exchanged state, 8 batch rows x K, row
// stride ldx elements) is read straight from its buffer as 32-bit words.
//
// Accumulator layout (both shapes): lane l = 4*g + q holds
//   c[0], c[1] = D[g][2q], D[g][2q+1];   c[2], c[3] = D[g+8][2q], D[g+8][2q+1]
// with D's rows the tile's A rows and its columns the 8 batch rows.

template <class Elem>
struct MmaTile;

template <class Elem16>
struct MmaTile16 {
  static constexpr int kK = 16;       // k per mma
  static constexpr int kUint4A = 1;   // uint4 of A per lane per (mt, kt)
  // X fragment: X[g][k0 + 2q .. +1] and X[g][k0 + 2q + 8 .. +1]
  template <class Load>
  static __device__ __forceinline__ void load_x(const Load& load, int k0, int lane, u32 (&x)[2]) {
    const int g = lane >> 2, q = lane & 3;
    x[0] = load(g, k0 + 2 * q);
    x[1] = load(g, k0 + 2 * q + 8);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint4* a, const u32 (&x)[2]);
};

template <>
__device__ __forceinline__ void MmaTile16<F16>::mma(float (&c)[4], const uint4* a,
                                                    const u32 (&x)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a->x), "r"(a->y), "r"(a->z), "r"(a->w), "r"(x[0]), "r"(x[1]));
}

template <>
__device__ __forceinline__ void MmaTile16<BF16>::mma(float (&c)[4], const uint4* a,
                                                     const u32 (&x)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a->x), "r"(a->y), "r"(a->z), "r"(a->w), "r"(x[0]), "r"(x[1]));
}

template <>
struct MmaTile<F16> : MmaTile16<F16> {};
template <>
struct MmaTile<BF16> : MmaTile16<BF16> {};

// fp32: three tf32 mmas (hi*hi + hi*lo + lo*hi) recover ~fp32 accuracy; the A halves are
// split on the host (two uint4 per lane per tile: hi, then lo), X's in registers here.
__device__ __forceinline__ u32 tf32_round(float f) {
  u32 r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
  return r;
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint4& a, u32 x0, u32 x1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(x0), "r"(x1));
}

template <>
struct MmaTile<F32> {
  static constexpr int kK = 8;
  static constexpr int kUint4A = 2;
  // X fragment: X[g][k0 + q] and X[g][k0 + q + 4]
  template <class Load>
  static __device__ __forceinline__ void load_x(const Load& load, int k0, int lane, u32 (&x)[2]) {
    const int g = lane >> 2, q = lane & 3;
    x[0] = load(g, k0 + q);
    x[1] = load(g, k0 + q + 4);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint4* a, const u32 (&x)[2]) {
    const u32 hi0 = tf32_round(__uint_as_float(x[0]));
    const u32 hi1 = tf32_round(__uint_as_float(x[1]));
    const u32 lo0 = __float_as_uint(__uint_as_float(x[0]) - __uint_as_float(hi0));
    const u32 lo1 = __float_as_uint(__uint_as_float(x[1]) - __uint_as_float(hi1));
    const uint4 a_hi = a[0], a_lo = a[32];  // hi and lo planes are 32 lanes apart
    mma_tf32(c, a_lo, hi0, hi1);
    mma_tf32(c, a_hi, lo0, lo1);
    mma_tf32(c, a_hi, hi0, hi1);
  }
};

// ------------------------------------------------------------------------- barriers

// Grid-wide barrier on a monotonically increasing counter (zeroed by the launcher before
// each launch). Correct only when every block is resident, which the cooperative launch
// guarantees (the driver refuses a grid that cannot be). The block barrier before the
// arrive orders the whole block's stores; release/acquire at gpu scope publishes them.
struct GridSync {
  u32* counter;
  u32 n_blocks;
  u32 generation;  // barriers passed so far

  __device__ __forceinline__ void sync() {
    __syncthreads();
    generation += 1;
    if (threadIdx.x == 0) {
      const u32 target = generation * n_blocks;
      asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
      u32 seen;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
      } while (static_cast<int>(seen - target) < 0);
    }
    __syncthreads();
  }
};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
// Thread-block cluster (sm_90): every thread arrives with release semantics and waits with
// acquire, so shared-memory stores into any block of the cluster (DSMEM) are visible after.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;"
               ::: "memory");
}

__device__ __forceinline__ u32 cluster_rank() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

__device__ __forceinline__ u32 cluster_id_x() {
  u32 r;
  asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
  return r;
}

__device__ __forceinline__ u32 shared_addr(const void* local) {
  return static_cast<u32>(__cvta_generic_to_shared(local));
}

// Address of `local` (this block's shared memory) in block `rank` of the cluster.
__device__ __forceinline__ u32 map_shared_rank(const void* local, u32 rank) {
  u32 remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(shared_addr(local)),
               "r"(rank));
  return remote;
}

// mbarrier (a 64-bit shared-memory word) that completes a phase once its expected arrivals
// have arrived and the bytes announced with expect_tx have landed (transaction count 0).
__device__ __forceinline__ void mbarrier_init(u64* bar, u32 arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_addr(bar)), "r"(arrivals)
               : "memory");
}

// Makes initialised mbarriers visible to the other blocks of the cluster (before a cluster
// barrier, after which they may signal them).
__device__ __forceinline__ void fence_mbarrier_init_cluster() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// One arrival that also announces `bytes` more to land in the current phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(u64* bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_addr(bar)),
               "r"(bytes)
               : "memory");
}

// Polls (mbarrier try_wait or a global load) before a wait gives up: each try_wait may
// suspend the thread for a while, so 2^22 of them is seconds, where a step takes
// microseconds. A wait that gives up means a CTA is not running (not co-resident, or it
// died): the kernel flags the launch failed, stops waiting, and the launcher raises.
constexpr u32 kSpinMax = 1u << 22;

// Waits until the phase of parity `parity` has completed, at most kSpinMax polls; false if
// it gave up. The bytes a phase tracks (st.async from any block of the cluster, like a
// multicast TMA copy) are visible to this block once it completes, so the default acquire
// at CTA scope suffices; a cluster-scope acquire would add an L1 invalidation (CCTL.IVALL)
// to every step.
__device__ __forceinline__ bool mbarrier_wait_parity(u64* bar, u32 parity) {
  const u32 addr = shared_addr(bar);
  for (u32 spins = 0; spins < kSpinMax; ++spins) {
    u32 done;
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
    if (done) return true;
  }
  return false;
}

// Asynchronous 4-byte store into a cluster block's shared memory that, on landing, counts
// its bytes off that block's mbarrier `remote_bar` (both addresses from map_shared_rank).
// No fence and no cluster barrier: the receiver learns of it from its own mbarrier.
__device__ __forceinline__ void st_async_f32(u32 remote_addr, float v, u32 remote_bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [%0], %1, [%2];" ::"r"(
                   remote_addr),
               "f"(v), "r"(remote_bar)
               : "memory");
}

// The same for two adjacent floats (8 bytes, 8-byte aligned).
__device__ __forceinline__ void st_async_v2_f32(u32 remote_addr, float a, float b,
                                                u32 remote_bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];" ::"r"(
          remote_addr),
      "f"(a), "f"(b), "r"(remote_bar)
      : "memory");
}
#endif
