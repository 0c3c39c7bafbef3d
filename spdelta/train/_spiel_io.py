"""The SpIEL training state and its resumable, atomic, pickle-free file form."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from torch import Tensor

from spdelta.errors import SpdeltaError
from spdelta.train._state_io import decode_state, encode_state, read_state, write_state
from spdelta.types import Support, Values

__all__ = ["SpielState", "load_state", "save_state"]

class SpielState(NamedTuple):
    """Everything a SpIEL run carries from one step to the next.

    Attributes:
        values: Name -> 1-D delta values, aligned with ``support``.
        support: Name -> 1-D int64 strictly increasing flat indices; ``nnz`` per tensor
            never changes.
        opt_state: The optimizer state (e.g. :class:`~spdelta.optim.AdamWState` or
            :class:`~spdelta.optim.SM3State`), aligned with ``support``.
        step: Number of optimizer steps taken.
        grad_acc: Name -> dense, flattened gradient of the target weight summed over
            the current AG window; empty outside it (and always for MA).
        rng_state: The state of the run's generator after its last draw (``uint8``),
            restored on resume; ``None`` when no generator was used.
    """

    values: Values
    support: Support
    opt_state: Any
    step: int
    grad_acc: Values
    rng_state: Tensor | None


def save_state(state: SpielState, path: str | os.PathLike[str]) -> None:
    """Write ``state`` to the file ``path`` atomically (temp file, fsync, ``os.replace``).

    The file is safetensors plus JSON (:mod:`spdelta.train._state_io`): every tensor
    stored exactly, so a resumed run is bit-identical to an uninterrupted one, and
    nothing in it can run code when read.

    Args:
        state: The state to save.
        path: Destination; replaced if it exists.

    Example:
        >>> import os, tempfile, torch
        >>> s = SpielState({"w": torch.ones(1)}, {"w": torch.tensor([2])}, None, 3, {}, None)
        >>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
        >>> save_state(s, path)
        >>> load_state(path).step
        3
    """
    doc, flat = encode_state(state)
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in sorted(flat.items())]
    write_state(path, doc, specs, flat.__getitem__)


def load_state(path: str | os.PathLike[str]) -> SpielState:
    """Read a state written by :func:`save_state` (JSON and raw numbers: no code runs).

    Args:
        path: The file.

    Returns:
        The :class:`SpielState`, on CPU.

    Raises:
        SpdeltaError: The file is not a SpIEL state of a known version.

    Example:
        >>> import os, tempfile, torch
        >>> s = SpielState({}, {}, None, 0, {}, torch.Generator().get_state())
        >>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
        >>> save_state(s, path)
        >>> torch.equal(load_state(path).rng_state, s.rng_state)
        True
    """
    doc, reader = read_state(path)
    tensors = {k: reader.get_tensor(k) for k in reader.keys()}  # noqa: SIM118
    state = decode_state(doc, tensors, {"SpielState": SpielState})
    if not isinstance(state, SpielState):  # pragma: no cover - decode_state checked the kind
        raise SpdeltaError(f"{os.fspath(path)!r}: not a SpIEL state.")
    return state
