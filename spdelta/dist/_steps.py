"""Data-parallel steps: static (SPEFT-style) training, SpIEL, and salience scoring over ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from spdelta.dist._env import rank_and_world
from spdelta.dist._sync import all_reduce_sum, assert_replicated, broadcast_tree, sync_loss_fn
from spdelta.errors import ParameterError
from spdelta.functional import LossFn
from spdelta.optim import Transform
from spdelta.salience import METRICS, Calibration, LossCallable, score
from spdelta.salience._calib import examples, mean_gradient
from spdelta.targets import TargetSpec
from spdelta.train import TrainState, make_train_step
from spdelta.train.spiel import SpielState, make_spiel_step
from spdelta.types import Params, Support

__all__ = ["DIST_METRICS", "make_dist_spiel_step", "make_dist_train_step", "score_distributed"]

Group = dist.ProcessGroup | None
Batch = Mapping[str, Any]

# Metrics that are a function of the mean gradient g: reduce g (weighted by examples), then apply.
_OF_MEAN_GRAD: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gradient": lambda g, w: g.abs(),
    "snip": lambda g, w: (g * w.to(g.dtype)).abs(),
    "taylor_fo": lambda g, w: (g * w.to(g.dtype)).square(),
    "force": lambda g, w: -(g * w.to(g.dtype)),
}
_LOCAL = ("magnitude", "synflow")  # data-free: identical on every rank by construction
#: Metrics :func:`score_distributed` supports (``grasp`` is not: it is not linear in the data).
DIST_METRICS = tuple(sorted([*_OF_MEAN_GRAD, *_LOCAL, "fisher", "random"]))


def _global_loss(loss: float, group: Group) -> float:
    if rank_and_world(group)[1] == 1:
        return loss
    t = torch.tensor([loss], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    return float(all_reduce_sum({"l": t}, group)["l"]) / rank_and_world(group)[1]


def make_dist_train_step(
    loss_fn: LossFn, optimizer: Transform, base: Params, support: Support, *,
    group: Group = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, float]]]:
    """:func:`spdelta.train.make_train_step` with the values' gradients averaged over ranks.

    Each rank passes its share of the global batch; values and optimizer state are
    replicated and stay bit-identical because every rank applies the same reduced
    gradient. The ``loss`` metric is the mean over ranks.

    Args:
        loss_fn: From :func:`spdelta.make_loss_fn`.
        optimizer: A pure transform (e.g. :func:`spdelta.optim.adamw`).
        base: Name -> base tensor (a full replica on every rank).
        support: Name -> fixed sorted indices (identical on every rank).
        group: Process group; ``None`` is the default group.

    Returns:
        ``train_step(state, local_batch) -> (state, metrics)``.

    Example:
        >>> import torch
        >>> from spdelta import make_loss_fn
        >>> from spdelta.optim import adamw
        >>> from spdelta.train import init_train_state
        >>> fn = make_loss_fn(torch.nn.Linear(2, 1, bias=False), loss=lambda o, b: o.sum())
        >>> step = make_dist_train_step(fn, adamw(0.5), {"weight": torch.zeros(1, 2)},
        ...                             {"weight": torch.tensor([1])})
        >>> state, m = step(init_train_state(adamw(0.5), {"weight": torch.zeros(1)}),
        ...                 {"input": torch.ones(1, 2)})
        >>> state.values["weight"].tolist()
        [-0.5]
    """
    inner = make_train_step(sync_loss_fn(loss_fn, group), optimizer, base, support)

    def dist_train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, float]]:
        state, metrics = inner(state, batch)
        return state, {**metrics, "loss": _global_loss(metrics["loss"], group)}

    return dist_train_step


def make_dist_spiel_step(
    loss_fn: LossFn, base: Params, optimizer: Transform, *, group: Group = None,
    check_supports: bool = True, **spiel_kwargs: Any,
) -> Callable[[SpielState, Batch], tuple[SpielState, dict[str, float]]]:
    """:func:`spdelta.train.spiel.make_spiel_step` on ranks: global gradients, one support.

    Unlike reference SpIEL code, candidates are not chosen from local gradients: the
    update gradients and the AG candidate gradients (dense, during the accumulation
    window) are averaged over ranks in the same backward pass, and SM3 accumulators
    (MA) only ever see averaged gradients. ``prune_regrow`` then gets identical inputs
    on every rank and returns identical supports (its ties are broken deterministically).

    Args:
        loss_fn: From :func:`spdelta.make_loss_fn`.
        base: Name -> base tensor (a full replica on every rank).
        optimizer: Transform over the values (SM3 for ``regrowth="ma"``).
        group: Process group; ``None`` is the default group.
        check_supports: After each regrowth, verify with :func:`assert_replicated` that
            all ranks hold the same support (one 32-byte all-gather).
        **spiel_kwargs: ``total_steps``, ``regrowth``, ``update_every``,
            ``accumulate_steps``, ``initial_fraction``, ``schedule``: the fields of the
            :class:`~spdelta.train.SpielConfig` the single-process step uses.

    Returns:
        ``spiel_step(state, local_batch) -> (state, metrics)``; ``loss`` is the rank mean.

    Raises:
        SpdeltaError: (when called, with ``check_supports``) supports differ across ranks.

    Example:
        >>> import torch
        >>> from spdelta import make_loss_fn
        >>> from spdelta.optim import adamw
        >>> from spdelta.train.spiel import spiel_init
        >>> fn = make_loss_fn(torch.nn.Linear(3, 1, bias=False), loss=lambda o, b: o.sum())
        >>> step = make_dist_spiel_step(fn, {"weight": torch.zeros(1, 3)}, adamw(0.1),
        ...                             total_steps=4, update_every=2, accumulate_steps=1)
        >>> s = spiel_init({"weight": torch.zeros(1)}, {"weight": torch.tensor([0])}, adamw(0.1))
        >>> s, m = step(s, {"input": torch.ones(1, 3)})
        >>> m["step"]
        1.0
    """
    inner = make_spiel_step(sync_loss_fn(loss_fn, group), base, optimizer, **spiel_kwargs)

    def dist_spiel_step(state: SpielState, batch: Batch) -> tuple[SpielState, dict[str, float]]:
        old = state.support
        state, metrics = inner(state, batch)
        if check_supports and state.support is not old:
            assert_replicated(state.support, group, what="SpIEL support")
        return state, {**metrics, "loss": _global_loss(metrics["loss"], group)}

    return dist_spiel_step


def _n_examples(cal: Calibration) -> int:
    return sum(n for _, n in examples(cal._replace(progress=False), desc=""))


def score_distributed(
    model: nn.Module, base: Mapping[str, Tensor], batches: Iterable[Batch], *, metric: str,
    targets: TargetSpec | None = None, num_examples: int = 1024,
    generator: torch.Generator | None = None, loss: LossCallable | None = None,
    progress: bool = True, group: Group = None,
) -> Params:
    """:func:`spdelta.salience.score` over the ranks' calibration shares: one score everywhere.

    The reduction happens where the metric is linear in the data, never on local
    scores: for ``gradient``, ``snip``, ``taylor_fo``, ``force`` the mean gradient
    ``g = sum_r sum_b n_b g_b / sum_r sum_b n_b`` is all-reduced before the metric's
    formula; ``fisher`` (a mean over examples) is reduced weighted by example counts;
    ``magnitude`` and ``synflow`` do not read data; ``random`` is rank 0's draw,
    broadcast. So every rank gets the scores a single process would compute on the
    union of the shares, and :func:`spdelta.select_topk` then selects the same support.

    Args:
        model: The module (a full replica on every rank).
        base: Name -> tensor of the parameters.
        batches: This rank's calibration batches.
        metric: One of :data:`DIST_METRICS`.
        targets: Which weights to score (``None``: ``"all-linear"``).
        num_examples: Examples consumed **per rank**.
        generator: Randomness for ``random``.
        loss: ``loss(output, batch) -> scalar``; ``None`` uses ``output.loss``.
        progress: Show a progress bar.
        group: Process group; ``None`` is the default group.

    Returns:
        Target name -> dense scores, identical on every rank.

    Raises:
        ParameterError: ``metric`` is not in :data:`DIST_METRICS`.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1, bias=False)
        >>> s = score_distributed(m, {"weight": torch.ones(1, 2)}, [{"input": torch.ones(1, 2)}],
        ...                       metric="gradient", loss=lambda o, b: o.sum(), progress=False)
        >>> s["weight"].tolist()
        [[1.0, 1.0]]
    """
    if metric not in DIST_METRICS:
        raise ParameterError(f"score_distributed: metric {metric!r} cannot be reduced exactly "
                             f"over ranks; use one of {list(DIST_METRICS)}.")
    kwargs: dict[str, Any] = {"targets": targets, "num_examples": num_examples,
                              "generator": generator, "loss": loss, "progress": progress}
    if metric in _LOCAL:
        return score(model, base, batches, metric=metric, **kwargs)
    if metric == "random":
        return broadcast_tree(score(model, base, batches, metric=metric, **kwargs), 0, group)

    def weighted(cal: Calibration) -> Params:  # sum over local examples, plus the count
        if metric == "fisher":
            local, n = METRICS["fisher"](cal), _n_examples(cal)
        else:
            local, n = mean_gradient(cal, desc=metric)
        some = next(iter(local.values()))
        count = torch.tensor([float(n)], dtype=some.dtype, device=some.device)
        return {**{k: v * n for k, v in local.items()}, "": count}

    sums = all_reduce_sum(score(model, base, batches, metric=weighted, **kwargs), group)
    total = sums.pop("")
    means = {n: s / total for n, s in sums.items()}
    if metric == "fisher":
        return means
    return {n: _OF_MEAN_GRAD[metric](g, base[n].detach()) for n, g in means.items()}
