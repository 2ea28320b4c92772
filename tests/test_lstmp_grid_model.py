"""The step protocol of the LSTM-with-projection grid kernels (kernels/cuda/rnn_lstmp.cuh),
modelled in float64 on CPU and composed with the cupy backend's own glue.

The kernels need a GPU; what they compute per step is a small protocol that can go wrong
without any CUDA detail being wrong: which exchange plane a phase reads and writes, what a
row past its sequence's end publishes and carries, the closing step that adds the last
dgates to dh0, and the ownership of units and projected outputs by blocks. The model below
follows the kernels' bodies statement by statement (blocks own the same units and outputs,
exchanges have two planes and start as NaN where the kernel's are zeroed padding, so a read
of a plane nobody wrote shows), then the backend's `projection_grad` and
`kernel_weight_grads` turn its outputs into dW_hr and dW_hh, and everything is compared
with the float64 reference: y, h_T, c_T and every gradient, for both directions, uneven
lengths (0 included) and given or absent h0 / c0.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from gpurnn import reference
from gpurnn.backends.common import kernel_weight_grads, projection_grad
from gpurnn.backends.cupy.plan import PROJ_OUT_ROWS
from tests.conftest import seeded_generator

# ---------------------------------------------------------------- rnn_index.cuh, in Python


def forward_time(s, T, reverse):
    return T - 1 - s if reverse else s


def backward_time(s, T, reverse):
    return s if reverse else T - 1 - s


def backward_step(s, T, reverse):
    """(t, source) as BackwardStep."""
    t = backward_time(s, T, reverse) if s < T else -1
    source = backward_time(s - 1, T, reverse) if s > 0 else -1
    return t, source


def step_valid(t, length):
    return 0 <= t < length


def predecessor(t, reverse):
    return t + 1 if reverse else t - 1


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- the kernels' bodies


def model_forward(xg, w_hh, w_hr, h0, c0, lengths, reverse, units, rng):
    T, B, _ = xg.shape
    P, H = w_hr.shape
    blocks = max(math.ceil(H / units), math.ceil(P / PROJ_OUT_ROWS))
    hx = np.full((2, B, P), np.nan)  # (plane, row, output)
    mx = np.full((2, B, H), np.nan)
    h_state, c_state = h0.copy(), c0.copy()
    y = np.full((T, B, P), np.nan)
    ws = np.full((T, B, 5 * H), np.nan)
    hx[0] = h_state  # put_initial
    for s in range(T):
        t = forward_time(s, T, reverse)
        valid = np.array([step_valid(t, int(n)) for n in lengths])
        # phase 1: blocks in any order (each reads hx, writes only its own units of mx)
        for blk in rng.permutation(blocks):
            js = np.arange(blk * units, min(H, (blk + 1) * units))
            if js.size == 0:
                continue
            x = hx[s & 1]  # reader(s)
            pre = [x @ w_hh[g * H + js].T for g in range(4)]  # (B, units) each
            for b in range(B):
                if valid[b]:
                    i, f, o = (sigmoid(pre[g][b] + xg[t, b, g * H + js]) for g in (0, 1, 3))
                    g_ = np.tanh(pre[2][b] + xg[t, b, 2 * H + js])
                    c = f * c_state[b, js] + i * g_
                    m = o * np.tanh(c)
                    c_state[b, js] = c
                    for k, field in enumerate((i, f, g_, o, c)):
                        ws[t, b, k * H + js] = field
                else:
                    m = 0.0
                    for k in range(5):
                        ws[t, b, k * H + js] = 0.0
                mx[(s + 1) & 1, b, js] = m  # put(s)
        # grid barrier; phase 2: the blocks that own projected outputs
        for blk in rng.permutation(blocks):
            ps = np.arange(blk * PROJ_OUT_ROWS, min(P, (blk + 1) * PROJ_OUT_ROWS))
            if ps.size == 0:
                continue
            h_new = mx[(s + 1) & 1] @ w_hr[ps].T  # reader(s + 1)
            for b in range(B):
                if valid[b]:
                    h_state[b, ps] = h_new[b]
                    y[t, b, ps] = h_new[b]
                else:
                    y[t, b, ps] = 0.0
                hx[(s + 1) & 1, b, ps] = h_state[b, ps]  # put(s)
        # grid barrier
    return y, h_state, c_state, ws


def model_backward(w_hh, w_hr, c0, lengths, reverse, ws, dy, dh_T, dc_T, units, rng):
    T, B, P = dy.shape
    H = w_hr.shape[1]
    blocks = max(math.ceil(H / units), math.ceil(P / PROJ_OUT_ROWS))
    dhx = np.full((2, B, P), np.nan)
    dgx = np.full((2, B, 4 * H), np.nan)
    dgx[0] = 0.0  # step 0 has no source: its GEMM reads the zeroed plane (or skips it)
    dh_state, dc_state = dh_T.copy(), dc_T.copy()
    dxg = np.full((T, B, 4 * H), np.nan)
    dhp = np.full((T, B, P), np.nan)
    for s in range(T + 1):
        t, source = backward_step(s, T, reverse)
        # phase 1: projected outputs
        for blk in rng.permutation(blocks):
            ps = np.arange(blk * PROJ_OUT_ROWS, min(P, (blk + 1) * PROJ_OUT_ROWS))
            if ps.size == 0:
                continue
            active = any(step_valid(source, int(n)) for n in lengths)
            red = dgx[s & 1] @ w_hh[:, ps] if active else np.zeros((B, ps.size))
            for b in range(B):
                dh_in = dh_state[b, ps] + red[b]
                if s == T:
                    dh_state[b, ps] = dh_in
                    continue
                if step_valid(t, int(lengths[b])):
                    dh = dh_in + dy[t, b, ps]
                    dh_state[b, ps] = 0.0
                else:
                    dh = 0.0
                    dh_state[b, ps] = dh_in
                dhp[t, b, ps] = dh
                dhx[(s + 1) & 1, b, ps] = dh
        if s == T:
            break
        # grid barrier; phase 2: units
        for blk in rng.permutation(blocks):
            js = np.arange(blk * units, min(H, (blk + 1) * units))
            if js.size == 0:
                continue
            dm_all = dhx[(s + 1) & 1] @ w_hr[:, js]
            for b in range(B):
                cols = [g * H + js for g in range(4)]
                if step_valid(t, int(lengths[b])):
                    i, f, g_, o, c = (ws[t, b, k * H + js] for k in range(5))
                    p = predecessor(t, reverse)
                    c_prev = ws[p, b, 4 * H + js] if step_valid(p, int(lengths[b])) else c0[b, js]
                    dm, dc = dm_all[b], dc_state[b, js]
                    tc = np.tanh(c)
                    dct = dc + dm * o * (1 - tc * tc)
                    da = [dct * g_ * i * (1 - i), dct * c_prev * f * (1 - f),
                          dct * i * (1 - g_ * g_), dm * tc * o * (1 - o)]  # fmt: skip
                    dc_state[b, js] = dct * f
                else:
                    da = [0.0] * 4
                for col, d in zip(cols, da):
                    dxg[t, b, col] = d
                    dgx[(s + 1) & 1, b, col] = d
        # grid barrier
    return dxg, dhp, dh_state, dc_state


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("T, B, H, P, units", [(7, 3, 20, 9, 4), (5, 4, 40, 33, 16)])
def test_model_with_backend_glue_matches_reference(T, B, H, P, units):
    gen = seeded_generator("lstmp model", T, B, H, P)
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64).numpy()

    for reverse, with_lengths, with_h0 in itertools.product([False, True], repeat=3):
        xg, w_hh, w_hr = rand(T, B, 4 * H), rand(4 * H, P, scale=P**-0.5), rand(P, H)
        h0 = rand(B, P) if with_h0 else None
        c0 = rand(B, H) if with_h0 else None
        lengths = np.full(B, T)
        if with_lengths:
            lengths = torch.randint(0, T + 1, (B,), generator=gen).numpy()
            lengths[0], lengths[-1] = T, 0
        dy, dh_T, dc_T = rand(T, B, P), rand(B, P), rand(B, H)
        h0_ = h0 if h0 is not None else np.zeros((B, P))
        c0_ = c0 if c0 is not None else np.zeros((B, H))

        y, h_T, c_T, ws = model_forward(xg, w_hh, w_hr, h0_, c0_, lengths, reverse, units, rng)
        dxg, dhp, dh0, dc0 = model_backward(w_hh, w_hr, c0_, lengths, reverse, ws, dy, dh_T,
                                            dc_T, units, rng)  # fmt: skip
        # the backend's glue, as CupyBackend._backward_lstmp applies it
        dw_hr = projection_grad(torch.from_numpy(dhp), torch.from_numpy(ws), H)
        lengths_t = torch.from_numpy(lengths) if with_lengths else None
        dw_hh, _ = kernel_weight_grads("lstm", torch.from_numpy(dxg), None, torch.from_numpy(y),
                                       torch.from_numpy(h0_), lengths_t, reverse, None)  # fmt: skip

        args = ("lstm", xg, w_hh, h0, c0, lengths if with_lengths else None, reverse, None, w_hr)
        what = f"reverse={reverse} lengths={with_lengths} h0={with_h0}"
        ry, rh, rc = reference.recurrence_forward(*args)
        rg = reference.recurrence_backward(*args, dy, dh_T, dc_T)
        got = {"y": y, "h_T": h_T, "c_T": c_T, "xg": dxg, "w_hh": dw_hh.numpy(),
               "w_hr": dw_hr.numpy(), "h0": dh0, "c0": dc0}  # fmt: skip
        want = {"y": ry, "h_T": rh, "c_T": rc, **{k: rg[k] for k in ("xg", "w_hh", "w_hr")},
                "h0": rg["h0"] if with_h0 else dh0, "c0": rg["c0"] if with_h0 else dc0}  # fmt: skip
        for name, value in got.items():
            np.testing.assert_allclose(value, want[name], rtol=1e-10, atol=1e-10,
                                       err_msg=f"{name} {what}")  # fmt: skip
