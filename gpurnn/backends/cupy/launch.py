"""Launching the cupy backend's kernels: the compiled kernel for a plan, torch's current
stream as a CuPy stream, kernel arguments with exact C types, and driver errors turned into
messages that name the launch.

Imports CuPy only inside functions (CuPy is optional).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gpurnn.backends.cupy.compile import compiled, debug_bounds
from gpurnn.backends.cupy.plan import THREADS, Plan


def launch_kernel(device: torch.device, plan: Plan, cell: str, dtype: torch.dtype, args) -> None:
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    cooperative = plan.variant == "grid"
    checked = debug_bounds()
    kernel = compiled(index, plan.kernel_name(cell, dtype), cooperative, checked)
    if kernel.max_dynamic_shared_size_bytes < plan.shared_bytes:
        kernel.max_dynamic_shared_size_bytes = plan.shared_bytes
    stream = cupy_stream(cupy, torch.cuda.current_stream(device), index)
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


def cupy_stream(cupy, torch_stream, device_index: int):
    """torch's stream as a CuPy stream, through the CUDA stream protocol
    (`Stream.from_external`, CuPy >= 14, which deprecates `ExternalStream`)."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is None:  # CuPy 13
        return cupy.cuda.ExternalStream(torch_stream.cuda_stream, device_index)
    if not hasattr(torch_stream, "__cuda_stream__"):
        torch_stream = _StreamHandle(torch_stream.cuda_stream)
    return from_external(torch_stream)


def ptr(t: Tensor | None) -> np.uint64:
    """A tensor's device address as the kernel's pointer argument (0 for absent)."""
    return np.uint64(0 if t is None else t.data_ptr())


def i32(v: int) -> np.int32:
    return np.int32(v)
