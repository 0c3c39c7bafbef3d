"""SM3 over sparse delta values: accumulators per row and per column, never per entry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from spdelta.errors import KeyMismatchError, ParameterError, format_names
from spdelta.optim._base import EntryValues, StateSupport, Transform
from spdelta.optim.schedules import Schedule
from spdelta.rules import accumulate_dtype
from spdelta.types import Shape, Values

__all__ = ["SM3State", "sm3", "unravel"]


class SM3State(NamedTuple):
    """State of :func:`sm3`.

    Attributes:
        steps: Number of updates taken (a Python int); a learning-rate schedule is
            evaluated at it.
        support: Name -> 1-D int64 sorted flat indices the values sit at. The state,
            not the factory, is authoritative: a prune/regrow step replaces it (see
            :func:`spdelta.optim.reset.remap_state`).
        accumulators: Name -> one 1-D accumulator per dimension of the dense tensor
            (``shape[d]`` entries each, so ``rows + cols`` for a matrix), fp32 (fp64
            for fp64 values). They do not depend on the support, so they survive
            regrowth.
        momentum: Name -> momentum buffer aligned with the values; an empty dict when
            the factory's ``momentum`` is 0.

    ``support`` is annotated :data:`~spdelta.optim.StateSupport` and ``momentum``
    :data:`~spdelta.optim.EntryValues`, so :func:`~spdelta.optim.remap_state` replaces
    the one and remaps the other when the support changes.
    """

    steps: int
    support: StateSupport
    accumulators: dict[str, tuple[Tensor, ...]]
    momentum: EntryValues


def unravel(indices: Tensor, shape: Shape) -> tuple[Tensor, ...]:
    """Split flat row-major ``indices`` into one coordinate tensor per dimension.

    A 0-d shape is treated as ``(1,)``.

    Args:
        indices: 1-D int64 flat positions into a tensor of ``shape``.
        shape: The dense shape.

    Returns:
        ``len(shape)`` (at least 1) int64 tensors, each like ``indices``.

    Example:
        >>> import torch
        >>> [c.tolist() for c in unravel(torch.tensor([0, 5, 7]), (2, 4))]
        [[0, 1, 1], [0, 1, 3]]
    """
    dims = tuple(shape) or (1,)
    coords = []
    rest = indices
    for size in reversed(dims[1:]):
        coords.append(torch.remainder(rest, size))
        rest = torch.div(rest, size, rounding_mode="floor")
    coords.append(rest)
    return tuple(reversed(coords))


def _check_keys(support: Mapping[str, Tensor], shapes: Mapping[str, Shape]) -> None:
    missing = set(support) - set(shapes)
    if missing:
        raise KeyMismatchError(f"sm3: support names tensors without a shape: "
                               f"[{format_names(missing)}]; pass a shape for every tensor.")


def sm3(
    lr: float | Schedule,
    *,
    support: Mapping[str, Tensor],
    shapes: Mapping[str, Shape | torch.Size],
    momentum: float = 0.0,
    eps: float = 1e-30,
) -> Transform:
    """SM3-II on the 1-D values of a sparse delta, with one accumulator per dimension.

    For an entry ``j`` at coordinates ``(r, c)`` of a matrix with row accumulator
    ``R`` and column accumulator ``C`` (both start at 0), one step with gradient ``g``:

    ``nu_j = min(R[r], C[c]) + g_j^2``;
    ``R[r] <- max(R[r], max_{j in row r} nu_j)`` and likewise ``C``;
    ``u_j = g_j / sqrt(nu_j + eps)``; with momentum ``b``, ``m <- b*m + (1-b)*u``
    and ``u = m``; then ``p <- p - lr * u``. Tensors of any rank use one accumulator
    per dimension (the minimum is over all of them; a 1-D tensor thus has a per-entry
    accumulator the size of the tensor).

    The maxima are over the *active* entries of a row only. Keeping the old value in
    the maximum makes this equal to SM3-II with the cover sets "row r" and "column c"
    while the support is fixed (the old maximum is reached again, Anil et al. §4), and
    keeps the accumulators meaningful when SpIEL changes the support, as in Ansell et
    al.'s implementation. Memory: ``rows + cols`` per matrix (plus ``nnz`` with
    momentum), against ``2 * nnz`` for AdamW.

    Design: the values alone do not say where they sit, so the factory takes the
    initial ``support`` and the dense ``shapes``; ``init`` copies the support into
    :class:`SM3State` and ``update`` reads it from there. Whoever changes the support
    must remap the state (:func:`spdelta.optim.reset.remap_state`).

    Args:
        lr: Learning rate, or a schedule ``lr(step) -> float`` evaluated at
            :attr:`SM3State.steps` (:mod:`spdelta.optim.schedules`).
        support: Name -> 1-D int64 sorted flat indices of the values ``init`` receives.
        shapes: Name -> dense shape; may hold more names than ``support``.
        momentum: Momentum coefficient in ``[0, 1)``; 0 keeps no buffer.
        eps: Added to ``nu`` under the square root.

    Returns:
        A :class:`~spdelta.optim.Transform` whose state is :class:`SM3State`.

    Raises:
        ParameterError: ``lr`` or ``eps`` < 0, or ``momentum`` outside ``[0, 1)``.
        KeyMismatchError: ``support`` names a tensor absent from ``shapes``.

    Example:
        >>> import torch
        >>> from spdelta.optim import apply_updates, sm3
        >>> support = {"w": torch.tensor([0, 3])}
        >>> opt = sm3(0.1, support=support, shapes={"w": (2, 2)})
        >>> params = {"w": torch.zeros(2)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": torch.tensor([2.0, -1.0])}, state, params)
        >>> apply_updates(params, updates)["w"].tolist(), state.accumulators["w"][0].tolist()
        ([-0.10000000149011612, 0.10000000149011612], [4.0, 1.0])

    References:
        Anil, Gupta, Koren & Singer, "Memory-Efficient Adaptive Optimization", 2019,
        https://arxiv.org/abs/1901.11150 ;
        Ansell et al., "Scaling Sparse Fine-Tuning to Large Language Models", 2024,
        https://arxiv.org/abs/2401.16405
    """
    if not (callable(lr) or lr >= 0) or not eps >= 0 or not 0 <= momentum < 1:
        raise ParameterError(f"sm3: expected lr >= 0, eps >= 0 and momentum in [0, 1); "
                             f"found lr={lr}, eps={eps}, momentum={momentum}.")
    _check_keys(support, {n: tuple(s) for n, s in shapes.items()})
    dims = {n: tuple(int(d) for d in shapes[n]) or (1,) for n in support}
    initial = dict(support)

    def init(params: Values) -> SM3State:
        if params.keys() != initial.keys():
            raise KeyMismatchError(f"sm3: params and support must name the same tensors; "
                                   f"differ in [{format_names(params.keys() ^ initial.keys())}].")
        acc = {n: tuple(torch.zeros(d, dtype=accumulate_dtype(p.dtype), device=p.device)
                        for d in dims[n])
               for n, p in params.items()}
        mom = ({n: torch.zeros_like(p, dtype=accumulate_dtype(p.dtype)) for n, p in params.items()}
               if momentum > 0 else {})
        return SM3State(0, dict(initial), acc, mom)

    def update(grads: Values, state: SM3State, params: Values) -> tuple[Values, SM3State]:
        updates, accs, moms = {}, {}, {}
        rate = float(lr(state.steps)) if callable(lr) else lr
        for n in params:
            acc = state.accumulators[n]
            g = grads[n].to(acc[0].dtype)
            coords = unravel(state.support[n], dims[n])
            nu = acc[0][coords[0]]
            for a, c in zip(acc[1:], coords[1:], strict=True):
                nu = torch.minimum(nu, a[c])
            nu = nu + g * g
            accs[n] = tuple(a.scatter_reduce(0, c, nu, "amax", include_self=True)
                            for a, c in zip(acc, coords, strict=True))
            step = g / (nu + eps).sqrt()
            if momentum > 0:
                step = state.momentum[n] * momentum + step * (1 - momentum)
                moms[n] = step
            updates[n] = -rate * step
        return updates, SM3State(state.steps + 1, state.support, accs, moms)

    return Transform(init, update)
