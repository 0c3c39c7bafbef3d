"""AdamW over sparse delta values: state is sized by nnz, never dense."""

from __future__ import annotations

from typing import NamedTuple

import torch

from spdelta.optim._base import EntryValues, Transform, empty_like_flat
from spdelta.optim.schedules import Schedule
from spdelta.rules import accumulate_dtype
from spdelta.types import Values

__all__ = ["AdamWState", "adamw"]


class AdamWState(NamedTuple):
    """State of :func:`adamw`.

    Attributes:
        steps: Name -> number of updates each entry has taken, int32, aligned with the
            values (bias correction uses it). Per entry, so that an entry that SpIEL
            regrows (:func:`~spdelta.optim.remap_state` resets it to 0) is corrected as
            a fresh Adam parameter while the survivors keep their count.
        mu: Name -> first moment, same shape as the values, fp32 (fp64 for fp64 values).
        nu: Name -> second moment, same shape and dtype as ``mu``.
        num_updates: Number of updates this state has taken (a Python int): the step a
            learning-rate schedule is evaluated at. Unlike ``steps`` it is global, so
            regrowth does not reset it.

    ``steps``, ``mu`` and ``nu`` are annotated :data:`~spdelta.optim.EntryValues`: a
    support change remaps them entry by entry (:func:`~spdelta.optim.remap_state`).
    """

    steps: EntryValues
    mu: EntryValues
    nu: EntryValues
    num_updates: int = 0


def _zeroed(tensors: Values) -> Values:
    for t in tensors.values():
        t.zero_()
    return tensors


def adamw(
    lr: float | Schedule,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> Transform:
    """AdamW (decoupled weight decay) on the 1-D values of a sparse delta.

    Matches ``torch.optim.AdamW`` step for step: with ``t`` the entry's step count,
    ``p <- p - lr*wd*p``; ``m <- b1*m + (1-b1)*g``; ``v <- b2*v + (1-b2)*g^2``;
    ``p <- p - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)``.

    The parameters here are the *delta* values, so weight decay pulls each delta
    toward zero, that is, each trained weight back toward its base weight (not
    toward zero as dense AdamW would). Moments are kept in fp32 (fp64 for fp64
    values) and have one entry per stored delta value; so has the step count ``t``
    (int32), which starts at 0 for an entry that a support change brings in.

    A schedule (:mod:`spdelta.optim.schedules`) in place of ``lr`` gives update ``k``
    (counted from 0 in :attr:`AdamWState.num_updates`) the learning rate ``lr(k)``, in both
    the step and the weight decay, as ``torch.optim.AdamW`` under an LR scheduler.

    Args:
        lr: Learning rate, or a schedule ``lr(step) -> float``.
        betas: Decay rates ``(b1, b2)`` of the first and second moments.
        eps: Added to the denominator for stability.
        weight_decay: Decoupled decay coefficient ``wd``.

    Returns:
        A :class:`~spdelta.optim.Transform` whose state is :class:`AdamWState`.

    Example:
        >>> import torch
        >>> from spdelta.optim import adamw, apply_updates
        >>> opt = adamw(0.1)
        >>> params = {"w": torch.zeros(2)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.tensor([1.0, -1.0])}, state, params)
        >>> apply_updates(params, updates)["w"].tolist()
        [-0.10000000149011612, 0.10000000149011612]

    References:
        Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019,
        https://arxiv.org/abs/1711.05101
    """
    b1, b2 = betas
    bad_lr = not (callable(lr) or lr >= 0)
    if bad_lr or eps < 0 or weight_decay < 0 or not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"adamw: expected lr, eps, weight_decay >= 0 and betas in [0, 1); "
                         f"found lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}.")

    def init(params: Values) -> AdamWState:
        f64 = {n: p for n, p in params.items() if accumulate_dtype(p.dtype) == torch.float64}
        mu = {**empty_like_flat(f64),
              **empty_like_flat({n: p for n, p in params.items() if n not in f64}, torch.float32)}
        mu = _zeroed({n: mu[n] for n in params})
        steps = _zeroed(empty_like_flat(params, torch.int32))
        return AdamWState(steps, mu, _zeroed(empty_like_flat(mu)), 0)

    def update(grads: Values, state: AdamWState, params: Values) -> tuple[Values, AdamWState]:
        # The new state and updates go into one buffer each (see empty_like_flat), filled
        # in place: the same operations, in the same order, as the formula above.
        steps, mu, nu = (empty_like_flat(x) for x in state[:3])
        updates = empty_like_flat(state.mu)
        rate = float(lr(state.num_updates)) if callable(lr) else lr
        for n, p in params.items():
            steps[n].copy_(state.steps[n]).add_(1)
            # Per-entry bias corrections, taken in fp64: ``1 - b2**t`` cancels badly in fp32.
            t, dtype = steps[n].to(torch.float64), mu[n].dtype
            c1 = torch.pow(b1, t).neg_().add_(1).to(dtype)
            c2 = torch.pow(b2, t).neg_().add_(1).to(dtype)
            g = grads[n].to(dtype)
            mu[n].copy_(state.mu[n]).mul_(b1).add_(g * (1 - b1))
            nu[n].copy_(state.nu[n]).mul_(b2).add_((g * g).mul_(1 - b2))
            p32 = p.to(dtype)
            step = (mu[n] / c1).div_((nu[n] / c2).sqrt_().add_(eps))
            updates[n].copy_(p32).mul_(1 - rate * weight_decay).sub_(step.mul_(rate)).sub_(p32)
        return updates, AdamWState(steps, mu, nu, state.num_updates + 1)

    return Transform(init, update)

