"""The cluster variant's exchange protocol (kernels/cuda/rnn_cluster.cuh), model-checked on CPU.

The kernel cannot run without an sm_90 GPU, but its synchronisation is a small protocol:
8 blocks, two exchange planes per block with one mbarrier each (arrival count 1, a
transaction count in bytes), asynchronous stores that land in any order and count their
bytes off the receiver's mbarrier, `arrive.expect_tx` by the receiver right after each wait,
`try_wait.parity` with one parity bit per plane. This test runs that protocol, as the kernel
sequences it, under many random interleavings of the blocks and of the stores in flight,
and checks that no block deadlocks, every read sees exactly the fill it is meant to (not a
stale or a later one), and no store lands on a plane entry its block has not read yet.

(It found that blocks owning no hidden unit must take no part: they sent nothing, so the
others could run two fills ahead of them and overwrite a plane they had not read.)
"""

from __future__ import annotations

import random

import pytest

from tests.conftest import seeded_generator

CLUSTER = 8


class Mbarrier:
    """mbarrier semantics (PTX ISA): a phase completes when its pending arrivals and its
    transaction count both reach 0; the count may go negative before the expect_tx."""

    def __init__(self):
        self.phase, self.pending, self.tx = 0, 1, 0

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase, self.pending = self.phase + 1, 1

    def arrive_expect_tx(self, n):
        assert self.pending == 1, "armed twice in one phase"
        self.tx += n
        self.pending = 0
        self._maybe_complete()

    def complete_tx(self, n):
        self.tx -= n
        assert abs(self.tx) < 2**20, "transaction count out of range"
        self._maybe_complete()

    def phase_done(self, parity):
        """try_wait.parity: has the phase with this parity completed (the current phase
        has the other parity)?"""
        return (self.phase & 1) != parity


class Block:
    def __init__(self, rank, units):
        self.rank, self.units = rank, units  # units: entries this block sends per fill
        self.bars = [Mbarrier(), Mbarrier()]
        self.planes = [{}, {}]  # (sender, unit) -> fill index
        self.parity = 0
        self.read_fills = set()


def run(direction, T, units, rng):
    """One launch of the protocol; returns the number of events executed."""
    blocks = [Block(r, units[r]) for r in range(CLUSTER)]
    fill_entries = sum(units)
    in_flight = []  # (receiver, plane, sender, unit, fill)

    active = [b for b in blocks if b.units > 0]  # blocks owning no unit take no part

    def send(block, plane, fill):
        for receiver in active:
            for u in range(block.units):
                in_flight.append((receiver, plane, block.rank, u, fill))

    # init: every block arms both planes, then (cluster barrier) the first puts may start
    for b in blocks:
        for bar in b.bars:
            bar.arrive_expect_tx(fill_entries)
    forward = direction == "forward"

    def program(b):
        """The kernel's sequence for one block, as a generator of blocking points."""
        if forward:
            send(b, 0, 0)  # put_initial: h0, read by step 0
        for s in range(T if forward else T + 1):
            waits = forward or s > 0
            if waits:
                p = s & 1  # read_plane(s)
                while not b.bars[p].phase_done((b.parity >> p) & 1):
                    yield
                b.parity ^= 1 << p
                b.bars[p].arrive_expect_tx(fill_entries)  # arm this plane's next fill
                yield  # the GEMM reads the plane (possibly much later)
                entries = b.planes[p]
                assert len(entries) == fill_entries, (b.rank, s, "incomplete fill read")
                assert set(entries.values()) == {s}, (b.rank, s, "read the wrong fill")
                b.read_fills.add(s)
            yield
            if (forward and s + 1 < T) or (not forward and s < T):
                send(b, (s + 1) & 1, s + 1)  # write_plane(s), read by step s + 1

    running = {b.rank: program(b) for b in active}
    events = 0
    while running or in_flight:
        events += 1
        assert events < 10**5, "no progress: deadlock (blocks spin on phases that never come)"
        if in_flight and (not running or rng.random() < 0.5):
            receiver, plane, sender, u, fill = in_flight.pop(rng.randrange(len(in_flight)))
            old = receiver.planes[plane].get((sender, u))
            # the entry it overwrites was read by its block already (two steps earlier)
            assert old is None or old in receiver.read_fills, (receiver.rank, fill, old)
            receiver.planes[plane][(sender, u)] = fill
            receiver.bars[plane].complete_tx(1)
            continue
        rank = rng.choice(sorted(running))
        try:
            next(running[rank])
        except StopIteration:
            del running[rank]
    expected = set(range(T)) if forward else set(range(1, T + 1))
    assert all(b.read_fills == expected for b in active)
    return events


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("T", [1, 2, 3, 8])
def test_exchange_protocol_under_random_interleavings(direction, T):
    gen = seeded_generator("cluster protocol", direction, T)
    rng = random.Random(gen.initial_seed())
    for _ in range(200):
        # entries each block sends per fill; the last ranks may own no unit (8 * units > H)
        active = rng.randint(1, CLUSTER)
        units = [rng.choice([1, 2]) if r < active else 0 for r in range(CLUSTER)]
        run(direction, T, units, rng)
