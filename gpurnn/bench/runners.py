"""The implementations timed against each other: the Runner interface, one Runner per kind
(a layer module, a Python loop of cells, FlashRNN), and which of them run here.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from gpurnn.bench.shapes import Shape, _seed


class Runner(abc.ABC):
    """One implementation built for one shape and dtype, holding its own parameters."""

    @abc.abstractmethod
    def run(self, inp) -> tuple[Tensor, Tensor, Tensor | None]:
        """Forward: (output data, h_n, c_n or None); output data as torch.nn lays it out."""

    @abc.abstractmethod
    def named_grads(self) -> dict[str, Tensor | None]:
        """Gradients under torch.nn's parameter names."""

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Clears the gradients before a timed training step."""


class ModuleRunner(Runner):
    """torch.nn.LSTM/GRU/RNN or a gpurnn drop-in: a layer module."""

    def __init__(self, module: nn.Module):
        self.module = module

    def run(self, inp):
        out, hx = self.module(inp)
        h_n, c_n = hx if isinstance(hx, tuple) else (hx, None)
        return (out.data if isinstance(out, PackedSequence) else out), h_n, c_n

    def named_grads(self):
        return {name: p.grad for name, p in self.module.named_parameters()}

    def zero_grad(self):
        self.module.zero_grad(set_to_none=True)


class CellLoopRunner(Runner):
    """The way people write a custom RNN: a Python loop over torch.nn.*Cell."""

    def __init__(self, cell: nn.Module, is_lstm: bool):
        self.cell, self.is_lstm = cell, is_lstm

    def run(self, x):
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)
        c = h.clone() if self.is_lstm else None
        outputs = []
        for x_t in x.unbind(0):
            if self.is_lstm:
                h, c = self.cell(x_t, (h, c))
            else:
                h = self.cell(x_t, h)
            outputs.append(h)
        return torch.stack(outputs), h[None], (c[None] if c is not None else None)

    def named_grads(self):
        return {f"{name}_l0": p.grad for name, p in self.cell.named_parameters()}

    def zero_grad(self):
        self.cell.zero_grad(set_to_none=True)


class FlashRNNRunner(Runner):
    """FlashRNN's fused CUDA LSTM (NX-AI/flashrnn), one head of size H, PyTorch's gate
    order (i, f, g, o). Its kernel takes the projected input, so the projection is done
    here with torch: the timing covers the same full layer as the others."""

    def __init__(self, base: nn.Module, dtype):
        from flashrnn import flashrnn  # raises where it is not installed

        self.flashrnn = flashrnn
        self.dtype_name = {
            torch.bfloat16: "bfloat16",
            torch.float16: "float16",
            torch.float32: "float32",
        }[dtype]
        self.params = {
            name: p.detach().clone().requires_grad_() for name, p in base.named_parameters()
        }

    def run(self, x):
        p, (T, B, _) = self.params, x.shape
        H = p["weight_hh_l0"].shape[1]
        wx = nn.functional.linear(x, p["weight_ih_l0"], p["bias_ih_l0"])
        wx = wx.transpose(0, 1).reshape(B, T, 4, 1, H)  # [B, T, gates, heads, D]
        recurrent = p["weight_hh_l0"].view(4, 1, H, H)  # [gates, heads, D out, D in]
        bias = p["bias_hh_l0"].view(4, 1, H)
        states0 = x.new_zeros(2, B, 1, 1, H)  # [h/c, B, T=1, heads, D]
        states, last = self.flashrnn(
            wx,
            recurrent,
            bias,
            states=states0,
            function="lstm",
            backend="cuda_fused",
            dtype=self.dtype_name,
        )
        y = states[0, :, :, 0, :].transpose(0, 1)
        return y, last[0, :, 0, 0][None], last[1, :, 0, 0][None]

    def named_grads(self):
        return {name: p.grad for name, p in self.params.items()}

    def zero_grad(self):
        for p in self.params.values():
            p.grad = None


class RegularizedRunner(ModuleRunner):
    """A regularized gpurnn layer, run in training mode after a fixed torch.manual_seed, so
    that every run (and every implementation of the case) draws the same masks."""

    def __init__(self, module: nn.Module, seed: int):
        super().__init__(module.train())
        self.seed = seed

    def run(self, inp):
        torch.manual_seed(self.seed)
        return super().run(inp)


class RegularizedCellLoopRunner(Runner):
    """What people write for a regularized LSTM: a Python loop over torch.nn.LSTMCell (and
    for LayerNorm, the same step spelled out with F.layer_norm), the masks drawn as gpurnn
    draws them (gpurnn.regularized.draw, after the same seed) so that its results compare."""

    def __init__(self, cell: nn.LSTMCell, keywords: dict, seed: int):
        import gpurnn.regularized as regularized

        self.cell, self.keywords, self.seed = cell, keywords, seed
        H = cell.hidden_size
        self.ln = {}
        if keywords.get("layer_norm"):
            factory = {"device": cell.weight_ih.device, "dtype": cell.weight_ih.dtype}
            regularized.add_layer_norm(cell, "lstm", [""], H, factory)
            self.ln = {n: getattr(cell, n) for n in regularized.layer_norm_names("lstm", "")}

    def run(self, x):
        import torch.nn.functional as F

        from gpurnn import masks, regularized

        T, B, _ = x.shape
        H, cell, ln, eps = self.cell.hidden_size, self.cell, self.ln, 1e-5
        torch.manual_seed(self.seed)
        reg = regularized.draw(
            "lstm", T, B, H, H, cell.weight_hh, self.keywords.get("zoneout", 0.0),
            self.keywords.get("recurrent_dropout", 0.0), 0.0, True,
        )  # fmt: skip
        scale = None
        if reg.recurrent_mask is not None:
            scale = masks.unpack(reg.recurrent_mask, H, x.dtype) / (1 - reg.recurrent_dropout)
        h = x.new_zeros(B, H)
        c = h.clone()
        outputs = []
        for t, x_t in enumerate(x.unbind(0)):
            h_in = h * scale if scale is not None else h
            if ln:
                gates = (
                    F.layer_norm(x_t @ cell.weight_ih.t(), (4 * H,),
                                 ln["layer_norm_ih_weight"], ln["layer_norm_ih_bias"], eps)
                    + F.layer_norm(h_in @ cell.weight_hh.t(), (4 * H,),
                                   ln["layer_norm_hh_weight"], ln["layer_norm_hh_bias"], eps)
                    + cell.bias_ih + cell.bias_hh
                )  # fmt: skip
                i, f, g, o = gates.chunk(4, 1)
                c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                c_ln = F.layer_norm(c_new, (H,), ln["layer_norm_c_weight"],
                                    ln["layer_norm_c_bias"], eps)  # fmt: skip
                h_new = torch.sigmoid(o) * torch.tanh(c_ln)
            else:
                h_new, c_new = cell(x_t, (h_in, c))
            if reg.zoneout_h is not None:
                zh = masks.unpack(reg.zoneout_h[t], H, x.dtype)
                zc = masks.unpack(reg.zoneout_c[t], H, x.dtype)
                h_new, c_new = zh * h + (1 - zh) * h_new, zc * c + (1 - zc) * c_new
            h, c = h_new, c_new
            outputs.append(h)
        return torch.stack(outputs), h[None], c[None]

    def named_grads(self):
        return {f"{name}_l0": p.grad for name, p in self.cell.named_parameters()}

    def zero_grad(self):
        self.cell.zero_grad(set_to_none=True)


# the fixed seed of a regularized case's masks
REGULARIZED_SEED = 20161212


_TORCH_LAYERS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN}
_TORCH_CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn_tanh": nn.RNNCell}


class Ensemble(nn.Module):
    """Independent layers on the same input, run one after another (how an ensemble is
    written without torch.func); outputs and states stacked along a new first dim."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        outs, states = zip(*(member(x) for member in self.members))
        if isinstance(states[0], tuple):
            return torch.stack(outs), tuple(torch.stack(s) for s in zip(*states))
        return torch.stack(outs), torch.stack(states)


class EnsembleRunner(Runner):
    """A gpurnn layer called through torch.func.vmap over its members' stacked parameters,
    the ensemble as one call."""

    def __init__(self, base: Ensemble, layer: nn.Module):
        from torch.func import functional_call, stack_module_state, vmap

        for member in base.members:  # the members' own weights, in the gpurnn layer's shape
            assert member.state_dict().keys() == layer.state_dict().keys()
        copies = []
        for member in base.members:
            twin = copy.deepcopy(layer)
            twin.load_state_dict(member.state_dict())
            copies.append(twin)
        self.params, self.buffers = stack_module_state(copies)
        skeleton = copy.deepcopy(layer).to("meta")

        def call(params, buffers, x):
            return functional_call(skeleton, (params, buffers), (x,))

        self.vmapped = vmap(call, in_dims=(0, 0, None))
        self.E = len(copies)

    def run(self, x):
        out, hx = self.vmapped(self.params, self.buffers, x)
        h_n, c_n = hx if isinstance(hx, tuple) else (hx, None)
        return out, h_n, c_n

    def named_grads(self):
        return {
            f"members.{i}.{name}": (p.grad[i] if p.grad is not None else None)
            for name, p in self.params.items()
            for i in range(self.E)
        }

    def zero_grad(self):
        for p in self.params.values():
            p.grad = None


def make_base(shape: Shape, dtype, device) -> nn.Module:
    """The torch.nn layer whose weights every implementation copies (seeded per shape);
    for an ensemble, an Ensemble of that many."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed("weights", shape.id))
        layers = [
            _TORCH_LAYERS[shape.cell](
                shape.input_size,
                shape.H,
                num_layers=shape.layers,
                bidirectional=shape.bidirectional,
            )
            for _ in range(shape.ensemble)
        ]
    module = Ensemble(layers) if shape.ensemble > 1 else layers[0]
    return module.to(device, dtype)


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    build: Callable[[Shape, nn.Module, torch.dtype], Runner]
    applies: Callable[[Shape], bool] = lambda shape: True
    is_baseline: bool = False  # the row every speedup is measured against


def _gpurnn_impl(backend: str) -> Impl:
    def build(shape, base, dtype):
        import gpurnn

        layer_cls = {"lstm": gpurnn.LSTM, "gru": gpurnn.GRU, "rnn_tanh": gpurnn.RNN}[shape.cell]
        param = next(base.parameters())
        module = layer_cls(
            shape.input_size,
            shape.H,
            num_layers=shape.layers,
            bidirectional=shape.bidirectional,
            backend=backend,
            device=param.device,
            dtype=param.dtype,
            **shape.layer_keywords,
        )
        if shape.ensemble > 1:
            return EnsembleRunner(base, module)
        # strict=False: a LayerNorm layer's own parameters keep their initial 1 and 0
        module.load_state_dict(base.state_dict(), strict=not shape.regularizers)
        if shape.regularizers:
            return RegularizedRunner(module, REGULARIZED_SEED)
        return ModuleRunner(module)

    return Impl(f"gpurnn-{backend}", build)


def _cell_loop_build(shape, base, dtype):
    param = next(base.parameters())
    cell = _TORCH_CELLS[shape.cell](shape.input_size, shape.H, device=param.device, dtype=dtype)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in base.state_dict().items()})
    if shape.regularizers:
        return RegularizedCellLoopRunner(cell, shape.layer_keywords, REGULARIZED_SEED)
    return CellLoopRunner(cell, shape.cell == "lstm")


def baseline_name(device: torch.device) -> str:
    # on CPU torch.nn runs its own native kernels, not cuDNN: say so in the name
    return "cudnn" if device.type == "cuda" else "torch.nn"


# gpurnn backends worth timing, in the order they are listed ("numpy" is the float64
# reference: exact and far too slow; "auto" is one of the others)
GPURNN_BACKENDS = ("triton", "cupy", "torch")


def _backend_unavailable(name: str) -> str | None:
    """Why gpurnn backend `name` cannot run here (None if it can); imports only that one."""
    from gpurnn.backends import available_backends, get_backend

    backend = get_backend(name)
    return available_backends()[name] if backend is None else backend.unavailable_reason()


def _flashrnn_unavailable() -> str | None:
    try:
        import flashrnn  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "cannot run it"
        return f"cannot import flashrnn ({type(e).__name__}: {e})".splitlines()[0]
    return None


def implementations(device: torch.device, requested: Sequence[str] | None, quick: bool):
    """(implementations to run, notes to print). By default: the baseline, every gpurnn
    backend that runs here (GPU kernels only on a GPU; gpurnn-torch not with --quick on a
    GPU, where it calls cuDNN itself), the cell loop, and FlashRNN on a GPU if importable.
    A requested name that cannot run here still gets an Impl whose build raises, so its
    rows say why."""
    on_gpu = device.type == "cuda"
    # no torch.nn layer has the regularizers: there the cell loop is the baseline
    base = Impl(
        baseline_name(device), lambda shape, base, dtype: ModuleRunner(base),
        lambda s: not s.regularizers, is_baseline=True,
    )  # fmt: skip
    cell_loop = Impl(
        "cell-loop",
        _cell_loop_build,
        lambda s: s.single_layer and not s.varlen and not s.regularizers,
    )
    regularized_loop = Impl(
        "cell-loop", _cell_loop_build, lambda s: bool(s.regularizers), is_baseline=True
    )
    flash = Impl(
        "flashrnn",
        lambda shape, base, dtype: FlashRNNRunner(base, dtype),
        lambda s: s.cell == "lstm" and s.single_layer and not s.varlen,
    )
    known = ["cudnn", "torch.nn", "cell-loop", "flashrnn"]
    known += [f"gpurnn-{b}" for b in GPURNN_BACKENDS]
    if requested:
        unknown = [n for n in requested if n not in known]
        if unknown:
            raise ValueError(f"unknown implementations {unknown}; known: {', '.join(known)}")
        wanted = list(
            dict.fromkeys(base.name if n in ("cudnn", "torch.nn") else n for n in requested)
        )
    else:
        wanted = [base.name]
        for backend in GPURNN_BACKENDS:
            if backend != "torch" and not on_gpu:
                continue  # GPU kernels on CPU (the Triton interpreter) only when named
            if backend == "torch" and on_gpu and quick:
                continue  # on CUDA gpurnn-torch calls cuDNN itself: nothing new to see
            wanted.append(f"gpurnn-{backend}")
        wanted += ["cell-loop"] + (["flashrnn"] if on_gpu else [])

    chosen, notes = [], []
    for name in wanted:
        reason = None
        if name.startswith("gpurnn-"):
            reason = _backend_unavailable(name.removeprefix("gpurnn-"))
            impl = _gpurnn_impl(name.removeprefix("gpurnn-"))
        elif name == "flashrnn":
            reason, impl = _flashrnn_unavailable(), flash
        elif name == base.name:
            impl = base
        else:
            chosen.append(regularized_loop)  # (applies to regularized shapes only)
            impl = cell_loop
        if reason is not None:
            notes.append(f"{name}: unavailable here ({reason})")
            if not requested:
                continue  # by default only what runs here; asked for by name, say why not
            impl = dataclasses.replace(impl, build=_raiser(f"unavailable: {reason}"))
        chosen.append(impl)
    if not any(i.is_baseline and i is not regularized_loop for i in chosen):
        notes.append(f"{base.name} not requested: no speedups, tolerances uncalibrated")
    return chosen, notes


def _raiser(message: str):
    def build(*args):
        raise RuntimeError(message)

    return build
