"""The K-split cluster kernels' protocol (kernels/cuda/rnn_ksplit.cuh), modelled in float64 on
CPU on the kernels' own index arithmetic, against the float64 reference.

The kernels need an sm_90 GPU. What they do per step is a protocol that can go wrong without
any CUDA detail being wrong, so it is modelled here statement by statement:

- clusters split the units, the CTAs of a cluster split the reduction dimension K, and
  within a CTA the warps sharing an m-tile split its k-tiles (`ksplit_block_rows` gives
  each CTA's A slice, as the backend packs it);
- every warp sends the partial sums of its rows to the rank that owns each row, as
  asynchronous stores that land in any order and count their bytes off the receiver's
  mbarrier (two receive buffers per rank by fill parity, armed with `expect_tx` right after
  each wait; the model's mbarrier is tests/test_cluster_protocol.py's);
- the owner sums the partials of its units in a fixed source order, runs the cell, and
  writes h (forward) or the hidden-side dgates (backward) to a global exchange of two
  planes, then adds 1 to a monotonic counter; a step reads the exchange once the counter
  reaches its target.

Every index (slices, owners, local rows, receive offsets, fills, parities, planes, barrier
targets, step order, the backward's rows) comes from kernels/cuda/rnn_index.cuh, compiled with
the system C++ compiler (tests/cuda_index_probe.cpp). The exchange's real entries start as
NaN (its padding as the zeros the launcher writes), so a read of an entry nobody wrote
shows. CTAs and stores in flight run under random interleavings; the checks: no deadlock,
every fill read is complete and the right one, no store overwrites an entry its rank has not
read, and y, h_T, c_T and every gradient (through the backend's own `kernel_weight_grads`)
match the reference: every cell, reverse, uneven lengths (0 included), h0 / c0 given or not,
B not a multiple of the batch tile, ranks that own only units past H, ranks whose K slice is
all padding, warps with no k-tile.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from gpurnn import reference
from gpurnn.backends.common import kernel_weight_grads
from gpurnn.backends.cupy.pack import ksplit_block_rows
from gpurnn.cells import GATES
from tests.conftest import seeded_generator
from tests.test_cluster_protocol import Mbarrier
from tests.test_cuda_index import CXX, build_probe

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")

FIELDS = {"lstm": 5, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}
WARPS = 8


@pytest.fixture(scope="module")
def ix(tmp_path_factory):
    """rnn_index.cuh's functions, through the probe (bounds-checked build: an index outside
    its buffer aborts the test process rather than passing silently)."""
    lib = ctypes.CDLL(build_probe(str(tmp_path_factory.mktemp("ksplit")), "GPURNN_DEBUG_BOUNDS"))
    i, ll, u = ctypes.c_int, ctypes.c_longlong, ctypes.c_uint
    pi, pll = ctypes.POINTER(i), ctypes.POINTER(ll)
    sigs = {
        "ks_rank_units": ([i] * 5, i), "ks_unit_span": ([i] * 4, i),
        "ks_source": ([i] * 6, i), "ks_owner": ([i] * 5 + [pi, pi], i),
        "ks_unit": ([i] * 6, i), "ks_fill": ([i] * 3, i), "ks_buffer": ([i], i),
        "ks_parity": ([i], u), "ks_recv_at": ([i] * 9, ll), "ks_fill_bytes": ([i] * 6, u),
        "ks_barrier_target": ([i] * 3, ll), "fwd_time": ([i] * 3, i),
        "bwd_step": ([i] * 3 + [pi, pi], None), "bwd_row": ([i] * 5 + [pi, pll, pll], None),
        "read_plane": ([i], i), "write_plane": ([i], i), "exchange_offset": ([i] * 5, ll),
    }  # fmt: skip
    for name, (args, res) in sigs.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = res
    return lib


@dataclass(frozen=True)
class Geometry:
    """One launch's layout, as the planner would choose it (see rnn_ksplit.cuh)."""

    direction: str
    cell: str
    C: int  # CTAs per cluster
    MW: int  # m-tiles per warp
    KW: int  # warps per m-tile
    n_tiles: int
    kmma: int  # k per mma
    H: int
    B: int

    @property
    def m_tiles(self):
        return WARPS // self.KW * self.MW

    @property
    def Gr(self):
        return GATES[self.cell] if self.direction == "forward" else 1

    @property
    def U(self):
        return 16 * self.m_tiles // self.Gr

    @property
    def clusters(self):
        return math.ceil(self.H / self.U)

    @property
    def K(self):
        return self.H if self.direction == "forward" else GATES[self.cell] * self.H

    @property
    def KTc(self):  # k-tiles per CTA
        return math.ceil(math.ceil(self.K / self.kmma) / self.C)

    @property
    def Kc(self):
        return self.KTc * self.kmma

    @property
    def cols(self):
        return 8 * self.n_tiles

    @property
    def groups(self):
        return math.ceil(self.B / self.cols)

    def args(self):
        return (self.C, self.U, self.Gr, self.KW)


# ---------------------------------------------------------------- cells, as rnn_cells.cuh


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def cell_forward(cell, pre, x, b_hn, h, c):
    """-> h, c, workspace fields"""
    if cell == "lstm":
        i, f, o = sigmoid(pre[0] + x[0]), sigmoid(pre[1] + x[1]), sigmoid(pre[3] + x[3])
        g = np.tanh(pre[2] + x[2])
        c = f * c + i * g
        return o * np.tanh(c), c, [i, f, g, o, c]
    if cell == "gru":
        r, z = sigmoid(pre[0] + x[0]), sigmoid(pre[1] + x[1])
        hn = pre[2] + b_hn
        n = np.tanh(x[2] + r * hn)
        return (1 - z) * n + z * h, c, [r, z, n, hn]
    a = pre[0] + x[0]
    return (max(a, 0.0) if cell == "rnn_relu" else np.tanh(a)), c, []


def cell_backward(cell, ws, h_prev, c_prev, h_t, dh, dc):
    """-> da, dhid, dh_carry, dc"""
    if cell == "lstm":
        i, f, g, o, c = ws
        tc = np.tanh(c)
        dct = dc + dh * o * (1 - tc * tc)
        da = [dct * g * i * (1 - i), dct * c_prev * f * (1 - f), dct * i * (1 - g * g),
              dh * tc * o * (1 - o)]  # fmt: skip
        return da, da, 0.0, dct * f
    if cell == "gru":
        r, z, n, hn = ws
        da_n = dh * (1 - z) * (1 - n * n)
        da = [da_n * hn * r * (1 - r), dh * (h_prev - n) * z * (1 - z), da_n]
        return da, [da[0], da[1], da_n * r], dh * z, dc
    d = (dh if h_t > 0 else 0.0) if cell == "rnn_relu" else dh * (1 - h_t * h_t)
    return [d], [d], 0.0, dc


# ---------------------------------------------------------------- the kernels, one CTA each


class Launch:
    """Shared state of one launch: the global exchange and counter, every CTA's receive
    buffers and mbarriers, and the stores in flight."""

    def __init__(self, ix, geo: Geometry, rng):
        self.ix, self.geo, self.rng = ix, geo, rng
        self.ctas = geo.clusters * geo.C
        rows = geo.groups * geo.cols  # B padded to the batch group
        self.ldx = geo.C * geo.Kc
        # padding (rows >= B, columns >= K) is the launcher's zeros; real entries NaN
        self.xbuf = np.zeros(2 * rows * self.ldx)
        for plane, b, k in itertools.product(range(2), range(geo.B), range(geo.K)):
            self.xbuf[ix.exchange_offset(plane, b, k, rows, self.ldx)] = np.nan
        self.rows = rows
        self.counter = 0
        span = ix.ks_unit_span(*geo.args())
        size = 2 * geo.C * geo.KW * geo.Gr * span * geo.cols
        # per CTA: received values and the fill each entry holds (-1: none yet), two
        # mbarriers, the fills its epilogue has read
        self.recv = np.zeros((self.ctas, size))
        self.recv_fill = {}  # (cta, offset of a row) -> fill
        self.bars = [[Mbarrier(), Mbarrier()] for _ in range(self.ctas)]
        self.read_fills = [set() for _ in range(self.ctas)]
        self.in_flight = []  # (cta, buffer, offset, fill, values): one row's columns
        for cta in range(self.ctas):  # init: arm both buffers (then a cluster barrier)
            nbytes = ix.ks_fill_bytes(*geo.args(), cta % geo.C, geo.cols)
            for bar in self.bars[cta]:
                bar.arrive_expect_tx(nbytes // 4)  # the model counts 4-byte words
        # cluster row -> (owner rank, local row), None for padding rows
        self.owner = {}
        for m in range(16 * geo.m_tiles):
            rank, local = ctypes.c_int(), ctypes.c_int()
            found = ix.ks_owner(*geo.args(), m, ctypes.byref(rank), ctypes.byref(local))
            self.owner[m] = (rank.value, local.value) if found else None
        # a row's columns are contiguous in a fill (the kernel stores column pairs)
        assert ix.ks_recv_at(*geo.args(), 1, 0, 0, geo.cols - 1, geo.cols) == (
            ix.ks_recv_at(*geo.args(), 1, 0, 0, 0, geo.cols) + geo.cols - 1
        )

    def recv_at(self, buffer, source, local):
        return self.ix.ks_recv_at(*self.geo.args(), buffer, source, local, 0, self.geo.cols)

    def x_at(self, plane, row, k):
        return self.ix.exchange_offset(plane, row, k, self.rows, self.ldx)

    def deliver(self):
        i = self.rng.randrange(len(self.in_flight))
        self.in_flight[i], self.in_flight[-1] = self.in_flight[-1], self.in_flight[i]
        cta, buffer, offset, fill, values = self.in_flight.pop()
        old = self.recv_fill.get((cta, offset))
        assert old is None or old in self.read_fills[cta], (cta, fill, old, "overwrote")
        self.recv[cta, offset : offset + len(values)] = values
        self.recv_fill[cta, offset] = fill
        self.bars[cta][buffer].complete_tx(len(values))


def gemm_and_send(L: Launch, A, cta, plane, r0, active, fill):
    """The CTA's GEMM of one batch group over its K slice, warp by warp, each warp's
    partial sums sent to their owners (a generator: one yield per warp)."""
    geo, ix = L.geo, L.ix
    q, r = divmod(cta, geo.C)
    buffer = ix.ks_buffer(fill)
    X = np.zeros((geo.cols, geo.Kc))
    if active:
        for cc, k in itertools.product(range(geo.cols), range(geo.Kc)):
            X[cc, k] = L.xbuf[L.x_at(plane, r0 + cc, r * geo.Kc + k)]
    for w in range(WARPS):
        mslot, kgroup = divmod(w, geo.KW)
        rows = range(mslot * geo.MW * 16, (mslot + 1) * geo.MW * 16)
        ks = [kt * geo.kmma + i for kt in range(kgroup, geo.KTc, geo.KW) for i in range(geo.kmma)]
        D = A[cta][np.ix_(list(rows), ks)] @ X[:, ks].T if active and ks else None
        src = ix.ks_source(*geo.args(), r, kgroup)
        for m in rows:
            if L.owner[m] is None:
                continue
            rank, local = L.owner[m]
            values = np.zeros(geo.cols) if D is None else D[m - rows.start]
            L.in_flight.append(
                (q * geo.C + rank, buffer, L.recv_at(buffer, src, local), fill, values)
            )
        yield


def wait_fill(L: Launch, cta, fill):
    """Wait for the fill, then arm its buffer's next one (thread 0, right after)."""
    ix, geo = L.ix, L.geo
    buffer = ix.ks_buffer(fill)
    while not L.bars[cta][buffer].phase_done(ix.ks_parity(fill)):
        yield
    L.bars[cta][buffer].arrive_expect_tx(ix.ks_fill_bytes(*geo.args(), cta % geo.C, geo.cols) // 4)


def received(L: Launch, cta, fill, local):
    """Sum over sources, in the kernel's order, of one received row of `fill` (all its
    columns)."""
    total = np.zeros(L.geo.cols)
    for src in range(L.geo.C * L.geo.KW):
        at = L.recv_at(L.ix.ks_buffer(fill), src, local)
        got = L.recv_fill.get((cta, at))
        assert got == fill, (cta, fill, got, "wrong fill")
        total += L.recv[cta, at : at + L.geo.cols]
    return total


def wait_counter(L: Launch, target):
    while L.counter < target:
        yield


def forward_cta(L: Launch, A, cta, io):
    geo, ix = L.geo, L.ix
    q, r = divmod(cta, geo.C)
    T, B, H, G = io["T"], geo.B, geo.H, GATES[geo.cell]
    span = ix.ks_unit_span(*geo.args())
    owned = [(lu, q * geo.U + ix.ks_unit(*geo.args(), r, lu))
             for lu in range(ix.ks_rank_units(*geo.args(), r))]  # fmt: skip
    for _, j in owned:  # publish h0
        for b in range(B):
            if j < H:
                L.xbuf[L.x_at(0, b, j)] = io["h"][b, j]
    L.counter += 1
    for s in range(T):
        t = ix.fwd_time(s, T, io["reverse"])
        yield from wait_counter(L, ix.ks_barrier_target(s, 1, L.ctas))
        for grp in range(geo.groups):
            r0 = grp * geo.cols
            fill = ix.ks_fill(s, grp, geo.groups)
            active = any(0 <= t < io["len"][b] for b in range(r0, min(B, r0 + geo.cols)))
            yield from gemm_and_send(L, A, cta, ix.read_plane(s), r0, active, fill)
            yield from wait_fill(L, cta, fill)
            sums = {lu: [received(L, cta, fill, g * span + lu) for g in range(G)]
                    for lu, _ in owned}  # fmt: skip
            for (lu, j), cc in itertools.product(owned, range(geo.cols)):
                b = r0 + cc
                if j >= H or b >= B:
                    continue
                h = io["h"][b, j]
                if 0 <= t < io["len"][b]:
                    pre = [sums[lu][g][cc] for g in range(G)]
                    x = [io["xg"][t, b, g * H + j] for g in range(G)]
                    b_hn = io["b_hn"][j] if io["b_hn"] is not None else 0.0
                    h, io["c"][b, j], ws = cell_forward(geo.cell, pre, x, b_hn, h, io["c"][b, j])
                    io["h"][b, j] = h
                    io["y"][t, b, j] = h
                    for f, v in enumerate(ws):
                        io["ws"][t, b, f * H + j] = v
                else:
                    io["y"][t, b, j] = 0.0
                    io["ws"][t, b, j::H] = 0.0
                L.xbuf[L.x_at(ix.write_plane(s), b, j)] = h
            L.read_fills[cta].add(fill)  # the epilogue has read it
            yield
        L.counter += 1  # after the step's exchange stores (block barrier, release add)


def backward_cta(L: Launch, A, cta, io):
    geo, ix = L.geo, L.ix
    q, r = divmod(cta, geo.C)
    T, B, H, G = io["T"], geo.B, geo.H, GATES[geo.cell]
    F = FIELDS[geo.cell]
    owned = [(lu, q * geo.U + ix.ks_unit(*geo.args(), r, lu))
             for lu in range(ix.ks_rank_units(*geo.args(), r))]  # fmt: skip
    TB = T * B
    for s in range(T + 1):
        t, source = ctypes.c_int(), ctypes.c_int()
        ix.bwd_step(s, T, int(io["reverse"]), ctypes.byref(t), ctypes.byref(source))
        t, source = t.value, source.value
        yield from wait_counter(L, ix.ks_barrier_target(s, 0, L.ctas))
        for grp in range(geo.groups):
            r0 = grp * geo.cols
            fill = ix.ks_fill(s, grp, geo.groups)
            active = any(0 <= source < io["len"][b] for b in range(r0, min(B, r0 + geo.cols)))
            yield from gemm_and_send(L, A, cta, ix.read_plane(s), r0, active, fill)
            yield from wait_fill(L, cta, fill)
            sums = {lu: received(L, cta, fill, lu) for lu, _ in owned}
            for (lu, j), cc in itertools.product(owned, range(geo.cols)):
                b = r0 + cc
                if j >= H or b >= B:
                    continue
                dh_in = io["dh"][b, j] + sums[lu][cc]
                if s == T:
                    io["dh"][b, j] = dh_in
                    continue
                valid, cur, prev = ctypes.c_int(), ctypes.c_longlong(), ctypes.c_longlong()
                ix.bwd_row(t, b, int(io["len"][b]), B, int(io["reverse"]), ctypes.byref(valid),
                           ctypes.byref(cur), ctypes.byref(prev))  # fmt: skip
                cur, prev = cur.value, prev.value
                ws_all, y_all = io["ws"].reshape(TB, -1), io["y"].reshape(TB, H)
                if valid.value:
                    ws = [ws_all[cur, f * H + j] for f in range(F)]
                    h_prev = io["h0"][b, j] if prev < 0 else y_all[prev, j]
                    c_prev = (
                        io["c0"][b, j] if prev < 0 else (ws_all[prev, 4 * H + j] if F == 5 else 0)
                    )
                    dh = dh_in + io["dy"].reshape(TB, H)[cur, j]
                    da, dhid, io["dh"][b, j], io["dc"][b, j] = cell_backward(
                        geo.cell, ws, h_prev, c_prev, y_all[cur, j], dh, io["dc"][b, j]
                    )
                else:
                    da = dhid = [0.0] * G
                    io["dh"][b, j] = dh_in
                for g in range(G):
                    io["dxg"].reshape(TB, -1)[cur, g * H + j] = da[g]
                    L.xbuf[L.x_at(ix.write_plane(s), b, g * H + j)] = dhid[g]
                if G == 3:
                    io["dhn"].reshape(TB, H)[cur, j] = dhid[2]
            L.read_fills[cta].add(fill)
            yield
        if s < T:
            L.counter += 1


def run(L: Launch, program, A, io):
    """Every CTA's program and every store in flight under a random interleaving."""
    running = [program(L, A, cta, io) for cta in range(L.ctas)]
    events = 0
    while running or L.in_flight:
        events += 1
        assert events < 10**7, "no progress: deadlock"
        if L.in_flight and (not running or L.rng.random() < 0.5):
            L.deliver()
            continue
        i = L.rng.randrange(len(running))
        try:
            next(running[i])
        except StopIteration:
            running[i] = running[-1]
            running.pop()


def model(ix, geo: Geometry, xg, w_hh, h0, c0, lengths, reverse, b_hn, dy, dh_T, dc_T, rng,
          bwd_geo: Geometry | None = None):  # fmt: skip
    """Forward then backward launch of `geo`'s layout (the backward's `bwd_geo` if given)."""
    T, B, H, G = xg.shape[0], geo.B, geo.H, GATES[geo.cell]
    F = FIELDS[geo.cell]
    h0_ = h0 if h0 is not None else np.zeros((B, H))
    c0_ = c0 if c0 is not None else np.zeros((B, H))
    lens = lengths if lengths is not None else np.full(B, T)
    nan = np.nan
    fwd = Geometry(**{**geo.__dict__, "direction": "forward"})
    bwd = bwd_geo or Geometry(**{**geo.__dict__, "direction": "backward"})
    w = torch.from_numpy(w_hh)
    A_f = ksplit_block_rows("forward", geo.cell, w, fwd.clusters, fwd.U, fwd.C, fwd.Kc, fwd.m_tiles)
    A_b = ksplit_block_rows(
        "backward", geo.cell, w, bwd.clusters, bwd.U, bwd.C, bwd.Kc, bwd.m_tiles
    )
    io = {"T": T, "reverse": reverse, "len": lens, "xg": xg, "b_hn": b_hn, "h": h0_.copy(),
          "c": c0_.copy(), "y": np.full((T, B, H), nan),
          "ws": np.full((T, B, max(F, 1) * H), nan)}  # fmt: skip
    run(Launch(ix, fwd, rng), forward_cta, A_f.numpy(), io)
    y, h_T, c_T = io["y"], io["h"], io["c"]
    dc = dc_T.copy() if dc_T is not None else np.zeros((B, H))
    io.update(h0=h0_, c0=c0_, dy=dy, dh=dh_T.copy(), dc=dc, dxg=np.full((T, B, G * H), nan),
              dhn=np.full((T, B, H), nan))  # fmt: skip
    run(Launch(ix, bwd, rng), backward_cta, A_b.numpy(), io)
    return y, h_T, c_T, io["dxg"], io["dhn"] if G == 3 else None, io["dh"], io["dc"]


GEOMETRIES = [
    # cell, C, MW, KW, n_tiles, kmma, H, B: a few ranks own only units past H, K slices
    # entirely padding, warps without a k-tile, B not a multiple of the batch tile
    ("lstm", 4, 1, 8, 1, 8, 20, 11),
    ("lstm", 2, 1, 4, 2, 16, 13, 3),
    ("gru", 4, 1, 8, 1, 8, 15, 9),
    ("gru", 2, 1, 2, 1, 16, 40, 5),
    ("rnn_tanh", 8, 1, 8, 1, 8, 21, 10),
    ("rnn_relu", 4, 2, 8, 2, 8, 20, 17),
]


@pytest.mark.parametrize("cell, C, MW, KW, n_tiles, kmma, H, B", GEOMETRIES)
def test_model_matches_reference(ix, cell, C, MW, KW, n_tiles, kmma, H, B):
    T = 3
    geo = Geometry("forward", cell, C, MW, KW, n_tiles, kmma, H, B)
    for d in ("forward", "backward"):
        g = Geometry(**{**geo.__dict__, "direction": d})
        assert g.U >= g.C, "the planner keeps U >= C (every rank owns a unit)"
    gen = seeded_generator("ksplit model", cell, C, MW, KW, H, B)
    rng = random.Random(gen.initial_seed())
    combos = list(itertools.product([False, True], repeat=3))
    if geo.clusters * C >= 8:  # the larger launches: each direction and lengths once
        combos = [
            (rev, lens, rev != lens) for rev, lens in itertools.product([False, True], repeat=2)
        ]
    for reverse, with_lengths, with_h0 in combos:
        check_case(ix, geo, None, gen, rng, T, reverse, with_lengths, with_h0)


def check_case(ix, geo, bwd_geo, gen, rng, T, reverse, with_lengths, with_h0):
    """One random case through the model and the backend's glue, against the reference."""
    cell, H, B, G = geo.cell, geo.H, geo.B, GATES[geo.cell]

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64).numpy()

    xg, w_hh = rand(T, B, G * H), rand(G * H, H, scale=H**-0.5)
    h0 = rand(B, H) if with_h0 else None
    c0 = rand(B, H) if with_h0 and cell == "lstm" else None
    b_hn = rand(H) if cell == "gru" else None
    lengths = None
    if with_lengths:
        lengths = torch.randint(0, T + 1, (B,), generator=gen).numpy()
        lengths[0], lengths[-1] = T, 0
    dy, dh_T = rand(T, B, H), rand(B, H)
    dc_T = rand(B, H) if cell == "lstm" else None
    y, h_T, c_T, dxg, dhn, dh0, dc0 = model(ix, geo, xg, w_hh, h0, c0, lengths, reverse, b_hn,
                                            dy, dh_T, dc_T, rng, bwd_geo)  # fmt: skip
    h_init = torch.from_numpy(h0 if h0 is not None else np.zeros((B, H)))
    dw_hh, db_hn = kernel_weight_grads(
        cell, torch.from_numpy(dxg), None if dhn is None else torch.from_numpy(dhn),
        torch.from_numpy(y), h_init, None if lengths is None else torch.from_numpy(lengths),
        reverse, None if b_hn is None else torch.from_numpy(b_hn))  # fmt: skip
    args = (cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, None)
    what = f"{cell} reverse={reverse} lengths={with_lengths} h0={with_h0}"
    ry, rh, rc = reference.recurrence_forward(*args)
    rg = reference.recurrence_backward(*args, dy, dh_T, dc_T)
    got = {"y": y, "h_T": h_T, "xg": dxg, "w_hh": dw_hh.numpy()}
    want = {"y": ry, "h_T": rh, "xg": rg["xg"], "w_hh": rg["w_hh"]}
    if cell == "lstm":
        got["c_T"], want["c_T"] = c_T, rc
    if with_h0:
        got["h0"], want["h0"] = dh0, rg["h0"]
        if cell == "lstm":
            got["c0"], want["c0"] = dc0, rg["c0"]
    if cell == "gru":
        got["b_hn"], want["b_hn"] = db_hn.numpy(), rg["b_hn"]
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-10, atol=1e-10,
                                   err_msg=f"{name} {what}")  # fmt: skip


@pytest.mark.parametrize("cell, H, B", [("lstm", 40, 9), ("gru", 33, 3)])
def test_model_runs_the_planners_layouts(ix, cell, H, B):
    """The layouts the planner picks (here on an H100, bf16), forward and backward."""
    from gpurnn.backends.cupy.plan_ksplit import plan_ksplit_launch

    geos = []
    for direction in ("forward", "backward"):
        plan = plan_ksplit_launch(direction, cell, torch.bfloat16, H, B, sm_count=132,
                                  smem_limit=227 * 1024, has_clusters=True).plan  # fmt: skip
        geo = Geometry(direction, cell, plan.cluster_size, plan.m_per_warp, plan.k_warps,
                       plan.n_tiles, 16, H, B)  # fmt: skip
        assert (geo.U, geo.clusters * geo.C, geo.KTc) == (plan.units, plan.blocks, plan.KT)
        geos.append(geo)
    gen = seeded_generator("ksplit planner model", cell, H, B)
    rng = random.Random(gen.initial_seed())
    check_case(ix, geos[0], geos[1], gen, rng, 3, True, True, True)


def test_model_catches_a_rank_without_units(ix):
    """U < C leaves ranks that own no unit and so never wait: within a step they can send
    a later batch group's partials into a buffer its owner has not read. The model sees it
    (which is why the planner keeps U >= C)."""
    geo = Geometry("backward", "rnn_tanh", 8, 1, 8, 1, 8, 40, 40)  # U = 16 >= 8: fine ...
    assert geo.U >= geo.C
    bad = Geometry("forward", "lstm", 8, 1, 8, 1, 8, 8, 40)  # U = 4 < C = 8: five groups
    assert bad.U < bad.C
    T, B, H, G = 2, bad.B, bad.H, 4
    gen = np.random.default_rng(0)
    caught = 0
    for seed in range(20):
        xg = gen.standard_normal((T, B, G * H))
        io = {"T": T, "reverse": False, "len": np.full(B, T), "xg": xg, "b_hn": None,
              "h": np.zeros((B, H)), "c": np.zeros((B, H)), "y": np.zeros((T, B, H)),
              "ws": np.zeros((T, B, 5 * H))}  # fmt: skip
        A = ksplit_block_rows("forward", "lstm", torch.from_numpy(gen.standard_normal((G * H, H))),
                              bad.clusters, bad.U, bad.C, bad.Kc, bad.m_tiles).numpy()  # fmt: skip
        try:
            run(Launch(ix, bad, random.Random(seed)), forward_cta, A, io)
        except AssertionError as e:
            assert "overwrote" in str(e) or "wrong fill" in str(e) or "deadlock" in str(e)
            caught += 1
    assert caught > 0


@pytest.mark.parametrize("C", [2, 4, 8])
@pytest.mark.parametrize("Gr", [1, 3, 4])
def test_ownership_partitions_the_rows(ix, C, Gr):
    """Every unit of a cluster has one owner and one local row per gate; the receive
    offsets of one buffer are distinct and fill it exactly; the bytes a rank expects are
    the rows it owns, from every source."""
    for U, KW, cols in itertools.product([C, C + 1, 3 * C - 1, 64], [1, 2, 8], [8, 16]):
        args = (C, U, Gr, KW)
        span = ix.ks_unit_span(*args)
        seen = {}
        for m in range(Gr * U + 16):
            rank, local = ctypes.c_int(), ctypes.c_int()
            found = ix.ks_owner(*args, m, ctypes.byref(rank), ctypes.byref(local))
            assert bool(found) == (m < Gr * U)
            if found:
                g, lu = divmod(local.value, span)
                assert g == m // U and ix.ks_unit(*args, rank.value, lu) == m % U
                assert lu < ix.ks_rank_units(*args, rank.value)
                seen[(rank.value, local.value)] = m
        assert len(seen) == Gr * U
        assert sum(ix.ks_rank_units(*args, r) for r in range(C)) == U
        assert min(ix.ks_rank_units(*args, r) for r in range(C)) >= 1  # U >= C
        offsets = {
            ix.ks_recv_at(*args, 1, src, local, col, cols)
            for src, local, col in itertools.product(range(C * KW), range(Gr * span), range(cols))
        }
        size = C * KW * Gr * span * cols
        assert offsets == set(range(size, 2 * size))
        for r in range(C):
            assert (
                ix.ks_fill_bytes(*args, r, cols)
                == 4 * C * KW * Gr * ix.ks_rank_units(*args, r) * cols
            )
    assert [ix.ks_buffer(f) for f in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [ix.ks_parity(f) for f in range(6)] == [0, 0, 1, 1, 0, 0]
    assert ix.ks_fill(3, 1, 4) == 13
    assert [ix.ks_barrier_target(s, 1, 10) for s in range(3)] == [10, 20, 30]
    assert [ix.ks_barrier_target(s, 0, 10) for s in range(3)] == [0, 10, 20]
