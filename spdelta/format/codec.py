"""Index encodings of ``spec/format.md`` §6.2: absolute ``abs32``/``abs64``, gap ``gap8``/``gap16``.

A gap code stream with ``M = 2**B - 1`` walks a cursor that starts at ``-1``: code ``0``
(an escape) advances it by ``M`` and emits nothing, a code ``r`` in ``[1, M]`` advances it
by ``r`` and emits an entry at the new position. Every conversion here is vectorised, in
NumPy on the CPU (about 5x torch's integer kernels on these passes, measured on 4.6M
entries: 0.16 s vs 0.84 s to choose and encode).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from spdelta.format.constants import INDEX_DTYPES, TORCH_DTYPES

__all__ = ["choose_encoding", "decode_indices", "encode_auto", "encode_indices", "encoded_nbytes"]

_GAP_MAX = {"gap8": 2**8 - 1, "gap16": 2**16 - 1}
_ABS_LIMIT = {"abs32": 2**31, "abs64": 2**63}


def _gaps(indices: Tensor) -> np.ndarray:
    """Distances between consecutive indices, the first from ``-1`` (int64, >= 1 when sorted)."""
    idx = indices.detach().to("cpu", torch.int64).numpy()
    out = np.empty_like(idx)  # one subtraction pass (a diff with prepend makes three)
    if idx.size:
        out[0] = idx[0] + 1
        np.subtract(idx[1:], idx[:-1], out=out[1:])
    return out


def _escapes(gaps: np.ndarray, m: int) -> int:
    """Escape codes a gap stream with maximum code ``m`` needs: ``sum((g - 1) div m)``."""
    big = gaps[gaps > m]  # usually few: divide only those
    return int(((big - 1) // m).sum()) if big.size else 0


def encoded_nbytes(indices: Tensor, numel: int, encoding: str) -> int | None:
    """Exact byte size of ``indices`` in ``encoding``, or ``None`` when it cannot hold them.

    Args:
        indices: 1-D integer tensor, strictly increasing flat positions.
        numel: Number of elements of the dense tensor.
        encoding: One of ``"gap8"``, ``"gap16"``, ``"abs32"``, ``"abs64"``.

    Returns:
        The ``::idx`` tensor size in bytes, or ``None`` (``abs32`` with ``numel > 2**31``).

    Example:
        >>> import torch
        >>> idx = torch.tensor([0, 300])
        >>> encoded_nbytes(idx, 400, "gap8"), encoded_nbytes(idx, 400, "abs32")
        (3, 8)
    """
    if encoding in _ABS_LIMIT:
        if numel > _ABS_LIMIT[encoding]:
            return None
        return indices.numel() * (4 if encoding == "abs32" else 8)
    escapes = _escapes(_gaps(indices), _GAP_MAX[encoding])
    return (indices.numel() + escapes) * (1 if encoding == "gap8" else 2)


def choose_encoding(indices: Tensor, numel: int) -> str:
    """The smallest encoding for ``indices`` by exact byte count; ties prefer gap8, gap16, abs.

    Args:
        indices: 1-D integer tensor, strictly increasing flat positions in ``[0, numel)``.
        numel: Number of elements of the dense tensor.

    Returns:
        ``"gap8"``, ``"gap16"``, ``"abs32"`` or (when ``numel > 2**31``) ``"abs64"``.

    Example:
        >>> import torch
        >>> choose_encoding(torch.tensor([1, 2, 3]), 10)
        'gap8'
        >>> choose_encoding(torch.tensor([10**6]), 10**7)
        'abs32'
        >>> choose_encoding(torch.tensor([2**40 - 1]), 2**40)
        'abs64'
    """
    return _choose(_gaps(indices), numel)


def _choose(gaps: np.ndarray, numel: int) -> str:
    """:func:`choose_encoding` from the gaps of the indices."""
    candidates = ("gap8", "gap16", "abs32" if numel <= _ABS_LIMIT["abs32"] else "abs64")
    n = gaps.size
    big = gaps[gaps > _GAP_MAX["gap8"]]  # only gaps above 255 need escapes
    sizes = [
        (n + _escapes(big, _GAP_MAX["gap8"])) * 1,
        (n + _escapes(big, _GAP_MAX["gap16"])) * 2,
        n * (4 if candidates[2] == "abs32" else 8),
    ]
    return min(zip(sizes, range(3), candidates, strict=True))[2]


def encode_auto(indices: Tensor, numel: int) -> tuple[str, Tensor]:
    """:func:`choose_encoding` and :func:`encode_indices` in one pass over the gaps.

    Example:
        >>> import torch
        >>> enc, codes = encode_auto(torch.tensor([0, 2, 300]), 400)
        >>> enc, codes.tolist()
        ('gap8', [1, 2, 0, 43])
    """
    gaps = _gaps(indices)
    encoding = _choose(gaps, numel)
    if encoding in _ABS_LIMIT:
        return encoding, indices.detach().to("cpu", TORCH_DTYPES[INDEX_DTYPES[encoding]])
    return encoding, _gap_codes(gaps, encoding)


def encode_indices(indices: Tensor, encoding: str) -> Tensor:
    """Encode sorted flat indices as the ``::idx`` tensor of ``encoding``.

    Args:
        indices: 1-D integer tensor, strictly increasing, non-negative (not checked here).
        encoding: One of ``"gap8"``, ``"gap16"``, ``"abs32"``, ``"abs64"``.

    Returns:
        A 1-D CPU tensor of dtype uint8 / uint16 / int32 / int64.

    Example:
        >>> import torch
        >>> encode_indices(torch.tensor([0, 2, 300]), "gap8").tolist()
        [1, 2, 0, 43]
    """
    if encoding in _ABS_LIMIT:
        return indices.detach().to("cpu", TORCH_DTYPES[INDEX_DTYPES[encoding]])
    return _gap_codes(_gaps(indices), encoding)


def _gap_codes(gaps: np.ndarray, encoding: str) -> Tensor:
    """The code stream of a gap encoding from the gaps (>= 1) of sorted indices."""
    dtype = np.uint8 if encoding == "gap8" else np.uint16
    m = _GAP_MAX[encoding]
    if not gaps.size or int(gaps.max()) <= m:  # no escapes: the codes are the gaps
        return torch.from_numpy(gaps.astype(dtype))
    escapes = np.zeros(gaps.size, dtype=np.int64)  # escape codes written before each entry
    big = np.flatnonzero(gaps > m)
    escapes[big] = (gaps[big] - 1) // m
    slots = np.cumsum(escapes + 1) - 1  # position of each entry's non-zero code
    codes = np.zeros(int(slots[-1]) + 1, dtype=dtype)
    codes[slots] = gaps - m * escapes
    return torch.from_numpy(codes)


def decode_indices(codes: Tensor, encoding: str) -> Tensor:
    """Decode an ``::idx`` tensor into 1-D int64 flat indices.

    Gap streams decode to strictly increasing indices; their code count and trailing
    escapes are not checked here (see ``spec §7 V7``). Absolute streams are returned as is.

    Args:
        codes: 1-D tensor of the encoding's dtype.
        encoding: One of ``"gap8"``, ``"gap16"``, ``"abs32"``, ``"abs64"``.

    Returns:
        1-D int64 indices.

    Example:
        >>> import torch
        >>> decode_indices(torch.tensor([1, 2, 0, 43], dtype=torch.uint8), "gap8").tolist()
        [0, 2, 300]
    """
    c = codes.detach().to("cpu", torch.int64)
    if encoding in _ABS_LIMIT:
        return c
    n = c.numpy()  # shares c's memory: c is a fresh int64 copy (or the caller's int64 codes)
    if c.data_ptr() == codes.data_ptr():
        c = c.clone()
        n = c.numpy()
    escapes = n == 0
    if not escapes.any():  # common case: no escape, every code is an entry
        np.cumsum(n, out=n)
        n -= 1
        return c
    n[escapes] = _GAP_MAX[encoding]
    np.cumsum(n, out=n)
    n -= 1
    return torch.from_numpy(n[~escapes])
