"""Per-tensor sparsification kernels used by the merge methods: magnitude, DARE, breadcrumbs.

Each kernel takes the ``(indices, values)`` of one delta'd tensor and returns the
surviving ``(indices, values)``, still sorted, in the dtype of ``values``. Fractions
are relative to ``numel``, the number of elements of the dense tensor, as in mergekit
(``mergekit/sparsify.py``), so a sparse delta behaves like its dense equivalent.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spdelta.ops.compose import prune_tensor
from spdelta.rules import budget

__all__ = ["drop_random", "trim_magnitude", "trim_outliers"]


def trim_magnitude(
    indices: Tensor, values: Tensor, *, numel: int, density: float
) -> tuple[Tensor, Tensor]:
    """Keep the ``floor(density * numel + 0.5)`` entries of largest ``|value|`` (TIES "trim").

    Ties go to the lower flat index. When the budget exceeds ``nnz`` every entry is
    kept: the dense tensor's remaining top entries are zeros.

    Args:
        indices: 1-D int64 sorted flat indices.
        values: Matching 1-D float values.
        numel: Number of elements of the dense tensor.
        density: Fraction in ``[0, 1]`` of ``numel`` to keep.

    Returns:
        ``(indices, values)`` of the kept entries.

    Example:
        >>> i, v = trim_magnitude(torch.tensor([0, 1, 2]), torch.tensor([3.0, -1.0, 2.0]),
        ...                       numel=4, density=0.5)
        >>> i.tolist(), v.tolist()
        ([0, 2], [3.0, 2.0])
    """
    return prune_tensor(indices, values, k=budget(density, numel))


def drop_random(
    indices: Tensor, values: Tensor, *, density: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """DARE: keep each entry with probability ``density``, rescale survivors by ``1 / density``.

    ``density = 1 - p`` where ``p`` is the drop rate of the paper. One uniform float64
    draw per stored entry, in index order, from ``generator``: entry ``j`` survives when
    ``u_j < density``. ``density == 0`` drops everything; ``density == 1`` keeps
    everything unchanged.

    Args:
        indices: 1-D int64 sorted flat indices.
        values: Matching 1-D float values.
        density: Keep probability in ``[0, 1]``.
        generator: The source of randomness (on the device of ``values``).

    Returns:
        ``(indices, values / density)`` of the survivors.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> i, v = drop_random(torch.arange(4), torch.ones(4), density=1.0, generator=g)
        >>> v.tolist()
        [1.0, 1.0, 1.0, 1.0]

    References:
        Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
        Models as a Free Lunch", ICML 2024, https://arxiv.org/abs/2311.03099
    """
    u = torch.rand(values.numel(), generator=generator, dtype=torch.float64, device=values.device)
    keep = u < density
    if density == 0.0:
        return indices[keep], values[keep]
    return indices[keep], values[keep] / density


def trim_outliers(
    indices: Tensor, values: Tensor, *, numel: int, density: float, gamma: float
) -> tuple[Tensor, Tensor]:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction and the smallest, keep ``density``.

    Rank the ``numel`` entries of the dense tensor by ``|value|``, largest first (ties to
    the lower index; unstored zeros rank last). With ``t = floor(density * numel + 0.5)``
    and ``g = floor(gamma * numel + 0.5)``, keep the ranks ``[s, s + t)`` where
    ``s = min(g, numel - t)``: the ``g`` largest are removed as outliers, reduced when
    ``g + t > numel`` so that ``t`` entries remain (mergekit's ``magnitude_outliers``).

    Args:
        indices: 1-D int64 sorted flat indices.
        values: Matching 1-D float values.
        numel: Number of elements of the dense tensor.
        density: Fraction in ``[0, 1]`` of ``numel`` to keep.
        gamma: Fraction in ``[0, 1]`` of ``numel`` removed from the top (outliers).

    Returns:
        ``(indices, values)`` of the kept entries.

    Example:
        >>> i, v = trim_outliers(torch.arange(4), torch.tensor([4.0, 3.0, 2.0, 1.0]),
        ...                      numel=4, density=0.5, gamma=0.25)
        >>> i.tolist()
        [1, 2]

    References:
        Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
        Sparse Masks", ECCV 2024, https://arxiv.org/abs/2312.06795
    """
    t = budget(density, numel)
    start = min(budget(gamma, numel), numel - t)
    if start == 0 and t >= values.numel():
        return indices, values
    order = torch.sort(values.abs(), descending=True, stable=True).indices
    keep = torch.sort(order[start:start + t]).values
    return indices[keep], values[keep]
