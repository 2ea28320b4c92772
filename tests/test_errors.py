"""Bad input is rejected as torch.nn rejects it, with an error naming what was expected,
on every backend: the modules and the primitive check their arguments before a backend is
chosen, so every test here runs once per backend (triton through its interpreter on CPU;
cupy where it is installed)."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import gpurnn
from gpurnn import native


@pytest.fixture(params=["torch", "torch-loop", "numpy", "triton", "cupy"])
def backend(request):
    if request.param == "torch-loop":
        with native.use_native_layers(False):
            yield "torch"
        return
    if request.param == "cupy":
        pytest.importorskip("cupy")
    yield request.param


def device_for(backend):
    """Where `backend` runs a good call: the GPU kernels on CUDA where there is one (triton
    runs on CPU only under its interpreter, which a GPU machine does not switch on)."""
    reason = gpurnn.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    return "cuda" if backend in ("triton", "cupy") and torch.cuda.is_available() else "cpu"


def pair(cls_name, backend, *args, **kwargs):
    torch.manual_seed(0)
    return getattr(torch.nn, cls_name)(*args, **kwargs), getattr(gpurnn, cls_name)(
        *args, **kwargs, backend=backend
    )


def raises_like_torch(ref, ours, *call_args, match):
    """Both modules reject the call with the same exception type; ours says `match`."""
    with pytest.raises(Exception) as expected:
        ref(*call_args)
    with pytest.raises(expected.type, match=match):
        ours(*call_args)


@pytest.mark.parametrize("cls_name", ["RNN", "LSTM", "GRU"])
def test_input_rank(backend, cls_name):
    ref, ours = pair(cls_name, backend, 3, 4)
    raises_like_torch(ref, ours, torch.randn(2, 2, 2, 3), match="Expected input to be 2D or 3D")
    raises_like_torch(ref, ours, torch.randn(3), match="Expected input to be 2D or 3D")


@pytest.mark.parametrize("cls_name", ["RNN", "LSTM", "GRU"])
def test_input_feature_size(backend, cls_name):
    ref, ours = pair(cls_name, backend, 3, 4)
    raises_like_torch(ref, ours, torch.randn(5, 2, 7), match="input_size. Expected 3, got 7")


@pytest.mark.parametrize("cls_name", ["RNN", "GRU"])
def test_hidden_shape(backend, cls_name):
    ref, ours = pair(cls_name, backend, 3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    raises_like_torch(ref, ours, x, torch.randn(2, 2, 4), match=r"hidden size \(4, 2, 4\)")
    raises_like_torch(ref, ours, x, torch.randn(4, 3, 4), match=r"hidden size \(4, 2, 4\)")
    raises_like_torch(ref, ours, x, torch.randn(4, 4), match="hx should also be 3-D")
    raises_like_torch(ref, ours, x[:, 0], torch.randn(4, 1, 4), match="hx should also be 2-D")


def test_lstm_hidden_shapes_with_projection(backend):
    ref, ours = pair("LSTM", backend, 3, 6, proj_size=2)
    x = torch.randn(5, 2, 3)
    h_ok, c_ok = torch.randn(1, 2, 2), torch.randn(1, 2, 6)
    # h must have proj_size features, c hidden_size
    raises_like_torch(
        ref, ours, x, (torch.randn(1, 2, 6), c_ok), match=r"hidden\[0\] size \(1, 2, 2\)"
    )
    raises_like_torch(
        ref, ours, x, (h_ok, torch.randn(1, 2, 2)), match=r"hidden\[1\] size \(1, 2, 6\)"
    )
    raises_like_torch(ref, ours, x, (h_ok, c_ok[0]), match="hx and cx should also be 3-D")


def test_input_dtype_mismatch(backend):
    ref, ours = pair("GRU", backend, 3, 4)
    raises_like_torch(
        ref,
        ours,
        torch.randn(5, 2, 3, dtype=torch.float64),
        match=r"input dtype \(torch.float64\) does not match weight dtype",
    )


@pytest.mark.parametrize("cls_name", ["RNN", "LSTM", "GRU"])
def test_hidden_dtype_mismatch(backend, cls_name):
    ours = getattr(gpurnn, cls_name)(3, 4, backend=backend)
    x = torch.randn(5, 2, 3)
    h = torch.randn(1, 2, 4, dtype=torch.float64)
    hx = (h, h.float()) if cls_name == "LSTM" else h
    what = r"hx\[0\]" if cls_name == "LSTM" else "hidden"
    with pytest.raises(ValueError, match=rf"{what} dtype \(torch.float64\) does not match input"):
        ours(x, hx)


def test_device_mismatch(backend):
    """Meta tensors stand in for a second device on a CPU-only machine."""
    ours = gpurnn.LSTM(3, 4, backend=backend)
    x = torch.randn(5, 2, 3)
    h = torch.zeros(1, 2, 4)
    with pytest.raises(
        RuntimeError,
        match="not at the same device.*input tensor at cpu and "
        r"hx\[1\] tensor at meta",
    ):
        ours(x, (h, h.to("meta")))
    with pytest.raises(
        RuntimeError,
        match="Input and parameter tensors are not at the same device, found input tensor at meta",
    ):
        ours(x.to("meta"))


def test_packed_input_errors(backend):
    """torch.nn fails deep inside here (a GEMM shape, a broadcast); gpurnn says what is wrong,
    with the exception type torch.nn raises."""
    ours = gpurnn.LSTM(3, 4, backend=backend)
    lengths = torch.tensor([5, 3])
    with pytest.raises(RuntimeError, match="input_size. Expected 3, got 7"):
        ours(pack_padded_sequence(torch.randn(5, 2, 7), lengths))
    h = torch.randn(1, 3, 4)  # three sequences' states for two sequences
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 4\)"):
        ours(pack_padded_sequence(torch.randn(5, 2, 3), lengths), (h, h))


def test_lstm_hx_must_be_a_pair(backend):
    ours = gpurnn.LSTM(3, 4, backend=backend)
    x, h = torch.randn(5, 2, 3), torch.randn(1, 2, 4)
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\), got Tensor"):
        ours(x, h)
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\), got list"):
        ours(x, [h, h, h])


def test_integer_input(backend):
    ref, ours = pair("LSTM", backend, 3, 4)
    raises_like_torch(
        ref, ours, torch.randint(0, 3, (5, 2, 3)), match=r"input dtype \(torch.int64\)"
    )


def test_unsorted_lengths_with_enforce_sorted(backend):
    ours = gpurnn.LSTM(3, 4, backend=backend)
    x = torch.randn(5, 3, 3)
    with pytest.raises(RuntimeError, match="must be sorted in decreasing order"):
        ours(pack_padded_sequence(x, torch.tensor([2, 5, 3]), enforce_sorted=True))


@pytest.mark.parametrize("cls_name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_errors(backend, cls_name):
    ref, ours = pair(cls_name, backend, 3, 4)
    raises_like_torch(ref, ours, torch.randn(2, 2, 3), match="Expected input to be 1D or 2D")
    raises_like_torch(
        ref, ours, torch.randn(2, 5), match="inconsistent input_size: got 5, expected 3"
    )
    bad_h = torch.randn(3, 4)  # batch 3 for an input of batch 2
    hx = (bad_h, bad_h) if cls_name == "LSTMCell" else bad_h
    raises_like_torch(ref, ours, torch.randn(2, 3), hx, match=r"must have shape \(2, 4\)")
    with pytest.raises(ValueError, match=r"input dtype \(torch.float64\) does not match weight"):
        ours(torch.randn(2, 3, dtype=torch.float64))


def test_constructor_errors():
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        gpurnn.GRU(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="Unknown nonlinearity 'sigmoid'"):
        gpurnn.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="dropout should be a number in range"):
        gpurnn.LSTM(3, 4, dropout=1.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        gpurnn.LSTM(3, 4, backend="cudnn")


@pytest.mark.parametrize("cls_name", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_sequence(backend, cls_name, batch_first):
    """T = 0 gets torch.nn's own error, batched or not, and no backend ever sees it."""
    ref, ours = pair(cls_name, backend, 3, 4, batch_first=batch_first)
    empty = torch.randn(2, 0, 3) if batch_first else torch.randn(0, 2, 3)
    match = "Expected sequence length to be larger than 0"
    raises_like_torch(ref, ours, empty, match=match)
    raises_like_torch(ref, ours, torch.randn(0, 3), match=match)  # unbatched
    h = torch.randn(1, 2, 4)
    raises_like_torch(ref, ours, empty, (h, h) if cls_name == "LSTM" else h, match=match)


@pytest.mark.parametrize("cls_name", ["RNN", "LSTM", "GRU"])
def test_empty_batch_runs_as_in_torch(backend, cls_name):
    """B = 0 is not an error in torch.nn: empty outputs of the right shapes."""
    device = device_for(backend)
    ref, ours = pair(cls_name, backend, 3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 0, 3, device=device)
    want, got = ref.to(device)(x), ours.to(device)(x)
    assert got[0].shape == want[0].shape == (5, 0, 8)
    states = zip(want[1], got[1]) if cls_name == "LSTM" else [(want[1], got[1])]
    for w, g in states:
        assert g.shape == w.shape == (4, 0, 4)


def test_bad_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv("GPURNN_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="GPURNN_BACKEND='cudnn': backend must be one of"):
        gpurnn.LSTM(3, 4)(torch.randn(5, 2, 3))
    with gpurnn.use_backend("torch"):  # a more specific choice does not read it
        gpurnn.LSTM(3, 4)(torch.randn(5, 2, 3))


def test_primitive_argument_errors(backend):
    xg = torch.randn(4, 2, 12)
    w = torch.randn(12, 3)
    cases = [
        (dict(cell="cnn"), ValueError, "cell must be one of"),
        (dict(xg=torch.randn(4, 12)), ValueError, r"xg must be a 3-D tensor"),
        (dict(xg=torch.randn(4, 2, 10)), ValueError, r"xg.size\(2\) must be 4 \* hidden_size"),
        (dict(w_hh=torch.randn(12, 4)), ValueError, r"w_hh must have shape \(12, 3\)"),
        (dict(h0=torch.randn(3, 3)), ValueError, r"h0 must have shape \(2, 3\)"),
        (dict(c0=torch.randn(2, 3, dtype=torch.float64)), TypeError, "c0 dtype"),
        (dict(w_hr=torch.randn(2, 3)), ValueError, r"w_hr must have shape \(3, 3\)"),
        (dict(lengths=torch.tensor([4, 5])), ValueError, r"lengths must lie in \[0, 4\]"),
        (dict(lengths=torch.tensor([4.0, 2.0])), ValueError, "lengths must be an integer"),
        (dict(b_hn=torch.randn(3)), ValueError, "b_hn is only for gru"),
        # as a torch.nn layer does; the primitive has no other answer for zero steps
        (dict(xg=torch.randn(0, 2, 12)), RuntimeError, "sequence length to be larger than 0"),
        (
            dict(xg=torch.randn(0, 2, 12), h0=torch.randn(2, 3), c0=torch.randn(2, 3)),
            RuntimeError,
            "sequence length to be larger than 0",
        ),
    ]
    for change, error, match in cases:
        args = dict(cell="lstm", xg=xg, w_hh=w) | change
        cell, xg_, w_ = args.pop("cell"), args.pop("xg"), args.pop("w_hh")
        with pytest.raises(error, match=match):
            gpurnn.recurrence(cell, xg_, w_, **args, backend=backend)
    device = device_for(backend)
    y, h_T, c_T = gpurnn.recurrence("lstm", xg.to(device), w.to(device), backend=backend)
    assert y.shape == (4, 2, 3) and h_T.shape == c_T.shape == (2, 3)  # the good call
