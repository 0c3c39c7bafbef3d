"""Collectives over flat tensor dicts, and a gradient all-reduce that works under ``torch.func``."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from spdelta.dist._env import rank_and_world
from spdelta.errors import SpdeltaError
from spdelta.functional import LossFn
from spdelta.types import Params, Support, Values

__all__ = ["all_reduce_mean", "all_reduce_sum", "assert_replicated", "broadcast_tree",
           "sync_grads", "sync_loss_fn"]

Group = dist.ProcessGroup | None


def _reduce_flat(tensors: list[Tensor], group: Group, *, mean: bool) -> list[Tensor]:
    """One all-reduce (sum or mean) per dtype over the concatenated ``tensors``; new tensors."""
    _, world = rank_and_world(group)
    out: list[Tensor] = [t.clone() for t in tensors]
    if world == 1:
        return out
    by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault((t.dtype, t.device), []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if mean:
            flat = flat / world
        for i, chunk in zip(idx, flat.split([tensors[i].numel() for i in idx]), strict=True):
            out[i] = chunk.view(tensors[i].shape)
    return out


def all_reduce_sum(tree: Mapping[str, Tensor], group: Group = None) -> Params:
    """The element-wise sum over ranks of a name -> tensor dict (identical on every rank).

    One collective per dtype (tensors are concatenated), in sorted name order, so every
    rank must pass the same names, shapes and dtypes. No-op copy without a group.

    Example:
        >>> import torch
        >>> all_reduce_sum({"w": torch.ones(2)})["w"].tolist()
        [1.0, 1.0]
    """
    names = sorted(tree)
    return dict(zip(names, _reduce_flat([tree[n] for n in names], group, mean=False), strict=True))


def all_reduce_mean(tree: Mapping[str, Tensor], group: Group = None) -> Params:
    """The element-wise mean over ranks of a name -> tensor dict (see :func:`all_reduce_sum`).

    Example:
        >>> import torch
        >>> all_reduce_mean({"w": torch.tensor([2.0])})["w"].tolist()
        [2.0]
    """
    names = sorted(tree)
    return dict(zip(names, _reduce_flat([tree[n] for n in names], group, mean=True), strict=True))


def broadcast_tree(tree: Mapping[str, Tensor], src: int = 0, group: Group = None) -> Params:
    """Rank ``src``'s tensors on every rank (same names, shapes and dtypes everywhere); new tensors.

    Example:
        >>> import torch
        >>> broadcast_tree({"w": torch.ones(1)})["w"].tolist()
        [1.0]
    """
    out = {n: tree[n].clone() for n in sorted(tree)}
    if rank_and_world(group)[1] > 1:
        for n in sorted(out):
            dist.broadcast(out[n], src=src, group=group)
    return out


def _digest(tree: Mapping[str, Tensor]) -> bytes:
    h = hashlib.sha256()
    for n in sorted(tree):
        t = tree[n].detach().contiguous().cpu()
        h.update(n.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def assert_replicated(tree: Mapping[str, Tensor], group: Group = None, *, what: str = "state"
                      ) -> None:
    """Check that every rank holds bit-identical tensors (e.g. supports after regrowth).

    Compares a SHA-256 of names, dtypes, shapes and bytes across ranks (one small
    all-gather); cheap enough to run at every regrowth step.

    Raises:
        SpdeltaError: Some rank differs; the message lists the ranks that differ from rank 0.

    Example:
        >>> import torch
        >>> assert_replicated({"w": torch.tensor([1, 2])})
    """
    rank, world = rank_and_world(group)
    if world == 1:
        return
    mine = torch.frombuffer(bytearray(_digest(tree)), dtype=torch.uint8)
    device = next(iter(tree.values())).device if tree else torch.device("cpu")
    mine = mine.to(device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    bad = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if bad:
        raise SpdeltaError(f"{what} differs across ranks: ranks {bad} differ from rank 0 "
                           f"(checked on rank {rank}). Every rank must reduce the same "
                           "gradients/scores; check that all ranks run the same steps.")


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward replaces the gradients by their mean over the ranks."""

    @staticmethod
    def forward(group: Any, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        del group
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.group = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return (None, *_reduce_flat(list(grads), ctx.group, mean=True))


def sync_grads(values: Values, group: Group = None) -> Values:
    """``values`` unchanged, but gradients flowing back through them are averaged over ranks.

    This is DDP's gradient all-reduce as a differentiable function, so it works where
    DDP cannot: inside ``torch.func.grad`` (which the spdelta recipes use and which
    never fills ``.grad``). All tensors go in one collective per dtype. Every rank must
    run the backward pass, in the same order.

    Args:
        values: Name -> tensor (the differentiated inputs).
        group: The process group; ``None`` is the default group (or no-op without one).

    Returns:
        Name -> tensor, equal to ``values``.

    Example:
        >>> import torch
        >>> v = {"w": torch.ones(2)}
        >>> torch.func.grad(lambda v: sync_grads(v)["w"].sum())(v)["w"].tolist()
        [1.0, 1.0]
    """
    if rank_and_world(group)[1] == 1:
        return dict(values)
    names = sorted(values)
    out = _AllReduceGrad.apply(group, *[values[n] for n in names])
    return dict(zip(names, out, strict=True))


def sync_loss_fn(loss_fn: LossFn, group: Group = None) -> LossFn:
    """Wrap ``fn(values, base, support, batch)`` so that gradients in ``values`` are rank means.

    With each rank passing its share of the global batch
    (:func:`~spdelta.dist.shard_batch`), ``torch.func.grad`` of the wrapped function
    is, on every rank, the gradient of the mean of the ranks' losses: the gradient of
    the global batch for mean losses over equal shares. The returned loss is the local
    one. Base tensors that require grad are averaged too, in the same collective:
    SpIEL-AG differentiates the target weights to get their dense gradient in the same
    backward pass. Passing the wrapped function to
    :func:`spdelta.train.make_train_step` or :func:`spdelta.train.spiel.make_spiel_step`
    distributes them without changing them; for SpIEL-AG the dense candidate gradients
    are reduced by the same backward pass, and SM3 accumulators (for MA) are built from
    reduced gradients, so regrowth selects the same support on every rank.

    Example:
        >>> import torch
        >>> fn = sync_loss_fn(lambda v, b, s, batch: (v["w"] * batch["x"]).sum())
        >>> torch.func.grad(fn)({"w": torch.ones(2)}, {}, {}, {"x": torch.tensor([1.0, 2.0])})["w"]
        tensor([1., 2.])
    """

    def synced(values: Values, base: Params, support: Support, batch: Mapping[str, Any]) -> Tensor:
        tagged = {**{"v:" + n: t for n, t in values.items()},
                  **{"b:" + n: t for n, t in base.items() if t.requires_grad}}
        synced = sync_grads(tagged, group)  # one backward collective per dtype for both
        values = {n: synced["v:" + n] for n in values}
        base = {n: synced.get("b:" + n, t) for n, t in base.items()}
        return loss_fn(values, base, support, batch)

    return synced
