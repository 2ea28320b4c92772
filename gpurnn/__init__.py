"""gpurnn: fused GPU kernels for recurrent networks, drop-in for torch.nn.

import gpurnn
lstm = gpurnn.LSTM(512, 512, num_layers=2, batch_first=True)   # as torch.nn.LSTM
model = gpurnn.convert(model)          # or swap every torch.nn RNN inside a model
with gpurnn.use_backend("numpy"): ...  # run on the float64 reference
"""

import importlib.util as _util
import pathlib as _pathlib
import sys as _sys

# The device code lives in the top-level kernels/ folder (kernels/triton: Triton kernels,
# kernels/cuda: CUDA sources for CuPy) and is imported as gpurnn.kernels. Installed,
# pyproject's package-dir maps the folder to that name. From a source checkout without
# installing (PYTHONPATH=.), there is no gpurnn/kernels folder to find, so register the
# same folder under the same name here; this is the only place that does it.
if "gpurnn.kernels" not in _sys.modules and _util.find_spec("gpurnn.kernels") is None:
    _kernels_dir = _pathlib.Path(__file__).resolve().parent.parent / "kernels"
    if (_kernels_dir / "__init__.py").is_file():
        _spec = _util.spec_from_file_location(
            "gpurnn.kernels",
            _kernels_dir / "__init__.py",
            submodule_search_locations=[str(_kernels_dir)],
        )
        _kernels = _sys.modules["gpurnn.kernels"] = _util.module_from_spec(_spec)
        _spec.loader.exec_module(_kernels)

from gpurnn import reference  # noqa: E402
from gpurnn.backends import available_backends, use_backend  # noqa: E402
from gpurnn.convert import convert  # noqa: E402
from gpurnn.indrnn import IndRNN  # noqa: E402
from gpurnn.modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell  # noqa: E402
from gpurnn.recurrence import recurrence  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "RNN",
    "LSTM",
    "GRU",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "IndRNN",
    "convert",
    "recurrence",
    "use_backend",
    "available_backends",
    "reference",
]
