"""The `cupy` backend: CUDA C++ persistent kernels (kernels/cuda/rnn_persistent.cu), compiled
at run time by NVRTC through CuPy and launched on torch's current stream.

Kernels (kernels/cuda/rnn_persistent.cu): one skeleton, the cell a template parameter
(rnn_cells.cuh), W_hh held in shared memory in tensor-core fragment order, batch in the
mma's n=8 dimension. Three variants: `grid` (one block per unit slice, h exchanged through L2,
a grid barrier per step: cooperative launch) and `cluster` (sm_90, rnn_cluster.cuh: all of
W_hh in one 8-block cluster, h exchanged through distributed shared memory with
asynchronous stores completing on mbarriers, no barrier between steps; one cluster per 8
batch rows), and `ksplit` (sm_90, rnn_ksplit.cuh: clusters of C CTAs split the units, the
CTAs of a cluster split K and reduce their partial sums over distributed shared memory, h
exchanged between clusters through L2, each CTA loading only its K slice). LSTM with
projection (proj_size) has its own grid kernels (rnn_lstmp.cuh: two phases and two grid
barriers a step) and neither cluster variant.

The package, one room per concern:
  compile   the self-contained kernel source, NVRTC options, compiled kernels cached per
            device and instantiation (cupy.RawModule; CuPy caches binaries on disk too)
  plan      `plan_launch` / `plan_lstmp_launch`: which variant, tile sizes and grid for
            (cell, dtype, H, B) on a device; pure Python, testable without a GPU
  plan_ksplit  the K-split variant's cluster size and tiles, from shared memory, the
            resident grid and a per-step cost model, with readable reasons
  pack      `pack_fragments`: W_hh rows/columns for each block, padded and permuted into the
            order the mma instructions read them (torch ops, on the weights' device)
  launch    `launch_kernel` on torch's current stream, with exact C argument types
  here      `CupyBackend`: buffers, packed-weight cache, the launches of forward and
            backward, and the weight gradients. T and B are run-time arguments, so a new
            sequence length or batch size never recompiles.

CuPy is optional: this module imports it only inside functions, and `unavailable_reason`
says why the backend cannot run (not installed, no GPU, no NVRTC).

Environment: GPURNN_CUPY_VARIANT = auto (default) | grid | cluster | ksplit forces a variant
where it can run (for measuring what each buys). `auto` is the grid variant, or the K-split
one where `plan_ksplit_launch` has a plan and the variant's GPU tests passed on this card
(KSPLIT_RECORD in gpurnn/dispatch.json); the cluster variant's barrier-free step has not yet
run on a GPU, so it is used only when asked for.
GPURNN_DEBUG_BOUNDS=1 compiles the kernels with every buffer index checked
(kernels/cuda/rnn_index.cuh: a trap at the first bad access) and synchronizes after each
launch, so a failure is reported at the kernel that caused it.

Workspace: the torch backend's layout, fp32: lstm (T, B, 5H) i, f, g, o, c (with projection
too: m = o * tanh(c) follows from it, for dW_hr); gru (T, B, 4H) r, z, n, hn; rnn none.
Entries of steps past a sequence's end are 0.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch
from torch import Tensor

from gpurnn.backends.base import Backend, Grads
from gpurnn.backends.common import kernel_weight_grads, loop_workspace_shape, projection_grad
from gpurnn.backends.cupy.compile import ELEM_TYPES
from gpurnn.backends.cupy.launch import i32, launch_kernel, ptr
from gpurnn.backends.cupy.pack import (
    block_rows,
    ksplit_block_rows,
    lstmp_block_rows,
    pack_fragments,
)
from gpurnn.backends.cupy.plan import (
    LSTMP_CLUSTER_REASON,
    MMA_K,
    Plan,
    plan_launch,
    plan_lstmp_launch,
)
from gpurnn.backends.cupy.plan_ksplit import plan_ksplit_launch
from gpurnn.cells import GATES

log = logging.getLogger("gpurnn")

INSTALL_HINT = "pip install gpurnn[cupy13] (CUDA 13) or gpurnn[cupy12] (CUDA 12)"
VARIANTS = ("auto", "grid", "cluster", "ksplit")
# the name the K-split variant's GPU test runs are recorded under (benchmarks/gpu_tests.csv,
# `python -m gpurnn dispatch --record-gpu-tests cupy-ksplit`): `auto` uses the variant on a
# card only once its latest conclusive record there passed
KSPLIT_RECORD = "cupy-ksplit"
SYNC_ERROR = 1 << 30  # kSyncError (rnn_ksplit.cuh): the counter of a launch whose wait gave up


class CupyBackend(Backend):
    name = "cupy"
    backward_uses_xg = False

    def __init__(self) -> None:
        self.variant = os.environ.get("GPURNN_CUPY_VARIANT", "auto")
        if self.variant not in VARIANTS:
            raise ValueError(
                f"GPURNN_CUPY_VARIANT must be one of {', '.join(VARIANTS)}, got {self.variant!r}"
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
        if projected and self.variant in ("cluster", "ksplit"):
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
        device_kw = dict(sm_count=props.multi_processor_count,
                         smem_limit=props.shared_memory_per_block_optin,
                         has_clusters=props.major >= 9)  # fmt: skip
        if self.variant == "ksplit" or (self.variant == "auto" and self._ksplit_cleared(device)):
            choice = plan_ksplit_launch(direction, cell, dtype, H, B, **device_kw)
            log.debug("gpurnn cupy: %s", choice.describe())
            if choice.plan is not None or self.variant == "ksplit":
                return choice.plan
        variant = "grid" if self.variant == "ksplit" else self.variant
        return plan_launch(direction, cell, dtype, H, B, **device_kw, variant=variant)

    @staticmethod
    def _ksplit_cleared(device) -> bool:
        """Whether the K-split variant's GPU tests passed on this card (`auto` uses it only
        then: until they have run on a GPU, nothing but its CPU evidence vouches for it)."""
        from gpurnn import dispatch

        return dispatch.gpu_tests_passed(KSPLIT_RECORD, dispatch.card_name(device))

    def _plan_or_raise(self, direction, cell, dtype, H, B, device, proj=0) -> Plan:
        plan = self.plan(direction, cell, dtype, H, B, device, proj=proj)
        if plan is None and self.variant == "ksplit" and not proj:
            props = torch.cuda.get_device_properties(device)
            choice = plan_ksplit_launch(direction, cell, dtype, H, B,
                                        sm_count=props.multi_processor_count,
                                        smem_limit=props.shared_memory_per_block_optin,
                                        has_clusters=props.major >= 9)  # fmt: skip
            raise RuntimeError(
                f"gpurnn cupy: no K-split plan (GPURNN_CUPY_VARIANT=ksplit):\n"
                f"{choice.describe()}\nuse GPURNN_CUPY_VARIANT=auto or grid"
            )
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
        if plan.variant == "ksplit":
            C = plan.cluster_size
            rows = ksplit_block_rows(direction, cell, w_hh, plan.blocks // C, plan.units, C,
                                     plan.KT * MMA_K[w_hh.dtype], plan.m_tiles)  # fmt: skip
        else:
            rows = block_rows(direction, cell, w_hh, plan)
        packed = pack_fragments(rows, plan.m_tiles)
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
                ptr(xg), ptr(frags), ptr(b_hn32), ptr(lengths), ptr(y),
                ptr(workspace if workspace.numel() else None), ptr(h_state), ptr(c_state),
                i32(T), i32(B), i32(H), i32(plan.KT), i32(int(inputs.reverse)), *exchange_args,
            )  # fmt: skip
            self._check_counter_range(plan, T)
            launch_kernel(dev, plan, cell, dtype, args)
            self._check_waits(plan, exchange)
            del exchange
        c_T = c_state.to(dtype) if c_state is not None else None
        return y, h_state.to(dtype), c_T, workspace

    @staticmethod
    def _exchange(plan: Plan, dtype, dev) -> tuple[list[Tensor], list]:
        """(tensors to keep alive, kernel arguments). Grid variant: a zeroed (2, rows, ldx)
        exchange buffer (its padding must read as 0) and a zeroed barrier counter; K-split:
        the same and the layout (units per cluster, warps per m-tile); cluster variant: the
        shared-memory row stride and a zeroed flag its waits set when they give up. The
        flag (the counter for K-split) comes last in the list of tensors."""
        if plan.variant == "cluster":
            error = torch.zeros(1, dtype=torch.int32, device=dev)
            return [error], [i32(plan.ldx), ptr(error)]
        xbuf = torch.zeros(2, plan.batch_rows, plan.ldx, dtype=dtype, device=dev)
        counter = torch.zeros(1, dtype=torch.int32, device=dev)
        args = [ptr(xbuf), i32(plan.ldx), i32(plan.batch_rows), ptr(counter)]
        if plan.variant == "ksplit":
            args += [i32(plan.units), i32(plan.k_warps)]
        return [xbuf, counter], args

    @staticmethod
    def _check_waits(plan: Plan, exchange: list[Tensor]) -> None:
        """Raise if a bounded wait of the launch gave up (cluster and K-split variants: a
        CTA was not running, so the results are garbage). Reads the flag back, which waits
        for the launch; not while a CUDA graph is being captured."""
        flag_tensor = exchange[-1]
        if plan.variant == "grid" or (
            flag_tensor.is_cuda and torch.cuda.is_current_stream_capturing()
        ):
            return
        flag = int(flag_tensor.item())
        if (plan.variant == "cluster" and flag) or flag >= SYNC_ERROR:
            raise RuntimeError(
                f"gpurnn cupy: a wait of the {plan.variant} kernel gave up (its {plan.blocks} "
                f"CTAs in clusters of {plan.cluster_size or 8} did not all run concurrently: is "
                "another kernel holding SMs?). Results are invalid; GPURNN_CUPY_VARIANT=grid "
                "avoids clusters."
            )

    @staticmethod
    def _check_counter_range(plan: Plan, T: int) -> None:
        if plan.variant == "ksplit" and (T + 2) * plan.blocks >= SYNC_ERROR:
            raise RuntimeError(f"gpurnn cupy: T={T} is too long for one K-split launch")

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
                ptr(frags), ptr(lengths), ptr(y), ptr(ws), ptr(dy), ptr(h_init),
                ptr(c_init), ptr(dxg), ptr(dhn), ptr(dh_state), ptr(dc_state),
                i32(T), i32(B), i32(H), i32(plan.KT), i32(int(inputs.reverse)), *exchange_args,
            )  # fmt: skip
            self._check_counter_range(plan, T)
            launch_kernel(dev, plan, cell, dtype, args)
            self._check_waits(plan, exchange)
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
        if self.variant in ("cluster", "ksplit"):
            raise RuntimeError(f"gpurnn cupy: {LSTMP_CLUSTER_REASON}")

    @staticmethod
    def _lstmp_exchange(plan: Plan, dtype, dev) -> tuple[list[Tensor], list]:
        """Zeroed exchanges of the projected kernels (their padding must read as 0): the
        P-wide one (forward h, backward dh) and the outputs' GEMM input (forward m, H wide;
        backward dgates, 4H wide), with one zeroed barrier counter."""
        xbuf = torch.zeros(2, plan.batch_rows, plan.ldx, dtype=dtype, device=dev)
        obuf = torch.zeros(2, plan.batch_rows, plan.out_ldx, dtype=dtype, device=dev)
        counter = torch.zeros(1, dtype=torch.int32, device=dev)
        args = [ptr(xbuf), i32(plan.ldx), ptr(obuf), i32(plan.out_ldx),
                i32(plan.batch_rows), ptr(counter)]  # fmt: skip
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
                ptr(xg), ptr(units), ptr(outs), ptr(lengths), ptr(y),
                ptr(workspace if workspace.numel() else None), ptr(h_state), ptr(c_state),
                i32(T), i32(B), i32(H), i32(P), i32(plan.KT), i32(plan.out_KT),
                i32(int(inputs.reverse)), *exchange_args,
            )  # fmt: skip
            launch_kernel(dev, plan, "lstm", dtype, args)
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
                ptr(units), ptr(outs), ptr(lengths), ptr(workspace), ptr(dy),
                ptr(c_init), ptr(dxg), ptr(dhp), ptr(dh_state), ptr(dc_state),
                i32(T), i32(B), i32(H), i32(P), i32(plan.KT), i32(plan.out_KT),
                i32(int(inputs.reverse)), *exchange_args,
            )  # fmt: skip
            launch_kernel(dev, plan, "lstm", dtype, args)
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
