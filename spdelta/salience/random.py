"""``random``: seeded uniform scores, the baseline every metric must beat."""

from __future__ import annotations

import torch

from spdelta.rules import accumulate_dtype
from spdelta.salience._calib import Calibration
from spdelta.salience._registry import register_metric
from spdelta.types import Params

__all__ = ["random_scores"]


@register_metric("random")
def random_scores(cal: Calibration) -> Params:
    """``S = U(0, 1)`` drawn from ``cal.generator`` for every target, in sorted name order.

    Data-free: the batches are not read. With ``generator=None`` torch's default
    generator is used (not reproducible); pass a seeded ``torch.Generator``.

    Args:
        cal: The calibration inputs; uses ``base``, ``targets``, ``generator``.

    Returns:
        Name -> scores of the weight's shape, fp32 (fp64 for fp64 weights).

    Example:
        >>> import torch
        >>> from spdelta.salience import score
        >>> m = torch.nn.Linear(2, 2)
        >>> s = score(m, dict(m.named_parameters()), [], metric="random", targets=["weight"],
        ...           generator=torch.Generator().manual_seed(0), progress=False)
        >>> s["weight"].shape
        torch.Size([2, 2])

    References:
        Liu et al., "Refining Salience-Aware Sparse Fine-Tuning Strategies for Language
        Models", ACL 2025, https://arxiv.org/abs/2412.13488 (random baseline)
    """
    device = cal.generator.device if cal.generator is not None else torch.device("cpu")
    out = {}
    for n in cal.targets:
        w = cal.base[n]
        out[n] = torch.rand(w.shape, generator=cal.generator, device=device,
                            dtype=accumulate_dtype(w.dtype)).to(w.device)
    return out
