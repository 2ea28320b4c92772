"""The cupy backend's glue, on CPU: every kernel argument it passes has the kernel's exact C
type (read off the CUDA source), an empty sequence launches nothing, torch's stream reaches
CuPy, and GPURNN_DEBUG_BOUNDS switches the bounds-checked build.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

from gpurnn.backends import cupy as cupy_backend
from gpurnn.backends.base import Inputs
from gpurnn.backends.cupy import compile as cupy_compile
from gpurnn.backends.cupy import launch as cupy_launch
from gpurnn.backends.cupy.plan import plan_launch, plan_lstmp_launch
from gpurnn.backends.cupy.plan_ksplit import plan_ksplit_launch
from gpurnn.cells import GATES
from tests.test_cupy_plan import A100, CELLS, H100

# ------------------------------------------------------------------ launch arguments


def _kernel_param_types(variant: str, direction: str) -> list[str]:
    """'ptr' / 'int' for each parameter of the kernel, read off the CUDA source (variant
    "lstmp": the grid kernels of the LSTM with projection)."""
    src = cupy_compile.kernel_source()

    def macro(name):
        body = re.search(rf"#define {name}(.*?)\n(#define|\n)", src, re.S).group(1)
        return body.replace("\\", " ").split(",")

    if variant == "lstmp":
        params = macro(f"GPURNN_LSTMP_{direction.upper()}_PARAMS")
        extra = macro("GPURNN_LSTMP_EXCHANGE_PARAMS")
    elif variant == "ksplit":
        params = macro(f"GPURNN_{direction.upper()}_PARAMS")
        extra = macro("GPURNN_KSPLIT_PARAMS")
    else:
        params = macro(f"GPURNN_{direction.upper()}_PARAMS")
        extra = {"grid": ["void* xbuf", "int ldx", "int Bpad", "u32* sync_counter"],
                 "cluster": ["int ldx", "u32* error"]}[variant]  # fmt: skip
    return ["ptr" if "*" in p else "int" for p in [*params, *extra]]


@pytest.mark.parametrize("variant", ["grid", "cluster", "ksplit"])
@pytest.mark.parametrize("cell", CELLS)
def test_launch_arguments_have_exact_c_types(monkeypatch, variant, cell):
    """Without a GPU: run the backend's glue on CPU tensors with the launch captured, and
    check every argument against the kernel's parameter list (pointers as uint64, ints as
    int32: CuPy passes numpy scalars with their own size)."""
    launches = []
    monkeypatch.setattr(cupy_backend, "launch_kernel", lambda *a: launches.append(a))
    backend = cupy_backend.CupyBackend()
    device = A100 if variant == "grid" else H100

    def plan(direction, cell_, dtype, H, B, dev, proj=0):
        assert not proj
        if variant == "ksplit":
            return plan_ksplit_launch(direction, cell_, dtype, H, B, **device).plan
        return plan_launch(direction, cell_, dtype, H, B, **device, variant=variant)

    monkeypatch.setattr(backend, "plan", plan)
    T, B, H, G = 5, 3, 24, GATES[cell]
    xg, w_hh = torch.randn(T, B, G * H), torch.randn(G * H, H)
    b_hn = torch.randn(H) if cell == "gru" else None
    inputs = Inputs(cell, xg, w_hh, reverse=True, b_hn=b_hn)
    y, h_T, c_T, ws = backend.forward(inputs, True)
    assert ws.shape == backend.workspace_spec(cell, T, B, H, xg.dtype, True)[0]
    backend.backward(inputs._replace(xg=None), y.zero_(), ws,
                     torch.randn(T, B, H), torch.randn(B, H),
                     torch.randn(B, H) if cell == "lstm" else None)  # fmt: skip
    for (_, plan_, _, _, args), direction in zip(launches, ["forward", "backward"]):
        assert plan_.variant == variant and plan_.direction == direction
        kinds = _kernel_param_types(variant, direction)
        assert len(args) == len(kinds)
        for arg, kind in zip(args, kinds):
            assert type(arg) is (np.uint64 if kind == "ptr" else np.int32), (arg, kind)


def test_lstmp_launch_arguments_have_exact_c_types(monkeypatch):
    """As above for the LSTM with projection; the glue's dW_hr and dW_hh have their weights'
    shapes."""
    launches = []
    monkeypatch.setattr(cupy_backend, "launch_kernel", lambda *a: launches.append(a))
    backend = cupy_backend.CupyBackend()

    def plan(direction, cell_, dtype, H, B, dev, proj=0):
        assert proj
        return plan_lstmp_launch(direction, dtype, H, proj, B, **A100)

    monkeypatch.setattr(backend, "plan", plan)
    T, B, H, P = 5, 3, 24, 7
    xg, w_hh, w_hr = torch.randn(T, B, 4 * H), torch.randn(4 * H, P), torch.randn(P, H)
    inputs = Inputs("lstm", xg, w_hh, torch.randn(B, P), torch.randn(B, H), reverse=True,
                    w_hr=w_hr)  # fmt: skip
    y, h_T, c_T, ws = backend.forward(inputs, True)
    assert y.shape == (T, B, P) and h_T.shape == (B, P) and c_T.shape == (B, H)
    assert ws.shape == backend.workspace_spec("lstm", T, B, H, xg.dtype, True)[0]
    dy, dh_T, dc_T = torch.randn(T, B, P), torch.randn(B, P), torch.randn(B, H)
    grads = backend.backward(inputs._replace(xg=None), y.zero_(), ws.zero_(), dy, dh_T, dc_T)
    assert grads.w_hh.shape == w_hh.shape and grads.w_hr.shape == w_hr.shape
    assert grads.h0.shape == (B, P) and grads.c0.shape == (B, H) and grads.xg.shape == xg.shape
    for (_, plan_, cell, _, args), direction in zip(launches, ["forward", "backward"]):
        assert plan_.proj == P and plan_.direction == direction and cell == "lstm"
        kinds = _kernel_param_types("lstmp", direction)
        assert len(args) == len(kinds)
        for arg, kind in zip(args, kinds):
            assert type(arg) is (np.uint64 if kind == "ptr" else np.int32), (arg, kind)


def test_empty_sequence_launches_nothing(monkeypatch):
    monkeypatch.setattr(cupy_backend, "launch_kernel", lambda *a: pytest.fail("launched"))
    backend = cupy_backend.CupyBackend()
    h0 = torch.randn(2, 4)
    inputs = Inputs("lstm", torch.randn(0, 2, 16), torch.randn(16, 4), h0, torch.randn(2, 4))
    y, h_T, c_T, _ = backend.forward(inputs, False)
    assert y.shape == (0, 2, 4) and torch.equal(h_T, h0)


# ------------------------------------------------------------------ stream and debug build


class _TorchLikeStream:
    def __init__(self, handle, protocol):
        self.cuda_stream = handle
        if protocol:
            self.__cuda_stream__ = lambda: (0, handle)


@pytest.mark.parametrize("protocol", [True, False], ids=["stream-protocol", "raw-handle"])
def test_torch_stream_reaches_cupy_through_from_external(protocol):
    """torch's current stream becomes a CuPy stream with the same handle, through
    `Stream.from_external` (no GPU needed: the handle is only wrapped)."""
    cupy = pytest.importorskip("cupy")
    if not hasattr(cupy.cuda.Stream, "from_external"):
        pytest.skip("CuPy < 14 has no Stream.from_external")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # ExternalStream is deprecated
        stream = cupy_launch.cupy_stream(cupy, _TorchLikeStream(0x1234, protocol), 0)
    assert isinstance(stream, cupy.cuda.Stream) and stream.ptr == 0x1234


@pytest.mark.parametrize("value, checked", [(None, False), ("0", False), ("", False),
                                            ("1", True)])  # fmt: skip
def test_debug_bounds_switch(monkeypatch, value, checked):
    if value is None:
        monkeypatch.delenv("GPURNN_DEBUG_BOUNDS", raising=False)
    else:
        monkeypatch.setenv("GPURNN_DEBUG_BOUNDS", value)
    assert cupy_compile.debug_bounds() is checked


def test_variant_choice_on_an_h100(monkeypatch):
    """Which variant `plan` picks, on a stand-in H100's properties: `auto` is the grid
    kernels until the K-split variant's GPU tests passed on the card, then K-split where it
    has a plan (falling back to the grid kernels where not); `ksplit` forced says why it
    has no plan."""
    from types import SimpleNamespace

    props = SimpleNamespace(multi_processor_count=132, shared_memory_per_block_optin=227 * 1024,
                            major=9)  # fmt: skip
    monkeypatch.setattr(cupy_backend.torch.cuda, "get_device_properties", lambda device: props)
    dev = torch.device("cuda", 0)
    cleared = {"yes": False}
    monkeypatch.setattr(cupy_backend.CupyBackend, "_ksplit_cleared",
                        staticmethod(lambda device: cleared["yes"]))  # fmt: skip
    auto = cupy_backend.CupyBackend()
    assert auto.plan("forward", "lstm", torch.bfloat16, 768, 16, dev).variant == "grid"
    cleared["yes"] = True
    assert auto.plan("forward", "lstm", torch.bfloat16, 768, 16, dev).variant == "ksplit"
    assert auto.plan("backward", "gru", torch.float16, 768, 64, dev).variant == "ksplit"
    # too large for a resident K-split grid: the grid kernels, where they fit
    big = auto.plan("forward", "rnn_tanh", torch.bfloat16, 4096, 16, dev)
    assert big is None or big.variant == "grid"
    assert auto.plan("forward", "lstm", torch.bfloat16, 768, 16, dev, proj=128).proj == 128
    monkeypatch.setenv("GPURNN_CUPY_VARIANT", "ksplit")
    forced = cupy_backend.CupyBackend()
    assert forced.plan("forward", "lstm", torch.bfloat16, 4096, 16, dev) is None
    with pytest.raises(RuntimeError, match="no K-split plan(.|\n)*grid kernels run it"):
        forced._plan_or_raise("forward", "lstm", torch.bfloat16, 4096, 16, dev)
    monkeypatch.setenv("GPURNN_CUPY_VARIANT", "bogus")
    with pytest.raises(ValueError, match="ksplit"):
        cupy_backend.CupyBackend()
