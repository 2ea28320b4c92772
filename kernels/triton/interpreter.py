"""Running the kernels under TRITON_INTERPRET=1 (on a CPU, against gpurnn.reference):
`interpreting()` says whether they do, and importing this module (the package does) fixes
Triton 3.6's interpreter for NumPy >= 2.4. Imports nothing else of the package."""

from __future__ import annotations

import os


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element arrays and converts them with
    int(array), which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted"):
    every `range(runtime_arg, ...)` in a kernel then fails. Convert through .item() instead.
    Interpreter only; nothing changes when kernels are compiled."""
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:  # pragma: no cover
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_gpurnn_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._gpurnn_patched = True
    _interp._patch_lang_tensor = patched


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_index()
