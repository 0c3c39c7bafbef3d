"""Training-state checkpoints that resume at any world size, and read no pickle.

A checkpoint is a directory holding ``state.safetensors``: every tensor of the state,
whole, and the state's structure as JSON in the file's metadata
(:mod:`spdelta.train._state_io`). Sharded tensors (DTensors, e.g. FSDP2 optimizer
state) are gathered one at a time while rank 0 writes; on load a template's DTensor
takes its own shard of the whole tensor, so any world size resumes any checkpoint.
``torch.distributed.checkpoint`` is not used: its ``.metadata`` file is a pickle, which
runs code when read.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from spdelta._io import claim, make_temp_dir
from spdelta.dist._env import rank_and_world
from spdelta.errors import SpdeltaError
from spdelta.train import TrainState
from spdelta.train._state_io import decode_state, encode_state, read_state, write_state
from spdelta.train.spiel import SpielState

__all__ = ["STATE_FILE", "load_checkpoint", "save_checkpoint"]

#: The one file of a checkpoint directory.
STATE_FILE = "state.safetensors"
State = TrainState | SpielState


def _whole(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def save_checkpoint(state: State, path: str | os.PathLike[str], *,
                    group: dist.ProcessGroup | None = None) -> None:
    """Save a training state (safetensors + JSON): every rank calls it; it appears atomically.

    Values, support, optimizer state, step, AG accumulators and the generator state
    are stored exactly. Replicated (plain) tensors are written once, by rank 0;
    DTensors (e.g. FSDP-sharded optimizer state) are gathered one at a time and
    written whole. The directory is written beside ``path`` and renamed into place by
    rank 0, so a crash leaves the previous checkpoint. ``path`` must be on a file
    system the loading ranks see.

    Args:
        state: A :class:`~spdelta.train.TrainState` or :class:`~spdelta.train.spiel.SpielState`.
        path: Checkpoint directory; replaced if it exists.
        group: Process group; ``None`` is the default group (or none at all).

    Example:
        >>> import os, tempfile, torch
        >>> from spdelta.train import TrainState
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> save_checkpoint(TrainState({"w": torch.ones(2)}, None, 3), path)
        >>> load_checkpoint(path).step
        3
    """
    path = os.fspath(path)
    doc, flat = encode_state(state)
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in sorted(flat.items())]
    rank, world = rank_and_world(group)
    if world > 1:
        dist.barrier(group)
    if rank != 0:
        write_state("", doc, specs, lambda k: _whole(flat[k]), write=False)  # the gathers
    else:
        with claim(path):  # also removes temp dirs a killed save left beside it
            tmp = make_temp_dir(path)
            try:
                write_state(os.path.join(tmp, STATE_FILE), doc, specs, lambda k: _whole(flat[k]))
                _publish(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    if world > 1:
        dist.barrier(group)


def _publish(tmp: str, path: str) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` goes, once the new one is in place."""
    if not os.path.exists(path):
        os.replace(tmp, path)
        return
    old = make_temp_dir(path, "old")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike[str], *, template: State | None = None,
                    group: dist.ProcessGroup | None = None) -> State:
    """Load a state saved by :func:`save_checkpoint`, at this job's world size.

    Plain tensors come back whole on every rank (a data-parallel replica), whatever
    the world size that saved them. Where ``template`` holds a DTensor at the same
    place (e.g. FSDP-sharded optimizer state), that tensor is loaded resharded into
    the template's layout.

    Args:
        path: The checkpoint directory.
        template: Optional state whose DTensors give the target sharding.
        group: Process group; ``None`` is the default group (or none at all).

    Returns:
        The state, of the type that was saved.

    Reading parses JSON and raw numbers only: a checkpoint cannot run code when loaded
    (a ``torch.distributed.checkpoint`` directory, whose metadata is a pickle, is
    refused without being read).

    Raises:
        SpdeltaError: ``path`` is not such a checkpoint.

    Example:
        >>> import os, tempfile, torch
        >>> from spdelta.train import TrainState
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> save_checkpoint(TrainState({"w": torch.ones(2)}, None, 3), path)
        >>> load_checkpoint(path).values["w"].tolist()
        [1.0, 1.0]
    """
    path = os.fspath(path)
    del group  # every rank reads the file itself: no collective is needed
    file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(file):
        if os.path.isfile(os.path.join(path, ".metadata")):
            raise SpdeltaError(
                f"{path!r}: a torch.distributed.checkpoint directory (an earlier spdelta format, "
                "or another tool); its .metadata is a pickle, which can run code when read, so "
                "it is not read. Delete it and start over.")
        raise SpdeltaError(f"{path!r}: not a spdelta training checkpoint (no {STATE_FILE}); "
                           "save one with spdelta.dist.save_checkpoint.")
    doc, reader = read_state(file)
    like: dict[str, Any] = encode_state(template)[1] if template is not None else {}
    tensors: dict[str, Tensor] = {}
    for key in reader.keys():  # noqa: SIM118 - a safetensors handle, not a dict
        t = reader.get_tensor(key)
        shape_of = like.get(key)
        if isinstance(shape_of, DTensor) and tuple(shape_of.shape) == tuple(t.shape):
            t = distribute_tensor(t.to(shape_of.device, shape_of.dtype), shape_of.device_mesh,
                                  shape_of.placements, src_data_rank=None)
        tensors[key] = t
    return decode_state(doc, tensors, {"TrainState": TrainState, "SpielState": SpielState})
