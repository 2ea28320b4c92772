"""How a recurrence is laid out on the device: `Plan`, `make_plan` (and `_make_proj_plan` for
the LSTM with projection), the byte budgets they use, and `_fit`, which checks a plan against
the compiled kernel's real shared memory, registers and spills. Host code; imports no kernel
(`_fit` compiles the kernel the launcher hands it). `_plan_kw` turns a plan into the kernels'
compile-time arguments.

- Grid (n_h, n_b). Program (p, q) owns hidden units [p*BH, p*BH+BH) for batch rows
  [q*BLOCK_B, q*BLOCK_B+BLOCK_B) (16, 32 or 64 rows: one mma tile up to a wgmma tile): all G
  gate rows of W_hh for those units (forward, as one (H, GP*BH) tile with the gates side by
  side along N), or the matching G*H x BH column block (backward). RESIDENT: loaded once
  before the time loop (Triton keeps them in shared memory), as a tuple of KC-row chunks;
  else streamed from L2 in KC chunks every step.
- ON_CHIP (small layers: W_hh whole fits one program): one program per batch tile owns every
  unit, so h_{t-1} (backward: the dgates) never leaves its registers: no exchange buffer, no
  grid barrier. Batch tiles are independent.
- Otherwise h_{t-1} (backward: dgates) is exchanged between programs (see exchange.py):
  polled with resident weights (`poll`), else through one grid barrier per step.
- Persistent (one launch, all steps) when the programs of a batch tile fit the GPU at once
  (the batch tiles in turns, `b_chunk`, when not all do); else one launch per step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton

# Weights kept on chip live in shared memory (Triton stages a `tl.dot` operand loaded before
# the loop there and re-reads it with ldmatrix every step), so plans are budgeted in bytes of
# shared memory, then checked against what the compiled kernel really takes (`_fit`).
# The budget leaves room for the scratch of the dots' layout conversions.
RESIDENT_SMEM = 160 * 1024
# Bytes per thread that the backward's dgates loads of one round trip may hold in flight
# (registers): CHUNKS_PER_TRIP K chunks of every gate. 64 registers (two 128-wide chunks of
# an LSTM at B=16 on 4 warps); more spilled on sm_90, and a spill made the LSTM H=768
# backward step 18 us on an H100.
INFLIGHT_BYTES = 256
KC_GPU = 128  # K chunk of resident dots: 6 independent chains at H=768
KC_16ROWS = 64  # K chunk of 16-row forward tiles (and RNN backward): 4-deep MMA chains
BATCH_TILES = (16, 32, 64)  # rows per program: one m16 mma tile up to a 64-row wgmma tile


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class Plan:
    """How one recurrence is laid out on the device (see module docstring)."""

    BH: int  # hidden units per program
    BLOCK_B: int  # batch rows per program
    n_h: int
    n_b: int
    resident: bool  # weights loaded once (True) or streamed per step in KC chunks
    persistent: bool  # one launch with a grid barrier per step (else one launch per step)
    KC: int = KC_GPU  # K chunk of the recurrent dots
    num_warps: int = 4
    on_chip: bool = False  # one program owns every unit: no exchange, no grid barrier
    chunks_per_trip: int = 1  # backward: K chunks (all gates) whose loads are issued together
    BP: int = 0  # LSTM with projection: projected outputs per program (0: no projection)
    # resident weights: poll the exchanged rows (h, dgates) instead of a grid barrier
    poll: bool = False
    # persistent: batch tiles per launch (0: all). Batch tiles are independent, so when the
    # grid would not fit the GPU at once, persistent launches take the tiles in turns.
    b_chunk: int = 0
    # polled backward: each K chunk of the dgates split in this many slabs, (gate x slab) the
    # batch of the 3-D dot (one per warp: 4 gates x 2 slabs on 8 warps)
    k_split: int = 1

    @property
    def tiles_per_launch(self) -> int:
        return min(self.n_b, self.b_chunk) if self.b_chunk else self.n_b

    @property
    def nprog(self) -> int:
        """Programs of one launch (they must all be resident at once when persistent)."""
        return self.n_h * self.tiles_per_launch


def _element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def weight_bytes(H: int, G: int, BH: int, KC: int, dtype: torch.dtype, backward: bool) -> int:
    """Shared memory the resident weights of one program take: forward a (NKC*KC, GP*BH)
    fused gate tile, backward G (NKC*KC, BH) column blocks of W_hh."""
    k = triton.cdiv(H, KC) * KC
    n = G * BH if backward else _next_pow2(G) * BH
    return k * n * _element_size(dtype)


def on_chip_bytes(H: int, G: int, dtype: torch.dtype, backward: bool) -> int:
    """Shared memory of W_hh whole, padded to powers of two, as one program holds it."""
    hp = _next_pow2(H)
    return (G if backward else _next_pow2(G)) * hp * hp * _element_size(dtype)


def _batch_tile(B: int) -> int:
    for bb in BATCH_TILES:
        if B <= bb:
            return bb
    return BATCH_TILES[-1]


def make_plan(
    H: int,
    B: int,
    G: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    backward: bool = False,
    BH: int | None = None,
    BLOCK_B: int | None = None,
    KC: int | None = None,
    resident: bool | None = None,
    persistent: bool | None = None,
    on_chip: bool | None = None,
    num_warps: int | None = None,
    chunks_per_trip: int | None = None,
    sm_count: int | None = None,
    proj_size: int | None = None,
    BP: int | None = None,
    poll: bool | None = None,
    b_chunk: int | None = None,
    k_split: int | None = None,
) -> Plan:
    """Pick tiling and mode from sizes (the launchers then check it against the compiled
    kernel, `_fit`). Keyword overrides exist for tests and tuning.

    GPU, in order of preference:
    1. on chip: W_hh whole fits one program's shared memory (16-bit LSTM/GRU H <= 128, RNN
       H <= 256): one program per batch tile, h (backward: dgates) stays in registers, no
       exchange buffer and no grid barrier.
    2. persistent: BLOCK_B rows (16, 32 or 64) x BH units (8..64, the smallest keeping the
       grid within one program per SM) per program, weights resident in shared memory when
       they fit RESIDENT_SMEM, else streamed from L2 each step. When even BH=64 leaves more
       programs than SMs, the batch tiles take turns (`b_chunk` per launch).
    3. one launch per step, when not even one batch tile's programs fit the SMs.
    With resident weights the kernels poll what they exchange (h forward, dgates backward)
    instead of waiting at a grid barrier (`poll`, POLL in the kernels).
    `sm_count` stands in for the device's SM count (planning for a GPU without one).
    `proj_size` (LSTM with projection): see `_make_proj_plan`."""
    if proj_size:
        return _make_proj_plan(H, proj_size, B, dtype, device, backward=backward, BH=BH, BP=BP,
                               BLOCK_B=BLOCK_B, KC=KC, resident=resident, persistent=persistent,
                               num_warps=num_warps, chunks_per_trip=chunks_per_trip,
                               sm_count=sm_count, poll=poll)  # fmt: skip
    es = _element_size(dtype)
    hp = _next_pow2(H)
    if device.type != "cuda":
        # interpreter: one program covering everything unless a test asks otherwise
        bb = BLOCK_B or max(2, _next_pow2(B))
        bh = BH or max(2, hp)
        kc = KC or max(16, min(64, hp))
        n_h, n_b = triton.cdiv(H, bh), triton.cdiv(B, bb)
        res = True if resident is None else resident
        per_launch = min(n_b, b_chunk) if b_chunk else n_b
        pers = (n_h * per_launch == 1) if persistent is None else persistent
        if pers and n_h * per_launch > 1:
            raise ValueError("the interpreter runs programs one after another: a grid barrier "
                             "across several programs would never complete")  # fmt: skip
        chip = (n_h == 1 and pers and res) if on_chip is None else on_chip
        return Plan(bh, bb, n_h, n_b, res, pers, kc, num_warps or 4, chip, chunks_per_trip or 2,
                    poll=True if poll is None else poll, b_chunk=b_chunk or 0,
                    k_split=k_split or 1)  # fmt: skip

    sms = sm_count or torch.cuda.get_device_properties(device).multi_processor_count
    bb = BLOCK_B or _batch_tile(B)
    n_b = triton.cdiv(B, bb)
    gp = G if backward else _next_pow2(G)
    if on_chip is None:
        on_chip = (BH is None and hp <= 256 and bb * gp * hp <= 16 * 1024
                   and on_chip_bytes(H, G, dtype, backward) <= RESIDENT_SMEM)  # fmt: skip
    if on_chip:
        # accumulator (BLOCK_B, GP*HP) fp32: 8 warps above 2048 elements (4 spilled at
        # LSTM H=128 on sm_90)
        nw = num_warps or (4 if bb * gp * hp <= 2048 else 8)
        return Plan(hp, bb, 1, n_b, True, True, hp, nw, True, G)

    bh = BH
    if bh is None:
        bh = 8
        while triton.cdiv(H, bh) * n_b > sms and bh < 64:
            bh *= 2
    n_h = triton.cdiv(H, bh)
    # batch tiles in turns when they do not all fit; one launch per step if not even one does
    if b_chunk is None:
        b_chunk = 0 if n_h * n_b <= sms else sms // n_h
    fits = n_h <= sms
    pers = fits if persistent is None else (persistent and fits)
    # backward: narrower chunks for taller batch tiles, so one chunk of every gate's dgates
    # stays within the registers INFLIGHT_BYTES allows (64 rows x 128 spilled on sm_90).
    # Forward, 16-row tiles: 64-wide chunks, i.e. H/64 independent MMA chains 4 deep (at 128
    # ptxas interleaves only two or three of the 8-deep chains: 15 MMAs in a row at H=768).
    # Backward RNN (one gate, so every warp holds the whole (16, 8) tile) likewise.
    if backward:
        kc_default = KC_16ROWS if (G == 1 and bb == 16) else max(32, KC_GPU * 16 // bb)
    else:
        kc_default = KC_16ROWS if bb == 16 else KC_GPU
    kc = KC or min(kc_default, hp)
    if resident is None:
        resident = weight_bytes(H, G, bh, kc, dtype, backward) <= RESIDENT_SMEM
    if not resident and KC is None:
        kc = stream_kc(G, bh, backward, dtype)
    # Forward: 4 warps for 16-row tiles in 16-bit, one (16, 8) output tile each (8 warps
    # computed every tile twice); with independent chunk accumulators all of a step's h
    # loads still go out in one wave (with one chained accumulator ptxas held most of them
    # back). 8 for taller tiles and fp32 (registers: 4 spilled).
    # Backward 4 (resident, up to 32 rows): a 3-D dot over the gates gives each warp a gate;
    # more warps would repeat MMAs (the first kernels: every warp computed the one (16, 8)
    # output tile, 18 us per LSTM H=768 step on an H100 with 8 warps). 64-row tiles and
    # streamed weights need 8 warps' registers (4 spilled on sm_90).
    # Backward: as many K chunks' dgates loads per trip as INFLIGHT_BYTES per thread allow.
    if poll is None:
        # backward 64-row tiles: the poll's retry loop spilled registers on sm_90
        poll = not (backward and bb == 64)
    # Polled backward of a gated cell (up to 32 rows): 8 warps, each K chunk split in two
    # slabs, (gate x slab) the 3-D dot's batch: one per warp, no warp repeating another's
    # MMAs, and each thread holding half as much of a chunk's dgates, so that a step's loads
    # go out in two waves (at 4 warps the registers held two chunks a wave: 3 waves, 5 in
    # the SASS, at 255 registers).
    ks = k_split
    if ks is None:
        ks = 2 if (backward and resident and poll and bb <= 32 and G >= 2 and es <= 4
                   and num_warps in (None, 8) and kc % 32 == 0) else 1  # fmt: skip
    if ks > 1 and KC is None and bb == 16:
        # K chunks of 2 x 16 columns: one 16-byte load per thread per chunk (8 warps, 16 rows),
        # so a wave's sentinel check, which folds its chunks element by element, waits for the
        # wave's last load first (with 128-wide chunks, 4 loads per thread each, ptxas began
        # checking between them and held the rest back: 6 waves where the source has 2)
        kc = 32 * 16 // bb
    nw = num_warps or (8 if ks > 1 else 4 if (backward and resident and bb <= 32)
                       or (not backward and bb == 16 and es == 2) else 8)  # fmt: skip
    per_chunk = _next_pow2(G) * bb * kc * es
    nkc = triton.cdiv(H, kc)
    cpt = chunks_per_trip or max(1, min(nkc, INFLIGHT_BYTES * 32 * nw // per_chunk))
    cpt = triton.cdiv(nkc, triton.cdiv(nkc, cpt))  # the same number of trips, evened out
    return Plan(bh, bb, n_h, n_b, resident, pers, kc, nw, False, cpt, poll=poll, b_chunk=b_chunk,
                k_split=ks)  # fmt: skip


def proj_weight_bytes(
    H: int, P: int, BH: int, BP: int, KC: int, dtype: torch.dtype, backward: bool
) -> int:
    """Shared memory of one program's resident weights, LSTM with projection: forward
    W_hh^T (P, 4*BH) and W_hr^T (H, BP); backward W_hh (4H, BP) and W_hr (P, BH) (K padded
    to whole KC chunks)."""
    kp = triton.cdiv(P, KC) * KC
    kh = triton.cdiv(H, KC) * KC
    if backward:
        return (4 * kh * BP + kp * BH) * _element_size(dtype)
    return (kp * 4 * BH + kh * BP) * _element_size(dtype)


# Shared memory for the exchange loads of one trip of the projected forward: every loaded
# K chunk of m (or h) is staged there for its dot (seen in the sm_90 compile: BLOCK_B x H
# bytes when a step loaded all of m at once, 128 KB at B=64, H=1024, bf16)
PROJ_STAGE_BYTES = 32 * 1024


def _make_proj_plan(H, P, B, dtype, device, *, backward, BH, BP, BLOCK_B, KC, resident,
                    persistent, num_warps, chunks_per_trip, sm_count,
                    poll=None) -> Plan:  # fmt: skip
    """Plan of the projected LSTM kernels: n_h programs (per batch tile) own BH units each
    for the gates and BP projected outputs each for the projection (the smallest power of
    two >= 8, 2 in the interpreter, that covers P with n_h programs; programs past P idle in
    that phase). Weights resident when they fit RESIDENT_SMEM, else streamed every step.
    Persistent (two grid barriers per step) when one batch tile's programs fit on the device
    at once (the batch tiles in turns when not all do); else one launch per phase of each
    step. Never on chip: the projection needs the
    exchange of m even with one program."""
    hp = _next_pow2(H)
    if device.type != "cuda":
        bb = BLOCK_B or max(2, _next_pow2(B))
        bh = BH or max(2, hp)
        n_h, n_b = triton.cdiv(H, bh), triton.cdiv(B, bb)
        bp = BP or max(2, _next_pow2(triton.cdiv(P, n_h)))
        kc = KC or max(16, min(64, hp))
        res = True if resident is None else resident
        pers = (n_h * n_b == 1) if persistent is None else persistent
        if pers and n_h * n_b > 1:
            raise ValueError("the interpreter runs programs one after another: a grid barrier "
                             "across several programs would never complete")  # fmt: skip
        return Plan(bh, bb, n_h, n_b, res, pers, kc, num_warps or 4, False,
                    chunks_per_trip or 2, bp, poll=True if poll is None else poll)  # fmt: skip
    sms = sm_count or torch.cuda.get_device_properties(device).multi_processor_count
    bb = BLOCK_B or _batch_tile(B)
    n_b = triton.cdiv(B, bb)
    bh = BH
    if bh is None:
        bh = 8
        while triton.cdiv(H, bh) * n_b > sms and bh < 64:
            bh *= 2
    n_h = triton.cdiv(H, bh)
    bp = BP or max(8, _next_pow2(triton.cdiv(P, n_h)))
    # batch tiles in turns when they do not all fit (as `make_plan`)
    b_chunk = 0 if n_h * n_b <= sms else sms // n_h
    fits = n_h <= sms
    pers = fits if persistent is None else (persistent and fits)
    kc = KC or min(KC_GPU if not backward else max(32, KC_GPU * 16 // bb), max(16, hp))
    if resident is None:
        resident = proj_weight_bytes(H, P, bh, bp, kc, dtype, backward) <= RESIDENT_SMEM
    if not resident and KC is None:
        kc = stream_kc(4, max(bh, bp), backward, dtype)
    nw = num_warps or (4 if backward and resident and bb <= 32 else 8)
    if backward:  # dgates chunks of every gate, as in the unprojected backward
        per_chunk = 4 * bb * kc * _element_size(dtype)
        cpt = min(triton.cdiv(H, kc), INFLIGHT_BYTES * 32 * nw // per_chunk)
    else:  # m (h) chunks, staged in shared memory; a power of two (the 3-D dot's batch)
        cpt = min(triton.cdiv(H, kc), PROJ_STAGE_BYTES // (bb * kc * _element_size(dtype)))
        cpt = 1 << max(0, cpt.bit_length() - 1)
    if poll is None:
        # 64-row tiles barrier-synchronised: polled, their loads went out in several times
        # as many waves on sm_90 (forward 5 -> 13 a step, more than two barriers cost)
        poll = bb < 64
    plan = Plan(bh, bb, n_h, n_b, resident, pers, kc, nw, False, chunks_per_trip or max(1, cpt), bp,
                poll=poll, b_chunk=b_chunk)  # fmt: skip
    assert plan.n_h * plan.BP >= P, plan
    return plan


def stream_kc(G: int, BH: int, backward: bool, dtype: torch.dtype = torch.bfloat16) -> int:
    """K chunk when weights are streamed: each thread holds a (KC, N) weight chunk and its
    pointers, KC*N/128 of each; wider N needs shorter chunks to stay spill-free on sm_90
    (values found with gpurnn.bench.sm90)."""
    if backward:
        return 64 if (BH <= 8 or _element_size(dtype) <= 2) else 16
    return max(16, min(64, 4096 // (_next_pow2(G) * BH)))


_FIT_CACHE: dict = {}


def _fit(kernel, plan: Plan, args, kw, device) -> Plan:
    """The plan checked against the compiled kernel (GPU only): shared memory within the
    device's limit and no spills, else stream the weights; persistent launches only as many
    batch tiles as can be resident at once (all their programs), counting programs per SM
    from the kernel's real shared memory and registers (so two per SM where they fit); one
    launch per step only if not even one batch tile's programs can."""
    if device.type != "cuda":
        return plan
    # keyed by the device as well (its name, SMs and memory decide the fit): a host with
    # different GPUs fits a plan for each
    index = device.index if device.index is not None else torch.cuda.current_device()
    props_t = torch.cuda.get_device_properties(index)
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else id(kernel), plan,
           tuple(sorted((k, str(v)) for k, v in kw.items())), args[0].dtype, index,
           props_t.name, props_t.multi_processor_count)  # fmt: skip
    if key in _FIT_CACHE:
        return _FIT_CACHE[key]
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    max_smem = props["max_shared_mem"]
    sm_smem = props_t.shared_memory_per_multiprocessor
    sms = props_t.multi_processor_count
    fitted = plan
    for _ in range(4):  # a few downgrades at most
        grid = (fitted.n_h, fitted.tiles_per_launch)
        try:
            sync = torch.zeros(2, dtype=torch.int32, device=device)
            pkw = _plan_kw(fitted, kw)
            k = kernel.warmup(*args, sync, 1, 1, 1, 0, 1, 1, grid=grid,
                              USE_BARRIER=_uses_barrier(fitted, pkw),
                              num_warps=fitted.num_warps, num_stages=1,
                              launch_cooperative_grid=_cooperative(fitted), **pkw)  # fmt: skip
            k._init_handles()
            ok = k.metadata.shared <= max_smem and getattr(k, "n_spills", 0) == 0
        except triton.runtime.errors.OutOfResources:
            ok, k = False, None
        if ok or fitted.on_chip:
            break
        bwd = "CHUNKS_PER_TRIP" in kw
        if k is not None and k.n_spills and fitted.chunks_per_trip > 1 and bwd:
            # spilled: fewer dgates loads in flight first
            fitted = Plan(**{**fitted.__dict__, "chunks_per_trip": fitted.chunks_per_trip // 2})
        elif fitted.resident:
            fitted = Plan(**{**fitted.__dict__, "resident": False,
                             "KC": stream_kc(kw["G"], fitted.BH, "CHUNKS_PER_TRIP" in kw,
                                             args[0].dtype)})  # fmt: skip
        else:
            break
    if k is not None and fitted.persistent and fitted.nprog > 1 and not fitted.on_chip:
        # (on chip, programs never wait for each other: any number may run)
        per_sm = min(sm_smem // max(1, k.metadata.shared + 1024),
                     65536 // max(1, k.n_regs * 32 * fitted.num_warps))  # fmt: skip
        resident = sms * max(1, per_sm)
        if fitted.nprog > resident:
            if fitted.n_h <= resident:
                fitted = dataclasses.replace(fitted, b_chunk=resident // fitted.n_h)
            else:
                fitted = dataclasses.replace(fitted, persistent=False)
    _FIT_CACHE[key] = fitted
    return fitted


def _cooperative(plan: Plan) -> bool:
    """A persistent launch whose programs wait for each other (a grid barrier or polls)
    goes out as a cooperative launch: the driver refuses it when its programs cannot all be
    resident at once, instead of leaving the resident ones to wait out their bound."""
    return plan.persistent and plan.nprog > 1 and not plan.on_chip


def _polls(plan: Plan) -> bool:
    """Whether the forward kernel polls its exchange rows (POLL) under this plan."""
    return plan.poll and plan.resident and not plan.on_chip


def _uses_barrier(plan: Plan, kw: dict) -> bool:
    return plan.persistent and plan.nprog > 1 and not plan.on_chip and not kw.get("POLL")


def _plan_kw(plan: Plan, kw: dict) -> dict:
    out = dict(kw, KC=plan.KC, BH=plan.BH, BLOCK_B=plan.BLOCK_B, RESIDENT=plan.resident,
               ON_CHIP=plan.on_chip)  # fmt: skip
    out["NKC"] = triton.cdiv(kw["H"], plan.KC)
    if "POLL" in kw:  # the unprojected kernels
        out["POLL"] = _polls(plan)
    if "P" in kw:  # LSTM with projection
        out["BP"] = plan.BP
        out["NKP"] = triton.cdiv(kw["P"], plan.KC)
    if "CHUNKS_PER_TRIP" in kw:
        out["CHUNKS_PER_TRIP"] = plan.chunks_per_trip
        if "CELL" in kw:  # the plain backward: its polled product splits K (Plan.k_split)
            out["KSPLIT"] = plan.k_split if _polls(plan) else 1
    return out
