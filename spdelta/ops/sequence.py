"""Sequential composition with replacement tensors (spec §6.5): ``first`` then ``second``.

Composing two entries of one tensor gives the entry that, applied once, does what
applying ``first`` and then ``second`` does (spec §6.4):

- add then add: the sum on the union of the supports (:func:`~spdelta.ops.union_sum`);
- set then set: the union of the supports, ``second``'s value where both have one (exact);
- add then set: ``second``, when its support covers ``first``'s; otherwise the result
  needs the base's values and the composition is refused;
- set then add: ``first`` with ``second`` added at its entries (``cast(acc(v1) + acc(v2))``,
  as §6.4 computes), when ``second``'s support lies within ``first``'s and the dtype is
  floating; otherwise refused.

Example:
    >>> import torch
    >>> from spdelta import DeltaTensor
    >>> from spdelta.patch import ReplaceTensor
    >>> a = ReplaceTensor((4,), torch.tensor([0, 2]), torch.tensor([1.0, 2.0]))
    >>> b = ReplaceTensor((4,), torch.tensor([2, 3]), torch.tensor([5.0, 6.0]))
    >>> c = then_tensor("w", a, b)
    >>> c.indices.tolist(), c.values.tolist()
    ([0, 2, 3], [1.0, 5.0, 6.0])
    >>> then_tensor("w", c, DeltaTensor((4,), torch.tensor([3]), torch.tensor([0.5]))).values
    tensor([1.0000, 5.0000, 6.5000])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from spdelta._replace import Entry, ReplaceTensor, bit_view
from spdelta.delta import DeltaTensor
from spdelta.errors import CompositionError, ParameterError
from spdelta.ops._common import sorted_union, union_sum
from spdelta.rules import accumulate_dtype

__all__ = ["sequence_tensor", "then_tensor"]


def _set_then_set(name: str, first: ReplaceTensor, second: ReplaceTensor) -> ReplaceTensor:
    if first.values.dtype != second.values.dtype:
        raise CompositionError(
            f"{name!r}: replacement values of dtype {first.values.dtype} then "
            f"{second.values.dtype}; patches of one chain share each tensor's dtype "
            "(spec §6.5). Compose patches of one checkpoint lineage.")
    union, inverse = sorted_union([first.indices, second.indices])
    out = torch.empty(union.numel(), dtype=bit_view(first.values).dtype, device=union.device)
    out[inverse[: first.nnz]] = bit_view(first.values)
    out[inverse[first.nnz :]] = bit_view(second.values)  # the later patch wins
    return ReplaceTensor(first.shape, union, out.view(first.values.dtype))


def _covers(outer: Tensor, inner: Tensor) -> Tensor | None:
    """Positions of ``inner`` in sorted ``outer``, or ``None`` if some are missing."""
    if inner.numel() == 0:
        return inner
    pos = torch.searchsorted(outer, inner)
    if outer.numel() == 0 or bool((pos >= outer.numel()).any()):
        return None
    return pos if bool((outer[pos] == inner).all()) else None


def _set_then_add(name: str, first: ReplaceTensor, second: DeltaTensor) -> ReplaceTensor:
    pos = _covers(first.indices, second.indices)
    dtype = first.values.dtype
    if pos is None or not dtype.is_floating_point:
        why = (f"its dtype {dtype} is not floating" if pos is not None else
               "the additive entry touches positions the replacement does not set")
        raise CompositionError(
            f"{name!r}: a replacement followed by an additive delta cannot be composed: {why}, "
            "so the result depends on the base (spec §6.5). Apply the files in order instead.")
    acc = accumulate_dtype(dtype)
    values = first.values.clone()
    values[pos] = (values[pos].to(acc) + second.values.to(acc)).to(dtype)
    return ReplaceTensor(first.shape, first.indices, values)


def then_tensor(name: str, first: Entry, second: Entry) -> Entry:
    """The entry equal to applying ``first`` and then ``second`` to one tensor (spec §6.5).

    Args:
        name: Tensor name (for messages).
        first: Applied first: a ``DeltaTensor`` (added) or a ``ReplaceTensor`` (set).
        second: Applied next, same shape.

    Returns:
        A ``DeltaTensor`` when both add, else a ``ReplaceTensor``.

    Raises:
        CompositionError: The composition depends on the base's values (add then a set
            that does not cover it; set then an add outside it or on a non-float dtype),
            or two replacements disagree on the dtype.
        ParameterError: The shapes differ.

    Example:
        >>> import torch
        >>> from spdelta import DeltaTensor
        >>> a = DeltaTensor((3,), torch.tensor([1]), torch.tensor([1.0]))
        >>> then_tensor("w", a, a).values.tolist()
        [2.0]
    """
    if tuple(first.shape) != tuple(second.shape):
        raise ParameterError(f"{name!r}: cannot compose entries of shapes {list(first.shape)} "
                             f"and {list(second.shape)}; they address different tensors.")
    if isinstance(first, DeltaTensor) and isinstance(second, DeltaTensor):
        i, v = union_sum([first.indices, second.indices], [first.values, second.values])
        return DeltaTensor(first.shape, i, v)
    if isinstance(first, ReplaceTensor) and isinstance(second, ReplaceTensor):
        return _set_then_set(name, first, second)
    if isinstance(first, ReplaceTensor):
        assert isinstance(second, DeltaTensor)
        return _set_then_add(name, first, second)
    if _covers(second.indices, first.indices) is None:
        raise CompositionError(
            f"{name!r}: an additive delta followed by a replacement that does not cover its "
            f"{first.nnz} entries cannot be composed: the result depends on the base "
            "(spec §6.5). Apply the files in order instead.")
    return second


def sequence_tensor(name: str, entries: Sequence[Entry | None]) -> Entry:
    """:func:`then_tensor` folded over ``entries`` in order; ``None`` (absent) is skipped.

    A run of consecutive additive entries is summed at once (one cast, as
    :func:`spdelta.ops.compose` does), so additive inputs compose exactly as before 1.3.

    Raises:
        ParameterError: No entry is present.
        CompositionError: As :func:`then_tensor`.

    Example:
        >>> import torch
        >>> from spdelta.patch import ReplaceTensor
        >>> a = ReplaceTensor((2,), torch.tensor([0]), torch.tensor([7]))
        >>> sequence_tensor("w", [a, None]).values.tolist()
        [7]
    """
    present = [e for e in entries if e is not None]
    if not present:
        raise ParameterError(f"{name!r}: no input has this tensor.")
    runs: list[list[DeltaTensor] | ReplaceTensor] = []  # additive runs are summed at once
    for e in present:
        last = runs[-1] if runs else None
        if isinstance(e, DeltaTensor) and isinstance(last, list):
            last.append(e)
        else:
            runs.append([e] if isinstance(e, DeltaTensor) else e)
    out: Entry | None = None
    for run in runs:
        step: Entry = run if isinstance(run, ReplaceTensor) else _sum(run)
        out = step if out is None else then_tensor(name, out, step)
    assert out is not None
    return out


def _sum(run: list[DeltaTensor]) -> DeltaTensor:
    i, v = union_sum([e.indices for e in run], [e.values for e in run])
    return DeltaTensor(run[0].shape, i, v)
