"""Persistent Triton recurrence kernels: one family for LSTM, GRU, RNN-tanh and RNN-relu,
and one for the LSTM with projection.

Forward and backward of the primitive (see gpurnn.recurrence / gpurnn.backends.base):
    y, h_T, c_T = recurrence(cell, xg, w_hh, h0, c0, lengths, reverse, b_hn)
`xg` (T, B, G*H) already holds x @ W_ih^T plus every bias except GRU's b_hn. The backend
(gpurnn/backends/triton.py) calls launch.forward / launch.backward. The plain family also
runs the regularized recurrence's zoneout, recurrent dropout and LayerNorm
(gpurnn.regularized), switched in at compile time; IndRNN has its own kernels (independent).

One room per concern; each module's docstring says what it holds and what it may import:
    exchange     how programs hand each other a step's results: sentinel, polls, grid barrier
    cell_math    per-unit math: the cell switch, activations, LSTM cell forward and backward
    tiles        tile helpers the kernel families share: rows, time, loads, mask bits,
                 zoneout weights, dgates @ W_hh
    norm         LayerNorm in the step: row moments, their exchange between programs
    forward      the plain forward kernel
    backward     the plain backward kernel
    projected    the LSTM-with-projection kernels, forward and backward
    independent  IndRNN: kernels and launchers
    plan         Plan, make_plan and _fit: how a recurrence is laid out on the device
    launch       forward() / backward(): buffers, sentinel filling, launches, workspace
    interpreter  running under TRITON_INTERPRET=1
Kernels import exchange, cell_math, tiles and norm, never each other; plan imports no kernel;
launch imports plan and the kernels.
"""

from . import interpreter  # noqa: F401  (applies the interpreter fix before any kernel runs)
