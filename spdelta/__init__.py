"""spdelta: sparse fine-tuning in pure PyTorch, and a small versioned file of sparse deltas.

Example:
    >>> import torch, spdelta
    >>> d = spdelta.SparseDelta.from_dense({"w": torch.tensor([0.0, 2.0, -1.0])}, k=1)
    >>> spdelta.apply_delta({"w": torch.ones(3)}, d)["w"].tolist()
    [1.0, 3.0, 1.0]
"""

from spdelta import errors, ops, optim, salience, train
from spdelta._version import __version__
from spdelta.delta import DeltaTensor, SparseDelta
from spdelta.format import FORMAT_VERSION, load_delta, read_header, save_delta, validate_file
from spdelta.functional import apply_delta, make_loss_fn
from spdelta.ops import compose, dequantize, merge, quantize
from spdelta.select import select_topk
from spdelta.targets import resolve_targets
from spdelta.train import speft, spiel

__all__ = [
    "DeltaTensor",
    "FORMAT_VERSION",
    "SparseDelta",
    "__version__",
    "apply_delta",
    "compose",
    "dequantize",
    "errors",
    "load_delta",
    "make_loss_fn",
    "merge",
    "ops",
    "optim",
    "quantize",
    "read_header",
    "resolve_targets",
    "salience",
    "save_delta",
    "select_topk",
    "speft",
    "spiel",
    "train",
    "validate_file",
]
