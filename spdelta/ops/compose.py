"""Linear algebra on sparse deltas: ``compose``/``add``, ``scale``, ``negate``, ``prune``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from spdelta.delta import DeltaTensor, SparseDelta
from spdelta.errors import ParameterError
from spdelta.ops._common import check_fraction, check_real, check_shapes, union_sum
from spdelta.rules import budget, topk_indices

__all__ = ["add", "compose", "drop_zeros", "negate", "prune", "prune_tensor", "scale"]


def compose(*deltas: SparseDelta) -> SparseDelta:
    """Sum several deltas: the union of their supports, values summed.

    For each tensor name in any input, the result holds the sorted union of the
    supports and ``sum_i values_i`` at each index (an input without the name adds
    nothing). Sums run in fp32 (fp64 for fp64 inputs) and are cast to the promoted
    dtype of the values of the inputs that have the name (promotion is per tensor).
    Entries that cancel to exactly 0 are kept, so the support of the result is always
    the union (use :func:`drop_zeros` to remove them).
    The result has no metadata.

    Args:
        *deltas: One or more deltas; a name shared by several must have one shape.

    Returns:
        A new ``SparseDelta``; the inputs are not modified.

    Raises:
        ParameterError: No delta was given, or an argument is not a ``SparseDelta``.
        ShapeError: Two deltas give one tensor name different shapes.

    Example:
        >>> import torch
        >>> a = SparseDelta({"w": ((4,), torch.tensor([0, 2]), torch.tensor([1.0, 2.0]))})
        >>> b = SparseDelta({"w": ((4,), torch.tensor([2, 3]), torch.tensor([0.5, -1.0]))})
        >>> c = compose(a, b)
        >>> c["w"].indices.tolist(), c["w"].values.tolist()
        ([0, 2, 3], [1.0, 2.5, -1.0])
    """
    if not deltas:
        raise ParameterError("compose: pass at least one SparseDelta.")
    shapes = check_shapes("compose", deltas)
    entries = {}
    for name, shape in shapes.items():
        parts = [d[name] for d in deltas if name in d]
        idx, val = union_sum([p.indices for p in parts], [p.values for p in parts])
        entries[name] = DeltaTensor(shape, idx, val)
    return SparseDelta._trusted(entries, {})


def add(a: SparseDelta, b: SparseDelta) -> SparseDelta:
    """Return ``a + b``: :func:`compose` of two deltas.

    Args:
        a: First delta.
        b: Second delta; shared names must have the same shape as in ``a``.

    Returns:
        A new ``SparseDelta`` on the union of the supports.

    Raises:
        ShapeError: ``a`` and ``b`` give one tensor name different shapes.

    Example:
        >>> import torch
        >>> a = SparseDelta({"w": ((2,), torch.tensor([1]), torch.tensor([1.0]))})
        >>> add(a, a)["w"].values.tolist()
        [2.0]
    """
    return compose(a, b)


def _map_values(delta: SparseDelta, fn: Callable[[Tensor], Tensor]) -> SparseDelta:
    entries = {n: DeltaTensor(e.shape, e.indices, fn(e.values)) for n, e in delta.items()}
    return SparseDelta._trusted(entries, delta.metadata)


def scale(delta: SparseDelta, factor: float) -> SparseDelta:
    """Return ``factor * delta``: same support, values multiplied (dtype kept).

    Args:
        delta: The delta to scale.
        factor: A finite real number; 0 keeps the support with zero values.

    Returns:
        A new ``SparseDelta`` with the input's metadata.

    Raises:
        ParameterError: ``factor`` is not a finite real number.

    Example:
        >>> import torch
        >>> d = SparseDelta({"w": ((2,), torch.tensor([1]), torch.tensor([1.5]))})
        >>> scale(d, -2.0)["w"].values.tolist()
        [-3.0]
    """
    f = check_real("scale", "factor", factor)
    return _map_values(delta, lambda v: v * f)


def negate(delta: SparseDelta) -> SparseDelta:
    """Return ``-delta`` (exact: ``negate(negate(d)) == d``).

    Args:
        delta: The delta to negate.

    Returns:
        A new ``SparseDelta`` with the input's metadata.

    Example:
        >>> import torch
        >>> d = SparseDelta({"w": ((2,), torch.tensor([1]), torch.tensor([1.5]))})
        >>> negate(d)["w"].values.tolist()
        [-1.5]
    """
    return _map_values(delta, torch.neg)


def prune_tensor(indices: Tensor, values: Tensor, *, k: int) -> tuple[Tensor, Tensor]:
    """Per-tensor kernel: keep the ``k`` entries of largest ``|value|``; ties to the lower index.

    Args:
        indices: 1-D int64 sorted flat indices.
        values: Matching 1-D float values.
        k: Entries to keep (capped at ``len(values)``; <= 0 keeps none).

    Returns:
        ``(indices, values)`` of the kept entries, still sorted, dtype kept.

    Example:
        >>> i, v = prune_tensor(torch.tensor([0, 5, 9]), torch.tensor([1.0, -3.0, 2.0]), k=2)
        >>> i.tolist(), v.tolist()
        ([5, 9], [-3.0, 2.0])
    """
    if k >= values.numel():
        return indices, values
    keep = topk_indices(values.abs(), k)
    return indices[keep], values[keep]


def prune(delta: SparseDelta, *, k: int | None = None, density: float | None = None) -> SparseDelta:
    """Keep, per tensor, the top entries by ``|value|`` (magnitude pruning).

    With ``k``, each tensor keeps ``min(k, nnz)`` entries; with ``density``, it keeps
    ``min(nnz, floor(density * numel + 0.5))`` entries, where ``numel`` is the number
    of elements of the dense tensor (the rounding of :meth:`SparseDelta.from_dense`).
    Ties go to the lower flat index.

    Args:
        delta: The delta to prune.
        k: Entries to keep per tensor, an int >= 0.
        density: Fraction in ``[0, 1]`` of the dense tensor's elements to keep.

    Returns:
        A new ``SparseDelta`` with the input's metadata and value dtypes.

    Raises:
        ParameterError: Neither or both of ``k`` and ``density``, or one is out of range.

    Example:
        >>> import torch
        >>> v = torch.tensor([1.0, -4.0, 2.0])
        >>> d = SparseDelta({"w": ((2, 2), torch.tensor([0, 1, 3]), v)})
        >>> prune(d, density=0.5)["w"].indices.tolist()
        [1, 3]

    References:
        Han et al., "Learning both Weights and Connections for Efficient Neural Networks",
        NeurIPS 2015, https://arxiv.org/abs/1506.02626
    """
    if (k is None) == (density is None):
        raise ParameterError("prune: pass exactly one of k= or density=.")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise ParameterError(f"prune: k must be an int >= 0; found {k!r}.")
    frac = None if density is None else check_fraction("prune", "density", density)
    entries = {}
    for name, e in delta.items():
        kk = k if frac is None else budget(frac, e.numel)
        idx, val = prune_tensor(e.indices, e.values, k=kk)  # type: ignore[arg-type]
        entries[name] = DeltaTensor(e.shape, idx, val)
    return SparseDelta._trusted(entries, delta.metadata)


def drop_zeros(delta: SparseDelta) -> SparseDelta:
    """Remove stored entries whose value is exactly 0 (tensors stay, possibly empty).

    Args:
        delta: The delta to clean.

    Returns:
        A new ``SparseDelta`` with the input's metadata.

    Example:
        >>> import torch
        >>> d = SparseDelta({"w": ((3,), torch.tensor([0, 2]), torch.tensor([0.0, 1.0]))})
        >>> drop_zeros(d)["w"].indices.tolist()
        [2]
    """
    entries = {}
    for name, e in delta.items():
        keep = e.values != 0
        entries[name] = DeltaTensor(e.shape, e.indices[keep], e.values[keep])
    return SparseDelta._trusted(entries, delta.metadata)
