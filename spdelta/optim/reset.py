"""Optimizer state across support changes: survivors keep their state, newcomers get 0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from spdelta._ranks import full_tensor, shard_like
from spdelta.errors import KeyMismatchError, SpdeltaError, format_names
from spdelta.optim._base import is_state, state_fields
from spdelta.types import Support

__all__ = ["locate", "remap_state", "remap_values"]


def locate(old: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """Find each entry of ``new`` in ``old`` (both sorted, unique int64).

    Vectorised with ``torch.searchsorted``: ``O(len(new) * log len(old))``, no Python
    loop over entries.

    Args:
        old: 1-D int64, strictly increasing.
        new: 1-D int64, strictly increasing.

    Returns:
        ``(position, found)``: int64 positions into ``old`` (clamped into range; only
        meaningful where ``found``) and a bool mask, both shaped like ``new``.

    Example:
        >>> import torch
        >>> pos, found = locate(torch.tensor([2, 5, 9]), torch.tensor([1, 5, 9]))
        >>> pos.tolist(), found.tolist()
        ([0, 1, 2], [False, True, True])
    """
    if old.numel() == 0:
        return torch.zeros_like(new), torch.zeros(new.shape, dtype=torch.bool, device=new.device)
    pos = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)
    return pos, old[pos] == new


def remap_values(values: Tensor, old: Tensor, new: Tensor) -> Tensor:
    """Re-align per-entry ``values`` from support ``old`` to support ``new``; new entries get 0.

    Args:
        values: 1-D tensor aligned with ``old``.
        old: 1-D int64 sorted unique indices.
        new: 1-D int64 sorted unique indices.

    Returns:
        A new 1-D tensor aligned with ``new``, ``values``' dtype and device.

    Example:
        >>> import torch
        >>> old, new = torch.tensor([3, 7]), torch.tensor([0, 7])
        >>> remap_values(torch.tensor([1.0, 2.0]), old, new).tolist()
        [0.0, 2.0]
    """
    pos, found = locate(old, new)
    if values.numel() == 0:
        return torch.zeros(new.shape, dtype=values.dtype, device=values.device)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(found, values[pos], zero)


def _check(old: Support, new: Support) -> None:
    if old.keys() != new.keys():
        raise KeyMismatchError(f"old and new supports must name the same tensors; differ in "
                               f"[{format_names(old.keys() ^ new.keys())}].")


def remap_state(state: Any, old: Support, new: Support) -> Any:
    """Move an optimizer state from support ``old`` to support ``new``.

    Generic over the state's type: a ``NamedTuple`` state says which of its fields
    follow the support (:func:`~spdelta.optim.state_fields`). Its
    :data:`~spdelta.optim.EntryValues` fields are remapped entry by entry with
    :func:`remap_values` (survivors keep their state, newcomers start at 0), its
    :data:`~spdelta.optim.StateSupport` fields become ``new``, and every other field
    (a step count, SM3's row/column accumulators) is kept. Tuples of states (from
    :func:`~spdelta.optim.chain`) are remapped item by item; ``None`` passes through.
    Tensors absent from ``new`` are kept as they are.

    Sharded states (FSDP2 DTensors, identical supports on every rank): each per-entry
    tensor is gathered whole, remapped and resharded like before, one at a time.

    Args:
        state: An optimizer state aligned with ``old``.
        old: Name -> sorted unique int64 indices.
        new: Name -> sorted unique int64 indices (same names as ``old``).

    Returns:
        The state aligned with ``new`` (a new object; the input is untouched).

    Raises:
        SpdeltaError: ``state`` is neither ``None``, a tuple nor a ``NamedTuple``.
        KeyMismatchError: ``old`` and ``new`` name different tensors.

    Example:
        >>> import torch
        >>> from spdelta.optim import adamw, chain
        >>> opt = chain(adamw(0.1))
        >>> s = opt.init({"w": torch.ones(2)})
        >>> out = remap_state(s, {"w": torch.tensor([0, 1])}, {"w": torch.tensor([1, 2])})
        >>> out[0].mu["w"].tolist()
        [0.0, 0.0]
    """
    _check(old, new)

    def entry(n: str, t: Tensor) -> Tensor:
        return shard_like(remap_values(full_tensor(t), old[n], new[n]), t) if n in new else t

    return _remap(state, entry, new)


def _remap(state: Any, entry: Callable[[str, Tensor], Tensor], new: Support) -> Any:
    if state is None:
        return None
    if type(state) is tuple:
        return tuple(_remap(s, entry, new) for s in state)
    if not is_state(state):
        raise SpdeltaError(f"remap_state: an optimizer state must be None, a tuple of states or a "
                           f"NamedTuple; found a {type(state).__name__}.")
    cls: type = type(state)
    per_entry, supports = state_fields(cls)
    changes = {f: {n: entry(n, t) for n, t in getattr(state, f).items()} for f in per_entry}
    changes.update({f: {n: new.get(n, s) for n, s in getattr(state, f).items()}
                    for f in supports})
    return state._replace(**changes)
