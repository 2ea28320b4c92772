"""Per-unit cell math of the kernels: the compile-time cell switch (LSTM, GRU, RNN_TANH,
RNN_RELU; CELL_CODE maps a cell's name to it), the activations, the LSTM gates and cell forward
and backward on (BLOCK_B, BH) tiles, and the split of a gate-major tile into its gates.
Device code only (@triton.jit); imports nothing else of the package. The float64 ground
truth of the same math is gpurnn.reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

# compile-time cell switch
LSTM: tl.constexpr = tl.constexpr(0)
GRU: tl.constexpr = tl.constexpr(1)
RNN_TANH: tl.constexpr = tl.constexpr(2)
RNN_RELU: tl.constexpr = tl.constexpr(3)
CELL_CODE = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # libdevice tanh fails in the interpreter; this form works on both, saturates cleanly.
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _lstm_gates(x0, x1, x2, x3, a0, a1, a2, a3, c_prev):
    """The LSTM gates of the own units from the pre-activations x + W_hh h (PyTorch's gate
    order i, f, g, o) and c_t = f c_{t-1} + i g."""
    ig = _sigmoid(x0 + a0)
    fg = _sigmoid(x1 + a1)
    gg = _tanh(x2 + a2)
    og = _sigmoid(x3 + a3)
    return ig, fg, gg, og, fg * c_prev + ig * gg


@triton.jit
def _lstm_cell(x0, x1, x2, x3, a0, a1, a2, a3, c_prev):
    """One LSTM step of the own units: the gates, c_t and o * tanh(c_t) (h_t, or m_t before
    a projection)."""
    ig, fg, gg, og, c_new = _lstm_gates(x0, x1, x2, x3, a0, a1, a2, a3, c_prev)
    return ig, fg, gg, og, c_new, og * _tanh(c_new)


@triton.jit
def _lstm_gates_backward(dc, dh, tc, ig, fg, gg, og, c_prev):
    """The four pre-activations' gradients from dc_t, the gradient of c_t (every path), dh,
    that of o * tc, and tc, the tanh h_t took (of c_t, or of LayerNorm's LN_c(c_t))."""
    d0 = dc * gg * ig * (1.0 - ig)
    d1 = dc * c_prev * fg * (1.0 - fg)
    d2 = dc * ig * (1.0 - gg * gg)
    d3 = dh * tc * og * (1.0 - og)
    return d0, d1, d2, d3


@triton.jit
def _lstm_cell_backward(dh, dc_next, ig, fg, gg, og, c, c_prev):
    """The LSTM step backwards: from the saved gates and cell states and the gradients of
    o * tanh(c_t) (dh) and of c_t from the step after (dc_next), the gradients of the four
    pre-activations and dc_t (dc_{t-1} = dc_t * f)."""
    tc = _tanh(c)
    dc = dc_next + dh * og * (1.0 - tc * tc)
    d0, d1, d2, d3 = _lstm_gates_backward(dc, dh, tc, ig, fg, gg, og, c_prev)
    return d0, d1, d2, d3, dc


@triton.jit
def _lstm_step_backward(dh, dc_c, w_c, ig, fg, gg, og, c, c_prev, valid2,
                        ZONEOUT: tl.constexpr):  # fmt: skip
    """`_lstm_cell_backward` of one step with c's carry dc_c: (d0, d1, d2, d3, the carry
    into c_{t-1}), the carry riding on where not valid2. ZONEOUT: c is the saved, blended
    c_t and w_c its weights; h̃_t (m_t) came from c̃_t = f c_{t-1} + i g, and of dc_t
    (1 − w) goes through the cell, w straight to c_{t-1}."""
    if ZONEOUT != 0:
        d0, d1, d2, d3, dc = _lstm_cell_backward(dh, (1.0 - w_c) * dc_c, ig, fg, gg, og,
                                                 fg * c_prev + ig * gg, c_prev)  # fmt: skip
        dc_c = tl.where(valid2, dc * fg + w_c * dc_c, dc_c)
    else:
        d0, d1, d2, d3, dc = _lstm_cell_backward(dh, dc_c, ig, fg, gg, og, c, c_prev)
        dc_c = tl.where(valid2, dc * fg, dc_c)
    return d0, d1, d2, d3, dc_c


@triton.jit
def _lstm_step_backward_from(dc_h, dh, tc, dc_c, w_c, ig, fg, gg, og, c_prev, valid2,
                             ZONEOUT: tl.constexpr):  # fmt: skip
    """`_lstm_step_backward` where h̃_t's path into c̃_t is given: dc_h its gradient, tc the
    tanh h̃_t took (LayerNorm's LN_c sits between). Zoneout as there."""
    if ZONEOUT != 0:
        dc = dc_h + (1.0 - w_c) * dc_c
        d0, d1, d2, d3 = _lstm_gates_backward(dc, dh, tc, ig, fg, gg, og, c_prev)
        dc_c = tl.where(valid2, dc * fg + w_c * dc_c, dc_c)
    else:
        dc = dc_h + dc_c
        d0, d1, d2, d3 = _lstm_gates_backward(dc, dh, tc, ig, fg, gg, og, c_prev)
        dc_c = tl.where(valid2, dc * fg, dc_c)
    return d0, d1, d2, d3, dc_c


@triton.jit
def _split_gates(a, BLOCK_B: tl.constexpr, BH: tl.constexpr, GP: tl.constexpr):
    """(BLOCK_B, GP*BH) gate-major tile -> GP (BLOCK_B, BH) tiles (unused ones alias)."""
    if GP == 1:
        return a, a, a, a
    else:
        a = tl.permute(tl.reshape(a, (BLOCK_B, GP, BH)), (0, 2, 1))  # (BLOCK_B, BH, GP)
        if GP == 2:
            g0, g1 = tl.split(a)
            return g0, g1, g0, g0
        else:
            # gate g = 2*hi + lo; split takes the last (lo) axis first
            lo0, lo1 = tl.split(tl.reshape(a, (BLOCK_B, BH, 2, 2)))
            g0, g2 = tl.split(lo0)
            g1, g3 = tl.split(lo1)
            return g0, g1, g2, g3
