"""``fisher``: the empirical Fisher diagonal, the mean squared per-example gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from spdelta.errors import SpdeltaError
from spdelta.rules import accumulate_dtype
from spdelta.salience._calib import Calibration, batch_loss, examples, params_of
from spdelta.salience._registry import register_metric
from spdelta.types import Params

__all__ = ["fisher"]


@register_metric("fisher")
def fisher(cal: Calibration, *, chunk_size: int = 4) -> Params:
    """``S = (1/N) sum_i (grad l_i)^2``: the diagonal of the empirical Fisher information.

    ``l_i`` is the loss of example ``i`` alone. Per-example gradients come from
    ``torch.func.vmap(torch.func.grad(...))`` over ``chunk_size`` examples at a time:
    every batch entry whose leading size is the batch size is vmapped, and each inner
    call sees a batch of 1 (entries unsqueezed); other entries are passed unchanged.
    Memory is ``chunk_size`` dense gradients per target plus one fp32 accumulator
    (fp64 for fp64 weights). To change the chunk, register
    ``functools.partial(fisher, chunk_size=...)`` under a new name.

    Args:
        cal: The calibration inputs.
        chunk_size: Examples per vmapped call, ``>= 1``.

    Returns:
        Name -> scores of the weight's shape, fp32 (fp64 for fp64 weights).

    Raises:
        SpdeltaError: The batches held no example.

    Example:
        >>> import torch
        >>> from spdelta.salience import score
        >>> m = torch.nn.Linear(1, 1, bias=False)
        >>> batch = {"input": torch.tensor([[1.0], [3.0]])}
        >>> s = score(m, {"weight": torch.tensor([[2.0]])}, [batch], metric="fisher",
        ...           targets=["weight"], loss=lambda out, b: out.sum(), progress=False)
        >>> s["weight"].tolist()  # (1^2 + 3^2) / 2
        [[5.0]]

    References:
        Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
        PNAS 2017, https://arxiv.org/abs/1612.00796; Sung et al., "Training Neural
        Networks with Fixed Sparse Masks", NeurIPS 2021, https://arxiv.org/abs/2111.09839
    """
    params = params_of(cal)
    weights = {n: params[n] for n in cal.targets}
    acc = {n: torch.zeros_like(w, dtype=accumulate_dtype(w.dtype)) for n, w in weights.items()}
    total = 0
    for batch, n in examples(cal, desc="fisher"):
        rows = {k: v for k, v in batch.items()
                if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n}
        fixed = {k: v for k, v in batch.items() if k not in rows}

        def example_loss(w: Params, example: dict[str, Any],
                         fixed: dict[str, Any] = fixed) -> Tensor:
            one = {**fixed, **{k: v.unsqueeze(0) for k, v in example.items()}}
            return batch_loss(cal, {**params, **w}, one)

        per_example = vmap(grad(example_loss), in_dims=(None, 0))
        for start in range(0, n, chunk_size):
            grads = per_example(weights, {k: v[start:start + chunk_size] for k, v in rows.items()})
            for name, g in grads.items():
                acc[name] += g.detach().to(acc[name].dtype).square().sum(0)
        total += n
    if total == 0:
        raise SpdeltaError("fisher: the calibration batches held no example; pass a non-empty "
                           "iterable of batch dicts.")
    return {name: a.div_(total) for name, a in acc.items()}
