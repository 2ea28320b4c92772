"""The four recurrent cells: gate layouts (PyTorch's order and formulas) and the workspace
every backend keeps for its backward. This table is the one place these facts are written;
the backends, the Triton launchers and gpurnn.inspect read it, and tests/test_cells.py
checks the CUDA header (kernels/cuda/rnn_cells.cuh) and every backend's saved workspace
against it.

    rnn_tanh  h' = tanh(xg + W_hh h)
    rnn_relu  h' = relu(xg + W_hh h)
    lstm      i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (xg + W_hh h)
              c' = f * c + i * g;  m = o * tanh(c');  h' = W_hr m if projected else m
    gru       r = sigmoid(x_r + W_hr h);  z = sigmoid(x_z + W_hz h)
              n = tanh(x_n + r * (W_hn h + b_hn));  h' = (1 - z) * n + z * h

`xg` already holds the input projection and every bias except GRU's b_hn, which must
stay inside the reset gate's product.

Workspace: (T, B, F*H) for F fields, field k of unit j at column k*H + j:
    lstm  i, f, g, o (activations), c (cell state after the step)
    gru   r, z, n (activations), hn = W_hn h + b_hn
    rnn   h (the activation, before rounding to the output dtype)
The plain RNN's one field is its output, which y already holds: the CUDA kernels read it
from y and keep no workspace (`saved_fields(cell, from_output=True)`); the Triton kernels
keep it unrounded, and so does the torch loop, whose backward never reads y (the caller
may modify y in place). The loop keeps its fields in the gate math's dtype
(fp32 for 16-bit inputs), the CUDA kernels in fp32, the Triton kernels in the input dtype
(half the memory traffic for 16-bit inputs). The numpy backend keeps none: its backward
reruns the reference.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cell:
    name: str
    mode: str  # torch.nn's RNNBase.mode
    gate_count: int  # gate blocks of H rows in W_ih / W_hh
    gate_names: tuple[str, ...]  # the gate activations, PyTorch's order (none for plain RNNs)
    fields: tuple[str, ...]  # the workspace's fields, in column order
    output_fields: tuple[str, ...]  # the fields y already holds


TABLE = {
    "rnn_tanh": Cell("rnn_tanh", "RNN_TANH", 1, (), ("h",), ("h",)),
    "rnn_relu": Cell("rnn_relu", "RNN_RELU", 1, (), ("h",), ("h",)),
    "lstm": Cell("lstm", "LSTM", 4, ("i", "f", "g", "o"), ("i", "f", "g", "o", "c"), ()),
    "gru": Cell("gru", "GRU", 3, ("r", "z", "n"), ("r", "z", "n", "hn"), ()),
}

CELLS = tuple(TABLE)

# number of gate blocks of H rows in W_ih / W_hh
GATES = {name: cell.gate_count for name, cell in TABLE.items()}

# torch.nn's `mode` strings (RNNBase.mode) to our cell names
MODE_TO_CELL = {cell.mode: name for name, cell in TABLE.items()}


def check_cell(cell: str) -> str:
    if cell not in TABLE:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    return cell


def saved_fields(cell: str, from_output: bool = False) -> tuple[str, ...]:
    """The workspace fields of `cell`, in column order; `from_output`: without those y
    already holds (what the torch loop and the CUDA kernels keep)."""
    entry = TABLE[cell]
    if from_output:
        return tuple(f for f in entry.fields if f not in entry.output_fields)
    return entry.fields


def unpack_workspace(cell: str, workspace, H: int, from_output: bool = False) -> dict:
    """A saved workspace (T, B, F*H) as {field: (T, B, H) view}, fields as `saved_fields`
    lists them. Steps past a sequence's end hold zeros or leftovers, per backend."""
    names = saved_fields(cell, from_output)
    if not names:
        return {}
    T, B, _ = workspace.shape
    w = workspace.view(T, B, len(names), H)
    return {name: w[:, :, k] for k, name in enumerate(names)}


# Cells only the regularized recurrence runs (gpurnn.regularized): they are no part of the
# table above, which every fused kernel implements.
#
#     indrnn_tanh / indrnn_relu   h' = act(xg + u ⊙ h)   (u = w_hh, a vector of H)
#
# Li et al. 2018: each unit recurs on itself alone, so nothing is exchanged between units.
INDRNN_CELLS = ("indrnn_tanh", "indrnn_relu")

# LayerNorm's epsilon in the regularized cells (torch.nn.LayerNorm's default)
LAYER_NORM_EPS = 1e-5


def regularized_gate_count(cell: str) -> int:
    """Gate blocks of H rows in xg, for every cell the regularized recurrence runs."""
    if cell in INDRNN_CELLS:
        return 1
    return GATES[check_cell(cell)]
