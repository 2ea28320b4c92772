"""The four recurrent cells and their gate layouts (PyTorch's order and formulas).

    rnn_tanh  h' = tanh(xg + W_hh h)
    rnn_relu  h' = relu(xg + W_hh h)
    lstm      i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (xg + W_hh h)
              c' = f * c + i * g;  m = o * tanh(c');  h' = W_hr m if projected else m
    gru       r = sigmoid(x_r + W_hr h);  z = sigmoid(x_z + W_hz h)
              n = tanh(x_n + r * (W_hn h + b_hn));  h' = (1 - z) * n + z * h

`xg` already holds the input projection and every bias except GRU's b_hn, which must
stay inside the reset gate's product.
"""

from __future__ import annotations

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")

# number of gate blocks of H rows in W_ih / W_hh
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}

# torch.nn's `mode` strings (RNNBase.mode) to our cell names
MODE_TO_CELL = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "LSTM": "lstm", "GRU": "gru"}


def check_cell(cell: str) -> str:
    if cell not in GATES:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    return cell
