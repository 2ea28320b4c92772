"""The shape matrix (one declarative table, SHAPES), its suites, the --quick list, the
FLOP count of a case, and the fresh random inputs each case runs on.

Each row's shape id is derived from its parameters, so rows stay comparable across runs
as long as the parameters do.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from gpurnn.cells import GATES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# a shape's `regularizers` names one of these sets of gpurnn layer keywords
REGULARIZERS = {
    "ln": {"layer_norm": True},
    "zo-rd": {"zoneout": 0.1, "recurrent_dropout": 0.25},
}
MODES = ("fwd", "fwdbwd")


@dataclasses.dataclass(frozen=True)
class Shape:
    suite: str
    cell: str  # "lstm", "gru", "rnn_tanh"
    T: int
    B: int
    H: int
    input_size: int
    layers: int = 1
    bidirectional: bool = False
    varlen: str = ""  # "": dense; "packed" / "padded": lengths uniform in [T/4, T]
    ensemble: int = 1  # > 1: that many independent layers on the same input (torch.func.vmap)
    regularizers: str = ""  # "" or a key of REGULARIZERS

    @property
    def id(self) -> str:
        """Stable name built from the parameters (rows keep it across runs)."""
        parts = [self.cell]
        if self.ensemble > 1:
            parts.append(f"E{self.ensemble}")
        if self.layers > 1:
            parts.append(f"L{self.layers}")
        if self.bidirectional:
            parts.append("bi")
        parts += [f"T{self.T}", f"B{self.B}", f"H{self.H}"]
        if self.input_size != self.H:
            parts.append(f"I{self.input_size}")
        if self.varlen:
            parts.append(self.varlen)
        if self.regularizers:
            parts.append(self.regularizers)
        return "-".join(parts)

    @property
    def layer_keywords(self) -> dict:
        """The regularizer keywords of the gpurnn layer (none for plain shapes)."""
        return dict(REGULARIZERS[self.regularizers]) if self.regularizers else {}

    @property
    def single_layer(self) -> bool:
        """One plain layer (what a loop of cells or FlashRNN can stand in for)."""
        return self.layers == 1 and not self.bidirectional and self.ensemble == 1

    @property
    def baseline_id(self) -> str:
        """The shape whose cuDNN time the speedup divides: padded runs race cuDNN packed."""
        if self.varlen == "padded":
            return dataclasses.replace(self, varlen="packed").id
        return self.id

    def lengths(self) -> Tensor | None:
        """Per-sequence lengths, the same on every run and machine (seeded by the shape)."""
        if not self.varlen:
            return None
        g = torch.Generator().manual_seed(_seed("lengths", self.cell, self.T, self.B))
        lengths = torch.randint(max(1, self.T // 4), self.T + 1, (self.B,), generator=g)
        lengths[0] = self.T  # so the padded tensor is exactly T long
        return lengths

    def tokens(self) -> int:
        """Time steps of useful work summed over the batch (FLOPs count only these)."""
        lengths = self.lengths()
        return self.T * self.B if lengths is None else int(lengths.sum())


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _lstm_matrix() -> list[Shape]:
    shapes = [Shape("flashrnn", "lstm", 1024, B, 768, 768) for B in (1, 4, 16, 64, 256)]
    shapes += [Shape("flashrnn", "lstm", 1024, 16, H, H) for H in (256, 1024, 2048)]
    shapes.append(Shape("flashrnn", "lstm", 1024, 256, 1024, 1024))
    return shapes


SHAPES: list[Shape] = [
    *_lstm_matrix(),
    *(Shape("cells", cell, 1024, B, 768, 768) for cell in ("gru", "rnn_tanh") for B in (16, 256)),
    Shape("stack", "lstm", 512, 64, 512, 512, layers=2, bidirectional=True),
    Shape("fastrnns", "lstm", 100, 64, 512, 512),  # PyTorch's own RNN benchmark default
    Shape("varlen", "lstm", 1024, 64, 768, 768, varlen="packed"),
    Shape("varlen", "lstm", 1024, 64, 768, 768, varlen="padded"),
    # a model ensemble: 8 LSTMs vmapped over stacked parameters vs a loop over cuDNN layers
    Shape("ensemble", "lstm", 1024, 16, 256, 256, ensemble=8),
    # regularized LSTMs beside the plain flashrnn/lstm-T1024-B16-H768 and the cell loop that
    # people write for them (no cuDNN kernel has them)
    *(Shape("regularized", "lstm", 1024, 16, 768, 768, regularizers=r) for r in REGULARIZERS),
    # tiny shapes for CPU-only machines and the harness's own tests
    Shape("smoke", "lstm", 8, 2, 16, 16),
    Shape("smoke", "lstm", 8, 4, 16, 16),
    Shape("smoke", "lstm", 8, 2, 32, 32),
    Shape("smoke", "gru", 8, 2, 16, 16),
    Shape("smoke", "rnn_tanh", 8, 2, 16, 16),
    Shape("smoke", "lstm", 8, 2, 16, 16, layers=2, bidirectional=True),
    Shape("smoke", "lstm", 8, 3, 16, 16, varlen="packed"),
    Shape("smoke", "lstm", 8, 3, 16, 16, varlen="padded"),
    Shape("smoke", "lstm", 8, 2, 16, 16, ensemble=2),
    *(Shape("smoke", "lstm", 8, 2, 16, 16, regularizers=r) for r in REGULARIZERS),
]
SUITES = tuple(dict.fromkeys(s.suite for s in SHAPES))

# --quick on a GPU: the shapes of the speed targets in docs/design.md, as (shape id, dtype)
QUICK: list[tuple[str, str]] = [
    *((f"lstm-T1024-B{B}-H768", "bf16") for B in (1, 4, 16, 64)),
    ("lstm-T1024-B256-H1024", "bf16"),
    ("gru-T1024-B16-H768", "bf16"),
    ("rnn_tanh-T1024-B16-H768", "bf16"),
    ("lstm-T1024-B16-H768", "fp16"),
]


def select_shapes(spec: str | None, default_suites: Sequence[str]) -> list[Shape]:
    """Shapes named by `spec` (comma-separated suite names or shape ids), else the suites.

    A shape id may stand in several suites: the first (in table order) is taken.
    """
    if not spec:
        return [s for s in SHAPES if s.suite in default_suites]
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in tokens if t not in SUITES and t not in {s.id for s in SHAPES}]
    if unknown:
        raise ValueError(
            f"unknown shapes {unknown}; suites are {', '.join(SUITES)}, ids e.g. {SHAPES[0].id}"
        )
    chosen: dict[str, Shape] = {}
    for s in SHAPES:
        if (s.suite in tokens or s.id in tokens) and s.id not in chosen:
            chosen[s.id] = s
    return list(chosen.values())


def flops(shape: Shape, mode: str) -> float:
    """Useful FLOPs of the whole layer stack: input GEMM + recurrent GEMM per step; a
    backward counts twice the forward (so fwd+bwd is three forwards)."""
    directions = 2 if shape.bidirectional else 1
    gate_rows = GATES[shape.cell] * shape.H
    total = 0
    for layer in range(shape.layers):
        inputs = shape.input_size if layer == 0 else shape.H * directions
        total += directions * 2 * shape.tokens() * gate_rows * (inputs + shape.H)
    return float(total * shape.ensemble * (3 if mode == "fwdbwd" else 1))


@dataclasses.dataclass
class InputSet:
    """One set of fresh random inputs: what the layer is called with (time-major x, or a
    PackedSequence), the leaf tensor that receives dx, and the upstream gradient shaped
    like the output's data."""

    inp: Tensor | PackedSequence
    leaf: Tensor
    dy: Tensor


def make_inputs(shape: Shape, dtype, device, seed: int) -> InputSet:
    # drawn on the device: hundreds of millions of values per set at the large shapes
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape.T, shape.B, shape.input_size, generator=g, device=device).to(dtype)
    out_size = shape.H * (2 if shape.bidirectional else 1)
    lengths = shape.lengths()
    if shape.varlen == "packed":
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        leaf = packed.data.detach().requires_grad_()
        inp = PackedSequence(
            leaf, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
        )
        rows = leaf.shape[0]
    else:
        leaf = inp = x.detach().requires_grad_()
        rows = shape.T * shape.B
    # an ensemble's output stacks its members' outputs (E, T, B, H)
    members = (shape.ensemble,) if shape.ensemble > 1 else ()
    dy = torch.randn(shape.ensemble * rows, out_size, generator=g, device=device).to(dtype)
    return InputSet(inp, leaf, dy.view(members + leaf.shape[:-1] + (out_size,)))


def _upcast(inputs: InputSet) -> InputSet:
    leaf = inputs.leaf.detach().float().requires_grad_()
    inp = leaf
    if isinstance(inputs.inp, PackedSequence):
        inp = PackedSequence(leaf, *inputs.inp[1:])
    return InputSet(inp, leaf, inputs.dy.float())
