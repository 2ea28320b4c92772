"""`gpurnn.convert(model)`: swap every torch.nn recurrent module inside a model for gpurnn's."""

from __future__ import annotations

from torch import nn

from gpurnn import modules

# exact classes only: a user's subclass may override forward, and converting it would
# silently drop that
_LAYERS = {nn.RNN: modules.RNN, nn.LSTM: modules.LSTM, nn.GRU: modules.GRU}
_CELLS = {nn.RNNCell: modules.RNNCell, nn.LSTMCell: modules.LSTMCell, nn.GRUCell: modules.GRUCell}


def _converted(module: nn.Module, backend: str | None) -> nn.Module | None:
    cls = type(module)
    if cls in _LAYERS:
        kwargs = dict(
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
        )
        if cls is nn.RNN:
            kwargs["nonlinearity"] = module.nonlinearity
        if cls is nn.LSTM:
            kwargs["proj_size"] = module.proj_size
        new = _LAYERS[cls](
            module.input_size, module.hidden_size, **kwargs, device="meta", backend=backend
        )
    elif cls in _CELLS:
        kwargs = {"nonlinearity": module.nonlinearity} if cls is nn.RNNCell else {}
        new = _CELLS[cls](
            module.input_size,
            module.hidden_size,
            bias=module.bias,
            **kwargs,
            device="meta",
            backend=backend,
        )
    else:
        return None
    # Reuse the very Parameter objects: no copy, same device and dtype, and optimizers or
    # tied weights that hold them keep working.
    for name, param in module.named_parameters(recurse=False):
        setattr(new, name, param)
    if isinstance(new, nn.RNNBase):
        new._init_flat_weights()
    new.train(module.training)
    return new


def convert(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Replaces, in place, every torch.nn RNN/LSTM/GRU and RNNCell/LSTMCell/GRUCell inside
    `model` by its gpurnn twin sharing the same parameters, and returns the model (or the
    twin, when `model` itself is one of those modules). A module reachable from several
    places (a shared encoder) is converted once: the same twin takes every place. Forward
    hooks registered on the replaced modules are not carried over."""
    top = _converted(model, backend)
    if top is not None:
        return top
    twins: dict[int, nn.Module] = {}  # id(torch.nn module) -> its one twin
    for parent in list(model.modules()):  # each parent once, even when shared
        # not named_children(), which lists a child held under two names only once
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in twins:
                new = _converted(child, backend)
                if new is None:
                    continue
                twins[id(child)] = new
            setattr(parent, name, twins[id(child)])
    return model


__all__ = ["convert"]
