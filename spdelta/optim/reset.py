"""Optimizer state across support changes: remap (survivors keep state, newcomers get 0), save."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spdelta.errors import KeyMismatchError, SpdeltaError, format_names
from spdelta.optim.adamw import AdamWState
from spdelta.optim.sm3 import SM3State
from spdelta.types import Support, Values

__all__ = ["locate", "remap_adamw_state", "remap_sm3_state", "remap_state", "remap_values",
           "state_from_tree", "state_to_tree"]


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


def _remap_dict(values: Values, old: Support, new: Support) -> Values:
    return {n: remap_values(v, old[n], new[n]) if n in new else v for n, v in values.items()}


def _check(old: Support, new: Support) -> None:
    if old.keys() != new.keys():
        raise KeyMismatchError(f"old and new supports must name the same tensors; differ in "
                               f"[{format_names(old.keys() ^ new.keys())}].")


def remap_adamw_state(state: AdamWState, old: Support, new: Support) -> AdamWState:
    """Move AdamW moments and step counts from support ``old`` to ``new``; newcomers get 0.

    Survivors keep their moments and their own step count. A newcomer starts with zero
    moments and step count 0, so its bias correction is that of a fresh Adam parameter
    (its first step is ``lr`` in size). Tensors absent from ``new`` are kept as they are.
    The global ``num_updates`` (the learning-rate schedule's step) is kept.

    Args:
        state: The state, aligned with ``old``.
        old: Name -> sorted unique int64 indices the state is aligned with.
        new: Name -> sorted unique int64 indices to align with (same names as ``old``).

    Returns:
        A new :class:`AdamWState`; the input is not modified.

    Raises:
        KeyMismatchError: ``old`` and ``new`` name different tensors.

    Example:
        >>> import torch
        >>> s = AdamWState({"w": torch.tensor([3, 2], dtype=torch.int32)},
        ...                {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([4.0, 5.0])})
        >>> r = remap_adamw_state(s, {"w": torch.tensor([0, 4])}, {"w": torch.tensor([4, 6])})
        >>> r.steps["w"].tolist(), r.mu["w"].tolist(), r.nu["w"].tolist()
        ([2, 0], [2.0, 0.0], [5.0, 0.0])
    """
    _check(old, new)
    return AdamWState(_remap_dict(state.steps, old, new), _remap_dict(state.mu, old, new),
                      _remap_dict(state.nu, old, new), state.num_updates)


def remap_sm3_state(state: SM3State, new: Support) -> SM3State:
    """Point an SM3 state at support ``new``: accumulators kept, momentum remapped.

    The row/column accumulators do not depend on the support, so they are kept as they
    are; the momentum buffer (if any) follows :func:`remap_values`.

    Args:
        state: The state; its ``support`` is the old support.
        new: Name -> sorted unique int64 indices (the same names as ``state.support``).

    Returns:
        A new :class:`~spdelta.optim.SM3State` whose ``support`` is ``new``.

    Raises:
        KeyMismatchError: ``new`` names different tensors than ``state.support``.

    Example:
        >>> import torch
        >>> s = SM3State(1, {"w": torch.tensor([1])}, {"w": (torch.ones(2),)}, {})
        >>> remap_sm3_state(s, {"w": torch.tensor([0])}).support["w"].tolist()
        [0]
    """
    _check(state.support, new)
    momentum = _remap_dict(state.momentum, state.support, new)
    return SM3State(state.steps, dict(new), state.accumulators, momentum)


def remap_state(state: Any, old: Support, new: Support) -> Any:
    """Remap any supported optimizer state from support ``old`` to ``new``.

    Handles :class:`AdamWState`, :class:`SM3State` and tuples of states (from
    :func:`~spdelta.optim.chain`), recursively; ``None`` and empty tuples pass through.

    Args:
        state: An optimizer state aligned with ``old``.
        old: Name -> sorted unique int64 indices.
        new: Name -> sorted unique int64 indices (same names as ``old``).

    Returns:
        The state aligned with ``new`` (a new object; the input is untouched).

    Raises:
        SpdeltaError: ``state`` is of a type this function does not know.
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
    if state is None:
        return None
    if isinstance(state, AdamWState):
        return remap_adamw_state(state, old, new)
    if isinstance(state, SM3State):
        return remap_sm3_state(state, new)
    if type(state) is tuple:
        return tuple(remap_state(s, old, new) for s in state)
    raise SpdeltaError(f"remap_state: cannot remap an optimizer state of type "
                       f"{type(state).__name__}; supported: AdamWState, SM3State, tuples of them.")


def state_to_tree(state: Any) -> Any:
    """Encode an optimizer state as plain dicts, lists, ints and tensors (for saving).

    The result holds no class, so it is stored as JSON plus tensors (safetensors) and
    read back without unpickling; :func:`state_from_tree` rebuilds the state. Handles
    :class:`AdamWState`, :class:`SM3State`, tuples of them and ``None``.

    Raises:
        SpdeltaError: ``state`` is of a type this function does not know.

    Example:
        >>> import torch
        >>> s = AdamWState({"w": torch.ones(1, dtype=torch.int32)}, {"w": torch.ones(1)},
        ...                {"w": torch.zeros(1)})
        >>> state_from_tree(state_to_tree(s)).steps["w"].tolist()
        [1]
    """
    if state is None:
        return None
    if isinstance(state, AdamWState):
        return {"type": "AdamWState", "steps": dict(state.steps), "mu": dict(state.mu),
                "nu": dict(state.nu), "count": int(state.num_updates)}
    if isinstance(state, SM3State):
        return {"type": "SM3State", "steps": state.steps, "support": dict(state.support),
                "accumulators": {n: list(a) for n, a in state.accumulators.items()},
                "momentum": dict(state.momentum)}
    if type(state) is tuple:
        return {"type": "tuple", "items": [state_to_tree(s) for s in state]}
    raise SpdeltaError(f"state_to_tree: cannot encode an optimizer state of type "
                       f"{type(state).__name__}; supported: AdamWState, SM3State, tuples of them.")


def _adamw_steps(tree: dict[str, Any]) -> Values:
    if "steps" in tree:
        return dict(tree["steps"])
    # Files written before per-entry step counts hold one shared ``count``.
    return {n: torch.full_like(m, int(tree["count"]), dtype=torch.int32)
            for n, m in tree["mu"].items()}


def _adamw_count(tree: dict[str, Any], steps: Values) -> int:
    if "count" in tree:  # the shared count of old files is this global count too
        return int(tree["count"])
    # Files with per-entry steps but no global count: the largest per-entry count is the
    # number of updates (exact unless regrowth replaced every entry of every tensor).
    return max((int(s.max()) for s in steps.values() if s.numel()), default=0)


def state_from_tree(tree: Any) -> Any:
    """Rebuild an optimizer state encoded by :func:`state_to_tree`.

    Raises:
        SpdeltaError: ``tree`` is not such an encoding.

    Example:
        >>> state_from_tree({"type": "tuple", "items": [None]})
        (None,)
    """
    if tree is None:
        return None
    kind = tree.get("type") if isinstance(tree, dict) else None
    if kind == "AdamWState":
        steps = _adamw_steps(tree)
        return AdamWState(steps, dict(tree["mu"]), dict(tree["nu"]), _adamw_count(tree, steps))
    if kind == "SM3State":
        return SM3State(int(tree.get("steps", tree.get("count"))), dict(tree["support"]),
                        {n: tuple(a) for n, a in tree["accumulators"].items()},
                        dict(tree["momentum"]))
    if kind == "tuple":
        return tuple(state_from_tree(s) for s in tree["items"])
    raise SpdeltaError(f"state_from_tree: not an encoded optimizer state (type {kind!r}); "
                       "the file may come from another tool or a newer spdelta.")
