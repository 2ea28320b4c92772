# The benchmark behind `python -m gpurnn bench`, one module per concern:
#   shapes       the shape matrix, its suites, FLOPs, the random inputs of a case
#   runners      the implementations timed (the Runner interface and each kind of Runner)
#   timing       repeat budgets and the Timer (CUDA events, L2 flush; perf_counter on CPU)
#   correctness  the float32 torch.nn reference and the error tolerances
#   results      CSV columns and rows, commit / card / version detection, the summary table
#   harness      the run: each case measured, judged and turned into rows
#   cli          the command's arguments, the plan of cases, and `main`
# Each module imports only those listed above it. Measuring the kernels themselves, each
# runnable as `python -m gpurnn.bench.NAME`:
#   sass         reading a step loop's SASS: round trips, barriers, MMAs, shared memory, spills
#   sm90         every Triton variant compiled for sm_90 without a GPU, the table of counts
#   step_timing  each kernel alone on a GPU, µs per step beside cuDNN (kernel rows)
#   step_model   µs per step predicted from the counts, constants fitted to the kernel rows
#   l2_pingpong  one hand-off between two programs through L2 on the card
#   warmup       compiling in parallel what a GPU run will launch, before it launches
# They are not imported here (they need the compilers or a GPU). The names below are the ones other
# modules, scripts and tests use, importable as `gpurnn.bench.NAME`. A test that replaces
# a function for the run (monkeypatch) patches it where it is looked up, e.g.
# `gpurnn.bench.harness.compute_reference`.

from gpurnn.bench import cli
from gpurnn.bench.cli import add_arguments, main, plan, run
from gpurnn.bench.correctness import (
    TOLERANCE,
    Reference,
    compute_reference,
    forward_error,
    grad_error,
)
from gpurnn.bench.harness import Measurement, Progress, measure, run_cases
from gpurnn.bench.results import (
    DEFAULT_CSV,
    FIELDS,
    REPO_ROOT,
    _version,
    append_rows,
    cpu_name,
    project_commit,
    run_metadata,
    summary_table,
)
from gpurnn.bench.runners import (
    GPURNN_BACKENDS,
    CellLoopRunner,
    FlashRNNRunner,
    Impl,
    ModuleRunner,
    Runner,
    baseline_name,
    implementations,
    make_base,
)
from gpurnn.bench.shapes import (
    DTYPES,
    MODES,
    QUICK,
    SHAPES,
    SUITES,
    InputSet,
    Shape,
    flops,
    make_inputs,
    select_shapes,
)
from gpurnn.bench.timing import BUDGETS, Budget, Timer

# the command's description (its --help, and `python -m gpurnn bench --help`) is the package's
__doc__ = cli.__doc__

__all__ = [
    "BUDGETS",
    "DEFAULT_CSV",
    "DTYPES",
    "FIELDS",
    "GPURNN_BACKENDS",
    "MODES",
    "QUICK",
    "REPO_ROOT",
    "SHAPES",
    "SUITES",
    "TOLERANCE",
    "Budget",
    "CellLoopRunner",
    "FlashRNNRunner",
    "Impl",
    "InputSet",
    "Measurement",
    "ModuleRunner",
    "Progress",
    "Reference",
    "Runner",
    "Shape",
    "Timer",
    "_version",  # step_timing records package versions the way a run does
    "add_arguments",
    "append_rows",
    "baseline_name",
    "compute_reference",
    "cpu_name",
    "flops",
    "forward_error",
    "grad_error",
    "implementations",
    "main",
    "make_base",
    "make_inputs",
    "measure",
    "plan",
    "project_commit",
    "run",
    "run_cases",
    "run_metadata",
    "select_shapes",
    "summary_table",
]
