"""Index encodings of ``spec/format.md`` §6.2: absolute ``abs32``/``abs64``, gap ``gap8``/``gap16``.

A gap code stream with ``M = 2**B - 1`` walks a cursor that starts at ``-1``: code ``0``
(an escape) advances it by ``M`` and emits nothing, a code ``r`` in ``[1, M]`` advances it
by ``r`` and emits an entry at the new position. Every conversion here is vectorised.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spdelta.format.constants import INDEX_DTYPES, TORCH_DTYPES

__all__ = ["choose_encoding", "decode_indices", "encode_auto", "encode_indices", "encoded_nbytes"]

_GAP_MAX = {"gap8": 2**8 - 1, "gap16": 2**16 - 1}
_ABS_LIMIT = {"abs32": 2**31, "abs64": 2**63}


def _gaps(indices: Tensor) -> Tensor:
    """Distances between consecutive indices, the first from ``-1`` (int64, >= 1 when sorted)."""
    idx = indices.long()
    if not idx.numel():
        return idx
    out = torch.empty_like(idx)  # one subtraction pass (torch.diff with prepend makes 3)
    out[:1] = idx[:1] + 1
    torch.sub(idx[1:], idx[:-1], out=out[1:])
    return out


def _escapes(gaps: Tensor, m: int) -> int:
    """Escape codes a gap stream with maximum code ``m`` needs: ``sum((g - 1) div m)``."""
    big = gaps[gaps > m]  # usually few: divide only those
    return int(((big - 1) // m).sum()) if big.numel() else 0


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


def _choose(gaps: Tensor, numel: int) -> str:
    """:func:`choose_encoding` from the gaps of the indices."""
    candidates = ("gap8", "gap16", "abs32" if numel <= _ABS_LIMIT["abs32"] else "abs64")
    n = gaps.numel()
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
    idx = indices.detach().to("cpu", torch.int64)
    gaps = _gaps(idx)
    encoding = _choose(gaps, numel)
    if encoding in _ABS_LIMIT:
        return encoding, idx.to(TORCH_DTYPES[INDEX_DTYPES[encoding]])
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
    idx = indices.detach().to("cpu", torch.int64)
    if encoding in _ABS_LIMIT:
        return idx.to(TORCH_DTYPES[INDEX_DTYPES[encoding]])
    return _gap_codes(_gaps(idx), encoding)


def _gap_codes(gaps: Tensor, encoding: str) -> Tensor:
    """The code stream of a gap encoding from the gaps (>= 1) of sorted indices."""
    dtype = TORCH_DTYPES[INDEX_DTYPES[encoding]]
    m = _GAP_MAX[encoding]
    if not gaps.numel() or int(gaps.max()) <= m:  # no escapes: the codes are the gaps
        return gaps.to(dtype)
    escapes = (gaps - 1) // m  # (nnz,) escape codes written before each entry
    slots = torch.cumsum(escapes + 1, 0) - 1  # position of each entry's non-zero code
    codes = torch.zeros(int(slots[-1]) + 1, dtype=torch.int32)  # uint16: no index_put on CPU
    codes[slots] = (gaps - m * escapes).to(torch.int32)
    return codes.to(dtype)


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
    c = codes.to(torch.int64)
    if encoding in _ABS_LIMIT:
        return c
    escapes = c == 0
    if not bool(escapes.any()):  # common case: no escape, every code is an entry
        return c.cumsum_(0).sub_(1)
    at = escapes.nonzero().flatten().tolist()
    pos = c.masked_fill_(escapes, _GAP_MAX[encoding]).cumsum_(0).sub_(1)
    if len(at) > 4096:  # many escapes: a boolean mask is as good as slicing
        return pos[~escapes]
    bounds = [-1, *at, pos.numel()]  # keep the runs between escapes (fast when few)
    return torch.cat([pos[lo + 1 : hi] for lo, hi in zip(bounds, bounds[1:], strict=False)])
