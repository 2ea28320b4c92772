"""`python -m gpurnn bench`: gpurnn's backends against cuDNN, a Python loop of torch.nn cells
and FlashRNN, timed in one process on the same inputs.

Method (see benchmarks/README.md for the columns):
- Full layers on every side: the input projection is inside every timing.
- CUDA: device events around each run, the L2 cache flushed (a 256 MB buffer zeroed)
  before each, the median over many runs after warm-up, several sets of fresh random
  inputs used in turn. CPU: perf_counter, median, no flush.
- "fwd" is inference (torch.no_grad); "fwdbwd" is a training step: forward, then backward
  from a random upstream gradient into the input and every parameter.
- Beside each timing, the error against torch.nn run in float32 (TF32 off) on the same
  inputs upcast; a row whose error exceeds its dtype's tolerance says "wrong", so a fast
  wrong kernel never reads as a win.
- A failure in one implementation is recorded in its rows ("failed: <error>") and the run
  goes on.

Shapes live in one declarative table (SHAPES); each row's shape id is derived from its
parameters, so rows stay comparable across runs as long as the parameters do.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime as _dt
import platform
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from gpurnn.cells import GATES

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO_ROOT / "benchmarks" / "results.csv"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "fwdbwd")

# ----------------------------------------------------------------------------- shapes


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

    @property
    def id(self) -> str:
        """Stable name built from the parameters (rows keep it across runs)."""
        parts = [self.cell]
        if self.layers > 1:
            parts.append(f"L{self.layers}")
        if self.bidirectional:
            parts.append("bi")
        parts += [f"T{self.T}", f"B{self.B}", f"H{self.H}"]
        if self.input_size != self.H:
            parts.append(f"I{self.input_size}")
        if self.varlen:
            parts.append(self.varlen)
        return "-".join(parts)

    @property
    def single_layer(self) -> bool:
        return self.layers == 1 and not self.bidirectional

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
    # tiny shapes for CPU-only machines and the harness's own tests
    Shape("smoke", "lstm", 8, 2, 16, 16),
    Shape("smoke", "lstm", 8, 4, 16, 16),
    Shape("smoke", "lstm", 8, 2, 32, 32),
    Shape("smoke", "gru", 8, 2, 16, 16),
    Shape("smoke", "rnn_tanh", 8, 2, 16, 16),
    Shape("smoke", "lstm", 8, 2, 16, 16, layers=2, bidirectional=True),
    Shape("smoke", "lstm", 8, 3, 16, 16, varlen="packed"),
    Shape("smoke", "lstm", 8, 3, 16, 16, varlen="padded"),
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
    return float(total * (3 if mode == "fwdbwd" else 1))


# ----------------------------------------------------------------------------- inputs


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
    dy = torch.randn(rows, out_size, generator=g, device=device).to(dtype)
    return InputSet(inp, leaf, dy.view(leaf.shape[:-1] + (out_size,)))


def _upcast(inputs: InputSet) -> InputSet:
    leaf = inputs.leaf.detach().float().requires_grad_()
    inp = leaf
    if isinstance(inputs.inp, PackedSequence):
        inp = PackedSequence(leaf, *inputs.inp[1:])
    return InputSet(inp, leaf, inputs.dy.float())


# ----------------------------------------------------------------------------- implementations


class Runner(abc.ABC):
    """One implementation built for one shape and dtype, holding its own parameters."""

    @abc.abstractmethod
    def run(self, inp) -> tuple[Tensor, Tensor, Tensor | None]:
        """Forward: (output data, h_n, c_n or None); output data as torch.nn lays it out."""

    @abc.abstractmethod
    def named_grads(self) -> dict[str, Tensor | None]:
        """Gradients under torch.nn's parameter names."""

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Clears the gradients before a timed training step."""


class ModuleRunner(Runner):
    """torch.nn.LSTM/GRU/RNN or a gpurnn drop-in: a layer module."""

    def __init__(self, module: nn.Module):
        self.module = module

    def run(self, inp):
        out, hx = self.module(inp)
        h_n, c_n = hx if isinstance(hx, tuple) else (hx, None)
        return (out.data if isinstance(out, PackedSequence) else out), h_n, c_n

    def named_grads(self):
        return {name: p.grad for name, p in self.module.named_parameters()}

    def zero_grad(self):
        self.module.zero_grad(set_to_none=True)


class CellLoopRunner(Runner):
    """The way people write a custom RNN: a Python loop over torch.nn.*Cell."""

    def __init__(self, cell: nn.Module, is_lstm: bool):
        self.cell, self.is_lstm = cell, is_lstm

    def run(self, x):
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)
        c = h.clone() if self.is_lstm else None
        outputs = []
        for x_t in x.unbind(0):
            if self.is_lstm:
                h, c = self.cell(x_t, (h, c))
            else:
                h = self.cell(x_t, h)
            outputs.append(h)
        return torch.stack(outputs), h[None], (c[None] if c is not None else None)

    def named_grads(self):
        return {f"{name}_l0": p.grad for name, p in self.cell.named_parameters()}

    def zero_grad(self):
        self.cell.zero_grad(set_to_none=True)


class FlashRNNRunner(Runner):
    """FlashRNN's fused CUDA LSTM (NX-AI/flashrnn), one head of size H, PyTorch's gate
    order (i, f, g, o). Its kernel takes the projected input, so the projection is done
    here with torch: the timing covers the same full layer as the others."""

    def __init__(self, base: nn.Module, dtype):
        from flashrnn import flashrnn  # raises where it is not installed

        self.flashrnn = flashrnn
        self.dtype_name = {
            torch.bfloat16: "bfloat16",
            torch.float16: "float16",
            torch.float32: "float32",
        }[dtype]
        self.params = {
            name: p.detach().clone().requires_grad_() for name, p in base.named_parameters()
        }

    def run(self, x):
        p, (T, B, _) = self.params, x.shape
        H = p["weight_hh_l0"].shape[1]
        wx = nn.functional.linear(x, p["weight_ih_l0"], p["bias_ih_l0"])
        wx = wx.transpose(0, 1).reshape(B, T, 4, 1, H)  # [B, T, gates, heads, D]
        recurrent = p["weight_hh_l0"].view(4, 1, H, H)  # [gates, heads, D out, D in]
        bias = p["bias_hh_l0"].view(4, 1, H)
        states0 = x.new_zeros(2, B, 1, 1, H)  # [h/c, B, T=1, heads, D]
        states, last = self.flashrnn(
            wx,
            recurrent,
            bias,
            states=states0,
            function="lstm",
            backend="cuda_fused",
            dtype=self.dtype_name,
        )
        y = states[0, :, :, 0, :].transpose(0, 1)
        return y, last[0, :, 0, 0][None], last[1, :, 0, 0][None]

    def named_grads(self):
        return {name: p.grad for name, p in self.params.items()}

    def zero_grad(self):
        for p in self.params.values():
            p.grad = None


_TORCH_LAYERS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN}
_TORCH_CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn_tanh": nn.RNNCell}


def make_base(shape: Shape, dtype, device) -> nn.Module:
    """The torch.nn layer whose weights every implementation copies (seeded per shape)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed("weights", shape.id))
        module = _TORCH_LAYERS[shape.cell](
            shape.input_size,
            shape.H,
            num_layers=shape.layers,
            bidirectional=shape.bidirectional,
        )
    return module.to(device, dtype)


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    build: Callable[[Shape, nn.Module, torch.dtype], Runner]
    applies: Callable[[Shape], bool] = lambda shape: True
    is_baseline: bool = False  # the row every speedup is measured against


def _gpurnn_impl(backend: str) -> Impl:
    def build(shape, base, dtype):
        import gpurnn

        layer_cls = {"lstm": gpurnn.LSTM, "gru": gpurnn.GRU, "rnn_tanh": gpurnn.RNN}[shape.cell]
        param = next(base.parameters())
        module = layer_cls(
            shape.input_size,
            shape.H,
            num_layers=shape.layers,
            bidirectional=shape.bidirectional,
            backend=backend,
            device=param.device,
            dtype=param.dtype,
        )
        module.load_state_dict(base.state_dict())
        return ModuleRunner(module)

    return Impl(f"gpurnn-{backend}", build)


def _cell_loop_build(shape, base, dtype):
    param = next(base.parameters())
    cell = _TORCH_CELLS[shape.cell](shape.input_size, shape.H, device=param.device, dtype=dtype)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in base.state_dict().items()})
    return CellLoopRunner(cell, shape.cell == "lstm")


def baseline_name(device: torch.device) -> str:
    # on CPU torch.nn runs its own native kernels, not cuDNN: say so in the name
    return "cudnn" if device.type == "cuda" else "torch.nn"


# gpurnn backends worth timing, in the order they are listed ("numpy" is the float64
# reference: exact and far too slow; "auto" is one of the others)
GPURNN_BACKENDS = ("triton", "cupy", "torch")


def _backend_unavailable(name: str) -> str | None:
    """Why gpurnn backend `name` cannot run here (None if it can); imports only that one."""
    from gpurnn.backends import available_backends, get_backend

    backend = get_backend(name)
    return available_backends()[name] if backend is None else backend.unavailable_reason()


def _flashrnn_unavailable() -> str | None:
    try:
        import flashrnn  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "cannot run it"
        return f"cannot import flashrnn ({type(e).__name__}: {e})".splitlines()[0]
    return None


def implementations(device: torch.device, requested: Sequence[str] | None, quick: bool):
    """(implementations to run, notes to print). By default: the baseline, every gpurnn
    backend that runs here (GPU kernels only on a GPU; gpurnn-torch not with --quick on a
    GPU, where it calls cuDNN itself), the cell loop, and FlashRNN on a GPU if importable.
    A requested name that cannot run here still gets an Impl whose build raises, so its
    rows say why."""
    on_gpu = device.type == "cuda"
    base = Impl(
        baseline_name(device), lambda shape, base, dtype: ModuleRunner(base), is_baseline=True
    )
    cell_loop = Impl("cell-loop", _cell_loop_build, lambda s: s.single_layer and not s.varlen)
    flash = Impl(
        "flashrnn",
        lambda shape, base, dtype: FlashRNNRunner(base, dtype),
        lambda s: s.cell == "lstm" and s.single_layer and not s.varlen,
    )
    known = ["cudnn", "torch.nn", "cell-loop", "flashrnn"]
    known += [f"gpurnn-{b}" for b in GPURNN_BACKENDS]
    if requested:
        unknown = [n for n in requested if n not in known]
        if unknown:
            raise ValueError(f"unknown implementations {unknown}; known: {', '.join(known)}")
        wanted = list(
            dict.fromkeys(base.name if n in ("cudnn", "torch.nn") else n for n in requested)
        )
    else:
        wanted = [base.name]
        for backend in GPURNN_BACKENDS:
            if backend != "torch" and not on_gpu:
                continue  # GPU kernels on CPU (the Triton interpreter) only when named
            if backend == "torch" and on_gpu and quick:
                continue  # on CUDA gpurnn-torch calls cuDNN itself: nothing new to see
            wanted.append(f"gpurnn-{backend}")
        wanted += ["cell-loop"] + (["flashrnn"] if on_gpu else [])

    chosen, notes = [], []
    for name in wanted:
        reason = None
        if name.startswith("gpurnn-"):
            reason = _backend_unavailable(name.removeprefix("gpurnn-"))
            impl = _gpurnn_impl(name.removeprefix("gpurnn-"))
        elif name == "flashrnn":
            reason, impl = _flashrnn_unavailable(), flash
        else:
            impl = base if name == base.name else cell_loop
        if reason is not None:
            notes.append(f"{name}: unavailable here ({reason})")
            if not requested:
                continue  # by default only what runs here; asked for by name, say why not
            impl = dataclasses.replace(impl, build=_raiser(f"unavailable: {reason}"))
        chosen.append(impl)
    if not any(i.is_baseline for i in chosen):
        notes.append(f"{base.name} not requested: no speedups, tolerances uncalibrated")
    return chosen, notes


def _raiser(message: str):
    def build(*args):
        raise RuntimeError(message)

    return build


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass(frozen=True)
class Budget:
    warmup: int
    min_repeats: int
    max_repeats: int
    target_s: float  # aim for about this much measured time per case
    input_sets: int = 3


BUDGETS = {
    "full": Budget(warmup=3, min_repeats=10, max_repeats=100, target_s=1.0),
    "quick": Budget(warmup=2, min_repeats=5, max_repeats=20, target_s=0.25),
    "cpu": Budget(warmup=2, min_repeats=3, max_repeats=10, target_s=0.05, input_sets=2),
}

_FLUSH_BYTES = 256 * 2**20  # larger than any L2 (H100 50 MB, H200 60 MB)


class Timer:
    """Median time of a callable: CUDA events with an L2 flush before each run, or
    perf_counter on CPU."""

    def __init__(self, device: torch.device, budget: Budget):
        self.device, self.budget = device, budget
        self.cuda = device.type == "cuda"
        self.flush_buffer = (
            torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None
        )

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def median_ms(self, fn: Callable[[int], None], prepare: Callable[[int], None]):
        """fn(i) runs once on input set i % input_sets; prepare(i) runs untimed before it.
        Returns (median ms, repeats)."""
        b = self.budget
        for i in range(b.warmup):
            prepare(i)
            fn(i)
        self._sync()
        # size the repeats from one timed run: slow cases need fewer for a stable median
        prepare(0)
        start = time.perf_counter()
        fn(0)
        self._sync()
        once = max(time.perf_counter() - start, 1e-6)
        repeats = int(min(b.max_repeats, max(b.min_repeats, b.target_s / once)))
        if not self.cuda:
            times = []
            for r in range(repeats):
                prepare(r)
                start = time.perf_counter()
                fn(r)
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times), repeats
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for r, (begin, end) in enumerate(events):
            prepare(r)
            self.flush_buffer.zero_()  # evict the last run's weights and activations
            begin.record()
            fn(r)
            end.record()
        self._sync()
        return statistics.median(s.elapsed_time(e) for s, e in events), repeats


@contextlib.contextmanager
def _exact_fp32():
    """The reference runs in true fp32: no TF32 in cuDNN or cuBLAS."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------- correctness

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
    ins = _upcast(inputs)
    with _exact_fp32():
        out, h_n, c_n = ModuleRunner(module).run(ins.inp)
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


# ----------------------------------------------------------------------------- rows & CSV

FIELDS = (
    # the run: which machine and software made the numbers
    "run_id date commit device card driver torch triton cudnn cuda gpurnn "
    # the case
    "suite shape cell T B H input_size layers bidirectional varlen dtype impl mode "
    # the result
    "status ms us_per_step tflops speedup_vs_cudnn peak_mem_mb max_err grad_err repeats"
).split()


def _git(*args, cwd: Path = REPO_ROOT) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def project_commit(root: Path | None = None) -> str:
    """The commit of the checkout that holds the imported gpurnn package (`root`, the
    folder above the package), "+dirty" if its tracked files have changes; "unknown"
    unless `root` is the top of a git repository. An installed copy or an unpacked
    source folder inside some other repository (a home directory under git, a CI
    workspace) must not be credited with that repository's commit."""
    root = Path(root or REPO_ROOT).resolve()
    top = _git("rev-parse", "--show-toplevel", cwd=root)
    if top is None or Path(top).resolve() != root:
        return "unknown"
    commit = _git("rev-parse", "--short", "HEAD", cwd=root)
    if commit is None:
        return "unknown"  # a repository without commits yet
    if _git("status", "--porcelain", "--untracked-files=no", cwd=root):
        commit += "+dirty"  # numbers from uncommitted code: say so
    return commit


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except Exception:  # noqa: BLE001 - an unimportable package has no version to record
        return ""


def run_metadata(device: torch.device) -> dict[str, str]:
    """Where and with what the numbers were made: the columns every row of a run shares."""
    import gpurnn

    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    commit = project_commit()
    meta = {
        "run_id": f"{now:%Y%m%dT%H%M%SZ}-{commit}",
        "date": now.isoformat().replace("+00:00", "Z"),
        "commit": commit,
        "device": device.type,
        "card": cpu_name(),
        "driver": "",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cudnn": "",
        "cuda": torch.version.cuda or "",
        "gpurnn": gpurnn.__version__,
    }
    if device.type == "cuda":
        meta["card"] = torch.cuda.get_device_name(device)
        meta["cudnn"] = str(torch.backends.cudnn.version() or "")
        meta["driver"] = _nvidia_driver()
    return meta


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def _nvidia_driver() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows to the history CSV; an older file with other columns is rewritten with
    the union of both, so no past row is lost when a column is added."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
    if header == FIELDS:
        with path.open("a", newline="") as f:
            csv.DictWriter(f, FIELDS, lineterminator="\n").writerows(rows)
        return
    old_rows = []
    if header:
        with path.open(newline="") as f:
            old_rows = list(csv.DictReader(f))
    fields = header + [f for f in FIELDS if f not in header]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(old_rows + rows)


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Measurement:
    impl: Impl
    mode: str
    status: str = "ok"
    ms: float | None = None
    repeats: int | None = None
    peak_mb: float | None = None
    max_err: float | None = None
    grad_err: float | None = None
    speedup: float | None = None


def _peak_training_mb(runner: Runner, inputs: InputSet, device) -> float | None:
    if device.type != "cuda":
        return None  # torch keeps no allocator statistics for CPU tensors
    runner.zero_grad()
    inputs.leaf.grad = None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.run(inputs.inp)[0].backward(inputs.dy)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure(
    impl: Impl, runner: Runner, mode: str, input_sets: list[InputSet], ref: Reference, timer: Timer
) -> Measurement:
    """Correctness on input set 0, then the timing over all sets, then peak memory."""
    m = Measurement(impl, mode)
    first = input_sets[0]
    if mode == "fwd":
        with torch.no_grad():
            m.max_err = forward_error(runner.run(first.inp), ref)

        def once(i):
            with torch.no_grad():
                runner.run(input_sets[i % len(input_sets)].inp)

        m.ms, m.repeats = timer.median_ms(once, lambda i: None)
        return m

    runner.zero_grad()
    first.leaf.grad = None
    result = runner.run(first.inp)
    result[0].backward(first.dy)
    m.max_err = forward_error(result, ref)
    m.grad_err = grad_error(runner, first, ref)
    del result

    def prepare(i):  # gradients are set, not accumulated, on every timed run
        runner.zero_grad()
        input_sets[i % len(input_sets)].leaf.grad = None

    def once(i):
        inputs = input_sets[i % len(input_sets)]
        runner.run(inputs.inp)[0].backward(inputs.dy)

    m.ms, m.repeats = timer.median_ms(once, prepare)
    m.peak_mb = _peak_training_mb(runner, first, timer.device)
    return m


def _judge(measurements: list[Measurement], dtype, baseline_ms: dict[str, float]) -> None:
    """Speedups against the baseline, and "wrong" for errors beyond the tolerance."""
    base = {m.mode: m for m in measurements if m.impl.is_baseline and m.status == "ok"}
    for m in measurements:
        if m.ms is not None and baseline_ms.get(m.mode):
            m.speedup = baseline_ms[m.mode] / m.ms
        if m.status != "ok":
            continue
        b = base.get(m.mode)
        for what, err, base_err in (
            ("max_err", m.max_err, b.max_err if b else None),
            ("grad_err", m.grad_err, b.grad_err if b else None),
        ):
            if err is None:
                continue
            tol = max(TOLERANCE[dtype], 2 * (base_err or 0.0))
            if not err <= tol:
                m.status = f"wrong: {what} {err:.2e} > {tol:.1e}"
                break


def _row(meta, shape: Shape, dtype_name: str, m: Measurement) -> dict:
    per_step = m.ms * 1e3 / shape.T if m.ms is not None else None
    rate = flops(shape, m.mode) / (m.ms * 1e-3) / 1e12 if m.ms else None
    return {
        **meta,
        "suite": shape.suite,
        "shape": shape.id,
        "cell": shape.cell,
        "T": shape.T,
        "B": shape.B,
        "H": shape.H,
        "input_size": shape.input_size,
        "layers": shape.layers,
        "bidirectional": int(shape.bidirectional),
        "varlen": shape.varlen,
        "dtype": dtype_name,
        "impl": m.impl.name,
        "mode": m.mode,
        "status": m.status,
        "ms": _fmt(m.ms, ".4g"),
        "us_per_step": _fmt(per_step, ".4g"),
        "tflops": _fmt(rate, ".4g"),
        "speedup_vs_cudnn": _fmt(m.speedup, ".3g"),
        "peak_mem_mb": _fmt(m.peak_mb, ".1f"),
        "max_err": _fmt(m.max_err, ".2e"),
        "grad_err": _fmt(m.grad_err, ".2e"),
        "repeats": _fmt(m.repeats, "d"),
    }


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ").strip()
    return text if len(text) <= 300 else text[:297] + "..."


class Progress:
    """One line per finished case: [k/N] suite/shape dtype impl mode  result  ETA."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.stream = stream or sys.stdout

    def step(self, shape: Shape, dtype_name: str, m: Measurement) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        what = f"{m.ms:9.3f} ms" if m.ms is not None else " " * 12
        err = f"err {m.max_err:.1e}" if m.max_err is not None else ""
        status = "" if m.status == "ok" else f"  {m.status}"
        print(
            f"[{self.done}/{self.total}] {shape.suite}/{shape.id} {dtype_name} "
            f"{m.impl.name} {m.mode}  {what}  {err}{status[:120]}  ETA {_duration(eta)}",
            file=self.stream,
            flush=True,
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_cases(cases, impls, modes, device, budget, meta, csv_path, progress) -> list[dict]:
    """Runs every (shape, dtype) case for every implementation and mode; appends each
    case's rows to the CSV as soon as it is done (a crash keeps what was measured)."""
    timer = Timer(device, budget)
    baseline_ms: dict[tuple[str, str, str], float] = {}  # (shape id, dtype, mode) -> ms
    all_rows = []
    for shape, dtype_name in cases:
        dtype = DTYPES[dtype_name]
        applicable = [i for i in impls if i.applies(shape)]
        base = input_sets = ref = None
        try:
            base = make_base(shape, dtype, device)
            input_sets = [
                make_inputs(shape, dtype, device, _seed("inputs", shape.id, dtype_name, k))
                for k in range(budget.input_sets)
            ]
            ref = compute_reference(shape, base, input_sets[0])
            setup_error = None
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: every row says so
            setup_error = f"setting up the case: {_error_text(e)}"
            _recover(device)
        measurements = []
        # the baseline first, so its times exist when the others' speedups are computed
        for impl in sorted(applicable, key=lambda i: not i.is_baseline):
            runner, build_error = None, setup_error
            if setup_error is None:
                try:
                    runner = impl.build(shape, base, dtype)
                except Exception as e:  # noqa: BLE001 - a failing implementation is a result
                    build_error = _error_text(e)
            for mode in modes:
                if runner is None:
                    m = Measurement(impl, mode, status=f"failed: {build_error}")
                else:
                    try:
                        m = measure(impl, runner, mode, input_sets, ref, timer)
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        m = Measurement(impl, mode, status=f"failed: {_error_text(e)}")
                        _recover(device)
                if impl.is_baseline and m.status == "ok":
                    baseline_ms[(shape.id, dtype_name, mode)] = m.ms
                measurements.append(m)
                progress.step(shape, dtype_name, m)
            del runner
        own_baseline = {
            mode: baseline_ms.get((shape.baseline_id, dtype_name, mode)) for mode in modes
        }
        _judge(measurements, dtype, own_baseline)
        rows = [_row(meta, shape, dtype_name, m) for m in measurements]
        if csv_path is not None:
            append_rows(csv_path, rows)
        all_rows += rows
        del base, input_sets, ref
        _recover(device)
    return all_rows


def _recover(device) -> None:
    if device.type == "cuda":
        with contextlib.suppress(Exception):  # a dead CUDA context fails here too
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- summary


def summary_table(rows: list[dict]) -> str:
    """Per shape x dtype: each implementation's fwd and fwd+bwd time and speedup."""
    cases: dict[tuple, dict[str, dict[str, dict]]] = {}
    for r in rows:
        key = (r["suite"], r["shape"], r["dtype"])
        cases.setdefault(key, {}).setdefault(r["impl"], {})[r["mode"]] = r
    header = (
        f"{'shape':<34} {'dtype':<5} {'impl':<15} {'fwd ms':>9} {'x':>6} "
        f"{'fwd+bwd ms':>10} {'x':>6} {'max err':>8} {'peak MB':>8}  note"
    )
    lines = [header, "-" * len(header)]
    for (suite, shape, dtype), by_impl in cases.items():
        for impl, modes in by_impl.items():
            f, b = modes.get("fwd", {}), modes.get("fwdbwd", {})
            notes = {r["status"] for r in (f, b) if r and r["status"] != "ok"}
            errs = [float(r["max_err"]) for r in (f, b) if r and r.get("max_err")]
            lines.append(
                f"{suite + '/' + shape:<34} {dtype:<5} {impl:<15} "
                f"{f.get('ms', ''):>9} {f.get('speedup_vs_cudnn', ''):>6} "
                f"{b.get('ms', ''):>10} {b.get('speedup_vs_cudnn', ''):>6} "
                f"{(format(max(errs), '.1e') if errs else ''):>8} "
                f"{b.get('peak_mem_mb', ''):>8}  {'; '.join(sorted(notes))[:100]}"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the target shapes (docs/design.md) with fewer repeats (~2 min on a GPU)",
    )
    parser.add_argument(
        "--shapes",
        help="comma-separated suites ("
        + ",".join(SUITES)
        + ") or shape ids (default: all GPU suites; smoke on CPU)",
    )
    parser.add_argument(
        "--dtypes",
        help="comma-separated, of " + ",".join(DTYPES) + " (default: all on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--backends",
        help="comma-separated implementations: gpurnn-<backend>, "
        "cudnn (alias torch.nn), cell-loop, flashrnn (default: all that run here)",
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of fwd,fwdbwd (default: both)"
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    parser.add_argument(
        "--csv",
        default=str(DEFAULT_CSV),
        help="results file the rows are appended to (default: %(default)s)",
    )
    parser.add_argument("--no-csv", action="store_true", help="append no rows anywhere")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when any row failed or was wrong"
    )


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def plan(args, device: torch.device) -> tuple[list[tuple[Shape, str]], list[str]]:
    """The (shape, dtype) cases the arguments select, and lines to print about the choice."""
    notes = []
    dtypes = _split(args.dtypes) or (list(DTYPES) if device.type == "cuda" else ["fp32"])
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtypes {bad}; choose from {', '.join(DTYPES)}")
    if args.shapes:
        return [(s, d) for s in select_shapes(args.shapes, ()) for d in dtypes], notes
    if device.type != "cuda":
        notes.append(
            "no CUDA device: running the smoke suite (tiny shapes); the GPU shapes "
            "would take hours on CPU (pass --shapes to insist)"
        )
        return [(s, d) for s in select_shapes("smoke", ()) for d in dtypes], notes
    if args.quick:
        by_id = {s.id: s for s in SHAPES}
        wanted = set(dtypes) if args.dtypes else set(DTYPES)
        return [(by_id[i], d) for i, d in QUICK if d in wanted], notes
    suites = [s for s in SUITES if s != "smoke"]
    return [(s, d) for s in select_shapes(None, suites) for d in dtypes], notes


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    requested = _split(args.backends)
    # (without CUDA, gpurnn-triton runs only under the interpreter, which `python -m gpurnn
    # bench` switches on by running itself again: TRITON_INTERPRET must be set before
    # triton is first imported, and importing torch's compiler imports it)
    try:
        cases, notes = plan(args, device)
        impls, impl_notes = implementations(device, requested, args.quick)
        modes = _split(args.modes) or list(MODES)
        if any(m not in MODES for m in modes):
            raise ValueError(f"modes must be of {MODES}, got {modes}")
    except ValueError as e:
        print(f"gpurnn bench: {e}", file=sys.stderr)
        return 2
    meta = run_metadata(device)
    csv_path = None if args.no_csv else Path(args.csv)
    budget = BUDGETS["cpu" if device.type != "cuda" else "quick" if args.quick else "full"]
    total = sum(len(modes) for shape, _ in cases for i in impls if i.applies(shape))
    print(
        f"gpurnn bench on {meta['card']} ({meta['device']}), torch {meta['torch']}, "
        f"triton {meta['triton'] or '-'}, cuDNN {meta['cudnn'] or '-'}, "
        f"driver {meta['driver'] or '-'}, commit {meta['commit']}"
    )
    for note in notes + impl_notes:
        print(f"  note: {note}")
    print(
        f"  {len(cases)} shape x dtype cases, implementations: "
        f"{', '.join(i.name for i in impls)}; {total} measurements -> "
        f"{csv_path if csv_path else 'no CSV'}",
        flush=True,
    )
    rows = run_cases(cases, impls, modes, device, budget, meta, csv_path, Progress(total))
    print()
    print(summary_table(rows))
    bad = [r for r in rows if r["status"] != "ok"]
    print(
        f"\n{len(rows)} rows, {len(bad)} not ok (failed or wrong)"
        + (f"; appended to {csv_path}" if csv_path else "")
    )
    return 1 if (args.strict and bad) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpurnn bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
