"""Models that leave Python: torch.export and ONNX.

torch.export
    Nothing to do: `torch.export.export(model, args, dynamic_shapes=...)` traces gpurnn
    layers and cells with a symbolic sequence length and batch size.

ONNX
    `torch.onnx.export(model, args, dynamo=True)` (or `export_onnx` below) writes the
    recurrences as the standard ONNX `LSTM`, `GRU` and `RNN` operators, so the file runs
    in onnxruntime (or any ONNX runtime) without gpurnn, at any sequence length and batch
    size. The exporter finds gpurnn's translations in torchlib's registry (onnxscript's
    default registry, which it reads on every export), where gpurnn puts them as soon as
    onnxscript's registry module is imported (`register_onnx_translations`; importing
    onnxscript with gpurnn would slow every `import gpurnn` by seconds). They are also
    given as a `custom_translation_table` (`onnx_translation_table`) for callers who pass
    tables of their own.

Why a second op. The primitive `gpurnn::recurrence` receives the input projection
xg = x W_ihᵀ + b already computed, while ONNX's recurrent operators want x and W_ih
themselves. Translating the primitive alone would need an identity W (a wasted GEMM by
a (G·H)×(G·H) matrix over all steps). So while a model is being exported, the modules and cells
run each (layer, direction) through `gpurnn::layer` instead: projection and recurrence in
one op, whose ONNX translation is a single `LSTM`/`GRU`/`RNN` node with the layer's own
weights. In eager mode and under torch.compile nothing changes. `gpurnn::recurrence`
called directly (gpurnn.recurrence) still translates, through the identity W.

Gate layouts: PyTorch stacks LSTM gates i, f, g, o and ONNX i, o, f, c; PyTorch GRU
r, z, n and ONNX z, r, h. PyTorch's GRU applies W_hn and b_hn before the reset gate,
which is ONNX's `linear_before_reset=1`. ONNX has no LSTM output projection, so a
`proj_size > 0` LSTM cannot be exported to standard ONNX (a clear error says so).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import torch
from torch import Tensor

from gpurnn.cells import GATES
from gpurnn.recurrence import input_projection, recurrence

__all__ = [
    "layer",
    "onnx_translation_table",
    "register_onnx_translations",
    "export_onnx",
    "store_reordered_weights",
]


# ----------------------------------------------------------------------------------------
# the op a model's layers reduce to while it is being exported
# ----------------------------------------------------------------------------------------


def _layer_impl(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, w_hr, backend):
    xg, b_hn = input_projection(cell, x, w_ih, b_ih, b_hh)
    return recurrence(
        cell,
        xg,
        w_hh,
        h0,
        c0,
        lengths=lengths,
        reverse=reverse,
        b_hn=b_hn,
        w_hr=w_hr,
        backend=backend,
    )


@torch.library.custom_op("gpurnn::layer", mutates_args=())
def _layer_op(
    cell: str,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    h0: Tensor | None,
    c0: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    w_hr: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():  # gradients come from _layer_backward, not from inside the op
        y, h_T, c_T = _layer_impl(
            cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, w_hr, backend
        )
    return y, h_T, c_T if c_T is not None else x.new_empty(0)


@_layer_op.register_fake
def _layer_fake(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, w_hr, backend):
    T, B, _ = x.shape
    H, H_out = w_ih.shape[0] // GATES[cell], w_hh.shape[1]
    return (
        x.new_empty(T, B, H_out),
        x.new_empty(B, H_out),
        x.new_empty(B, H) if cell == "lstm" else x.new_empty(0),
    )


_LAYER_TENSORS = ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0", "lengths", "w_hr")


def _layer_setup_context(ctx, inputs, output):
    cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, w_hr, backend = inputs
    ctx.cell, ctx.reverse, ctx.backend = cell, reverse, backend
    tensors = (x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, w_hr)
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*(t for t in tensors if t is not None))


def _layer_backward(ctx, dy, dh_T, dc_T):
    # An exported program is mostly run for inference; when it is trained, the layer runs
    # again under autograd (through gpurnn::recurrence and its own backward) rather than
    # keeping a second copy of the recurrence's saved state here.
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if present else None for present in ctx.present]
    leaves = [
        t.detach().requires_grad_() if t is not None and t.is_floating_point() else t
        for t in tensors
    ]
    with torch.enable_grad():
        x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, w_hr = leaves
        outputs = _layer_impl(
            ctx.cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, ctx.reverse, w_hr, ctx.backend
        )
        pairs = [(o, g) for o, g in zip(outputs, (dy, dh_T, dc_T)) if o is not None]
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(
            torch.autograd.grad(
                [o for o, _ in pairs],
                wrt,
                [g if g is not None else torch.zeros_like(o) for o, g in pairs],
                allow_unused=True,
            )
        )
    by_name = {
        name: (next(grads) if t is not None and t.requires_grad else None)
        for name, t in zip(_LAYER_TENSORS, leaves)
    }
    return (
        None,
        *(by_name[n] for n in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0")),
        None,
        None,
        by_name["w_hr"],
        None,
    )


torch.library.register_autograd(
    "gpurnn::layer", _layer_backward, setup_context=_layer_setup_context
)


def layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, *, lengths=None, reverse=False, w_hr=None,
          backend=None):  # fmt: skip
    """One (layer, direction) from its raw weights, as one op: x (T, B, F) time-major.
    Returns (y, h_T, c_T or None) like gpurnn.recurrence. The modules call this instead of
    projection + recurrence while being exported (see the module docstring)."""
    from gpurnn.backends import choose_backend

    chosen = choose_backend(
        backend, cell, x.device, x.dtype, w_hr is not None, w_ih.shape[0] // GATES[cell], None
    )
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int64)
    y, h_T, c_T = _layer_op(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, w_hr, chosen)
    return y, h_T, (c_T if cell == "lstm" else None)


# ----------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------

# ONNX's gate blocks, each given as the index of the PyTorch block that fills it
ONNX_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn_tanh": (0,), "rnn_relu": (0,)}


def _need_onnx():
    try:
        import onnx_ir  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "ONNX export needs onnx and onnxscript: pip install 'gpurnn[onnx]'"
        ) from e


def _exported_name(value) -> str:
    """' (weight_hr_l0 of module enc_rnn)' from an exported parameter's value name
    ('p_enc_rnn_weight_hr_l0': the exporter writes module paths with '_' for '.'), or ''."""
    name = getattr(value, "name", None) or ""
    if not name.startswith("p_") or "_weight_hr" not in name:
        return ""
    module, _, rest = name[2:].rpartition("_weight_hr")
    return f" (weight_hr{rest} of module {module or 'the model itself'})"


def _no_projection(w_hr) -> None:
    if w_hr is not None:
        P, H = w_hr.shape
        raise NotImplementedError(
            f"gpurnn ONNX export: an LSTM layer with proj_size={P}, hidden_size={H}"
            f"{_exported_name(w_hr)} cannot be written as the standard ONNX LSTM operator, "
            "which has no output projection (h_t = W_hr (o_t * tanh(c_t))). "
            "Ways out: export the model with torch.export instead (torch.export.export(model, "
            "args, dynamic_shapes=...) runs gpurnn's op and keeps the projection), or build "
            "the LSTM with proj_size=0 followed by a torch.nn.Linear (not the same model: "
            "retrain it)."
        )


def _onnx_recurrent_node(cell, X, W, R, B, lengths, h0, c0, reverse, hidden_size):
    """One ONNX LSTM/GRU/RNN node in one direction on weights already in ONNX gate order;
    returns (y (T, B, H), h_T (B, H), c_T (B, H) or an empty tensor), gpurnn's layout."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset18 as op

    seq_lens = op.Cast(lengths, to=ir.DataType.INT32) if lengths is not None else None
    init_h = op.Unsqueeze(h0, [0]) if h0 is not None else None
    common = dict(hidden_size=hidden_size, direction="reverse" if reverse else "forward")
    if cell == "lstm":
        init_c = op.Unsqueeze(c0, [0]) if c0 is not None else None
        Y, Y_h, Y_c = op.LSTM(X, W, R, B, seq_lens, init_h, init_c, **common)
        c_T = op.Squeeze(Y_c, [0])
    else:
        if cell == "gru":
            Y, Y_h = op.GRU(X, W, R, B, seq_lens, init_h, linear_before_reset=1, **common)
        else:
            activation = "Tanh" if cell == "rnn_tanh" else "Relu"
            Y, Y_h = op.RNN(X, W, R, B, seq_lens, init_h, activations=[activation], **common)
        c_T = op.CastLike(op.Constant(value=ir.tensor(np.zeros(0, np.float32))), X)
    h_T = op.Squeeze(Y_h, [0])
    if lengths is not None:
        # a sequence of length 0 keeps its initial state in gpurnn; onnxruntime zeroes it
        empty = op.Unsqueeze(op.Equal(lengths, op.CastLike(0, lengths)), [1])
        if h0 is not None:
            h_T = op.Where(empty, h0, h_T)
        if c0 is not None:
            c_T = op.Where(empty, c0, c_T)
    # Y is (T, num_directions = 1, B, H)
    return op.Squeeze(Y, [1]), h_T, c_T


def _onnx_gate_rows(cell: str, H: int):
    """Row indices that take PyTorch's stacked gate blocks to ONNX's order."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset18 as op

    rows = np.concatenate([np.arange(k * H, (k + 1) * H) for k in ONNX_GATE_ORDER[cell]])
    return op.Constant(value=ir.tensor(rows.astype(np.int64)))


def _layer_to_onnx(
    cell: str,
    x,
    w_ih,
    w_hh,
    b_ih=None,
    b_hh=None,
    h0=None,
    c0=None,
    lengths=None,
    reverse: bool = False,
    w_hr=None,
    backend: str = "",
):
    """gpurnn::layer as one ONNX LSTM/GRU/RNN node on the layer's own weights."""
    from onnxscript import opset18 as op

    _no_projection(w_hr)
    H = w_ih.shape[0] // GATES[cell]
    rows = _onnx_gate_rows(cell, H)
    # (the exporter's optimizer folds these reorderings into the weights when they are
    # small; larger ones cost one copy of the weights per run, nothing per step)
    W = op.Unsqueeze(op.Gather(w_ih, rows, axis=0), [0])
    R = op.Unsqueeze(op.Gather(w_hh, rows, axis=0), [0])
    B = None
    if b_ih is not None:
        # ONNX adds Wb and Rb where PyTorch adds b_ih and b_hh; GRU's b_hn is Rb's h block,
        # inside the reset gate's product under linear_before_reset=1, as in PyTorch
        B = op.Unsqueeze(
            op.Concat(op.Gather(b_ih, rows, axis=0), op.Gather(b_hh, rows, axis=0), axis=0), [0]
        )
    return _onnx_recurrent_node(cell, x, W, R, B, lengths, h0, c0, reverse, H)


def _recurrence_to_onnx(
    cell: str,
    xg,
    w_hh,
    h0=None,
    c0=None,
    lengths=None,
    reverse: bool = False,
    b_hn=None,
    w_hr=None,
    backend: str = "",
    save: bool = False,
    proj_x=None,
    proj_w=None,
    proj_b=None,
):
    """gpurnn::recurrence (called directly, not through the modules): xg is already
    projected, so ONNX's input weight is the permutation that puts xg's gates in ONNX's
    order, built at run time rather than stored. (proj_x, proj_w, proj_b, the inputs of
    xg's projection, serve only the second-order backward: nothing to export.)"""
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset18 as op

    _no_projection(w_hr)
    GH = xg.shape[2]
    H = GH // GATES[cell]
    rows = _onnx_gate_rows(cell, H)
    square = op.ConstantOfShape(op.Constant(value=ir.tensor(np.array([GH, GH], np.int64))))
    identity = op.CastLike(op.EyeLike(square), xg)
    W = op.Unsqueeze(op.Gather(identity, rows, axis=0), [0])
    R = op.Unsqueeze(op.Gather(w_hh, rows, axis=0), [0])
    B = None
    if b_hn is not None:
        # every bias but GRU's b_hn is inside xg: Wb = 0, Rb = (0 for z, 0 for r, b_hn)
        zeros = op.CastLike(op.Constant(value=ir.tensor(np.zeros(GH + 2 * H, np.float32))), xg)
        B = op.Unsqueeze(op.Concat(zeros, b_hn, axis=0), [0])
    y, h_T, c_T = _onnx_recurrent_node(cell, xg, W, R, B, lengths, h0, c0, reverse, H)
    # the workspace only serves a backward, which an ONNX model never runs
    workspace = op.CastLike(op.Constant(value=ir.tensor(np.zeros(0, np.float32))), xg)
    return y, h_T, c_T, workspace


def onnx_translation_table() -> dict:
    """The `custom_translation_table` for `torch.onnx.export(..., dynamo=True)` that writes
    gpurnn's ops as standard ONNX operators. Not needed for a plain export (gpurnn
    registers them, see `register_onnx_translations`); merge it with your own table if you
    pass one."""
    _need_onnx()
    return {
        torch.ops.gpurnn.layer.default: _layer_to_onnx,
        torch.ops.gpurnn.recurrence.default: _recurrence_to_onnx,
    }


_registered = False
_TORCHLIB_REGISTRY = "onnxscript.function_libs.torch_lib.registration"


def register_onnx_translations(missing_ok: bool = False) -> bool:
    """Puts gpurnn's ONNX translations in torchlib's default registry, where
    `torch.onnx.export(..., dynamo=True)` looks up the ops it translates, so that a plain
    export needs no `custom_translation_table`. `import gpurnn` arranges for this to
    happen when onnxscript's registry is first imported (or at once if it already is);
    nothing to call. Returns whether the translations are registered; without onnxscript
    that is False when `missing_ok`, else ImportError."""
    global _registered
    if _registered:
        return True
    try:
        _need_onnx()
        from onnxscript.function_libs.torch_lib.registration import torch_op
    except ImportError:
        if missing_ok:
            return False
        raise
    for name, translation in (("gpurnn::layer", _layer_to_onnx),
                              ("gpurnn::recurrence", _recurrence_to_onnx)):  # fmt: skip
        torch_op(name, trace_only=True)(translation)
    _registered = True
    return True


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs `register_onnx_translations` right after onnxscript's registry module is
    imported, whoever imports it (torch.onnx does, on its first dynamo export). One shot:
    it leaves sys.meta_path as soon as it has seen the module."""

    def find_spec(self, name, path, target=None):
        if name != _TORCHLIB_REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def load_then_register(module):
                load(module)
                register_onnx_translations(missing_ok=True)

            spec.loader.exec_module = load_then_register
        return spec


if _TORCHLIB_REGISTRY in sys.modules:
    register_onnx_translations(missing_ok=True)
elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnImport())


_RECURRENT_OPS = ("LSTM", "GRU", "RNN")
_WEIGHT_INPUTS = {1: "W", 2: "R", 3: "B"}


def _constant_array(value, memo: dict):
    """The value as a NumPy array when it is computed from initializers and constants by
    the ops our translations put in front of the weights, else None."""
    import numpy as np

    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    if id(value) in memo:
        return memo[id(value)]
    node, result = value.producer(), None
    if node is not None and node.domain in ("", "ai.onnx"):
        if node.op_type == "Constant" and "value" in node.attributes:
            result = node.attributes["value"].as_tensor().numpy()
        elif node.op_type in ("Gather", "Unsqueeze", "Concat"):
            inputs = [_constant_array(v, memo) for v in node.inputs]
            if inputs and all(a is not None for a in inputs):
                axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
                if node.op_type == "Gather":
                    result = np.take(inputs[0], inputs[1], axis=axis)
                elif node.op_type == "Concat":
                    result = np.concatenate(inputs, axis=axis)
                else:
                    result = inputs[0]
                    rank = inputs[0].ndim + len(inputs[1])
                    for a in sorted(int(a) % rank for a in inputs[1]):
                        result = np.expand_dims(result, a)
    memo[id(value)] = result
    return result


def store_reordered_weights(onnx_program) -> None:
    """Computes, once and for all, the gate reordering in front of every ONNX LSTM/GRU/RNN
    node's weights (W, R, B) and stores the results as initializers, in place.

    The exporter's optimizer folds constants only below a size limit (8192 elements), so
    beyond small layers the Gather/Concat that put PyTorch's gates in ONNX's order would
    otherwise rerun on every inference. `export_onnx` calls this; after a plain
    `torch.onnx.export`, call it yourself before saving."""
    _need_onnx()
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph, memo = onnx_program.model.graph, {}
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _RECURRENT_OPS:
            continue
        for index, what in _WEIGHT_INPUTS.items():
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None or value.is_initializer():
                continue
            array = _constant_array(value, memo)
            if array is None:
                continue
            stored = ir.Value(name=f"{node.name}_{what}", const_value=ir.tensor(array))
            stored.shape, stored.type = ir.Shape(array.shape), value.type
            graph.register_initializer(stored)
            node.replace_input_with(index, stored)
    # the reordering nodes and the PyTorch-ordered weights are now unused
    RemoveUnusedNodesPass()(onnx_program.model)


def export_onnx(model, args, f=None, **kwargs):
    """`torch.onnx.export(model, args, dynamo=True, ...)` with gpurnn's translations added
    to `custom_translation_table` and the recurrent weights stored in ONNX's gate order
    (`store_reordered_weights`); saved to `f` when given. Every other keyword goes to
    torch.onnx.export (e.g. `dynamic_shapes=`, `input_names=`). Returns the ONNXProgram."""
    table = onnx_translation_table()
    table.update(kwargs.pop("custom_translation_table", None) or {})
    onnx_program = torch.onnx.export(
        model, args, dynamo=True, custom_translation_table=table, **kwargs
    )
    if kwargs.get("optimize", True):
        store_reordered_weights(onnx_program)
    if f is not None:
        onnx_program.save(f)
    return onnx_program
