"""gpurnn.cells is the one statement of each cell's gates and workspace: the CUDA header,
which cannot import it, and every backend's saved workspace are checked against it here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from gpurnn import cells
from gpurnn.backends import Inputs, get_backend
from gpurnn.backends.common import compute_dtype, previous_states, projection_grad, step_mask
from tests.conftest import seeded_generator

CUDA_DIR = Path(__file__).resolve().parents[1] / "kernels" / "cuda"
# the C++ cell type each cell name is compiled with (gpurnn.backends.cupy.compile.CELL_TYPES; the
# module needs no GPU to import, but reading the names here keeps this test CPU-only)
CUDA_CELL_TYPES = {
    "lstm": "LstmCell", "gru": "GruCell", "rnn_tanh": "RnnTanhCell", "rnn_relu": "RnnReluCell",
}  # fmt: skip


def _cuda_cells() -> dict[str, dict]:
    """{C++ cell type: {"gates", "fields", "names"}} parsed from kernels/cuda/*.cuh: the
    kGates / kFields constants of each cell struct (typedefs followed) and the field names
    the header's layout comment lists for it."""
    text = "\n".join(p.read_text() for p in sorted(CUDA_DIR.glob("*.cuh")))
    structs = {}
    for m in re.finditer(r"struct (\w+Cell) \{(.*?)\n\};", text, re.S):
        body = m.group(2)
        structs[m.group(1)] = {
            "gates": int(re.search(r"kGates = (\d+);", body).group(1)),
            "fields": int(re.search(r"kFields = (\d+);", body).group(1)),
        }
    for m in re.finditer(r"^//\s+(\w+Cell)\s+(.+)$", text, re.M):
        if m.group(1) in structs:
            listed = re.sub(r"\([^)]*\)", "", m.group(2)).split(",")
            names = tuple(part.split()[0].rstrip(":") for part in listed)
            structs[m.group(1)]["names"] = () if names == ("none",) else names
    for m in re.finditer(r"typedef (\w+Cell)<\w+> (\w+);", text):
        structs[m.group(2)] = structs[m.group(1)]
    return structs


def test_cuda_header_matches_table():
    parsed = _cuda_cells()
    for cell, cxx in CUDA_CELL_TYPES.items():
        entry = cells.TABLE[cell]
        assert cxx in parsed, f"{cxx} not found in kernels/cuda/*.cuh"
        assert parsed[cxx]["gates"] == entry.gate_count, cxx
        # the CUDA kernels read a plain RNN's h from y, as the torch loop does
        assert parsed[cxx]["fields"] == len(cells.saved_fields(cell, from_output=True)), cxx
        assert parsed[cxx]["names"] == cells.saved_fields(cell, from_output=True), cxx


def test_cupy_cell_types_match():
    cupy_backend = pytest.importorskip("gpurnn.backends.cupy.compile")
    assert cupy_backend.CELL_TYPES == CUDA_CELL_TYPES


def test_table_is_consistent():
    for name, entry in cells.TABLE.items():
        assert entry.name == name and cells.MODE_TO_CELL[entry.mode] == name
        assert len(entry.gate_names) in (0, entry.gate_count)
        # the gate activations lead the fields in gate order
        assert entry.fields[: len(entry.gate_names)] == entry.gate_names
        assert set(entry.output_fields) <= set(entry.fields)
    with pytest.raises(ValueError, match="cell must be one of"):
        cells.check_cell("lstmp")


def _expected_fields(cell, xg_t, h_prev, c_prev, w_hh, b_hn):
    """Every field of one step, recomputed in float64 from the formulas in gpurnn.cells."""
    if cell in ("rnn_tanh", "rnn_relu"):
        a = xg_t + h_prev @ w_hh.T
        return {"h": torch.tanh(a) if cell == "rnn_tanh" else torch.relu(a)}
    if cell == "lstm":
        a = xg_t + h_prev @ w_hh.T
        i, f, g, o = a.chunk(4, dim=-1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        return {"i": i, "f": f, "g": g, "o": o, "c": f * c_prev + i * g}
    x_r, x_z, x_n = xg_t.chunk(3, dim=-1)
    h_r, h_z, h_n = (h_prev @ w_hh.T).chunk(3, dim=-1)
    hn = h_n + b_hn
    r, z = (x_r + h_r).sigmoid(), (x_z + h_z).sigmoid()
    return {"r": r, "z": z, "n": (x_n + r * hn).tanh(), "hn": hn}


def _saved_workspace(backend, cell, xg, w_hh, h0, c0, lengths, reverse, b_hn):
    inputs = Inputs(cell, xg, w_hh, h0, c0, lengths, reverse, b_hn)
    y, _, _, workspace = backend.forward(inputs, save=True)
    return y, workspace


def _backend(name):
    if name == "triton":
        pytest.importorskip("triton")
        from gpurnn.backends.triton import TritonBackend

        return TritonBackend()  # on a CPU through the Triton interpreter (tests/conftest.py)
    backend = get_backend(name)
    if backend is None or backend.unavailable_reason() is not None:
        pytest.skip(f"{name} backend unavailable here")
    return backend


BACKENDS = ["torch", "numpy", "triton", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cell", cells.CELLS)
@pytest.mark.parametrize("name", BACKENDS)
def test_saved_workspace_matches_table(name, cell, packed):
    """Shape, dtype and meaning of what each backend saves for its backward: the table's
    fields (all of them, or all but those y already holds), each equal to the step's
    float64 recomputation at every step inside its sequence."""
    backend = _backend(name)
    device = "cuda" if name == "cupy" else "cpu"
    # the CUDA kernels take no float64; fp32 with tf32 off is their most exact input
    dtype = torch.float32 if name == "cupy" else torch.float64
    g = seeded_generator("workspace", name, cell, packed)
    T, B, H = 5, 3, 8
    G = cells.TABLE[cell].gate_count
    xg = torch.randn(T, B, G * H, generator=g, dtype=torch.float64)
    w_hh = torch.randn(G * H, H, generator=g, dtype=torch.float64) * 0.4
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64) * 0.5
    c0 = torch.randn(B, H, generator=g, dtype=torch.float64) if cell == "lstm" else None
    b_hn = torch.randn(H, generator=g, dtype=torch.float64) if cell == "gru" else None
    lengths = torch.tensor([T, 2, 4]) if packed else None
    reverse = packed  # the packed case runs in reverse, where a sequence starts at its end

    def dev(t):
        return t.to(device, dtype) if t is not None else None

    y, workspace = _saved_workspace(
        backend, cell, dev(xg), dev(w_hh), dev(h0), dev(c0), lengths, reverse, dev(b_hn)
    )
    shape, spec_dtype = backend.workspace_spec(cell, T, B, H, dtype, True)
    assert tuple(workspace.shape) == tuple(shape) and workspace.dtype == spec_dtype
    if name == "numpy":  # its backward reruns the reference: nothing saved
        assert workspace.numel() == 0
        return
    expected_dtype = {"torch": compute_dtype(dtype), "triton": dtype, "cupy": torch.float32}
    assert workspace.dtype == expected_dtype[name]
    every, without_output = cells.saved_fields(cell), cells.saved_fields(cell, from_output=True)
    if workspace.numel() == 0:
        assert without_output == (), f"{name} saved no workspace for {cell}"
        return
    assert workspace.shape[:2] == (T, B) and workspace.shape[2] % H == 0
    from_output = workspace.shape[2] // H == len(without_output) != len(every)
    assert workspace.shape[2] == len(without_output if from_output else every) * H
    saved = cells.unpack_workspace(cell, workspace.cpu().double(), H, from_output=from_output)
    y = y.cpu().double()
    h_prev = previous_states(y, h0, lengths, reverse)
    c_prev = previous_states(saved["c"], c0, lengths, reverse) if cell == "lstm" else None
    valid = step_mask(T, lengths, "cpu")
    valid = valid.expand(T, B, H) if valid is not None else torch.ones(T, B, H, dtype=torch.bool)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    for t in range(T):
        expected = _expected_fields(
            cell, xg[t], h_prev[t], c_prev[t] if c_prev is not None else None, w_hh, b_hn
        )
        for field, value in saved.items():
            got, want = value[t][valid[t]], expected[field][valid[t]]
            assert torch.allclose(got, want, atol=tolerance, rtol=0), (name, cell, field, t)


def test_projection_grad_matches_its_definition():
    """dW_hr = sum over (t, b) of dhp^T (o * tanh c), o and c read from the workspace by
    the cell table (both GPU backends use this one function)."""
    T, B, H, P = 4, 3, 6, 5
    ws = torch.randn(T, B, 5 * H)
    dhp = torch.randn(T, B, P)
    m = ws[..., 3 * H : 4 * H] * torch.tanh(ws[..., 4 * H :])
    expected = torch.einsum("tbp,tbh->ph", dhp.double(), m.double())
    got = projection_grad(dhp, ws, H)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(projection_grad(dhp[:0], ws[:0], H), torch.zeros(P, H))
