"""`python -m gpurnn info` and `check`."""

import os
import re
import subprocess
import sys

import pytest

from gpurnn import cli
from gpurnn.backends import get_backend


def test_info_lists_versions_and_backends(capsys):
    # (from a shell as pasted: tests/test_readme.py runs the README's command lines)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "numpy" in out
    for name in ("triton", "cupy", "torch", "numpy"):
        assert f"  {name}" in out


def test_check_passes_on_cpu_backends(capsys):
    assert cli.main(["check", "--backends", "torch,numpy", "--dtypes", "fp64,fp32"]) == 0
    out = capsys.readouterr().out
    assert "40 cases checked against the float64 reference, 0 failed" in out
    # one progress line per backend x cell x dtype, in order, each with its time
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert len(progress) == 2 * 5 * 2
    for k, line in enumerate(progress, 1):
        assert re.match(rf"\[\s*{k}/20\] (torch|numpy) +\S+ +float(64|32) +\d+\.\d\d s  ok ", line)
    assert progress[0].split("]")[1].split()[:3] == ["torch", "rnn_tanh", "float64"]


def test_check_fails_on_a_wrong_backend(monkeypatch, capsys):
    backend = get_backend("torch")
    original = type(backend).forward

    def off_by_a_little(self, *args):
        y, h_T, c_T, ws = original(self, *args)
        return y, h_T + 1e-3, c_T, ws

    monkeypatch.setattr(type(backend), "forward", off_by_a_little)
    assert cli.main(["check", "--backends", "torch", "--dtypes", "fp64"]) == 1
    out = capsys.readouterr().out
    assert "NO" in out and "failed" in out


def test_check_reports_a_raising_backend_and_goes_on(monkeypatch, capsys):
    backend = get_backend("torch")

    def broken(self, inputs, save):
        if inputs.cell == "gru":
            raise RuntimeError("kernel launch failed")
        return original(self, inputs, save)

    original = type(backend).forward
    monkeypatch.setattr(type(backend), "forward", broken)
    assert cli.main(["check", "--backends", "torch,numpy", "--dtypes", "fp64"]) == 1
    out = capsys.readouterr().out
    assert "gru        float64     " in out and "FAILED  fwd error: RuntimeError: kernel" in out
    assert "[10/10] numpy   lstm_proj" in out
    assert "2 failed" in out  # gru, both directions; everything else still checked


def test_demo_converts_and_trains(capsys):
    assert cli.main(["demo", "--steps", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "max |output change| = 0.0e+00" in lines[0]
    losses = [float(line.split()[-1]) for line in lines if line.startswith("step")]
    assert losses[-1] < losses[0], "the loss goes down"


def test_check_runs_triton_from_a_plain_shell():
    """As a user runs it: no TRITON_INTERPRET in the environment. Without a GPU the command
    must switch the interpreter on before triton is imported (torch imports it early)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "gpurnn", "check", "--backends", "triton", "--dtypes", "fp32"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # 5 cells (lstm_proj included), forward and reverse
    assert "10 cases checked against the float64 reference, 0 failed" in done.stdout


def test_info_says_how_triton_runs_without_a_gpu(monkeypatch, capsys):
    if cli.torch.cuda.is_available():
        pytest.skip("on a GPU triton runs natively")
    # the backend reads the variable when asked, so this process can show both cases
    monkeypatch.delenv("TRITON_INTERPRET")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "Triton interpreter" in out and "TRITON_INTERPRET=1" in out
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli.main(["info"]) == 0
    assert "available on CPU through the Triton interpreter" in capsys.readouterr().out


def test_info_names_a_bad_environment_variable(monkeypatch, capsys):
    monkeypatch.setenv("GPURNN_BACKEND", "cudnn")
    assert cli.main(["info"]) == 1
    assert "GPURNN_BACKEND='cudnn': backend must be one of" in capsys.readouterr().out
    monkeypatch.setenv("GPURNN_BACKEND", "numpy")
    assert cli.main(["info"]) == 0
    assert "default backend: numpy" in capsys.readouterr().out


def test_help_shows_defaults(capsys):
    for command, default in [("demo", "(default: 100)"), ("inspect", "(default: 300)")]:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert default in capsys.readouterr().out, command


def _exit_status(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


NO_CUDA = "no CUDA device here"
MISTAKES = [
    (["check", "--backends", "bogus"], "unknown backend 'bogus'; choose from triton, cupy,"),
    (["check", "--dtypes", "fp8"], "unknown dtype 'fp8'; choose from fp64, fp32, fp16, bf16"),
    (["check", "--device", "gpu"], "unknown device 'gpu'; choose from cpu, cuda, cuda:N"),
    (["bench", "--backends", "triton"], "unknown implementation 'triton'; choose from gpurnn-"),
    (["bench", "--dtypes", "fp64"], "unknown dtype 'fp64'; choose from bf16, fp16, fp32"),
    (["bench", "--modes", "bwd"], "unknown mode 'bwd'; choose from fwd, fwdbwd"),
    (["bench", "--shapes", "lstm-huge", "--no-csv"], "unknown shapes ['lstm-huge']"),
    (["inspect", "--steps", "0"], "argument --steps: '0': must be at least 1"),
    (["inspect", "--hidden", "many"], "argument --hidden: 'many' is not a whole number"),
    (["demo", "--steps", "-3"], "argument --steps: '-3': must be at least 1"),
    (["plot", "--csv", "no/such.csv"], "no/such.csv does not exist"),
    (["dispatch", "--csv", "no/such.csv"], "no benchmark rows at no/such.csv"),
    (["dispatch", "--record-gpu-tests", "tpu"], "unknown backend 'tpu'; choose from triton,"),
    (["dispatch", "--record-gpu-tests", "triton"], "needs --pytest-log and --exit-status"),
    (
        ["dispatch", "--record-gpu-tests", "cupy", "--pytest-log", "no.log", "--exit-status", "0"],
        "--pytest-log no.log: no such file",
    ),
    (["info", "--verbose"], "unrecognized arguments: --verbose"),
    (["benchmark"], "invalid choice: 'benchmark'"),
    ([], "the following arguments are required: COMMAND"),
]
if not cli.torch.cuda.is_available():
    MISTAKES += [
        ([command, "--device", "cuda"], NO_CUDA) for command in ("check", "bench", "inspect")
    ]


@pytest.mark.parametrize(
    "argv, said", MISTAKES, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_a_mistake_is_one_line_and_exit_status_2(argv, said, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a mistake could write lands in the checkout
    assert _exit_status(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], captured.err
    assert lines[0].startswith("python -m gpurnn") and "Traceback" not in captured.out
    assert not list(tmp_path.iterdir())


def test_names_are_taken_in_any_case():
    parser = cli.build_parser()
    args = parser.parse_args(["check", "--backends", "Torch,NUMPY", "--dtypes", "FP64,fp32"])
    assert args.backends == ["torch", "numpy"] and args.dtypes == ["fp64", "fp32"]
    args = parser.parse_args(["check", "--device", "CPU"])
    assert args.device == cli.torch.device("cpu")
    args = parser.parse_args(["bench", "--backends", "CUDNN,gpurnn-Torch", "--modes", "FWD"])
    assert args.backends == ["cudnn", "gpurnn-torch"] and args.modes == ["fwd"]
    args = parser.parse_args(["dispatch", "--record-gpu-tests", "Triton"])
    assert args.record_gpu_tests == "triton"
    args = parser.parse_args(["dispatch", "--record-gpu-tests", "cupy-KSplit"])
    assert args.record_gpu_tests == "cupy-ksplit"  # a variant recorded apart


def test_a_mistake_from_a_plain_shell_shows_no_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "gpurnn", "check", "--backends", "Bogus"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "python -m gpurnn check: error: argument --backends: unknown backend 'Bogus'; choose "
        "from triton, cupy, torch, numpy (see python -m gpurnn check --help)"
    ]


def test_help_lists_every_subcommand_and_every_default(capsys):
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    top = capsys.readouterr().out
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(subparsers.choices) == {
        "info", "check", "demo", "bench", "plot", "inspect", "dispatch"
    }  # fmt: skip
    for name, sub in subparsers.choices.items():
        assert f"    {name} " in top, name
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.nargs == 0:
                continue  # --help and on/off flags have no default to show
            shown = formatter._expand_help(action)  # the option's text in --help
            assert "default" in shown, f"{name} {action.option_strings}: {shown}"
