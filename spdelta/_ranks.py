"""Process-group helpers below :mod:`spdelta.dist`: ranks, whole and sharded tensors."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["full_tensor", "rank_and_world", "shard_like"]


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when no process group exists.

    Example:
        >>> rank_and_world()
        (0, 1)
    """
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: a sharded DTensor gathered over its mesh (a collective), else ``t``.

    Example:
        >>> import torch
        >>> full_tensor(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` laid out as ``like``: each rank keeps its own shard where ``like`` is a DTensor.

    ``whole`` must be identical on every rank (nothing is sent); for a plain ``like`` it
    is returned as it is. With :func:`full_tensor`, code that rewrites a tensor whole
    (SpIEL's regrowth, optimizer-state remapping) serves plain and FSDP2-sharded states.

    Example:
        >>> import torch
        >>> shard_like(torch.ones(2), torch.zeros(2)).tolist()
        [1.0, 1.0]
    """
    if not isinstance(like, DTensor):
        return whole
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)
