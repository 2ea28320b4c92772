"""The exchange protocol: how the programs of one launch hand each other what one step produced
(h forward, dgates backward; m and h in the projected kernels) and know it has arrived.
Device helpers (@triton.jit) and the host's sentinel bit patterns; imports nothing else of
the package (every kernel imports this room, the launchers its sentinel table).

- Exchanged values are written to a buffer with one row per step and read with `.cg` (never
  from L1, so a stale line is never used), or volatile when polled (`_load_exchanged`).
  Stores are relaxed gpu-scope stores (`_store_exchange`): others poll these elements with
  relaxed loads, which makes it a well-defined race in the PTX memory model.
- With resident weights (POLL) there is no grid barrier: what is exchanged starts as a
  sentinel bit pattern (`_SENTINEL`), is written once, and a program reads its step's inputs
  until nothing it read is the sentinel (`_is_pending`, `_all_arrived`; or, where a product
  is computed first, `_product_arrived`: a pending element turns its row of the product NaN).
- Elsewhere one grid-wide barrier per step, split in two (`_barrier_arrive` right after the
  exchange stores, `_barrier_wait` after the work that needs nobody else's data: workspace
  stores, the next step's own loads): an atomic counter, relaxed polls, one acquire, bounded
  spin, error flag. With one program, or one step per launch (the per-step fallback), it is
  compiled out, which is what makes the kernels run under TRITON_INTERPRET=1.
- Every wait is bounded: a timed-out one raises the counter to SYNC_ERROR (`_spin_budget`
  for the polls), later waits pass at once, and the launcher raises.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Added to the barrier counter by a program whose wait timed out: every later wait in every
# program then passes at once (the kernel runs to its end with garbage) and the launcher,
# seeing counter >= this, raises. Targets stay below it (checked in `_launch_steps`).
_SYNC_ERROR = 1 << 30
SYNC_ERROR: tl.constexpr = tl.constexpr(_SYNC_ERROR)
# The polled exchanges (h forward, dgates backward) start as these bit patterns, and a
# program waits until no element it reads is one. They are signalling NaNs: arithmetic only
# ever produces quiet NaNs, so a value a kernel writes never equals one. Their payload sits
# in the highest mantissa bits that the tensor cores read (fp32 enters a tf32 MMA without
# its low 13 mantissa bits: a payload there would read as infinity, not NaN), so a pending
# element always makes the product it enters NaN.
_SENTINEL = {torch.bfloat16: 0x7F81, torch.float16: 0x7D00, torch.float32: 0x7FA00000,
             torch.float64: 0x7FF4000000000000}  # fmt: skip
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}  # fmt: skip


@triton.jit
def _barrier_arrive(sync_ptr):
    # Every thread's exchange stores of this step are issued before thread 0 arrives (block
    # barrier); the gpu-scope release publishes them, cumulatively, to the other programs.
    tl.debug_barrier()
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _barrier_wait(sync_ptr, target, spin_max):
    # Split from the arrive so that work that needs nobody else's data (workspace stores, the
    # next step's own loads) overlaps the wait. Every thread polls for itself with relaxed
    # (volatile) loads: no block barrier to broadcast a result, no L1 invalidation per spin;
    # then one gpu-scope acquire orders its next exchange loads after the others' released
    # stores. (One polling thread per program and a block barrier after it measured slower on
    # an H100: 5.9 against 4.1 us per LSTM H=768 B=16 forward step.)
    cnt = target - 1  # every poll inside the loop (targets are >= 1)
    spins = 0
    while (cnt < target) & (spins <= spin_max):
        cnt = tl.load(sync_ptr, volatile=True)
        spins += 1
    if cnt < target:
        # timed out: a program is not co-resident (or died). Raise the counter past every
        # target so that no program waits again; the launcher sees it and raises.
        tl.atomic_max(sync_ptr, SYNC_ERROR, sem="relaxed", scope="gpu")
    tl.inline_asm_elementwise(
        "ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [sync_ptr + tl.zeros([1], tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _is_pending(x, SENTINEL: tl.constexpr):
    """Whether elements of a loaded exchange tile still hold the sentinel (see POLL)."""
    if x.dtype.primitive_bitwidth == 16:
        bits = x.to(tl.int16, bitcast=True)
    elif x.dtype.primitive_bitwidth == 32:
        bits = x.to(tl.int32, bitcast=True)
    else:
        bits = x.to(tl.int64, bitcast=True)
    return bits == SENTINEL


@triton.jit
def _all_arrived(hp, N: tl.constexpr, SENTINEL: tl.constexpr):
    pending = _is_pending(hp[0], SENTINEL)
    for i in tl.static_range(1, N):
        pending = pending | _is_pending(hp[i], SENTINEL)
    return 1 - tl.max(pending.to(tl.int32))  # 1 when every element has arrived


@triton.jit
def _spin_budget(arrived, budget, sync_ptr):
    """What is left of the polls' spin budget after a wait: nothing once one timed out (a
    program is not co-resident, or died). The launch is then flagged failed (the launcher
    raises) and no later wait spins, so a failed launch ends instead of hanging."""
    if arrived == 0:
        tl.atomic_max(sync_ptr, SYNC_ERROR, sem="relaxed", scope="gpu")
        budget = -1
    return budget


@triton.jit
def _store_exchange(ptr, value, mask, ASM: tl.constexpr):
    """The exchange store of h_t (dgates). With ASM, a relaxed gpu-scope store per element:
    others poll these elements with relaxed loads, and a relaxed (morally strong) store makes
    that a well-defined race in the PTX memory model. The interpreter has no inline PTX."""
    if ASM:
        bits: tl.constexpr = value.dtype.primitive_bitwidth
        if bits == 16:
            _store_relaxed(ptr, value.to(tl.int16, bitcast=True), mask, "b16", "h")
        elif bits == 32:
            _store_relaxed(ptr, value.to(tl.int32, bitcast=True), mask, "b32", "r")
        else:
            _store_relaxed(ptr, value.to(tl.int64, bitcast=True), mask, "b64", "l")
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _store_relaxed(ptr, bits, mask, WIDTH: tl.constexpr, REG: tl.constexpr):
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.relaxed.gpu.global." + WIDTH
        + " [$1], $2; mov.u32 $0, 0; }",
        "=r,l," + REG + ",r", [ptr, bits, mask.to(tl.int32)], dtype=tl.int32, is_pure=False,
        pack=1,
    )  # fmt: skip


@triton.jit
def _load_exchanged(p, m, POLL: tl.constexpr):
    """A load of what other programs write during the launch: never from L1 (`.cg`), and
    polled loads volatile as well (read again until they arrive: never hoisted)."""
    if POLL:
        return tl.load(p, mask=m, other=0.0, volatile=True)
    else:
        return tl.load(p, mask=m, other=0.0, cache_modifier=".cg")


@triton.jit
def _product_arrived(prod, complete):
    """Polls: a NaN-free product read nothing pending (a pending element is a NaN and turns
    its row of the product NaN); after a recheck found nothing pending (`complete`), the
    product is final whatever NaNs it holds (they are genuine)."""
    return (1 - tl.max((prod != prod).to(tl.int32))) | complete
