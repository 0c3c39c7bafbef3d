"""Serving many sparse deltas on one base model: a delta per row of a batch, and hot-swap.

Example:
    >>> import torch
    >>> from spdelta import SparseDelta
    >>> from spdelta.serve import DeltaModel
    >>> base = torch.nn.Linear(3, 2, bias=False)
    >>> d = SparseDelta({"weight": ((2, 3), torch.tensor([0]), torch.tensor([2.0]))})
    >>> dm = DeltaModel(base, {"task": d})
    >>> dm.names, dm.active
    (['task'], None)
"""

from spdelta.serve._load import ServeError
from spdelta.serve._nf4 import quantize_nf4
from spdelta.serve.model import DeltaModel
from spdelta.serve.text import TextServer

__all__ = ["DeltaModel", "ServeError", "TextServer", "quantize_nf4"]
