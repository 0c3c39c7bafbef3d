"""Per-tensor merge kernels: task arithmetic, magnitude, TIES, DARE, DARE-TIES, breadcrumbs.

Each kernel has the signature documented in :mod:`spdelta.ops.merge`::

    kernel(indices, values, *, numel, weights, densities, generator=None, **params)
        -> (indices, values)

and trusts its arguments (:func:`spdelta.ops.merge.merge_tensor` validates them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from spdelta.errors import ParameterError
from spdelta.ops._common import promoted_dtype, sorted_union, union_sum
from spdelta.ops.sparsify import drop_random, trim_magnitude, trim_outliers
from spdelta.rules import accumulate_dtype

__all__ = [
    "breadcrumbs_tensor",
    "dare_tensor",
    "dare_ties_tensor",
    "magnitude_tensor",
    "task_arithmetic_tensor",
    "ties_tensor",
]

Pair = tuple[Tensor, Tensor]


def _to_acc(values: Sequence[Tensor]) -> tuple[list[Tensor], torch.dtype]:
    dtype = promoted_dtype(values)
    return [v.to(accumulate_dtype(dtype)) for v in values], dtype


def _trimmed(indices: Sequence[Tensor], values: Sequence[Tensor], numel: int,
             densities: Sequence[float]) -> tuple[list[Tensor], list[Tensor], torch.dtype]:
    """Each input's largest-magnitude ``density`` share (TIES "trim"), in the accumulation dtype."""
    acc, dtype = _to_acc(values)
    kept = [trim_magnitude(i, v, numel=numel, density=d)
            for i, v, d in zip(indices, acc, densities, strict=True)]
    return [k[0] for k in kept], [k[1] for k in kept], dtype


def _consensus(indices: Sequence[Tensor], values: Sequence[Tensor], weights: Sequence[float],
               *, normalize: bool) -> Pair:
    """TIES elect + disjoint merge (mergekit's ``get_mask(method="sum")`` semantics)."""
    device = indices[0].device
    union, inverse = sorted_union(indices)
    wv = torch.cat([v * w for v, w in zip(values, weights, strict=True)])  # (sum nnz,)
    zeros = torch.zeros(union.numel(), dtype=wv.dtype, device=device)
    total = zeros.index_add(0, inverse, wv)
    elected = torch.where(total >= 0, 1.0, -1.0).to(wv.dtype)  # a zero mass elects +
    agree = torch.sign(wv) == elected[inverse]
    merged = zeros.index_add(0, inverse, torch.where(agree, wv, 0.0))
    if normalize:
        w = torch.cat([torch.full_like(v, w) for v, w in zip(values, weights, strict=True)])
        den = zeros.index_add(0, inverse, torch.where(agree, w, 0.0))
        merged = merged / torch.where(den == 0, 1.0, den)
    return union, merged


def task_arithmetic_tensor(indices: Sequence[Tensor], values: Sequence[Tensor], *, numel: int,
                           weights: Sequence[float], densities: Sequence[float],
                           generator: torch.Generator | None = None) -> Pair:
    """Task arithmetic: ``tau = sum_i lambda_i * delta_i`` on the union of the supports.

    Args:
        indices: Per input, 1-D int64 sorted flat indices.
        values: Per input, matching 1-D float values.
        numel: Elements of the dense tensor (unused).
        weights: Per input, ``lambda_i`` (any finite real; default 1 in :func:`merge`).
        densities: Unused (``merge`` rejects a density for this method).
        generator: Unused.

    Returns:
        ``(indices, values)`` of the merged tensor.

    Example:
        >>> i, v = task_arithmetic_tensor([torch.tensor([0]), torch.tensor([0, 1])],
        ...     [torch.tensor([1.0]), torch.tensor([1.0, 2.0])], numel=2,
        ...     weights=[0.5, 1.0], densities=[1.0, 1.0])
        >>> v.tolist()
        [1.5, 2.0]

    References:
        Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
        https://arxiv.org/abs/2212.04089
    """
    del numel, densities, generator
    return union_sum(indices, values, weights)


def magnitude_tensor(indices: Sequence[Tensor], values: Sequence[Tensor], *, numel: int,
                     weights: Sequence[float], densities: Sequence[float],
                     generator: torch.Generator | None = None) -> Pair:
    """Magnitude pruning then task arithmetic: ``sum_i lambda_i * topk(delta_i, d_i * numel)``.

    Each input keeps its ``floor(d_i * numel + 0.5)`` largest-``|value|`` entries
    (:func:`~spdelta.ops.sparsify.trim_magnitude`); this is TIES without sign election,
    mergekit's task arithmetic with ``sparsification_method: magnitude``.

    Args:
        indices: Per input, 1-D int64 sorted flat indices.
        values: Per input, matching 1-D float values.
        numel: Elements of the dense tensor.
        weights: Per input, ``lambda_i``.
        densities: Per input, ``d_i`` in ``[0, 1]``, a fraction of ``numel``.
        generator: Unused.

    Returns:
        ``(indices, values)`` of the merged tensor.

    Example:
        >>> i, v = magnitude_tensor([torch.tensor([0, 1])], [torch.tensor([1.0, -2.0])],
        ...     numel=2, weights=[1.0], densities=[0.5])
        >>> i.tolist(), v.tolist()
        ([1], [-2.0])

    References:
        Han et al., "Learning both Weights and Connections for Efficient Neural Networks",
        NeurIPS 2015, https://arxiv.org/abs/1506.02626
    """
    del generator
    kept_i, kept_v, dtype = _trimmed(indices, values, numel, densities)
    idx, val = union_sum(kept_i, kept_v, weights)
    return idx, val.to(dtype)


def ties_tensor(indices: Sequence[Tensor], values: Sequence[Tensor], *, numel: int,
                weights: Sequence[float], densities: Sequence[float],
                generator: torch.Generator | None = None, normalize: bool = True) -> Pair:
    """TIES: trim, elect sign, disjoint merge.

    1. Trim: ``t_i = topk(delta_i, d_i * numel)`` by ``|value|`` (as ``magnitude``).
    2. Elect: ``s = +1 if sum_i lambda_i t_i >= 0 else -1`` per entry (total mass).
    3. Disjoint merge: ``A = {i : sign(lambda_i t_i) = s}`` per entry and
       ``tau = sum_{i in A} lambda_i t_i / sum_{i in A} lambda_i`` (``normalize=True``,
       a weighted disjoint mean: the paper's mean when all ``lambda_i = 1``; a zero
       divisor becomes 1) or ``tau = sum_{i in A} lambda_i t_i`` (``normalize=False``).

    This is mergekit's ``ties`` (``consensus_method: sum``); its global ``lambda`` is
    :func:`spdelta.ops.scale` applied to the result.

    Args:
        indices: Per input, 1-D int64 sorted flat indices.
        values: Per input, matching 1-D float values.
        numel: Elements of the dense tensor.
        weights: Per input, ``lambda_i`` (> 0 when ``normalize``).
        densities: Per input, ``d_i`` in ``[0, 1]``, a fraction of ``numel``.
        generator: Unused.
        normalize: Divide by the sum of the agreeing weights.

    Returns:
        ``(indices, values)`` on the union of the trimmed supports.

    Example:
        >>> i, v = ties_tensor([torch.tensor([0, 1]), torch.tensor([0, 1])],
        ...     [torch.tensor([2.0, 1.0]), torch.tensor([-1.0, 3.0])], numel=2,
        ...     weights=[1.0, 1.0], densities=[1.0, 1.0])
        >>> v.tolist()
        [2.0, 2.0]

    References:
        Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
        NeurIPS 2023, https://arxiv.org/abs/2306.01708
    """
    del generator
    kept_i, kept_v, dtype = _trimmed(indices, values, numel, densities)
    idx, val = _consensus(kept_i, kept_v, weights, normalize=normalize)
    return idx, val.to(dtype)


def _dare(indices: Sequence[Tensor], values: Sequence[Tensor], densities: Sequence[float],
          generator: torch.Generator | None) -> tuple[list[Tensor], list[Tensor], torch.dtype]:
    if generator is None:
        raise ParameterError("DARE draws random masks: pass generator= (merge: seed=).")
    acc, dtype = _to_acc(values)
    kept = [drop_random(i, v, density=d, generator=generator)
            for i, v, d in zip(indices, acc, densities, strict=True)]
    return [k[0] for k in kept], [k[1] for k in kept], dtype


def dare_tensor(indices: Sequence[Tensor], values: Sequence[Tensor], *, numel: int,
                weights: Sequence[float], densities: Sequence[float],
                generator: torch.Generator | None = None) -> Pair:
    """DARE: ``tau = sum_i lambda_i * (m_i * delta_i) / d_i`` with ``m_i ~ Bernoulli(d_i)``.

    Each stored entry of input ``i`` is dropped with probability ``p_i = 1 - d_i`` and the
    survivors are rescaled by ``1 / (1 - p_i)``
    (:func:`~spdelta.ops.sparsify.drop_random`); then task arithmetic. Inputs draw from
    ``generator`` in input order, one float64 per stored entry.

    Args:
        indices: Per input, 1-D int64 sorted flat indices.
        values: Per input, matching 1-D float values.
        numel: Elements of the dense tensor (unused).
        weights: Per input, ``lambda_i``.
        densities: Per input, keep probability ``d_i = 1 - p_i`` in ``[0, 1]``.
        generator: Required source of randomness.

    Returns:
        ``(indices, values)`` on the union of the surviving entries.

    Raises:
        ParameterError: ``generator`` is ``None``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> i, v = dare_tensor([torch.tensor([3])], [torch.tensor([1.0])], numel=4,
        ...     weights=[1.0], densities=[1.0], generator=g)
        >>> i.tolist(), v.tolist()
        ([3], [1.0])

    References:
        Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
        Models as a Free Lunch", ICML 2024, https://arxiv.org/abs/2311.03099
    """
    del numel
    idx, val, dtype = _dare(indices, values, densities, generator)
    i, v = union_sum(idx, val, weights)
    return i, v.to(dtype)


def dare_ties_tensor(indices: Sequence[Tensor], values: Sequence[Tensor], *, numel: int,
                     weights: Sequence[float], densities: Sequence[float],
                     generator: torch.Generator | None = None, normalize: bool = True) -> Pair:
    """DARE-TIES: DARE drop and rescale of each input, then TIES sign election and disjoint merge.

    ``t_i = m_i * delta_i / d_i`` with ``m_i ~ Bernoulli(d_i)`` (as ``dare``), then steps 2
    and 3 of ``ties`` on the ``t_i``. mergekit's ``dare_ties`` defaults to
    ``normalize: false`` and rescales by an L1-norm ratio instead of ``1 / d_i``; pass
    ``normalize=False`` to match its merge step.

    Args:
        indices: Per input, 1-D int64 sorted flat indices.
        values: Per input, matching 1-D float values.
        numel: Elements of the dense tensor (unused).
        weights: Per input, ``lambda_i`` (> 0 when ``normalize``).
        densities: Per input, keep probability ``d_i`` in ``[0, 1]``.
        generator: Required source of randomness.
        normalize: Divide by the sum of the agreeing weights.

    Returns:
        ``(indices, values)`` on the union of the surviving entries.

    Raises:
        ParameterError: ``generator`` is ``None``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> i, v = dare_ties_tensor([torch.tensor([0]), torch.tensor([0])],
        ...     [torch.tensor([1.0]), torch.tensor([-3.0])], numel=1,
        ...     weights=[1.0, 1.0], densities=[1.0, 1.0], generator=g)
        >>> v.tolist()
        [-3.0]

    References:
        Yu et al., https://arxiv.org/abs/2311.03099; Yadav et al., https://arxiv.org/abs/2306.01708
    """
    del numel
    idx, val, dtype = _dare(indices, values, densities, generator)
    i, v = _consensus(idx, val, weights, normalize=normalize)
    return i, v.to(dtype)


def breadcrumbs_tensor(indices: Sequence[Tensor], values: Sequence[Tensor], *, numel: int,
                       weights: Sequence[float], densities: Sequence[float],
                       generator: torch.Generator | None = None,
                       gamma: Sequence[float] = (0.01,)) -> Pair:
    """Model Breadcrumbs: drop each input's largest and smallest entries, then task arithmetic.

    ``tau = sum_i lambda_i * b_i`` where ``b_i`` keeps the entries of ``delta_i`` whose
    ``|value|`` rank (largest first, over the dense tensor) lies in ``[g_i, g_i + t_i)``,
    ``g_i = gamma_i * numel`` outliers removed and ``t_i = d_i * numel`` kept
    (:func:`~spdelta.ops.sparsify.trim_outliers`; as mergekit's ``breadcrumbs``).

    Args:
        indices: Per input, 1-D int64 sorted flat indices.
        values: Per input, matching 1-D float values.
        numel: Elements of the dense tensor.
        weights: Per input, ``lambda_i``.
        densities: Per input, ``d_i`` in ``[0, 1]``: the fraction of ``numel`` kept.
        generator: Unused.
        gamma: Per input (or one value), the fraction of ``numel`` removed from the top.

    Returns:
        ``(indices, values)`` on the union of the kept entries.

    Example:
        >>> i, v = breadcrumbs_tensor([torch.arange(4)], [torch.tensor([4.0, 3.0, 2.0, 1.0])],
        ...     numel=4, weights=[2.0], densities=[0.5], gamma=[0.25])
        >>> i.tolist(), v.tolist()
        ([1, 2], [6.0, 4.0])

    References:
        Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
        Sparse Masks", ECCV 2024, https://arxiv.org/abs/2312.06795
    """
    del generator
    acc, dtype = _to_acc(values)
    gammas = list(gamma) * len(values) if len(gamma) == 1 else list(gamma)
    kept = [trim_outliers(i, v, numel=numel, density=d, gamma=g)
            for i, v, d, g in zip(indices, acc, densities, gammas, strict=True)]
    idx, val = union_sum([k[0] for k in kept], [k[1] for k in kept], weights)
    return idx, val.to(dtype)
