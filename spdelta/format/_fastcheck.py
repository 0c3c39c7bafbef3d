"""A fast pre-check of one entry; the full ``check_entry`` runs only when it fails.

Streaming tools read and write tens of millions of entries; the complete checks of
``spdelta.delta.check_entry`` (per-element masks to count every problem) cost several
passes over the data. This check needs one or two vectorised reductions and never
accepts an invalid entry: it answers ``True`` only when every rule V5-V10 holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spdelta.delta import SEPARATOR, check_entry, numel_of
from spdelta.errors import FormatError
from spdelta.types import Shape

__all__ = ["entry_problems", "entry_valid", "index_problems"]


def _shape_ok(shape: object) -> bool:
    return isinstance(shape, tuple) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    )


def entry_valid(
    name: str, shape: Shape, indices: Tensor, values: Tensor, *, increasing: bool = False,
    any_values: bool = False,
) -> bool:
    """Whether the entry certainly satisfies V5-V10 (``increasing``: order is known).

    With ``any_values`` (replacement values, spec V10) the values' dtype and bits are not
    checked, only their rank and length.

    Example:
        >>> entry_valid("w", (4,), torch.tensor([1, 3]), torch.tensor([0.5, 1.0]))
        True
        >>> entry_valid("w", (4,), torch.tensor([3, 1]), torch.tensor([0.5, float("nan")]))
        False
    """
    if not (isinstance(name, str) and name and SEPARATOR not in name and _shape_ok(shape)):
        return False
    if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
        return False
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        return False
    if not (any_values or values.dtype.is_floating_point):
        return False
    if indices.numel() == 0:
        return True
    if int(indices[0]) < 0 or int(indices[-1]) >= numel_of(shape):
        return False
    if not increasing and indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        return False
    return any_values or bool(torch.isfinite(values.abs().amax()))  # amax propagates NaN


def entry_problems(
    name: str, shape: Shape, indices: Tensor, values: Tensor, *, increasing: bool = False
) -> list[FormatError]:
    """``check_entry``'s problems, computed only when the fast check fails."""
    if entry_valid(name, shape, indices, values, increasing=increasing):
        return []
    return check_entry(name, shape, indices, values)


def index_problems(
    name: str, shape: Shape, indices: Tensor, *, increasing: bool = False
) -> list[FormatError]:
    """The problems of an entry whose values V10 does not constrain (quantized codes, checked
    apart, and replacement values): name, shape and indices (V5-V9) only.

    Example:
        >>> index_problems("w", (4,), torch.tensor([1, 3]))
        []
    """
    if entry_valid(name, shape, indices, indices, increasing=increasing, any_values=True):
        return []
    return check_entry(name, shape, indices, torch.zeros(indices.shape))
