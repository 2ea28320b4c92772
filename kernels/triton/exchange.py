"""The exchange protocol: how the programs of one launch hand each other what one step produced
(h forward, dgates backward; m and h in the projected kernels) and know it has arrived.
Device helpers (@triton.jit) and the host's sentinel bit patterns; imports nothing else of
the package (every kernel imports this room, the launchers its sentinel table).

- Exchanged values are written to a buffer with one row per step and read with `.cg` (never
  from L1, so a stale line is never used), or volatile when polled (`_load_exchanged`).
  Stores are relaxed gpu-scope stores (`_store_exchange`), one element each. What PTX
  guarantees and what it does not: the polls read 16-byte vectors (volatile, i.e. relaxed
  system-scope), which overlap several 2-byte stores of other threads. The memory model
  makes two accesses "morally strong" only when they overlap completely, so formally these
  mixed-size pairs are a data race, and PTX promises nothing about which bytes a racing
  vector load sees. What the design relies on is narrower and what the hardware does: an
  aligned element is written whole (single-copy atomic at its own size) and once, so each
  element a load returns is either the sentinel or the final value, never a mix; the check
  is per element, so it never trusts a neighbour. No other data hangs on the exchange (no
  fence, no flag), so nothing else needs ordering.
- With resident weights (POLL) there is no grid barrier: what is exchanged starts as a
  sentinel bit pattern (`_SENTINEL`), is written once, and a program reads its step's inputs
  until nothing it read is the sentinel: the plain kernels check the loaded tiles before
  using them (`_any_pending`, `_pending_tiles`) and load again only what is pending; the
  projected ones compute the product first (`_product_arrived`: a pending element turns
  its row of the product NaN) and compare elements (`_is_pending`) only after a NaN one.
- Elsewhere one grid-wide barrier per step, split in two (`_barrier_arrive` right after the
  exchange stores, `_barrier_wait` after the work that needs nobody else's data: workspace
  stores, the next step's own loads): an atomic counter, relaxed polls, one acquire, bounded
  spin, error flag. With one program, or one step per launch (the per-step fallback), it is
  compiled out, which is what makes the kernels run under TRITON_INTERPRET=1.
- Every wait is bounded in time (`_wait_over`: %globaltimer, the launcher's bound in µs;
  under the interpreter, which has no timer, a count of polls): a timed-out one raises the
  counter to SYNC_ERROR (`_after_wait` for the polls), later waits pass at once, and the
  launcher raises. Launches whose programs wait for each other are cooperative launches, so
  the driver refuses one whose programs cannot all be resident instead of leaving them to
  time out. COUNT_POLLS adds each program's failed polls to its sync buffer's second word
  (`_count_failed_polls`).
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
def _globaltimer():
    """This thread's %globaltimer: nanoseconds, the same clock on every SM."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _barrier_wait(sync_ptr, target, wait_bound, TIMER: tl.constexpr):
    # Split from the arrive so that work that needs nobody else's data (workspace stores, the
    # next step's own loads) overlaps the wait. Every thread polls for itself with relaxed
    # (volatile) loads: no block barrier to broadcast a result, no L1 invalidation per spin;
    # then one gpu-scope acquire orders its next exchange loads after the others' released
    # stores. (One polling thread per program and a block barrier after it measured slower on
    # an H100: 5.9 against 4.1 us per LSTM H=768 B=16 forward step.) Each thread gives up on
    # its own deadline (TIMER: wait_bound µs of %globaltimer; else wait_bound polls).
    cnt = target - 1  # every poll inside the loop (targets are >= 1)
    clock = tl.zeros([], dtype=tl.int64)
    late = 0
    while (cnt < target) & (late == 0):
        cnt = tl.load(sync_ptr, volatile=True)
        if TIMER:
            now = _globaltimer()
            if clock == 0:
                clock = now + wait_bound.to(tl.int64) * 1000
            late = (now > clock).to(tl.int32)
        else:
            clock += 1
            late = (clock > wait_bound).to(tl.int32)
    if cnt < target:
        # timed out: a program is not co-resident (or died). Raise the counter past every
        # target so that no program waits again; the launcher sees it and raises.
        tl.atomic_max(sync_ptr, SYNC_ERROR, sem="relaxed", scope="gpu")
    tl.inline_asm_elementwise(
        "ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [sync_ptr + tl.zeros([1], tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


# Lanes of the polls' clock: at least the threads of a program (plans use at most 8 warps),
# so that the reduction in `_wait_over` sees every thread's own reading of the timer.
CLOCK_LANES: tl.constexpr = tl.constexpr(256)


@triton.jit
def _wait_clock():
    """The state of a poll's time bound before its first miss (see `_wait_over`)."""
    return tl.zeros([], dtype=tl.int64)


@triton.jit
def _wait_over(clock, wait_bound, TIMER: tl.constexpr):
    """After a failed poll: (clock, over), over = 1 once the wait has run past its bound.
    TIMER: clock is the deadline, set at the first miss to wait_bound µs of %globaltimer
    from then. Each thread reads the timer for itself, and the polls' retry loops hold
    block barriers that every thread must leave together, so the time a verdict rests on
    is a block reduction of every thread's reading (one lane each, at least). Without a
    timer (the interpreter) clock counts the failed polls, and the bound is wait_bound."""
    if TIMER:
        now = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l,r", [tl.arange(0, CLOCK_LANES)], dtype=tl.int64,
            is_pure=False, pack=1,
        )  # fmt: skip
        latest = tl.max(now, axis=0)
        clock = tl.where(clock == 0, latest + wait_bound.to(tl.int64) * 1000, clock)
        over = (latest > clock).to(tl.int32)
    else:
        clock = clock + 1
        over = (clock > wait_bound).to(tl.int32)
    return clock, over


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
def _sentinel_mins(acc, x, SENTINEL: tl.constexpr):
    """acc min (x's bits xor the sentinel's), unsigned, per element: 0 where some x so far
    held the sentinel. Inline PTX on whole registers: two instructions per two 16-bit
    elements (min.u16x2, sm_90), or per 32-bit one. Not pure, so that the compiler keeps
    it after the polled loads it follows (placed between them, it held the later loads
    back until the earlier ones had arrived: a round trip each)."""
    if x.dtype.primitive_bitwidth == 16:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; xor.b32 t, $2, $3; min.u16x2 $0, $1, t; }", "=r,r,r,r",
            [acc, x, tl.full(x.shape, SENTINEL, tl.int16)], dtype=tl.int16, is_pure=False, pack=2,
        )  # fmt: skip
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; xor.b32 t, $2, $3; min.u32 $0, $1, t; }", "=r,r,r,r",
            [acc, x, tl.full(x.shape, SENTINEL, tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip


@triton.jit
def _pending_mask(x, SENTINEL: tl.constexpr, ASM: tl.constexpr):
    """Elements of a loaded exchange tile that still hold the sentinel (int: nonzero)."""
    if ASM and x.dtype.primitive_bitwidth <= 32:
        ones = tl.full(x.shape, -1, tl.int16 if x.dtype.primitive_bitwidth == 16 else tl.int32)
        return (_sentinel_mins(ones, x, SENTINEL) == 0).to(tl.int32)
    else:
        return _is_pending(x, SENTINEL).to(tl.int32)


@triton.jit
def _any_pending(tiles, SENTINEL: tl.constexpr, ASM: tl.constexpr):
    """1 when an element of the loaded exchange tiles (a tuple, all of one shape) still holds
    the sentinel (a block reduction: every thread gets the same answer). Exact (a genuine
    NaN is not pending), and cheap with inline PTX: the tiles are folded into one by
    `_sentinel_mins`, two instructions per two 16-bit elements, then compared once."""
    if ASM and tiles[0].dtype.primitive_bitwidth <= 32:
        bits: tl.constexpr = tiles[0].dtype.primitive_bitwidth
        acc = tl.full(tiles[0].shape, -1, tl.int16 if bits == 16 else tl.int32)
        # the last-issued tile first: nothing consumes a load before every load is out
        for i in tl.static_range(len(tiles)):
            acc = _sentinel_mins(acc, tiles[len(tiles) - 1 - i], SENTINEL)
        return tl.max((acc == 0).to(tl.int32))
    else:
        pending = _is_pending(tiles[0], SENTINEL)
        for i in tl.static_range(1, len(tiles)):
            pending = pending | _is_pending(tiles[i], SENTINEL)
        return tl.max(pending.to(tl.int32))


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _pending_tiles(tiles, SENTINEL: tl.constexpr, ASM: tl.constexpr):
    """Bit i set when tile i of the loaded exchange tiles (a tuple of at most 31) holds the
    sentinel (block-uniform): which tiles a poll loads again."""
    bits = _pending_mask(tiles[0], SENTINEL, ASM)
    for i in tl.static_range(1, len(tiles)):
        bits = bits | (_pending_mask(tiles[i], SENTINEL, ASM) << i)
    return tl.reduce(bits, None, _or)


@triton.jit
def _after_wait(arrived, waits_ok, sync_ptr):
    """Whether this program's waits may still spin (1) after one: not once one timed out (a
    program is not co-resident, or died). The launch is then flagged failed (the launcher
    raises) and no later wait spins, so a failed launch ends instead of hanging."""
    if arrived == 0:
        tl.atomic_max(sync_ptr, SYNC_ERROR, sem="relaxed", scope="gpu")
        waits_ok = 0
    return waits_ok


@triton.jit
def _count_failed_polls(sync_ptr, failed_polls):
    """COUNT_POLLS: add this program's failed polls (attempts that found data still on its
    way) to the launch's count, the second word of its sync buffer (the launcher adds it to
    the caller's counter). Off, the kernels compile to what they are without it."""
    tl.atomic_add(sync_ptr + 1, failed_polls, sem="relaxed", scope="gpu")


@triton.jit
def _store_exchange(ptr, value, mask, ASM: tl.constexpr):
    """The exchange store of h_t (dgates). With ASM, a relaxed gpu-scope store per element,
    which others poll with relaxed vector loads (what that does and does not guarantee: the
    module docstring). The interpreter has no inline PTX."""
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
