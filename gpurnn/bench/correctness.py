"""Each row's error against torch.nn run in true float32 on the same inputs upcast, and the
tolerance beyond which a row reads "wrong".
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
from torch import Tensor, nn

from gpurnn.bench.runners import ModuleRunner, Runner
from gpurnn.bench.shapes import InputSet, Shape, _upcast


@contextlib.contextmanager
def _exact_fp32():
    """The reference runs in true fp32: no TF32 in cuDNN or cuBLAS."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# Floors of the acceptable error per dtype: forward as max |out - ref| (outputs of LSTM/GRU/
# tanh RNN lie in [-1, 1]), gradients as max |g - ref| / max |ref| per tensor. A row is
# "wrong" when its error exceeds max(floor, 2 x the baseline's error in the same run).
TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclasses.dataclass
class Reference:
    out: Tensor
    states: list[Tensor]
    grads: dict[str, Tensor]  # "input" and every parameter name


def compute_reference(shape: Shape, base: nn.Module, inputs: InputSet) -> Reference:
    module = copy.deepcopy(base).float()
    runner = ModuleRunner(module)
    if shape.regularizers:
        # no torch.nn layer has them: gpurnn's loop (the torch backend, checked against
        # the float64 reference by the tests) in fp32, with the masks every runner draws
        import gpurnn
        from gpurnn.bench.runners import REGULARIZED_SEED, RegularizedRunner

        param = next(module.parameters())
        module = gpurnn.LSTM(
            shape.input_size, shape.H, backend="torch", device=param.device,
            dtype=torch.float32, **shape.layer_keywords,
        )  # fmt: skip
        module.load_state_dict(base.state_dict(), strict=False)
        runner = RegularizedRunner(module, REGULARIZED_SEED)
    ins = _upcast(inputs)
    with _exact_fp32():
        out, h_n, c_n = runner.run(ins.inp)
        out.backward(ins.dy)
    grads = {"input": ins.leaf.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    states = [h_n] + ([c_n] if c_n is not None else [])
    return Reference(out.detach(), [s.detach() for s in states], grads)


def forward_error(result, ref: Reference) -> float:
    out, h_n, c_n = result
    got = [out, h_n] + ([c_n] if c_n is not None else [])
    want = [ref.out, *ref.states]
    if len(got) != len(want):
        raise RuntimeError(f"returned {len(got)} tensors, torch.nn returns {len(want)}")
    return max(_max_abs(g, w) for g, w in zip(got, want))


def grad_error(runner: Runner, inputs: InputSet, ref: Reference) -> float:
    got = dict(runner.named_grads(), input=inputs.leaf.grad)
    worst = 0.0
    for name, want in ref.grads.items():
        if got.get(name) is None:
            raise RuntimeError(f"no gradient for {name}")
        scale = want.abs().max().item() or 1.0
        worst = max(worst, _max_abs(got[name], want) / scale)
    return worst


def _max_abs(got: Tensor, want: Tensor) -> float:
    if got.shape != want.shape:
        raise RuntimeError(f"shape {tuple(got.shape)}, torch.nn gives {tuple(want.shape)}")
    err = (got.detach().float() - want).abs().max().item()
    return err if err == err else float("inf")  # NaN anywhere counts as infinitely wrong
