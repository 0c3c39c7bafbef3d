"""SpIEL's rules, shared by the single-process, DDP and FSDP2 steps: state, config, regrowth.

References:
    Ansell, Vulić, Sterz, Korhonen & Ponti, "Scaling Sparse Fine-Tuning to Large
    Language Models", 2024, https://arxiv.org/abs/2401.16405
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from spdelta._ranks import full_tensor, shard_like
from spdelta.errors import ParameterError
from spdelta.optim import remap_state
from spdelta.rules import budget, topk_indices
from spdelta.types import Shape, Support, Values

__all__ = ["PruneRegrowResult", "SpielConfig", "SpielState", "prune_fraction", "prune_regrow",
           "random_support", "regrow", "regrow_if_due"]

Regrowth = Literal["ag", "ma"]
Schedule = Literal["linear", "cosine"]


class SpielState(NamedTuple):
    """Everything a SpIEL run carries from one step to the next.

    Attributes:
        values: Name -> 1-D delta values, aligned with ``support``.
        support: Name -> 1-D int64 strictly increasing flat indices; ``nnz`` per tensor
            never changes.
        opt_state: The optimizer state (e.g. :class:`~spdelta.optim.AdamWState` or
            :class:`~spdelta.optim.SM3State`), aligned with ``support``.
        step: Number of optimizer steps taken.
        grad_acc: Name -> dense gradient of the target weight summed over the current
            AG window (flat in one process; ``(out, in)`` sharded DTensors under FSDP2);
            empty outside it (and always for MA).
        rng_state: The state of the run's generator after its last draw (``uint8``),
            restored on resume; ``None`` when no generator was used.
    """

    values: Values
    support: Support
    opt_state: Any
    step: int
    grad_acc: Values
    rng_state: Tensor | None


@dataclasses.dataclass(frozen=True)
class SpielConfig:
    """SpIEL's schedule: when to accumulate, when to regrow and how much; checked when made.

    Step ``t`` (1-based, counted after the update) is a *regrowth step* when ``t %
    update_every == 0`` and ``t < total_steps``; it replaces ``prune_fraction(t,
    total_steps)`` of each tensor's entries. AG sums dense gradients over the
    ``accumulate_steps`` steps ending at a regrowth step.

    Attributes:
        total_steps: Length of the run (the schedule's horizon), ``>= 0``.
        regrowth: ``"ag"`` (accumulated gradients) or ``"ma"`` (SM3 momentum estimate).
        update_every: ``R``, steps between regrowths, ``>= 1``.
        accumulate_steps: ``S``, AG window length, ``1 <= S <= R``.
        initial_fraction: Prune fraction at step 0 in ``[0, 1]``, annealed to 0.
        schedule: ``"linear"`` or ``"cosine"`` annealing.

    Raises:
        ParameterError: (when made) every field out of range, in one message.

    Example:
        >>> c = SpielConfig(total_steps=10, update_every=4, accumulate_steps=2)
        >>> steps = range(1, 11)
        >>> [t for t in steps if c.regrows_at(t)], [t for t in steps if c.accumulates_at(t)]
        ([4, 8], [3, 4, 7, 8])
    """

    total_steps: int
    regrowth: Regrowth = "ag"
    update_every: int = 20
    accumulate_steps: int = 5
    initial_fraction: float = 0.2
    schedule: Schedule = "linear"

    def __post_init__(self) -> None:
        problems, whole = [], "must be a whole number"
        if self.regrowth not in ("ag", "ma"):
            problems.append(f"regrowth must be 'ag' or 'ma'; found {self.regrowth!r}")
        if self.schedule not in ("linear", "cosine"):
            problems.append(f"schedule must be 'linear' or 'cosine'; found {self.schedule!r}")
        if not _whole_number(self.total_steps) or self.total_steps < 0:
            problems.append(f"total_steps {whole} >= 0; found {self.total_steps!r}")
        if not _whole_number(self.update_every) or self.update_every < 1:
            problems.append(f"update_every {whole} >= 1; found {self.update_every!r}")
        elif not _whole_number(self.accumulate_steps) or not (
                1 <= self.accumulate_steps <= self.update_every):
            problems.append(f"need 1 <= accumulate_steps <= update_every; found accumulate_steps="
                            f"{self.accumulate_steps!r}, update_every={self.update_every}")
        if not 0.0 <= self.initial_fraction <= 1.0:
            problems.append(f"initial_fraction must lie in [0, 1]; found {self.initial_fraction!r}")
        if problems:
            raise ParameterError("SpIEL: " + "; ".join(problems) + ".")

    def next_regrowth(self, t: int) -> int:
        """The first multiple of ``update_every`` at or after step ``t``."""
        return -(-t // self.update_every) * self.update_every

    def regrows_at(self, t: int) -> bool:
        """Whether step ``t`` (1-based, after its update) prunes and regrows."""
        return t == self.next_regrowth(t) and t < self.total_steps

    def accumulates_at(self, t: int) -> bool:
        """Whether step ``t`` adds its dense gradient to AG's sum (always ``False`` for MA)."""
        nxt = self.next_regrowth(t)
        return self.regrowth == "ag" and nxt - t < self.accumulate_steps and nxt < self.total_steps

    def fraction(self, t: int) -> float:
        """:func:`prune_fraction` at step ``t`` of this run."""
        return prune_fraction(t, self.total_steps, initial=self.initial_fraction,
                              schedule=self.schedule)


def _whole_number(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class PruneRegrowResult(NamedTuple):
    """Result of :func:`prune_regrow` for one tensor.

    Attributes:
        support: New 1-D int64 sorted unique indices, same length as the old ones.
        values: New values aligned with ``support``: survivors keep theirs, regrown are 0.
        kept: Bool mask over the *old* entries: True where the entry survived.
        grown: Bool mask over the *new* entries: True where the entry was regrown.
    """

    support: Tensor
    values: Tensor
    kept: Tensor
    grown: Tensor


def prune_regrow(
    support: Tensor, values: Tensor, scores: Tensor, *, fraction: float
) -> PruneRegrowResult:
    """Drop the ``k`` entries with the smallest ``|value|``, grow the ``k`` best-scored new ones.

    ``k = min(floor(fraction * nnz), numel - nnz)``. Candidates for regrowth are the
    positions outside the *old* support (so a pruned entry cannot come straight back);
    the ``k`` with the largest ``scores`` are taken. Ties go to the lower old position
    (pruning) and to the lower flat index (regrowth), so the result is deterministic.

    Args:
        support: 1-D int64 sorted unique flat indices, length ``nnz``.
        values: 1-D values aligned with ``support``.
        scores: 1-D dense regrowth scores, length ``numel`` of the tensor (e.g. ``|sum
            of gradients|`` for AG or ``prod of SM3 accumulators`` for MA); finite.
        fraction: Fraction of the active entries to replace, in ``[0, 1]``.

    Returns:
        A :class:`PruneRegrowResult`; inputs are not modified.

    Raises:
        ParameterError: ``fraction`` is outside ``[0, 1]``.

    Example:
        >>> import torch
        >>> r = prune_regrow(torch.tensor([0, 2, 3]), torch.tensor([0.5, -0.1, 2.0]),
        ...                  torch.tensor([0.0, 9.0, 0.0, 0.0, 1.0]), fraction=0.34)
        >>> r.support.tolist(), r.values.tolist(), r.kept.tolist(), r.grown.tolist()
        ([0, 1, 3], [0.5, 0.0, 2.0], [True, False, True], [False, True, False])
    """
    if not 0.0 <= fraction <= 1.0:
        raise ParameterError(f"prune_regrow: fraction must lie in [0, 1]; found {fraction}.")
    nnz, numel = support.numel(), scores.numel()
    k = min(math.floor(fraction * nnz), numel - nnz)
    kept = torch.ones(nnz, dtype=torch.bool, device=support.device)
    if k <= 0:
        return PruneRegrowResult(support, values, kept, torch.zeros_like(kept))
    kept[torch.sort(values.abs(), stable=True).indices[:k]] = False
    masked = scores.index_fill(0, support, -math.inf)  # (numel,), the old support excluded
    grow = topk_indices(masked, k)
    new_support, order = torch.sort(torch.cat([support[kept], grow]))
    new_values = torch.cat([values[kept], values.new_zeros(k)])[order]
    grown = torch.cat([torch.zeros(nnz - k, dtype=torch.bool, device=support.device),
                       torch.ones(k, dtype=torch.bool, device=support.device)])[order]
    return PruneRegrowResult(new_support, new_values, kept, grown)


def prune_fraction(
    step: int, total: int, *, initial: float = 0.2, schedule: Schedule = "linear"
) -> float:
    """The fraction of active entries replaced at ``step`` of ``total``: anneals ``initial -> 0``.

    ``linear``: ``initial * (1 - step/total)``; ``cosine``: ``initial * (1 + cos(pi *
    step/total)) / 2``.

    Example:
        >>> prune_fraction(50, 100), prune_fraction(50, 100, schedule="cosine")
        (0.1, 0.1)
    """
    x = min(max(step / total, 0.0), 1.0) if total > 0 else 1.0
    if schedule == "linear":
        return initial * (1.0 - x)
    if schedule == "cosine":
        return initial * 0.5 * (1.0 + math.cos(math.pi * x))
    raise ParameterError(f"schedule must be 'linear' or 'cosine'; found {schedule!r}.")


def random_support(shapes: Mapping[str, Shape | torch.Size], *, density: float,
                   generator: torch.Generator, device: torch.device | str | None = None) -> Support:
    """Draw, per tensor, ``floor(density * numel + 0.5)`` distinct positions uniformly.

    The budget is per tensor: every tensor gets the same density. Tensors are drawn in
    sorted name order, so the result depends only on the generator's state.

    Args:
        shapes: Name -> dense shape.
        density: Fraction in ``[0, 1]``.
        generator: The source of randomness (CPU generator).
        device: Where the indices go.

    Returns:
        Name -> 1-D int64 sorted unique flat indices.

    Raises:
        ParameterError: ``density`` is outside ``[0, 1]``.

    Example:
        >>> import torch
        >>> gen = torch.Generator().manual_seed(0)
        >>> s = random_support({"w": (4, 5)}, density=0.25, generator=gen)
        >>> s["w"].numel(), bool((s["w"][1:] > s["w"][:-1]).all())
        (5, True)
    """
    if not 0.0 <= density <= 1.0:
        raise ParameterError(f"density must lie in [0, 1]; found {density}.")
    out = {}
    for name in sorted(shapes):
        numel = math.prod(shapes[name])
        k = budget(density, numel)
        out[name] = torch.sort(torch.randperm(numel, generator=generator)[:k]).values.to(device)
    return out


def regrow(state: SpielState, fraction: float, scores: Callable[[str], Tensor]
           ) -> tuple[SpielState, int]:
    """Prune and regrow every tensor of ``state`` (:func:`prune_regrow`), remapping the optimizer.

    Per tensor (budgets are per tensor: each keeps its ``nnz``), in name order, the
    ``fraction`` of entries with the smallest ``|value|`` make way for the best-scored
    candidates; survivors keep their value and optimizer state, newcomers start at 0
    with zero state (:func:`~spdelta.optim.remap_state`, generic over the state's
    per-entry fields). ``grad_acc`` is emptied. Sharded (FSDP2) values and optimizer
    state are gathered whole one tensor at a time and resharded like before; every
    rank computes the same result from the same global scores.

    Args:
        state: The state after the update of a regrowth step.
        fraction: Fraction of each tensor's entries to replace, in ``[0, 1]``.
        scores: ``scores(name)``: the 1-D dense regrowth scores of that tensor (``numel``).

    Returns:
        ``(state, regrown)``: the new state and the number of entries regrown in all.

    Example:
        >>> import torch
        >>> s = SpielState({"w": torch.tensor([0.5, 0.1])}, {"w": torch.tensor([0, 1])}, None,
        ...                4, {}, None)
        >>> new, n = regrow(s, 0.5, lambda name: torch.tensor([0.0, 0.0, 3.0, 1.0]))
        >>> new.support["w"].tolist(), new.values["w"].tolist(), n
        ([0, 2], [0.5, 0.0], 1)
    """
    values, support = dict(state.values), dict(state.support)
    regrown = 0
    for n in sorted(support):
        res = prune_regrow(support[n], full_tensor(values[n]), scores(n), fraction=fraction)
        values[n], support[n] = shard_like(res.values, values[n]), res.support
        regrown += int(res.grown.sum())
    opt_state = remap_state(state.opt_state, state.support, support)
    return state._replace(values=values, support=support, opt_state=opt_state,
                          grad_acc={}), regrown


def regrow_if_due(config: SpielConfig, state: SpielState, scores: Callable[[str], Tensor]
                  ) -> tuple[SpielState, dict[str, float]]:
    """:func:`regrow` when ``state.step`` is a regrowth step of ``config``; the step's metrics.

    Args:
        config: The run's schedule.
        state: The state after this step's update.
        scores: As for :func:`regrow`.

    Returns:
        ``(state, {"fraction": ..., "regrown": ...})`` (zeros off regrowth steps).

    Example:
        >>> import torch
        >>> c = SpielConfig(total_steps=8, update_every=4, accumulate_steps=1, initial_fraction=1.0)
        >>> s = SpielState({"w": torch.tensor([0.5, 0.1])}, {"w": torch.tensor([0, 1])}, None,
        ...                4, {}, None)  # after the update of step 4: half of the entries go
        >>> s, metrics = regrow_if_due(c, s, lambda name: torch.tensor([0.0, 0.0, 3.0, 1.0]))
        >>> s.support["w"].tolist(), metrics
        ([0, 2], {'fraction': 0.5, 'regrown': 1.0})
    """
    if not config.regrows_at(state.step):
        return state, {"fraction": 0.0, "regrown": 0.0}
    fraction = config.fraction(state.step)
    state, regrown = regrow(state, fraction, scores)
    return state, {"fraction": fraction, "regrown": float(regrown)}
