"""Backend registry and selection.

Names: "triton", "cupy", "torch", "numpy", and "auto" (the fastest that runs the case).
Which one runs, most specific first:
  1. the `backend=` keyword of a module or of `gpurnn.recurrence`,
  2. `with gpurnn.use_backend(name):`,
  3. the environment variable GPURNN_BACKEND,
  4. "auto".
A backend asked for by name runs or raises a clear error; "auto" falls back quietly to
the next one and says so at debug log level.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os

# not `import torch`: that would bind the name of our own submodule gpurnn.backends.torch
import torch as _torch

from gpurnn.backends.base import Backend, Grads, Inputs, LayerNormGrads, Regularization

__all__ = [
    "Backend",
    "Grads",
    "Inputs",
    "Regularization",
    "LayerNormGrads",
    "BACKENDS",
    "available_backends",
    "get_backend",
    "choose_backend",
    "use_backend",
    "requested_backend",
]

log = logging.getLogger("gpurnn")

# name -> "module:class"; "auto" tries them in this order
_IMPLEMENTATIONS = {
    "triton": "gpurnn.backends.triton:TritonBackend",
    "cupy": "gpurnn.backends.cupy:CupyBackend",
    "torch": "gpurnn.backends.torch:TorchBackend",
    "numpy": "gpurnn.backends.numpy:NumpyBackend",
}
# "auto" never picks numpy: it is the reference, not a fast path
_AUTO_ORDER = ("triton", "cupy", "torch")
_GPU_KERNELS = ("triton", "cupy")
BACKENDS = (*_IMPLEMENTATIONS, "auto")

_instances: dict[str, Backend] = {}
_import_errors: dict[str, str] = {}
_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gpurnn_backend", default=None
)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend(name: str) -> Backend | None:
    """The backend object, or None if its module cannot be imported here."""
    _check_name(name)
    if name not in _instances and name not in _import_errors:
        module, cls = _IMPLEMENTATIONS[name].split(":")
        try:
            _instances[name] = getattr(importlib.import_module(module), cls)()
        except ModuleNotFoundError as e:
            _import_errors[name] = (
                "not part of this version of gpurnn yet"
                if e.name == module
                else f"cannot import {module}: {e}"
            )
        except ImportError as e:
            _import_errors[name] = f"cannot import {module}: {e}"
    return _instances.get(name)


def check_deferred() -> None:
    """Raise what a backend's launches have flagged since the last check but not raised yet
    (the triton backend defers its check of a timed-out wait to here, so that a module's
    layers run without a host sync each): one host sync per backend that deferred any."""
    for be in list(_instances.values()):
        be.check_deferred()


def _unavailable_reason(name: str) -> str | None:
    backend = get_backend(name)
    return _import_errors[name] if backend is None else backend.unavailable_reason()


def available_backends() -> dict[str, str | None]:
    """Every backend name -> None if it works on this machine, else the reason it does not."""
    return {name: _unavailable_reason(name) for name in _IMPLEMENTATIONS}


@contextlib.contextmanager
def use_backend(name: str):
    """Run gpurnn modules inside the block on backend `name` (unless a module names its own).

    A contextvars setting: it holds in this thread and in asyncio tasks started inside the
    block, not in threads started inside it (a thread begins from a fresh context; run its
    target through `contextvars.copy_context().run` to carry the setting over)."""
    token = _requested.set(_check_name(name))
    try:
        yield
    finally:
        _requested.reset(token)


def requested_backend(explicit: str | None = None) -> str:
    """The backend name in force: explicit keyword, then use_backend, then GPURNN_BACKEND."""
    if explicit is not None:
        return _check_name(explicit)
    if (name := _requested.get()) is not None:
        return name  # checked by use_backend
    # read at every call, so that a process may change it; a typo names the variable
    name = os.environ.get("GPURNN_BACKEND") or "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"environment variable GPURNN_BACKEND={name!r}: backend must be one of {BACKENDS}"
        )
    return name


def _reason_against(name, cell, device, dtype, projected, hidden_size) -> str | None:
    reason = _unavailable_reason(name)
    if reason is None:
        reason = get_backend(name).unsupported_reason(cell, device, dtype, projected, hidden_size)
    return reason


@_torch.compiler.assume_constant_result
def choose_backend(
    explicit: str | None,
    cell: str,
    device: _torch.device,
    dtype: _torch.dtype,
    projected: bool,
    hidden_size: int | None = None,
    batch_size: int | None = None,
    torch_native: bool = False,
) -> str:
    """Name of the backend that runs this case: the one requested (explicit keyword, then
    use_backend, then GPURNN_BACKEND) or a clear error. For "auto": on CUDA the backend
    measured fastest for this cell, dtype and size bucket (gpurnn.dispatch) among those
    that run it, else the first of triton, cupy, torch that does; never a backend whose
    GPU tests failed on this card.

    `torch_native`: the caller runs backend "torch" as torch.nn's own layer functions
    (cuDNN on CUDA), which is what the table measured; otherwise "torch" is the explicit
    time loop, and a measured win of cuDNN says nothing about it.

    A constant for torch.compile: it depends on nothing a graph computes, and Dynamo need
    not trace the imports and environment look-ups behind it. (Pass batch_size=None when
    the batch size is symbolic.)
    """
    name = requested_backend(explicit)
    case = (cell, device, dtype, projected, hidden_size)
    if name != "auto":
        reason = _reason_against(name, *case)
        if reason is not None:
            raise RuntimeError(f"gpurnn backend {name!r} cannot run this case: {reason}")
        return name
    runnable = []
    for candidate in _AUTO_ORDER:
        if candidate in _GPU_KERNELS and device.type != "cuda":
            # the interpreter runs Triton on CPU tensors, but only when asked for by name
            continue
        reason = _reason_against(candidate, *case)
        if reason is None:
            reason = get_backend(candidate).auto_reason(cell, projected)
        if reason is None:
            runnable.append(candidate)
        else:
            log.debug("gpurnn auto: skipping %s (%s)", candidate, reason)
    if not runnable:
        raise RuntimeError(f"no gpurnn backend can run cell={cell} dtype={dtype} device={device}")
    if device.type == "cuda":
        from gpurnn import dispatch

        card = dispatch.card_name(device)
        failed = dispatch.failed_gpu_tests(card)
        passing = [b for b in runnable if b not in failed]
        if passing and passing != runnable:
            log.debug("gpurnn auto: skipping %s (GPU tests failed on %s)", failed, card)
            runnable = passing
        for measured in dispatch.preferred(cell, dtype, hidden_size, batch_size, card):
            if measured in runnable and (measured != "torch" or torch_native):
                return measured
    return runnable[0]
