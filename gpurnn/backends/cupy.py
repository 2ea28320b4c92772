"""The `cupy` backend: CUDA C++ persistent kernels (kernels/cuda/rnn_persistent.cu), compiled
at run time by NVRTC through CuPy and launched on torch's current stream.

Layers, top to bottom:
  kernel    kernels/cuda/rnn_persistent.cu: one skeleton, the cell a template parameter
            (rnn_cells.cuh), W_hh held in shared memory in tensor-core fragment order, batch
            in the mma's n=8 dimension. Two variants: `grid` (one block per unit slice, h
            exchanged through L2, a grid barrier per step: cooperative launch) and `cluster`
            (sm_90, kernels/cuda/rnn_cluster.cuh: all of W_hh in one 8-block cluster, h
            exchanged through distributed shared memory with asynchronous stores completing
            on mbarriers, no barrier between steps; one cluster per 8 batch rows). LSTM
            with projection (proj_size) has its own grid kernels (rnn_lstmp.cuh: two
            phases and two grid barriers a step) and no cluster variant.
  plan      `plan_launch`: which variant, tile sizes and grid for (cell, dtype, H, B) on a
            device; pure Python, testable without a GPU.
  pack      `pack_fragments`: W_hh rows/columns for each block, padded and permuted into the
            order the mma instructions read them (torch ops, on the weights' device).
  launch    `_compiled` (NVRTC via cupy.RawModule, cached per device and kernel) and the
            `CupyBackend` methods: T and B are run-time arguments, so a new sequence length
            or batch size never recompiles.

CuPy is optional: this module imports it only inside functions, and `unavailable_reason`
says why the backend cannot run (not installed, no GPU, no NVRTC).

Environment: GPURNN_CUPY_VARIANT = auto (default) | grid | cluster forces a variant where it
can run (for measuring what each buys). `auto` is the grid variant: the cluster variant's
barrier-free step has not yet run on a GPU, so it is used only when asked for.
GPURNN_DEBUG_BOUNDS=1 compiles the kernels with every buffer index checked
(kernels/cuda/rnn_index.cuh: a trap at the first bad access) and synchronizes after each
launch, so a failure is reported at the kernel that caused it.

Workspace: the torch backend's layout, fp32: lstm (T, B, 5H) i, f, g, o, c (with projection
too: m = o * tanh(c) follows from it, for dW_hr); gru (T, B, 4H) r, z, n, hn; rnn none.
Entries of steps past a sequence's end are 0.
"""

from __future__ import annotations

import functools
import importlib.resources
import itertools
import logging
import math
import os
import re
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gpurnn.backends.base import Backend, Grads
from gpurnn.backends.common import kernel_weight_grads, loop_workspace_shape, projection_grad
from gpurnn.cells import GATES

log = logging.getLogger("gpurnn")

INSTALL_HINT = "pip install gpurnn[cupy13] (CUDA 13) or gpurnn[cupy12] (CUDA 12)"
KERNEL_FILE = "rnn_persistent.cu"
KERNEL_PACKAGE = "gpurnn.kernels.cuda"

# C++ names of the template arguments (rnn_cells.cuh, rnn_common.cuh)
CELL_TYPES = {"lstm": "LstmCell", "gru": "GruCell", "rnn_tanh": "RnnTanhCell",
              "rnn_relu": "RnnReluCell"}  # fmt: skip
ELEM_TYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}

# constants shared with rnn_persistent.cu
WARPS = 8
THREADS = 32 * WARPS
CLUSTER_SIZE = 8
# k per mma and 16-byte A-fragment words per lane per tile (fp32 keeps hi and lo tf32 halves)
MMA_K = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 8}
A_UINT4 = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2}

# m-tiles (16 rows of A each) per block the launcher may pick; each is one instantiation
FORWARD_M_TILES = (1, 2, 4)
BACKWARD_M_TILES = (1, 2)
CLUSTER_M_TILES = (1, 2, 4, 8)  # cluster_m_tiles keeps those that can fit on chip
SM90_SMEM_LIMIT = 227 * 1024  # the largest opt-in shared memory per block of sm_90 parts
N_TILES = (1, 2)  # 8 batch rows each: B <= 8 pays for one


# ------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """How one kernel launch is laid out (see rnn_persistent.cu for the terms)."""

    direction: str  # "forward" | "backward"
    variant: str  # "grid" | "cluster"
    m_tiles: int
    n_tiles: int
    units: int  # hidden units per block
    blocks: int  # grid size
    K: int  # reduction length: H (forward) or G*H (backward)
    KT: int  # k-tiles of MMA_K
    ldx: int  # exchange row stride: elements (grid), floats (cluster)
    batch_rows: int  # exchange rows (grid: B padded to 8*n_tiles; cluster: 8)
    shared_bytes: int
    # LSTM with projection (rnn_lstmp.cuh): proj_size P (0: none); K, KT, ldx above are then
    # the units' GEMM (K = P), these the projected outputs' (16 per block; K = H forward,
    # 4H backward) and its exchange's row stride
    proj: int = 0
    out_KT: int = 0
    out_ldx: int = 0

    def kernel_name(self, cell: str, dtype: torch.dtype) -> str:
        if self.proj:
            args = f"{ELEM_TYPES[dtype]}, {self.m_tiles}, {self.n_tiles}"
            return f"gpurnn::rnn_lstmp_{self.direction}_grid<{args}>"
        args = [CELL_TYPES[cell], ELEM_TYPES[dtype], str(self.m_tiles)]
        if self.variant == "grid":
            args.append(str(self.n_tiles))
        return f"gpurnn::rnn_{self.direction}_{self.variant}<{', '.join(args)}>"


def units_per_block(direction: str, cell: str, m_tiles: int) -> int:
    """Forward: a block's A rows are the G gate rows of its units; backward: its units."""
    rows = 16 * m_tiles
    return rows // GATES[cell] if direction == "forward" else rows


def fragment_bytes(dtype: torch.dtype, m_tiles: int, KT: int) -> int:
    return m_tiles * KT * A_UINT4[dtype] * 32 * 16


def shared_bytes(dtype, m_tiles, n_tiles, KT, cluster_ldx=0) -> int:
    """Dynamic shared memory: packed fragments | red | (cluster) two fp32 exchange planes
    of (8, cluster_ldx) and their two 8-byte mbarriers."""
    red = WARPS * n_tiles * 16 * m_tiles * 8 * 4
    cluster = 2 * 8 * cluster_ldx * 4 + 2 * 8 if cluster_ldx else 0
    return fragment_bytes(dtype, m_tiles, KT) + red + cluster


def cluster_row_stride(dtype, K_padded: int) -> int:
    """Floats per row of the cluster exchange planes: K padded to 32 banks, plus 8 (16-bit:
    each lane reads 8 bytes, so a half-warp's 4 rows x 4 pairs cover 32 banks) or 4 (fp32:
    4-byte reads, 8 rows x 4 columns) so that a fragment load has no bank conflict."""
    return math.ceil(K_padded / 32) * 32 + (4 if dtype == torch.float32 else 8)


@functools.cache
def cluster_m_tiles(direction: str, cell: str, dtype: torch.dtype) -> tuple[int, ...]:
    """The cluster variant's m-tile counts that can ever run: tile m is picked only for an H
    beyond what the previous tile's 8 blocks cover, so one whose smallest such H already
    overflows shared memory is never used (and neither built nor compiled)."""
    tiles, covered = [], 0
    for m in CLUSTER_M_TILES:
        K = (covered + 1) * (1 if direction == "forward" else GATES[cell])
        KT = math.ceil(K / MMA_K[dtype])
        ldx = cluster_row_stride(dtype, KT * MMA_K[dtype])
        if shared_bytes(dtype, m, 1, KT, ldx) <= SM90_SMEM_LIMIT:
            tiles.append(m)
        covered = CLUSTER_SIZE * units_per_block(direction, cell, m)
    return tuple(tiles)


def plan_launch(direction, cell, dtype, H, B, *, sm_count, smem_limit, has_clusters,
                variant="auto") -> Plan | None:  # fmt: skip
    """The launch for one (layer, direction) on a device with `sm_count` SMs and
    `smem_limit` bytes of opt-in shared memory per block, or None if no variant holds its
    W_hh slice on chip. `variant` forces "grid" or "cluster" (None if that one cannot);
    "auto" is "grid"."""
    G = GATES[cell]
    K = H if direction == "forward" else G * H
    KT = math.ceil(K / MMA_K[dtype])
    ldx = KT * MMA_K[dtype]
    if has_clusters and variant == "cluster":
        # smallest tile whose 8 blocks cover H; the whole W_hh then sits in the cluster
        for m in cluster_m_tiles(direction, cell, dtype):
            units = units_per_block(direction, cell, m)
            if CLUSTER_SIZE * units < H:
                continue
            cluster_ldx = cluster_row_stride(dtype, ldx)
            smem = shared_bytes(dtype, m, 1, KT, cluster_ldx)
            if smem <= smem_limit:
                return Plan(direction, "cluster", m, 1, units, CLUSTER_SIZE * math.ceil(B / 8),
                            K, KT, cluster_ldx, 8, smem)  # fmt: skip
            break
    if variant == "cluster":
        return None
    n_tiles = 1 if B <= 8 else 2
    for m in FORWARD_M_TILES if direction == "forward" else BACKWARD_M_TILES:
        units = units_per_block(direction, cell, m)
        blocks = math.ceil(H / units)
        smem = shared_bytes(dtype, m, n_tiles, KT)
        # one block per SM: every block resident (cooperative launch) with all of its smem
        if blocks <= sm_count and smem <= smem_limit:
            rows = 8 * n_tiles
            return Plan(direction, "grid", m, n_tiles, units, blocks, K, KT, ldx,
                        math.ceil(B / rows) * rows, smem)  # fmt: skip
    return None


LSTMP_CLUSTER_REASON = ("LSTM proj_size runs in the grid variant of the cupy kernels only, not "
                        "GPURNN_CUPY_VARIANT=cluster (auto or grid runs it)")  # fmt: skip
PROJ_OUT_ROWS = 16  # projected outputs per block (kOutRows in rnn_lstmp.cuh): one m-tile


def plan_lstmp_launch(direction, dtype, H, P, B, *, sm_count, smem_limit,
                      has_clusters=False) -> Plan | None:  # fmt: skip
    """The grid launch of the LSTM-with-projection kernels (rnn_lstmp.cuh) for hidden size
    H and proj_size P, or None if the W_hh and W_hr slices of a block do not fit on chip
    (`has_clusters` is accepted as plan_launch takes it, and unused: no cluster variant).
    A block holds the units' GEMM rows (forward: their 4 gate rows of W_hh; backward: their
    W_hr columns; K = P both ways) and one 16-row tile of projected outputs (forward: W_hr
    rows, K = H; backward: W_hh columns, K = 4H)."""
    k = MMA_K[dtype]
    KT = math.ceil(P / k)
    out_K = H if direction == "forward" else GATES["lstm"] * H
    out_KT = math.ceil(out_K / k)
    n_tiles = 1 if B <= 8 else 2
    out_blocks = math.ceil(P / PROJ_OUT_ROWS)
    for m in FORWARD_M_TILES if direction == "forward" else BACKWARD_M_TILES:
        units = units_per_block(direction, "lstm", m)
        blocks = max(math.ceil(H / units), out_blocks)
        smem = shared_bytes(dtype, m, n_tiles, KT) + fragment_bytes(dtype, 1, out_KT)
        if blocks <= sm_count and smem <= smem_limit:
            rows = 8 * n_tiles
            return Plan(direction, "grid", m, n_tiles, units, blocks, P, KT, KT * k,
                        math.ceil(B / rows) * rows, smem, P, out_KT, out_KT * k)  # fmt: skip
    return None


def kernel_names(clusters: bool) -> list[str]:
    """Every instantiation `plan_launch` and `plan_lstmp_launch` can pick (with `clusters`:
    the sm_90 cluster ones too): what the compile tests build."""
    names = []
    for dtype in ELEM_TYPES:
        for direction, tiles in (("forward", FORWARD_M_TILES), ("backward", BACKWARD_M_TILES)):
            for m, n in itertools.product(tiles, N_TILES):
                plan = Plan(direction, "grid", m, n, 0, 0, 0, 0, 0, 0, 0, proj=1)
                names.append(plan.kernel_name("lstm", dtype))
    for cell in CELL_TYPES:
        for dtype in ELEM_TYPES:
            for direction, tiles in (("forward", FORWARD_M_TILES), ("backward", BACKWARD_M_TILES)):
                for m in tiles:
                    for n in N_TILES:
                        plan = Plan(direction, "grid", m, n, 0, 0, 0, 0, 0, 0, 0)
                        names.append(plan.kernel_name(cell, dtype))
                if clusters:
                    for m in cluster_m_tiles(direction, cell, dtype):
                        plan = Plan(direction, "cluster", m, 1, 0, 0, 0, 0, 0, 0, 0)
                        names.append(plan.kernel_name(cell, dtype))
    return names


# ------------------------------------------------------------------------------- pack


def _tf32_round(a: Tensor) -> Tensor:
    """fp32 -> nearest tf32 (ties away from zero), as `cvt.rna.tf32.f32` does."""
    bits = a.view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def pack_fragments(a: Tensor, m_tiles: int) -> Tensor:
    """A rows of every block, (P, rows <= 16*m_tiles, K) in the kernel's element dtype ->
    the packed fragments (P, fragment_bytes / 16, 4) int32, as `block_gemm` reads them.

    16-bit, mma.m16n8k16 (.row): lane 4g+q holds 4 words, word (c, r) = A[16mt + g + 8r]
    [16kt + 2q + 8c .. +1] at index 2c + r. fp32, mma.m16n8k8.tf32: word 2c + r =
    A[16mt + g + 8r][8kt + q + 4c], once rounded to tf32 (hi) and once the rest (lo), the lo
    plane 32 lanes after the hi plane.
    """
    P, rows, K = a.shape
    dtype = a.dtype
    k = MMA_K[dtype]
    KT = math.ceil(K / k)
    full = a.new_zeros(P, 16 * m_tiles, KT * k)
    full[:, :rows, :K] = a
    if dtype == torch.float32:
        v = full.view(P, m_tiles, 2, 8, KT, 2, 4)  # p, mt, r, g, kt, c, q
        v = v.permute(0, 1, 4, 3, 6, 5, 2)  # p, mt, kt, g, q, c, r
        hi = _tf32_round(v.contiguous())
        lo = v - hi
        out = torch.stack([hi, lo], dim=3)  # p, mt, kt, hi/lo, g, q, c, r
        return out.contiguous().view(torch.int32).reshape(P, -1, 4)
    v = full.view(P, m_tiles, 2, 8, KT, 2, 4, 2)  # p, mt, r, g, kt, c, q, pair
    v = v.permute(0, 1, 4, 3, 6, 5, 2, 7)  # p, mt, kt, g, q, c, r, pair
    return v.contiguous().view(torch.int32).reshape(P, -1, 4)


def block_rows(direction: str, cell: str, w_hh: Tensor, plan: Plan) -> Tensor:
    """(P, rows, K) A matrix of every block. Forward: block p's row g*units + u is W_hh row
    g*H + p*units + u (gate-major, so a unit's G gates sit `units` rows apart); backward:
    row u is W_hh column p*units + u. Rows of units >= H are 0."""
    G, H = GATES[cell], w_hh.shape[1]
    P, U = plan.blocks if plan.variant == "grid" else CLUSTER_SIZE, plan.units
    src = w_hh if direction == "forward" else w_hh.t()
    src = torch.cat([src, src.new_zeros(1, src.shape[1])])  # row -1: zeros
    unit = torch.arange(P, device=w_hh.device)[:, None] * U + torch.arange(U, device=w_hh.device)
    unit = torch.where(unit < H, unit, -1)  # (P, U)
    if direction == "forward":
        gate = torch.arange(G, device=w_hh.device)[None, :, None] * H
        idx = torch.where(unit[:, None, :] >= 0, gate + unit[:, None, :], -1).reshape(P, G * U)
    else:
        idx = unit
    return src[idx]


def _gather_rows(src: Tensor, blocks: int, per_block: int, n: int, groups: int = 1,
                 stride: int = 0) -> Tensor:  # fmt: skip
    """(blocks, groups * per_block, K): block p's row g * per_block + u is src row
    g * stride + p * per_block + u where p * per_block + u < n, else zeros."""
    src = torch.cat([src, src.new_zeros(1, src.shape[1])])  # row -1: zeros
    dev = src.device
    unit = torch.arange(blocks, device=dev)[:, None] * per_block
    unit = unit + torch.arange(per_block, device=dev)
    group = torch.arange(groups, device=dev)[None, :, None] * stride
    idx = torch.where(unit[:, None, :] < n, group + unit[:, None, :], -1)
    return src[idx.reshape(blocks, groups * per_block)]


def lstmp_block_rows(direction: str, w_hh: Tensor, w_hr: Tensor, plan: Plan):
    """The A matrices of the projected-LSTM kernels, (units' rows, outputs' rows), each
    (blocks, rows, K). Forward: block p's units' row g*units + u is W_hh row g*H + p*units + u
    (K = P), its output row r is W_hr row 16p + r (K = H). Backward: units' row u is W_hr
    column p*units + u (K = P), output row r is W_hh column 16p + r (K = 4H)."""
    P, H = w_hr.shape
    out_blocks = math.ceil(P / PROJ_OUT_ROWS)
    if direction == "forward":
        units = _gather_rows(w_hh, plan.blocks, plan.units, H, GATES["lstm"], H)
        outs = _gather_rows(w_hr, out_blocks, PROJ_OUT_ROWS, P)
    else:
        units = _gather_rows(w_hr.t(), plan.blocks, plan.units, H)
        outs = _gather_rows(w_hh.t(), out_blocks, PROJ_OUT_ROWS, P)
    return units, outs


# ------------------------------------------------------------------------------- compile


def kernel_source() -> str:
    """rnn_persistent.cu with its local #includes inlined: NVRTC gets one self-contained
    source and needs no include path (nor any CUDA header: the kernels use none)."""
    return _expand_includes(KERNEL_FILE, set())


def _expand_includes(name: str, seen: set[str]) -> str:
    if name in seen:
        return ""
    seen.add(name)
    text = importlib.resources.files(KERNEL_PACKAGE).joinpath(name).read_text()
    return re.sub(
        r'^#include "([^"]+)"\s*$',
        lambda m: _expand_includes(m.group(1), seen),
        text.replace("#pragma once", ""),
        flags=re.M,
    )


NVRTC_OPTIONS = ("-std=c++17",)
DEBUG_BOUNDS_OPTION = "-DGPURNN_DEBUG_BOUNDS"


def debug_bounds() -> bool:
    """GPURNN_DEBUG_BOUNDS=1: kernels built with bounds checks (read at every launch, so a
    test can switch it on for one case)."""
    return os.environ.get("GPURNN_DEBUG_BOUNDS", "0") not in ("", "0")


@functools.cache
def _compiled(device_index: int, name: str, cooperative: bool, checked: bool = False):
    """The kernel `name` (a template instantiation) for one device, compiled by NVRTC for
    that device's architecture (CuPy also caches the binary on disk across processes);
    `checked`: with the bounds checks of GPURNN_DEBUG_BOUNDS."""
    import cupy

    options = NVRTC_OPTIONS + ((DEBUG_BOUNDS_OPTION,) if checked else ())
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(
            code=kernel_source(),
            options=options,
            name_expressions=(name,),
            enable_cooperative_groups=cooperative,
        )
        return module.get_function(name)


def _launch(device: torch.device, plan: Plan, cell: str, dtype: torch.dtype, args) -> None:
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    cooperative = plan.variant == "grid"
    checked = debug_bounds()
    kernel = _compiled(index, plan.kernel_name(cell, dtype), cooperative, checked)
    if kernel.max_dynamic_shared_size_bytes < plan.shared_bytes:
        kernel.max_dynamic_shared_size_bytes = plan.shared_bytes
    stream = _cupy_stream(cupy, torch.cuda.current_stream(device), index)
    what = (f"{plan.kernel_name(cell, dtype)} on a grid of {plan.blocks} blocks x {THREADS} "
            f"threads with {plan.shared_bytes} B shared memory")  # fmt: skip
    try:
        with cupy.cuda.Device(index), stream:
            kernel((plan.blocks,), (THREADS,), args, shared_mem=plan.shared_bytes)
            if checked:  # report a bounds trap here, at the kernel that hit it
                stream.synchronize()
    except cupy.cuda.driver.CUDADriverError as e:
        if "COOPERATIVE_LAUNCH_TOO_LARGE" in str(e):
            raise RuntimeError(
                f"gpurnn cupy: the {what} cannot be co-resident on this GPU (another "
                f"context may be using SMs); refused by the driver: {e}"
            ) from e
        hint = " (GPURNN_DEBUG_BOUNDS: an index outside its buffer traps)" if checked else ""
        raise RuntimeError(f"gpurnn cupy: running {what} failed{hint}: {e}") from e


class _StreamHandle:
    """A raw stream handle behind the CUDA stream protocol (for a torch without it)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


def _cupy_stream(cupy, torch_stream, device_index: int):
    """torch's stream as a CuPy stream, through the CUDA stream protocol
    (`Stream.from_external`, CuPy >= 14, which deprecates `ExternalStream`)."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is None:  # CuPy 13
        return cupy.cuda.ExternalStream(torch_stream.cuda_stream, device_index)
    if not hasattr(torch_stream, "__cuda_stream__"):
        torch_stream = _StreamHandle(torch_stream.cuda_stream)
    return from_external(torch_stream)


def _ptr(t: Tensor | None) -> np.uint64:
    """A tensor's device address as the kernel's pointer argument (0 for absent)."""
    return np.uint64(0 if t is None else t.data_ptr())


def _i32(v: int) -> np.int32:
    return np.int32(v)


# ------------------------------------------------------------------------------- backend


class CupyBackend(Backend):
    name = "cupy"
    backward_uses_xg = False

    def __init__(self) -> None:
        self.variant = os.environ.get("GPURNN_CUPY_VARIANT", "auto")
        if self.variant not in ("auto", "grid", "cluster"):
            raise ValueError(
                f"GPURNN_CUPY_VARIANT must be auto, grid or cluster, got {self.variant!r}"
            )
        self._packed: dict = {}

    # ------------------------------------------------------------------ capability

    def unavailable_reason(self) -> str | None:
        try:
            import cupy
        except ImportError:
            return f"CuPy is not installed ({INSTALL_HINT})"
        except Exception as e:  # a broken install raises all sorts of things
            return f"cannot import cupy: {type(e).__name__}: {e}"
        if not torch.cuda.is_available():
            return "no CUDA device"
        try:
            cupy.cuda.nvrtc.getVersion()
        except Exception as e:
            return f"NVRTC unavailable: {e}"
        return None

    def unsupported_reason(self, cell, device, dtype, projected, hidden_size=None) -> str | None:
        if projected and self.variant == "cluster":
            return LSTMP_CLUSTER_REASON
        if dtype not in ELEM_TYPES:
            return f"dtype {dtype} not supported (float16, bfloat16, float32)"
        if device.type != "cuda":
            return f"tensors on {device.type}; the cupy backend needs CUDA tensors"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"needs compute capability 8.0+ (bf16 mma.sync), device has {major}.{minor}"
        # projected: whether the smallest proj_size fits (a larger one may not: the launch
        # then raises, naming the shape)
        if hidden_size is not None and any(
            self.plan(direction, cell, dtype, hidden_size, 1, device, proj=int(projected)) is None
            for direction in ("forward", "backward")
        ):
            return (
                f"hidden_size={hidden_size} {dtype} {cell} does not fit the persistent "
                "kernels' shared memory on this GPU"
            )
        return None

    def auto_reason(self, cell, projected):
        if projected:
            # compiled for sm_80 / sm_90 and checked on CPU, not yet run on a GPU: until the
            # projection kernels' GPU tests pass, "auto" leaves LSTMP layers to the others
            return "LSTM projections in the cupy kernels have not yet passed their GPU tests"
        return None

    def plan(self, direction, cell, dtype, H, B, device, proj=0) -> Plan | None:
        """The launch this backend would use, or None where W_hh does not fit on chip
        (for shape-aware dispatch: the kernels raise then). `proj`: LSTM proj_size."""
        props = torch.cuda.get_device_properties(device)
        if proj:
            return plan_lstmp_launch(direction, dtype, H, proj, B,
                                     sm_count=props.multi_processor_count,
                                     smem_limit=props.shared_memory_per_block_optin)  # fmt: skip
        return plan_launch(
            direction, cell, dtype, H, B,
            sm_count=props.multi_processor_count,
            smem_limit=props.shared_memory_per_block_optin,
            has_clusters=props.major >= 9,
            variant=self.variant,
        )  # fmt: skip

    def _plan_or_raise(self, direction, cell, dtype, H, B, device, proj=0) -> Plan:
        plan = self.plan(direction, cell, dtype, H, B, device, proj=proj)
        if plan is None:
            shape = f"hidden_size={H}" + (f" proj_size={proj}" if proj else "")
            raise RuntimeError(
                f"gpurnn cupy: {cell} {shape} {dtype} does not fit the persistent "
                f"{direction} kernel on this GPU (its W_hh slice per block exceeds shared "
                f"memory; variant={self.variant}); use backend='triton' or 'torch'"
            )
        return plan

    def workspace_spec(self, cell, T, B, H, dtype, save):
        # fields as the torch loop's (gpurnn.cells), always fp32: the kernels' gate math
        return loop_workspace_shape(cell, T, B, H, save), torch.float32

    # ------------------------------------------------------------------ weights

    def _fragments(self, direction: str, cell: str, w_hh: Tensor, plan: Plan) -> Tensor:
        """Packed W_hh for `plan`, reused while it is the same tensor object, unchanged
        (version counter), so that inference does not repack every call. Identity, not the
        address: a new tensor may reuse a freed one's memory."""
        key = (direction, cell, plan, id(w_hh))
        entry = self._packed.get(key)
        if entry is not None:
            ref, version, packed = entry
            if ref() is w_hh and version == w_hh._version:
                return packed
        packed = pack_fragments(block_rows(direction, cell, w_hh, plan), plan.m_tiles)
        self._remember(key, w_hh, packed)
        return packed

    def _remember(self, key, weight: Tensor, packed) -> None:
        if len(self._packed) >= 16:
            self._packed.clear()
        self._packed[key] = (weakref.ref(weight), weight._version, packed)

    def _lstmp_fragments(self, direction: str, w_hh: Tensor, w_hr: Tensor, plan: Plan):
        """(units', outputs') packed fragments of the projected LSTM, cached as `_fragments`
        while both weights are the same unchanged tensors."""
        key = ("lstmp", direction, plan, id(w_hh), id(w_hr))
        entry = self._packed.get(key)
        if entry is not None:
            ref, version, (packed, w_hr_ref, w_hr_version) = entry
            if (ref() is w_hh and version == w_hh._version and w_hr_ref() is w_hr
                    and w_hr_version == w_hr._version):  # fmt: skip
                return packed
        units, outs = lstmp_block_rows(direction, w_hh, w_hr, plan)
        packed = (pack_fragments(units, plan.m_tiles), pack_fragments(outs, 1))
        self._remember(key, w_hh, (packed, weakref.ref(w_hr), w_hr._version))
        return packed

    # ------------------------------------------------------------------ forward

    def forward(self, inputs, save):
        cell, xg, w_hh, h0, c0 = inputs.cell, inputs.xg, inputs.w_hh, inputs.h0, inputs.c0
        lengths, b_hn = inputs.lengths, inputs.b_hn
        if inputs.w_hr is not None:
            return self._forward_lstmp(inputs, save)
        T, B, GH = xg.shape
        H = GH // GATES[cell]
        dtype, dev = xg.dtype, xg.device
        f32 = dict(dtype=torch.float32, device=dev)
        h_state = h0.float().clone() if h0 is not None else torch.zeros(B, H, **f32)
        c_state = None
        if cell == "lstm":
            c_state = c0.float().clone() if c0 is not None else torch.zeros(B, H, **f32)
        y = torch.empty(T, B, H, dtype=dtype, device=dev)
        shape, ws_dtype = self.workspace_spec(cell, T, B, H, dtype, save)
        workspace = torch.empty(shape, dtype=ws_dtype, device=dev)
        if T * B * H > 0:
            plan = self._plan_or_raise("forward", cell, dtype, H, B, dev)
            # every tensor whose address goes to the kernel stays referenced until the launch
            # is queued (a freed temporary could be handed out and overwritten before it)
            xg = xg.contiguous()
            frags = self._fragments("forward", cell, w_hh.contiguous(), plan)
            b_hn32 = b_hn.float().contiguous() if b_hn is not None else None
            lengths = lengths.contiguous() if lengths is not None else None
            exchange, exchange_args = self._exchange(plan, dtype, dev)
            args = (
                _ptr(xg), _ptr(frags), _ptr(b_hn32), _ptr(lengths), _ptr(y),
                _ptr(workspace if workspace.numel() else None), _ptr(h_state), _ptr(c_state),
                _i32(T), _i32(B), _i32(H), _i32(plan.KT), _i32(int(inputs.reverse)), *exchange_args,
            )  # fmt: skip
            _launch(dev, plan, cell, dtype, args)
            del exchange
        c_T = c_state.to(dtype) if c_state is not None else None
        return y, h_state.to(dtype), c_T, workspace

    @staticmethod
    def _exchange(plan: Plan, dtype, dev) -> tuple[list[Tensor], list]:
        """(tensors to keep alive, kernel arguments). Grid variant: a zeroed (2, rows, ldx)
        exchange buffer (its padding must read as 0) and a zeroed barrier counter; cluster
        variant: only the shared-memory row stride."""
        if plan.variant == "cluster":
            return [], [_i32(plan.ldx)]
        xbuf = torch.zeros(2, plan.batch_rows, plan.ldx, dtype=dtype, device=dev)
        counter = torch.zeros(1, dtype=torch.int32, device=dev)
        return [xbuf, counter], [_ptr(xbuf), _i32(plan.ldx), _i32(plan.batch_rows), _ptr(counter)]

    # ------------------------------------------------------------------ backward

    def backward(self, inputs, y, workspace, dy, dh_T, dc_T):
        cell, w_hh, h0, c0, lengths = inputs.cell, inputs.w_hh, inputs.h0, inputs.c0, inputs.lengths
        reverse, b_hn = inputs.reverse, inputs.b_hn
        if inputs.w_hr is not None:
            return self._backward_lstmp(inputs, y, workspace, dy, dh_T, dc_T)
        T, B, H = y.shape
        G = GATES[cell]
        dtype, dev = y.dtype, y.device
        f32 = dict(dtype=torch.float32, device=dev)
        y = y.contiguous()
        dxg = torch.empty(T, B, G * H, dtype=dtype, device=dev)
        dhn = torch.empty(T, B, H, dtype=dtype, device=dev) if cell == "gru" else None
        dh_state = dh_T.float().clone()
        dc_state = dc_T.float().clone() if cell == "lstm" else None
        h_init = h0.float().contiguous() if h0 is not None else torch.zeros(B, H, **f32)
        c_init = None
        if cell == "lstm":
            c_init = c0.float().contiguous() if c0 is not None else torch.zeros(B, H, **f32)
        if T * B * H > 0:
            plan = self._plan_or_raise("backward", cell, dtype, H, B, dev)
            frags = self._fragments("backward", cell, w_hh.contiguous(), plan)
            lengths = lengths.contiguous() if lengths is not None else None
            dy = dy.contiguous()
            ws = workspace.contiguous() if workspace.numel() else None
            exchange, exchange_args = self._exchange(plan, dtype, dev)
            args = (
                _ptr(frags), _ptr(lengths), _ptr(y), _ptr(ws), _ptr(dy), _ptr(h_init),
                _ptr(c_init), _ptr(dxg), _ptr(dhn), _ptr(dh_state), _ptr(dc_state),
                _i32(T), _i32(B), _i32(H), _i32(plan.KT), _i32(int(inputs.reverse)), *exchange_args,
            )  # fmt: skip
            _launch(dev, plan, cell, dtype, args)
            del exchange
        else:
            dxg.zero_()
            if dhn is not None:
                dhn.zero_()

        dw_hh, db_hn = kernel_weight_grads(cell, dxg, dhn, y, h_init, lengths, reverse, b_hn)
        return Grads(
            xg=dxg,
            w_hh=dw_hh.to(w_hh.dtype),
            h0=dh_state.to(h0.dtype) if h0 is not None else None,
            c0=dc_state.to(c0.dtype) if c0 is not None else None,
            b_hn=db_hn,
            w_hr=None,
        )

    # ------------------------------------------------------------------ LSTM with projection

    def _check_lstmp_variant(self) -> None:
        if self.variant == "cluster":
            raise RuntimeError(f"gpurnn cupy: {LSTMP_CLUSTER_REASON}")

    @staticmethod
    def _lstmp_exchange(plan: Plan, dtype, dev) -> tuple[list[Tensor], list]:
        """Zeroed exchanges of the projected kernels (their padding must read as 0): the
        P-wide one (forward h, backward dh) and the outputs' GEMM input (forward m, H wide;
        backward dgates, 4H wide), with one zeroed barrier counter."""
        xbuf = torch.zeros(2, plan.batch_rows, plan.ldx, dtype=dtype, device=dev)
        obuf = torch.zeros(2, plan.batch_rows, plan.out_ldx, dtype=dtype, device=dev)
        counter = torch.zeros(1, dtype=torch.int32, device=dev)
        args = [_ptr(xbuf), _i32(plan.ldx), _ptr(obuf), _i32(plan.out_ldx),
                _i32(plan.batch_rows), _ptr(counter)]  # fmt: skip
        return [xbuf, obuf, counter], args

    def _forward_lstmp(self, inputs, save):
        self._check_lstmp_variant()
        xg, w_hh, w_hr, h0, c0, lengths = (inputs.xg, inputs.w_hh, inputs.w_hr, inputs.h0,
                                           inputs.c0, inputs.lengths)  # fmt: skip
        T, B, GH = xg.shape
        H, P = GH // GATES["lstm"], w_hr.shape[0]
        dtype, dev = xg.dtype, xg.device
        f32 = dict(dtype=torch.float32, device=dev)
        h_state = h0.float().clone() if h0 is not None else torch.zeros(B, P, **f32)
        c_state = c0.float().clone() if c0 is not None else torch.zeros(B, H, **f32)
        y = torch.empty(T, B, P, dtype=dtype, device=dev)
        shape, ws_dtype = self.workspace_spec("lstm", T, B, H, dtype, save)
        workspace = torch.empty(shape, dtype=ws_dtype, device=dev)
        if T * B * H > 0:
            plan = self._plan_or_raise("forward", "lstm", dtype, H, B, dev, proj=P)
            xg = xg.contiguous()
            units, outs = self._lstmp_fragments("forward", w_hh.contiguous(),
                                                w_hr.contiguous(), plan)  # fmt: skip
            lengths = lengths.contiguous() if lengths is not None else None
            exchange, exchange_args = self._lstmp_exchange(plan, dtype, dev)
            args = (
                _ptr(xg), _ptr(units), _ptr(outs), _ptr(lengths), _ptr(y),
                _ptr(workspace if workspace.numel() else None), _ptr(h_state), _ptr(c_state),
                _i32(T), _i32(B), _i32(H), _i32(P), _i32(plan.KT), _i32(plan.out_KT),
                _i32(int(inputs.reverse)), *exchange_args,
            )  # fmt: skip
            _launch(dev, plan, "lstm", dtype, args)
            del exchange
        return y, h_state.to(dtype), c_state.to(dtype), workspace

    def _backward_lstmp(self, inputs, y, workspace, dy, dh_T, dc_T):
        self._check_lstmp_variant()
        w_hh, w_hr, h0, c0, lengths = (inputs.w_hh, inputs.w_hr, inputs.h0, inputs.c0,
                                       inputs.lengths)  # fmt: skip
        T, B, P = y.shape
        H = w_hr.shape[1]
        dtype, dev = y.dtype, y.device
        f32 = dict(dtype=torch.float32, device=dev)
        y = y.contiguous()
        dxg = torch.empty(T, B, GATES["lstm"] * H, dtype=dtype, device=dev)
        dhp = torch.empty(T, B, P, dtype=dtype, device=dev)
        dh_state = dh_T.float().clone()
        dc_state = dc_T.float().clone() if dc_T is not None else torch.zeros(B, H, **f32)
        c_init = c0.float().contiguous() if c0 is not None else torch.zeros(B, H, **f32)
        if T * B * H > 0:
            plan = self._plan_or_raise("backward", "lstm", dtype, H, B, dev, proj=P)
            units, outs = self._lstmp_fragments("backward", w_hh.contiguous(),
                                                w_hr.contiguous(), plan)  # fmt: skip
            lengths = lengths.contiguous() if lengths is not None else None
            dy = dy.contiguous()
            workspace = workspace.contiguous()
            exchange, exchange_args = self._lstmp_exchange(plan, dtype, dev)
            args = (
                _ptr(units), _ptr(outs), _ptr(lengths), _ptr(workspace), _ptr(dy),
                _ptr(c_init), _ptr(dxg), _ptr(dhp), _ptr(dh_state), _ptr(dc_state),
                _i32(T), _i32(B), _i32(H), _i32(P), _i32(plan.KT), _i32(plan.out_KT),
                _i32(int(inputs.reverse)), *exchange_args,
            )  # fmt: skip
            _launch(dev, plan, "lstm", dtype, args)
            del exchange
        else:
            dxg.zero_()
            dhp.zero_()

        dw_hr = projection_grad(dhp, workspace, H)
        h_init = h0 if h0 is not None else y.new_zeros(B, P)
        dw_hh, _ = kernel_weight_grads("lstm", dxg, None, y, h_init, lengths, inputs.reverse, None)
        return Grads(
            xg=dxg,
            w_hh=dw_hh.to(w_hh.dtype),
            h0=dh_state.to(h0.dtype) if h0 is not None else None,
            c0=dc_state.to(c0.dtype) if c0 is not None else None,
            b_hn=None,
            w_hr=dw_hr.to(w_hr.dtype),
        )
