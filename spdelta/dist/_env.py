"""Process-group setup from ``torchrun`` environment variables, and rank-aware batch sharding."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from spdelta._ranks import rank_and_world
from spdelta.errors import ParameterError

__all__ = ["DistEnv", "init_from_env", "rank_and_world", "shard_batch", "shard_batches"]

Batch = Mapping[str, Any]


class DistEnv(NamedTuple):
    """Where this process sits in the job.

    Attributes:
        rank: Global rank, ``0 <= rank < world_size``.
        world_size: Number of processes (1 when not launched by ``torchrun``).
        local_rank: Rank on this node (selects the GPU).
        device: The device this process computes on.
        backend: ``"gloo"``, ``"nccl"``, or ``""`` for a single process with no group.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def init_from_env(backend: str | None = None) -> DistEnv:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Uses ``nccl`` when CUDA is available (and sets this process's GPU to
    ``LOCAL_RANK``), else ``gloo``. Without ``torchrun``'s variables the script runs
    as one process and no group is created, so the same script works both ways.
    Calling it again after the group exists returns the same description.

    Args:
        backend: Force a backend; ``None`` picks as above.

    Returns:
        A :class:`DistEnv`.

    Example:
        >>> env = init_from_env()  # not under torchrun here: a single process
        >>> env.rank, env.world_size, env.backend
        (0, 1, '')
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not dist.is_initialized() and "RANK" not in os.environ:
        return DistEnv(0, 1, 0, device, "")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        chosen = backend or ("nccl" if cuda else "gloo")
        kwargs: dict[str, Any] = {"device_id": device} if chosen == "nccl" else {}
        dist.init_process_group(chosen, **kwargs)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device,
                   str(dist.get_backend()))


def shard_batch(batch: Batch, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's contiguous share of a global batch: rows ``[rank*b, (rank+1)*b)``, ``b = B/W``.

    Every tensor whose leading size equals the batch size ``B`` is split; other entries
    are kept as they are. Equal shares keep the average of the ranks' mean losses equal
    to the mean loss of the global batch (for losses that are means over rows with the
    same number of counted tokens per row).

    Args:
        batch: Keyword arguments of ``model.forward`` with a leading batch dimension.
        rank: This process's rank.
        world_size: Number of processes.

    Returns:
        A new dict (tensors are views into the input's).

    Raises:
        ParameterError: No tensor has a batch dimension, or ``B`` is not a multiple of
            ``world_size``, or ``rank`` is out of range.

    Example:
        >>> import torch
        >>> shard_batch({"input_ids": torch.arange(8).view(4, 2)}, 1, 2)["input_ids"].tolist()
        [[4, 5], [6, 7]]
    """
    if not 0 <= rank < world_size:
        raise ParameterError(f"shard_batch: need 0 <= rank < world_size; found rank={rank}, "
                             f"world_size={world_size}.")
    sizes = [v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0]
    if not sizes:
        raise ParameterError(f"shard_batch: batch with keys {sorted(batch)} has no tensor with "
                             "a leading batch dimension.")
    size = int(sizes[0])
    if size % world_size:
        raise ParameterError(f"shard_batch: global batch size {size} is not a multiple of the "
                             f"world size {world_size}; use a global batch of "
                             f"{(size // world_size + 1) * world_size} rows.")
    b = size // world_size
    return {k: v[rank * b:(rank + 1) * b] if isinstance(v, Tensor) and v.dim() > 0
            and v.shape[0] == size else v for k, v in batch.items()}


def shard_batches(batches: Iterable[Batch], rank: int, world_size: int) -> Iterator[dict[str, Any]]:
    """Lazily apply :func:`shard_batch` to every global batch of ``batches``.

    Every rank iterates the same global sequence (same seed, same order) and keeps its
    share, so step ``t`` of every rank uses shares of the same global batch.

    Example:
        >>> import torch
        >>> it = shard_batches([{"x": torch.arange(4)}], 0, 2)
        >>> next(it)["x"].tolist()
        [0, 1]
    """
    for batch in batches:
        yield shard_batch(batch, rank, world_size)
