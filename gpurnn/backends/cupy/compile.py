"""Building the cupy backend's CUDA kernels: the one self-contained source NVRTC compiles
(kernels/cuda/rnn_persistent.cu with its local includes inlined), the C++ names of the
template arguments, the compile options, and the per-device cache of compiled kernels.

Imports CuPy only inside `compiled` (CuPy is optional). May import torch; nothing of the
backend's planning or launching.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import re

import torch

KERNEL_FILE = "rnn_persistent.cu"
KERNEL_PACKAGE = "gpurnn.kernels.cuda"

# C++ names of the template arguments (rnn_cells.cuh, rnn_common.cuh)
CELL_TYPES = {"lstm": "LstmCell", "gru": "GruCell", "rnn_tanh": "RnnTanhCell",
              "rnn_relu": "RnnReluCell"}  # fmt: skip
ELEM_TYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


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
def compiled(device_index: int, name: str, cooperative: bool, checked: bool = False):
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
