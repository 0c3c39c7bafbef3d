"""First-order metrics: functions of the weight ``w`` and the mean calibration gradient ``g``.

``g = sum_b n_b * grad L_b / sum_b n_b`` over the calibration batches ``b`` of ``n_b``
examples (:func:`spdelta.salience._calib.mean_gradient`), taken at the base weights and
accumulated in fp32 (fp64 for fp64 weights). Each metric maps a
:class:`~spdelta.salience.Calibration` to ``{target name: score}``, scores of the weight's
shape in that dtype, and raises :class:`~spdelta.errors.SpdeltaError` when the batches
hold no example. In every example below, ``w = [2, -1]``, the input is ``[3, 4]`` and
the loss is the output's sum, so ``g = [3, 4]``.

References:
    Liu et al., "Refining Salience-Aware Sparse Fine-Tuning Strategies for Language
    Models", ACL 2025, https://arxiv.org/abs/2412.13488 (the four metrics in SPEFT).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from spdelta.salience._calib import Calibration, mean_gradient
from spdelta.salience._registry import register_metric
from spdelta.types import Params

__all__ = ["force", "gradient", "snip", "taylor_fo"]


def _of_gradient(cal: Calibration, name: str, rule: Callable[[Tensor, Tensor], Tensor]) -> Params:
    """``rule(g, w)`` per target, ``g`` the mean gradient and ``w`` the base in its dtype."""
    grads, _ = mean_gradient(cal, desc=name)
    return {n: rule(g, cal.base[n].detach().to(g.dtype)) for n, g in grads.items()}


@register_metric("gradient")
def gradient(cal: Calibration) -> Params:
    """``S = |g|`` (SPEFT's recommended metric); shapes and dtypes as the module says.

    Example:
        >>> import torch
        >>> from spdelta.salience import score
        >>> m = torch.nn.Linear(2, 1, bias=False)
        >>> batch = {"input": torch.tensor([[3.0, 4.0]])}
        >>> s = score(m, {"weight": torch.tensor([[2.0, -1.0]])}, [batch], metric="gradient",
        ...           targets=["weight"], loss=lambda out, b: out.sum(), progress=False)
        >>> s["weight"].tolist()
        [[3.0, 4.0]]
    """
    return _of_gradient(cal, "gradient", lambda g, w: g.abs_())


@register_metric("snip")
def snip(cal: Calibration) -> Params:
    """``S = |w * g|``: connection sensitivity.

    Example:
        >>> import torch
        >>> from spdelta.salience import score
        >>> s = score(torch.nn.Linear(2, 1, bias=False), {"weight": torch.tensor([[2.0, -1.0]])},
        ...           [{"input": torch.tensor([[3.0, 4.0]])}], metric="snip", targets=["weight"],
        ...           loss=lambda out, b: out.sum(), progress=False)
        >>> s["weight"].tolist()
        [[6.0, 4.0]]

    References:
        Lee et al., "SNIP: Single-shot Network Pruning based on Connection Sensitivity",
        ICLR 2019, https://arxiv.org/abs/1810.02340
    """
    return _of_gradient(cal, "snip", lambda g, w: g.mul_(w).abs_())


@register_metric("force")
def force(cal: Calibration) -> Params:
    """``S = -w * g``, signed: a weight whose descent step would grow its magnitude scores high.

    Example:
        >>> import torch
        >>> from spdelta.salience import METRICS, Calibration
        >>> cal = Calibration(torch.nn.Linear(2, 1, bias=False),
        ...                   {"weight": torch.tensor([[2.0, -1.0]])}, ["weight"],
        ...                   [{"input": torch.tensor([[3.0, 4.0]])}], 1, None,
        ...                   lambda out, b: out.sum(), False)
        >>> METRICS["force"](cal)["weight"].tolist()
        [[-6.0, 4.0]]

    References:
        de Jorge et al., "Progressive Skeletonization: Trimming more fat from a network at
        initialization" (FORCE), ICLR 2021, https://arxiv.org/abs/2006.09081
    """
    return _of_gradient(cal, "force", lambda g, w: g.mul_(w).neg_())


@register_metric("taylor_fo")
def taylor_fo(cal: Calibration) -> Params:
    """``S = (w * g)^2``: the squared first-order Taylor estimate of the loss change.

    Example:
        >>> import torch
        >>> from spdelta.salience import score
        >>> batches = [{"input": torch.tensor([[3.0, 4.0]])}]
        >>> s = score(torch.nn.Linear(2, 1, bias=False), {"weight": torch.tensor([[2.0, -1.0]])},
        ...           batches, metric="taylor_fo", targets=["weight"],
        ...           loss=lambda out, b: out.sum(), progress=False)
        >>> s["weight"].tolist()
        [[36.0, 16.0]]

    References:
        Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019,
        https://arxiv.org/abs/1906.10771
    """
    return _of_gradient(cal, "taylor_fo", lambda g, w: g.mul_(w).square_())
