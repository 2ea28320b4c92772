"""Every CUDA kernel instantiation the cupy backend can launch compiles for sm_90 (and, less
the cluster variant, sm_80) with no register spills and no stack frame. Needs no GPU:
`nvcc -cubin -Xptxas -v` reports registers and spills per kernel; skipped without nvcc.

With CuPy and an NVRTC library installed (`pip install cupy-cuda13x "cuda-toolkit[nvrtc]"`),
the same source also compiles through NVRTC with no include path, as on a user's machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from gpurnn.backends.cupy.compile import (
    CELL_TYPES,
    DEBUG_BOUNDS_OPTION,
    KERNEL_FILE,
    KERNEL_PACKAGE,
    NVRTC_OPTIONS,
    kernel_source,
)
from gpurnn.backends.cupy.plan import kernel_names


def _nvcc() -> str | None:
    for p in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


NVCC = _nvcc()
ARCHS = {"sm_90": True, "sm_80": False}  # arch -> cluster variant built
# the default run builds for sm_90 (H100/H200, the cards measured); sm_80's build of the
# same source takes as long again and runs with --slow
ARCH_PARAMS = [pytest.param("sm_90"), pytest.param("sm_80", marks=pytest.mark.slow)]


def _instantiation_unit(names: list[str]) -> str:
    """A translation unit that explicitly instantiates `names` (all kernels of the source
    are templates: without this nothing would be compiled)."""
    lines = [kernel_source(), "namespace gpurnn {"]
    for name in names:
        fn = name.removeprefix("gpurnn::")
        params = "GPURNN_FORWARD_PARAMS" if "forward" in fn else "GPURNN_BACKWARD_PARAMS"
        variant = fn.split("<")[0].rsplit("_", 1)[1]
        extra = {"grid": ", void*, int, int, u32*", "cluster": ", int, u32*",
                 "ksplit": ", GPURNN_KSPLIT_PARAMS"}[variant]  # fmt: skip
        if fn.startswith("rnn_lstmp_"):  # LSTM with projection: its own parameter lists
            params = params.replace("GPURNN_", "GPURNN_LSTMP_")
            extra = ", GPURNN_LSTMP_EXCHANGE_PARAMS"
        lines.append(f"template __global__ void {fn}({params}{extra});")
    lines.append("}")
    return "\n".join(lines)


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """ptxas -v output -> {mangled kernel: {regs, stack, spill_stores, spill_loads}}."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = out.setdefault(m.group(1), {})
        elif current is not None and (m := _PROPS.search(line)):
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current is not None and (m := _REGS.search(line)):
            current["regs"] = int(m[1])
    return out


def _names_of(cell: str, clusters: bool) -> list[str]:
    """The instantiations of one cell but the K-split ones (compiled below); "lstmp": the
    LSTM-with-projection kernels."""
    if cell == "lstmp":
        return [n for n in kernel_names(clusters) if n.startswith("gpurnn::rnn_lstmp_")]
    return [n for n in kernel_names(clusters) if f"<{CELL_TYPES[cell]}," in n and "ksplit" not in n]


def _ksplit_names(full: bool) -> list[str]:
    """The K-split instantiations: all of them (`full`), or every layout of the bf16 LSTM
    and one layout (8-CTA clusters, 2 m-tiles a warp, 2 n-tiles) of every other cell and
    dtype: the registers depend mostly on the layout, and 192 kernels take minutes."""
    names = [n for n in kernel_names(clusters=True) if "_ksplit<" in n]
    if full:
        return names
    return [n for n in names if "<LstmCell, BF16," in n or n.endswith(", 8, 2, 2>")]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("cell", [*CELL_TYPES, "lstmp"])
@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_nvcc_compiles_without_spills(tmp_path, arch, cell):
    names = _names_of(cell, ARCHS[arch])
    assert names
    src = tmp_path / "instantiate.cu"
    src.write_text(_instantiation_unit(names))
    result = subprocess.run(
        [NVCC, "-std=c++17", f"-arch={arch}", "-cubin", "-Xptxas", "-v",
         "-o", str(tmp_path / "out.cubin"), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "warning" not in log.lower(), log[-4000:]
    kernels = parse_ptxas(log)
    assert len(kernels) == len(names), f"{len(kernels)} kernels compiled, {len(names)} wanted"
    bad = {k: v for k, v in kernels.items() if v["stack"] or v["spill_stores"] or v["spill_loads"]}
    assert not bad, f"register spills / stack frames on {arch}: {bad}"
    # one 256-thread block per SM: up to 255 registers are available, but the kernels are
    # latency-bound and should stay far below (headroom for the compiler across versions)
    heavy = {k: v["regs"] for k, v in kernels.items() if v["regs"] > 168}
    assert not heavy, f"unexpectedly many registers on {arch}: {heavy}"


def _compile_sm90(tmp_path, names, *options) -> dict[str, dict[str, int]]:
    src = tmp_path / "instantiate.cu"
    src.write_text(_instantiation_unit(names))
    result = subprocess.run(
        [NVCC, "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", *options,
         "-o", str(tmp_path / "out.cubin"), str(src)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "warning" not in log.lower(), log[-4000:]
    kernels = parse_ptxas(log)
    assert len(kernels) == len(names), f"{len(kernels)} kernels compiled, {len(names)} wanted"
    return kernels


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["sample", "all"])  # fmt: skip
def test_nvcc_compiles_ksplit_without_spills(request, tmp_path, full):
    """The K-split cluster kernels (sm_90 only): no spills, no stack frame, registers far
    below the 255 a one-block-per-SM kernel may use. All 192 with `-m slow` (minutes)."""
    if full and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("all K-split instantiations: run with -m slow")
    kernels = _compile_sm90(tmp_path, _ksplit_names(full))
    bad = {k: v for k, v in kernels.items() if v["stack"] or v["spill_stores"] or v["spill_loads"]}
    assert not bad, f"register spills / stack frames: {bad}"
    heavy = {k: v["regs"] for k, v in kernels.items() if v["regs"] > 168}
    assert not heavy, f"unexpectedly many registers: {heavy}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
# the grid kernels' debug build by default; the other variants' with --slow (the same
# option through the same headers, ~40 s of CPU)
@pytest.mark.parametrize(
    "variant", ["grid", *(pytest.param(v, marks=pytest.mark.slow) for v in ("cluster", "lstmp",
                                                                           "ksplit"))],
)  # fmt: skip
def test_nvcc_compiles_bounds_checked_build(tmp_path, variant):
    """GPURNN_DEBUG_BOUNDS=1 adds a check (and trap) to every buffer index: the kernels still
    build (LSTM backward, and the projected LSTM both ways, every dtype; spills are allowed
    in this debug build)."""
    if variant == "lstmp":
        names = _names_of("lstmp", clusters=True)
    elif variant == "ksplit":
        names = [n for n in _ksplit_names(full=False) if "<LstmCell, BF16, 8, 2," in n]
    else:
        names = [n for n in kernel_names(clusters=True)
                 if n.startswith(f"gpurnn::rnn_backward_{variant}<LstmCell,")]  # fmt: skip
    src = tmp_path / "instantiate.cu"
    src.write_text(_instantiation_unit(names))
    result = subprocess.run(
        [NVCC, "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", DEBUG_BOUNDS_OPTION,
         "-o", str(tmp_path / "out.cubin"), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert len(parse_ptxas(log)) == len(names)


def _cuobjdump() -> str | None:
    try:
        import triton  # ships a cuobjdump that reads sm_90 cubins
    except ImportError:
        triton = None
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    if triton is not None:
        candidates.insert(0, os.path.join(os.path.dirname(triton.__file__), "backends",
                                          "nvidia", "bin", "cuobjdump"))  # fmt: skip
    for p in candidates:
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def _sass_functions(tmp_path, names: list[str]) -> list[tuple[str, str]]:
    """(name, SASS) of each kernel instantiation in `names`, built for sm_90."""
    src = tmp_path / "instantiate.cu"
    src.write_text(_instantiation_unit(names))
    cubin = tmp_path / "out.cubin"
    subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "-cubin", "-o", str(cubin), str(src)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    assert len(functions) == len(names)
    return [(body.split("\n", 1)[0].strip(), body) for body in functions]


@pytest.mark.skipif(NVCC is None or _cuobjdump() is None, reason="nvcc or cuobjdump not found")
def test_cluster_step_has_no_fence_and_no_cluster_barrier(tmp_path):
    """The cluster variant's step waits on an mbarrier only: in the SASS the two cluster
    barriers (each with its GPU-scope MEMBAR and L1 invalidation) are the one after setup and
    the one before exit; with one inside the step loop there would be three."""
    names = ["gpurnn::rnn_forward_cluster<LstmCell, BF16, 2>",
             "gpurnn::rnn_backward_cluster<GruCell, F16, 1>"]  # fmt: skip
    for name, body in _sass_functions(tmp_path, names):
        counts = {op: len(re.findall(rf"\b{re.escape(op)}\b", body))
                  for op in ("UCGABAR_WAIT", "MEMBAR.ALL.GPU", "CCTL.IVALL")}  # fmt: skip
        assert counts == {"UCGABAR_WAIT": 2, "MEMBAR.ALL.GPU": 2, "CCTL.IVALL": 2}, (name, counts)
        assert "SYNCS.PHASECHK.TRANS64.TRYWAIT" in body, name  # the mbarrier wait
        assert "SYNCS.ARRIVE.TRANS64" in body, name  # arming a fill (expect_tx)


@pytest.mark.skipif(NVCC is None or _cuobjdump() is None, reason="nvcc or cuobjdump not found")
def test_ksplit_step_has_no_cluster_barrier(tmp_path):
    """The K-split step reduces over DSMEM with st.async (STAS) completing on mbarriers
    (a bounded try-wait): its only cluster barriers are the one after setup and the one
    before exit; the exchange between clusters costs one gpu-scope release (MEMBAR.ALL.GPU
    before the counter's add) and one acquire (CCTL.IVALL) a step, besides the two cluster
    barriers' own."""
    names = ["gpurnn::rnn_forward_ksplit<LstmCell, BF16, 8, 2, 2>",
             "gpurnn::rnn_backward_ksplit<GruCell, F16, 4, 1, 1>"]  # fmt: skip
    for name, body in _sass_functions(tmp_path, names):
        counts = {op: len(re.findall(rf"\b{re.escape(op)}\b", body))
                  for op in ("UCGABAR_WAIT", "MEMBAR.ALL.GPU", "CCTL.IVALL")}  # fmt: skip
        # forward: the arrive after publishing h0 and the step's; backward: the step's only
        # (the release of each arrive site, and the cluster barriers' own two)
        assert counts["UCGABAR_WAIT"] == 2, (name, counts)
        assert counts["MEMBAR.ALL.GPU"] == (4 if "forward" in name else 3), (name, counts)
        assert counts["CCTL.IVALL"] == 3, (name, counts)
        assert "STAS.64" in body, name  # st.async.v2 of the partial sums
        assert "SYNCS.PHASECHK.TRANS64.TRYWAIT" in body, name


def test_parse_ptxas():
    log = (
        "ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kPf\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers\n"
    )
    assert parse_ptxas(log) == {"_Z1kPf": dict(stack=8, spill_stores=4, spill_loads=4, regs=40)}


def test_source_is_self_contained():
    """NVRTC gets one string: every local include inlined, no CUDA header needed."""
    src = kernel_source()
    assert "#include" not in src
    assert "rnn_forward_grid" in src and "LstmCell" in src
    import importlib.resources

    files = importlib.resources.files(KERNEL_PACKAGE)
    assert files.joinpath(KERNEL_FILE).is_file()


def _nvrtc():
    pytest.importorskip("cupy")
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # no libnvrtc on this machine
        pytest.skip(f"NVRTC unavailable: {e}")
    return nvrtc


def test_nvrtc_compiles_every_kernel(arch="sm_90"):
    """What CuPy does on a user's machine (RawModule with name_expressions), without a GPU:
    the whole source through NVRTC, no include path, every instantiation at once (sm_90
    only: sm_80 differs just by the cluster kernels, and nvcc covers it above)."""
    nvrtc = _nvrtc()
    names = kernel_names(clusters=arch == "sm_90")
    prog = nvrtc.createProgram(kernel_source(), KERNEL_FILE, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, [*NVRTC_OPTIONS, f"-arch={arch}"])
        except nvrtc.NVRTCError as e:
            pytest.fail(f"NVRTC: {e}\n{nvrtc.getProgramLog(prog)[-4000:]}")
        lowered = {nvrtc.getLoweredName(prog, name) for name in names}
        assert len(lowered) == len(names)
        assert len(nvrtc.getCUBIN(prog)) > 0
    finally:
        nvrtc.destroyProgram(prog)
