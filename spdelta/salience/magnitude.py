"""``magnitude``: the absolute value of each weight."""

from __future__ import annotations

from spdelta.rules import accumulate_dtype
from spdelta.salience._calib import Calibration
from spdelta.salience._registry import register_metric
from spdelta.types import Params

__all__ = ["magnitude"]


@register_metric("magnitude")
def magnitude(cal: Calibration) -> Params:
    """``S = |w|``. Data-free: the batches are not read.

    Args:
        cal: The calibration inputs; uses ``base`` and ``targets``.

    Returns:
        Name -> ``|w|``, fp32 (fp64 for fp64 weights).

    Example:
        >>> import torch
        >>> from spdelta.salience import score
        >>> m = torch.nn.Linear(2, 1, bias=False)
        >>> s = score(m, {"weight": torch.tensor([[-2.0, 1.0]])}, [], metric="magnitude",
        ...           targets=["weight"], progress=False)
        >>> s["weight"].tolist()
        [[2.0, 1.0]]

    References:
        Han et al., "Learning both Weights and Connections for Efficient Neural
        Networks", NeurIPS 2015, https://arxiv.org/abs/1506.02626
    """
    return {n: cal.base[n].detach().to(accumulate_dtype(cal.base[n].dtype)).abs()
            for n in cal.targets}
