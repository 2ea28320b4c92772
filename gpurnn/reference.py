"""The float64 NumPy reference: ground truth for every backend.

Plain loops, NumPy only, no torch. One sequence and one step at a time, so that the
semantics read straight off the code:

- the primitive: `recurrence_forward` / `recurrence_backward` (one layer, one direction);
- whole modules: `rnn_forward` / `rnn_backward`, stacking layers and directions exactly as
  `torch.nn.RNN/LSTM/GRU` do (dropout aside: the reference is the eval-mode model).

Gate order and formulas are PyTorch's (see gpurnn/cells.py). Per-sequence lengths follow
PackedSequence semantics: a sequence is processed for t < length (the reverse direction
from its own last element down to 0), outputs past its end are 0, and its final state is
the state after its last valid step.
"""

from __future__ import annotations

import numpy as np

from gpurnn.cells import GATES, INDRNN_CELLS, LAYER_NORM_EPS, check_cell, regularized_gate_count


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _time_order(length: int, reverse: bool):
    return range(length - 1, -1, -1) if reverse else range(length)


# ----------------------------------------------------------------------------------------
# one step of one sequence
# ----------------------------------------------------------------------------------------


def _step_forward(cell, x, h, c, w_hh, b_hn, w_hr):
    """x (G*H,), h (H_out,), c (H,) or None -> (h_new, c_new, cache for the backward step)."""
    H = w_hh.shape[0] // GATES[cell]
    if cell in ("rnn_tanh", "rnn_relu"):
        a = x + w_hh @ h
        h_new = np.tanh(a) if cell == "rnn_tanh" else np.maximum(a, 0.0)
        return h_new, None, (h, a, h_new)
    if cell == "lstm":
        a = x + w_hh @ h
        i, f = _sigmoid(a[:H]), _sigmoid(a[H : 2 * H])
        g, o = np.tanh(a[2 * H : 3 * H]), _sigmoid(a[3 * H :])
        c_new = f * c + i * g
        m = o * np.tanh(c_new)
        h_new = w_hr @ m if w_hr is not None else m
        return h_new, c_new, (h, c, i, f, g, o, c_new, m)
    # gru
    hh = w_hh @ h
    r = _sigmoid(x[:H] + hh[:H])
    z = _sigmoid(x[H : 2 * H] + hh[H : 2 * H])
    hn = hh[2 * H :] + (b_hn if b_hn is not None else 0.0)
    n = np.tanh(x[2 * H :] + r * hn)
    h_new = (1.0 - z) * n + z * h
    return h_new, None, (h, r, z, n, hn)


def _step_backward(cell, cache, dh_new, dc_new, w_hh, w_hr, grads):
    """Gradient of one step. Accumulates weight gradients into `grads`;
    returns (dx (G*H,), dh (H_out,), dc (H,) or None)."""
    if cell in ("rnn_tanh", "rnn_relu"):
        h, a, h_new = cache
        da = dh_new * (1.0 - h_new**2) if cell == "rnn_tanh" else dh_new * (a > 0.0)
        grads["w_hh"] += np.outer(da, h)
        return da, w_hh.T @ da, None
    if cell == "lstm":
        h, c, i, f, g, o, c_new, m = cache
        if w_hr is not None:
            grads["w_hr"] += np.outer(dh_new, m)
            dm = w_hr.T @ dh_new
        else:
            dm = dh_new
        tc = np.tanh(c_new)
        dc_total = dc_new + dm * o * (1.0 - tc**2)
        da = np.concatenate(
            [
                dc_total * g * i * (1.0 - i),
                dc_total * c * f * (1.0 - f),
                dc_total * i * (1.0 - g**2),
                dm * tc * o * (1.0 - o),
            ]
        )
        grads["w_hh"] += np.outer(da, h)
        return da, w_hh.T @ da, dc_total * f
    # gru
    h, r, z, n, hn = cache
    dan = dh_new * (1.0 - z) * (1.0 - n**2)
    daz = dh_new * (h - n) * z * (1.0 - z)
    dar = dan * hn * r * (1.0 - r)
    dhn = dan * r  # gradient of (W_hn h + b_hn)
    d_hidden = np.concatenate([dar, daz, dhn])
    grads["w_hh"] += np.outer(d_hidden, h)
    if grads.get("b_hn") is not None:
        grads["b_hn"] += dhn
    return np.concatenate([dar, daz, dan]), w_hh.T @ d_hidden + dh_new * z, None


# ----------------------------------------------------------------------------------------
# the primitive: one layer, one direction
# ----------------------------------------------------------------------------------------


def _prepare(cell, xg, w_hh, h0, c0, lengths, b_hn, w_hr):
    check_cell(cell)
    xg, w_hh, b_hn, w_hr = _f64(xg), _f64(w_hh), _f64(b_hn), _f64(w_hr)
    T, B, _ = xg.shape
    H = w_hh.shape[0] // GATES[cell]
    H_out = w_hh.shape[1]
    h0 = np.zeros((B, H_out)) if h0 is None else _f64(h0)
    if cell == "lstm":
        c0 = np.zeros((B, H)) if c0 is None else _f64(c0)
    lengths = np.full(B, T, dtype=np.int64) if lengths is None else np.asarray(lengths)
    return xg, w_hh, h0, c0, lengths, b_hn, w_hr


def _run(cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr):
    """Forward pass keeping every step's cache: caches[b] = [(t, cache), ...] in process order."""
    T, B, _ = xg.shape
    y = np.zeros((T, B, w_hh.shape[1]))
    h_T = h0.copy()
    c_T = c0.copy() if c0 is not None else None
    caches = []
    for b in range(B):
        h = h0[b]
        c = c0[b] if c0 is not None else None
        seq = []
        for t in _time_order(int(lengths[b]), reverse):
            h, c, cache = _step_forward(cell, xg[t, b], h, c, w_hh, b_hn, w_hr)
            y[t, b] = h
            seq.append((t, cache))
        h_T[b] = h
        if c_T is not None:
            c_T[b] = c
        caches.append(seq)
    return y, h_T, c_T, caches


def recurrence_forward(
    cell, xg, w_hh, h0=None, c0=None, lengths=None, reverse=False, b_hn=None, w_hr=None
):
    """The primitive's forward in float64.

    xg (T, B, G*H), w_hh (G*H, H_out), h0 (B, H_out), c0 (B, H), lengths (B,),
    b_hn (H,) for GRU, w_hr (P, H) for a projected LSTM (then H_out = P).
    Returns (y (T, B, H_out), h_T (B, H_out), c_T (B, H) or None).
    """
    xg, w_hh, h0, c0, lengths, b_hn, w_hr = _prepare(cell, xg, w_hh, h0, c0, lengths, b_hn, w_hr)
    y, h_T, c_T, _ = _run(cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr)
    return y, h_T, c_T


def recurrence_backward(cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr, dy, dh_T, dc_T=None):
    """Backpropagation through time of `recurrence_forward` (recomputes the forward).

    dy (T, B, H_out), dh_T (B, H_out), dc_T (B, H) or None (= zeros).
    Returns a dict with keys xg, w_hh, h0, c0, b_hn, w_hr; None for inputs that were None
    (h0/c0 given as None count as zeros and get no gradient).
    """
    xg_, w_hh_, h0_, c0_, lengths_, b_hn_, w_hr_ = _prepare(
        cell, xg, w_hh, h0, c0, lengths, b_hn, w_hr
    )
    _, _, _, caches = _run(cell, xg_, w_hh_, h0_, c0_, lengths_, reverse, b_hn_, w_hr_)
    dy, dh_T = _f64(dy), _f64(dh_T)
    dc_T = np.zeros_like(c0_) if (cell == "lstm" and dc_T is None) else _f64(dc_T)

    grads = {
        "w_hh": np.zeros_like(w_hh_),
        "b_hn": np.zeros_like(b_hn_) if b_hn_ is not None else None,
        "w_hr": np.zeros_like(w_hr_) if w_hr_ is not None else None,
    }
    dxg = np.zeros_like(xg_)
    dh0 = np.zeros_like(h0_)
    dc0 = np.zeros_like(c0_) if c0_ is not None else None
    for b, seq in enumerate(caches):
        dh = dh_T[b].copy()
        dc = dc_T[b].copy() if dc0 is not None else None
        for t, cache in reversed(seq):
            dh = dh + dy[t, b]
            dxg[t, b], dh, dc = _step_backward(cell, cache, dh, dc, w_hh_, w_hr_, grads)
        dh0[b] = dh
        if dc0 is not None:
            dc0[b] = dc
    return {
        "xg": dxg,
        "w_hh": grads["w_hh"],
        "h0": dh0 if h0 is not None else None,
        "c0": dc0 if c0 is not None else None,
        "b_hn": grads["b_hn"],
        "w_hr": grads["w_hr"],
    }


# ----------------------------------------------------------------------------------------
# whole modules: layers and directions, torch.nn's parameter names
# ----------------------------------------------------------------------------------------


def _layer_params(params, layer, direction):
    sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
    return (
        params[f"weight_ih{sfx}"],
        params[f"weight_hh{sfx}"],
        params.get(f"bias_ih{sfx}"),
        params.get(f"bias_hh{sfx}"),
        params.get(f"weight_hr{sfx}"),
        sfx,
    )


def _input_projection(cell, x, w_ih, b_ih, b_hh):
    """xg = x W_ihᵀ + b_ih + b_hh, except GRU's b_hn, returned apart."""
    xg = x @ w_ih.T
    if b_ih is None:
        return xg, None
    H = w_ih.shape[0] // GATES[cell]
    folded = b_ih + b_hh
    if cell == "gru":
        folded = b_ih + np.concatenate([b_hh[: 2 * H], np.zeros(H)])
        return xg + folded, b_hh[2 * H :]
    return xg + folded, None


def rnn_forward(
    cell, x, params, h0=None, c0=None, *, num_layers=1, bidirectional=False, lengths=None
):
    """Eval-mode forward of a whole torch.nn-style module, time-major.

    x (T, B, input_size); params: dict of arrays under torch.nn's names
    (weight_ih_l0, weight_hh_l0_reverse, bias_ih_l1, weight_hr_l0, ...);
    h0 (L*D, B, H_out), c0 (L*D, B, H) (zeros if None); lengths (B,) or None.
    Returns (output (T, B, D*H_out), h_n (L*D, B, H_out), c_n (L*D, B, H) or None).
    """
    out, h_n, c_n, _ = _rnn_forward(cell, x, params, h0, c0, num_layers, bidirectional, lengths)
    return out, h_n, c_n


def _rnn_forward(cell, x, params, h0, c0, num_layers, bidirectional, lengths):
    check_cell(cell)
    params = {k: _f64(v) for k, v in params.items()}
    D = 2 if bidirectional else 1
    layer_in = _f64(x)
    B = layer_in.shape[1]
    H_out = params["weight_hh_l0"].shape[1]
    H = params["weight_hh_l0"].shape[0] // GATES[cell]
    h0 = np.zeros((num_layers * D, B, H_out)) if h0 is None else _f64(h0)
    if cell == "lstm":
        c0 = np.zeros((num_layers * D, B, H)) if c0 is None else _f64(c0)
    h_n, c_n, layer_inputs = [], [], []
    for layer in range(num_layers):
        layer_inputs.append(layer_in)
        outs = []
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh, w_hr, _ = _layer_params(params, layer, d)
            xg, b_hn = _input_projection(cell, layer_in, w_ih, b_ih, b_hh)
            k = layer * D + d
            y, hT, cT = recurrence_forward(
                cell,
                xg,
                w_hh,
                h0[k],
                c0[k] if c0 is not None else None,
                lengths,
                d == 1,
                b_hn,
                w_hr,
            )
            outs.append(y)
            h_n.append(hT)
            c_n.append(cT)
        layer_in = np.concatenate(outs, axis=-1)
    c_n = np.stack(c_n) if cell == "lstm" else None
    return layer_in, np.stack(h_n), c_n, (params, h0, c0, layer_inputs)


def rnn_backward(
    cell,
    x,
    params,
    h0,
    c0,
    d_out,
    d_hn,
    d_cn=None,
    *,
    num_layers=1,
    bidirectional=False,
    lengths=None,
):
    """Backpropagation through time of `rnn_forward`.

    Returns (dx, dh0, dc0 or None, dparams) with dparams keyed by torch.nn's names.
    """
    _, _, _, (params, h0, c0, layer_inputs) = _rnn_forward(
        cell, x, params, h0, c0, num_layers, bidirectional, lengths
    )
    D = 2 if bidirectional else 1
    d_out, d_hn = _f64(d_out), _f64(d_hn)
    d_cn = None if cell != "lstm" else (np.zeros_like(c0) if d_cn is None else _f64(d_cn))
    H_out = h0.shape[-1]
    dparams = {}
    dh0 = np.zeros_like(h0)
    dc0 = np.zeros_like(c0) if c0 is not None else None
    d_layer_out = d_out
    for layer in reversed(range(num_layers)):
        layer_in = layer_inputs[layer]
        d_layer_in = np.zeros_like(layer_in)
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh, w_hr, sfx = _layer_params(params, layer, d)
            xg, b_hn = _input_projection(cell, layer_in, w_ih, b_ih, b_hh)
            k = layer * D + d
            g = recurrence_backward(
                cell,
                xg,
                w_hh,
                h0[k],
                c0[k] if c0 is not None else None,
                lengths,
                d == 1,
                b_hn,
                w_hr,
                d_layer_out[..., d * H_out : (d + 1) * H_out],
                d_hn[k],
                d_cn[k] if d_cn is not None else None,
            )
            dxg = g["xg"]
            d_layer_in += dxg @ w_ih
            dparams[f"weight_ih{sfx}"] = np.einsum("tbg,tbi->gi", dxg, layer_in)
            dparams[f"weight_hh{sfx}"] = g["w_hh"]
            if b_ih is not None:
                dparams[f"bias_ih{sfx}"] = dxg.sum(axis=(0, 1))
                db_hh = dxg.sum(axis=(0, 1))
                if cell == "gru":
                    H = w_hh.shape[0] // 3
                    db_hh[2 * H :] = g["b_hn"]
                dparams[f"bias_hh{sfx}"] = db_hh
            if w_hr is not None:
                dparams[f"weight_hr{sfx}"] = g["w_hr"]
            dh0[k] = g["h0"]
            if dc0 is not None:
                dc0[k] = g["c0"]
        d_layer_out = d_layer_in
    return d_layer_out, dh0, dc0, dparams


# ----------------------------------------------------------------------------------------
# regularized recurrences: zoneout, recurrent dropout, DropConnect, LayerNorm, IndRNN
# ----------------------------------------------------------------------------------------
#
# One layer, one direction, as `recurrence_forward`, with the regularizers as arrays that
# say exactly what each step does (the caller turns masks and rates into them):
#
#   zoneout_h (T, B, H_out), zoneout_c (T, B, H): the weight of the previous state,
#       h_t = zh ⊙ h_{t-1} + (1 − zh) ⊙ h̃_t (and c likewise for LSTM), where h̃_t, c̃_t are
#       the cell's own update; 0/1 in training (1 = the unit zones out), p in eval.
#       h̃_t is computed from c̃_t, not from the zoned-out c_t (Krueger et al.).
#   recurrent_scale (B, H_out): multiplies h_{t-1} where it enters W_hh (0 or 1/(1 − p)).
#   weight_scale (G*H, H_out), or (H,) for IndRNN: multiplies W_hh entrywise (DropConnect).
#   ln_hh = (weight, bias) (G*H,): LayerNorm of each row's h W_hhᵀ over all G*H entries;
#   ln_c = (weight, bias) (H,): LSTM only, LayerNorm of c̃_t before tanh. eps = cells.LAYER_NORM_EPS.
#
# (LayerNorm of x W_ihᵀ is no part of the recurrence: it is a function of the input alone,
# applied to the projection for all steps at once, before the biases join it in xg.)
#
# IndRNN ("indrnn_tanh", "indrnn_relu"): w_hh is the vector u (H,), the recurrent term
# u ⊙ h_{t-1} instead of W_hh h_{t-1}: h_t = act(xg + u ⊙ h_{t-1}).


def _layer_norm(a, weight, bias):
    mu = a.mean()
    rstd = 1.0 / np.sqrt(((a - mu) ** 2).mean() + LAYER_NORM_EPS)
    a_hat = (a - mu) * rstd
    return weight * a_hat + bias, (a_hat, rstd, weight)


def _layer_norm_backward(d_out, cache, grads, key):
    a_hat, rstd, weight = cache
    grads[key + "_weight"] += d_out * a_hat
    grads[key + "_bias"] += d_out
    d_hat = d_out * weight
    return rstd * (d_hat - d_hat.mean() - a_hat * (d_hat * a_hat).mean())


def _act(cell, a):
    return np.tanh(a) if cell.endswith("tanh") else np.maximum(a, 0.0)


def _act_grad(cell, a, out):
    return 1.0 - out**2 if cell.endswith("tanh") else (a > 0.0).astype(np.float64)


def _reg_step_forward(cell, x, h, c, w, b_hn, w_hr, zh, zc, rscale, ln_hh, ln_c):
    """One regularized step; w is W_hh (or u) already multiplied by its DropConnect mask."""
    h_in = h * rscale if rscale is not None else h
    hh = w * h_in if cell in INDRNN_CELLS else w @ h_in
    ln_hh_cache = None
    if ln_hh is not None:
        hh, ln_hh_cache = _layer_norm(hh, *ln_hh)
    c_tilde = ln_c_cache = None
    if cell == "lstm":
        H = c.shape[0]
        a = x + hh
        i, f = _sigmoid(a[:H]), _sigmoid(a[H : 2 * H])
        g, o = np.tanh(a[2 * H : 3 * H]), _sigmoid(a[3 * H :])
        c_tilde = f * c + i * g
        c_norm = c_tilde
        if ln_c is not None:
            c_norm, ln_c_cache = _layer_norm(c_tilde, *ln_c)
        m = o * np.tanh(c_norm)
        h_tilde = w_hr @ m if w_hr is not None else m
        gates = (i, f, g, o, c_norm, m)
    elif cell == "gru":
        H = h.shape[0]
        r = _sigmoid(x[:H] + hh[:H])
        z = _sigmoid(x[H : 2 * H] + hh[H : 2 * H])
        hn = hh[2 * H :] + (b_hn if b_hn is not None else 0.0)
        n = np.tanh(x[2 * H :] + r * hn)
        h_tilde = (1.0 - z) * n + z * h
        gates = (r, z, n, hn)
    else:  # rnn and indrnn
        a = x + hh
        h_tilde = _act(cell, a)
        gates = (a,)
    h_new = h_tilde if zh is None else zh * h + (1.0 - zh) * h_tilde
    c_new = None
    if cell == "lstm":
        c_new = c_tilde if zc is None else zc * c + (1.0 - zc) * c_tilde
    cache = (h, c, h_in, h_tilde, gates, zh, zc, ln_hh_cache, ln_c_cache)
    return h_new, c_new, cache


def _reg_step_backward(cell, cache, dh_new, dc_new, w, w_hr, rscale, grads):
    """Gradient of `_reg_step_forward`; accumulates parameter gradients into `grads`
    (w_hh holds d(W_hh ⊙ mask), scaled by the mask at the end). Returns (dx, dh, dc)."""
    h, c, h_in, h_tilde, gates, zh, zc, ln_hh_cache, ln_c_cache = cache
    dh_tilde = dh_new if zh is None else (1.0 - zh) * dh_new
    dh_prev = np.zeros_like(h) if zh is None else zh * dh_new
    dc_prev = None
    if cell == "lstm":
        i, f, g, o, c_norm, m = gates
        if w_hr is not None:
            grads["w_hr"] += np.outer(dh_tilde, m)
            dm = w_hr.T @ dh_tilde
        else:
            dm = dh_tilde
        tc = np.tanh(c_norm)
        dc_norm = dm * o * (1.0 - tc**2)
        if ln_c_cache is not None:
            dc_norm = _layer_norm_backward(dc_norm, ln_c_cache, grads, "ln_c")
        dc_tilde = dc_norm + (dc_new if zc is None else (1.0 - zc) * dc_new)
        dc_prev = dc_tilde * f if zc is None else zc * dc_new + dc_tilde * f
        dx = np.concatenate(
            [
                dc_tilde * g * i * (1.0 - i),
                dc_tilde * c * f * (1.0 - f),
                dc_tilde * i * (1.0 - g**2),
                dm * tc * o * (1.0 - o),
            ]
        )
        dhh = dx
    elif cell == "gru":
        r, z, n, hn = gates
        dan = dh_tilde * (1.0 - z) * (1.0 - n**2)
        daz = dh_tilde * (h - n) * z * (1.0 - z)
        dar = dan * hn * r * (1.0 - r)
        dhn = dan * r
        if grads.get("b_hn") is not None:
            grads["b_hn"] += dhn
        dh_prev = dh_prev + dh_tilde * z
        dx = np.concatenate([dar, daz, dan])
        dhh = np.concatenate([dar, daz, dhn])
    else:
        (a,) = gates
        dx = dh_tilde * _act_grad(cell, a, h_tilde)
        dhh = dx
    if ln_hh_cache is not None:
        dhh = _layer_norm_backward(dhh, ln_hh_cache, grads, "ln_hh")
    if cell in INDRNN_CELLS:
        grads["w_hh"] += dhh * h_in
        dh_in = w * dhh
    else:
        grads["w_hh"] += np.outer(dhh, h_in)
        dh_in = w.T @ dhh
    dh_prev = dh_prev + (dh_in * rscale if rscale is not None else dh_in)
    return dx, dh_prev, dc_prev


def _prepare_regularized(cell, xg, w_hh, h0, c0, lengths, b_hn, w_hr, reg):
    xg, w_hh, b_hn, w_hr = _f64(xg), _f64(w_hh), _f64(b_hn), _f64(w_hr)
    T, B, GH = xg.shape
    G = regularized_gate_count(cell)
    H = GH // G
    H_out = H if cell in INDRNN_CELLS else w_hh.shape[1]
    h0 = np.zeros((B, H_out)) if h0 is None else _f64(h0)
    if cell == "lstm":
        c0 = np.zeros((B, H)) if c0 is None else _f64(c0)
    lengths = np.full(B, T, dtype=np.int64) if lengths is None else np.asarray(lengths)
    reg = {
        k: tuple(_f64(a) for a in v) if isinstance(v, tuple) else _f64(v)
        for k, v in reg.items()
        if v is not None
    }
    return xg, w_hh, h0, c0, lengths, b_hn, w_hr, reg


def _run_regularized(cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr, reg):
    T, B, _ = xg.shape
    zoneout_h, zoneout_c = reg.get("zoneout_h"), reg.get("zoneout_c")
    rscale, wscale = reg.get("recurrent_scale"), reg.get("weight_scale")
    ln_hh, ln_c = reg.get("ln_hh"), reg.get("ln_c")
    w = w_hh * wscale if wscale is not None else w_hh
    y = np.zeros((T, B, h0.shape[1]))
    h_T, c_T = h0.copy(), (c0.copy() if c0 is not None else None)
    caches = []
    for b in range(B):
        h, c = h0[b], (c0[b] if c0 is not None else None)
        seq = []
        for t in _time_order(int(lengths[b]), reverse):
            h, c, cache = _reg_step_forward(
                cell, xg[t, b], h, c, w, b_hn, w_hr,
                zoneout_h[t, b] if zoneout_h is not None else None,
                zoneout_c[t, b] if zoneout_c is not None else None,
                rscale[b] if rscale is not None else None,
                ln_hh, ln_c,
            )  # fmt: skip
            y[t, b] = h
            seq.append((t, cache))
        h_T[b] = h
        if c_T is not None:
            c_T[b] = c
        caches.append(seq)
    return y, h_T, c_T, caches, w


def regularized_forward(
    cell, xg, w_hh, h0=None, c0=None, lengths=None, reverse=False, b_hn=None, w_hr=None, **reg
):
    """`recurrence_forward` with the regularizers above as keywords (zoneout_h, zoneout_c,
    recurrent_scale, weight_scale, ln_hh, ln_c; absent = off), and the IndRNN cells.
    Returns (y, h_T, c_T or None)."""
    args = _prepare_regularized(cell, xg, w_hh, h0, c0, lengths, b_hn, w_hr, reg)
    xg, w_hh, h0, c0, lengths, b_hn, w_hr, reg = args
    y, h_T, c_T, _, _ = _run_regularized(cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr, reg)
    return y, h_T, c_T


def regularized_backward(
    cell, xg, w_hh, h0, c0, lengths, reverse, b_hn, w_hr, dy, dh_T, dc_T=None, **reg
):
    """Backpropagation through time of `regularized_forward` (recomputes the forward).
    Returns a dict with keys xg, w_hh, h0, c0, b_hn, w_hr, ln_hh_weight, ln_hh_bias,
    ln_c_weight, ln_c_bias; None for inputs that were None or regularizers that were off."""
    args = _prepare_regularized(cell, xg, w_hh, h0, c0, lengths, b_hn, w_hr, reg)
    xg_, w_hh_, h0_, c0_, lengths_, b_hn_, w_hr_, reg_ = args
    _, _, _, caches, w = _run_regularized(
        cell, xg_, w_hh_, h0_, c0_, lengths_, reverse, b_hn_, w_hr_, reg_
    )
    rscale = reg_.get("recurrent_scale")
    dy, dh_T = _f64(dy), _f64(dh_T)
    dc_T = np.zeros_like(c0_) if (cell == "lstm" and dc_T is None) else _f64(dc_T)
    grads = {
        "w_hh": np.zeros_like(w_hh_),
        "b_hn": np.zeros_like(b_hn_) if b_hn_ is not None else None,
        "w_hr": np.zeros_like(w_hr_) if w_hr_ is not None else None,
    }
    for key in ("ln_hh", "ln_c"):
        if reg_.get(key) is not None:
            grads[key + "_weight"] = np.zeros_like(reg_[key][0])
            grads[key + "_bias"] = np.zeros_like(reg_[key][1])
    dxg, dh0 = np.zeros_like(xg_), np.zeros_like(h0_)
    dc0 = np.zeros_like(c0_) if c0_ is not None else None
    for b, seq in enumerate(caches):
        dh = dh_T[b].copy()
        dc = dc_T[b].copy() if dc0 is not None else None
        for t, cache in reversed(seq):
            dh = dh + dy[t, b]
            dxg[t, b], dh, dc = _reg_step_backward(
                cell, cache, dh, dc, w, w_hr_, rscale[b] if rscale is not None else None, grads
            )
        dh0[b] = dh
        if dc0 is not None:
            dc0[b] = dc
    if reg_.get("weight_scale") is not None:
        grads["w_hh"] = grads["w_hh"] * reg_["weight_scale"]
    return {
        "xg": dxg,
        "w_hh": grads["w_hh"],
        "h0": dh0 if h0 is not None else None,
        "c0": dc0 if c0 is not None else None,
        "b_hn": grads["b_hn"],
        "w_hr": grads["w_hr"],
        **{
            f"{key}_{part}": grads.get(f"{key}_{part}")
            for key in ("ln_hh", "ln_c")
            for part in ("weight", "bias")
        },
    }
