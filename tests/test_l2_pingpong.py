"""The L2 ping-pong microbenchmark (gpurnn.bench.l2_pingpong): on CPU, that it compiles for
sm_90 with the relaxed gpu-scope loads and stores it is meant to time inside its loop; on a
GPU, that both programs finish every hand-off and the latency is physical."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from gpurnn.bench import sass  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(sass.tool("nvdisasm") is None, reason="nvdisasm not found")
def test_compiles_for_sm90_with_strong_loads_and_stores():
    # in a fresh interpreter: tests/conftest.py set TRITON_INTERPRET for this one
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "from gpurnn.bench import l2_pingpong as P; from gpurnn.bench import sass; "
        "print(sass.disassemble(P.compile_for_sm90().asm['cubin']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300, check=True).stdout  # fmt: skip
    ins = sass.parse(out)
    ops = [x[1] for x in ins if x[0] == "ins"]
    assert any(o.startswith("LDG.E.STRONG.GPU") for o in ops), "the poll is not a relaxed load"
    assert any(o.startswith("STG.E.STRONG.GPU") for o in ops), "the hand-off is not relaxed"
    assert "SR_GLOBALTIMERLO" in out or "GLOBALTIMER" in out
    assert sass._loops(ins), "no loop: the rounds were not kept"


@pytest.mark.gpu
def test_handoff_latency_on_the_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA GPU")
    from gpurnn.bench import l2_pingpong

    r = l2_pingpong.measure(rounds=2000, repeats=2)
    assert r["failed_polls"] == 0, r
    assert 0.05 < r["handoff_us"] < 20, r
