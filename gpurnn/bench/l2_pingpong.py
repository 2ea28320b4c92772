"""What one hand-off between two programs through L2 costs on this card: a ping-pong.

Every exchange of a persistent recurrence kernel is a producer's store that a consumer on
another SM polls for; the step cost model's `round_trip` constant is that latency. Here two
programs (on two SMs) pass a counter back and forth: program 0 waits for an even value and
writes the next odd one, program 1 the reverse, with the same relaxed gpu-scope stores and
polling loads the kernels use. One hand-off = the time per round ÷ 2: store issued, reaching
L2, a poll seeing it.

    python -m gpurnn.bench.l2_pingpong                # prints µs per hand-off, one JSON line
    python -m gpurnn.bench.l2_pingpong --rounds 100000 --out out/l2_pingpong.jsonl

The waits are bounded (a poll gives up after `--spin-max` loads and the run says so). The
two programs must run at once, which the Triton interpreter cannot do: without a GPU this
only checks that the kernel compiles for sm_90 (`--compile-only`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import triton
import triton.language as tl

from gpurnn.bench.results import project_commit
from gpurnn.kernels.triton.interpreter import interpreting


@triton.jit
def _load_relaxed(ptr):
    return tl.inline_asm_elementwise(
        "ld.relaxed.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32, is_pure=False,
        pack=1,
    )  # fmt: skip


@triton.jit
def _store_relaxed(ptr, value):
    tl.inline_asm_elementwise(
        "st.relaxed.gpu.global.b32 [$1], $2; mov.u32 $0, 0;", "=r,l,r", [ptr, value],
        dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def _pingpong_kernel(flag_ptr, out_ptr, rounds, spin_max):
    """out[pid] = ns from the first hand-off to the last; out[2 + pid] = polls that gave up."""
    pid = tl.program_id(0)
    flag = flag_ptr + tl.zeros([1], tl.int32)  # one thread's worth: a (1,) tensor
    t0 = _globaltimer()
    failed = tl.zeros([1], tl.int32)
    for i in range(rounds):
        want = 2 * i + pid
        v = _load_relaxed(flag)
        spins = 0
        while (tl.max(v) != want) & (spins < spin_max):
            v = _load_relaxed(flag)
            spins += 1
        failed += (tl.max(v) != want).to(tl.int32)
        _store_relaxed(flag, want + 1)
    t1 = _globaltimer()
    tl.store(out_ptr + pid + tl.zeros([1], tl.int32), t1 - t0)
    tl.store(out_ptr + 2 + pid + tl.zeros([1], tl.int32), failed.to(tl.int64))


def compile_for_sm90():
    """The kernel compiled for sm_90 without a GPU (the CPU check that it builds)."""
    sig = {"flag_ptr": "*i32", "out_ptr": "*i64", "rounds": "i32", "spin_max": "i32"}
    src = triton.compiler.ASTSource(_pingpong_kernel, sig, {})
    return triton.compile(src, target=triton.backends.compiler.GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=1, num_stages=1))  # fmt: skip


def measure(rounds: int = 20000, spin_max: int = 1 << 20, repeats: int = 5) -> dict:
    """Median over `repeats` launches of the ns per hand-off (CUDA only)."""
    import statistics

    import torch

    dev = torch.device("cuda")
    per_handoff, failed = [], 0
    for _ in range(repeats + 1):  # the first launch compiles
        flag = torch.zeros(1, dtype=torch.int32, device=dev)
        out = torch.zeros(4, dtype=torch.int64, device=dev)
        _pingpong_kernel[(2,)](flag, out, rounds, spin_max, num_warps=1)
        torch.cuda.synchronize()
        ns = out[:2].max().item()
        failed += int(out[2:].sum().item())
        per_handoff.append(ns / (2 * rounds))
    ns = statistics.median(per_handoff[1:])
    return dict(kind="l2_pingpong", card=torch.cuda.get_device_name(), rounds=rounds,
                handoff_us=round(ns / 1e3, 4), failed_polls=failed)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20000, help="(default: %(default)s)")
    parser.add_argument(
        "--spin-max",
        type=int,
        default=1 << 20,
        help="polls before a wait gives up (default: %(default)s)",
    )
    parser.add_argument("--out", help="JSON lines file to append the result to")
    parser.add_argument(
        "--compile-only", action="store_true", help="compile for sm_90 and stop (no GPU needed)"
    )
    args = parser.parse_args(argv)
    if args.compile_only:
        start = time.perf_counter()
        compile_for_sm90()
        print(f"l2 ping-pong: compiled for sm_90 in {time.perf_counter() - start:.1f} s")
        return 0
    import torch

    if interpreting() or not torch.cuda.is_available():
        print("l2 ping-pong: needs a CUDA GPU (two programs running at once); "
              "--compile-only checks the kernel without one")  # fmt: skip
        return 0
    result = measure(args.rounds, args.spin_max)
    result["commit"] = project_commit()
    print(f"l2 ping-pong on {result['card']}: {result['handoff_us']:.3f} µs per hand-off "
          f"({result['rounds']} rounds, {result['failed_polls']} polls gave up)")  # fmt: skip
    print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 1 if result["failed_polls"] else 0


if __name__ == "__main__":
    sys.exit(main())
