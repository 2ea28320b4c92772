"""The cupy backend's planning and packing, on CPU: the launch planners (grid, cluster,
K-split, projected LSTM) against the invariants the kernels assume, their readable reasons,
`auto`'s gate on the K-split variant's GPU test record, and the weight packing (the
tensor-core fragment order the kernels read) against the PTX ISA's fragment tables.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from gpurnn.backends import cupy as cupy_backend
from gpurnn.backends.cupy import plan as cupy_plan
from gpurnn.backends.cupy.pack import block_rows, lstmp_block_rows, pack_fragments
from gpurnn.backends.cupy.plan import (
    CLUSTER_SIZE,
    MMA_K,
    PROJ_OUT_ROWS,
    plan_launch,
    plan_lstmp_launch,
    units_per_block,
)
from gpurnn.backends.cupy.plan_ksplit import plan_ksplit_launch
from gpurnn.cells import GATES

CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
H100 = dict(sm_count=132, smem_limit=227 * 1024, has_clusters=True)
A100 = dict(sm_count=108, smem_limit=163 * 1024, has_clusters=False)


# ------------------------------------------------------------------ plan


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("variant", ["auto", "grid", "cluster"])
def test_plan_invariants(cell, dtype, direction, variant):
    for H, B, device in itertools.product([1, 40, 96, 256, 500, 768, 1024], [1, 8, 9, 64],
                                          [H100, A100]):  # fmt: skip
        plan = plan_launch(direction, cell, dtype, H, B, **device, variant=variant)
        if plan is None:
            continue
        assert plan.variant == ("cluster" if variant == "cluster" else "grid")
        assert plan.shared_bytes <= device["smem_limit"]
        assert plan.units == units_per_block(direction, cell, plan.m_tiles)
        K = H if direction == "forward" else GATES[cell] * H
        assert plan.K == K and plan.KT * MMA_K[dtype] >= K
        if plan.variant == "grid":
            assert plan.blocks * plan.units >= H and plan.blocks <= device["sm_count"]
            assert plan.batch_rows >= B and plan.batch_rows % (8 * plan.n_tiles) == 0
            assert plan.n_tiles == (1 if B <= 8 else 2)  # B <= 8 pays for one n-tile
        else:
            assert device["has_clusters"]
            assert CLUSTER_SIZE * plan.units >= H
            assert plan.blocks == CLUSTER_SIZE * math.ceil(B / 8)
            # fp32 planes, rows padded for conflict-free fragment loads, and two mbarriers
            assert plan.ldx >= plan.KT * MMA_K[dtype] and plan.ldx % 32 in (4, 8)
            assert plan.shared_bytes % 16 == 0
        assert plan.kernel_name(cell, dtype) in cupy_plan.kernel_names(clusters=True)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_cluster_tiles_built_are_the_tiles_used(cell, dtype, direction):
    """The cluster instantiations compiled (`cluster_m_tiles`) are exactly those an H100
    plan can pick for some hidden size."""
    used = set()
    for H in range(1, 1100, 3):
        plan = plan_launch(direction, cell, dtype, H, 1, **H100, variant="cluster")
        if plan is not None:
            used.add(plan.m_tiles)
    assert used == set(cupy_plan.cluster_m_tiles(direction, cell, dtype))


def test_plan_covers_the_benchmark_shapes():
    """H=768, B=16 (the benchmark's main LSTM shape) runs in every cell and 16-bit dtype."""
    for cell, dtype, direction in itertools.product(
        CELLS, [torch.bfloat16, torch.float16], ["forward", "backward"]
    ):
        plan = plan_launch(direction, cell, dtype, 768, 16, **H100)
        assert plan is not None and plan.variant == "grid", (cell, dtype, direction)
    # the cluster variant only when asked for (its step has not yet run on a GPU)
    assert plan_launch("forward", "lstm", torch.bfloat16, 128, 4, **H100).variant == "grid"
    forced = plan_launch("forward", "lstm", torch.bfloat16, 128, 4, **H100, variant="cluster")
    assert forced.variant == "cluster"
    for cell, H in (("lstm", 256), ("gru", 256), ("rnn_tanh", 512)):  # the GPU tests' sizes
        for direction in ("forward", "backward"):
            plan = plan_launch(direction, cell, torch.bfloat16, H, 16, **H100, variant="cluster")
            assert plan is not None and plan.variant == "cluster", (cell, direction)
    assert plan_launch("forward", "lstm", torch.bfloat16, 128, 4, **A100, variant="cluster") is None


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_ksplit_plan_invariants(cell, dtype, direction):
    """Every K-split plan holds what the kernel and its protocol assume (rnn_ksplit.cuh)."""
    from gpurnn.backends.cupy.plan_ksplit import (
        MBARRIER_TX_LIMIT,
        max_resident_clusters,
        receive_floats,
    )

    names = set(cupy_plan.kernel_names(clusters=True))
    G = GATES[cell]
    rows_per_unit = G if direction == "forward" else 1
    planned = 0
    for H, B in itertools.product([1, 7, 40, 96, 256, 500, 768, 1024, 2048], [1, 8, 9, 64]):
        choice = plan_ksplit_launch(direction, cell, dtype, H, B, **H100)
        assert choice.reasons and choice.describe().startswith("K-split")
        plan = choice.plan
        assert plan_ksplit_launch(direction, cell, dtype, H, B, **A100).plan is None
        if plan is None:
            assert "grid kernels run it" in choice.describe()
            continue
        planned += 1
        C, k = plan.cluster_size, MMA_K[dtype]
        assert plan.variant == "ksplit" and plan.kernel_name(cell, dtype) in names
        assert plan.m_tiles == 8 // plan.k_warps * plan.m_per_warp
        assert rows_per_unit * plan.units <= 16 * plan.m_tiles
        assert plan.units >= C  # every rank owns a unit (the protocol needs it)
        clusters = plan.blocks // C
        assert plan.blocks % C == 0 and clusters * plan.units >= H > (clusters - 1) * plan.units
        assert clusters <= max_resident_clusters(H100["sm_count"], C)
        K = H if direction == "forward" else G * H
        assert plan.K == K and C * plan.KT * k >= K > C * (plan.KT - 1) * k
        assert plan.ldx == C * plan.KT * k
        assert plan.batch_rows >= B and plan.batch_rows % (8 * plan.n_tiles) == 0
        assert plan.n_tiles == 1 or B > 8
        assert plan.shared_bytes <= H100["smem_limit"] and plan.shared_bytes % 16 == 0
        fill = receive_floats(C, plan.k_warps, rows_per_unit, plan.units, plan.n_tiles)
        assert 4 * fill <= MBARRIER_TX_LIMIT
    assert planned > 0


def test_ksplit_plan_reasons_are_readable(capsys):
    from gpurnn.backends.cupy import plan_ksplit as module

    choice = plan_ksplit_launch("forward", "lstm", torch.bfloat16, 768, 16, **H100)
    text = choice.describe()
    assert "clusters x" in text and "K slice" in text and "predicted" in text
    assert "rejected" in text
    assert "needs sm_90" in plan_ksplit_launch("forward", "lstm", torch.bfloat16, 768, 16,
                                        **A100).describe()  # fmt: skip
    assert module.main(["gru", "1024", "64", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "K-split forward gru H=1024 B=64" in out and "K-split backward" in out
    with pytest.raises(SystemExit) as e:
        module.main(["lstm", "0", "16", "bf16"])
    assert e.value.code == 2


def test_auto_uses_ksplit_only_after_its_gpu_tests_passed(monkeypatch):
    """`auto` considers the K-split variant on a card only once the record of its GPU tests
    there says they passed (in gpurnn/dispatch.json, built from benchmarks/gpu_tests.csv)."""
    from gpurnn import dispatch

    card = "NVIDIA H100 80GB HBM3"
    monkeypatch.setattr(dispatch, "card_name", lambda device: card)
    record = cupy_backend.KSPLIT_RECORD
    for table, cleared in [({}, False), ({"passed_gpu_tests": {"other card": [record]}}, False),
                           ({"passed_gpu_tests": {card: ["cupy"]}}, False),
                           ({"passed_gpu_tests": {card: [record]}}, True)]:  # fmt: skip
        monkeypatch.setattr(dispatch, "load_table", lambda table=table: table)
        assert cupy_backend.CupyBackend._ksplit_cleared(torch.device("cuda", 0)) is cleared
    # the shipped table has no such record yet: auto stays on the grid kernels
    monkeypatch.undo()
    dispatch.load_table.cache_clear()
    assert not dispatch.gpu_tests_passed(record, card)


# ------------------------------------------------------------------ fragment packing


def unpack_fragments(packed: torch.Tensor, dtype, m_tiles: int, K: int) -> np.ndarray:
    """Rebuild each block's A (P, 16*m_tiles, K) from packed fragments, reading the PTX ISA
    fragment tables directly (mma.m16n8k16 / m16n8k8.tf32, operand A, .row)."""
    P = packed.shape[0]
    k = MMA_K[dtype]
    KT = math.ceil(K / k)
    words = packed.cpu().numpy().reshape(P, m_tiles, KT, -1, 32, 4)
    A = np.zeros((P, 16 * m_tiles, KT * k))
    for mt, kt, lane, reg in itertools.product(range(m_tiles), range(KT), range(32), range(4)):
        g, q = lane // 4, lane % 4
        row = 16 * mt + g + 8 * (reg % 2)
        if dtype == torch.float32:
            col = 8 * kt + q + 4 * (reg // 2)
            hi = words[:, mt, kt, 0, lane, reg].view(np.float32)
            lo = words[:, mt, kt, 1, lane, reg].view(np.float32)
            A[:, row, col] = hi.astype(np.float64) + lo
        else:
            col = 16 * kt + 2 * q + 8 * (reg // 2)
            pair = words[:, mt, kt, 0, lane, reg].astype(np.uint32)
            halves = np.stack([pair & 0xFFFF, pair >> 16], -1).astype(np.uint16)
            torch_halves = torch.from_numpy(halves.view(np.int16)).view(dtype).double()
            A[:, row, col : col + 2] = torch_halves.numpy()
    return A[:, :, :K]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m_tiles", [1, 2])
def test_pack_matches_ptx_fragment_layout(dtype, m_tiles):
    P, rows, K = 3, 16 * m_tiles - 3, 40
    a = torch.randn(P, rows, K).to(dtype)
    packed = pack_fragments(a, m_tiles)
    A = unpack_fragments(packed, dtype, m_tiles, K)
    expected = np.zeros_like(A)
    expected[:, :rows] = a.double().numpy()
    if dtype == torch.float32:
        np.testing.assert_allclose(A, expected, rtol=2e-7, atol=0)  # hi + lo ~ exact fp32
        hi = packed.view(P, m_tiles, -1, 2, 32, 4)[:, :, :, 0].view(torch.int32)
        assert not (hi & 0x1FFF).any(), "hi halves must be exact tf32"
    else:
        np.testing.assert_array_equal(A, expected)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_block_rows_feed_the_kernel_epilogue(cell, direction):
    """A_p @ h gives what the kernel epilogue expects: forward, row g*units + u of block p is
    gate g of unit p*units + u; backward, row u is (dgates @ W_hh)[unit p*units + u]."""
    G, H, B = GATES[cell], 37, 3
    plan = plan_launch(direction, cell, torch.float32, H, B, **A100)
    w_hh = torch.randn(G * H, H, dtype=torch.float64)
    A = block_rows(direction, cell, w_hh, plan)
    x = torch.randn(B, A.shape[-1], dtype=torch.float64)
    D = A @ x.t()  # (P, rows, B)
    full = x @ (w_hh.t() if direction == "forward" else w_hh)  # (B, G*H) or (B, H)
    for p, u in itertools.product(range(plan.blocks), range(plan.units)):
        j = p * plan.units + u
        if j >= H:
            assert (A[p, u :: plan.units] == 0).all() if direction == "forward" else True
            continue
        if direction == "forward":
            for g in range(G):
                torch.testing.assert_close(D[p, g * plan.units + u], full[:, g * H + j])
        else:
            torch.testing.assert_close(D[p, u], full[:, j])


# ------------------------------------------------------------------ LSTM with projection


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_lstmp_plan_invariants(dtype, direction):
    names = set(cupy_plan.kernel_names(clusters=False))
    for (H, P), B, device in itertools.product(
        [(2, 1), (40, 17), (96, 40), (256, 128), (1024, 256), (1024, 512), (2048, 512)],
        [1, 8, 9, 64],
        [H100, A100],
    ):
        plan = plan_lstmp_launch(direction, dtype, H, P, B, **device)
        if plan is None:
            continue
        assert plan.variant == "grid" and plan.proj == P
        assert plan.shared_bytes <= device["smem_limit"]
        assert plan.units == units_per_block(direction, "lstm", plan.m_tiles)
        # every unit and every projected output has its block, all of them resident
        assert plan.blocks * plan.units >= H and plan.blocks * PROJ_OUT_ROWS >= P
        assert plan.blocks <= device["sm_count"]
        k = MMA_K[dtype]
        assert plan.K == P and plan.ldx == plan.KT * k >= P  # the units' GEMM: K = P
        out_K = H if direction == "forward" else 4 * H
        assert plan.out_ldx == plan.out_KT * k >= out_K
        assert plan.batch_rows >= B and plan.batch_rows % (8 * plan.n_tiles) == 0
        assert plan.kernel_name("lstm", dtype) in names
    # the GPU tests' real sizes run on an H100
    for d, (dt, H, P) in itertools.product(
        ["forward", "backward"],
        [(torch.bfloat16, 1024, 256), (torch.float16, 1024, 256), (torch.float32, 384, 128)],
    ):
        assert plan_lstmp_launch(d, dt, H, P, 16, **H100) is not None


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("H, P, B", [(37, 11, 3), (40, 33, 2)])
def test_lstmp_block_rows_feed_the_kernel_epilogue(direction, H, P, B):
    """The two A matrices of every block give what the kernel's two phases expect. Forward:
    units' row g*units + u of block p is gate g of unit p*units + u of W_hh h (h P wide),
    output row r is (W_hr m)[16p + r]; backward: units' row u is (W_hr^T dh)[unit], output
    row r is (W_hh^T dgates)[16p + r]."""
    plan = plan_lstmp_launch(direction, torch.float32, H, P, B, **A100)
    w_hh = torch.randn(4 * H, P, dtype=torch.float64)
    w_hr = torch.randn(P, H, dtype=torch.float64)
    units, outs = lstmp_block_rows(direction, w_hh, w_hr, plan)
    assert units.shape[0] == plan.blocks and outs.shape[:2] == (math.ceil(P / 16), 16)
    x_units = torch.randn(B, P, dtype=torch.float64)  # h_{t-1} forward, dh_t backward
    x_outs = torch.randn(B, H if direction == "forward" else 4 * H, dtype=torch.float64)
    D_units, D_outs = units @ x_units.t(), outs @ x_outs.t()
    full_units = x_units @ (w_hh.t() if direction == "forward" else w_hr)  # (B, 4H) / (B, H)
    full_outs = x_outs @ (w_hr.t() if direction == "forward" else w_hh)  # (B, P)
    for p, u in itertools.product(range(plan.blocks), range(plan.units)):
        j = p * plan.units + u
        rows = [g * plan.units + u for g in range(4)] if direction == "forward" else [u]
        cols = [g * H + j for g in range(4)] if direction == "forward" else [j]
        for row, col in zip(rows, cols):
            if j >= H:
                assert (units[p, row] == 0).all()
            else:
                torch.testing.assert_close(D_units[p, row], full_units[:, col])
    for p, r in itertools.product(range(outs.shape[0]), range(PROJ_OUT_ROWS)):
        if 16 * p + r >= P:
            assert (outs[p, r] == 0).all()
        else:
            torch.testing.assert_close(D_outs[p, r], full_outs[:, 16 * p + r])
