"""The projected LSTM (proj_size) triton kernels on a real GPU, at real sizes, against the
float64 NumPy reference: many programs with two grid barriers per step (H=1024, P=256:
128 programs own 8 units each for the gates, 32 of them 8 projected outputs each), and the
per-phase launches of the fallback. Every output and gradient, dW_hr included. Marked
`gpu`: conftest.py skips them without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

pytest.importorskip("triton")

from gpurnn.kernels.triton import launch  # noqa: E402
from gpurnn.kernels.triton.plan import _polls, make_plan  # noqa: E402

import gpurnn  # noqa: E402
from gpurnn import reference as ref  # noqa: E402
from gpurnn.backends.base import Inputs  # noqa: E402
from gpurnn.backends.triton import TritonBackend  # noqa: E402
from tests.conftest import seeded_generator  # noqa: E402
from tests.test_triton_gpu import TOL, _np, rel_err  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


def make_proj_case(T, B, H, P, dtype, lengths=None, key=()):
    g = seeded_generator("proj-gpu", T, B, H, P, str(dtype), key)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).cuda()

    case = dict(
        xg=rnd(T, B, 4 * H),
        w_hh=rnd(4 * H, P, scale=P**-0.5),
        w_hr=rnd(P, H, scale=H**-0.5),
        h0=rnd(B, P),
        c0=rnd(B, H),
        lengths=None if lengths is None else torch.as_tensor(lengths).cuda(),
    )
    gin = dict(dy=rnd(T, B, P), dh_T=rnd(B, P), dc_T=rnd(B, H))
    return case, gin


def run_proj_vs_reference(case, gin, reverse, tol, plan=None):
    """Through the backend (its own plans), or the launchers with `plan` (then dW_hr from
    their dhp output); every output and gradient against the reference."""
    c = case
    args = (c["xg"], c["w_hh"], c["h0"], c["c0"], c["lengths"], reverse, None)
    if plan is None:
        be = TritonBackend()
        inputs = Inputs("lstm", *args, c["w_hr"])
        y, h_T, c_T, ws = be.forward(inputs, True)
        g = be.backward(inputs, y, ws, gin["dy"], gin["dh_T"], gin["dc_T"])
        got = dict(xg=g.xg, w_hh=g.w_hh, h0=g.h0, c0=g.c0, w_hr=g.w_hr)
    else:
        y, h_T, c_T, ws = launch.forward("lstm", *args, True, w_hr=c["w_hr"], plan=plan)
        dxg, dhp, dh0, dc0 = launch.backward(
            "lstm", c["w_hh"], c["h0"], c["c0"], c["lengths"], reverse, y, ws, gin["dy"],
            gin["dh_T"], gin["dc_T"], w_hr=c["w_hr"], plan=plan,
        )  # fmt: skip
        f = launch.unpack_workspace("lstm", ws, c["w_hr"].shape[1])
        m = f["o"].float() * torch.tanh(f["c"].float())
        got = dict(xg=dxg, h0=dh0, c0=dc0,
                   w_hr=torch.einsum("tbp,tbh->ph", dhp.float(), m))  # fmt: skip
    torch.cuda.synchronize()
    n = {k: _np(v) for k, v in c.items()}
    fa = (n["xg"], n["w_hh"], n["h0"], n["c0"], n["lengths"], reverse, None, n["w_hr"])
    ry, rh, rc = ref.recurrence_forward("lstm", *fa)
    errs = {"y": rel_err(y, ry), "h_T": rel_err(h_T, rh), "c_T": rel_err(c_T, rc)}
    rg = ref.recurrence_backward("lstm", *fa, _np(gin["dy"]), _np(gin["dh_T"]), _np(gin["dc_T"]))
    for k, v in got.items():
        errs["d" + k] = rel_err(v, rg[k])
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"errors over {tol}: {bad} (all: {errs})"
    return errs


@pytest.mark.parametrize("reverse", (False, True), ids=("fwd", "rev"))
def test_proj_h1024_p256(reverse):
    """H=1024, P=256, B=16, bf16: persistent, weights resident, polled exchanges; reverse
    with lengths (a row's state rides through its padded steps; y written apart from the
    exchange)."""
    T, B, H, P = 32, 16, 1024, 256
    for backward in (False, True):
        plan = make_plan(H, B, 4, torch.bfloat16, DEV, backward=backward, proj_size=P)
        assert plan.persistent and plan.nprog > 1 and plan.n_h * plan.BP >= P, plan
    L = None
    if reverse:
        L = torch.randint(0, T + 1, (B,), generator=seeded_generator("proj-len"))
        L[0] = T
    case, gin = make_proj_case(T, B, H, P, torch.bfloat16, lengths=L, key=reverse)
    run_proj_vs_reference(case, gin, reverse, TOL[torch.bfloat16])


def test_proj_grid_barrier():
    """H=1024, P=256, B=16 with the two grid barriers a step instead of polling (what the
    64-row tiles use)."""
    T, B, H, P = 24, 16, 1024, 256
    plan = make_plan(H, B, 4, torch.bfloat16, DEV, proj_size=P, poll=False)
    assert plan.persistent and not _polls(plan)
    case, gin = make_proj_case(T, B, H, P, torch.bfloat16, lengths=None, key="barrier")
    run_proj_vs_reference(case, gin, False, TOL[torch.bfloat16], plan=plan)


def test_proj_per_phase_launches():
    """Not persistent: each phase of each step its own launch (the fallback when the
    programs do not all fit on the device at once), streamed weights, fp16."""
    T, B, H, P = 12, 5, 256, 64
    plan = make_plan(H, B, 4, torch.float16, DEV, proj_size=P, persistent=False,
                     resident=False)  # fmt: skip
    assert not plan.persistent and not plan.resident
    case, gin = make_proj_case(T, B, H, P, torch.float16, lengths=[12, 3, 0, 7, 12], key="pp")
    run_proj_vs_reference(case, gin, False, TOL[torch.float16], plan=plan)


def test_proj_module_bf16_vs_float64_torch_nn():
    """gpurnn.LSTM(proj_size=...) on triton, two bidirectional layers, packed input, bf16,
    against torch.nn.LSTM in float64 on the CPU: outputs, states, every parameter gradient."""
    g = seeded_generator("proj-module-gpu")
    T, B, F, H, P = 16, 8, 64, 256, 64
    ref_m = torch.nn.LSTM(F, H, num_layers=2, bidirectional=True, proj_size=P,
                          dtype=torch.float64)  # fmt: skip
    with torch.no_grad():  # both from the same bf16 weights
        for p in ref_m.parameters():
            p.copy_(p.to(torch.bfloat16).double())
    ours = gpurnn.LSTM(F, H, num_layers=2, bidirectional=True, proj_size=P, backend="triton")
    ours.load_state_dict(ref_m.state_dict())
    ours = ours.to(DEV, torch.bfloat16)
    x = torch.randn(T, B, F, generator=g, dtype=torch.float64).to(torch.bfloat16).double()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    dy = torch.randn(T, B, 2 * P, generator=g, dtype=torch.float64)
    outs = []
    for model, dev, dt in ((ref_m, "cpu", torch.float64), (ours, DEV, torch.bfloat16)):
        xi = x.to(dev, dt).requires_grad_()
        out, (h, c) = model(pack_padded_sequence(xi, lengths, enforce_sorted=False))
        out = pad_packed_sequence(out, total_length=T)[0]
        (out.double().cpu() * dy).sum().backward()
        grads = {k: p.grad.double().cpu() for k, p in model.named_parameters()}
        outs.append((out, h, c, xi.grad, grads))
    (o_r, h_r, c_r, gx_r, gp_r), (o_o, h_o, c_o, gx_o, gp_o) = outs
    errs = {"out": rel_err(o_o, o_r), "h": rel_err(h_o, h_r), "c": rel_err(c_o, c_r),
            "grad x": rel_err(gx_o, gx_r)}  # fmt: skip
    errs.update({f"grad {k}": rel_err(gp_o[k], gp_r[k]) for k in gp_r})
    tol = TOL[torch.bfloat16]
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"errors over {tol}: {bad} (all: {errs})"
