"""gpurnn: fused GPU kernels for recurrent networks, drop-in for torch.nn.

import gpurnn
lstm = gpurnn.LSTM(512, 512, num_layers=2, batch_first=True)   # as torch.nn.LSTM
model = gpurnn.convert(model)          # or swap every torch.nn RNN inside a model
with gpurnn.use_backend("numpy"): ...  # run on the float64 reference
"""

from gpurnn import reference
from gpurnn.backends import available_backends, use_backend
from gpurnn.convert import convert
from gpurnn.modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from gpurnn.recurrence import recurrence

__version__ = "0.1.0"

__all__ = [
    "RNN",
    "LSTM",
    "GRU",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "convert",
    "recurrence",
    "use_backend",
    "available_backends",
    "reference",
]
