"""A window into a recurrent network: every step's gates, cell states and hidden states.

    from gpurnn import inspect
    rec = inspect.record(model.rnn, x)          # any gpurnn or torch.nn RNN / LSTM / GRU
    rec.get("f", layer=1, direction=0)          # (T, B, H): the forget gate at every step
    inspect.plot_heatmap(rec, "c", path="c.png")
    inspect.plot_gate_saturation(rec, path="saturation.png")

`record` re-runs the module's recurrence with the module's own weights with `save=True`:
the workspace a backend keeps for its backward holds every step's gate activations (LSTM
i, f, g, o and c; GRU r, z, n), in one layout shared by the `torch` time loop and the
`triton` kernels. With `backend="triton"` (the default for CUDA tensors where the model
would run on triton) the values come straight from the fused kernels; otherwise from the
torch backend's loop. So it works whatever backend the model runs on, with no hooks into
kernels, and the values are those of the model's own
forward: the last layer's recorded hidden states are the module's output, to rounding
(1e-10 in float64; checked in tests/test_inspect.py against the module and against the
float64 reference). It records the eval-mode computation: no dropout between layers.

Recorded tensors are time-major, (T, B, units), in the model's dtype (fp32 for 16-bit
models). Steps past a sequence's end (PackedSequence input) did not happen: they are NaN.

`python -m gpurnn inspect` (gpurnn.demos) shows it on a small LSTM trained to track the
nesting depth of brackets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from gpurnn import functional
from gpurnn.backends import Inputs, choose_backend, get_backend
from gpurnn.backends.common import compute_dtype, step_mask
from gpurnn.cells import MODE_TO_CELL, TABLE, unpack_workspace

__all__ = [
    "GATE_NAMES",
    "Recording",
    "record",
    "saturation",
    "plot_heatmap",
    "plot_gate_saturation",
]

# gate activations per cell, in PyTorch's order (gpurnn.cells' table)
GATE_NAMES = {name: cell.gate_names for name, cell in TABLE.items()}
# quantities bounded by tanh (range [-1, 1]); the sigmoid gates are in [0, 1]
_TANH_RANGE = {"g", "n"}
SATURATION = 0.1  # a sigmoid gate within 0.1 of 0 or 1 (a tanh within 0.1 of ±1) is saturated


@dataclass
class Recording:
    """What `record` saw. `steps[(layer, direction)][name]` is a (T, B, units) tensor for
    name in `names`: the gates, "c" (LSTM) and "h"; `lengths` (B,) each sequence's length."""

    cell: str
    num_layers: int
    num_directions: int
    lengths: Tensor
    steps: dict[tuple[int, int], dict[str, Tensor]] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return _recorded_fields(self.cell) + ("h",)

    def get(self, what: str, layer: int = 0, direction: int = 0) -> Tensor:
        if what not in self.names:
            raise KeyError(f"{what!r} not recorded for {self.cell}; choose from {self.names}")
        return self.steps[(layer, direction)][what]

    def output(self) -> Tensor:
        """The module's output, time-major and padded with zeros as torch.nn pads."""
        last = self.num_layers - 1
        h = torch.cat([self.get("h", last, d) for d in range(self.num_directions)], dim=-1)
        return h.nan_to_num(0.0)


def _initial_states(module, hx, B, like):
    """h0 (L*D, B, H_out), c0 (L*D, B, H) or None from hx as the module accepts it."""
    D = 2 if module.bidirectional else 1
    H_out = module.proj_size or module.hidden_size
    is_lstm = module.mode == "LSTM"
    if hx is None:
        h0 = like.new_zeros(module.num_layers * D, B, H_out)
        c0 = like.new_zeros(module.num_layers * D, B, module.hidden_size) if is_lstm else None
        return h0, c0
    h0, c0 = hx if is_lstm else (hx, None)
    if h0.dim() == 2:  # unbatched
        h0, c0 = h0[:, None], (c0[:, None] if c0 is not None else None)
    return h0, c0


def _recorded_fields(cell: str) -> tuple[str, ...]:
    """The workspace fields a recording keeps: the gates and LSTM's c (GRU's hn is not an
    activation; h is taken from y)."""
    return GATE_NAMES[cell] + (("c",) if cell == "lstm" else ())


# backends whose forward(save=True) workspace has gpurnn.cells' layout
_RECORDING_BACKENDS = ("torch", "triton")


def _recording_backend(module, cell, x, requested):
    if requested is None:
        requested = choose_backend(
            getattr(module, "backend", None), cell, x.device, x.dtype, module.proj_size > 0,
            module.hidden_size, x.shape[1],
        )  # fmt: skip
    if requested not in _RECORDING_BACKENDS:
        return get_backend("torch")  # e.g. numpy: no workspace; the torch loop is exact too
    return get_backend(requested)


@torch.no_grad()
def record(module, input, hx=None, *, backend: str | None = None) -> Recording:
    """Run `module` (gpurnn or torch.nn RNN/LSTM/GRU) on `input` (a tensor laid out as the
    module takes it, batched or not, or a PackedSequence) and `hx`, keeping every step of
    every (layer, direction). Batch order is the caller's, also for PackedSequence.
    `backend` ("torch" or "triton") says whose kernels compute the recording; by default
    the one the module itself would run on, or the torch loop for the others."""
    changed = [k for k in ("layer_norm", "zoneout") if getattr(module, k, 0)]
    if changed:  # (eval-mode dropouts are the identity: those layers record as they run)
        raise ValueError(
            f"inspect.record does not record regularized layers yet ({', '.join(changed)} on)"
        )
    cell = MODE_TO_CELL[module.mode]
    D = 2 if module.bidirectional else 1
    lengths = None
    if isinstance(input, PackedSequence):
        x, lengths = pad_packed_sequence(input)  # time-major, in the caller's batch order
    elif input.dim() == 2:
        x = input[:, None]  # unbatched (T, F): a batch of one
    else:
        x = input.transpose(0, 1) if module.batch_first else input
    T, B = x.shape[:2]
    h0, c0 = _initial_states(module, hx, B, x)
    acc = compute_dtype(x.dtype)
    valid = step_mask(T, lengths, x.device)
    rec = Recording(
        cell,
        module.num_layers,
        D,
        lengths if lengths is not None else torch.full((B,), T, dtype=torch.long),
    )
    runner = _recording_backend(module, cell, x, backend)
    weights = functional.layer_weights(module)
    layer_in = x
    for layer in range(module.num_layers):
        outputs = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            xg, b_hn = functional.input_projection(cell, layer_in, w_ih, b_ih, b_hh)
            inputs = Inputs(
                cell,
                xg,
                w_hh,
                h0[k],
                c0[k] if c0 is not None else None,
                lengths,
                reverse=d == 1,
                b_hn=b_hn,
                w_hr=w_hr,
            )
            y, _, _, workspace = runner.forward(inputs, save=True)
            names = _recorded_fields(cell)
            if names and workspace.numel() == 0:  # a kernel set to recompute keeps none
                raise RuntimeError(
                    f"backend {runner.name!r} kept no workspace (recompute mode); "
                    "record with backend='torch'"
                )
            outputs.append(y)
            # the workspace holds the fields side by side (gpurnn.cells); whether a plain
            # RNN's h is among them differs per backend, so h is always taken from y
            H = w_hh.shape[0] // TABLE[cell].gate_count
            fields = unpack_workspace(cell, workspace, H, from_output=True) if names else {}
            # a kernel may keep its 16-bit gates in the input dtype (triton does, to halve
            # the workspace); the recording promises the compute dtype on every backend
            steps = {name: fields[name].to(acc) for name in names}
            steps["h"] = y.to(acc)
            if valid is not None:  # past a sequence's end nothing was computed
                steps = {n: v.masked_fill(~valid, math.nan) for n, v in steps.items()}
            rec.steps[(layer, d)] = steps
        layer_in = torch.cat(outputs, dim=-1)
    return rec


def _share(mask: Tensor) -> float:
    return mask.float().mean().item() if mask.numel() else math.nan


def saturation(recording: Recording, threshold: float = SATURATION) -> dict:
    """{(layer, direction): {gate: (fraction low, fraction high)}}: the share of a gate's
    values (all units, steps, sequences) within `threshold` of its lower / upper bound
    (0 / 1 for sigmoid gates, -1 / 1 for tanh). Cells without gates report "h"."""
    out = {}
    names = GATE_NAMES[recording.cell] or ("h",)
    for key in recording.steps:
        out[key] = {}
        for name in names:
            v = recording.get(name, *key)
            v = v[~v.isnan()]
            low = -1.0 if (name in _TANH_RANGE or name == "h") else 0.0
            out[key][name] = (_share(v < low + threshold), _share(v > 1.0 - threshold))
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(
    recording: Recording,
    what: str = "h",
    layer: int = 0,
    direction: int = 0,
    batch_index: int = 0,
    path="heatmap.png",
    *,
    xticklabels=None,
    title=None,
):
    """A unit-by-time heatmap of one quantity ("h", "c" or a gate name) for one sequence,
    written to `path` (returned). `xticklabels`: one label per step, e.g. the input tokens."""
    plt = _pyplot()
    v = recording.get(what, layer, direction)[:, batch_index].float().cpu().T  # (units, T)
    if what in GATE_NAMES[recording.cell] and what not in _TANH_RANGE:
        kw = dict(cmap="viridis", vmin=0.0, vmax=1.0)  # sigmoid gates: closed .. open
    else:
        bound = v.nan_to_num(0).abs().max().item() or 1.0
        if what in _TANH_RANGE or (what == "h" and recording.cell != "rnn_relu"):
            bound = 1.0
        kw = dict(cmap="RdBu_r", vmin=-bound, vmax=bound)
    units, T = v.shape
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.12 * T), min(8, 1.2 + 0.18 * units)))
    im = ax.imshow(v.numpy(), aspect="auto", interpolation="nearest", **kw)
    fig.colorbar(im, ax=ax, pad=0.01)
    ax.set_ylabel("unit")
    ax.set_xlabel("step")
    if xticklabels is not None:
        ax.set_xticks(range(T), list(xticklabels)[:T], fontsize=7, family="monospace")
    direction_name = " (reverse)" if direction == 1 else ""
    ax.set_title(
        title or f"{recording.cell} {what}, layer {layer}{direction_name}, sequence {batch_index}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_gate_saturation(
    recording: Recording, path="saturation.png", *, threshold: float = SATURATION
):
    """Histograms of every gate's activations, one row per (layer, direction), annotated
    with the fractions within `threshold` of each bound (saturated), written to `path`."""
    plt = _pyplot()
    names = GATE_NAMES[recording.cell] or ("h",)
    keys = sorted(recording.steps)
    fracs = saturation(recording, threshold)
    fig, axes = plt.subplots(
        len(keys),
        len(names),
        squeeze=False,
        figsize=(2.6 * len(names) + 0.5, 2.0 * len(keys) + 0.4),
    )
    for row, key in enumerate(keys):
        for col, name in enumerate(names):
            v = recording.get(name, *key).float()
            v = v[~v.isnan()].cpu().numpy()
            ax = axes[row][col]
            tanh_like = name in _TANH_RANGE or name == "h"
            ax.hist(v, bins=50, range=(-1.0 if tanh_like else 0.0, 1.0), color="tab:blue")
            low, high = fracs[key][name]
            ax.set_title(f"{name}: {low:.0%} low, {high:.0%} high", fontsize=9)
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"layer {key[0]}" + (" rev" if key[1] else ""))
    fig.suptitle(
        f"{recording.cell} gate activations (saturated: within {threshold} of a bound)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
