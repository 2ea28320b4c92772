"""The one primitive every layer reduces to, as a torch.library custom op.

    recurrence(cell, xg, w_hh, h0=None, c0=None, *, lengths=None, reverse=False,
               b_hn=None, w_hr=None, backend=None, projection=None) -> (y, h_T, c_T)

One layer, one direction. `xg` (T, B, G*H) is the input projection x W_ihᵀ + biases for
all steps (GRU's b_hn kept apart), computed outside by one large GEMM. See gpurnn/cells.py
for the cells and docs/design.md for the contract and where it sits between modules and
backends.

The op `gpurnn::recurrence` dispatches to a backend (gpurnn/backends); its autograd is
registered with `torch.library.register_autograd` and runs a second op,
`gpurnn::recurrence_backward`. Both have fake implementations, so torch.compile traces
through a gpurnn layer with no graph break; the backend's name travels as an argument.

Second-order gradients (`torch.autograd.grad(..., create_graph=True)`): the backends'
backward kernels are not differentiable themselves, so when autograd asks for a graph of
the backward, `_backward` reruns the forward as plain differentiable torch ops (the torch
backend's loop) and differentiates that instead, on every backend alike. That needs xg,
which the fused backends do not keep; layers pass `projection=(x, w_ih, bias)` (tensors
autograd keeps for the input projection anyway) so that xg can be rebuilt instead.

torch.func (vmap, grad): the autograd torch.library registers cannot be transformed, so
under a transform the primitive runs through `_TransformableRecurrence`, an
autograd.Function with the same setup and backward, whose vmap rule is generated from
the ops' batching rules (`register_vmap`: the members run one after another). torch.func's
grad always asks for a graph of the backward, so there the backward is the differentiable
rerun above.

Outputs are never views (`_not_a_view`) and y is kept for backward only by backends that
read it (`Backend.backward_uses_y`): in-place ops on a layer's output work as in torch.nn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gpurnn.backends import Grads, Inputs, choose_backend, get_backend
from gpurnn.cells import GATES, check_cell

_OPTIONAL_GRADS = ("h0", "c0", "b_hn", "w_hr")
# the custom ops' schemas are flat (torch.library needs that): their first arguments are
# the fields of Inputs, in order, and each op builds the Inputs right away
_N_INPUTS = len(Inputs._fields)


def _split(op_args) -> tuple[Inputs, tuple]:
    """A custom op's arguments as (Inputs, the arguments after them)."""
    return Inputs(*op_args[:_N_INPUTS]), tuple(op_args[_N_INPUTS:])


def _empty(like: Tensor) -> Tensor:
    """Stands for an absent tensor in a custom op's outputs (which must all be tensors)."""
    return like.new_empty(0)


def _not_a_view(t: Tensor) -> Tensor:
    """The same memory as a tensor of its own, not a view. Backends return views (the
    Triton kernels' y is the last T rows of their exchange buffer; torch.stack's result is
    a view of a cat), and autograd refuses in-place ops on views of a custom op's outputs
    ("a function that returns multiple views"), which torch.nn's outputs allow. Autograd's
    version counter still guards a y that a backward reads."""
    if t._base is None:
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


@torch.library.custom_op("gpurnn::recurrence", mutates_args=())
def _recurrence_op(
    cell: str,
    xg: Tensor,
    w_hh: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    b_hn: Tensor | None,
    w_hr: Tensor | None,
    backend: str,
    save: bool,
    proj_x: Tensor | None,
    proj_w: Tensor | None,
    proj_b: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # proj_* are read by the double backward only (see _setup_context)
    inputs = Inputs(cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr)
    y, h_T, c_T, workspace = get_backend(backend).forward(inputs, save)
    c_T = c_T if c_T is not None else _empty(xg)
    return tuple(_not_a_view(t) for t in (y, h_T, c_T, workspace))


@_recurrence_op.register_fake
def _recurrence_fake(*op_args):
    inputs, (backend, save, *_) = _split(op_args)
    cell, xg = inputs.cell, inputs.xg
    T, B, GH = xg.shape
    H, H_out = GH // GATES[cell], inputs.w_hh.shape[1]
    shape, dtype = get_backend(backend).workspace_spec(cell, T, B, H, xg.dtype, save)
    return (
        xg.new_empty(T, B, H_out),
        xg.new_empty(B, H_out),
        xg.new_empty(B, H) if cell == "lstm" else _empty(xg),
        xg.new_empty(shape, dtype=dtype),
    )


@torch.library.custom_op("gpurnn::recurrence_backward", mutates_args=())
def _recurrence_backward_op(
    cell: str,
    xg: Tensor | None,
    w_hh: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    b_hn: Tensor | None,
    w_hr: Tensor | None,
    y: Tensor | None,
    workspace: Tensor,
    dy: Tensor,
    dh_T: Tensor,
    dc_T: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    inputs = Inputs(cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr)
    grads = get_backend(backend).backward(inputs, y, workspace, dy, dh_T, dc_T)
    return tuple(g if g is not None else _empty(dy) for g in grads)


@_recurrence_backward_op.register_fake
def _recurrence_backward_fake(*op_args):
    inputs, (_, _, dy, *_) = _split(op_args)
    T, B, _ = dy.shape
    return (
        dy.new_empty(T, B, inputs.w_hh.shape[0]),
        torch.empty_like(inputs.w_hh),
        *(
            torch.empty_like(t) if t is not None else _empty(dy)
            for t in (getattr(inputs, name) for name in _OPTIONAL_GRADS)
        ),
    )


class _Kept:
    """Marks, in ctx.kept, a place whose tensor went to ctx.save_for_backward."""


def _setup_context(ctx, inputs, output):  # torch.library passes these by keyword
    inputs, (backend, _, *projection) = _split(inputs)
    y, _, _, workspace = output
    ctx.backend = backend
    ctx.xg_dtype = inputs.xg.dtype
    # xg is kept when the backend's backward reads it, or when nothing else could rebuild
    # it for a double backward; otherwise the projection's inputs stand in for it (autograd
    # keeps them for the projection's own backward, so they cost no memory here)
    has_projection = projection[0] is not None
    keep_xg = get_backend(backend).backward_uses_xg or not has_projection
    if keep_xg:
        kept = (*inputs, None, None, None)
    else:
        kept = (*inputs._replace(xg=None), *projection)
    # tensors go through save_for_backward (which checks they were not modified in place
    # since); everything else (cell, reverse, absent tensors) is kept as it is
    ctx.kept = [_Kept if isinstance(v, Tensor) else v for v in kept]
    # y only where the backward reads it: otherwise the caller may modify it in place
    uses_y = get_backend(backend).backward_uses_y
    ctx.y_like = _Kept if uses_y else (y.shape, y.dtype, y.device)
    tensors = [v for v in kept if isinstance(v, Tensor)]
    ctx.save_for_backward(*tensors, *([y] if ctx.y_like is _Kept else []), workspace)
    ctx.mark_non_differentiable(workspace)


def _saved_y(ctx, saved: list) -> tuple[Tensor | None, tuple]:
    """(y or None, (shape, dtype, device) of y), taking y off the end of `saved` if kept."""
    if ctx.y_like is _Kept:
        y = saved.pop()
        return y, (y.shape, y.dtype, y.device)
    return None, ctx.y_like


def _differentiable_backward(ctx, inputs: Inputs, dy, dh_T, dc_T):
    """The gradients as a differentiable function of the inputs and of (dy, dh_T, dc_T): the
    forward rerun through the torch backend's loop (plain torch ops), differentiated with
    create_graph=True. Exact, on any backend and device; slower than the kernels, which is
    the price of a graph of the backward."""
    from gpurnn.backends.torch import TorchBackend

    wanted = {
        name: getattr(inputs, name)
        for name in Grads._fields
        if ctx.needs_input_grad[Inputs._fields.index(name)]
        and getattr(inputs, name) is not None
        and getattr(inputs, name).requires_grad
    }
    if not wanted:  # only the projection's own inputs want gradients: none pass through here
        return Grads(*(None,) * len(Grads._fields))
    y, h_T, c_T, _ = TorchBackend().forward(inputs, False)
    outputs, grad_outputs = [y, h_T], [dy, dh_T]
    if c_T is not None:
        outputs.append(c_T)
        grad_outputs.append(dc_T)
    grads = dict(zip(wanted, torch.autograd.grad(
        outputs, list(wanted.values()), grad_outputs, create_graph=True, allow_unused=True
    )))  # fmt: skip
    return Grads(*(grads.get(name) for name in Grads._fields))


def _backward(ctx, dy, dh_T, dc_T, _d_workspace):
    *saved, workspace = ctx.saved_tensors
    y, (y_shape, y_dtype, y_device) = _saved_y(ctx, saved)
    saved = iter(saved)
    kept = [next(saved) if v is _Kept else v for v in ctx.kept]
    inputs, projection = _split(kept)
    is_lstm = inputs.cell == "lstm"
    like = dict(dtype=y_dtype, device=y_device)
    dy = dy if dy is not None else torch.zeros(y_shape, **like)
    dh_T = dh_T if dh_T is not None else torch.zeros(y_shape[1:], **like)
    if is_lstm and (dc_T is None or dc_T.numel() == 0):
        dc_T = torch.zeros(y_shape[1], inputs.w_hh.shape[0] // 4, **like)
    dc_T = dc_T if is_lstm else None
    if torch.is_grad_enabled():
        # autograd wants a graph of this backward (create_graph=True): differentiate a
        # differentiable rerun instead of the backend's kernels
        if inputs.xg is None:
            x, w, b = projection
            if x.dtype != ctx.xg_dtype:  # autocast ran the projection in its own dtype
                x, w = x.to(ctx.xg_dtype), w.to(ctx.xg_dtype)
                b = b.to(ctx.xg_dtype) if b is not None else None
            inputs = inputs._replace(xg=F.linear(x, w, b))
        grads = _differentiable_backward(ctx, inputs, dy, dh_T, dc_T)
    else:
        if not get_backend(ctx.backend).backward_uses_xg:
            inputs = inputs._replace(xg=None)
        grads = Grads(*_recurrence_backward_op(
            *inputs, y, workspace, dy, dh_T, dc_T, ctx.backend
        ))  # fmt: skip
        grads = grads._replace(
            **{name: None for name in _OPTIONAL_GRADS if getattr(inputs, name) is None}
        )
    # one gradient per argument of the op: those of the Inputs, None for the rest
    per_input = tuple(grads._asdict().get(name) for name in Inputs._fields)
    return per_input + (None,) * (len(ctx.needs_input_grad) - _N_INPUTS)


torch.library.register_autograd("gpurnn::recurrence", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------- torch.func transforms


def under_func_transform() -> bool:
    """True inside torch.func.vmap / grad / jacrev / ... (functorch's interpreter stack)."""
    return torch._C._functorch.maybe_current_level() is not None


class _TransformableRecurrence(torch.autograd.Function):
    """The custom op with the same autograd, as an autograd.Function that torch.func can
    transform: the autograd torch.library registers is not one (its Function has no
    setup_context), so under vmap or grad the primitive goes through this instead. vmap
    runs forward and backward through the ops' batching rules below."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*op_args):
        return _recurrence_op(*op_args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def _members(info, in_dims, args):
    """The op's arguments for each member of a vmapped batch, one after another."""
    for i in range(info.batch_size):
        yield [a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]


def _stacked(results) -> tuple:
    return tuple(torch.stack(parts) for parts in zip(*results))


@torch.library.register_vmap("gpurnn::recurrence")
def _recurrence_vmap(info, in_dims, *op_args):
    # members (an ensemble's weights, a vmapped batch of inputs) run one after another,
    # each as one ordinary call of the op on its backend
    results = [_recurrence_op(*args) for args in _members(info, in_dims, op_args)]
    return _stacked(results), (0, 0, 0, 0)


@torch.library.register_vmap("gpurnn::recurrence_backward")
def _recurrence_backward_vmap(info, in_dims, *op_args):
    results = [_recurrence_backward_op(*args) for args in _members(info, in_dims, op_args)]
    return _stacked(results), (0,) * 6


def check_sequence_length(T: int) -> None:
    """torch.nn refuses an empty sequence with this error, whatever it runs on; gpurnn
    raises it here, above every backend, so that none of them has to handle T = 0."""
    if T == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")


def _check_args(cell, xg, w_hh, h0, c0, lengths, b_hn, w_hr):
    check_cell(cell)
    if not isinstance(xg, Tensor) or xg.dim() != 3:
        raise ValueError(
            f"xg must be a 3-D tensor (T, B, G*H), got "
            f"{tuple(xg.shape) if isinstance(xg, Tensor) else type(xg)}"
        )
    if not xg.is_floating_point():
        raise TypeError(f"xg must be a floating-point tensor, got {xg.dtype}")
    T, B, GH = xg.shape
    G = GATES[cell]
    if GH % G:
        raise ValueError(f"xg.size(2) must be {G} * hidden_size for {cell}, got {GH}")
    H = GH // G
    if w_hh.dim() != 2 or w_hh.shape[0] != GH:
        raise ValueError(f"w_hh must have shape ({GH}, H_out), got {tuple(w_hh.shape)}")
    H_out = w_hh.shape[1]
    if w_hr is not None:
        if cell != "lstm":
            raise ValueError(f"w_hr (projection) is only for lstm, not {cell}")
        if tuple(w_hr.shape) != (H_out, H):
            raise ValueError(f"w_hr must have shape ({H_out}, {H}), got {tuple(w_hr.shape)}")
    elif H_out != H:
        raise ValueError(f"w_hh must have shape ({GH}, {H}), got {tuple(w_hh.shape)}")
    expected = {"h0": (B, H_out), "c0": (B, H), "b_hn": (H,)}
    for name, t in (("w_hh", w_hh), ("h0", h0), ("c0", c0), ("b_hn", b_hn), ("w_hr", w_hr)):
        if t is None:
            continue
        if name in expected and tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(t.shape)}")
        if t.dtype != xg.dtype:
            raise TypeError(f"{name} dtype ({t.dtype}) must match xg dtype ({xg.dtype})")
        if t.device != xg.device:
            raise ValueError(f"{name} is on {t.device} but xg is on {xg.device}")
    if c0 is not None and cell != "lstm":
        raise ValueError(f"c0 is only for lstm, not {cell}")
    if b_hn is not None and cell != "gru":
        raise ValueError(f"b_hn is only for gru, not {cell}")
    if lengths is not None:
        if lengths.dim() != 1 or lengths.shape[0] != B or lengths.is_floating_point():
            raise ValueError(
                f"lengths must be an integer tensor of shape ({B},), got "
                f"{lengths.dtype} {tuple(lengths.shape)}"
            )
        if (
            not torch.compiler.is_compiling()
            and lengths.numel()
            and (int(lengths.min()) < 0 or int(lengths.max()) > T)
        ):
            raise ValueError(
                f"lengths must lie in [0, {T}] (T = xg.size(0)), got {lengths.tolist()}"
            )
    check_sequence_length(T)


# ---------------------------------------------------------------- the primitive's xg


def folded_biases(
    cell: str, w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """The input projection's bias (b_ih + b_hh) and GRU's b_hn, which must stay inside
    r ⊙ (W_hn h + b_hn) and so cannot be folded."""
    if b_ih is None:
        return None, None
    if cell != "gru":
        return b_ih + b_hh, None
    H = w_ih.shape[0] // 3
    return torch.cat([b_ih[: 2 * H] + b_hh[: 2 * H], b_ih[2 * H :]]), b_hh[2 * H :]


def input_projection(
    cell: str, x: Tensor, w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """xg = x W_ihᵀ + b_ih + b_hh for all steps at once, and GRU's b_hn."""
    bias, b_hn = folded_biases(cell, w_ih, b_ih, b_hh)
    return F.linear(x, w_ih, bias), b_hn


def recurrence(
    cell,
    xg,
    w_hh,
    h0=None,
    c0=None,
    *,
    lengths=None,
    reverse=False,
    b_hn=None,
    w_hr=None,
    backend=None,
    projection=None,
):
    """Runs one recurrent layer in one direction. Returns (y, h_T, c_T); c_T is None
    unless cell is "lstm". Differentiable in xg, w_hh, h0, c0, b_hn and w_hr, to any order.
    Bad arguments raise before any backend runs; T = 0 raises torch.nn's RuntimeError
    ("Expected sequence length to be larger than 0"), as a torch.nn layer does.

    `projection=(x, w_ih, bias)` (bias may be None), where xg is `F.linear(x, w_ih, bias)`,
    lets a second-order backward rebuild xg from them instead of keeping xg alive until
    backward (backends whose backward does not read xg would otherwise keep it for that)."""
    _check_args(cell, xg, w_hh, h0, c0, lengths, b_hn, w_hr)
    proj_x = proj_w = proj_b = None
    if projection is not None:
        proj_x, proj_w, proj_b = projection
        if proj_x.shape[:-1] != xg.shape[:-1] or proj_w.shape[0] != xg.shape[-1]:
            raise ValueError(
                f"projection must give xg = F.linear(x, w_ih, bias) of shape "
                f"{tuple(xg.shape)}, got x {tuple(proj_x.shape)}, w_ih {tuple(proj_w.shape)}"
            )
    batch = None if torch.compiler.is_compiling() else xg.shape[1]
    chosen = choose_backend(
        backend, cell, xg.device, xg.dtype, w_hr is not None, xg.shape[2] // GATES[cell], batch
    )
    if lengths is not None:
        lengths = lengths.to(device=xg.device, dtype=torch.int64)
    # (a tensor batched by vmap does not say whether its own tensor requires grad: keep
    # the workspace under transforms whenever autograd records)
    save = torch.is_grad_enabled() and (
        under_func_transform()
        or any(t is not None and t.requires_grad for t in (xg, w_hh, h0, c0, b_hn, w_hr))
    )
    op_args = (
        cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr, chosen, save, proj_x, proj_w, proj_b
    )  # fmt: skip
    if under_func_transform() and not torch.compiler.is_compiling():
        y, h_T, c_T, _ = _TransformableRecurrence.apply(*op_args)
    else:
        y, h_T, c_T, _ = _recurrence_op(*op_args)
    return y, h_T, (c_T if cell == "lstm" else None)
